/* gemv.c — matrix-vector products over stored weights (BF16/F16/F32), dot and axpy.
 *
 * Decode (one token) is memory-bound: every weight byte is read once per token. The
 * kernels therefore read the weights in their stored dtype (bf16: half the bytes of
 * fp32) and widen in registers. OpenBLAS sgemm at M=1 streams weights at a fraction of
 * the bandwidth, hence these kernels. Measured on the 2-core EPYC dev machine: 21-25 GB/s
 * for one thread over a 272 MB bf16 matrix (a plain AVX2 read loop: 22 GB/s). */
#include <immintrin.h>
#include <omp.h>

#include "cpu_kernels.h"

/* ---- portable versions -------------------------------------------------------------- */

static float dot_row_c(const void *w, dg_dtype t, int64_t row, const float *x, int64_t k) {
    float acc[8] = {0};
    int64_t i = 0, base = row * k;
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += dg_load_f32(w, t, (size_t)(base + i + j)) * x[i + j];
    for (; i < k; i++) acc[0] += dg_load_f32(w, t, (size_t)(base + i)) * x[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static void gemv_rows_c(float *y, const float *x, const dg_weight *w, const float *bias, int64_t r0,
                        int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        y[r] = dot_row_c(w->data, w->dtype, r, x, w->cols) + (bias ? bias[r] : 0.0f);
}

/* ---- AVX2 / FMA / F16C -------------------------------------------------------------- */

#define SIMD __attribute__((target("avx2,fma,f16c")))

SIMD static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

SIMD static inline __m256 load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

SIMD static inline __m256 load_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

SIMD static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

/* One instantiation per stored dtype. One row at a time, four accumulators: the weights
 * are then read as one sequential stream. (Four rows side by side, sharing each load of
 * x, read four short interleaved streams of 1.8 KB rows, which the hardware prefetcher
 * follows badly: measured 7.5 GB/s against 21 GB/s for one stream on this machine.) */
#define GEMV_TILE(NAME, T, LOAD, DT)                                                           \
    SIMD static void NAME(float *y, const float *x, const dg_weight *w, const float *bias,    \
                          int64_t r0, int64_t r1) {                                            \
        const int64_t k = w->cols, k32 = k & ~(int64_t)31;                                     \
        for (int64_t r = r0; r < r1; r++) {                                                    \
            const T *wr = (const T *)w->data + r * k;                                          \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                        \
            int64_t i = 0;                                                                     \
            for (; i < k32; i += 32) {                                                         \
                a0 = _mm256_fmadd_ps(LOAD(wr + i), _mm256_loadu_ps(x + i), a0);                \
                a1 = _mm256_fmadd_ps(LOAD(wr + i + 8), _mm256_loadu_ps(x + i + 8), a1);        \
                a2 = _mm256_fmadd_ps(LOAD(wr + i + 16), _mm256_loadu_ps(x + i + 16), a2);      \
                a3 = _mm256_fmadd_ps(LOAD(wr + i + 24), _mm256_loadu_ps(x + i + 24), a3);      \
            }                                                                                  \
            for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(LOAD(wr + i), _mm256_loadu_ps(x + i), a0); \
            float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));    \
            for (; i < k; i++) s += dg_load_f32(w->data, DT, (size_t)(r * k + i)) * x[i];      \
            y[r] = s + (bias ? bias[r] : 0.0f);                                                \
        }                                                                                      \
    }

GEMV_TILE(gemv_rows_bf16, uint16_t, load_bf16, DG_DTYPE_BF16)
GEMV_TILE(gemv_rows_f16, uint16_t, load_f16, DG_DTYPE_F16)
GEMV_TILE(gemv_rows_f32, float, load_f32, DG_DTYPE_F32)

/* ---- entry points --------------------------------------------------------------------- */

void dg_cpu_gemv(const dg_cpu *c, float *y, const float *x, const dg_weight *w, const float *bias) {
    const int64_t n = w->rows;
    /* Tiles of 64 rows handed out dynamically: each thread streams contiguous weight
     * memory, and a thread slowed down by another process (the cores are shared) does
     * not hold the others back, as a static split would. */
    const int64_t tile = 64, n_tiles = (n + tile - 1) / tile;
    void (*rows)(float *, const float *, const dg_weight *, const float *, int64_t, int64_t) =
        !c->simd ? gemv_rows_c
        : w->dtype == DG_DTYPE_BF16 ? gemv_rows_bf16
        : w->dtype == DG_DTYPE_F16 ? gemv_rows_f16 : gemv_rows_f32;
    int nt = n_tiles < c->n_threads ? (int)n_tiles : c->n_threads;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 2)
    for (int64_t t = 0; t < n_tiles; t++) {
        int64_t r1 = (t + 1) * tile < n ? (t + 1) * tile : n;
        rows(y, x, w, bias, t * tile, r1);
    }
}

SIMD static void rows_f32_bf16(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, load_bf16(src + i));
    for (; i < n; i++) dst[i] = dg_load_f32(src, DG_DTYPE_BF16, (size_t)i);
}

void dg_cpu_rows_f32(int simd, float *dst, const dg_weight *w, int64_t r0, int64_t nr) {
    const int64_t n = nr * w->cols, off = r0 * w->cols;
    if (simd && w->dtype == DG_DTYPE_BF16) {
        rows_f32_bf16(dst, (const uint16_t *)w->data + off, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) dst[i] = dg_load_f32(w->data, w->dtype, (size_t)(off + i));
}

SIMD static float dot_avx2(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

float dg_cpu_dot(int simd, const float *a, const float *b, int n) {
    if (simd) return dot_avx2(a, b, n);
    float acc[4] = {0};
    int i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) acc[j] += a[i + j] * b[i + j];
    for (; i < n; i++) acc[0] += a[i] * b[i];
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

SIMD static void scale_axpy_avx2(float *y, float s, float a, const float *x, int n) {
    __m256 vs = _mm256_set1_ps(s), va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_mul_ps(vs, _mm256_loadu_ps(y + i))));
    for (; i < n; i++) y[i] = y[i] * s + a * x[i];
}

void dg_cpu_scale_axpy(int simd, float *y, float s, float a, const float *x, int n) {
    if (simd) { scale_axpy_avx2(y, s, a, x, n); return; }
    for (int i = 0; i < n; i++) y[i] = y[i] * s + a * x[i];
}
