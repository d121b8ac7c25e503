/* attention_zmm.c — the decoder's attention on AVX-512 (ops.c attend_group): one chunk of
 * keys for all the query heads that share a kv head. Each head's scores as a small product
 * (a block of 16 key rows walked with one pointer, q in registers, the 16 keys' partial sums
 * reduced side by side by zmm_reduce16 instead of one horizontal sum a key), the online
 * softmax on 16 lanes (dg_exp512), then the heads' outputs o += e_j·v_j in key order
 * together, up to 24 vectors of them in registers, so that each value row is loaded once
 * for all the heads of a pass instead of once a head. The rows come as pointers: an fp32
 * cache is read where it lies, not copied a chunk at a time into a contiguous buffer as the
 * AVX2 path does when a chunk spans blocks. One thread, the small preset's 24 layers of 14
 * heads over 2 kv heads of 64, 512 cached tokens: the 24 calls 1.3-1.6 -> 0.9-1.1 ms a token;
 * 4096 tokens 15.7-16.4 -> 13.2-13.4 ms; a decode step 36.5-38.0 -> 34.4-34.9 ms. A bf16
 * cache's rows are read where they lie too and widened in registers as they are loaded (the
 * same values as an fp32 cache holding them, so the same bits), where they were widened
 * into a buffer first. */
#include "cpu_kernels.h"

#include <immintrin.h>
#include <math.h>

#include "simd_math.h"

#define TARGET __attribute__((target("avx512f,avx2,fma")))
#define INLINE static inline __attribute__((always_inline))
#include "zmm_reduce.h"

/* Sixteen values of a K or V row from element i: fp32 as stored, or bf16 widened (exact). */
TARGET INLINE __m512 load16(const void *row, int64_t i, const int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i))), 16));
    return _mm512_loadu_ps((const float *)row + i);
}

/* s[0..nt) = scale·(q·k_t) for nt <= 16 keys, key t at k + t·ld: the partial products of
 * each key over q's 16-column blocks in one accumulator (block order), then its 16 lanes
 * summed by zmm_reduce16's tree; s[nt..16) = 0. q is held in registers nq blocks at a time
 * and the keys walked one after another (one pointer, not sixteen); inlined with nt = 16
 * and nq = 4 or 8 (head_dim 64, or a multiple of 128), the loops without tests. */
TARGET INLINE void score16(float *s, const float *q, const void *k, int64_t ld, int nt, int hd, int nq, __m512 vs,
                           const int bf16) {
    __m512 a[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++) a[t] = _mm512_setzero_ps();
    for (int d0 = 0; d0 < hd; d0 += 16 * nq) {
        __m512 qv[8];
#pragma GCC unroll 8
        for (int b = 0; b < 8; b++) qv[b] = b < nq ? _mm512_loadu_ps(q + d0 + 16 * b) : _mm512_setzero_ps();
        int64_t kt = d0;   /* element of key t's row, from k */
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++, kt += ld) {
            if (t >= nt) break;
#pragma GCC unroll 8
            for (int b = 0; b < 8; b++)
                if (b < nq) a[t] = _mm512_fmadd_ps(qv[b], load16(k, kt + 16 * b, bf16), a[t]);
        }
    }
    _mm512_storeu_ps(s, _mm512_mul_ps(zmm_reduce16(a, nt), vs));
}

/* The scores of keys j0 .. j0+nt-1: one strided score16 when their rows are evenly spaced
 * (a block of 16 rows of the cache, or of the widened copy), else one row at a time (the
 * same operations, so the same bits). */
TARGET INLINE void scores16(float *s, const float *q, const void *const *krow, int nt, int hd, __m512 vs,
                            const int bf16) {
    const int64_t es = bf16 ? 2 : 4, ld = nt > 1 ? ((const char *)krow[1] - (const char *)krow[0]) / es : 0;
    int even = 1;
    for (int t = 2; t < nt; t++) even &= (const char *)krow[t] == (const char *)krow[0] + t * ld * es;
    if (even && nt == 16 && hd == 64) {
        score16(s, q, krow[0], ld, 16, 64, 4, vs, bf16);
    } else if (even && nt == 16 && hd % 128 == 0) {
        score16(s, q, krow[0], ld, 16, hd, 8, vs, bf16);
    } else if (even) {
        score16(s, q, krow[0], ld, nt, hd, hd % 128 == 0 ? 8 : hd % 64 == 0 ? 4 : 1, vs, bf16);
    } else {
        float one[16];
        for (int t = 0; t < nt; t++) {
            score16(one, q, krow[t], 0, 1, hd, 1, vs, bf16);
            s[t] = one[0];
        }
        for (int t = nt; t < 16; t++) s[t] = 0;
    }
}

/* The outputs' vectors one pass of the second product holds in registers (of 32): the
 * heads of a pass share each load of a value row. 28 spilled some of them. */
#define PV_REGS 24
#define E_LD (DG_ATT_CHUNK + 16)   /* a head's row of probabilities */

/* For the gs heads of a pass, columns d0 .. d0+16·nb of each: o_g = o_g·corr_g + sum_j
 * e_g[j]·v_j in key order (gs·nb <= PV_REGS). Each lane's operations are a per-head loop's,
 * so the bits do not depend on how the heads are grouped. Inlined with constant gs and nb,
 * the loops without tests. */
TARGET INLINE void pv_heads(float *o, int hd, const float *e, const float *corr, const void *const *vrow,
                            int nc, int d0, int gs, int nb, const int bf16) {
    __m512 y[PV_REGS];
#pragma GCC unroll 24
    for (int r = 0; r < PV_REGS; r++)
        y[r] = r < gs * nb ? _mm512_mul_ps(_mm512_loadu_ps(o + (int64_t)(r / nb) * hd + d0 + 16 * (r % nb)),
                                           _mm512_set1_ps(corr[r / nb]))
                           : _mm512_setzero_ps();
    for (int j = 0; j < nc; j++) {
#pragma GCC unroll 8
        for (int b = 0; b < 8; b++) {
            if (b >= nb) break;
            const __m512 vb = load16(vrow[j], d0 + 16 * b, bf16);
#pragma GCC unroll 24
            for (int g = 0; g < PV_REGS; g++) {
                if (g >= gs || g * nb + b >= PV_REGS) break;
                y[g * nb + b] = _mm512_fmadd_ps(_mm512_set1_ps(e[g * E_LD + j]), vb, y[g * nb + b]);
            }
        }
    }
#pragma GCC unroll 24
    for (int r = 0; r < PV_REGS; r++)
        if (r < gs * nb) _mm512_storeu_ps(o + (int64_t)(r / nb) * hd + d0 + 16 * (r % nb), y[r]);
}

/* pv_heads with gs and nb made constants for head_dim 64 (4 vectors, up to 6 heads) and 128
 * (8, up to 3); other shapes through the general loops. */
TARGET INLINE void pv_pass(float *o, int hd, const float *e, const float *corr, const void *const *vrow, int nc,
                           int d0, int gs, int nb, const int bf16) {
#define PV(G, B) pv_heads(o, hd, e, corr, vrow, nc, d0, G, B, bf16)
    switch (nb * 8 + gs) {
    case 4 * 8 + 6: PV(6, 4); break;
    case 4 * 8 + 5: PV(5, 4); break;
    case 4 * 8 + 4: PV(4, 4); break;
    case 4 * 8 + 3: PV(3, 4); break;
    case 4 * 8 + 2: PV(2, 4); break;
    case 4 * 8 + 1: PV(1, 4); break;
    case 8 * 8 + 3: PV(3, 8); break;
    case 8 * 8 + 2: PV(2, 8); break;
    case 8 * 8 + 1: PV(1, 8); break;
    default: PV(gs, nb);
    }
#undef PV
}

/* The first n of 16 lanes. */
static inline __mmask16 live_lanes(int n) {
    return (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1);
}

TARGET INLINE void group_chunk(float *o, const float *q, const void *const *krow, const void *const *vrow, int nc,
                               int group, int hd, float scale, float *mx, float *l, const int bf16) {
    /* heads a pass: as even as the passes allow (7 heads of 64: 4 + 3, not 6 + 1) */
    const int nbmax = hd / 16 < 8 ? hd / 16 : 8, fit = PV_REGS / nbmax, passes = (group + fit - 1) / fit,
              per = (group + passes - 1) / passes;
    float e[PV_REGS * E_LD] __attribute__((aligned(64))), corr[PV_REGS];
    const __m512 vs = _mm512_set1_ps(scale);
    for (int g0 = 0; g0 < group; g0 += per) {
        const int gs = group - g0 < per ? group - g0 : per;
        for (int i = 0; i < gs; i++) {   /* each head's scores, maximum, probabilities, sum */
            const int g = g0 + i;
            const float *qg = q + (int64_t)g * hd;
            float *s = e + i * E_LD;
            for (int j0 = 0; j0 < nc; j0 += 16) scores16(s + j0, qg, krow + j0, nc - j0 < 16 ? nc - j0 : 16, hd, vs, bf16);
            __m512 vm = _mm512_set1_ps(mx[g]);   /* lanes past nc read as -inf */
            for (int j = 0; j < nc; j += 16)
                vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live_lanes(nc - j), s + j));
            const float m = _mm512_reduce_max_ps(vm);
            corr[i] = expf(mx[g] - m);   /* 0 on the first chunk (mx = -inf) */
            const __m512 bm = _mm512_set1_ps(m);
            __m512 acc = _mm512_setzero_ps();
            for (int j = 0; j < nc; j += 16) {
                const __m512 p = _mm512_maskz_mov_ps(live_lanes(nc - j), dg_exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), bm)));
                _mm512_storeu_ps(s + j, p);
                acc = _mm512_add_ps(acc, p);
            }
            l[g] = l[g] * corr[i] + zmm_reduce(acc);
            mx[g] = m;
        }
        for (int d0 = 0; d0 < hd; d0 += 128)
            pv_pass(o + (int64_t)g0 * hd, hd, e, corr, vrow, nc, d0, gs, (hd - d0) / 16 < 8 ? (hd - d0) / 16 : 8, bf16);
    }
}

TARGET void dg_cpu_att_group_chunk_zmm(float *o, const float *q, const void *const *krow, const void *const *vrow,
                                       int nc, int group, int hd, float scale, float *mx, float *l, int bf16) {
    if (bf16) group_chunk(o, q, krow, vrow, nc, group, hd, scale, mx, l, 1);
    else group_chunk(o, q, krow, vrow, nc, group, hd, scale, mx, l, 0);
}
