/* sample.cu — the sampling operations (backend.h: logits_adjust, topk): repetition penalty
 * and logit biases in place on the logits row, and the k best tokens of the row (with the
 * log-sum-exp for top-p) brought back to the host, so that the sampler (engine/text/sampler.c)
 * reads ~1000 candidates instead of downloading the 152064 logits of every token.
 *
 * topk, in two kernels and one small copy back:
 *   1. topk_part: one 1024-thread block per TOPK_CHUNK (8192) values, held in shared memory
 *      as order-preserving 32-bit keys. Radix select (four 8-bit digits from the top,
 *      histograms in shared memory with warp-aggregated atomics) finds the key of the
 *      block's k-th best and how many keys equal to it belong in; an ordered compaction
 *      (each thread a contiguous run, two block scans) writes the block's k best in index
 *      order. With the lse: the block's max and sum of exp(x/T - max).
 *   2. topk_merge: one block selects the k best of those n_blocks·k candidates the same way
 *      (they lie in index order, so "equal keys: lower index first" is again "first in
 *      array order"), sorts them (bitonic, 64-bit keys: value key, then ~index) and writes
 *      values (read back from x, so -0 stays -0), indices and the combined lse.
 * The selection is exact: the same set and order as the CPU (kernels/cpu/sample_ops.c).
 *
 * Cost at V = 152064 (19 blocks in pass 1), estimated, not yet measured on a GPU: pass 1
 * reads the row once (0.6 MB; 19 SMs) and spends ~4 x (histogram of 8 keys a thread + a
 * 256-bin scan) + the compaction: ~10 µs; pass 2 scans 19·k keys from L2 (k = 82: 1.6k;
 * k = 1056: 20k) and sorts <= 2048: 5-15 µs; the copy back (8 + 8k bytes, pinned) and the
 * stream sync ~10 µs. ~25-40 µs per token against a 0.6 MB copy (~25-50 µs) plus the host
 * pass over the vocabulary (0.5-1.2 ms on one core).
 *
 * The lse: fp32 exp and per-thread/per-block fp32 sums, blocks combined in double; its error
 * against the CPU's (one fp32 sum in index order, whose own rounding error grows with V) is
 * ~1e-6 relative in exp(lse), typically ~2e-5 at V = 152064 because of the CPU's long sum.
 * The sampler uses it only for top-p without top-k, as the normaliser: there a token whose
 * cumulative mass lies within that much of the 1 - top_p cutoff may be kept on one backend
 * and dropped on the other. Greedy, top-k and top-k + top-p do not read it and pick the
 * CPU's token exactly. */
#include "cuda_common.cuh"

#define ADJUST_THREADS 1024
#define TOPK_THREADS   1024
#define TOPK_CHUNK     8192   /* values per pass-1 block: 8 a thread, 32 KiB of keys in shared memory */

static_assert(8 + 8 * (size_t)DG_BACKEND_TOPK_MAX <= DG_CUDA_READBACK_BYTES, "topk's result fits the readback");
static_assert(DG_BACKEND_TOPK_MAX <= 2 * TOPK_THREADS, "the bitonic sort gives each thread one pair");
static_assert(TOPK_THREADS >= 256, "radix_select gives each of the 256 bins a thread");

/* ---- kernels --------------------------------------------------------------------------- */

/* One block: the biases may repeat an id and must add in order, so one thread applies them
 * (a request has a few hundred at most), first, as transformers does; the seen ids are
 * distinct, so the penalty is then one update per element in any order. One block also
 * orders the two without a second launch. */
__global__ void logits_adjust_kernel(float *x, const int32_t *seen, int n_seen, float penalty,
                                     const dg_logit_bias *bias, int n_bias) {
    if (threadIdx.x == 0)
        for (int j = 0; j < n_bias; j++) x[bias[j].token] += bias[j].bias;
    __syncthreads();
    for (int i = threadIdx.x; i < n_seen; i += blockDim.x) {
        float *p = x + seen[i];
        const float v = *p;
        *p = v < 0.0f ? v * penalty : v / penalty;   /* IEEE division (nvcc's -prec-div default) */
    }
}

/* Floats as unsigned keys of the same order: a > b iff key(a) > key(b). -0 and +0 get one
 * key, as they compare equal (the CPU's heap and the host's argmax see them as ties). Every
 * non-NaN key is >= key(-inf) = 0x007fffff, so 0 pads below all of them. */
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

__device__ __forceinline__ float key_value(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? k & 0x7fffffffu : ~k);
}

/* Inclusive prefix sum of v over the block's threads in thread order (blockDim.x a multiple
 * of 32); *total: the block's sum. sh holds 32 ints; ends with a barrier so it can be reused. */
__device__ __forceinline__ int block_scan(int v, int *sh, int *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    if (lane == 31) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int w = lane < nw ? sh[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += t;
        }
        sh[lane] = w;
    }
    __syncthreads();
    v += warp > 0 ? sh[warp - 1] : 0;
    *total = sh[nw - 1];
    __syncthreads();
    return v;
}

/* Radix select: the key of the k-th largest of key[0..m) (1 <= k <= m) into *thr, and into
 * *n_eq how many keys equal to it are among the k largest (the others are greater). Four
 * passes over the keys, 8 bits each from the top, counting only keys whose higher digits
 * match the prefix found so far. key may be shared or global memory; hist is 256 ints and
 * sh 34 ints of shared memory; blockDim.x >= 256. Every thread calls it and gets the result. */
__device__ void radix_select(const uint32_t *key, int m, int k, int *hist, int *sh, uint32_t *thr,
                             int *n_eq) {
    const int lane = threadIdx.x & 31;
    uint32_t prefix = 0, mask = 0;
    int rem = k;   /* invariant: <= the keys that match prefix under mask */
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        /* the loop bound is the same for the whole block, so every lane reaches the ballot */
        for (int i0 = 0; i0 < m; i0 += blockDim.x) {
            const int i = i0 + threadIdx.x;
            const uint32_t kk = i < m ? key[i] : 0;
            const bool hit = i < m && (kk & mask) == prefix;
            const unsigned act = __ballot_sync(0xffffffffu, hit);
            if (hit) {
                /* logits crowd into few top digits: one atomic per distinct bin per warp */
                const int bin = (kk >> shift) & 255;
                const unsigned peers = __match_any_sync(act, bin);
                if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
            }
        }
        __syncthreads();
        /* thread t holds bin 255 - t: its inclusive scan counts the keys with digit >= 255 - t */
        int total;
        const int c = threadIdx.x < 256 ? hist[255 - threadIdx.x] : 0;
        const int above = block_scan(c, sh, &total);
        if (threadIdx.x < 256 && above >= rem && above - c < rem) {
            sh[32] = 255 - (int)threadIdx.x;
            sh[33] = rem - (above - c);
        }
        __syncthreads();
        prefix |= (uint32_t)sh[32] << shift;
        mask |= 0xffu << shift;
        rem = sh[33];
        /* sh[32..33] are next written after the next pass's barriers: no barrier needed here */
    }
    *thr = prefix;
    *n_eq = rem;
}

/* Calls emit(pos, i) for the k best of key[0..m) in array order, pos = 0, 1, ...: the keys
 * above thr and the first n_eq equal to it (radix_select's answer). Each thread owns a
 * contiguous run of positions, so two block scans (equal keys before the run, taken keys
 * before the run) order everything. */
template <typename Emit>
__device__ void take_ordered(const uint32_t *key, int m, uint32_t thr, int n_eq, int *sh, Emit emit) {
    const int per = (m + (int)blockDim.x - 1) / (int)blockDim.x;
    const int i0 = min(m, (int)threadIdx.x * per), i1 = min(m, i0 + per);
    int total, eq = 0, take = 0;
    for (int i = i0; i < i1; i++) eq += key[i] == thr;
    const int eq0 = block_scan(eq, sh, &total) - eq;
    for (int i = i0, e = eq0; i < i1; i++) {
        const uint32_t kk = key[i];
        take += kk > thr || (kk == thr && e++ < n_eq);
    }
    int pos = block_scan(take, sh, &total) - take;
    for (int i = i0, e = eq0; i < i1; i++) {
        const uint32_t kk = key[i];
        if (kk > thr || (kk == thr && e++ < n_eq)) emit(pos++, i);
    }
}

/* Pass 1: block b takes x[b·TOPK_CHUNK ..] and writes its min(k, m) best to part_key/part_id
 * [b·k ..] in index order, padding the rest with key 0 (below every value). part_lse (may be
 * NULL): the block's (max·inv_t, Σ exp(x·inv_t − max·inv_t)). */
__global__ void __launch_bounds__(TOPK_THREADS)
topk_part_kernel(const float *x, int n, int k, float inv_t, uint32_t *part_key, int32_t *part_id,
                 float2 *part_lse) {
    __shared__ uint32_t key[TOPK_CHUNK];
    __shared__ int hist[256], sh[34];
    __shared__ float shf[32];
    const int base = blockIdx.x * TOPK_CHUNK, m = min(TOPK_CHUNK, n - base), kb = min(k, m);
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < m; i += blockDim.x) {
        const float v = x[base + i];
        key[i] = order_key(v);
        mx = fmaxf(mx, v);
    }
    if (part_lse) {   /* the block barriers inside make the keys visible to every thread */
        mx = dg_block_max(mx, shf);
        const float ms = mx * inv_t;
        float s = 0.0f;
        if (mx > -INFINITY)   /* the CPU's expression, unfused: x·inv_t rounded, then − ms */
            for (int i = threadIdx.x; i < m; i += blockDim.x)
                s += expf(__fsub_rn(__fmul_rn(key_value(key[i]), inv_t), ms));
        s = dg_block_sum(s, shf);
        if (threadIdx.x == 0) part_lse[blockIdx.x] = make_float2(ms, s);
    }
    uint32_t thr;
    int n_eq;
    radix_select(key, m, kb, hist, sh, &thr, &n_eq);   /* starts with a barrier: keys visible */
    uint32_t *out_key = part_key + (int64_t)blockIdx.x * k;
    int32_t *out_id = part_id + (int64_t)blockIdx.x * k;
    take_ordered(key, m, thr, n_eq, sh, [&](int pos, int i) {
        out_key[pos] = key[i];
        out_id[pos] = base + i;
    });
    for (int j = kb + threadIdx.x; j < k; j += blockDim.x) {
        out_key[j] = 0;
        out_id[j] = 0;
    }
}

/* Pass 2, one block: the k best of the m = n_part·k candidates, sorted best first (value,
 * then lower index), into out_val/out_idx; the blocks' lse parts combined in double. */
__global__ void __launch_bounds__(TOPK_THREADS)
topk_merge_kernel(const float *x, const uint32_t *part_key, const int32_t *part_id, int m, int k,
                  const float2 *part_lse, int n_part, float *out_val, int32_t *out_idx,
                  double *out_lse) {
    __shared__ unsigned long long sk[DG_BACKEND_TOPK_MAX];   /* 16 KiB */
    __shared__ int hist[256], sh[34];
    uint32_t thr;
    int n_eq;
    radix_select(part_key, m, k, hist, sh, &thr, &n_eq);
    /* ~index: among equal keys the lower index sorts first in a descending sort */
    take_ordered(part_key, m, thr, n_eq, sh, [&](int pos, int i) {
        sk[pos] = (unsigned long long)part_key[i] << 32 | (uint32_t)~part_id[i];
    });
    int p = 1;
    while (p < k) p <<= 1;
    for (int j = k + threadIdx.x; j < p; j += blockDim.x) sk[j] = 0;
    __syncthreads();
    /* bitonic sort, descending: sub-sequences of `size` alternate direction until the last */
    for (int size = 2; size <= p; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < p / 2; t += blockDim.x) {
                const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
                const unsigned long long a = sk[lo], b = sk[hi];
                if ((lo & size) == 0 ? a < b : a > b) {
                    sk[lo] = b;
                    sk[hi] = a;
                }
            }
            __syncthreads();
        }
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const int32_t id = (int32_t)~(uint32_t)sk[j];
        out_idx[j] = id;
        out_val[j] = x[id];
    }
    if (out_lse && threadIdx.x == 0) {
        float mx = -INFINITY;
        for (int b = 0; b < n_part; b++) mx = fmaxf(mx, part_lse[b].x);
        double s = 0.0;
        if (mx > -INFINITY)
            for (int b = 0; b < n_part; b++)
                if (part_lse[b].y > 0.0f) s += (double)part_lse[b].y * exp((double)part_lse[b].x - (double)mx);
        *out_lse = mx > -INFINITY ? (double)mx + log(s) : -INFINITY;
    }
}

/* ---- launchers ------------------------------------------------------------------------- */

static int logits_adjust(dg_cuda *c, float *x, const int32_t *seen, int n_seen, float penalty,
                         const dg_logit_bias *bias, int n_bias) {
    if (n_seen <= 0 && n_bias <= 0) return 0;
    const int32_t *d_seen = NULL;
    const dg_logit_bias *d_bias = NULL;
    if (n_seen > 0 && !(d_seen = (const int32_t *)dg_cuda_stage(c, seen, sizeof(int32_t) * (size_t)n_seen)))
        return DG_EDEVICE;
    if (n_bias > 0 && !(d_bias = (const dg_logit_bias *)dg_cuda_stage(c, bias, sizeof(dg_logit_bias) * (size_t)n_bias)))
        return DG_EDEVICE;
    logits_adjust_kernel<<<1, ADJUST_THREADS, 0, c->stream>>>(x, d_seen, n_seen > 0 ? n_seen : 0,
                                                             penalty, d_bias, n_bias > 0 ? n_bias : 0);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

/* Scratch: the result [lse (8 bytes), val[k], idx[k]] first, so that one copy brings it
 * back, then the candidates of pass 1 and the blocks' lse parts. */
static int topk(dg_cuda *c, const float *x, int n, int k, float inv_t, float *val, int32_t *idx,
                double *lse) {
    if (k < 1 || k > n || k > DG_BACKEND_TOPK_MAX)
        return dg_cuda_fail(c, "topk: k outside 1 .. min(n, DG_BACKEND_TOPK_MAX)", "topk", __FILE__, __LINE__);
    const int n_part = (n + TOPK_CHUNK - 1) / TOPK_CHUNK;
    const size_t m = (size_t)n_part * (size_t)k, result = 8 + 8 * (size_t)k;
    const size_t off_key = (result + 255) & ~(size_t)255, off_id = off_key + 4 * m;
    const size_t off_lse = (off_id + 4 * m + 7) & ~(size_t)7, need = off_lse + 8 * (size_t)n_part;
    if (need > c->scratch_bytes || m > 0x7fffffff)
        return dg_cuda_fail(c, "topk: the row's candidates exceed the scratch", "topk", __FILE__, __LINE__);
    char *s = (char *)c->scratch;
    uint32_t *part_key = (uint32_t *)(s + off_key);
    int32_t *part_id = (int32_t *)(s + off_id);
    float2 *part_lse = lse ? (float2 *)(s + off_lse) : NULL;
    topk_part_kernel<<<n_part, TOPK_THREADS, 0, c->stream>>>(x, n, k, inv_t, part_key, part_id, part_lse);
    CUDA_CHECK_LAUNCH(c);
    topk_merge_kernel<<<1, TOPK_THREADS, 0, c->stream>>>(x, part_key, part_id, (int)m, k, part_lse, n_part,
                                                         (float *)(s + 8), (int32_t *)(s + 8 + 4 * (size_t)k),
                                                         lse ? (double *)s : NULL);
    CUDA_CHECK_LAUNCH(c);
    CUDA_CHECK(c, cudaMemcpyAsync(c->readback, s, result, cudaMemcpyDeviceToHost, c->stream));
    CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
    memcpy(val, c->readback + 8, sizeof(float) * (size_t)k);
    memcpy(idx, c->readback + 8 + 4 * (size_t)k, sizeof(int32_t) * (size_t)k);
    if (lse) memcpy(lse, c->readback, sizeof(double));
    return 0;
}

/* ---- entries --------------------------------------------------------------------------- */

void dg_cuda_logits_adjust(dg_backend *be, float *x, int n, const int32_t *seen, int n_seen,
                           float penalty, const dg_logit_bias *bias, int n_bias) {
    (void)n;
    logits_adjust(dg_cuda_of(be), x, seen, n_seen, penalty, bias, n_bias);
}

void dg_cuda_topk(dg_backend *be, const float *x, int n, int k, float inv_temp, float *val,
                  int32_t *idx, double *lse) {
    if (topk(dg_cuda_of(be), x, n, k, inv_temp, val, idx, lse) == 0) return;
    /* the failure is the backend's sticky error; the outputs still name tokens in range,
     * for a caller that reads them before it checks status */
    for (int i = 0; i < k; i++) {
        val[i] = -INFINITY;
        idx[i] = i < n ? i : 0;
    }
    if (lse) *lse = -INFINITY;
}
