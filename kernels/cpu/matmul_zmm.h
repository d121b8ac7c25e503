/* matmul_zmm.h — what the AVX-512 kernels of both orders (matmul.h) share: a zmm of 16
 * lanes summed by the order's tree, the end of a tile (steps 2 - 4 into y), and the tile's
 * instances for 1 .. 4 rows of x with their table. Included by matmul_avx512.c (fp32) and
 * matmul_bf16.c (bf16) after each defines TARGET (its instruction sets), INLINE, MR and NR,
 * and tile_rows(rm, x, ldx, panel, kc, flags, y, ldy, nn, bias) over its element type. */
#ifndef DG_CPU_MATMUL_ZMM_H
#define DG_CPU_MATMUL_ZMM_H

#include <immintrin.h>

#include "matmul.h"

/* matmul.h step 2: lanes l + 8, then + 4, + 2, + 1. */
TARGET INLINE float zmm_reduce(__m512 a) {
    const __m256 b = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

/* Steps 2 - 4 for rm rows of x and g outputs a row (the first nn of them stored): y[i·ldy + j]
 * is the block's sum (DG_TILE_FIRST) or y plus it, then plus bias[j] on DG_TILE_LAST. */
TARGET INLINE void zmm_finish(const int rm, const int g, __m512 a[][NR], int flags, float *y, int64_t ldy, int nn,
                              const float *bias) {
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) {
            if (j >= nn) continue;
            dg_matmul_store(y + i * ldy + j, zmm_reduce(a[i][j]), flags, bias ? bias + j : NULL);
        }
}

/* tile1 .. tile4 (tile_rows at a constant rm) and tile(rm, ...) choosing among them, over
 * rows of x and a panel of element type T. */
#define ZMM_TILES(T)                                                                            \
    TARGET static void tile1(const T *x, int64_t ldx, const T *p, int64_t kc, int flags, float *y, int64_t ldy, \
                             int nn, const float *bias) { tile_rows(1, x, ldx, p, kc, flags, y, ldy, nn, bias); } \
    TARGET static void tile2(const T *x, int64_t ldx, const T *p, int64_t kc, int flags, float *y, int64_t ldy, \
                             int nn, const float *bias) { tile_rows(2, x, ldx, p, kc, flags, y, ldy, nn, bias); } \
    TARGET static void tile3(const T *x, int64_t ldx, const T *p, int64_t kc, int flags, float *y, int64_t ldy, \
                             int nn, const float *bias) { tile_rows(3, x, ldx, p, kc, flags, y, ldy, nn, bias); } \
    TARGET static void tile4(const T *x, int64_t ldx, const T *p, int64_t kc, int flags, float *y, int64_t ldy, \
                             int nn, const float *bias) { tile_rows(4, x, ldx, p, kc, flags, y, ldy, nn, bias); } \
    static void tile(int rm, const T *x, int64_t ldx, const T *p, int64_t kc, int flags, float *y, int64_t ldy, \
                     int nn, const float *bias) {                                               \
        static void (*const f[MR + 1])(const T *, int64_t, const T *, int64_t, int, float *, int64_t, int, \
                                       const float *) = {tile1, tile1, tile2, tile3, tile4};   \
        f[rm](x, ldx, p, kc, flags, y, ldy, nn, bias);                                          \
    }

#endif
