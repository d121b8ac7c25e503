/* matmul_bf16.c — the bf16 compute order's kernels (matmul.h) for AVX-512 BF16: VDPBF16PS
 * (_mm512_dpbf16_ps) is the order's step 1, sixteen lanes of two products in one zmm
 * accumulator; the rounding of x (step 0) is VCVTNEPS2BF16. Neither reads MXCSR, so the
 * results do not depend on the thread's floating-point mode.
 *
 * The GEMM tile reads W from a packed panel, the GEMV of 1 .. 8 rows of x where it lies;
 * both end in the same reduction (finish). The tile is 4 x 6, as the fp32 AVX-512
 * tile: 24 zmm accumulators, the 6 panel vectors of a step and a row of x in 31 of the 32
 * registers; a step loads 10 vectors for 24 VDPBF16PS. In L1 it runs at ~210 GFLOP/s on
 * this project's EPYC (Zen 4, one thread), the fp32 tile at ~108: a VDPBF16PS does the
 * work of two FMAs in the same time. 4 x 6, 6 x 4, 5 x 5 and 8 x 3 measured within 5% of
 * each other, 3 x 8 (33 registers: spills) 20% below. */
#include <immintrin.h>

#include "matmul.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,avx512vl,avx2,fma")))
#define INLINE static inline __attribute__((always_inline))
#define MR 4
#define NR 6
#define XPF 12   /* steps of x prefetched ahead in the tile */
#define ROWS_X 8 /* the most rows of x the core takes (DG_MATMUL_GEMV_ROWS) */

/* matmul.h step 2: lanes l + 8, then + 4, + 2, + 1. */
TARGET INLINE float reduce(__m512 a) {
    const __m256 b = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

/* ---- step 0 (dg_matmul_bf16_kernels.round) ---- */

TARGET static void round_rows(uint16_t *xb, int64_t ldxb, const float *x, int64_t ldx, int m, int64_t kc) {
    const int64_t kp = (kc + 31) / 32 * 32;
    for (int i = 0; i < m; i++)
        for (int64_t c = 0; c < kp; c += 16) {
            const int64_t left = kc - c;
            const __mmask16 mask = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + i * ldx + c));
            _mm256_store_si256((__m256i *)(xb + i * ldxb + c), (__m256i)h);
        }
}

/* ---- the GEMV's accumulation: step 1 for rm rows of x and g rows of W ---- */

/* a[i][j] over `steps` steps of 32 columns: x row i at x + i·ldx (rounded, zero past the
 * block's columns), W row j from w[j] where it lies; then, when tail != 0, one more step
 * whose W is loaded under the mask tail (the columns past k are not read). pf, when not
 * NULL: the next group's g rows (the same columns), prefetched g lines a step, row after
 * row, as one stream at the pace of these (the hardware prefetcher follows several short
 * interleaved streams badly: M = 8 over two rows took 1.6x as long without it). */
TARGET INLINE void accumulate(const int rm, const int g, __m512 a[ROWS_X][NR], const uint16_t *x, int64_t ldx,
                              const uint16_t *const *w, int64_t steps, __mmask32 tail,
                              const uint16_t *const *pf) {
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) a[i][j] = _mm512_setzero_ps();
    const int64_t lines = steps + (tail != 0);
    int64_t po = 0;
    int pr = 0;
    for (int64_t s = 0; s < steps; s++) {
        __m512i wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) wv[j] = _mm512_loadu_si512(w[j] + s * 32);
        if (pf)
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) {
                if (pr < g) _mm_prefetch((const char *)(pf[pr] + po * 32), _MM_HINT_T0);
                if (++po == lines) po = 0, pr++;
            }
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(x + i * ldx + s * 32);
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) a[i][j] = _mm512_dpbf16_ps(a[i][j], xv, (__m512bh)wv[j]);
        }
    }
    if (tail) {
        __m512i wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) wv[j] = _mm512_maskz_loadu_epi16(tail, w[j] + steps * 32);
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(x + i * ldx + steps * 32);
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) a[i][j] = _mm512_dpbf16_ps(a[i][j], xv, (__m512bh)wv[j]);
        }
    }
}

/* Steps 2-4 into y[i·ldy + j], j < nn (of the g computed). */
TARGET INLINE void finish(const int rm, const int g, __m512 a[ROWS_X][NR], int flags, float *y, int64_t ldy,
                          int nn, const float *bias) {
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) {
            if (j >= nn) continue;
            float *o = y + i * ldy + j;
            *o = flags & DG_TILE_FIRST ? reduce(a[i][j]) : *o + reduce(a[i][j]);
            if ((flags & DG_TILE_LAST) && bias) *o += bias[j];
        }
}

/* ---- GEMM tile: rm x NR outputs over one block of k (dg_matmul_bf16_kernels.tile) ---- */

TARGET INLINE void tile_rows(const int rm, const uint16_t *x, int64_t ldx, const uint16_t *panel, int64_t kc,
                             int flags, float *y, int64_t ldy, int nn, const float *bias) {
    const int64_t steps = (kc + 31) / 32;
    __m512 a[ROWS_X][NR];
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < steps; s++) {
        /* x XPF steps ahead, running on into the rows of the next tile: each row of the
         * block is a short stream (4 KiB) the hardware prefetcher starts late on */
        const uint16_t *pf = s + XPF < steps ? x + (s + XPF) * 32 : x + rm * ldx + (s + XPF - steps) * 32;
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) _mm_prefetch((const char *)(pf + i * ldx), _MM_HINT_T0);
        __m512i wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) wv[j] = _mm512_load_si512(panel + (s * NR + j) * 32);
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(x + i * ldx + s * 32);
#pragma GCC unroll 8
            for (int j = 0; j < NR; j++) a[i][j] = _mm512_dpbf16_ps(a[i][j], xv, (__m512bh)wv[j]);
        }
    }
    finish(rm, NR, a, flags, y, ldy, nn, bias);
}

#define TILE(R)                                                                                 \
    TARGET static void tile##R(const uint16_t *x, int64_t ldx, const uint16_t *panel, int64_t kc, int flags, \
                               float *y, int64_t ldy, int nn, const float *bias) {                 \
        tile_rows(R, x, ldx, panel, kc, flags, y, ldy, nn, bias);                                \
    }
TILE(1) TILE(2) TILE(3) TILE(4)

static void tile(int rm, const uint16_t *x, int64_t ldx, const uint16_t *panel, int64_t kc, int flags, float *y,
                 int64_t ldy, int nn, const float *bias) {
    static void (*const f[MR + 1])(const uint16_t *, int64_t, const uint16_t *, int64_t, int, float *, int64_t,
                                   int, const float *) = {tile1, tile1, tile2, tile3, tile4};
    f[rm](x, ldx, panel, kc, flags, y, ldy, nn, bias);
}

/* ---- the GEMV of 1 .. 8 rows of x (dg_matmul_bf16_kernels.rows) ----
 * Groups of G weight rows, read where they lie, each step of a group used by all M rows of
 * x (M·G accumulators). Decode reads its weights from memory, where the hardware
 * prefetcher follows one sequential stream best: for M <= 4 one row at a time (G = 1, no
 * prefetch); for M = 5 .. 8 two, the next two prefetched (one row left the loads of x
 * the limit). Measured on the small preset's matrices (a decode step's 630 MB, one
 * thread, against the fp32 order's GEMVs in the same run): M = 1 1.00-1.06x their time,
 * M = 2 0.9x, M = 4 0.6x, M = 8 0.65-0.7x; four rows a group with the prefetch were 1.2x
 * at M = 2, three 0.72x at M = 8. A group of fewer than G rows repeats its last one
 * (computed, not stored). */
#define ROWS(M, G)                                                                              \
    TARGET static void rows##M(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, const dg_weight *w, \
                               int64_t r0, int64_t r1, int64_t k0, int64_t kc, int flags, const float *bias) { \
        const uint16_t *base = (const uint16_t *)w->data;                                      \
        const int64_t k = w->cols, steps = kc / 32;                                             \
        const __mmask32 tail = (__mmask32)((1ull << (kc % 32)) - 1);                            \
        for (int64_t rb = r0; rb < r1; rb += G) {                                               \
            const uint16_t *wr[G], *nx[G];                                                      \
            for (int j = 0; j < G; j++) {                                                       \
                wr[j] = base + (rb + j < r1 ? rb + j : r1 - 1) * k + k0;                        \
                nx[j] = base + (rb + G + j < r1 ? rb + G + j : r1 - 1) * k + k0;                \
            }                                                                                   \
            __m512 a[ROWS_X][NR];                                                               \
            accumulate(M, G, a, xb, ldxb, wr, steps, tail, G > 1 && rb + G < r1 ? nx : NULL);   \
            finish(M, G, a, flags, y + rb, ldy, (int)(r1 - rb), bias ? bias + rb : NULL);       \
        }                                                                                       \
    }
ROWS(1, 1) ROWS(2, 1) ROWS(3, 1) ROWS(4, 1) ROWS(5, 2) ROWS(6, 2) ROWS(7, 2) ROWS(8, 2)

static void rows(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, int m, const dg_weight *w, int64_t r0,
                 int64_t r1, int64_t k0, int64_t kc, int flags, const float *bias) {
    static void (*const f[ROWS_X + 1])(float *, int64_t, const uint16_t *, int64_t, const dg_weight *, int64_t,
                                       int64_t, int64_t, int64_t, int, const float *) = {
        rows1, rows1, rows2, rows3, rows4, rows5, rows6, rows7, rows8};
    f[m](y, ldy, xb, ldxb, w, r0, r1, k0, kc, flags, bias);
}

const dg_matmul_bf16_kernels dg_matmul_bf16_avx512 = {MR, NR, round_rows, rows, tile};
