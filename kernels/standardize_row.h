/* standardize_row.h — the connector's per-row standardization (backend.h `standardize`) as
 * host code: the CPU backend's kernel, and the CUDA backend's verified path (a host round
 * trip while its kernel awaits a device run: kernels/cuda/NOTES.md). One definition, so
 * that both give the same bits.
 *
 * Two-pass mean and unbiased variance in double: rows of LLM hidden states reach |x| ~ 1e3
 * with n = 3584, where a float sum of squares would lose digits; eps is added to the std,
 * not under the root (docs/specs/cosmos_dit_wan_vae.md §1.1). y may equal x. */
#ifndef DG_STANDARDIZE_ROW_H
#define DG_STANDARDIZE_ROW_H

#include <math.h>

static inline void dg_standardize_row(float *y, const float *x, int n, float eps) {
    double mean = 0.0, var = 0.0;
    for (int j = 0; j < n; j++) mean += x[j];
    mean /= n;
    for (int j = 0; j < n; j++) var += ((double)x[j] - mean) * ((double)x[j] - mean);
    const double r = 1.0 / (sqrt(var / (n > 1 ? n - 1 : 1)) + eps);
    for (int j = 0; j < n; j++) y[j] = (float)(((double)x[j] - mean) * r);
}

#endif
