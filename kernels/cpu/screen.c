/* screen.c — the logit screen: an int8 copy of a weight, bounds on every output of its
 * matmul from it, and the exact outputs of chosen rows (screen.h states the bound and why
 * it holds). */
#include "screen.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "matmul.h"

/* The fp32 value next to a finite f towards +inf (dir 1) or -inf (-1): its bits stepped. */
static inline float step(float f, int dir) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) == 0) u = dir > 0 ? 1u : 0x80000001u;   /* ±0: the smallest denormal */
    else u = (u >> 31) == (dir < 0) ? u + 1 : u - 1;            /* away from zero, or towards it */
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The smallest fp32 value >= v, and the largest <= v (v not NaN). */
static inline float up(double v) {
    const float f = (float)v;
    return (double)f < v ? step(f, 1) : f;
}

static inline float down(double v) {
    const float f = (float)v;
    return (double)f > v ? step(f, -1) : f;
}

/* A row of x as the screen takes it: t, ε = max|δ|, ‖x̃‖₁, ‖δ‖₂, ‖x̃‖₂ and the absolute
 * term; ok 0: NaN bounds. */
typedef struct {
    double t, eps, x1, e2, x2, tiny;
    int    ok;
} x_row;

/* The bounds of output r from its integer sum S (screen.h): a = s_r·t·S, R, then a - R and
 * a + R rounded outwards. The block kernel below does the same operations in the same order
 * (no fused multiply-adds: ISO C mode), so the same bits. */
static inline void bound_one(const dg_screen *sc, int64_t r, int64_t S, const x_row *p, float *lo, float *hi) {
    if (!p->ok) {
        *lo = *hi = NAN;
        return;
    }
    const dg_screen_rows8 *k = &sc->k[r / 8];
    const int l = (int)(r % 8);
    const double a = (double)k->scale[l] * p->t * (double)S,
                 A = (double)k->cx[l] * p->eps + (double)k->c1[l] * p->x1,
                 B = (double)k->cq[l] * p->e2 + (double)k->c2[l] * p->x2,
                 R = (A < B ? A : B) * (1.0 + 0x1p-20) + fabs(a) * 0x1p-50 + p->tiny;
    *lo = down(a - R);
    *hi = up(a + R);
}

/* ---- the integer dot products: S[i] = Σ_c q[c]·xq[i·kp + c], i < mi <= 4, exact ---- */

#define DOT_MR 4

static void dot_portable(int64_t *S, const int8_t *q, const int16_t *xq, int64_t kp, int mi) {
    for (int i = 0; i < mi; i++) {
        int64_t s = 0;
        for (int64_t c = 0; c < kp; c++) s += (int32_t)q[c] * xq[i * kp + c];
        S[i] = s;
    }
}

#define INLINE static inline __attribute__((always_inline))

__attribute__((target("avx2"))) static int64_t hsum_epi32_avx2(__m256i a) {
    __m256i w = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(a)),
                                 _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1)));
    __m128i h = _mm_add_epi64(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    return _mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1);
}

/* 16 columns a step: the int8 widened to int16, VPMADDWD's pairs into 8 int32 lanes; MI a
 * constant where it is inlined (the accumulators in registers). */
__attribute__((target("avx2"))) INLINE void dot_avx2_n(int64_t *S, const int8_t *q, const int16_t *xq, int64_t kp,
                                                        const int MI) {
    __m256i a[DOT_MR];
    for (int i = 0; i < MI; i++) a[i] = _mm256_setzero_si256();
    for (int64_t c = 0; c < kp; c += 16) {
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + c)));
        for (int i = 0; i < MI; i++)
            a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)(xq + i * kp + c))));
    }
    for (int i = 0; i < MI; i++) S[i] = hsum_epi32_avx2(a[i]);
}

__attribute__((target("avx2"))) static void dot_avx2(int64_t *S, const int8_t *q, const int16_t *xq, int64_t kp,
                                                      int mi) {
    switch (mi) {
    case 1: dot_avx2_n(S, q, xq, kp, 1); break;
    case 2: dot_avx2_n(S, q, xq, kp, 2); break;
    case 3: dot_avx2_n(S, q, xq, kp, 3); break;
    default: dot_avx2_n(S, q, xq, kp, 4); break;
    }
}

/* 32 columns a step into 16 int32 lanes (two accumulators a row, even and odd steps: kp is
 * a multiple of 64); the lanes summed in int64. */
__attribute__((target("avx512f,avx512bw"))) INLINE void dot_avx512_n(int64_t *S, const int8_t *q, const int16_t *xq,
                                                                      int64_t kp, const int MI) {
    __m512i a[DOT_MR], b[DOT_MR];
    for (int i = 0; i < MI; i++) a[i] = b[i] = _mm512_setzero_si512();
    for (int64_t c = 0; c < kp; c += 64) {
        const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + c))),
                      w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + c + 32)));
        for (int i = 0; i < MI; i++) {
            a[i] = _mm512_add_epi32(a[i], _mm512_madd_epi16(w0, _mm512_loadu_si512(xq + i * kp + c)));
            b[i] = _mm512_add_epi32(b[i], _mm512_madd_epi16(w1, _mm512_loadu_si512(xq + i * kp + c + 32)));
        }
    }
    for (int i = 0; i < MI; i++) {
        const __m512i l = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(a[i])),
                                           _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a[i], 1))),
                      h = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(b[i])),
                                           _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(b[i], 1)));
        S[i] = _mm512_reduce_add_epi64(_mm512_add_epi64(l, h));
    }
}

__attribute__((target("avx512f,avx512bw"))) static void dot_avx512(int64_t *S, const int8_t *q, const int16_t *xq,
                                                                    int64_t kp, int mi) {
    switch (mi) {
    case 1: dot_avx512_n(S, q, xq, kp, 1); break;
    case 2: dot_avx512_n(S, q, xq, kp, 2); break;
    case 3: dot_avx512_n(S, q, xq, kp, 3); break;
    default: dot_avx512_n(S, q, xq, kp, 4); break;
    }
}

/* The bounds of rows r0 .. r0+7 for one row of x from their sums (block8_vnni's, below):
 * bound_one's operations in its order, eight at a time in double, rounded outwards by the
 * conversion's own rounding mode. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) INLINE void bounds8_vnni(const dg_screen *sc, int64_t r0,
                                                                                 const int32_t *ph, const int32_t *pl,
                                                                                 const x_row *p, float *lo, float *hi) {
    if (!p->ok) {
        _mm256_storeu_ps(lo, _mm256_set1_ps(NAN));
        _mm256_storeu_ps(hi, _mm256_set1_ps(NAN));
        return;
    }
    const dg_screen_rows8 *k = &sc->k[r0 / 8];   /* the eight rows' constants (r0 a multiple of 8) */
    const __m512d scale = _mm512_cvtps_pd(_mm256_load_ps(k->scale)), cx = _mm512_cvtps_pd(_mm256_load_ps(k->cx)),
                  c1 = _mm512_cvtps_pd(_mm256_load_ps(k->c1)), cq = _mm512_cvtps_pd(_mm256_load_ps(k->cq)),
                  c2 = _mm512_cvtps_pd(_mm256_load_ps(k->c2)),
                  qoff = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm256_load_si256((const __m256i *)k->qsum)),
                                       _mm512_set1_pd(128.0));
    const __m512d S = _mm512_add_pd(
        _mm512_mul_pd(_mm512_sub_pd(_mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i *)ph)), qoff),
                      _mm512_set1_pd(256.0)),
        _mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i *)pl)));
    const __m512d a = _mm512_mul_pd(_mm512_mul_pd(scale, _mm512_set1_pd(p->t)), S);
    const __m512d A = _mm512_add_pd(_mm512_mul_pd(cx, _mm512_set1_pd(p->eps)), _mm512_mul_pd(c1, _mm512_set1_pd(p->x1))),
                  B = _mm512_add_pd(_mm512_mul_pd(cq, _mm512_set1_pd(p->e2)), _mm512_mul_pd(c2, _mm512_set1_pd(p->x2)));
    const __m512d R = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(_mm512_min_pd(A, B), _mm512_set1_pd(1.0 + 0x1p-20)),
                                                  _mm512_mul_pd(_mm512_abs_pd(a), _mm512_set1_pd(0x1p-50))),
                                    _mm512_set1_pd(p->tiny));
    _mm256_storeu_ps(lo, _mm512_cvt_roundpd_ps(_mm512_sub_pd(a, R), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    _mm256_storeu_ps(hi, _mm512_cvt_roundpd_ps(_mm512_add_pd(a, R), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
}

/* Up to DOT_MR rows of x against 8 rows of the copy, r0 .. r0+7 (the decode of a few
 * rows), with VPDPBUSD (AVX-512 VNNI: 64 products of an unsigned and a signed byte a zmm).
 * xb holds each row's xq split into its bytes, xq = 256·xh + xl: kp bytes of xl = xq & 255
 * in [0, 255], then kp of xh + 128 in [0, 255], so that
 *     S = 256·(Σ q·(xh + 128) - 128·Σ q) + Σ q·xl,
 * each sum exact in int32 (at most 255·127·kp), S exact in double. W's bytes go to the
 * instruction as they are: per 64 bytes one load and two instructions a row of x, where
 * widening them to int16 for VPMADDWD took 2 loads, 2 widenings, 2 multiplies and 2 adds
 * and kept one core from reading faster than ~19 GB/s. Each row of W to its end before the
 * next: W one sequential stream (eight rows side by side were eight short streams, read at 9
 * GB/s); their bounds by bounds8_vnni. MI a constant where inlined; named accumulators, not
 * an array (GCC kept an array's in memory). One row of x takes block8x2_vnni below. (x in one
 * byte, one instruction a step, was tried: its error, which a byte's 255 levels leave, widened
 * the bounds 2.4x for Gaussian rows, 6x the rows read in full, for 0-4% of the time.) */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) INLINE void block8_vnni_n(const dg_screen *sc, int64_t r0,
                                                                                  const uint8_t *xb, const x_row *p,
                                                                                  float *lo, float *hi, int64_t ld,
                                                                                  const int MI) {
    const int64_t kp = sc->kp;
    const int8_t *q = sc->q + r0 * kp;
    int32_t ph[DOT_MR][8], pl[DOT_MR][8];
    const uint8_t *x0 = xb, *x1 = xb + 2 * kp, *x2 = xb + 4 * kp, *x3 = xb + 6 * kp;
    for (int j = 0; j < 8; j++, q += kp) {
        __m512i h0 = _mm512_setzero_si512(), l0 = h0, h1 = h0, l1 = h0, h2 = h0, l2 = h0, h3 = h0, l3 = h0;
        for (int64_t c = 0; c < kp; c += 64) {
            const __m512i w = _mm512_load_si512(q + c);
#define ACC(h, l, x)                                                \
    h = _mm512_dpbusd_epi32(h, _mm512_load_si512(x + kp + c), w);      \
    l = _mm512_dpbusd_epi32(l, _mm512_load_si512(x + c), w);
            ACC(h0, l0, x0)
            if (MI > 1) { ACC(h1, l1, x1) }
            if (MI > 2) { ACC(h2, l2, x2) }
            if (MI > 3) { ACC(h3, l3, x3) }
#undef ACC
        }
#define SUMS(i, h, l) ph[i][j] = _mm512_reduce_add_epi32(h), pl[i][j] = _mm512_reduce_add_epi32(l);
        SUMS(0, h0, l0)
        if (MI > 1) { SUMS(1, h1, l1) }
        if (MI > 2) { SUMS(2, h2, l2) }
        if (MI > 3) { SUMS(3, h3, l3) }
#undef SUMS
    }
    for (int i = 0; i < MI; i++) bounds8_vnni(sc, r0, ph[i], pl[i], &p[i], lo + i * ld, hi + i * ld);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void block8_vnni(const dg_screen *sc, int64_t r0,
                                                                                const uint8_t *xb, const x_row *p,
                                                                                float *lo, float *hi, int64_t ld, int mi) {
    switch (mi) {
    case 1: block8_vnni_n(sc, r0, xb, p, lo, hi, ld, 1); break;
    case 2: block8_vnni_n(sc, r0, xb, p, lo, hi, ld, 2); break;
    case 3: block8_vnni_n(sc, r0, xb, p, lo, hi, ld, 3); break;
    default: block8_vnni_n(sc, r0, xb, p, lo, hi, ld, 4); break;
    }
}

/* One row of x against rows ra .. ra+7 and rb .. rb+7 of the copy, two sections of a tile
 * read side by side: each loaded step of x serves two rows of W. Two long sequential
 * streams the prefetchers follow (two adjacent rows side by side, interleaved every 64
 * bytes, were read at 12 GB/s), and half of block8_vnni's loads of x, which kept a core at
 * 0.85 of the read loop's rate: measured 29.8-31.2 GB/s against 25.6-28.1 in a throwaway
 * loop. The same sums, so the same bounds. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void block8x2_vnni(const dg_screen *sc, int64_t ra,
                                                                                  int64_t rb, const uint8_t *xb,
                                                                                  const x_row *p, float *lo,
                                                                                  float *hi) {
    const int64_t kp = sc->kp;
    const int8_t *qa = sc->q + ra * kp, *qb = sc->q + rb * kp;
    int32_t pha[8], pla[8], phb[8], plb[8];
    for (int j = 0; j < 8; j++, qa += kp, qb += kp) {
        __m512i ha = _mm512_setzero_si512(), la = ha, hb = ha, lb = ha;
        for (int64_t c = 0; c < kp; c += 64) {
            const __m512i xh = _mm512_load_si512(xb + kp + c), xl = _mm512_load_si512(xb + c),
                          wa = _mm512_load_si512(qa + c), wb = _mm512_load_si512(qb + c);
            ha = _mm512_dpbusd_epi32(ha, xh, wa);
            la = _mm512_dpbusd_epi32(la, xl, wa);
            hb = _mm512_dpbusd_epi32(hb, xh, wb);
            lb = _mm512_dpbusd_epi32(lb, xl, wb);
        }
        pha[j] = _mm512_reduce_add_epi32(ha), pla[j] = _mm512_reduce_add_epi32(la);
        phb[j] = _mm512_reduce_add_epi32(hb), plb[j] = _mm512_reduce_add_epi32(lb);
    }
    bounds8_vnni(sc, ra, pha, pla, p, lo + ra, hi + ra);
    bounds8_vnni(sc, rb, phb, plb, p, lo + rb, hi + rb);
}

typedef void (*dot_fn)(int64_t *S, const int8_t *q, const int16_t *xq, int64_t kp, int mi);
static const dot_fn dots[3] = {dot_portable, dot_avx2, dot_avx512};

/* ---- the scratch --------------------------------------------------------------------------- */

/* The rows of x a call's scratch holds: xq [rows, kp] int16, their x_row, and bf16
 * rounding's k + 32 elements, in c->conv. */
static int bounds_rows(const dg_cpu *c, const dg_screen *sc) {
    const int64_t bytes = c->conv_floats * (int64_t)sizeof(float) - (sc->cols + 32) * 2 - 2 * sc->kp - 192,
                  per = sc->kp * 4 + (int64_t)sizeof(x_row);   /* xq, and its bytes */
    return bytes / per > 4096 ? 4096 : (int)(bytes / per);
}

/* The rows of w matmul_pick copies into c->conv at a time, with their outputs. */
static int pick_rows(const dg_cpu *c, const dg_weight *w) {
    const int64_t row = w->cols * (int64_t)dg_dtype_size(w->dtype),
                  bytes = c->conv_floats * (int64_t)sizeof(float) - 128;
    return (int)(bytes / (row + (int64_t)sizeof(float)));
}

/* ---- the copy ---------------------------------------------------------------------------- */

void dg_cpu_screen_free(dg_screen *sc) {
    if (!sc) return;
    free(sc->q);
    free(sc->k);
    free(sc);
}

/* One row of W (fp32, k values) into the copy's row r; its max |W| into *wmax. 0, or -1
 * when the row holds a value that is not finite. */
static int screen_row(dg_screen *sc, int64_t r, const float *w, double gamma, double *wmax) {
    const int64_t k = sc->cols;
    int8_t *q = sc->q + r * sc->kp;
    double mx = 0.0, e = 0.0, w2 = 0.0, q2 = 0.0, d2 = 0.0;
    int64_t q1 = 0, qs = 0;
    for (int64_t c = 0; c < k; c++) {
        if (!isfinite(w[c])) return -1;
        mx = fabs(w[c]) > mx ? fabs(w[c]) : mx;
    }
    /* Any integer q is correct (its error is measured exactly after), so the rounding is the
     * cheap one: times the reciprocal, and the 1.5·2^52 trick (round to nearest even in
     * double, |w / s| < 2^51); lrint and fmax were calls into libm, 1.7 s for the small
     * lm_head at one thread. */
    const float s = (float)(mx / DG_SCREEN_Q);
    const double inv = s > 0.0f ? 1.0 / s : 0.0;
    for (int64_t c = 0; c < k; c++) {
        long v = (long)(((double)w[c] * inv + 0x1.8p52) - 0x1.8p52);
        v = v > DG_SCREEN_Q ? DG_SCREEN_Q : v < -DG_SCREEN_Q ? -DG_SCREEN_Q : v;
        q[c] = (int8_t)v;
        q1 += v < 0 ? -v : v;
        qs += v;
        /* s·v is exact in double, and so is the difference: where v != 0, |W| >= s/2 and the
         * two span at most 32 bits; where v = 0 it is W itself */
        const double d = (double)w[c] - (double)s * (double)v;
        e = fabs(d) > e ? fabs(d) : e;
        w2 += (double)w[c] * w[c];
        q2 += (double)(v * v);
        d2 += d * d;
    }
    memset(q + k, 0, (size_t)(sc->kp - k));
    dg_screen_rows8 *k8 = &sc->k[r / 8];
    const int l = (int)(r % 8);
    k8->scale[l] = s;
    k8->cx[l] = up((double)s * (double)q1 * (1.0 + 0x1p-40));
    k8->c1[l] = up((e + gamma * mx) * (1.0 + 0x1p-30));
    /* sums of k squares in double: relative errors far below 2^-30 */
    k8->cq[l] = up((double)s * sqrt(q2) * (1.0 + 0x1p-30));
    k8->c2[l] = up((sqrt(d2) + gamma * sqrt(w2)) * (1.0 + 0x1p-30));
    k8->qsum[l] = (int32_t)qs;
    *wmax = mx;
    return 0;
}

int dg_cpu_screen_new(const dg_cpu *c, const dg_weight *w, dg_screen **out, char *err, size_t errlen) {
    const int64_t n = w->rows, k = w->cols, kp = (k + DG_SCREEN_KP - 1) / DG_SCREEN_KP * DG_SCREEN_KP;
    dg_screen *sc = calloc(1, sizeof *sc);
    *out = NULL;
    if (w->kb == DG_WEIGHT_PANELS || k < 1 || n < 1) {
        free(sc);
        snprintf(err, errlen, "logit screen: a %lld x %lld matrix in the %s layout (row-major or blocked only)",
                 (long long)n, (long long)k, w->kb == DG_WEIGHT_PANELS ? "panel" : "given");
        return DG_EINVAL;
    }
    if (!sc) goto nomem;
    sc->rows = n;
    sc->cols = k;
    sc->kp = kp;
    /* rows so long that not one fits the scratch (past 2^21 - 64 columns) would make the
     * bounds' and the pick's chunks 0 rows, and their loops endless: refused here, once at
     * load, where the error has a way back */
    if (bounds_rows(c, sc) < 1 || pick_rows(c, w) < 1) {
        free(sc);
        snprintf(err, errlen, "logit screen: a %lld x %lld matrix: a row of x or of W does not fit the %lld-byte "
                 "scratch", (long long)n, (long long)k, (long long)(c->conv_floats * (int64_t)sizeof(float)));
        return DG_EINVAL;
    }
    sc->bf16_x = c->bf16_compute && w->dtype == DG_DTYPE_BF16;
    const int64_t lane = (kp + 7) / 8 * DG_SCREEN_Q, lv = INT32_MAX / lane;   /* an AVX2 lane's sum fits */
    sc->levels = lv > 32767 ? 32767 : (int)lv;
    sc->isa = c->simd >= DG_CPU_AVX512 && __builtin_cpu_supports("avx512bw") ? 2 : c->simd >= DG_CPU_AVX2 ? 1 : 0;
    sc->vnni = sc->isa == 2 && __builtin_cpu_supports("avx512vnni") && kp * 255 * DG_SCREEN_Q < INT32_MAX;
    /* in 2 MiB pages, as the weights are (cpu_backend.c cpu_alloc): through 4 KiB pages one
     * core read the copy at 20 GB/s, in huge pages at 29 (the read loop's 32) */
    const size_t huge = (size_t)2 << 20, qbytes = ((size_t)(n * kp) + huge - 1) / huge * huge;
    if (sc->levels < 1 || posix_memalign((void **)&sc->q, huge, qbytes)) goto nomem;
    madvise(sc->q, qbytes, MADV_HUGEPAGE);   /* advice: without it the copy still works */
    if (posix_memalign((void **)&sc->k, 64, sizeof *sc->k * (size_t)((n + 7) / 8)))
        goto nomem;
    const double nu = (2.0 * (double)k + 64.0) * 0x1p-24, gamma = nu / (1.0 - nu);
    int64_t bad = -1;
    double wmax = 0.0;
    int fail = 0;
#pragma omp parallel num_threads(c->n_threads) reduction(max : wmax)
    {
        float *row = malloc(sizeof(float) * (size_t)k);
        if (!row) {
#pragma omp atomic write
            fail = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            double mx = 0.0;
            if (!row) continue;
            dg_cpu_rows_f32(c->simd, row, w, r, 1);
            if (screen_row(sc, r, row, gamma, &mx) < 0) {
#pragma omp critical(dg_screen_bad)
                if (bad < 0 || r < bad) bad = r;
            }
            wmax = fmax(wmax, mx);
        }
        free(row);
    }
    if (fail) goto nomem;
    if (bad >= 0) {
        dg_cpu_screen_free(sc);
        snprintf(err, errlen, "logit screen: row %lld of the %lld x %lld matrix holds a value that is not finite",
                 (long long)bad, (long long)n, (long long)k);
        return DG_EINVAL;
    }
    sc->wmax = (float)wmax;
    *out = sc;
    return 0;
nomem:
    dg_cpu_screen_free(sc);
    snprintf(err, errlen, "logit screen: out of memory for a %lld x %lld copy", (long long)n, (long long)kp);
    return DG_ENOMEM;
}

/* ---- the bounds -------------------------------------------------------------------------- */

/* x̃ of one row (k values) quantised into xq[kp]; xb: the bf16 rounding's scratch (k + 32
 * elements) when sc->bf16_x. */
static x_row quantise(const dg_screen *sc, int16_t *xq, uint16_t *xb, const float *x) {
    const int64_t k = sc->cols;
    x_row p = {.t = 1.0, .ok = 1};
    double xmax = 0.0, x1 = 0.0;
    if (sc->bf16_x) dg_matmul_bf16_portable.round(xb, k, x, k, 1, k);   /* matmul.h step 0, its bits */
#define XT(c) (sc->bf16_x ? dg_bf16_to_f32(xb[c]) : x[c])
    for (int64_t c = 0; c < k; c++) {
        const double v = fabs((double)XT(c));
        xmax = fmax(xmax, v);
        x1 += v;
    }
    if (!isfinite(x1) || x1 * (double)sc->wmax > 1e36) {
        p.ok = 0;
        return p;
    }
    float t = (float)(xmax / sc->levels);
    if (!(t > 0.0f)) t = xmax > 0.0 ? (float)xmax : 1.0f;   /* x tiny (or zero): xq in [-1, 1] */
    double eps = 0.0, e2 = 0.0, x2 = 0.0;
    for (int64_t c = 0; c < k; c++) {
        const double v = XT(c);
        long iq = lrint(v / t);
        iq = iq > sc->levels ? sc->levels : iq < -sc->levels ? -sc->levels : iq;
        xq[c] = (int16_t)iq;
        const double d = v - (double)t * (double)iq;
        eps = fmax(eps, fabs(d));
        e2 += d * d;
        x2 += v * v;
    }
    p.t = t;
    p.eps = eps * (1.0 + 0x1p-40);
    p.e2 = sqrt(e2) * (1.0 + 0x1p-30);   /* sums of k squares: relative errors far below 2^-30 */
    p.x2 = sqrt(x2) * (1.0 + 0x1p-30);
#undef XT
    memset(xq + k, 0, sizeof(int16_t) * (size_t)(sc->kp - k));
    p.x1 = x1 * (1.0 + 0x1p-30);   /* a sum of k doubles: relative error far below 2^-30 */
    p.tiny = 0x1p-120 * (p.x1 + 2.0 * (double)k + 64.0);
    return p;
}

void dg_cpu_matmul_bounds(const dg_cpu *c, float *lo, float *hi, const float *x, const dg_screen *sc, int m) {
    const int64_t n = sc->rows, k = sc->cols, kp = sc->kp, tile = 256, n_tiles = (n + tile - 1) / tile;
    const int chunk = bounds_rows(c, sc), nt = n_tiles < c->n_threads ? (int)n_tiles : c->n_threads;
    const dot_fn dot = dots[sc->isa];
    for (int i0 = 0; i0 < m; i0 += chunk) {
        const int mi = m - i0 < chunk ? m - i0 : chunk;
        int16_t *xq = (int16_t *)c->conv;
        x_row *p = (x_row *)(xq + (int64_t)mi * kp);
        uint16_t *xb = (uint16_t *)(p + mi);
        for (int i = 0; i < mi; i++) p[i] = quantise(sc, xq + i * kp, xb, x + (int64_t)(i0 + i) * k);
        uint8_t *bytes = (uint8_t *)(xb + sc->cols + 32);   /* each row's xl and xh + 128 (64-aligned) */
        bytes += (64 - (uintptr_t)bytes % 64) % 64;
        if (sc->vnni)
            for (int i = 0; i < mi; i++)
                for (int64_t j = 0; j < kp; j++) {
                    bytes[2 * i * kp + j] = (uint8_t)(xq[i * kp + j] & 255);
                    bytes[(2 * i + 1) * kp + j] = (uint8_t)((xq[i * kp + j] >> 8) + 128);
                }
        float *l0 = lo + (int64_t)i0 * n, *h0 = hi + (int64_t)i0 * n;
#pragma omp parallel for num_threads(nt) schedule(guided)
        for (int64_t t = 0; t < n_tiles; t++) {
            const int64_t r1 = (t + 1) * tile < n ? (t + 1) * tile : n;
            for (int i = 0; i < mi; i += DOT_MR) {
                const int ri = mi - i < DOT_MR ? mi - i : DOT_MR;
                int64_t r = t * tile;
                if (sc->vnni && mi == 1) {   /* one row of x: the tile's two halves side by side */
                    const int64_t half = (r1 - r) / 16 * 8;
                    for (const int64_t ra = r; r < ra + half; r += 8)
                        block8x2_vnni(sc, r, r + half, bytes, p, l0, h0);
                    r += half;
                }
                if (sc->vnni)   /* eight rows of W at a time against up to 4 of x */
                    for (; r + 8 <= r1; r += 8)
                        block8_vnni(sc, r, bytes + 2 * i * kp, p + i, l0 + i * n + r, h0 + i * n + r, n, ri);
                for (; r < r1; r++) {
                    int64_t S[DOT_MR];
                    dot(S, sc->q + r * kp, xq + i * kp, kp, ri);
                    for (int j = 0; j < ri; j++) bound_one(sc, r, S[j], &p[i + j], l0 + (i + j) * n + r, h0 + (i + j) * n + r);
                }
            }
        }
    }
}

/* ---- the chosen rows, exactly ---------------------------------------------------------- */

/* The rows ids[] of W copied row-major into c->conv, as many as fit at a time, and the
 * matmul run over that matrix: a row's value depends on x, its row of W and k only
 * (matmul.h), so these are the bits of the whole matmul's outputs. */
void dg_cpu_matmul_pick(const dg_cpu *c, float *out, const float *x, const dg_weight *w, const int32_t *ids,
                        int n) {
    const int64_t k = w->cols, es = (int64_t)dg_dtype_size(w->dtype), row = k * es;
    const int per = pick_rows(c, w);
    for (int i0 = 0; i0 < n; i0 += per) {
        const int ni = n - i0 < per ? n - i0 : per;
        char *rows = (char *)c->conv;
        float *y = (float *)(rows + ((int64_t)ni * row + 63) / 64 * 64);
        for (int j = 0; j < ni; j++)
            for (int64_t c0 = 0; c0 < k;) {   /* a run of columns contiguous in either layout */
                const int64_t run = w->kb ? (k - c0 < w->kb - c0 % w->kb ? k - c0 : w->kb - c0 % w->kb) : k;
                memcpy(rows + j * row + c0 * es, dg_weight_at(w, ids[i0 + j], c0), (size_t)(run * es));
                c0 += run;
            }
        const dg_weight view = {.data = rows, .dtype = w->dtype, .rows = ni, .cols = k, .kb = 0};
        dg_cpu_matmul(c, y, x, &view, NULL, 1);
        memcpy(out + i0, y, sizeof(float) * (size_t)ni);
    }
}
