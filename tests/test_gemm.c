/* The CPU matmul's row invariance (kernels/cpu/matmul.h): row i of y = x · Wᵀ (+ bias) is the
 * same bits whatever m, wherever the row sits in the batch, whatever the thread count, and
 * (on a machine with AVX-512) whether the AVX-512 or the AVX2 kernels compute it. A KV
 * cache filled by decode (m = 1) on a warm worker and by prefill on a cold one depends on
 * it (issue 14 item 3).
 *
 * Shapes: k = 83 (not a multiple of the 16 lanes), k = 1100 (two blocks of the order, 1024
 * and 76 columns, the last with a tail), k = 7 (a tail only); n = 37 and 101 (not multiples
 * of any tile's rows of W, nor of the 96-row chunk), n = 5 (less than a tile); and two
 * shapes drawn from the seed; m = 1, 2, 3, 5, 8 (the multi-row GEMV: one group of x rows or
 * two), 17, 48 (the multi-row GEMV 8 rows at a time against tiles of W; at n = 101, k = 1100
 * in fp32 tiles of 32 rows, cut to the bytes kept in L2), 49, 64, 300 (the GEMM: partial
 * tiles of x; one m-block, or several: 120 or 240 rows). Each batch of m rows is computed twice, from row 0 and from
 * row 3 of x, so a row meets a different tile position; every row is compared with memcmp
 * to that row alone (m = 1, the GEMV). k = 4500 is three blocks of the weights' blocked
 * layout (backend.h: 2048, 2048 and 404 columns, the last ending in a tail): there the same
 * weight in that layout gives the same bits again, alone and in every batch.
 *
 * Accuracy against a double-precision reference: in the canonical order a product meets at
 * most ceil(k/16) roundings in its lane's chain (fused multiply-add; the portable kernels
 * add one for the rounded product), 4 in the tree, one per later block and one for the
 * bias: at most ceil(k/16) + 7 for these shapes, so the error is within
 * (ceil(k/16) + 7)·2^-24·(Σ|x_j·w_j| + |b|) to first order; the check allows
 * (ceil(k/16) + 8)·2^-24·(Σ|x_j·w_j| + |b|). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/gemm_check.h"
#include "common/harness.h"
#include "backend.h"
#include "cpu/cpu_backend.h"
#include "dtype.h"

enum { M_MAX = 300, OFFSET = 3, ROWS = M_MAX + OFFSET };

static const int MS[] = {2, 3, 5, 8, 17, 48, 49, 64, 300};
static const int SHAPES[][2] = {{37, 83}, {101, 1100}, {5, 7}, {21, 4500}};   /* n, k */
enum { N_RANDOM_SHAPES = 2 };   /* and n in 1..48, k in 1..1100 drawn from the seed */

static uint64_t rng = 2024;
static float frand(void) {   /* uniform in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

/* w[n, k] of dtype t with values exact in it (wx: the same values in fp32). */
static void *make_weight(dg_dtype t, int64_t count, float *wx) {
    void *p = malloc((size_t)count * dg_dtype_size(t));
    for (int64_t i = 0; i < count; i++) {
        const float v = frand();
        if (t == DG_DTYPE_BF16) {
            ((uint16_t *)p)[i] = dg_f32_to_bf16(v);
            wx[i] = dg_bf16_to_f32(((uint16_t *)p)[i]);
        } else if (t == DG_DTYPE_F16) {
            /* multiples of 2^-10 in [-1, 1): exact in binary16 */
            const float q = roundf(v * 1024.0f) / 1024.0f;
            const uint16_t sign = q < 0 ? 0x8000 : 0;
            const float a = fabsf(q);
            uint16_t h = 0;
            if (a != 0.0f) {
                int e;
                const float f = frexpf(a, &e);                 /* a = f·2^e, f in [0.5, 1) */
                h = (uint16_t)((e + 14) << 10 | ((int)(f * 2048.0f) & 0x3ff));
            }
            ((uint16_t *)p)[i] = sign | h;
            wx[i] = dg_f16_to_f32(((uint16_t *)p)[i]);
        } else {
            ((float *)p)[i] = v;
            wx[i] = v;
        }
    }
    return p;
}

/* The backends compared: "cpu" at 1 and 2 threads and its AVX2 kernels at 2 threads (one
 * group, one expected bit pattern), "cpu-scalar" at 1 and 2 threads (another group). */
static const gemm_config CONFIGS[] = {
    {"cpu t1", DG_CPU_AVX512, 1, 0},     {"cpu t2", DG_CPU_AVX512, 2, 0},
    {"cpu avx2 t2", DG_CPU_AVX2, 2, 0},  {"cpu-scalar t1", DG_CPU_PORTABLE, 1, 1},
    {"cpu-scalar t2", DG_CPU_PORTABLE, 2, 1},
};
enum { N_CONFIGS = sizeof CONFIGS / sizeof CONFIGS[0] };

/* One weight: every config's per-row results, equal within a group, and every batch's rows
 * equal to them. */
static void check_weight(dg_backend **be, dg_dtype t, int n, int k, int with_bias) {
    float *wx = malloc(sizeof(float) * (size_t)n * k), *x = malloc(sizeof(float) * (size_t)ROWS * k);
    float *b = malloc(sizeof(float) * (size_t)n), *y = malloc(sizeof(float) * (size_t)ROWS * n);
    float *single[2] = {malloc(sizeof(float) * (size_t)ROWS * n), malloc(sizeof(float) * (size_t)ROWS * n)};
    void *wd = make_weight(t, (int64_t)n * k, wx);
    const dg_weight w = {wd, t, n, k, 0};
    const float *bias = with_bias ? b : NULL;
    char what[160];
    for (int i = 0; i < ROWS * k; i++) x[i] = frand();
    for (int i = 0; i < n; i++) b[i] = frand();
    for (int c = 0; c < N_CONFIGS; c++) {
        const gemm_config *cf = &CONFIGS[c];
        float *ref = single[cf->group];
        const int first_of_group = c == 0 || CONFIGS[c - 1].group != cf->group;
        snprintf(what, sizeof what, "%s %s n=%d k=%d%s", cf->label, dg_dtype_name(t), n, k,
                 with_bias ? " +bias" : "");
        /* the group's first config computes every row alone; the others a few rows alone
         * (each m = 1 call is a parallel region: hundreds of them cost seconds on a shared
         * machine where waiting OpenMP threads spin) and every batch */
        const int singles = first_of_group ? ROWS : 8;
        for (int i = 0; i < singles; i++)
            be[c]->matmul(be[c], (first_of_group ? ref : y) + (int64_t)i * n, x + (int64_t)i * k, &w, bias, 1);
        if (first_of_group) {
            if (!gemm_within_bound(ref, x, NULL, wx, bias, ROWS, n, k, (k + 15) / 16 + 8, what)) break;
        } else if (!gemm_rows_match(y, ref, 0, singles, n, what)) {
            break;
        }
        if (!gemm_batches_match(be[c], y, x, k, &w, bias, ref, n, MS, (int)(sizeof MS / sizeof MS[0]), OFFSET, what))
            goto out;
        if (k > DG_WEIGHT_KB) {   /* the blocked layout: the same bits */
            dg_weight wb;
            void *blk = gemm_blocked_copy(&w, &wb);
            snprintf(what, sizeof what, "%s %s n=%d k=%d%s blocked", cf->label, dg_dtype_name(t), n, k,
                     with_bias ? " +bias" : "");
            int ok = blk != NULL;
            CHECK(ok);
            for (int i = 0; ok && i < 8; i++)
                be[c]->matmul(be[c], y + (int64_t)i * n, x + (int64_t)i * k, &wb, bias, 1);
            ok = ok && gemm_rows_match(y, ref, 0, 8, n, what) &&
                 gemm_batches_match(be[c], y, x, k, &wb, bias, ref, n, MS, (int)(sizeof MS / sizeof MS[0]), OFFSET,
                                    what);
            free(blk);
            if (!ok) goto out;
        }
    }
out:
    free(wx); free(x); free(b); free(y); free(single[0]); free(single[1]); free(wd);
}

TEST(rows_are_the_same_bits_whatever_m_offset_threads_and_isa) {
    dg_backend *be[N_CONFIGS] = {0};
    if (gemm_open_backends(be, CONFIGS, N_CONFIGS, 0) < 0) goto out;
    enum { N_FIXED = sizeof SHAPES / sizeof SHAPES[0] };
    int shapes[N_FIXED + N_RANDOM_SHAPES][2];
    gemm_draw_shapes(shapes, SHAPES, N_FIXED, N_RANDOM_SHAPES, 1100, frand);
    for (int t = 0; t < 3; t++)
        for (int s = 0; s < N_FIXED + N_RANDOM_SHAPES; s++)
            for (int with_bias = 0; with_bias < 2; with_bias++)
                check_weight(be, (dg_dtype)t, shapes[s][0], shapes[s][1], with_bias);
out:
    for (int c = 0; c < N_CONFIGS; c++) dg_backend_free(be[c]);
}

/* ---- the fp32 panel order (matmul.h) over a BF16 weight in the panel layout (backend.h) ----
 * Every config gives the same bits here (the portable kernel's fmaf is the SIMD tiles'
 * fused multiply-add): "cpu" at 1 thread is the reference, each row alone; the others'
 * rows alone and every batch, bit for bit. n = 37, 5 (one partial panel), 64 (one full),
 * 130 (two and one of 2 rows); k even: 2 (one pair), 84, 1100, 4500; with and without a
 * bias. Accuracy: a product meets at most k roundings in its output's chain (one fused
 * multiply-add a column) and one for the bias: the check allows (k + 2)·2^-24·(Σ|x_j·w_j|
 * + |b|). */
static void check_panels(dg_backend **be, int n, int k, int with_bias) {
    float *wx = malloc(sizeof(float) * (size_t)n * k), *x = malloc(sizeof(float) * (size_t)ROWS * k);
    float *b = malloc(sizeof(float) * (size_t)n), *y = malloc(sizeof(float) * (size_t)ROWS * n);
    float *ref = malloc(sizeof(float) * (size_t)ROWS * n);
    void *wd = make_weight(DG_DTYPE_BF16, (int64_t)n * k, wx);
    const dg_weight rm = {wd, DG_DTYPE_BF16, n, k, 0};
    dg_weight w;
    void *pan = gemm_panel_copy(&rm, &w);
    const float *bias = with_bias ? b : NULL;
    char what[160];
    CHECK(pan != NULL);
    for (int i = 0; i < ROWS * k; i++) x[i] = frand();
    for (int i = 0; i < n; i++) b[i] = frand();
    for (int c = 0; pan && c < N_CONFIGS; c++) {
        snprintf(what, sizeof what, "%s panels n=%d k=%d%s", CONFIGS[c].label, n, k, with_bias ? " +bias" : "");
        const int singles = c == 0 ? ROWS : 8;
        for (int i = 0; i < singles; i++)
            be[c]->matmul(be[c], (c == 0 ? ref : y) + (int64_t)i * n, x + (int64_t)i * k, &w, bias, 1);
        if (c == 0 ? !gemm_within_bound(ref, x, NULL, wx, bias, ROWS, n, k, k + 2, what)
                   : !gemm_rows_match(y, ref, 0, singles, n, what))
            break;
        if (!gemm_batches_match(be[c], y, x, k, &w, bias, ref, n, MS, (int)(sizeof MS / sizeof MS[0]), OFFSET, what))
            break;
    }
    free(wx); free(x); free(b); free(y); free(ref); free(wd); free(pan);
}

TEST(panel_order_rows_are_the_same_bits_on_every_kernel_set) {
    static const int shapes[][2] = {{37, 84}, {5, 2}, {64, 1100}, {130, 4500}};
    dg_backend *be[N_CONFIGS] = {0};
    if (gemm_open_backends(be, CONFIGS, N_CONFIGS, 0) < 0) goto out;
    for (int s = 0; s < (int)(sizeof shapes / sizeof shapes[0]); s++)
        for (int with_bias = 0; with_bias < 2; with_bias++) check_panels(be, shapes[s][0], shapes[s][1], with_bias);
out:
    for (int c = 0; c < N_CONFIGS; c++) dg_backend_free(be[c]);
}

int main(void) { return test_main(); }
