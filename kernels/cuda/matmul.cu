/* matmul.cu — y = x · Wᵀ (+ bias) over bf16 weights, and the embedding gather.
 *
 * Two paths, chosen by the number of rows m:
 *   m <= GEMV_MAX_M (decode): a GEMV that reads each bf16 weight once, as 16-byte vectors,
 *     against fp32 activations, fp32 accumulation. The step is bound by weight bytes, so
 *     this is where decode tok/s is made.
 *   m > GEMV_MAX_M (prefill, vision, DiT): cuBLAS bf16 GEMM with fp32 accumulation and
 *     fp32 output (tensor cores); x is first rounded to bf16 in the scratch, in chunks of
 *     rows. With DG_CUDA_GEMM=precise, x is split into hi = bf16(x) and lo = bf16(x - hi)
 *     and two GEMMs accumulate: 16 mantissa bits of x instead of 8, at twice the cost.
 *     A bias goes into the GEMM's epilogue through cuBLASLt (a plan per shape, cached);
 *     where cuBLASLt offers no algorithm, or with the split, a kernel adds it after.
 * The decode step's fused forms (backend.h): q, k and v in one GEMV launch over all their
 * rows (matmul_parts), gate and up with the SiLU product in one (matmul_swiglu). */
#include <string.h>

#include "cuda_common.cuh"

#define GEMV_MAX_M   8
#define GEMV_WARPS   4     /* rows per block: one warp per output row. 4, not 8: the 7B's
                              * 3584-row matrices then make 896 blocks instead of 448, which
                              * spread evenly over 132 SMs (448 left some SMs a quarter of
                              * their rows more than others: 3.2-3.3 TB/s against 4.1 for the
                              * 152064-row lm_head, H200) */

/* ---- GEMV ------------------------------------------------------------------------------ */

__device__ __forceinline__ void bf16x8_to_f32(uint4 u, float *f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

/* acc[r] = Σ over this thread's 16-byte pieces i = first, first + step, ... of the bf16 row
 * wr · x row r (r < M): the inner loop of every GEMV here. UNROLL loads in flight. */
template <int M, int UNROLL>
__device__ __forceinline__ void gemv_dot(float *acc, const uint4 *__restrict__ wr, const float *__restrict__ x,
                                         int k, int first, int step) {
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    const int n8 = k / 8;
#pragma unroll UNROLL
    for (int i = first; i < n8; i += step) {
        float wf[8];
        bf16x8_to_f32(__ldg(wr + i), wf);
#pragma unroll
        for (int r = 0; r < M; r++) {
            const float4 *xr = (const float4 *)(x + (int64_t)r * k) + 2 * i;
            const float4 a = __ldg(xr), b = __ldg(xr + 1);
            acc[r] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w +
                      wf[4] * b.x + wf[5] * b.y + wf[6] * b.z + wf[7] * b.w;
        }
    }
}

/* y[r, row] = the warp's sum of acc[r] (+ bias[row]), r < M: the end of a warp-per-row GEMV. */
template <int M>
__device__ __forceinline__ void gemv_store(float *y, const float *acc, const float *bias, int n, int row, int lane) {
#pragma unroll
    for (int r = 0; r < M; r++) {
        const float s = dg_warp_sum(acc[r]);
        if (lane == 0) y[(int64_t)r * n + row] = s + (bias ? bias[row] : 0.0f);
    }
}

/* One warp per row of W; lane l reads elements 8l .. 8l+7 of every 256-wide slice as one
 * 16-byte load (a warp reads 512 contiguous bytes per step). The unrolled loop keeps up to
 * eight such loads in flight per lane (the tail of a grid runs with few warps per SM, and
 * each must then cover the memory latency alone). x (at most 8 rows) is re-read from L1/L2 by every warp.
 * Needs k % 8 == 0 and 16-byte aligned rows (arena pointers are 256-aligned). */
template <int M>
__global__ void gemv_bf16_vec(float *__restrict__ y, const float *__restrict__ x,
                              const __nv_bfloat16 *__restrict__ w, const float *__restrict__ bias,
                              int n, int k) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const uint4 *wr = (const uint4 *)(w + (int64_t)row * k);
    float acc[M];
    gemv_dot<M, 8>(acc, wr, x, k, lane, 32);
    gemv_store<M>(y, acc, bias, n, row, lane);
}

/* Few rows (the 7B's K and V projections: 512 rows = 64 warp-per-row blocks, a sixth of
 * what fills 132 SMs; measured 0.7 TB/s): one block of GEMV_WARPS (4) warps per row, each thread a
 * strided share of the row's 16-byte vectors, the partial sums reduced in shared memory. */
template <int M>
__global__ void gemv_bf16_rowblock(float *__restrict__ y, const float *__restrict__ x,
                                   const __nv_bfloat16 *__restrict__ w, const float *__restrict__ bias,
                                   int n, int k) {
    __shared__ float red[M][GEMV_WARPS];
    const int row = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint4 *wr = (const uint4 *)(w + (int64_t)row * k);
    float acc[M];
    gemv_dot<M, 2>(acc, wr, x, k, threadIdx.x, blockDim.x);
#pragma unroll
    for (int r = 0; r < M; r++) {
        const float s = dg_warp_sum(acc[r]);
        if (lane == 0) red[r][warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int r = 0; r < M; r++) {
            float s = lane < GEMV_WARPS ? red[r][lane] : 0.0f;
            s = dg_warp_sum(s);
            if (lane == 0) y[(int64_t)r * n + row] = s + (bias ? bias[row] : 0.0f);
        }
    }
}

/* Any k: element-wise loads (odd widths such as 3420). */
__global__ void gemv_bf16_any(float *__restrict__ y, const float *__restrict__ x,
                              const __nv_bfloat16 *__restrict__ w, const float *__restrict__ bias,
                              int m, int n, int k) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const __nv_bfloat16 *wr = w + (int64_t)row * k;
    for (int r = 0; r < m; r++) {
        float acc = 0.0f;
        for (int i = lane; i < k; i += 32) acc += __bfloat162float(wr[i]) * x[(int64_t)r * k + i];
        acc = dg_warp_sum(acc);
        if (lane == 0) y[(int64_t)r * n + row] = acc + (bias ? bias[row] : 0.0f);
    }
}

/* Several weights sharing x (q, k, v) in one launch: rows of all parts, one warp each, as
 * gemv_bf16_vec; the warp finds its part from the cumulative row ends. The part is chosen
 * with constant indices (a runtime index into a kernel parameter would copy the parameters
 * to local memory). */
struct gemv_parts_arg {
    const __nv_bfloat16 *w[DG_MATMUL_PARTS_MAX];
    float               *y[DG_MATMUL_PARTS_MAX];
    const float         *bias[DG_MATMUL_PARTS_MAX];
    int                  end[DG_MATMUL_PARTS_MAX];   /* cumulative rows */
    int                  n_parts;
};

template <int M>
__global__ void gemv_parts_kernel(gemv_parts_arg p, const float *__restrict__ x, int k) {
    const int lane = threadIdx.x & 31;
    const int row_all = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    const __nv_bfloat16 *w = p.w[0];
    float *y = p.y[0];
    const float *bias = p.bias[0];
    int base = 0, end = p.end[0];
#pragma unroll
    for (int i = 1; i < DG_MATMUL_PARTS_MAX; i++)
        if (i < p.n_parts && row_all >= p.end[i - 1]) {
            w = p.w[i]; y = p.y[i]; bias = p.bias[i]; base = p.end[i - 1]; end = p.end[i];
        }
    if (row_all >= end) return;
    const int row = row_all - base, n = end - base;
    float acc[M];
    gemv_dot<M, 8>(acc, (const uint4 *)(w + (int64_t)row * k), x, k, lane, 32);
    gemv_store<M>(y, acc, bias, n, row, lane);
}

/* y[r, row] = silu(x_r · gate_row) · (x_r · up_row): the two rows of one output in one warp. */
template <int M>
__global__ void gemv_swiglu_kernel(float *__restrict__ y, const float *__restrict__ x,
                                   const __nv_bfloat16 *__restrict__ wg, const __nv_bfloat16 *__restrict__ wu,
                                   int n, int k) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    float g[M], u[M];
    gemv_dot<M, 4>(g, (const uint4 *)(wg + (int64_t)row * k), x, k, lane, 32);
    gemv_dot<M, 4>(u, (const uint4 *)(wu + (int64_t)row * k), x, k, lane, 32);
#pragma unroll
    for (int r = 0; r < M; r++) {
        const float a = dg_warp_sum(g[r]), b = dg_warp_sum(u[r]);
        if (lane == 0) y[(int64_t)r * n + row] = a / (1.0f + expf(-a)) * b;   /* as the silu_mul kernel */
    }
}

static int gemv(dg_cuda *c, float *y, const float *x, const __nv_bfloat16 *w, const float *bias,
                int m, int n, int k) {
    const dim3 grid(dg_cuda_blocks(n, GEMV_WARPS)), block(32 * GEMV_WARPS);
    const int few_rows = (int64_t)grid.x < 2LL * c->dev->prop.multiProcessorCount;
    DG_CUDA_COUNT(c, DG_PATH_GEMV);
    if (k % 8 == 0 && ((uintptr_t)x & 15) == 0 && few_rows) {
        switch (m) {
#define CASE(M) case M: gemv_bf16_rowblock<M><<<n, block, 0, c->stream>>>(y, x, w, bias, n, k); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
    } else if (k % 8 == 0 && ((uintptr_t)x & 15) == 0) {
        switch (m) {
#define CASE(M) case M: gemv_bf16_vec<M><<<grid, block, 0, c->stream>>>(y, x, w, bias, n, k); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
    } else {
        gemv_bf16_any<<<grid, block, 0, c->stream>>>(y, x, w, bias, m, n, k);
    }
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

/* ---- GEMM ------------------------------------------------------------------------------ */

/* hi[i] = bf16(x[i]) (round to nearest even); lo[i] = bf16(x[i] - hi[i]) when lo != NULL. */
__global__ void split_bf16_kernel(__nv_bfloat16 *hi, __nv_bfloat16 *lo, const float *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float v = x[i];
        const __nv_bfloat16 h = __float2bfloat16_rn(v);
        hi[i] = h;
        if (lo) lo[i] = __float2bfloat16_rn(v - __bfloat162float(h));
    }
}

__global__ void add_bias_kernel(float *y, const float *bias, int m, int n) {
    const int64_t total = (int64_t)m * n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += bias[i % n];
}

/* ---- cuBLASLt: the bias in the GEMM's epilogue ------------------------------------------ */

static void lt_plan_clear(dg_cuda_lt_plan *p) {
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->d) cublasLtMatrixLayoutDestroy(p->d);
    memset(p, 0, sizeof *p);
}

void dg_cuda_lt_free(dg_cuda *c) {
    for (int i = 0; c->lt_plans && i < DG_CUDA_LT_PLANS; i++) lt_plan_clear(&c->lt_plans[i]);
    free(c->lt_plans);
    c->lt_plans = NULL;
    if (c->lt) cublasLtDestroy(c->lt);
    c->lt = NULL;
}

/* The largest power of two <= 256 that divides the address: what an algorithm may assume
 * of a pointer (cuBLASLt's heuristic assumes 256 unless told). */
static int lt_align(const void *p) {
    int a = 256;
    while (a > 1 && ((uintptr_t)p & (uintptr_t)(a - 1))) a >>= 1;
    return a;
}

/* The plan of shape (n, m, k) and pointer alignments (W, y): found, or made (descriptors,
 * then the heuristic's best algorithm within the 32 MiB workspace for those alignments).
 * NULL when cuBLASLt has no algorithm for it: the caller then adds the bias with its own
 * kernel. (x is the scratch: 256-aligned; the bias must be 16-aligned, checked by the
 * caller: cuBLASLt states no alignment for it, and PyTorch met faults below 16.) */
static dg_cuda_lt_plan *lt_plan(dg_cuda *c, int n, int m, int k, int align_w, int align_y) {
    for (int i = 0; i < DG_CUDA_LT_PLANS; i++) {
        dg_cuda_lt_plan *p = &c->lt_plans[i];
        if (p->n == n && p->m == m && p->k == k && p->align_w == align_w && p->align_y == align_y)
            return p->ok ? p : NULL;
    }
    dg_cuda_lt_plan *p = &c->lt_plans[c->lt_next];
    c->lt_next = (c->lt_next + 1) % DG_CUDA_LT_PLANS;
    lt_plan_clear(p);
    p->n = n, p->m = m, p->k = k, p->align_w = align_w, p->align_y = align_y;
    const uint32_t aw = (uint32_t)align_w, ax = 256, ay = (uint32_t)align_y;
    const cublasOperation_t opt = CUBLAS_OP_T, opn = CUBLAS_OP_N;
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = CUDA_R_32F;
    const size_t ws = DG_CUDA_BLAS_WS_BYTES;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res;
    int n_res = 0;
    if (cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opt, sizeof opt) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opn, sizeof opn) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, k, n, k) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, k, m, k) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatrixLayoutCreate(&p->d, CUDA_R_32F, n, m, n) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aw, sizeof aw) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ax, sizeof ax) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ay, sizeof ay) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ay, sizeof ay) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoGetHeuristic(c->lt, p->desc, p->a, p->b, p->d, p->d, pref, 1, &res, &n_res) != CUBLAS_STATUS_SUCCESS ||
        n_res < 1) {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        return NULL;                              /* p stays, ok = 0: not asked again */
    }
    cublasLtMatmulPreferenceDestroy(pref);
    p->algo = res.algo;
    p->ok = 1;
    return p;
}

/* Row-major y[m, n] = x[m, k] · W[n, k]ᵀ is, column-major, y[n, m] = Wᵀ[n, k] · x[k, m]:
 * cuBLAS with op T on W (ld k) and op N on x (ld k), output ld n. With a bias (and one
 * bf16 part of x), cuBLASLt adds it in the epilogue: bias[i] to row i of the column-major
 * y[n, m], i.e. to every row-major row, without a second pass over y. */
/* parts[i].y = x · parts[i].wᵀ (+ bias) for weights of k columns sharing x: x is rounded
 * to bf16 once per chunk of rows, for all of them (q, k and v of a prefill; gate and up). */
static int gemm_parts(dg_cuda *c, const float *x, const dg_matmul_part *parts, int n_parts, int m, int k) {
    const int split = c->gemm_split;
    const int64_t per_row = (int64_t)k * 2 * (split ? 2 : 1);
    int64_t rows = (int64_t)c->scratch_bytes / per_row;
    if (rows < 1) return dg_cuda_fail(c, "GEMM row wider than the scratch", "gemm", __FILE__, __LINE__);
    if (rows > m) rows = m;
    __nv_bfloat16 *hi = (__nv_bfloat16 *)c->scratch, *lo = split ? hi + rows * k : NULL;
    const float one = 1.0f, zero = 0.0f;
    for (int r0 = 0; r0 < m; r0 += (int)rows) {
        const int mc = m - r0 < rows ? m - r0 : (int)rows;
        const int64_t cnt = (int64_t)mc * k;
        const unsigned blocks = dg_cuda_blocks(cnt, 256) < 65535u ? dg_cuda_blocks(cnt, 256) : 65535u;
        split_bf16_kernel<<<blocks, 256, 0, c->stream>>>(hi, lo, x + (int64_t)r0 * k, cnt);
        CUDA_CHECK_LAUNCH(c);
        for (int i = 0; i < n_parts; i++) {
            const __nv_bfloat16 *w = (const __nv_bfloat16 *)parts[i].w->data;
            const float *bias = parts[i].bias;
            const int n = (int)parts[i].w->rows;
            float *y = parts[i].y + (int64_t)r0 * n;
            dg_cuda_lt_plan *p = bias && !split && c->unverified && ((uintptr_t)bias & 15) == 0
                                     ? lt_plan(c, n, mc, k, lt_align(w), lt_align(y)) : NULL;
            if (p) {
                DG_CUDA_COUNT(c, DG_PATH_GEMM_LT_BIAS);
                CUBLAS_CHECK(c, cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                               sizeof bias));
                CUBLAS_CHECK(c, cublasLtMatmul(c->lt, p->desc, &one, w, p->a, hi, p->b, &zero, y, p->d, y, p->d,
                                               &p->algo, c->blas_ws, DG_CUDA_BLAS_WS_BYTES, c->stream));
                continue;
            }
            DG_CUDA_COUNT(c, DG_PATH_GEMM);
            CUBLAS_CHECK(c, cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, mc, k, &one, w, CUDA_R_16BF, k,
                                         hi, CUDA_R_16BF, k, &zero, y, CUDA_R_32F, n,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            if (split) {
                DG_CUDA_COUNT(c, DG_PATH_GEMM);
                CUBLAS_CHECK(c, cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, mc, k, &one, w, CUDA_R_16BF, k,
                                             lo, CUDA_R_16BF, k, &one, y, CUDA_R_32F, n,
                                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            }
            if (bias) {   /* no epilogue plan (or the split): a pass over this chunk of y */
                const int64_t total = (int64_t)mc * n;
                const unsigned bb = dg_cuda_blocks(total, 256) < 65535u ? dg_cuda_blocks(total, 256) : 65535u;
                DG_CUDA_COUNT(c, DG_PATH_BIAS_KERNEL);
                add_bias_kernel<<<bb, 256, 0, c->stream>>>(y, bias, mc, n);
                CUDA_CHECK_LAUNCH(c);
            }
        }
    }
    return 0;
}

static int gemm(dg_cuda *c, float *y, const float *x, const dg_weight *w, const float *bias, int m) {
    const dg_matmul_part part = {y, w, bias};
    return gemm_parts(c, x, &part, 1, m, (int)w->cols);
}

/* The fused forms: one launch for the decode step's shapes (m <= GEMV_MAX_M, k % 8 == 0,
 * x 16-byte aligned), the per-part launches otherwise. */
static int matmul_parts(dg_cuda *c, const float *x, const dg_matmul_part *parts, int n_parts, int m) {
    const int k = (int)parts[0].w->cols;
    if (m <= GEMV_MAX_M && k % 8 == 0 && ((uintptr_t)x & 15) == 0 && n_parts <= DG_MATMUL_PARTS_MAX) {
        gemv_parts_arg p = {};
        int rows = 0;
        for (int i = 0; i < n_parts; i++) {
            p.w[i] = (const __nv_bfloat16 *)parts[i].w->data;
            p.y[i] = parts[i].y;
            p.bias[i] = parts[i].bias;
            p.end[i] = rows += (int)parts[i].w->rows;
        }
        p.n_parts = n_parts;
        DG_CUDA_COUNT(c, DG_PATH_GEMV_FUSED);
        const dim3 grid(dg_cuda_blocks(rows, GEMV_WARPS)), block(32 * GEMV_WARPS);
        switch (m) {
#define CASE(M) case M: gemv_parts_kernel<M><<<grid, block, 0, c->stream>>>(p, x, k); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
        CUDA_CHECK_LAUNCH(c);
        return 0;
    }
    if (m > GEMV_MAX_M) return gemm_parts(c, x, parts, n_parts, m, k);
    for (int i = 0; i < n_parts; i++) {
        const dg_weight *w = parts[i].w;
        int rc = gemv(c, parts[i].y, x, (const __nv_bfloat16 *)w->data, parts[i].bias, m, (int)w->rows, k);
        if (rc < 0) return rc;
    }
    return 0;
}

static int matmul_swiglu(dg_cuda *c, float *y, float *tmp, const float *x, const dg_weight *gate,
                         const dg_weight *up, int m) {
    const int n = (int)gate->rows, k = (int)gate->cols;
    const __nv_bfloat16 *wg = (const __nv_bfloat16 *)gate->data, *wu = (const __nv_bfloat16 *)up->data;
    if (m <= GEMV_MAX_M && k % 8 == 0 && ((uintptr_t)x & 15) == 0) {
        const dim3 grid(dg_cuda_blocks(n, GEMV_WARPS)), block(32 * GEMV_WARPS);
        DG_CUDA_COUNT(c, DG_PATH_GEMV_FUSED);
        switch (m) {
#define CASE(M) case M: gemv_swiglu_kernel<M><<<grid, block, 0, c->stream>>>(y, x, wg, wu, n, k); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
        CUDA_CHECK_LAUNCH(c);
        return 0;
    }
    const dg_matmul_part parts[2] = {{y, gate, NULL}, {tmp, up, NULL}};
    int rc = matmul_parts(c, x, parts, 2, m);
    return rc < 0 ? rc : dg_cuda_silu_mul_launch(c, y, y, tmp, (int64_t)m * n);
}

void dg_cuda_matmul_parts(dg_backend *be, const float *x, const dg_matmul_part *parts, int n_parts, int m) {
    matmul_parts(dg_cuda_of(be), x, parts, n_parts, m);
}

void dg_cuda_matmul_swiglu(dg_backend *be, float *y, float *tmp, const float *x, const dg_weight *gate,
                           const dg_weight *up, int m) {
    matmul_swiglu(dg_cuda_of(be), y, tmp, x, gate, up, m);
}

void dg_cuda_matmul(dg_backend *be, float *y, const float *x, const dg_weight *w,
                    const float *bias, int m) {
    dg_cuda *c = dg_cuda_of(be);
    const __nv_bfloat16 *wd = (const __nv_bfloat16 *)w->data;   /* weight_prepare made it bf16 */
    if (m <= GEMV_MAX_M)
        gemv(c, y, x, wd, bias, m, (int)w->rows, (int)w->cols);
    else
        gemm(c, y, x, w, bias, m);
}

/* ---- embedding ------------------------------------------------------------------------- */

__global__ void embed_kernel(float *y, const __nv_bfloat16 *table, const int32_t *ids, int64_t d) {
    const int64_t row = ids[blockIdx.x];
    const __nv_bfloat16 *src = table + row * d;
    float *dst = y + (int64_t)blockIdx.x * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dst[j] = __bfloat162float(src[j]);
}

static int embed(dg_cuda *c, float *y, const dg_weight *table, const int32_t *ids, int m) {
    if (m <= 0) return 0;   /* a grid of 0 blocks is a launch error */
    const int32_t *d_ids = (const int32_t *)dg_cuda_stage(c, ids, sizeof(int32_t) * (size_t)m);
    if (!d_ids) return DG_EDEVICE;
    embed_kernel<<<m, 256, 0, c->stream>>>(y, (const __nv_bfloat16 *)table->data, d_ids, table->cols);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

void dg_cuda_embed(dg_backend *be, float *y, const dg_weight *table, const int32_t *ids, int m) {
    embed(dg_cuda_of(be), y, table, ids, m);
}
