/* rope.cu — rotary embeddings (text / M-RoPE from positions, and from a cos/sin table for
 * the vision tower's 2-D and the DiT's 3-D schemes) and the KV-cache write.
 *
 * rope: one block per token, one thread per (head, frequency) pair. The angle is
 * (float)pos · 1/theta^(2j/head_dim) computed with powf, cosf and sinf in full precision,
 * as the CPU reference (and transformers in fp32) does; the rotation pairs dims j and
 * j + head_dim/2 (rotate_half). Positions are a host array [3, m], staged per call. */
#include "cuda_common.cuh"

__global__ void rope_kernel(float *x, const int32_t *pos, int m, int n_heads, int head_dim,
                            float theta, int sec0, int sec1) {
    const int i = blockIdx.x, half = head_dim / 2;
    for (int t = threadIdx.x; t < n_heads * half; t += blockDim.x) {
        const int h = t / half, j = t % half;
        const int row = j < sec0 ? 0 : j < sec0 + sec1 ? 1 : 2;
        const float inv = 1.0f / powf(theta, (float)(2 * j) / (float)head_dim);
        const float a = (float)pos[row * m + i] * inv;
        const float cs = cosf(a), sn = sinf(a);
        float *v = x + ((int64_t)i * n_heads + h) * head_dim;
        const float p = v[j], q = v[j + half];
        v[j] = p * cs - q * sn;
        v[j + half] = q * cs + p * sn;
    }
}

static int rope(dg_cuda *c, float *x, const int32_t *pos, int m, int n_heads, int head_dim,
                const dg_rope_params *p) {
    if (m <= 0) return 0;
    const int32_t *d_pos = (const int32_t *)dg_cuda_stage(c, pos, sizeof(int32_t) * 3 * (size_t)m);
    if (!d_pos) return DG_EDEVICE;
    /* one block per token: a decode step (m = 1) is one block, so make it a wide one */
    const int pairs = n_heads * head_dim / 2, cap = m < 32 ? 1024 : 256;
    const int threads = pairs < cap ? (pairs + 31) / 32 * 32 : cap;
    rope_kernel<<<m, threads, 0, c->stream>>>(x, d_pos, m, n_heads, head_dim, p->theta,
                                              p->section[0], p->section[1]);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

/* Table form: cos, sin [m, head_dim/2] in device memory; row i of x at x + i·stride. */
__global__ void rope_table_kernel(float *x, int stride, const float *cos, const float *sin,
                                  int n_heads, int head_dim) {
    const int i = blockIdx.x, half = head_dim / 2;
    for (int t = threadIdx.x; t < n_heads * half; t += blockDim.x) {
        const int h = t / half, j = t % half;
        const float cs = cos[(int64_t)i * half + j], sn = sin[(int64_t)i * half + j];
        float *v = x + (int64_t)i * stride + h * head_dim;
        const float p = v[j], q = v[j + half];
        v[j] = p * cs - q * sn;
        v[j + half] = q * cs + p * sn;
    }
}

static int rope_table(dg_cuda *c, float *x, int stride, const float *cos, const float *sin, int m,
                      int n_heads, int head_dim) {
    if (m <= 0) return 0;
    const int pairs = n_heads * head_dim / 2, threads = pairs < 256 ? (pairs + 31) / 32 * 32 : 256;
    rope_table_kernel<<<m, threads, 0, c->stream>>>(x, stride, cos, sin, n_heads, head_dim);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

/* One block per new position: K and V rows to row table[p / bs]·bs + p % bs of the pool.
 * `table` holds the block ids from block first_block on (staged slice). */
__global__ void kv_write_kernel(void *kc, void *vc, const int32_t *table, int first_block,
                                int block_size, int start, const float *k, const float *v, int kv_dim, int bf16) {
    const int p = start + blockIdx.x;
    const int64_t r = (int64_t)table[p / block_size - first_block] * block_size + p % block_size;
    dg_cuda_kv_store_row(kc, vc, r, k + (int64_t)blockIdx.x * kv_dim, v + (int64_t)blockIdx.x * kv_dim, kv_dim, bf16);
}

static int kv_write(dg_cuda *c, const dg_kv_view *kv, int start, const float *k, const float *v,
                    int m, int kv_dim) {
    if (m <= 0) return 0;
    const int b0 = start / kv->block_size, b1 = (start + m - 1) / kv->block_size;
    const int32_t *d_tab = (const int32_t *)dg_cuda_stage(c, kv->block_table + b0,
                                                          sizeof(int32_t) * (size_t)(b1 - b0 + 1));
    if (!d_tab) return DG_EDEVICE;
    kv_write_kernel<<<m, 128, 0, c->stream>>>(kv->k, kv->v, d_tab, b0, kv->block_size, start, k, v, kv_dim,
                                              kv->dtype == DG_DTYPE_BF16);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

/* ---- entries --------------------------------------------------------------------------- */

void dg_cuda_rope(dg_backend *be, float *x, const int32_t *pos, int m, int n_heads, int head_dim,
                  const dg_rope_params *p) {
    rope(dg_cuda_of(be), x, pos, m, n_heads, head_dim, p);
}

void dg_cuda_rope_table(dg_backend *be, float *x, int stride, const float *cos, const float *sin,
                        int m, int n_heads, int head_dim) {
    rope_table(dg_cuda_of(be), x, stride, cos, sin, m, n_heads, head_dim);
}

void dg_cuda_kv_write(dg_backend *be, const dg_kv_view *kv, int start, const float *k,
                      const float *v, int m, int kv_dim) {
    kv_write(dg_cuda_of(be), kv, start, k, v, m, kv_dim);
}
