/* backend.c — creation of a backend by name: the one place that picks an implementation. */
#include "backend.h"

#include <stdio.h>
#include <string.h>

#include "cpu/cpu_backend.h"
#include "duogen.h"

int dg_backend_new(const char *name, int n_threads, dg_backend **out, char *err, size_t errlen) {
    *out = NULL;
    if (!name || !strcmp(name, "cpu")) return dg_cpu_backend_new(n_threads, 0, out, err, errlen);
    if (!strcmp(name, "cpu-scalar")) return dg_cpu_backend_new(n_threads, 1, out, err, errlen);
    snprintf(err, errlen, "device \"%s\": this build has only \"cpu\"", name);
    return DG_EINVAL;
}

void dg_backend_free(dg_backend *be) {
    if (be) be->free(be);
}
