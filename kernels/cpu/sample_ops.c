/* sample_ops.c — the CPU sampling operations: penalty and bias in place, top-k with the
 * log-sum-exp. Single-threaded on purpose: the sum must be the host sampler's own (one fp32
 * sum in index order, engine/text/sampler.c), so that sampling through these operations on the
 * CPU picks exactly the token the host path picks. */
#include "sample_ops.h"

#include <math.h>

void dg_cpu_logits_adjust(dg_backend *be, float *x, int n, const int32_t *seen, int n_seen,
                          float penalty, const dg_logit_bias *bias, int n_bias) {
    (void)be;
    (void)n;
    for (int j = 0; j < n_bias; j++) x[bias[j].token] += bias[j].bias;   /* first, as transformers */
    for (int i = 0; i < n_seen; i++) {
        float *v = &x[seen[i]];
        *v = *v < 0.0f ? *v * penalty : *v / penalty;
    }
}

/* Token a ranks below token b: a lower value, or the same value and a higher index. */
static int worse(const float *x, int32_t a, int32_t b) {
    return x[a] < x[b] || (x[a] == x[b] && a > b);
}

/* Min-heap of ids, the worst at h[0]. */
static void heap_down(int32_t *h, int n, int i, const float *x) {
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) return;
        if (c + 1 < n && worse(x, h[c + 1], h[c])) c++;
        if (!worse(x, h[c], h[i])) return;
        int32_t t = h[i]; h[i] = h[c]; h[c] = t;
        i = c;
    }
}

/* One pass with a heap of k ids in idx itself (O(n log k) at worst, ~n compares on a
 * logits row), then heapsort in place: the worst goes last, so idx ends best first. A later
 * index never displaces an equal value (it ranks below it), which keeps the lower ids. */
void dg_cpu_topk(dg_backend *be, const float *x, int n, int k, float inv_temp, float *val,
                 int32_t *idx, double *lse) {
    (void)be;
    for (int i = 0; i < k; i++) idx[i] = i;
    for (int j = k / 2 - 1; j >= 0; j--) heap_down(idx, k, j, x);
    for (int i = k; i < n; i++)
        if (x[i] > x[idx[0]]) {
            idx[0] = i;
            heap_down(idx, k, 0, x);
        }
    for (int m = k - 1; m > 0; m--) {
        int32_t t = idx[0]; idx[0] = idx[m]; idx[m] = t;
        heap_down(idx, m, 0, x);
    }
    for (int i = 0; i < k; i++) val[i] = x[idx[i]];
    if (!lse) return;
    if (val[0] == -INFINITY) {
        *lse = -INFINITY;
        return;
    }
    /* the expression and the order of engine/text/sampler.c's z: keep them in step */
    const float mx = val[0] * inv_temp;
    double z = 0.0;
    for (int i = 0; i < n; i++) z += expf(x[i] * inv_temp - mx);
    *lse = (double)mx + log(z);
}
