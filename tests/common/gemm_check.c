/* gemm_check.c — see gemm_check.h. */
#include "gemm_check.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "cpu/cpu_backend.h"

int gemm_within_bound(const float *y, const float *x, float (*xmap)(float), const float *wx,
                      const float *b, int rows, int n, int k, double chain, const char *what) {
    const double u = ldexp(1.0, -24);
    for (int i = 0; i < rows; i++)
        for (int r = 0; r < n; r++) {
            double ref = b ? b[r] : 0.0, mag = b ? fabs(b[r]) : 0.0;
            for (int j = 0; j < k; j++) {
                const float xv = x[(int64_t)i * k + j];
                const double t = (double)(xmap ? xmap(xv) : xv) * wx[(int64_t)r * k + j];
                ref += t;
                mag += fabs(t);
            }
            if (fabs(y[(int64_t)i * n + r] - ref) > chain * u * mag) {
                test_fail(__FILE__, __LINE__, "%s: y[%d,%d] %.9g vs %.9g (bound %.3g)", what, i, r,
                          y[(int64_t)i * n + r], ref, chain * u * mag);
                return 0;
            }
        }
    return 1;
}

int gemm_rows_match(const float *y, const float *single, int first, int m, int n, const char *what) {
    for (int i = 0; i < m; i++)
        if (memcmp(y + (int64_t)i * n, single + (int64_t)(first + i) * n, sizeof(float) * (size_t)n)) {
            test_fail(__FILE__, __LINE__, "%s: row %d of m = %d differs from its per-row result", what,
                      first + i, m);
            return 0;
        }
    return 1;
}

int gemm_open_backends(dg_backend **be, const gemm_config *cf, int n, int bf16_compute) {
    char err[256];
    for (int c = 0; c < n; c++)
        if (dg_cpu_backend_new(cf[c].threads, cf[c].simd, bf16_compute, &be[c], err, sizeof err) < 0) {
            test_fail(__FILE__, __LINE__, "%s: %s", cf[c].label, err);
            return -1;
        }
    return 0;
}

void gemm_draw_shapes(int (*out)[2], const int (*fixed)[2], int n_fixed, int n_random, int k_max,
                      float (*frand)(void)) {
    memcpy(out, fixed, sizeof(int[2]) * (size_t)n_fixed);
    for (int s = n_fixed; s < n_fixed + n_random; s++) {
        out[s][0] = 1 + (int)((frand() + 1.0f) * 24.0f);                 /* 1 .. 48 */
        out[s][1] = 1 + (int)((frand() + 1.0f) * ((float)k_max / 2.0f)); /* 1 .. k_max */
    }
}

int gemm_batches_match(dg_backend *be, float *y, const float *x, int k, const dg_weight *w, const float *bias,
                       const float *ref, int n, const int *ms, int n_ms, int offset, const char *what) {
    for (int mi = 0; mi < n_ms; mi++)
        for (int first = 0; first <= offset; first += offset) {
            be->matmul(be, y, x + (int64_t)first * k, w, bias, ms[mi]);
            if (!gemm_rows_match(y, ref, first, ms[mi], n, what)) return 0;
        }
    return 1;
}

void *gemm_blocked_copy(const dg_weight *w, dg_weight *out) {
    const size_t es = dg_dtype_size(w->dtype), rows = (size_t)w->rows, cols = (size_t)w->cols, kb = DG_WEIGHT_KB;
    char *p = malloc(rows * cols * es);
    if (!p) return NULL;
    /* block after block of kb columns (the last narrower), each block's rows in turn */
    for (size_t b0 = 0; b0 < cols; b0 += kb) {
        const size_t bw = cols - b0 < kb ? cols - b0 : kb;
        for (size_t r = 0; r < rows; r++)
            memcpy(p + (b0 * rows + r * bw) * es, (const char *)w->data + (r * cols + b0) * es, bw * es);
    }
    *out = (dg_weight){p, w->dtype, w->rows, w->cols, DG_WEIGHT_KB};
    return p;
}

void *gemm_panel_copy(const dg_weight *w, dg_weight *out) {
    const size_t rows = (size_t)w->rows, cols = (size_t)w->cols, pr = DG_WEIGHT_PANEL_ROWS;
    uint32_t *p = malloc(rows * cols * 2);
    if (!p) return NULL;
    /* panel after panel of pr rows (the last np <= pr), each the pairs of its rows step after step */
    for (size_t p0 = 0; p0 < rows; p0 += pr) {
        const size_t np = rows - p0 < pr ? rows - p0 : pr;
        for (size_t s = 0; s < cols / 2; s++)
            for (size_t j = 0; j < np; j++)
                memcpy(p + p0 * cols / 2 + s * np + j, (const uint16_t *)w->data + (p0 + j) * cols + 2 * s, 4);
    }
    *out = (dg_weight){p, w->dtype, w->rows, w->cols, DG_WEIGHT_PANELS};
    return p;
}
