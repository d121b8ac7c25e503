/* matmul_zmm.h — what the AVX-512 kernels of both orders (matmul.h) share: a zmm of 16
 * lanes summed by the order's tree, the end of a tile (steps 2 - 4 into y), and the tile's
 * instances for 1 .. 4 rows of x with their table. Included by matmul_avx512.c (fp32) and
 * matmul_bf16.c (bf16) after each defines TARGET (its instruction sets), INLINE, MR and NR,
 * and tile_rows(rm, x, ldx, panel, kc, flags, y, ldy, nn, bias) over its element type. */
#ifndef DG_CPU_MATMUL_ZMM_H
#define DG_CPU_MATMUL_ZMM_H

#include <immintrin.h>

#include "matmul.h"
#include "zmm_reduce.h"

/* Steps 2 - 4 for rm rows of x and g outputs a row (the first nn of them stored): y[i·ldy + j]
 * is the block's sum (DG_TILE_FIRST) or y plus it, then plus bias[j] on DG_TILE_LAST. From 8
 * accumulators the sums are taken 16 at a time and a row of y is written as one masked
 * vector (the 4 x 6 bf16 tile in L1 at k = 640-1280: 193-216 -> 217-225 GFLOP/s; the
 * prefill's GEMMs 1.03-1.08x, the vision tower's 1.01-1.02x); fewer, one by one. */
TARGET INLINE void zmm_finish(const int rm, const int g, __m512 a[][NR], int flags, float *y, int64_t ldy, int nn,
                              const float *bias) {
    if (rm * g >= 8 && rm * g <= 32) {
        __m512 v[32], r[2];
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) v[i * g + j] = a[i][j];
        r[0] = zmm_reduce16(v, rm * g < 16 ? rm * g : 16);
        r[1] = rm * g > 16 ? zmm_reduce16(v + 16, rm * g - 16) : r[0];
        const __mmask16 mask = (__mmask16)((1u << (nn < g ? nn : g)) - 1);
        const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            __m512 o = _mm512_permutex2var_ps(r[0], _mm512_add_epi32(iota, _mm512_set1_epi32(i * g)), r[1]);
            float *yi = y + i * ldy;
            if (!(flags & DG_TILE_FIRST)) o = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, yi), o);
            if ((flags & DG_TILE_LAST) && bias) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mask, bias));
            _mm512_mask_storeu_ps(yi, mask, o);
        }
        return;
    }
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
