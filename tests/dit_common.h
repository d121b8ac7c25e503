/* dit_common.h — helpers shared by the image-generation tests (test_vae, test_flow,
 * test_dit, test_connector): the golden manifest, float32 golden files, the closed-form
 * inputs of tools/reference/make_dit_goldens.py, the tiny package, error measures. */
#ifndef DG_TEST_DIT_COMMON_H
#define DG_TEST_DIT_COMMON_H

#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/package.h"

#define DIT_GOLDEN_DIR "tests/golden/dit"

/* x[i] = a · sin(b·i + c) in double, rounded to float (make_dit_goldens.py `wave`). */
static inline void dit_wave(float *x, int64_t n, double a, double b, double c) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)(a * sin(b * (double)i + c));
}

static inline json_t *dit_goldens(void) {
    static json_t *g;
    json_error_t je;
    if (!g && !(g = json_load_file(DIT_GOLDEN_DIR "/goldens.json", 0, &je)))
        fprintf(stderr, "cannot read %s/goldens.json: %s\n", DIT_GOLDEN_DIR, je.text);
    return g;
}

/* Reads a golden array of n floats (the file must hold exactly n); NULL on failure. */
static inline float *dit_read_f32(json_t *entry, int64_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", DIT_GOLDEN_DIR, json_string_value(json_object_get(entry, "file")));
    FILE *f = fopen(path, "rb");
    float *x = malloc(sizeof(float) * (size_t)(n + 1));
    size_t r = f && x ? fread(x, sizeof(float), (size_t)n + 1, f) : 0;
    if (f) fclose(f);
    if (r != (size_t)n) {
        fprintf(stderr, "%s: expected %" PRId64 " floats, read %zu\n", path, n, r);
        free(x);
        return NULL;
    }
    return x;
}

static char dit_pkg_dir[256];

/* The tiny package of the goldens, written once per test program into a temporary
 * directory by build/mkmodel (removed at exit: test_make_package); the component's checksum must match the goldens' (mkmodel
 * is deterministic across machines). Returns the package directory or NULL. */
static inline const char *dit_package(const char *component) {
    char *dir = dit_pkg_dir;
    static int state;   /* 0 not yet, 1 ready, -1 failed */
    json_t *g = dit_goldens();
    if (!state) {
        state = -1;
        json_t *p = json_object_get(g, "package");
        if (!g || test_make_package(json_string_value(json_object_get(p, "preset")),
                                    (long long)json_integer_value(json_object_get(p, "seed")), NULL, dir,
                                    sizeof dit_pkg_dir) < 0)
            return NULL;
        state = 1;
    }
    if (state < 0) return NULL;
    const char *want = json_string_value(json_object_get(json_object_get(g, "checksums"), component));
    char path[512], got[32];
    if (!strcmp(component, "connector"))
        snprintf(path, sizeof path, "%s/connector.safetensors", dir);
    else
        snprintf(path, sizeof path, "%s/%s/diffusion_pytorch_model.safetensors", dir, component);
    snprintf(got, sizeof got, "%016" PRIx64, test_file_fnv1a64(path));
    if (!want || strcmp(want, got)) {
        fprintf(stderr, "%s: checksum %s, the goldens were made from %s\n", path, got, want ? want : "?");
        return NULL;
    }
    return dir;
}

/* Largest |a - b| / (abs_tol + rel_tol·|b|); <= 1 passes. *max_abs gets the largest |a - b|. */
static inline double dit_err(const float *a, const float *b, int64_t n, double abs_tol,
                             double rel_tol, double *max_abs) {
    double worst = 0.0;
    *max_abs = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d == d)) return INFINITY;
        if (d > *max_abs) *max_abs = d;
        double e = d / (abs_tol + rel_tol * fabs((double)b[i]));
        if (e > worst) worst = e;
    }
    return worst;
}

#endif
