/* matmul_avx512.c — the GEMM tile (canonical order: matmul.h) for AVX-512 F: the 16 lanes
 * in one zmm accumulator, the tail of k by masked loads. The GEMV and the panel packing are
 * the AVX2 file's: the same bits, and for the GEMV faster than one zmm accumulator a row
 * (one chain of 16 lanes: 27-29 GB/s from L3 on an 8.7 MB matrix, against 31-37 for two
 * chains of 8; the same ~21-27 GB/s from memory, which decode streams from).
 *
 * The tile is 4 x 6: 24 zmm accumulators, the 6 panel vectors of a k-step and one row of x
 * fill 31 of the 32 registers; a k-step loads 10 vectors for 24 FMAs. In L1 it runs at
 * ~105 GFLOP/s on this project's EPYC (Zen 4: one zmm FMA a cycle, 115 GFLOP/s at 3.6 GHz). */
#include <immintrin.h>

#include "matmul.h"

#define TARGET __attribute__((target("avx512f,fma,avx2")))
#define INLINE static inline __attribute__((always_inline))
#define MR 4
#define NR 6
#define XPF 12   /* steps of x prefetched ahead */

/* matmul.h step 2: lanes l + 8, then + 4, + 2, + 1. */
TARGET INLINE float reduce(__m512 a) {
    const __m256 b = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

/* ---- GEMM tile: rm x NR outputs over one block of k (matmul.h dg_matmul_kernels.tile) ---- */

TARGET INLINE void tile_rows(const int rm, const float *x, int64_t ldx, const float *panel, int64_t kc,
                             int flags, float *y, int64_t ldy, int nn, const float *bias) {
    const int64_t steps = kc / 16;
    const __mmask16 tail = (__mmask16)((1u << (kc % 16)) - 1);
    __m512 a[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_ps();
    /* one k-step: the panel's NR vectors, then each row of x against them */
#define STEP(s, LOAD_X)                                                                         \
    do {                                                                                        \
        __m512 wv[NR];                                                                          \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                    \
            wv[j] = _mm512_load_ps(panel + ((s) * NR + j) * 16);                                \
        _Pragma("GCC unroll 8") for (int i = 0; i < rm; i++) {                                  \
            const __m512 xv = LOAD_X;                                                           \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                \
                a[i][j] = _mm512_fmadd_ps(xv, wv[j], a[i][j]);                                  \
        }                                                                                       \
    } while (0)
    for (int64_t s = 0; s < steps; s++) {
        /* x XPF steps ahead, running on into the rows of the next tile: each row of the
         * block is a short stream (4 KiB) the hardware prefetcher starts late on (the
         * 896 x 4864 GEMM ran 8% faster with this) */
        const float *pf = s + XPF < steps ? x + (s + XPF) * 16 : x + rm * ldx + (s + XPF - steps) * 16;
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) _mm_prefetch((const char *)(pf + i * ldx), _MM_HINT_T0);
        STEP(s, _mm512_loadu_ps(x + i * ldx + s * 16));
    }
    if (tail) STEP(steps, _mm512_maskz_loadu_ps(tail, x + i * ldx + steps * 16));
#undef STEP
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) {
            if (j >= nn) continue;
            float *o = y + i * ldy + j;
            *o = flags & DG_TILE_FIRST ? reduce(a[i][j]) : *o + reduce(a[i][j]);
            if ((flags & DG_TILE_LAST) && bias) *o += bias[j];
        }
}

#define TILE(R)                                                                                 \
    TARGET static void tile##R(const float *x, int64_t ldx, const float *panel, int64_t kc, int flags, \
                               float *y, int64_t ldy, int nn, const float *bias) {                 \
        tile_rows(R, x, ldx, panel, kc, flags, y, ldy, nn, bias);                                \
    }
TILE(1) TILE(2) TILE(3) TILE(4)

static void tile(int rm, const float *x, int64_t ldx, const float *panel, int64_t kc, int flags, float *y,
                 int64_t ldy, int nn, const float *bias) {
    static void (*const f[MR + 1])(const float *, int64_t, const float *, int64_t, int, float *, int64_t, int,
                                   const float *) = {tile1, tile1, tile2, tile3, tile4};
    f[rm](x, ldx, panel, kc, flags, y, ldy, nn, bias);
}

const dg_matmul_kernels dg_matmul_avx512 = {MR, NR, dg_matmul_rows_avx2, dg_matmul_pack_avx2, tile};
