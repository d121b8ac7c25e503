/* gemm_check.h — checks shared by the CPU matmul tests (test_gemm, test_gemm_bf16). */
#ifndef DG_TESTS_GEMM_CHECK_H
#define DG_TESTS_GEMM_CHECK_H

#include "backend.h"

/* A CPU backend a matmul test compares: its kernel set (DG_CPU_*), threads, and a group
 * (configs of one group must give the same bits; test_gemm's fp32 kernels and the scalar
 * ones are two groups, the bf16 test has one). */
typedef struct {
    const char *label;
    int         simd, threads, group;
} gemm_config;

/* y = x·wᵀ (+ bias) for every batch m in ms[0 .. n_ms-1], from row 0 and from row `offset`
 * of x [.., k] (so that a row meets another tile position), each batch's rows checked bit
 * for bit against ref (every row computed alone; gemm_rows_match). 1, or 0 after failing. */
int gemm_batches_match(dg_backend *be, float *y, const float *x, int k, const dg_weight *w, const float *bias,
                       const float *ref, int n, const int *ms, int n_ms, int offset, const char *what);

/* A copy of w (row-major) in the blocked layout of DG_WEIGHT_KB columns (backend.h), laid
 * out here by the layout's definition, not through dg_weight_at: *out views it (kb set);
 * the caller frees the returned buffer. NULL when out of memory. */
void *gemm_blocked_copy(const dg_weight *w, dg_weight *out);

/* A copy of w (BF16, row-major, cols even) in the panel layout of backend.h, laid out here
 * by the layout's definition; as gemm_blocked_copy. */
void *gemm_panel_copy(const dg_weight *w, dg_weight *out);

/* be[c] = a backend of cf[c] for c < n (bf16_compute: the bf16 compute order); 0, or -1
 * after failing the test naming the config (be[] holds what was made: free it either way). */
int gemm_open_backends(dg_backend **be, const gemm_config *cf, int n, int bf16_compute);

/* out[0 .. n_fixed-1] = fixed, then n_random shapes (n, k) drawn with frand (uniform in
 * [-1, 1)): n in 1 .. 48, k in 1 .. k_max. */
void gemm_draw_shapes(int (*out)[2], const int (*fixed)[2], int n_fixed, int n_random, int k_max,
                      float (*frand)(void));

/* Every y[i, r] of y[rows, n] against a double-precision Σ_j xmap(x[i, j])·wx[r, j] + b[r]
 * (b may be NULL; xmap NULL: x as it is): within chain·2^-24·(Σ|products| + |b[r]|), where
 * chain bounds the roundings an output meets (each test states its own). Fails the test,
 * naming `what`, the output and the bound; returns 1 when all are within. */
int gemm_within_bound(const float *y, const float *x, float (*xmap)(float), const float *wx,
                      const float *b, int rows, int n, int k, double chain, const char *what);

/* Row i of y[m, n] is bit for bit row first + i of `single` (the per-row results): fails the
 * test naming `what` and the row otherwise. */
int gemm_rows_match(const float *y, const float *single, int first, int m, int n, const char *what);

#endif
