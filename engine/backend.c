/* backend.c — creation of a backend by name (the one place that picks an implementation),
 * forks, and the check that a table has every operation. */
#include "backend.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "cpu/cpu_backend.h"
#include "duogen.h"
#ifdef DG_HAVE_CUDA
#include <dlfcn.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include "cuda/cuda_backend.h"

typedef int (*cuda_new_fn)(int device, size_t budget, dg_backend **out, char *err, size_t errlen);

#ifndef DG_BACKEND_ABI
#error "DG_BACKEND_ABI: the Makefile's hash of the backend interface headers (the module carries the same)"
#endif

/* The CUDA backend is a module, libduogen_cuda.so, loaded on the first "cuda:N": a process
 * that never asks for a GPU does not map the CUDA libraries (~156 MiB resident). It is
 * looked for at DG_CUDA_MODULE (then there only), else beside the executable, one folder up
 * (build/tests/ -> build/), and in ../lib/duogen/ (an installed tree); a module built
 * against another dg_backend (dg_cuda_abi) is passed over. The handle stays open for the
 * life of the process, like a linked library's. */
static cuda_new_fn cuda_module(char *err, size_t errlen) {
    char exe[PATH_MAX], path[PATH_MAX + 64];
    const char *env = getenv("DG_CUDA_MODULE");
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    const char *where[4] = {env, "%s/libduogen_cuda.so", "%s/../libduogen_cuda.so", "%s/../lib/duogen/libduogen_cuda.so"};
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
    }
    char why[512] = "not found";
    for (int i = 0; i < 4; i++) {
        if (i == 0 && !env) continue;
        if ((i > 0 && env) || (i > 0 && n <= 0)) break;
        if (i == 0) snprintf(path, sizeof path, "%s", env);
        else snprintf(path, sizeof path, where[i], exe);
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            if (access(path, F_OK) == 0) snprintf(why, sizeof why, "%s", dlerror());
            continue;
        }
        cuda_new_fn fn = (cuda_new_fn)(uintptr_t)dlsym(h, "dg_cuda_backend_new");
        const char *abi = dlsym(h, "dg_cuda_abi");
        if (fn && abi && !strcmp(abi, DG_BACKEND_ABI)) return fn;
        if (!fn) snprintf(why, sizeof why, "%s has no dg_cuda_backend_new", path);
        else snprintf(why, sizeof why, "%s was built with another duogen (backend interface %.20s, this program's "
                      "%s): install the module built with this program", path, abi ? abi : "unmarked", DG_BACKEND_ABI);
        dlclose(h);
    }
    snprintf(err, errlen, "the CUDA backend module libduogen_cuda.so: %s (set DG_CUDA_MODULE)", why);
    return NULL;
}
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

/* Every member but the optional ones: the fused forms and graph_run/graph_release (their
 * composition is in backend.h), memory_free, the sampling pair (the sampler's host path) and
 * the screen's four (the full lm_head instead). */
#define REQUIRED_MEMBERS(X)                                                                    \
    X(free) X(fork) X(alloc) X(release) X(weight_prepare) X(matmul) X(rmsnorm) X(rope)         \
    X(kv_write) X(attention) X(silu_mul) X(add) X(embed) X(download) X(upload)                 \
    X(attention_segments) X(gelu) X(rope_table) X(gather_rows) X(conv3d) X(channel_rmsnorm)    \
    X(upsample2x) X(spatial_attention) X(silu) X(modulate) X(add_gated) X(standardize)         \
    X(status)

int dg_backend_check(const dg_backend *be, char *err, size_t errlen) {
    char missing[512] = "";
    size_t n = 0;
#define CHECK_MEMBER(op)                                                                       \
    if (!be->op && n < sizeof missing)                                                         \
        n += (size_t)snprintf(missing + n, sizeof missing - n, "%s%s", n ? ", " : "", #op);
    REQUIRED_MEMBERS(CHECK_MEMBER)
#undef CHECK_MEMBER
    if (!be->logits_adjust != !be->topk && n < sizeof missing)
        n += (size_t)snprintf(missing + n, sizeof missing - n, "%s%s", n ? ", " : "",
                              be->topk ? "logits_adjust (it comes with topk)" : "topk (it comes with logits_adjust)");
    const int screen = !!be->screen_new + !!be->screen_free + !!be->matmul_bounds + !!be->matmul_pick;
    if (screen % 4 && n < sizeof missing)
        n += (size_t)snprintf(missing + n, sizeof missing - n, "%s%s", n ? ", " : "",
                              "screen_new, screen_free, matmul_bounds or matmul_pick (the four come together)");
    if (!n) return 0;
    snprintf(err, errlen, "backend \"%s\": no %s", be->name ? be->name : "?", missing);
    return DG_EINTERNAL;
}

/* A backend just made: kept when its table is whole, else freed (where it can be). */
static int checked(dg_backend *be, dg_backend **out, char *err, size_t errlen) {
    int rc = dg_backend_check(be, err, errlen);
    if (rc < 0) {
        if (be->free) be->free(be);
        return rc;
    }
    *out = be;
    return 0;
}

int dg_backend_new(const char *name, int n_threads, dg_backend **out, char *err, size_t errlen) {
    return dg_backend_new_opts(name, &(dg_backend_opts){.n_threads = n_threads}, out, err, errlen);
}

int dg_backend_new_opts(const char *name, const dg_backend_opts *o, dg_backend **out, char *err,
                        size_t errlen) {
    const dg_backend_opts opts = o ? *o : (dg_backend_opts){0};
    dg_backend *be = NULL;
    int rc;
    *out = NULL;
    if (!name || !strcmp(name, "cpu") || !strcmp(name, "cpu-scalar")) {
        rc = dg_cpu_backend_new(opts.n_threads, name && !strcmp(name, "cpu-scalar") ? DG_CPU_PORTABLE : DG_CPU_AVX512_BF16,
                                opts.cpu_bf16_compute, &be, err, errlen);
        if (rc == 0) be->weights_hugepages = !opts.cpu_mapped_weights;
    }
    else if (cuda_index(name) >= 0) {
#ifdef DG_HAVE_CUDA
        cuda_new_fn cuda_new = cuda_module(err, errlen);
        if (!cuda_new) return DG_EINVAL;   /* an installation problem, like a missing device */
        rc = cuda_new(cuda_index(name), opts.device_bytes, &be, err, errlen);
#else
        snprintf(err, errlen, "device \"%s\": this build has no CUDA backend (nvcc was not found)", name);
        return DG_EINVAL;
#endif
    } else {
        snprintf(err, errlen, "device \"%s\": not \"cpu\", \"cpu-scalar\" or \"cuda:N\"", name);
        return DG_EINVAL;
    }
    return rc < 0 ? rc : checked(be, out, err, errlen);
}

int dg_backend_fork(dg_backend *be, dg_backend **out, char *err, size_t errlen) {
    dg_backend *f = NULL;
    *out = NULL;
    int rc = be->fork(be, &f, err, errlen);
    return rc < 0 ? rc : checked(f, out, err, errlen);
}

void dg_backend_free(dg_backend *be) {
    if (be) be->free(be);
}
