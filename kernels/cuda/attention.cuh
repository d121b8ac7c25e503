/* attention.cuh — what attention.cu and attention_mma.cu share (private to the backend):
 * K/V row addressing and the bf16 tensor-core path's entry points. */
#ifndef DG_CUDA_ATTENTION_CUH
#define DG_CUDA_ATTENTION_CUH

#include "cuda_common.cuh"

/* Key/value row j: paged (block table) or linear (row j at base + j·stride). */
struct kv_addr {
    const float   *k, *v;    /* fp32 rows; with bf16, __nv_bfloat16 rows at these addresses */
    const int32_t *table;    /* NULL: linear */
    int            block_size;
    int            stride;   /* elements between rows */
    int            bf16;     /* 1: K and V are bf16 (a BF16 dg_kv_view of the cache) */
};

/* Element i of K or V (base a.k or a.v) as fp32: bf16 widens exactly. */
__device__ __forceinline__ float kv_at(const kv_addr &a, const float *base, int64_t i) {
    return a.bf16 ? __bfloat162float(((const __nv_bfloat16 *)base)[i]) : base[i];
}

__device__ __forceinline__ int64_t kv_off(const kv_addr &a, int j) {
    const int64_t r = a.table ? (int64_t)a.table[j / a.block_size] * a.block_size + j % a.block_size : j;
    return r * a.stride;
}

/* ---- attention_mma.cu: flash attention on mma.sync (bf16 operands, fp32 accumulation) ---- */

#define DG_MMA_TQ 64         /* query rows per block (the tile lists' row count) */

/* Q, K, V as bf16 copies in the scratch, heads contiguous: q[row][n_heads][hd] scaled by
 * scale·log2(e) (the kernel's softmax is in base 2), k and v [row][n_kv_heads][hd] in
 * logical row order (the paged table resolved). */
struct dg_attn_bf16 {
    const __nv_bfloat16 *q, *k, *v;
    int n_heads, n_kv_heads, head_dim;
};

/* Whether the mma path takes this call: head_dim 64, 80 or 128, not DG_CUDA_GEMM=precise
 * or DG_CUDA_ATTN=wmma, and the bf16 copies fit the scratch. */
int dg_cuda_attn_mma_ok(const dg_cuda *c, int head_dim, int64_t q_rows, int64_t kv_rows, int n_heads,
                        int n_kv_heads);
/* Converts query rows 0..q_rows-1 (row i at q + i·q_stride) and key/value rows
 * 0..kv_rows-1 of `a` into the scratch; 0 or DG_EDEVICE. */
int dg_cuda_attn_mma_prepare(dg_cuda *c, dg_attn_bf16 *b, const float *q, int q_stride, kv_addr a,
                             int q_rows, int kv_rows, int n_heads, int n_kv_heads, int head_dim, float scale);
/* The tiles (device int4 {q0, q1, k0, k1}, at most DG_MMA_TQ rows each) over every head;
 * causal as in attention.cu's tiled kernels. 0 or DG_EDEVICE. */
int dg_cuda_attn_mma_launch(dg_cuda *c, const dg_attn_bf16 *b, const int32_t *d_tiles, int n_tiles,
                            float *out, int out_stride, int causal);
int dg_cuda_attn_mma_init(dg_cuda *c);

#endif
