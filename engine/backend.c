/* backend.c — creation of a backend by name: the one place that picks an implementation. */
#include "backend.h"

#include <stdio.h>
#include <string.h>

#include "cpu/cpu_backend.h"
#include "duogen.h"
#ifdef DG_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

/* "cuda" or "cuda:N": the device index, or -1 when the name is not of that form. */
static int cuda_index(const char *name) {
    if (strncmp(name, "cuda", 4)) return -1;
    if (!name[4]) return 0;
    if (name[4] != ':' || !name[5]) return -1;
    int n = 0;
    for (const char *p = name + 5; *p; p++) {
        if (*p < '0' || *p > '9' || n > 1000) return -1;
        n = n * 10 + (*p - '0');
    }
    return n;
}

int dg_backend_new(const char *name, int n_threads, dg_backend **out, char *err, size_t errlen) {
    return dg_backend_new_sized(name, n_threads, 0, out, err, errlen);
}

int dg_backend_new_sized(const char *name, int n_threads, size_t device_bytes, dg_backend **out, char *err,
                         size_t errlen) {
    *out = NULL;
    if (!name || !strcmp(name, "cpu")) return dg_cpu_backend_new(n_threads, 0, out, err, errlen);
    if (!strcmp(name, "cpu-scalar")) return dg_cpu_backend_new(n_threads, 1, out, err, errlen);
    if (cuda_index(name) >= 0) {
#ifdef DG_HAVE_CUDA
        return dg_cuda_backend_new(cuda_index(name), device_bytes, out, err, errlen);
#else
        (void)device_bytes;
        snprintf(err, errlen, "device \"%s\": this build has no CUDA backend (nvcc was not found)", name);
        return DG_EINVAL;
#endif
    }
    snprintf(err, errlen, "device \"%s\": this build has only \"cpu\"", name);
    return DG_EINVAL;
}

void dg_backend_free(dg_backend *be) {
    if (be) be->free(be);
}
