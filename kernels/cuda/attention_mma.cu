/* attention_mma.cu — flash attention (FlashAttention-2's schedule) on mma.sync: the prefill
 * and segment path for head_dim 64, 80 and 128 (the 7B decoder, the vision tower, the DiT).
 *
 * Why not the wmma kernel of attention.cu: wmma hides which row a fragment element belongs
 * to, so that kernel keeps S and O in shared memory and rescales O there on every key tile;
 * it measured 48 TFLOP/s on the DiT's 4096-token self-attention (H200), 6% of the bf16
 * peak. With mma.sync.m16n8k16 the fragment layout is fixed by the PTX ISA (thread lane =
 * 4·g + t holds rows g and g+8, columns 2t and 2t+1 of every 8-column piece), so:
 *   - Q stays in registers for the whole walk (A fragments, loaded once);
 *   - S = Q·Kᵀ accumulates in registers; the online softmax works on them directly (a row's
 *     max and sum reduce over the 4 lanes of its quad with two shuffles);
 *   - P goes from the S accumulators straight into the A fragments of P·V (two 8-key
 *     pieces make one 16-key fragment), never through shared memory;
 *   - O accumulates in registers, rescaled in place.
 * K and V tiles of 64 keys are double-buffered in shared memory with cp.async (the next
 * tile loads while this one is multiplied); V's B fragments come from ldmatrix.trans.
 *
 * Activations are fp32 in this backend, so a pre-pass converts Q (scaled by scale·log2 e:
 * the softmax runs in base 2 with exp2f), K and V once per call into bf16 copies in the
 * scratch (for the DiT at 1024²: 50 MB written, ~25 µs; the kernel then reads half the
 * bytes and can use 16-byte asynchronous copies). Numerics as the wmma kernel's: operands
 * rounded to bf16, fp32 accumulation, P rounded to bf16 before P·V.
 *
 * Block: 4 warps, 64 query rows (16 per warp) of one head; shared memory 2 × 2 tiles of
 * 64 × (head_dim + 8) bf16 (70 KB at 128: three blocks per SM, which the launch bounds
 * hold the registers to). Registers at head_dim 128: O 64, S 32, Q 32 floats per thread.
 * K's and V's B fragments come from ldmatrix (.x4: two 8-key or 8-dim pieces a load).
 *
 * Not yet run on a GPU (written in a session without one), so used only with
 * DG_CUDA_UNVERIFIED=1 until a device run verifies it (NOTES.md): test_backend_cuda compares
 * it with the CPU, and the wmma kernel, the default, too. */
#include <math.h>

#include "attention.cuh"

#define MK          64        /* keys per tile */
#define MMA_THREADS 128

template <int HD>
struct mma_layout {
    static constexpr int    LD = HD + 8;                          /* bf16 per shared row: rows
                                                                     16 bytes apart in the banks */
    static constexpr size_t TILE = (size_t)MK * LD * 2;           /* bytes of one K or V tile */
    static constexpr size_t BYTES = 4 * TILE;                     /* K, V, double-buffered */
};

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const int n = valid ? 16 : 0;                                 /* 0: the 16 bytes are zeroed */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit(void) { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait1(void) { asm volatile("cp.async.wait_group 1;\n" ::); }

/* d += a·b for one m16n8k16 tile: a 4 registers (16x16 bf16, row-major), b 2 (16x8, col). */
__device__ __forceinline__ void mma_bf16(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Four 8x8 bf16 matrices: lanes 8i .. 8i+7 give the row addresses of matrix i; lane 4g + t
 * receives row g, elements 2t and 2t+1 of each. */
__device__ __forceinline__ void ldmatrix_x4(uint32_t *r, const void *smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

/* The same, transposed: lane 4g + t receives elements (2t, g) and (2t + 1, g) of each. */
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t *r, const void *smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);      /* lo in the low half */
    return *(const uint32_t *)&v;
}

__device__ __forceinline__ uint32_t ld_u32(const __nv_bfloat16 *p) { return *(const uint32_t *)p; }

/* ---- pre-pass: fp32 rows -> bf16 copies ---------------------------------------------------- */

/* dk[row][heads][hd] = bf16(a.k row · scale), and dv likewise from a.v when dv != NULL (rows
 * already bf16, a BF16 KV cache: widened, scaled, rounded again); one thread per pair of
 * elements (hd is even). */
__global__ void attn_to_bf16_kernel(__nv_bfloat16 *dk, __nv_bfloat16 *dv, kv_addr a, int rows, int heads,
                                    int hd, float scale) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int hp = hd / 2;
    const int64_t per_row = (int64_t)heads * hp;
    if (i >= (int64_t)rows * per_row) return;
    const int row = (int)(i / per_row), rem = (int)(i % per_row), hh = rem / hp, d = 2 * (rem % hp);
    const int64_t src = kv_off(a, row) + (int64_t)hh * hd + d, dst = ((int64_t)row * heads + hh) * hd + d;
    *(__nv_bfloat162 *)(dk + dst) = __floats2bfloat162_rn(kv_at(a, a.k, src) * scale, kv_at(a, a.k, src + 1) * scale);
    if (dv) *(__nv_bfloat162 *)(dv + dst) = __floats2bfloat162_rn(kv_at(a, a.v, src), kv_at(a, a.v, src + 1));
}

/* ---- the kernel ------------------------------------------------------------------------------ */

template <int HD>
__global__ void __launch_bounds__(MMA_THREADS)   /* 168 registers at 128 (nvcc 13): 3 blocks an SM;
                                                    a min-blocks bound of 3 made ptxas spill */
attn_mma_kernel(float *out, int out_stride, const __nv_bfloat16 *__restrict__ qb,
                const __nv_bfloat16 *__restrict__ kb, const __nv_bfloat16 *__restrict__ vb,
                const int32_t *tiles, int n_heads, int n_kv_heads, int causal) {
    typedef mma_layout<HD> L;
    extern __shared__ __align__(128) unsigned char mma_smem[];
    __nv_bfloat16 *Ks = (__nv_bfloat16 *)mma_smem;               /* [2][MK][LD] */
    __nv_bfloat16 *Vs = Ks + 2 * MK * L::LD;                      /* [2][MK][LD] */
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, g = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const int4 tile = ((const int4 *)tiles)[blockIdx.x];
    const int q0 = tile.x, nq = tile.y - tile.x, k0 = tile.z, nk_all = tile.w - tile.z;
    const int nk = causal >= 0 ? min(nk_all, causal + q0 + nq) : nk_all;
    const int r0 = warp * 16 + g, r1 = r0 + 8;                    /* this thread's two rows */

    /* Q: the A fragments of every 16-dim step, for the whole walk */
    uint32_t qf[HD / 16][4];
    {
        const int64_t qrow = (int64_t)n_heads * HD;
        const __nv_bfloat16 *p0 = r0 < nq ? qb + (int64_t)(q0 + r0) * qrow + h * HD + 2 * tq : NULL;
        const __nv_bfloat16 *p1 = r1 < nq ? qb + (int64_t)(q0 + r1) * qrow + h * HD + 2 * tq : NULL;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            qf[kk][0] = p0 ? ld_u32(p0 + kk * 16) : 0u;
            qf[kk][1] = p1 ? ld_u32(p1 + kk * 16) : 0u;
            qf[kk][2] = p0 ? ld_u32(p0 + kk * 16 + 8) : 0u;
            qf[kk][3] = p1 ? ld_u32(p1 + kk * 16 + 8) : 0u;
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;   /* per row: max (base 2), partial sum */
    const int lim0 = causal >= 0 ? causal + q0 + r0 : 0x7fffffff;  /* last key each row may see */
    const int lim1 = causal >= 0 ? causal + q0 + r1 : 0x7fffffff;

    const int64_t kvrow = (int64_t)n_kv_heads * HD;
    const __nv_bfloat16 *kbase = kb + (int64_t)k0 * kvrow + kvh * HD, *vbase = vb + (int64_t)k0 * kvrow + kvh * HD;
    auto load_tile = [&](int j0, int buf) {                      /* keys j0 .. j0+63 (zeros past nk) */
        constexpr int CPR = HD / 8;                               /* 16-byte pieces per row */
#pragma unroll
        for (int e = t; e < MK * CPR; e += MMA_THREADS) {
            const int r = e / CPR, c = e % CPR;
            const bool ok = j0 + r < nk;
            const int64_t src = ok ? (int64_t)(j0 + r) * kvrow + c * 8 : 0;
            cp_async16(Ks + (buf * MK + r) * L::LD + c * 8, kbase + src, ok);
            cp_async16(Vs + (buf * MK + r) * L::LD + c * 8, vbase + src, ok);
        }
    };

    const int n_tiles = (nk + MK - 1) / MK;
    if (n_tiles > 0) load_tile(0, 0);
    cp_async_commit();
    for (int it = 0; it < n_tiles; it++) {
        const int j0 = it * MK, buf = it & 1;
        if (it + 1 < n_tiles) load_tile(j0 + MK, buf ^ 1);
        cp_async_commit();                                        /* (an empty group at the end) */
        cp_async_wait1();                                         /* tile `it` has landed */
        __syncthreads();
        const __nv_bfloat16 *Kt = Ks + buf * MK * L::LD, *Vt = Vs + buf * MK * L::LD;

        /* S[16 rows, 64 keys] = Q·Kᵀ: the B fragment of keys n·8 .. n·8+7 is those K rows
         * untransposed (b0: dims 2t, 2t+1 of key g; b1: dims +8); one ldmatrix.x4 gives
         * both registers for two 8-key pieces (matrices: keys of n, dims 0-7 and 8-15 of
         * the step, then the same for n+1) */
        float s[MK / 8][4];
#pragma unroll
        for (int n = 0; n < MK / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
        const __nv_bfloat16 *krow = Kt + ((lane >> 4) * 8 + (lane & 7)) * L::LD + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++)
#pragma unroll
            for (int n = 0; n < MK / 8; n += 2) {
                uint32_t kf[4];
                ldmatrix_x4(kf, krow + n * 8 * L::LD + kk * 16);
                mma_bf16(s[n], qf[kk], kf[0], kf[1]);
                mma_bf16(s[n + 1], qf[kk], kf[2], kf[3]);
            }

        /* mask, the online softmax in base 2 */
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < MK / 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = j0 + n * 8 + 2 * tq + e;
                if (j >= nk || j > lim0) s[n][e] = -INFINITY;
                if (j >= nk || j > lim1) s[n][2 + e] = -INFINITY;
                mx0 = fmaxf(mx0, s[n][e]);
                mx1 = fmaxf(mx1, s[n][2 + e]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        /* a row that has seen no key yet keeps max -inf: subtract 0 there (p = 0, not NaN) */
        const float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float c0 = exp2f(m0 - base0), c1 = exp2f(m1 - base1);   /* exp2(-inf) = 0 */
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int n = 0; n < MK / 8; n++) {
            s[n][0] = exp2f(s[n][0] - base0);
            s[n][1] = exp2f(s[n][1] - base0);
            s[n][2] = exp2f(s[n][2] - base1);
            s[n][3] = exp2f(s[n][3] - base1);
            ps0 += s[n][0] + s[n][1];
            ps1 += s[n][2] + s[n][3];
        }
        l0 = l0 * c0 + ps0;                                       /* the quad's lanes share c0 */
        l1 = l1 * c1 + ps1;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int d = 0; d < HD / 8; d++) {
            o[d][0] *= c0; o[d][1] *= c0;
            o[d][2] *= c1; o[d][3] *= c1;
        }

        /* O += P·V: P's A fragment of keys 16·kc .. 16·kc+15 is S pieces 2kc and 2kc+1; V's B
         * fragments for dims 8·dn .. 8·dn+15 from one ldmatrix.x4.trans (matrices: keys 0-7
         * and 8-15 of dims dn, then of dn+1) */
#pragma unroll
        for (int kc = 0; kc < MK / 16; kc++) {
            const uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                    pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                    pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
            const __nv_bfloat16 *vrow = Vt + (kc * 16 + (lane & 8) + (lane & 7)) * L::LD + (lane >> 4) * 8;
#pragma unroll
            for (int dn = 0; dn < HD / 8; dn += 2) {
                uint32_t vf[4];
                ldmatrix_x4_trans(vf, vrow + dn * 8);
                mma_bf16(o[dn], pa, vf[0], vf[1]);
                mma_bf16(o[dn + 1], pa, vf[2], vf[3]);
            }
        }
        __syncthreads();                                          /* buf is refilled at it + 2 */
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;   /* no keys: 0 */
    if (r0 < nq) {
        float *dst = out + (int64_t)(q0 + r0) * out_stride + h * HD + 2 * tq;
#pragma unroll
        for (int d = 0; d < HD / 8; d++) *(float2 *)(dst + d * 8) = make_float2(o[d][0] * inv0, o[d][1] * inv0);
    }
    if (r1 < nq) {
        float *dst = out + (int64_t)(q0 + r1) * out_stride + h * HD + 2 * tq;
#pragma unroll
        for (int d = 0; d < HD / 8; d++) *(float2 *)(dst + d * 8) = make_float2(o[d][2] * inv1, o[d][3] * inv1);
    }
}

/* ---- launchers ------------------------------------------------------------------------------- */

static size_t bf16_bytes(int64_t q_rows, int64_t kv_rows, int n_heads, int n_kv_heads, int head_dim) {
    const size_t align = 256;
    const size_t q = ((size_t)q_rows * n_heads * head_dim * 2 + align - 1) / align * align;
    const size_t kv = ((size_t)kv_rows * n_kv_heads * head_dim * 2 + align - 1) / align * align;
    return q + 2 * kv;
}

int dg_cuda_attn_mma_ok(const dg_cuda *c, int head_dim, int64_t q_rows, int64_t kv_rows, int n_heads,
                        int n_kv_heads) {
    if (c->gemm_split || c->attn_wmma || (head_dim != 64 && head_dim != 80 && head_dim != 128)) return 0;
    return bf16_bytes(q_rows, kv_rows, n_heads, n_kv_heads, head_dim) <= c->scratch_bytes;
}

int dg_cuda_attn_mma_prepare(dg_cuda *c, dg_attn_bf16 *b, const float *q, int q_stride, kv_addr a,
                             int q_rows, int kv_rows, int n_heads, int n_kv_heads, int head_dim, float scale) {
    const size_t align = 256;
    const size_t qbytes = ((size_t)q_rows * n_heads * head_dim * 2 + align - 1) / align * align;
    const size_t kvbytes = ((size_t)kv_rows * n_kv_heads * head_dim * 2 + align - 1) / align * align;
    __nv_bfloat16 *dq = (__nv_bfloat16 *)c->scratch;
    __nv_bfloat16 *dk = (__nv_bfloat16 *)((char *)c->scratch + qbytes);
    __nv_bfloat16 *dv = (__nv_bfloat16 *)((char *)c->scratch + qbytes + kvbytes);
    *b = (dg_attn_bf16){dq, dk, dv, n_heads, n_kv_heads, head_dim};
    const kv_addr qa = {q, NULL, NULL, 1, q_stride, 0};
    const int64_t nq = (int64_t)q_rows * n_heads * head_dim / 2, nkv = (int64_t)kv_rows * n_kv_heads * head_dim / 2;
    if (nq > 0) {
        attn_to_bf16_kernel<<<dg_cuda_blocks(nq, 256), 256, 0, c->stream>>>(dq, NULL, qa, q_rows, n_heads, head_dim,
                                                                            scale * 1.4426950408889634f);
        CUDA_CHECK_LAUNCH(c);
    }
    if (nkv > 0) {
        attn_to_bf16_kernel<<<dg_cuda_blocks(nkv, 256), 256, 0, c->stream>>>(dk, dv, a, kv_rows, n_kv_heads, head_dim, 1.0f);
        CUDA_CHECK_LAUNCH(c);
    }
    return 0;
}

int dg_cuda_attn_mma_launch(dg_cuda *c, const dg_attn_bf16 *b, const int32_t *d_tiles, int n_tiles, float *out,
                            int out_stride, int causal) {
    if (n_tiles == 0) return 0;
    const dim3 grid(n_tiles, b->n_heads);
#define LAUNCH_MMA(HD) attn_mma_kernel<HD><<<grid, MMA_THREADS, mma_layout<HD>::BYTES, c->stream>>>( \
        out, out_stride, b->q, b->k, b->v, d_tiles, b->n_heads, b->n_kv_heads, causal)
    if (b->head_dim == 64) LAUNCH_MMA(64);
    else if (b->head_dim == 80) LAUNCH_MMA(80);
    else LAUNCH_MMA(128);
#undef LAUNCH_MMA
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

int dg_cuda_attn_mma_init(dg_cuda *c) {
    CUDA_CHECK(c, cudaFuncSetAttribute(attn_mma_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mma_layout<64>::BYTES));
    CUDA_CHECK(c, cudaFuncSetAttribute(attn_mma_kernel<80>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mma_layout<80>::BYTES));
    CUDA_CHECK(c, cudaFuncSetAttribute(attn_mma_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mma_layout<128>::BYTES));
    return 0;
}
