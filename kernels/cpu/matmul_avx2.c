/* matmul_avx2.c — the matmul kernels (canonical order: matmul.h) for AVX2 + FMA + F16C: the
 * 16 lanes in two ymm accumulators (lanes 0-7 and 8-15), so the results equal the AVX-512
 * kernels' bit for bit. Also the GEMV and the panel packing both use.
 *
 * The tile is 3 x 2: its 12 ymm accumulators, the 2 panel vectors of a half step and a row of
 * x use 15 of the 16 registers. A dot-product tile holds one output in two accumulators,
 * where an outer-product GEMM holds eight outputs in one: with 16 registers it streams
 * twice the x per FMA that the AVX-512 tile does, and runs at 76-87% of OpenBLAS's AVX2
 * sgemm on this project's EPYC (77-83 against 88-97 GFLOP/s, one thread, forced to AVX2).
 * This machine uses the AVX-512 kernels. */
#include <immintrin.h>
#include <string.h>

#include "matmul.h"

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))
#define MR 3
#define NR 2

/* matmul.h step 2 on lanes lo = 0-7, hi = 8-15: lanes l + 8, then + 4, + 2, + 1. */
TARGET INLINE float reduce(__m256 lo, __m256 hi) {
    const __m256 b = _mm256_add_ps(lo, hi);
    const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

/* Eight stored weights widened to fp32. */
TARGET INLINE __m256 load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
TARGET INLINE __m256 load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
TARGET INLINE __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

/* Lanes i < n of a mask for _mm256_maskload_ps (n may be <= 0 or >= 8). */
TARGET INLINE __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* ---- GEMV: one row at a time over the span; the tail of k through zero-padded copies ---- */

#define ROWS(NAME, T, LOAD)                                                                     \
    TARGET static void NAME(float *y, const float *x, const dg_weight *w, const float *bias,   \
                            int64_t r0, int64_t r1, int64_t p0, int64_t p1) {                   \
        const int64_t k = w->cols, end = k / 16 * 16, ld = dg_weight_ld(w, p0);                 \
        const int tail = (int)(k % 16);                                                         \
        const T *w0 = (const T *)dg_weight_at(w, 0, p0) - p0;   /* row r: w0 + r·ld, at [p0, p1) */ \
        float xt[16] = {0};                                                                     \
        memcpy(xt, x + end, sizeof(float) * (size_t)tail);                                      \
        for (int64_t r = r0; r < r1; r++) {                                                     \
            const T *wr = w0 + r * ld;                                                          \
            float s = p0 ? y[r] : 0.0f;   /* the sum of the blocks before p0 */                 \
            for (int64_t k0 = p0; k0 < p1; k0 += DG_MATMUL_KB) {                                \
                const int64_t k1 = k0 + DG_MATMUL_KB < end ? k0 + DG_MATMUL_KB : end;           \
                __m256 lo = _mm256_setzero_ps(), hi = lo;                                       \
                for (int64_t j = k0; j < k1; j += 16) {                                         \
                    lo = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), LOAD(wr + j), lo);             \
                    hi = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), LOAD(wr + j + 8), hi);     \
                }                                                                               \
                if (tail && k0 + DG_MATMUL_KB >= k) {                                           \
                    T wt[16] = {0};                                                             \
                    memcpy(wt, wr + end, sizeof(T) * (size_t)tail);                             \
                    lo = _mm256_fmadd_ps(_mm256_loadu_ps(xt), LOAD(wt), lo);                    \
                    hi = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 8), LOAD(wt + 8), hi);            \
                }                                                                               \
                s = k0 == 0 ? reduce(lo, hi) : s + reduce(lo, hi);                              \
            }                                                                                   \
            y[r] = p1 == k && bias ? s + bias[r] : s;                                           \
        }                                                                                       \
    }

ROWS(rows_bf16, uint16_t, load_bf16)
ROWS(rows_f16, uint16_t, load_f16)
ROWS(rows_f32, float, load_f32)

void dg_matmul_rows_avx2(float *y, const float *x, const dg_weight *w, const float *bias, int64_t r0,
                         int64_t r1, int64_t p0, int64_t p1) {
    if (w->dtype == DG_DTYPE_BF16) rows_bf16(y, x, w, bias, r0, r1, p0, p1);
    else if (w->dtype == DG_DTYPE_F16) rows_f16(y, x, w, bias, r0, r1, p0, p1);
    else rows_f32(y, x, w, bias, r0, r1, p0, p1);
}

/* ---- panel packing (dg_matmul_kernels.pack) ---- */

#define PACK_ROW(NAME, T, LOAD)                                                                 \
    TARGET static void NAME(float *panel, const T *src, int nr, int64_t kc) {                   \
        const int64_t steps = kc / 16;                                                          \
        for (int64_t s = 0; s < steps; s++) {                                                   \
            _mm256_store_ps(panel + s * nr * 16, LOAD(src + s * 16));                           \
            _mm256_store_ps(panel + s * nr * 16 + 8, LOAD(src + s * 16 + 8));                   \
        }                                                                                       \
        if (kc % 16) {                                                                          \
            T t[16] = {0};                                                                      \
            memcpy(t, src + steps * 16, sizeof(T) * (size_t)(kc % 16));                         \
            _mm256_store_ps(panel + steps * nr * 16, LOAD(t));                                  \
            _mm256_store_ps(panel + steps * nr * 16 + 8, LOAD(t + 8));                          \
        }                                                                                       \
    }

PACK_ROW(pack_row_bf16, uint16_t, load_bf16)
PACK_ROW(pack_row_f16, uint16_t, load_f16)
PACK_ROW(pack_row_f32, float, load_f32)

TARGET void dg_matmul_pack_avx2(float *panel, const dg_weight *w, int64_t r0, int nn, int nr, int64_t k0,
                                int64_t kc) {
    const int64_t steps = (kc + 15) / 16, ld = dg_weight_ld(w, k0), es = (int64_t)dg_dtype_size(w->dtype);
    const char *w0 = dg_weight_at(w, r0, k0);
    for (int j = 0; j < nr; j++) {
        float *p = panel + j * 16;
        const void *src = j < nn ? w0 + j * ld * es : NULL;
        if (j >= nn) {
            for (int64_t s = 0; s < steps; s++) memset(p + s * nr * 16, 0, sizeof(float) * 16);
        } else if (w->dtype == DG_DTYPE_BF16) {
            pack_row_bf16(p, src, nr, kc);
        } else if (w->dtype == DG_DTYPE_F16) {
            pack_row_f16(p, src, nr, kc);
        } else {
            pack_row_f32(p, src, nr, kc);
        }
    }
}

/* ---- GEMM tile: rm x NR outputs over one block of k (matmul.h dg_matmul_kernels.tile) ---- */

TARGET INLINE void tile_rows(const int rm, const float *x, int64_t ldx, const float *panel, int64_t kc,
                             int flags, float *y, int64_t ldy, int nn, const float *bias) {
    const int64_t steps = kc / 16;
    const int tail = (int)(kc % 16);
    const __m256i mask[2] = {first_lanes(tail), first_lanes(tail - 8)};
    __m256 a[MR][NR][2];
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) a[i][j][0] = a[i][j][1] = _mm256_setzero_ps();
    /* one half k-step: lanes h·8 .. h·8+7 of the panel's NR vectors, then each row of x */
#define HALF_STEP(s, h, LOAD_X)                                                                 \
    do {                                                                                        \
        __m256 wv[NR];                                                                          \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                    \
            wv[j] = _mm256_load_ps(panel + ((s) * NR + j) * 16 + (h) * 8);                      \
        _Pragma("GCC unroll 8") for (int i = 0; i < rm; i++) {                                  \
            __m256 xv = LOAD_X;                                                                 \
            __asm__("" : "+x"(xv)); /* one load of x into a register, not one per FMA */        \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                \
                a[i][j][h] = _mm256_fmadd_ps(xv, wv[j], a[i][j][h]);                            \
        }                                                                                       \
    } while (0)
    for (int64_t s = 0; s < steps; s++) {
        HALF_STEP(s, 0, _mm256_loadu_ps(x + i * ldx + s * 16));
        HALF_STEP(s, 1, _mm256_loadu_ps(x + i * ldx + s * 16 + 8));
    }
    if (tail) {
        HALF_STEP(steps, 0, _mm256_maskload_ps(x + i * ldx + steps * 16, mask[0]));
        HALF_STEP(steps, 1, _mm256_maskload_ps(x + i * ldx + steps * 16 + 8, mask[1]));
    }
#undef HALF_STEP
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) {
            if (j >= nn) continue;
            dg_matmul_store(y + i * ldy + j, reduce(a[i][j][0], a[i][j][1]), flags, bias ? bias + j : NULL);
        }
}

#define TILE(R)                                                                                 \
    TARGET static void tile##R(const float *x, int64_t ldx, const float *panel, int64_t kc, int flags, \
                               float *y, int64_t ldy, int nn, const float *bias) {                 \
        tile_rows(R, x, ldx, panel, kc, flags, y, ldy, nn, bias);                                \
    }
TILE(1) TILE(2) TILE(3)

static void tile(int rm, const float *x, int64_t ldx, const float *panel, int64_t kc, int flags, float *y,
                 int64_t ldy, int nn, const float *bias) {
    static void (*const f[MR + 1])(const float *, int64_t, const float *, int64_t, int, float *, int64_t, int,
                                   const float *) = {tile1, tile1, tile2, tile3};
    f[rm](x, ldx, panel, kc, flags, y, ldy, nn, bias);
}

const dg_matmul_kernels dg_matmul_avx2 = {MR, NR, dg_matmul_rows_avx2, NULL, dg_matmul_pack_avx2, tile};

/* ---- the fp32 panel order's tile (matmul.h; matmul_panel_ymm.h) ---- */
#include "matmul_panel_ymm.h"

PANEL_YMM_TILE(panel_f32, float, 0)

const dg_matmul_panel_f32_tile dg_matmul_panel_f32_avx2 = panel_f32;
