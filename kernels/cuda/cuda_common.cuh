/* cuda_common.cuh — what the CUDA backend's files share (not a public interface): the
 * backend's state (what one device's backends share, and what each has of its own), the
 * error macro, the staging of small host arrays, block reductions and the entry points
 * each op file defines for cuda_backend.cu's table.
 *
 * Every op has three layers (as in ggml-cuda): a __global__ kernel, a launcher that picks
 * the launch geometry and returns 0 or DG_EDEVICE (CUDA_CHECK after every launch), and the
 * entry in the backend table. Table members return void (backend.h: ops cannot fail on
 * valid shapes); an entry therefore records the first failure as the backend's sticky
 * error (dg_cuda.status), which weight_prepare reports and later ops leave untouched. */
#ifndef DG_CUDA_COMMON_CUH
#define DG_CUDA_COMMON_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>

extern "C" {
#include "backend.h"
#include "duogen.h"
#include "stage_ring.h"
}

/* Staging ring for small host arrays (positions, ids, block tables, cu_seqlens): a pinned
 * host ring and a device ring of the same size. Two halves; before the host writes into
 * a half again, it waits on the event recorded when it last left that half, so a copy
 * still queued from the pinned memory is never overwritten. */
#define DG_CUDA_STAGE_BYTES ((size_t)16 << 20)
#define DG_CUDA_MEMO        4
#define DG_CUDA_MEMO_BYTES  1024

/* Scratch in the arena, sized once: bf16 activations for cuBLAS GEMMs (in row chunks),
 * the im2col tiles of conv3d, the split-K partials of attention. */
#define DG_CUDA_SCRATCH_BYTES ((size_t)256 << 20)

/* The cuBLAS and cuBLASLt workspace (arena). */
#define DG_CUDA_BLAS_WS_BYTES ((size_t)32 << 20)

/* Pinned host memory for small results the host waits for (topk: 8 + 8·k bytes). */
#define DG_CUDA_READBACK_BYTES ((size_t)32 << 10)

/* Query tiles one attention launch takes (each 4 ints staged: q0, q1, k0, k1). */
#define DG_CUDA_ATT_TILES 16384

typedef struct dg_cuda_seg dg_cuda_seg;

/* The kernel paths a backend counts (backend.h `paths`): each a host-side choice, counted
 * once per launch (or library call) that took it; a replayed graph counts as one
 * graph_replay, not as the launches it holds. */
enum {
    DG_PATH_GEMV,            /* the GEMV kernels, m <= 8 (per weight) */
    DG_PATH_GEMV_FUSED,      /* matmul_parts / matmul_swiglu in one GEMV launch */
    DG_PATH_GEMM,            /* cublasGemmEx (two per weight with DG_CUDA_GEMM=precise) */
    DG_PATH_GEMM_LT_BIAS,    /* cublasLtMatmul with the bias in the epilogue */
    DG_PATH_BIAS_KERNEL,     /* the bias added by its own kernel after a GEMM */
    DG_PATH_ATTN_DECODE,     /* split-K decode attention (one sequence) */
    DG_PATH_ATTN_DECODE_ROWS,/* split-K decode attention over many sequences (attention_batch) */
    DG_PATH_ATTN_FP32,       /* fp32 tile attention */
    DG_PATH_ATTN_WMMA,       /* wmma tensor-core tile attention */
    DG_PATH_ATTN_MMA,        /* mma.sync flash attention */
    DG_PATH_GRAPH_RECORD,    /* graph_run: a recording made */
    DG_PATH_GRAPH_REPLAY,    /* graph_run: a recording replayed */
    DG_CUDA_N_PATHS
};
#define DG_CUDA_COUNT(c, path) ((c)->paths[path]++)

/* A cuBLASLt plan for one GEMM shape with the bias epilogue (matmul.cu): descriptors and
 * the heuristic's algorithm, kept so that a shape seen again costs no query. */
#define DG_CUDA_LT_PLANS 64
typedef struct {
    int                     n, m, k;        /* 0: unused */
    int                     align_w, align_y;  /* the pointers' alignments it was chosen for */
    int                     ok;             /* 0: no algorithm; the plain GEMM + bias kernel */
    cublasLtMatmulDesc_t    desc;
    cublasLtMatrixLayout_t  a, b, d;
    cublasLtMatmulAlgo_t    algo;
} dg_cuda_lt_plan;

/* What the backends of one device share (backend.h "Threads"): made with the backend that
 * dg_cuda_backend_new returns, which owns it; its forks borrow it. Read-only after
 * creation but for the arena, whose bookkeeping the lock guards (an alloc or release may
 * come from any fork's thread; they happen at set-up and at an image's start, never per
 * operation). */
typedef struct {
    int             device;
    cudaDeviceProp  prop;
    pthread_mutex_t lock;
    /* the arena: [base, base + size), first-fit segments kept sorted by offset */
    char           *base;
    size_t          size;
    dg_cuda_seg    *segs;
    int             n_segs, cap_segs;
    size_t          in_use;        /* bytes in used segments */
} dg_cuda_device;

/* One backend: the device it shares and the execution state it alone uses (one thread at a
 * time). */
typedef struct {
    dg_cuda_device *dev;           /* owned when own_dev, else the parent's (a fork) */
    int             own_dev;
    cudaStream_t    stream;
    cublasHandle_t  blas;
    /* staging */
    char           *stage_host;    /* owned, pinned: DG_CUDA_STAGE_BYTES */
    char           *stage_dev;     /* arena */
    dg_stage_ring   stage;         /* where the next array goes (stage_ring.h) */
    cudaEvent_t     stage_done[2];
    /* the last small arrays staged since the ring last changed halves: a decode step
     * stages the same positions and block table for every layer, and a copy costs a
     * queue slot on the stream, so an array equal to one of these is not copied again */
    struct { const void *dev; size_t bytes; char data[DG_CUDA_MEMO_BYTES]; } memo[DG_CUDA_MEMO];
    int             memo_next;
    char           *readback;      /* owned, pinned: DG_CUDA_READBACK_BYTES */
    /* scratch (arena; given back when a fork is freed) */
    void           *scratch;
    size_t          scratch_bytes;
    void           *blas_ws;       /* cuBLAS workspace (arena) */
    cublasLtHandle_t lt;           /* GEMMs with a bias: the bias added in the epilogue */
    dg_cuda_lt_plan *lt_plans;     /* owned [DG_CUDA_LT_PLANS], filled in use order (then reused round-robin) */
    int              lt_next;
    int32_t        *att_tiles;     /* owned host [4 * DG_CUDA_ATT_TILES]: tile bounds of a call */
    int             gemm_split;    /* 1: x = hi + lo in two bf16 GEMMs (DG_CUDA_GEMM=precise) */
    int             attn_wmma;     /* 1: prefill/segment attention on the wmma kernel, not the
                                      mma.sync one (the default; DG_CUDA_ATTN=wmma forces it
                                      with DG_CUDA_UNVERIFIED=1) */
    /* 1 (DG_CUDA_UNVERIFIED=1): the kernels written since their last device run are used
     * (NOTES.md "Kernels and their last device run"): the mma.sync attention, the fused
     * decode forms, the batched decode attention, the cuBLASLt bias epilogue, the sampling
     * pair, standardize. 0 (the default): their verified alternatives: the wmma attention,
     * the compositions, the bias kernel, the host sampler, standardize on the host. */
    int             unverified;
    float          *std_host;      /* owned: standardize's host round trip, std_cap floats */
    size_t          std_cap;
    int             capturing;     /* 1 while graph_run records: staging refused (a replay would
                                      copy whatever the ring slot holds by then) */
    int             status;        /* sticky: 0 or the first DG_EDEVICE */
    char            err[256];
    uint64_t        paths[DG_CUDA_N_PATHS];   /* this backend's (fork's) own counts */
} dg_cuda;

/* A block's share of one K/V row write: k, v [kv_dim] to pool row r, the block's threads
 * striding over the row; bf16 pools rounded to nearest even, as the CPU's kv_write. */
__device__ __forceinline__ void dg_cuda_kv_store_row(void *kc, void *vc, int64_t r, const float *k, const float *v,
                                                     int kv_dim, int bf16) {
    for (int j = threadIdx.x; j < kv_dim; j += blockDim.x) {
        if (bf16) {
            ((__nv_bfloat16 *)kc)[r * kv_dim + j] = __float2bfloat16_rn(k[j]);
            ((__nv_bfloat16 *)vc)[r * kv_dim + j] = __float2bfloat16_rn(v[j]);
        } else {
            ((float *)kc)[r * kv_dim + j] = k[j];
            ((float *)vc)[r * kv_dim + j] = v[j];
        }
    }
}

/* Records a failed CUDA/cuBLAS call (the first one wins) and returns DG_EDEVICE. */
int dg_cuda_fail(dg_cuda *c, const char *what, const char *expr, const char *file, int line);
/* cudaSetDevice(c's device), recording a failure. */
void dg_cuda_use_device(dg_cuda *c);

/* The state of an entry's backend, with its device made current on the calling thread: the
 * CUDA runtime's current device is per host thread, and a fork runs on another thread than
 * the one that made it (a launch on a stream of another device fails). Every table entry
 * starts here; cudaGetDevice only reads the runtime's thread state. */
static inline dg_cuda *dg_cuda_of(dg_backend *be) {
    dg_cuda *c = (dg_cuda *)be->impl;
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != c->dev->device) dg_cuda_use_device(c);
    return c;
}

#define CUDA_CHECK(c, expr)                                                                 \
    do {                                                                                    \
        cudaError_t e_ = (expr);                                                            \
        if (e_ != cudaSuccess) return dg_cuda_fail((c), cudaGetErrorString(e_), #expr, __FILE__, __LINE__); \
    } while (0)

#define CUBLAS_CHECK(c, expr)                                                               \
    do {                                                                                    \
        cublasStatus_t s_ = (expr);                                                         \
        if (s_ != CUBLAS_STATUS_SUCCESS) return dg_cuda_fail((c), cublasGetStatusString(s_), #expr, __FILE__, __LINE__); \
    } while (0)

/* After a launch: a bad configuration shows here, a fault in a later call. */
#define CUDA_CHECK_LAUNCH(c) CUDA_CHECK(c, cudaGetLastError())

/* Device copy of `bytes` of host memory, valid for work queued on c->stream after this
 * call (NULL only when bytes exceed half the ring, or on a CUDA error: status is set). */
void *dg_cuda_stage(dg_cuda *c, const void *host, size_t bytes);

static inline unsigned dg_cuda_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 0x7fffffff ? 0x7fffffff : b);
}

__device__ __forceinline__ float dg_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float dg_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets it.
 * `sh` holds 32 floats; the call ends with a barrier so `sh` can be reused at once. */
__device__ __forceinline__ float dg_block_sum(float v, float *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = dg_warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    v = dg_warp_sum(v);
    __syncthreads();
    return v;
}

__device__ __forceinline__ float dg_block_max(float v, float *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = dg_warp_max(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    v = dg_warp_max(v);
    __syncthreads();
    return v;
}

/* ---- entries, one file per op family ------------------------------------------------- */

/* matmul.cu */
void dg_cuda_matmul(dg_backend *be, float *y, const float *x, const dg_weight *w,
                    const float *bias, int m);
void dg_cuda_embed(dg_backend *be, float *y, const dg_weight *table, const int32_t *ids, int m);
void dg_cuda_lt_free(dg_cuda *c);
void dg_cuda_matmul_parts(dg_backend *be, const float *x, const dg_matmul_part *parts, int n_parts, int m);
void dg_cuda_matmul_swiglu(dg_backend *be, float *y, float *tmp, const float *x, const dg_weight *gate,
                           const dg_weight *up, int m);

/* norm.cu */
void dg_cuda_rmsnorm(dg_backend *be, float *y, const float *x, const float *weight, int m, int n,
                     float eps);
void dg_cuda_add_rmsnorm(dg_backend *be, float *y, float *x, const float *r, const float *weight, int m, int n,
                         float eps);
void dg_cuda_modulate(dg_backend *be, float *y, const float *x, const float *shift,
                      const float *scale, int m, int n, float eps);
void dg_cuda_channel_rmsnorm(dg_backend *be, float *y, const float *x, const float *gamma,
                             int n_frames, int channels, int64_t plane, int silu);
void dg_cuda_standardize(dg_backend *be, float *y, const float *x, int m, int n, float eps);

/* elementwise.cu */
void dg_cuda_silu_mul(dg_backend *be, float *y, const float *gate, const float *up, int64_t n);
int  dg_cuda_silu_mul_launch(dg_cuda *c, float *y, const float *gate, const float *up, int64_t n);
void dg_cuda_add(dg_backend *be, float *y, const float *x, int64_t n);
void dg_cuda_gelu(dg_backend *be, float *y, const float *x, int64_t n);
void dg_cuda_silu(dg_backend *be, float *y, const float *x, int64_t n);
void dg_cuda_add_gated(dg_backend *be, float *y, const float *x, const float *gate, int m, int n);
void dg_cuda_upsample2x(dg_backend *be, float *y, const float *x, int64_t n_planes, int h, int w);
void dg_cuda_gather_rows(dg_backend *be, float *y, const float *x, const int32_t *idx, int m,
                         int64_t n);

/* rope.cu */
void dg_cuda_rope(dg_backend *be, float *x, const int32_t *pos, int m, int n_heads, int head_dim,
                  const dg_rope_params *p);
void dg_cuda_rope_table(dg_backend *be, float *x, int stride, const float *cos, const float *sin,
                        int m, int n_heads, int head_dim);
void dg_cuda_kv_write(dg_backend *be, const dg_kv_view *kv, int start, const float *k,
                      const float *v, int m, int kv_dim);

/* attention.cu */
void dg_cuda_attention(dg_backend *be, float *out, const float *q, const dg_kv_view *kv,
                       int n_past, int m, int n_heads, int n_kv_heads, int head_dim, float scale);
void dg_cuda_attention_batch(dg_backend *be, float *out, const float *q, const float *k, const float *v,
                             const dg_attn_seq *seqs, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                             float scale);
void dg_cuda_attention_segments(dg_backend *be, float *out, const float *q, int q_stride,
                                const float *k, const float *v, int kv_stride,
                                const int32_t *q_cu, const int32_t *kv_cu, int n_seg,
                                int n_heads, int n_kv_heads, int head_dim, float scale);
void dg_cuda_spatial_attention(dg_backend *be, float *out, const float *qkv, int channels,
                               int64_t plane);
int  dg_cuda_attention_init(dg_cuda *c);

/* sample.cu */
void dg_cuda_logits_adjust(dg_backend *be, float *x, int n, const int32_t *seen, int n_seen,
                           float penalty, const dg_logit_bias *bias, int n_bias);
void dg_cuda_topk(dg_backend *be, const float *x, int n, int k, float inv_temp, float *val,
                  int32_t *idx, double *lse);

/* conv.cu */
void dg_cuda_conv3d(dg_backend *be, float *y, const float *x, const float *w, const float *bias,
                    const dg_conv3d_shape *s);

#endif
