/* vector.c — the CPU backend's vector helpers: a dot product, a scaled axpy and the
 * widening of stored rows to fp32 (the embedding look-up, a bf16 KV cache's rows). The matmul
 * is matmul.c. */
#include <immintrin.h>

#include "cpu_kernels.h"
#include "simd_math.h"

#define SIMD __attribute__((target("avx2,fma")))

SIMD static inline __m256 load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

SIMD static void widen_bf16_avx2(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, load_bf16(src + i));
    for (; i < n; i++) dst[i] = dg_bf16_to_f32(src[i]);
}

void dg_cpu_widen_bf16(int simd, float *dst, const uint16_t *src, int64_t n) {
    if (simd) {
        widen_bf16_avx2(dst, src, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) dst[i] = dg_bf16_to_f32(src[i]);
}

void dg_cpu_rows_f32(int simd, float *dst, const dg_weight *w, int64_t r0, int64_t nr) {
    for (int64_t r = r0; r < r0 + nr; r++)   /* a piece of a row at a time: either layout */
        for (int64_t c = 0; c < w->cols; c += DG_WEIGHT_KB) {
            const int64_t n = w->cols - c < DG_WEIGHT_KB ? w->cols - c : DG_WEIGHT_KB;
            float *d = dst + (r - r0) * w->cols + c;
            const void *src = dg_weight_at(w, r, c);
            if (w->dtype == DG_DTYPE_BF16) dg_cpu_widen_bf16(simd, d, src, n);
            else for (int64_t i = 0; i < n; i++) d[i] = dg_load_f32(src, w->dtype, (size_t)i);
        }
}

SIMD static float dot_avx2(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = dg_hsum256(_mm256_add_ps(s0, s1));
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
