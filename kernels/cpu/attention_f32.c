/* attention_f32.c — the segment attention's two products in fp32 on AVX-512 F
 * (attention_f32.h), the shape of attention_bf16.c's with one product a lane and step.
 *
 * Both products are tiles of 4 rows by up to 5 zmm of 16 lanes, a step one dimension (the
 * scores) or one key (the outputs): 4 (or 5) operand vectors, a broadcast a row, 16 (20)
 * FMAs. The scores' lanes are 16 keys, from the keys packed a dimension by 16 keys
 * (dg_att_f32_pack, transposed in registers); the outputs' lanes 16 dims, straight from the
 * values' rows as the pack copies them. OpenBLAS's sgemm, which these replace on AVX-512,
 * packed both operands again on every call: its copies were 21% of the DiT's attention over
 * 4096 tokens in fp32, which ran at 0.68 of the FMA's limit on one thread; these at 0.84. */
#include "attention_f32.h"

#include <immintrin.h>
#include <string.h>

#include "simd_math.h"

#define TARGET __attribute__((target("avx512f,avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

TARGET void dg_att_f32_pack(float *dst, const float *k, const float *v, int kv_stride, int nc, int hd) {
    const int groups = (nc + 15) / 16;
    /* keys: float (g, d, l) = dim d of key 16g + l; keys past nc are zeros */
    for (int g = 0; g < groups; g++)
        for (int d0 = 0; d0 < hd; d0 += 16) {
            __m512i r[16], c[16];
#pragma GCC unroll 16
            for (int l = 0; l < 16; l++)
                r[l] = 16 * g + l < nc ? _mm512_loadu_si512(k + (int64_t)(16 * g + l) * kv_stride + d0)
                                       : _mm512_setzero_si512();
            dg_transpose16(c, r);
            float *out = dst + ((int64_t)g * hd + d0) * 16;
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) _mm512_storeu_si512(out + j * 16, c[j]);
        }
    /* values: their rows, one after another */
    float *vw = dst + (int64_t)groups * 16 * hd;
    for (int j = 0; j < nc; j++) memcpy(vw + (int64_t)j * hd, v + (int64_t)j * kv_stride, sizeof(float) * (size_t)hd);
}

/* rm (<= 4) rows x gn (<= 5) zmm: acc[r][g] += x[r·ldx + t] · y[t·ystep + g·gstride] over
 * t < steps. */
TARGET INLINE void block(__m512 acc[4][5], const int rm, const int gn, const float *x, int64_t ldx, const float *y,
                         int64_t ystep, int64_t gstride, int steps) {
    for (int t = 0; t < steps; t++) {
        __m512 yv[5];
#pragma GCC unroll 5
        for (int g = 0; g < gn; g++) yv[g] = _mm512_loadu_ps(y + (int64_t)t * ystep + g * gstride);
#pragma GCC unroll 4
        for (int r = 0; r < rm; r++) {
            const __m512 b = _mm512_set1_ps(x[r * ldx + t]);
#pragma GCC unroll 5
            for (int g = 0; g < gn; g++) acc[r][g] = _mm512_fmadd_ps(b, yv[g], acc[r][g]);
        }
    }
}

/* Rows i0 .. i0+rm-1 of the scores, key groups g0 .. g0+gn-1. */
TARGET INLINE void scores_block(float *s, int lds, const float *q, int q_stride, const float *kt, int hd, float scale,
                                int i0, const int rm, int g0, const int gn) {
    __m512 acc[4][5];
#pragma GCC unroll 4
    for (int r = 0; r < rm; r++)
#pragma GCC unroll 5
        for (int g = 0; g < gn; g++) acc[r][g] = _mm512_setzero_ps();
    block(acc, rm, gn, q + (int64_t)i0 * q_stride, q_stride, kt + (int64_t)g0 * hd * 16, 16, (int64_t)hd * 16, hd);
    const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 4
    for (int r = 0; r < rm; r++)
#pragma GCC unroll 5
        for (int g = 0; g < gn; g++)
            _mm512_storeu_ps(s + (int64_t)(i0 + r) * lds + (g0 + g) * 16, _mm512_mul_ps(acc[r][g], sc));
}

TARGET void dg_att_f32_scores(float *s, int lds, const float *q, int q_stride, int nq, const float *packed, int nc,
                              int hd, float scale) {
    const int groups = (nc + 15) / 16;
    for (int i0 = 0; i0 < nq; i0 += 4)
        for (int g0 = 0; g0 < groups; g0 += 4) {
            const int rm = nq - i0 < 4 ? nq - i0 : 4, gn = groups - g0 < 4 ? groups - g0 : 4;
#define SB(I, R, G) scores_block(s, lds, q, q_stride, packed, hd, scale, I, R, g0, G)
            if (rm == 4 && gn == 4) SB(i0, 4, 4);
            else
                for (int r = 0; r < rm; r++) switch (gn) {   /* the edges a row at a time */
                    case 1: SB(i0 + r, 1, 1); break;
                    case 2: SB(i0 + r, 1, 2); break;
                    case 3: SB(i0 + r, 1, 3); break;
                    default: SB(i0 + r, 1, 4); break;
                    }
#undef SB
        }
}

/* Rows i0 .. i0+rm-1 of o, dim groups g0 .. g0+gn-1, each row times corr[i] first. */
TARGET INLINE void pv_block(float *o, int hd, const float *p, int lds, const float *vt, int nc, const float *corr,
                            int i0, const int rm, int g0, const int gn) {
    __m512 acc[4][5];
#pragma GCC unroll 4
    for (int r = 0; r < rm; r++) {
        const __m512 c = _mm512_set1_ps(corr ? corr[i0 + r] : 1.0f);
#pragma GCC unroll 5
        for (int g = 0; g < gn; g++) {
            acc[r][g] = _mm512_loadu_ps(o + (int64_t)(i0 + r) * hd + (g0 + g) * 16);
            if (corr) acc[r][g] = _mm512_mul_ps(acc[r][g], c);
        }
    }
    block(acc, rm, gn, p + (int64_t)i0 * lds, lds, vt + g0 * 16, hd, 16, nc);
#pragma GCC unroll 4
    for (int r = 0; r < rm; r++)
#pragma GCC unroll 5
        for (int g = 0; g < gn; g++) _mm512_storeu_ps(o + (int64_t)(i0 + r) * hd + (g0 + g) * 16, acc[r][g]);
}

TARGET void dg_att_f32_pv(float *o, int hd, const float *p, int lds, int nq, const float *packed, int nc,
                          const float *corr) {
    const float *vt = packed + (int64_t)(nc + 15) / 16 * 16 * hd;
    const int groups = hd / 16;
    for (int i0 = 0; i0 < nq; i0 += 4) {
        const int rm = nq - i0 < 4 ? nq - i0 : 4;
        for (int g0 = 0; g0 < groups;) {
            const int gn = groups - g0 == 5 ? 5 : groups - g0 < 4 ? groups - g0 : 4;   /* 80 dims: one block of 5 */
#define PB(I, R, G) pv_block(o, hd, p, lds, vt, nc, corr, I, R, g0, G)
            if (rm == 4) switch (gn) {
                case 1: PB(i0, 4, 1); break;
                case 2: PB(i0, 4, 2); break;
                case 3: PB(i0, 4, 3); break;
                case 5: PB(i0, 4, 5); break;
                default: PB(i0, 4, 4); break;
                }
            else
                for (int r = 0; r < rm; r++) switch (gn) {
                    case 1: PB(i0 + r, 1, 1); break;
                    case 2: PB(i0 + r, 1, 2); break;
                    case 3: PB(i0 + r, 1, 3); break;
                    case 5: PB(i0 + r, 1, 5); break;
                    default: PB(i0 + r, 1, 4); break;
                    }
#undef PB
            g0 += gn;
        }
    }
}
