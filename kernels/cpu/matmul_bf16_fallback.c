/* matmul_bf16_fallback.c — the bf16 compute order (matmul.h) where the CPU has no AVX-512
 * BF16: AVX2 + FMA kernels and portable C ones, the same bits as VDPBF16PS, and the panel
 * packing all kernel sets share.
 *
 * A lane step of VDPBF16PS is a fused multiply-add in fp32 (the product of two bf16 is
 * exact) with DAZ on its inputs and FTZ on its result. So the fallback runs its
 * multiply-adds while MXCSR has DAZ and FTZ set, which makes an FMA instruction (or fmaf)
 * that step exactly, the tininess of FTZ included (x86 detects it after rounding, as the
 * instruction does). The flushing must not reach the tree, the block sums and the bias
 * (plain adds in the order), and a compiler may move floating-point arithmetic across an
 * MXCSR write (it does not model the floating-point mode): so the multiply-adds are in
 * functions of their own (noinline), called between the MXCSR writes, which take and
 * leave the accumulators in memory; the sums are done after MXCSR is restored.
 *
 * The AVX2 lanes are two ymm (lanes 0-7 and 8-15); a dword of a rounded row or a weight
 * row is a pair (the even column in its low half), so the odd column as fp32 is the dword
 * with its low half cleared, the even one the dword shifted left by 16. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "matmul.h"

#define TARGET __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))
#define L DG_MATMUL_LANES

/* MXCSR's DAZ (bit 6) and FTZ (bit 15) on; the value to restore. */
static unsigned lane_steps_begin(void) {
    const unsigned old = _mm_getcsr();
    _mm_setcsr(old | 0x8040u);
    return old;
}

/* ---- shared ---- */

void dg_matmul_bf16_pack(uint16_t *panel, const dg_weight *w, int64_t r0, int nn, int nr, int64_t k0,
                         int64_t kc) {
    const int64_t steps = (kc + 31) / 32, ld = dg_weight_ld(w, k0);
    const uint16_t *w0 = dg_weight_at(w, r0, k0);
    for (int j = 0; j < nr; j++) {
        const uint16_t *src = j < nn ? w0 + j * ld : NULL;
        const int64_t full = j < nn ? kc / 32 : 0;
        for (int64_t s = 0; s < full; s++) memcpy(panel + (s * nr + j) * 32, src + s * 32, 64);
        for (int64_t s = full; s < steps; s++) {   /* the tail, and rows past nn */
            uint16_t *p = panel + (s * nr + j) * 32;
            const int64_t n = j < nn ? kc - s * 32 : 0;
            memset(p, 0, 64);
            if (n > 0) memcpy(p, src + s * 32, sizeof(uint16_t) * (size_t)n);
        }
    }
}

/* Step 0 for one element (matmul.h). */
static uint16_t round1(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (!(u & 0x7f800000u)) return (uint16_t)((u >> 16) & 0x8000u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Steps 2-4 from the lanes acc of an output into *o. */
static void finish1(const float acc[L], int flags, float *o, const float *bias) {
    dg_matmul_store(o, dg_matmul_reduce16(acc), flags, bias);
}

/* ---- portable ---- */

static float bf16_at(const uint16_t *p, int64_t i) {
    uint16_t h;
    memcpy(&h, p + i, sizeof h);   /* a weight may not be 2-byte aligned (dtype.h) */
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Step 1 over n columns of one output, on acc (under DAZ and FTZ): x rounded and zero past n
 * up to a multiple of 32, W from w; the columns of W past n read as zeros. */
__attribute__((noinline)) static void steps_portable(float acc[L], const uint16_t *x, const uint16_t *w, int64_t n) {
    for (int64_t c = 0; c < n; c += 32)
        for (int l = 0; l < L; l++) {
            const int64_t j = c + 2 * l;
            acc[l] = fmaf(bf16_at(x, j + 1), j + 1 < n ? bf16_at(w, j + 1) : 0.0f, acc[l]);
            acc[l] = fmaf(bf16_at(x, j), j < n ? bf16_at(w, j) : 0.0f, acc[l]);
        }
}

static void round_portable(uint16_t *xb, int64_t ldxb, const float *x, int64_t ldx, int m, int64_t kc) {
    const int64_t kp = (kc + 31) / 32 * 32;
    for (int i = 0; i < m; i++)
        for (int64_t c = 0; c < kp; c++) xb[i * ldxb + c] = c < kc ? round1(x[i * ldx + c]) : 0;
}

static void rows_portable(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, int m, const dg_weight *w,
                          int64_t r0, int64_t r1, int64_t k0, int64_t kc, const float *bias) {
    const uint16_t *w0 = dg_weight_at(w, 0, k0);   /* row r's column k0 + b: w0 + r·ld + b */
    const int64_t ld = dg_weight_ld(w, k0);
    for (int64_t r = r0; r < r1; r++)
        for (int64_t b = 0; b < kc; b += DG_MATMUL_BF16_KB) {
            const int64_t bc = kc - b < DG_MATMUL_BF16_KB ? kc - b : DG_MATMUL_BF16_KB;
            for (int i = 0; i < m; i++) {
                float acc[L] = {0};
                const unsigned csr = lane_steps_begin();
                steps_portable(acc, xb + i * ldxb + b, w0 + r * ld + b, bc);
                _mm_setcsr(csr);
                finish1(acc, dg_matmul_block_flags(k0 + b, bc, w->cols), y + i * ldy + r, bias ? bias + r : NULL);
            }
        }
}

static void tile_portable(int rm, const uint16_t *xb, int64_t ldxb, const uint16_t *panel, int64_t kc, int flags,
                          float *y, int64_t ldy, int nn, const float *bias) {
    enum { NR = 4 };
    const int64_t steps = (kc + 31) / 32;
    uint16_t wrow[DG_MATMUL_BF16_KB];
    for (int j = 0; j < nn; j++) {
        for (int64_t s = 0; s < steps; s++) memcpy(wrow + s * 32, panel + (s * NR + j) * 32, 64);
        for (int i = 0; i < rm; i++) {
            float acc[L] = {0};
            const unsigned csr = lane_steps_begin();
            steps_portable(acc, xb + i * ldxb, wrow, steps * 32);
            _mm_setcsr(csr);
            finish1(acc, flags, y + i * ldy + j, bias ? bias + j : NULL);
        }
    }
}

const dg_matmul_bf16_kernels dg_matmul_bf16_portable = {4, 4, round_portable, rows_portable, tile_portable};

/* ---- AVX2 + FMA ---- */

/* Step 0 on 8 values: the 32-bit words whose low halves are the bf16. */
TARGET INLINE __m256i round8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i e = _mm256_and_si256(u, _mm256_set1_epi32(0x7f800000));
    const __m256i zero = _mm256_cmpeq_epi32(e, _mm256_setzero_si256());
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i odd = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
    return _mm256_blendv_epi8(r, _mm256_and_si256(hi, _mm256_set1_epi32(0x8000)), zero);
}

TARGET static void round_avx2(uint16_t *xb, int64_t ldxb, const float *x, int64_t ldx, int m, int64_t kc) {
    const int64_t kp = (kc + 31) / 32 * 32;
    for (int i = 0; i < m; i++)
        for (int64_t c = 0; c < kp; c += 16) {
            float t[16] = {0};
            const float *src = x + i * ldx + c;
            if (kc - c < 16) {
                if (kc > c) memcpy(t, src, sizeof(float) * (size_t)(kc - c));
                src = t;
            }
            /* packus interleaves the 128-bit halves: lanes 0-3 of a, 0-3 of b, 4-7 of a, 4-7 of b */
            const __m256i h = _mm256_packus_epi32(round8(_mm256_loadu_ps(src)), round8(_mm256_loadu_ps(src + 8)));
            _mm256_storeu_si256((__m256i *)(xb + i * ldxb + c), _mm256_permute4x64_epi64(h, 0xd8));
        }
}

/* Step 1 for RM rows of x and 2 rows of W over `steps` steps of 32 columns, on the lanes
 * acc[i][j] (in memory, under DAZ and FTZ): x row i at x[i], W row j at w[j] + s·wss. */
#define STEPS(RM)                                                                               \
    TARGET __attribute__((noinline)) static void steps##RM(float *const acc[RM][2], const uint16_t *const x[RM], \
                                                           const uint16_t *const w[2], int64_t wss, int64_t steps) { \
        const __m256i odd_mask = _mm256_set1_epi32((int)0xffff0000u);                          \
        __m256 a[RM][2][2];                                                                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < RM; i++)                                    \
            _Pragma("GCC unroll 8") for (int j = 0; j < 2; j++)                                 \
                _Pragma("GCC unroll 8") for (int h = 0; h < 2; h++) a[i][j][h] = _mm256_loadu_ps(acc[i][j] + h * 8); \
        for (int64_t s = 0; s < steps; s++)                                                     \
            _Pragma("GCC unroll 8") for (int h = 0; h < 2; h++) { /* lanes h·8 .. h·8+7 */      \
                __m256 wo[2], we[2];                                                            \
                _Pragma("GCC unroll 8") for (int j = 0; j < 2; j++) {                           \
                    const __m256i d = _mm256_loadu_si256((const __m256i *)(w[j] + s * wss + h * 16)); \
                    wo[j] = _mm256_castsi256_ps(_mm256_and_si256(d, odd_mask));                 \
                    we[j] = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));                      \
                }                                                                               \
                _Pragma("GCC unroll 8") for (int i = 0; i < RM; i++) {                          \
                    const __m256i d = _mm256_loadu_si256((const __m256i *)(x[i] + s * 32 + h * 16)); \
                    const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(d, odd_mask));       \
                    const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));            \
                    _Pragma("GCC unroll 8") for (int j = 0; j < 2; j++)                         \
                        a[i][j][h] = _mm256_fmadd_ps(xe, we[j], _mm256_fmadd_ps(xo, wo[j], a[i][j][h])); \
                }                                                                               \
            }                                                                                   \
        _Pragma("GCC unroll 8") for (int i = 0; i < RM; i++)                                    \
            _Pragma("GCC unroll 8") for (int j = 0; j < 2; j++)                                 \
                _Pragma("GCC unroll 8") for (int h = 0; h < 2; h++) _mm256_storeu_ps(acc[i][j] + h * 8, a[i][j][h]); \
    }
STEPS(1) STEPS(2)

/* Step 1 for rm <= 2 rows of x (rows of xb, ldxb apart) and 2 rows of W, on acc: the full
 * steps from w[j] + s·wss, then the last one, when tail_w is not NULL, from tail_w[j]
 * (zero-padded copies). */
static void steps_rows(int rm, float *const acc[2][2], const uint16_t *xb, int64_t ldxb, const uint16_t *const w[2],
                       int64_t wss, int64_t steps, const uint16_t *const tail_w[2]) {
    const uint16_t *x[2] = {xb, xb + ldxb}, *xt[2] = {x[0] + steps * 32, x[1] + steps * 32};
    if (rm == 1) steps1(acc, x, w, wss, steps);
    else steps2(acc, x, w, wss, steps);
    if (tail_w && rm == 1) steps1(acc, xt, tail_w, 32, 1);
    else if (tail_w) steps2(acc, xt, tail_w, 32, 1);
}

/* W rows r0 .. r1-1 a chunk of CHUNK at a time, block after block of the span: the lanes of
 * all the chunk's outputs under one MXCSR switch (each switch costs about as much as 20
 * multiply-adds), then the sums. */
static void rows_avx2(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, int m, const dg_weight *w,
                      int64_t r0, int64_t r1, int64_t k0, int64_t kc, const float *bias) {
    enum { CHUNK = 16 };
    float acc[CHUNK + 1][DG_MATMUL_GEMV_ROWS][L];   /* [W row of the chunk][x row]; the last: a
                                                       repeated row's, not stored */
    const uint16_t *w0 = dg_weight_at(w, 0, k0);     /* row r's column k0 + b: w0 + r·ld + b */
    const int64_t ld = dg_weight_ld(w, k0);
    for (int64_t c0 = r0; c0 < r1; c0 += CHUNK) {
        const int nc = r1 - c0 < CHUNK ? (int)(r1 - c0) : CHUNK;
        for (int64_t b = 0; b < kc; b += DG_MATMUL_BF16_KB) {
            const int64_t bc = kc - b < DG_MATMUL_BF16_KB ? kc - b : DG_MATMUL_BF16_KB, steps = bc / 32, tail = bc % 32;
            const int flags = dg_matmul_block_flags(k0 + b, bc, w->cols);
            memset(acc, 0, sizeof acc);
            const unsigned csr = lane_steps_begin();
            for (int j = 0; j < nc; j += 2) {
                const uint16_t *wr[2], *wt[2];
                uint16_t t[2][32] = {{0}};
                for (int q = 0; q < 2; q++) {
                    wr[q] = w0 + (c0 + (j + q < nc ? j + q : j)) * ld + b;
                    memcpy(t[q], wr[q] + steps * 32, sizeof(uint16_t) * (size_t)tail);
                    wt[q] = t[q];
                }
                for (int i = 0; i < m; i += 2) {
                    float *const a[2][2] = {{acc[j][i], acc[j + 1 < nc ? j + 1 : CHUNK][i]},
                                            {acc[j][i + 1 < m ? i + 1 : i], acc[j + 1 < nc ? j + 1 : CHUNK][i + 1 < m ? i + 1 : i]}};
                    steps_rows(m - i < 2 ? 1 : 2, a, xb + i * ldxb + b, ldxb, wr, 32, steps, tail ? wt : NULL);
                }
            }
            _mm_setcsr(csr);
            for (int j = 0; j < nc; j++)
                for (int i = 0; i < m; i++)
                    finish1(acc[j][i], flags, y + i * ldy + c0 + j, bias ? bias + c0 + j : NULL);
        }
    }
}

static void tile_avx2(int rm, const uint16_t *xb, int64_t ldxb, const uint16_t *panel, int64_t kc, int flags,
                      float *y, int64_t ldy, int nn, const float *bias) {
    enum { NR = 2 };
    const uint16_t *w[2] = {panel, panel + 32};
    float acc[2][2][L] = {{{0}}};
    float *const a[2][2] = {{acc[0][0], acc[0][1]}, {acc[1][0], acc[1][1]}};
    const unsigned csr = lane_steps_begin();
    steps_rows(rm, a, xb, ldxb, w, NR * 32, (kc + 31) / 32, NULL);
    _mm_setcsr(csr);
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < nn; j++) finish1(acc[i][j], flags, y + i * ldy + j, bias ? bias + j : NULL);
}

const dg_matmul_bf16_kernels dg_matmul_bf16_avx2 = {2, 2, round_avx2, rows_avx2, tile_avx2};

/* ---- the bf16 panel order (matmul.h): portable, then AVX2 + FMA (matmul_panel_ymm.h) ----
 * Portable: one row of x at a time against the panel, acc[j] (in memory, under DAZ and
 * FTZ) for the panel's np rows, step after step the odd product, then the even one, as the
 * lane step of VDPBF16PS; the bias after MXCSR is restored. */

static float pair_hi(uint32_t d) {   /* the odd column's bf16 as fp32 */
    const uint32_t u = d & 0xffff0000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float pair_lo(uint32_t d) {   /* the even column's */
    const uint32_t u = d << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

__attribute__((noinline)) static void panel_steps_portable(float *acc, const uint16_t *xb, const uint32_t *panel,
                                                           int np, int64_t steps) {
    for (int64_t s = 0; s < steps; s++) {
        uint32_t xp;
        memcpy(&xp, xb + 2 * s, sizeof xp);
        const float xo = pair_hi(xp), xe = pair_lo(xp);
        for (int j = 0; j < np; j++) {
            uint32_t wp;
            memcpy(&wp, panel + s * np + j, sizeof wp);   /* a panel may not be 4-byte aligned */
            acc[j] = fmaf(xo, pair_hi(wp), acc[j]);
            acc[j] = fmaf(xe, pair_lo(wp), acc[j]);
        }
    }
}

static void panel_tile_portable(int rm, const uint16_t *xb, int64_t ldxb, const uint32_t *panel, int np,
                                int64_t steps, float *y, int64_t ldy, const float *bias) {
    for (int i = 0; i < rm; i++) {
        float acc[DG_WEIGHT_PANEL_ROWS] = {0};
        const unsigned csr = lane_steps_begin();
        panel_steps_portable(acc, xb + i * ldxb, panel, np, steps);
        _mm_setcsr(csr);
        for (int j = 0; j < np; j++) y[i * ldy + j] = bias ? acc[j] + bias[j] : acc[j];
    }
}

#include "matmul_panel_ymm.h"

PANEL_YMM_TILE(panel_tile_avx2, uint16_t, 1)

const dg_matmul_panel_tile dg_matmul_panel_portable = panel_tile_portable, dg_matmul_panel_avx2 = panel_tile_avx2;
