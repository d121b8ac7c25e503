/* matmul_panel_ymm.h — the panel orders' tile (matmul.h) on AVX2 + FMA, for both orders:
 * included by matmul_avx2.c (fp32) and matmul_bf16_fallback.c (bf16, the same bits as
 * VDPBF16PS) after each defines TARGET with avx2 and fma.
 *
 * Up to PANEL_YMM_RM rows of x against 16 of the panel's outputs at a time (two ymm a row:
 * 10 accumulators, the 2 widened vectors of W and a broadcast in 13 of the 16 registers); a
 * pair of columns is 4 loads and widenings of W and 10 broadcasts for 20 FMAs. The bf16
 * order's step takes the odd column first, under DAZ and FTZ (set around the steps, which
 * keep their accumulators in memory, as matmul_bf16_fallback.c explains); the fp32 order's
 * the even column first. A group of 16 outputs past np is loaded under a mask. One row at a
 * time against the whole panel ran at 0.6x the canonical AVX2 GEMM, fp32 and bf16 (on this
 * Zen 4 capped at AVX2, 1020 x 1024 x 1024); this tile at 1.04-1.1x it (fp32). */
#ifndef DG_CPU_MATMUL_PANEL_YMM_H
#define DG_CPU_MATMUL_PANEL_YMM_H

#include <immintrin.h>
#include <string.h>

#include "matmul.h"

#define PANEL_YMM_RM 5

TARGET static inline __attribute__((always_inline)) __m256i panel_ymm_load(const int full, __m256i lm,
                                                                             const uint32_t *p) {
    return full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskload_epi32((const int *)p, lm);
}

/* x's even (odd) column of step s in row i as a broadcast: fp32 values, or (bf16) the
 * halves of a rounded pair. */
TARGET static inline __attribute__((always_inline)) __m256 panel_ymm_x(const int bf16, const void *x, int64_t ldx,
                                                                         int i, int64_t s, int odd) {
    if (!bf16) return _mm256_broadcast_ss((const float *)x + i * ldx + 2 * s + odd);
    uint32_t pair;
    memcpy(&pair, (const uint16_t *)x + i * ldx + 2 * s, sizeof pair);
    return _mm256_castsi256_ps(_mm256_set1_epi32((int)(odd ? pair & 0xffff0000u : pair << 16)));
}

/* acc[i][0 .. 15] = the panel order's sums of rm rows of x against the 16 outputs whose
 * pairs start at w (steps np words apart). */
TARGET static inline __attribute__((always_inline)) void panel_ymm_steps(const int rm, const int bf16, const int full,
                                                                           const void *x, int64_t ldx, const uint32_t *w,
                                                                           int np, int64_t steps, const __m256i lm[2],
                                                                           float acc[][16]) {
    const __m256i odd_mask = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a[PANEL_YMM_RM][2];
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
    for (int64_t s = 0; s < steps; s++) {
        const uint32_t *ws = w + s * np;
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {   /* the order's first column of the pair, then its second */
            const int odd = bf16 ? !h : h;
            const __m256i d0 = panel_ymm_load(full, lm[0], ws), d1 = panel_ymm_load(full, lm[1], ws + 8);
            const __m256 w0 = _mm256_castsi256_ps(odd ? _mm256_and_si256(d0, odd_mask) : _mm256_slli_epi32(d0, 16)),
                         w1 = _mm256_castsi256_ps(odd ? _mm256_and_si256(d1, odd_mask) : _mm256_slli_epi32(d1, 16));
#pragma GCC unroll 8
            for (int i = 0; i < rm; i++) {
                const __m256 xv = panel_ymm_x(bf16, x, ldx, i, s, odd);
                a[i][0] = _mm256_fmadd_ps(xv, w0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(xv, w1, a[i][1]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++) {
        _mm256_storeu_ps(acc[i], a[i][0]);
        _mm256_storeu_ps(acc[i] + 8, a[i][1]);
    }
}

/* NAME: a dg_matmul_panel_tile (BF16 1, T uint16_t) or dg_matmul_panel_f32_tile (0, float),
 * with its group instances NAME##_g1 .. _g5 (whole outputs) and _p1 .. _p5 (under masks),
 * noinline: called between MXCSR writes in the bf16 order. The rows go in as few calls as
 * PANEL_YMM_RM allows, as even as they go (6 rows: 3 and 3). */
#define PANEL_YMM_GROUP(NAME, BF16, RM)                                                         \
    TARGET __attribute__((noinline)) static void NAME##_g##RM(const void *x, int64_t ldx, const uint32_t *w, int np, \
                                                              int64_t steps, const __m256i *lm, float (*acc)[16]) { \
        panel_ymm_steps(RM, BF16, 1, x, ldx, w, np, steps, lm, acc);                            \
    }                                                                                           \
    TARGET __attribute__((noinline)) static void NAME##_p##RM(const void *x, int64_t ldx, const uint32_t *w, int np, \
                                                              int64_t steps, const __m256i *lm, float (*acc)[16]) { \
        panel_ymm_steps(RM, BF16, 0, x, ldx, w, np, steps, lm, acc);                            \
    }
#define PANEL_YMM_TILE(NAME, T, BF16)                                                           \
    PANEL_YMM_GROUP(NAME, BF16, 1) PANEL_YMM_GROUP(NAME, BF16, 2) PANEL_YMM_GROUP(NAME, BF16, 3) \
    PANEL_YMM_GROUP(NAME, BF16, 4) PANEL_YMM_GROUP(NAME, BF16, 5)                              \
    TARGET static void NAME(int rm, const T *x, int64_t ldx, const uint32_t *panel, int np, int64_t steps, float *y, \
                            int64_t ldy, const float *bias) {                                   \
        typedef void group_fn(const void *, int64_t, const uint32_t *, int, int64_t, const __m256i *, float (*)[16]); \
        static group_fn *const whole[PANEL_YMM_RM + 1] = {NAME##_g1, NAME##_g1, NAME##_g2, NAME##_g3, NAME##_g4, \
                                                          NAME##_g5},                           \
                        *const part[PANEL_YMM_RM + 1] = {NAME##_p1, NAME##_p1, NAME##_p2, NAME##_p3, NAME##_p4, \
                                                         NAME##_p5};                            \
        const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                        \
        const int calls = (rm + PANEL_YMM_RM - 1) / PANEL_YMM_RM, per = (rm + calls - 1) / calls; \
        float acc[PANEL_YMM_RM][16];                                                            \
        for (int g = 0; g < np; g += 16) {                                                      \
            const int nn = np - g < 16 ? np - g : 16;                                           \
            const __m256i lm[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(nn), iota),             \
                                   _mm256_cmpgt_epi32(_mm256_set1_epi32(nn - 8), iota)};        \
            for (int i = 0; i < rm; i += per) {                                                 \
                const int r = rm - i < per ? rm - i : per;                                      \
                const unsigned csr = _mm_getcsr();                                              \
                if (BF16) _mm_setcsr(csr | 0x8040u);   /* DAZ and FTZ */                        \
                (nn == 16 ? whole : part)[r](x + i * ldx, ldx, panel + g, np, steps, lm, acc);  \
                if (BF16) _mm_setcsr(csr);                                                      \
                for (int q = 0; q < r; q++)                                                     \
                    for (int j = 0; j < nn; j++)                                                \
                        y[(i + q) * ldy + g + j] = bias ? acc[q][j] + bias[g + j] : acc[q][j];  \
            }                                                                                   \
        }                                                                                       \
    }

#endif
