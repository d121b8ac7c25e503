/* gemm_check.h — checks shared by the CPU matmul tests (test_gemm, test_gemm_bf16). */
#ifndef DG_TESTS_GEMM_CHECK_H
#define DG_TESTS_GEMM_CHECK_H

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
