/* attention_bf16.c — the segment attention's products on AVX-512 BF16 (attention_bf16.h).
 *
 * Both products are GEMM tiles of 4 rows by 4 zmm of 16 lanes (16 accumulators, 4 operand
 * vectors and a broadcast: 21 of the 32 registers; the outputs of 80 dims by 5 zmm, 26
 * registers, where 4 + 1 left the last block's 4 chains waiting on their latency), a step
 * one pair: the scores' lanes are 16 keys (the keys packed a pair of dimensions by 16
 * keys), the outputs' lanes 16 dims (the values packed a pair of keys by 16 dims). The rows
 * of queries and probabilities are rounded once into pairs, so a step broadcasts one
 * 32-bit word per row. Packing a tile costs a pass over its keys and values, against the
 * 4·nq·nc·hd flops of the block; the segment attention packs a segment's tiles once for all
 * its query blocks (vision_ops.c), and 16 keys are transposed into the keys' layout in
 * registers (a word stored at a time, the packing was 14% of the DiT's attention over 4096
 * tokens; now, packed once, under 2%).
 *
 * The softmax between the products (dg_att_bf16_softmax) writes its probabilities as the
 * rounded pairs the second product reads, not as floats read back and rounded; the online
 * softmax's correction of the outputs rides on that product's loads of them. On one thread
 * the vision tower's 1024-token full attention (16 heads of 80) went 44-47 -> 37-38 ms, its
 * 64-token windows 6.0-6.5 -> 4.8-5.2, 5476 tokens 1.32-1.48 -> 1.15-1.25 s. */
#include "attention_bf16.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "simd_math.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,avx512vl,avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

static int round_up(int n, int m) { return (n + m - 1) / m * m; }

/* n values at x rounded (matmul.h step 0: VCVTNEPS2BF16) into n/2 words at w, n even. */
TARGET static void round_pairs(uint32_t *w, const float *x, int n) {
    for (int c = 0; c < n; c += 16) {
        const int left = n - c;
        const __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + c));
        _mm256_mask_storeu_epi32(w + c / 2, left >= 16 ? 0xff : (__mmask8)((1u << (left / 2)) - 1), h);
    }
}

/* One value rounded, as a 16-bit word (the same instruction on one lane). */
TARGET static uint32_t round1(float f) {
    return (uint32_t)(uint16_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set_ss(f)));
}

void dg_att_bf16_begin(dg_att_bf16 *a, uint32_t *scratch, int qb, int kc, const float *q, int q_stride, int nq,
                       int hd) {
    const int hq = hd / 2, rows = round_up(nq, 4);
    a->q = scratch;
    a->kv = a->q + (int64_t)qb * 128;
    a->k = a->kv;
    a->v = a->kv + (int64_t)kc * 128;
    a->p = a->kv + 2 * (int64_t)kc * 128 + 16;
    a->nq = nq;
    a->hd = hd;
    for (int i = 0; i < nq; i++) round_pairs(a->q + (int64_t)i * hq, q + (int64_t)i * q_stride, hd);
    memset(a->q + (int64_t)nq * hq, 0, sizeof(uint32_t) * (size_t)(rows - nq) * hq);
}

/* Words t0 .. t0+15 of a key row (dims 2t, 2t + 1 rounded, as round_pairs writes them; zeros
 * from dim hd on): two rows of 16 floats rounded into one of 16 pairs. */
TARGET INLINE __m512i key_words(const float *k, int t0, int hd) {
    const int d0 = 2 * t0, left = hd - d0;
    const __mmask16 lo = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0,
                    hi = left >= 32 ? 0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, k + d0 + 16), _mm512_maskz_loadu_ps(lo, k + d0));
}

TARGET void dg_att_bf16_pack(uint32_t *dst, const float *k, const float *v, int kv_stride, int nc, int hd) {
    const int hq = hd / 2, groups = round_up(nc, 64) / 16, np = (nc + 1) / 2;
    uint32_t *kw = dst, *vw = dst + (int64_t)groups * 16 * hq;
    /* keys: word (g, t, l) = key 16g + l's dims 2t, 2t + 1; keys past nc are zeros. 16 keys'
     * words t0 .. t0+15 rounded into 16 registers, transposed, stored a word t at a time */
    for (int g = 0; g < groups; g++)
        for (int t0 = 0; t0 < hq; t0 += 16) {
            __m512i r[16], c[16];
#pragma GCC unroll 16
            for (int l = 0; l < 16; l++)
                r[l] = 16 * g + l < nc ? key_words(k + (int64_t)(16 * g + l) * kv_stride, t0, hd) : _mm512_setzero_si512();
            dg_transpose16(c, r);
            uint32_t *out = kw + ((int64_t)g * hq + t0) * 16;
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++)
                if (t0 + j < hq) _mm512_storeu_si512(out + j * 16, c[j]);
        }
    /* values: word (g, t, l) = dim 16g + l of keys 2t (low half) and 2t + 1 (high; 0 past nc) */
    for (int t = 0; t < np; t++) {
        const float *v0 = v + (int64_t)(2 * t) * kv_stride, *v1 = v0 + kv_stride;
        for (int d = 0; d < hd; d += 16) {
            const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v0 + d));
            const __m256i hi = 2 * t + 1 < nc ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v1 + d))
                                              : _mm256_setzero_si256();
            const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(lo),
                                              _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
            _mm512_storeu_si512(vw + ((int64_t)(d / 16) * np + t) * 16, w);
        }
    }
}

void dg_att_bf16_use(dg_att_bf16 *a, const uint32_t *packed, int nc) {
    a->k = packed;
    a->v = packed + (int64_t)round_up(nc, 64) * (a->hd / 2);
}

void dg_att_bf16_tile(dg_att_bf16 *a, const float *k, const float *v, int kv_stride, int nc) {
    dg_att_bf16_pack(a->kv, k, v, kv_stride, nc, a->hd);
    dg_att_bf16_use(a, a->kv, nc);
}

/* 4 rows x gn (<= 5) zmm over `steps` pairs: acc[r][g] += broadcast(x[r·ldx + t]) · y[(g·gstride + t)·16]. */
TARGET INLINE void block(__m512 acc[4][5], const int gn, const uint32_t *x, int64_t ldx, const uint32_t *y,
                         int64_t gstride, int steps) {
    for (int t = 0; t < steps; t++) {
        __m512i yv[5];
#pragma GCC unroll 5
        for (int g = 0; g < gn; g++) yv[g] = _mm512_loadu_si512(y + ((int64_t)g * gstride + t) * 16);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512i b = _mm512_set1_epi32((int)x[r * ldx + t]);
#pragma GCC unroll 5
            for (int g = 0; g < gn; g++) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], (__m512bh)yv[g], (__m512bh)b);
        }
    }
}

TARGET void dg_att_bf16_scores(const dg_att_bf16 *a, float *s, int lds, int nc, float scale) {
    const int hq = a->hd / 2, groups = round_up(nc, 64) / 16;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int i0 = 0; i0 < a->nq; i0 += 4)
        for (int g0 = 0; g0 < groups; g0 += 4) {
            __m512 acc[4][5];
            for (int r = 0; r < 4; r++)
                for (int g = 0; g < 4; g++) acc[r][g] = _mm512_setzero_ps();
            block(acc, 4, a->q + (int64_t)i0 * hq, hq, a->k + (int64_t)g0 * hq * 16, hq, hq);
            for (int r = 0; r < 4 && i0 + r < a->nq; r++)
                for (int g = 0; g < 4; g++)
                    _mm512_storeu_ps(s + (int64_t)(i0 + r) * lds + (g0 + g) * 16, _mm512_mul_ps(acc[r][g], sc));
        }
}

/* Rows i0 .. i0+3 of o, dim groups g0 .. g0+gn-1; each row times corr[i] first, when corr. */
TARGET INLINE void pv_block(const dg_att_bf16 *a, float *o, const float *corr, int i0, int g0, const int gn, int np) {
    const int hd = a->hd;
    __m512 acc[4][5];
    for (int r = 0; r < 4; r++) {
        const __m512 c = _mm512_set1_ps(corr && i0 + r < a->nq ? corr[i0 + r] : 1.0f);
        for (int g = 0; g < gn; g++) {
            acc[r][g] = i0 + r < a->nq ? _mm512_loadu_ps(o + (int64_t)(i0 + r) * hd + (g0 + g) * 16) : _mm512_setzero_ps();
            if (corr) acc[r][g] = _mm512_mul_ps(acc[r][g], c);
        }
    }
    block(acc, gn, a->p + (int64_t)i0 * np, np, a->v + (int64_t)g0 * np * 16, np, np);
    for (int r = 0; r < 4 && i0 + r < a->nq; r++)
        for (int g = 0; g < gn; g++) _mm512_storeu_ps(o + (int64_t)(i0 + r) * hd + (g0 + g) * 16, acc[r][g]);
}

TARGET void dg_att_bf16_pv_rows(dg_att_bf16 *a, float *o, int nc, const float *corr) {
    const int np = (nc + 1) / 2, rows = round_up(a->nq, 4), groups = a->hd / 16;
    memset(a->p + (int64_t)a->nq * np, 0, sizeof(uint32_t) * (size_t)(rows - a->nq) * np);
    for (int i0 = 0; i0 < a->nq; i0 += 4)
        for (int g0 = 0; g0 < groups;) switch (groups - g0) {   /* 80 dims: one block of 5, not 4 + 1 */
            case 1: pv_block(a, o, corr, i0, g0, 1, np), g0 += 1; break;
            case 2: pv_block(a, o, corr, i0, g0, 2, np), g0 += 2; break;
            case 3: pv_block(a, o, corr, i0, g0, 3, np), g0 += 3; break;
            case 5: pv_block(a, o, corr, i0, g0, 5, np), g0 += 5; break;
            default: pv_block(a, o, corr, i0, g0, 4, np), g0 += 4; break;
            }
}

TARGET void dg_att_bf16_pv(dg_att_bf16 *a, float *o, const float *p, int lds, int nc) {
    const int np = (nc + 1) / 2;
    for (int i = 0; i < a->nq; i++) {
        uint32_t *w = a->p + (int64_t)i * np;
        round_pairs(w, p + (int64_t)i * lds, nc & ~1);
        if (nc & 1) w[np - 1] = round1(p[(int64_t)i * lds + nc - 1]);   /* its pair's high half 0 */
    }
    dg_att_bf16_pv_rows(a, o, nc, NULL);
}

/* Lanes past nc are -inf for the maximum and 0 for the probabilities, so an odd nc's last
 * pair has its high half 0, as dg_att_bf16_pv's. */
TARGET float dg_att_bf16_softmax(dg_att_bf16 *a, int i, const float *s, int nc, float *mx, float *corr) {
    const int np = (nc + 1) / 2;
    uint32_t *w = a->p + (int64_t)i * np;
    __m512 vm = _mm512_set1_ps(*mx);
    for (int c = 0; c < nc; c += 16) {
        const __mmask16 k = nc - c >= 16 ? 0xffff : (__mmask16)((1u << (nc - c)) - 1);
        vm = _mm512_mask_max_ps(vm, k, vm, _mm512_maskz_loadu_ps(k, s + c));
    }
    const float m = _mm512_reduce_max_ps(vm);
    const __m512 bm = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < nc; c += 16) {
        const int left = nc - c;
        const __mmask16 k = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        const __m512 e = _mm512_maskz_mov_ps(k, dg_exp512_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + c), bm)));
        acc = _mm512_add_ps(acc, e);
        _mm256_mask_storeu_epi32(w + c / 2, left >= 16 ? 0xff : (__mmask8)((1u << ((left + 1) / 2)) - 1),
                                 (__m256i)_mm512_cvtneps_pbh(e));
    }
    *corr = expf(*mx - m);
    *mx = m;
    return _mm512_reduce_add_ps(acc);
}
