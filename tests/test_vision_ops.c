/* The backend operations added for the vision tower and the DiT (attention_segments,
 * gelu, rope_table, gather_rows) against double-precision
 * references written here, on both kernel sets ("cpu", "cpu-scalar").
 *
 * Tolerances: attention is a softmax-weighted mean of values in [-1, 1] after dot products
 * of head_dim <= 80 fp32 terms; fp32 rounding in the products, the online softmax and the
 * final division stays below 1e-5 (2e-5 allowed). GELU: a few ulp of libm's erff,
 * 1e-5 relative + 1e-6 absolute; and relative everywhere, the negative tail included (see
 * gelu_relative_to_the_tail). The rotary and the gather are exact up to one rounding. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "backend.h"
#include "common/device.h"
#include "cpu/attention_bf16.h"
#include "cpu/cpu_backend.h"
#include "cpu/simd_math.h"
#include "duogen.h"

static const char *BACKENDS[] = {"cpu", "cpu-scalar"};

static uint64_t rng = 777;
static float frand(void) {   /* uniform in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

/* Round to nearest even bf16, as fp32 (kernels/cpu/matmul.h step 0; no denormals here). */
static float bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static dg_backend *open_backend(const char *name) {
    dg_backend *be = NULL;
    char err[128];
    if (dg_backend_new(name, 2, &be, err, sizeof err) < 0) test_fail(__FILE__, __LINE__, "%s", err);
    return be;
}

/* Reference: out[i, h] for query row i of segment s, in double. */
static void ref_attention(double *out, const float *q, int q_stride, const float *k, const float *v,
                          int kv_stride, const int32_t *q_cu, const int32_t *kv_cu, int n_seg,
                          int n_heads, int n_kv_heads, int hd, float scale) {
    const int group = n_heads / n_kv_heads;
    for (int s = 0; s < n_seg; s++)
        for (int i = q_cu[s]; i < q_cu[s + 1]; i++)
            for (int h = 0; h < n_heads; h++) {
                const int kh = h / group, nk = kv_cu[s + 1] - kv_cu[s];
                double *o = out + ((int64_t)i * n_heads + h) * hd, mx = -INFINITY, l = 0.0;
                double *sc = malloc(sizeof(double) * (size_t)(nk ? nk : 1));
                for (int j = 0; j < nk; j++) {
                    double d = 0.0;
                    for (int e = 0; e < hd; e++)
                        d += (double)q[(int64_t)i * q_stride + h * hd + e] *
                             k[(int64_t)(kv_cu[s] + j) * kv_stride + kh * hd + e];
                    sc[j] = d * scale;
                    if (sc[j] > mx) mx = sc[j];
                }
                for (int e = 0; e < hd; e++) o[e] = 0.0;
                for (int j = 0; j < nk; j++) {
                    double p = exp(sc[j] - mx);
                    l += p;
                    for (int e = 0; e < hd; e++) o[e] += p * v[(int64_t)(kv_cu[s] + j) * kv_stride + kh * hd + e];
                }
                for (int e = 0; e < hd; e++) o[e] = l > 0 ? o[e] / l : 0.0;
                free(sc);
            }
}

/* Fused QKV rows [n, 3·H·hd] as the vision tower has them, windows of uneven length
 * (one over several query blocks and key tiles, one of one row), and GQA cross-attention with separate
 * buffers, different q and kv lengths and an empty kv segment. */
static void check_attention(dg_backend *be, int fused, int n_heads, int n_kv_heads, int hd,
                            const int32_t *q_cu, const int32_t *kv_cu, int n_seg, double tol) {
    const int nq = q_cu[n_seg], nkv = kv_cu[n_seg], QD = n_heads * hd, KD = n_kv_heads * hd;
    const int q_stride = fused ? QD + 2 * KD : QD, kv_stride = fused ? QD + 2 * KD : KD;
    const int nrows = nq > nkv ? nq : nkv;
    float *qkv = malloc(sizeof(float) * (size_t)nrows * (QD + 2 * KD));
    float *kb = malloc(sizeof(float) * (size_t)nkv * KD), *vb = malloc(sizeof(float) * (size_t)nkv * KD);
    float *out = malloc(sizeof(float) * (size_t)nq * QD);
    double *ref = malloc(sizeof(double) * (size_t)nq * QD);
    for (int64_t i = 0; i < (int64_t)nrows * (QD + 2 * KD); i++) qkv[i] = frand();
    for (int64_t i = 0; i < (int64_t)nkv * KD; i++) { kb[i] = frand(); vb[i] = frand(); }
    const float *q = qkv, *k = fused ? qkv + QD : kb, *v = fused ? qkv + QD + KD : vb;
    const float scale = 1.0f / sqrtf((float)hd);
    be->attention_segments(be, out, q, q_stride, k, v, kv_stride, q_cu, kv_cu, n_seg, n_heads,
                           n_kv_heads, hd, scale);
    if (be->bf16_compute)   /* the reference from the inputs as the bf16 products see them */
        for (int64_t i = 0; i < (int64_t)nrows * (QD + 2 * KD); i++) qkv[i] = bf16_round(qkv[i]);
    if (be->bf16_compute)
        for (int64_t i = 0; i < (int64_t)nkv * KD; i++) { kb[i] = bf16_round(kb[i]); vb[i] = bf16_round(vb[i]); }
    ref_attention(ref, q, q_stride, k, v, kv_stride, q_cu, kv_cu, n_seg, n_heads, n_kv_heads, hd, scale);
    double worst = 0.0;
    for (int64_t i = 0; i < (int64_t)nq * QD; i++) {
        double d = fabs(out[i] - ref[i]);
        if (d > worst) worst = d;
    }
    if (worst > tol)
        test_fail(__FILE__, __LINE__, "%s attention_segments fused=%d: max error %.3g", be->name, fused, worst);
    free(qkv); free(kb); free(vb); free(out); free(ref);
}

TEST(attention_segments_windows_and_cross) {
    for (int b = 0; b < 2; b++) {
        dg_backend *be = open_backend(BACKENDS[b]);
        if (!be) continue;
        /* one segment longer than a query block (128) and a key tile (256) */
        const int32_t win[] = {0, 64, 128, 420, 421, 460};
        check_attention(be, 1, 4, 4, 80, win, win, 5, 2e-5);
        const int32_t q_cu[] = {0, 37, 37, 90}, kv_cu[] = {0, 300, 311, 311};
        check_attention(be, 0, 6, 2, 16, q_cu, kv_cu, 3, 2e-5);
        dg_backend_free(be);
    }
}

/* With bf16 compute: on AVX-512 BF16 the products take bf16 inputs (attention_bf16.h),
 * elsewhere they stay fp32. The reference is computed from q, k, v rounded to bf16 (for the
 * fp32 products that rounding is the whole difference, below the bound too). What remains
 * is the rounding of the probabilities: each weight p_j moves by at most 2^-9 of itself, so
 * an output, a weighted mean of values in [-1, 1], by at most 2^-9 = 1.95e-3; the fp32
 * arithmetic adds < 2e-5 (the test above): 2e-3. The products themselves are checked
 * tightly in attention_bf16_products. */
TEST(attention_segments_bf16_compute) {
    for (int b = 0; b < 2; b++) {
        dg_backend *be = NULL;
        char err[128];
        if (dg_backend_new_opts(BACKENDS[b], &(dg_backend_opts){.n_threads = 2, .cpu_bf16_compute = 1}, &be, err,
                                sizeof err) < 0)
            test_fail(__FILE__, __LINE__, "%s", err);
        const int32_t win[] = {0, 64, 128, 420, 421, 460};
        check_attention(be, 1, 4, 4, 80, win, win, 5, 2e-3);
        const int32_t q_cu[] = {0, 37, 37, 90}, kv_cu[] = {0, 300, 311, 311};
        check_attention(be, 0, 6, 2, 16, q_cu, kv_cu, 3, 2e-3);
        check_attention(be, 0, 2, 2, 128, q_cu, kv_cu, 3, 2e-3);
        /* a segment of two query blocks (512 + 188) over three key tiles, whose keys and
         * values are packed once for both; one of a single row beside it */
        const int32_t long_q[] = {0, 700, 701}, long_kv[] = {0, 600, 611};
        check_attention(be, 0, 4, 2, 128, long_q, long_kv, 2, 2e-3);
        dg_backend_free(be);
    }
}

/* The keys and values of a segment over several query blocks are packed once for all of them
 * (vision_ops.c pack_segments), those of a one-block segment by its task: a row gets the
 * same bits either way, so row r of a 700-query segment equals the row computed as a
 * segment of its own over the same 600 keys. head_dim 80 and 128, GQA; the bf16 products
 * (AVX-512 BF16) and the own fp32 ones (AVX-512 F), where they run. */
static void packed_once_same_bits(int bf16) {
    dg_backend *be = NULL;
    char err[128];
    if (dg_backend_new_opts("cpu", &(dg_backend_opts){.n_threads = 2, .cpu_bf16_compute = bf16}, &be, err,
                            sizeof err) < 0)
        test_fail(__FILE__, __LINE__, "%s", err);
    enum { NQ = 700, NK = 600, H = 4, KVH = 2 };
    const int hds[2] = {80, 128}, rows[6] = {0, 127, 128, 300, 512, 699};
    for (int c = 0; c < 2; c++) {
        const int hd = hds[c];
        float *q = malloc(sizeof(float) * NQ * H * hd), *k = malloc(sizeof(float) * NK * KVH * hd),
              *v = malloc(sizeof(float) * NK * KVH * hd), *out = malloc(sizeof(float) * NQ * H * hd),
              *one = malloc(sizeof(float) * H * hd);
        for (int i = 0; i < NQ * H * hd; i++) q[i] = frand();
        for (int i = 0; i < NK * KVH * hd; i++) { k[i] = frand(); v[i] = frand(); }
        const int32_t q_cu[] = {0, NQ}, kv_cu[] = {0, NK}, one_cu[] = {0, 1};
        const float scale = 1.0f / sqrtf((float)hd);
        be->attention_segments(be, out, q, H * hd, k, v, KVH * hd, q_cu, kv_cu, 1, H, KVH, hd, scale);
        for (int r = 0; r < 6; r++) {
            be->attention_segments(be, one, q + (int64_t)rows[r] * H * hd, H * hd, k, v, KVH * hd, one_cu, kv_cu, 1, H,
                                   KVH, hd, scale);
            if (memcmp(one, out + (int64_t)rows[r] * H * hd, sizeof(float) * H * hd))
                test_fail(__FILE__, __LINE__, "%s, head_dim %d: row %d differs from the row alone",
                          bf16 ? "bf16" : "fp32", hd, rows[r]);
        }
        free(q); free(k); free(v); free(out); free(one);
    }
    dg_backend_free(be);
}

TEST(attention_segments_bf16_packed_once_same_bits) {
    if (!test_cpu_avx512_bf16()) SKIP("%s", TEST_NO_AVX512_BF16);
    packed_once_same_bits(1);
}

TEST(attention_segments_f32_packed_once_same_bits) {
    if (!test_cpu_avx512()) SKIP("%s", TEST_NO_AVX512);
    packed_once_same_bits(0);
}

/* The bf16 products themselves (attention_bf16.h), against double on the rounded inputs:
 * a score is a chain of hd fused steps from 0, an output a chain of 2·ceil(nc/2) steps from
 * its fp32 value, each step one rounding of at most 2^-24 of the partial sum, whose
 * magnitude is at most the sum of the magnitudes Σ: |error| <= (steps + 1)·2^-24·Σ (the one
 * more: the scale's multiply). Products of unrounded fp32 inputs would be off by ~2^-9
 * relative, 10^4 times that. Shapes: head_dim 80 and 128, tiles of 201 keys (odd: a pair
 * with one key; not a multiple of 16 or 64) and 256, 37 and 128 rows (not and a multiple of
 * 4); a row computed alone has the bits it has among the others. Skipped where the CPU has
 * no AVX-512 BF16: these kernels run nowhere else. */
TEST(attention_bf16_products) {
    if (!test_cpu_avx512_bf16()) SKIP("%s", TEST_NO_AVX512_BF16);
    enum { QB = 128, KC = 256, HD_MAX = 128 };
    static float q[QB * HD_MAX], k[KC * HD_MAX], v[KC * HD_MAX], s[QB * KC], s1[KC], p[QB * KC], o[QB * HD_MAX],
        o0[QB * HD_MAX], o1[HD_MAX];
    uint32_t *scratch = aligned_alloc(64, sizeof(uint32_t) * DG_ATT_BF16_WORDS(QB, KC));
    const int hds[2] = {80, 128}, ncs[2] = {201, 256}, nqs[2] = {37, 128};
    for (int c = 0; c < 8; c++) {
        const int hd = hds[c & 1], nc = ncs[(c >> 1) & 1], nq = nqs[c >> 2];
        const float scale = 1.0f / sqrtf((float)hd);
        for (int i = 0; i < nq * hd; i++) q[i] = frand();
        for (int i = 0; i < nc * hd; i++) { k[i] = frand(); v[i] = frand(); }
        for (int i = 0; i < nq * KC; i++) p[i] = 0.5f * (frand() + 1.0f);   /* like probabilities */
        for (int i = 0; i < nq * hd; i++) o0[i] = o[i] = frand();
        dg_att_bf16 a;
        dg_att_bf16_begin(&a, scratch, QB, KC, q, hd, nq, hd);
        dg_att_bf16_tile(&a, k, v, hd, nc);
        dg_att_bf16_scores(&a, s, KC, nc, scale);
        dg_att_bf16_pv(&a, o, p, KC, nc);
        double worst_s = 0, worst_o = 0;   /* error / bound */
        for (int i = 0; i < nq; i++) {
            for (int j = 0; j < nc; j++) {
                double exact = 0, mag = 0;
                for (int d = 0; d < hd; d++) {
                    const double t = (double)bf16_round(q[i * hd + d]) * bf16_round(k[j * hd + d]);
                    exact += t;
                    mag += fabs(t);
                }
                const double e = fabs(s[i * KC + j] - exact * scale) / ((hd + 1) * 0x1p-24 * mag * scale + 1e-30);
                if (e > worst_s) worst_s = e;
            }
            for (int d = 0; d < hd; d++) {
                double exact = o0[i * hd + d], mag = fabs(o0[i * hd + d]);
                for (int j = 0; j < nc; j++) {
                    const double t = (double)bf16_round(p[i * KC + j]) * bf16_round(v[j * hd + d]);
                    exact += t;
                    mag += fabs(t);
                }
                const double e = fabs(o[i * hd + d] - exact) / ((2 * ((nc + 1) / 2) + 1) * 0x1p-24 * mag);
                if (e > worst_o) worst_o = e;
            }
        }
        if (worst_s > 1.0 || worst_o > 1.0)
            test_fail(__FILE__, __LINE__, "hd %d, %d keys, %d rows: scores at %.3g of the bound, outputs at %.3g", hd,
                      nc, nq, worst_s, worst_o);
        /* row 5 alone: the same bits */
        memcpy(o1, o0 + 5 * hd, sizeof(float) * (size_t)hd);
        dg_att_bf16_begin(&a, scratch, QB, KC, q + 5 * hd, hd, 1, hd);
        dg_att_bf16_tile(&a, k, v, hd, nc);
        dg_att_bf16_scores(&a, s1, KC, nc, scale);
        dg_att_bf16_pv(&a, o1, p + 5 * KC, KC, nc);
        CHECK(memcmp(s1, s + 5 * KC, sizeof(float) * (size_t)nc) == 0);
        CHECK(memcmp(o1, o + 5 * hd, sizeof(float) * (size_t)hd) == 0);
    }
    free(scratch);
}

/* dg_exp512 (the bf16 attention's softmax) is dg_exp256 (the fp32 one's) on 16 lanes: the
 * same bits for every x, the clamps at both ends included. AVX-512 only (dg_exp512 runs
 * nowhere else: the bf16 attention needs AVX-512 BF16). */
__attribute__((target("avx512f,avx2,fma"))) static void exp_both(float *e8, float *e16, const float *x, int n) {
    for (int i = 0; i < n; i += 16) {
        _mm256_storeu_ps(e8 + i, dg_exp256(_mm256_loadu_ps(x + i)));
        _mm256_storeu_ps(e8 + i + 8, dg_exp256(_mm256_loadu_ps(x + i + 8)));
        _mm512_storeu_ps(e16 + i, dg_exp512(_mm512_loadu_ps(x + i)));
    }
}

TEST(exp512_is_exp256) {
    if (!test_cpu_avx512_bf16()) SKIP("%s", TEST_NO_AVX512_BF16);
    enum { N = 1 << 16 };
    static float x[N], e8[N], e16[N];
    for (int i = 0; i < N; i++) x[i] = i < N / 2 ? -100.0f + 200.0f * (float)i / (N / 2) : frand() * 30.0f;
    exp_both(e8, e16, x, N);
    CHECK(memcmp(e8, e16, sizeof e8) == 0);
    CHECK_NEAR(e16[N / 4], 1.0, 1e-6);   /* x = 0 */
    float nx[16], n8[16], n16[16];
    for (int i = 0; i < 16; i++) nx[i] = i % 2 ? NAN : 1.0f;
    exp_both(n8, n16, nx, 16);
    for (int i = 0; i < 16; i++) CHECK(i % 2 ? isnan(n8[i]) && isnan(n16[i]) : n8[i] == n16[i]);
}

/* dg_exp512_nonpos (the bf16 attention's softmax) against exp in double for x in [-87, 0]:
 * 2e-6 relative (its polynomial 1.9e-7; the reduction x·log2(e) - n with log2(e) a float
 * 2.2e-8 off moves the result by up to 87·2.2e-8·ln 2 = 1.3e-6 at the low end). Below -87,
 * where the value leaves float's normal range, at most 2^-126 and not negative, 0 at -inf;
 * exp(0) = 1 exactly. */
__attribute__((target("avx512f"))) static void exp_nonpos(float *e, const float *x, int n) {
    for (int i = 0; i < n; i += 16) _mm512_storeu_ps(e + i, dg_exp512_nonpos(_mm512_loadu_ps(x + i)));
}

TEST(exp512_nonpos_relative) {
    if (!test_cpu_avx512_bf16()) SKIP("%s", TEST_NO_AVX512_BF16);
    enum { N = 1 << 18 };
    static float x[N], e[N];
    for (int i = 0; i < N; i++) x[i] = -87.0f * (float)i / (N - 1);
    x[N - 16] = -90.0f, x[N - 15] = -150.0f, x[N - 14] = -1e30f, x[N - 13] = -INFINITY;
    exp_nonpos(e, x, N);
    double worst = 0.0;
    for (int i = 0; i < N - 16; i++) {
        const double r = fabs(e[i] / exp((double)x[i]) - 1.0);
        if (r > worst) worst = r;
    }
    if (worst > 2e-6) test_fail(__FILE__, __LINE__, "relative error %.3g", worst);
    CHECK(e[0] == 1.0f);
    for (int i = N - 16; i < N - 12; i++) CHECK(e[i] >= 0.0f && e[i] <= 0x1p-126f);
    CHECK(e[N - 13] == 0.0f);
    float nx[16], ne[16];
    for (int i = 0; i < 16; i++) nx[i] = i % 3 ? -1.0f : NAN;
    exp_nonpos(ne, nx, 16);
    for (int i = 0; i < 16; i++) CHECK(i % 3 ? ne[i] > 0.36f && ne[i] < 0.37f : isnan(ne[i]));
}

/* A NaN stays a NaN on every kernel set, as in libm's expf and PyTorch: the exps' clamps
 * pass it through (MINPS/MAXPS return their second operand on a NaN), so a key with a NaN
 * gives NaN outputs in the decoder's and the segment attention alike, whatever set runs;
 * the heads that do not see it are finite. (Before, the SIMD sets turned it into 2.4e38 or
 * 0 and answered with finite numbers: an upstream NaN was hidden on the sets in use.) */
TEST(nan_propagates_on_every_kernel_set) {
    enum { HD = 64, NH = 2, NKV = 2, N = 10, BS = 16 };
    const int top = dg_cpu_simd_level();
    for (int set = DG_CPU_PORTABLE; set <= top; set++) {
        dg_backend *be = NULL;
        char err[256];
        if (dg_cpu_backend_new(1, set, set == DG_CPU_AVX512_BF16, &be, err, sizeof err))
            test_fail(__FILE__, __LINE__, "%s", err);
        static float k[BS * NKV * HD], v[BS * NKV * HD];
        float q[NH * HD], o[NH * HD], os[NH * HD];
        rng = 777;
        for (int i = 0; i < N * NKV * HD; i++) k[i] = frand(), v[i] = frand();
        for (int i = 0; i < NH * HD; i++) q[i] = frand();
        k[3 * NKV * HD + 5] = NAN;   /* key 3 of kv head 0: head 0 sees it, head 1 does not */
        int32_t table[1] = {0}, qcu[2] = {0, 1}, kcu[2] = {0, N};
        dg_kv_view kv = {k, v, table, BS, DG_DTYPE_F32};
        be->attention(be, o, q, &kv, N - 1, 1, NH, NKV, HD, 0.125f);
        be->attention_segments(be, os, q, NH * HD, k, v, NKV * HD, qcu, kcu, 1, NH, NKV, HD, 0.125f);
        int nan0 = 1, fin1 = 1;
        for (int d = 0; d < HD; d++) {
            nan0 &= isnan(o[d]) && isnan(os[d]);
            fin1 &= isfinite(o[HD + d]) && isfinite(os[HD + d]);
        }
        if (!nan0 || !fin1)
            test_fail(__FILE__, __LINE__, "kernel set %d: head 0 %s, head 1 %s (decoder %g / %g, segments %g / %g)", set,
                      nan0 ? "NaN" : "NOT NaN", fin1 ? "finite" : "NOT finite", o[0], o[HD], os[0], os[HD]);
        be->free(be);
    }
}

TEST(gelu_erf) {
    enum { N = 1001 };
    float x[N], y[N];
    for (int i = 0; i < N; i++) x[i] = (float)(i - 500) / 50.0f;   /* -10 .. 10 */
    for (int b = 0; b < 2; b++) {
        dg_backend *be = open_backend(BACKENDS[b]);
        if (!be) continue;
        be->gelu(be, y, x, N);
        for (int i = 0; i < N; i++) {
            double r = 0.5 * x[i] * (1.0 + erf(x[i] / sqrt(2.0)));
            CHECK_NEAR(y[i], r, 1e-5 * fabs(r) + 1e-6);
        }
        memcpy(y, x, sizeof y);
        be->gelu(be, y, y, N);   /* in place */
        CHECK_NEAR(y[600], 0.5 * x[600] * (1.0 + erf(x[600] / sqrt(2.0))), 1e-6);
        dg_backend_free(be);
    }
}

/* GELU relative to its value from x = -13 to 13, where the value is 1e-37 at the low end: 1 +
 * erf(x/√2) is computed without a sum that cancels (vision_ops.c). Tolerance: the vector
 * form's fits are within 5.5e-7 relative and its exp 2 ulp (libm's erfcf a few ulp): 2e-6;
 * and z = x·fp32(1/√2) is off the exact x/√2 by up to two roundings (the constant's and the
 * product's, 2^-24 relative each), which move erfc(-z) by 2z² times that, and the vector
 * form rounds z² too: 3e-7·z² added (2.5e-5 at x = -13). Below -13 the
 * value underflows; the kernels give at most 1e-36 there, of the right sign. */
TEST(gelu_relative_to_the_tail) {
    enum { N = 26003 };   /* not a multiple of 8: a masked tail */
    static float x[N], y[N];
    for (int i = 0; i < N; i++) x[i] = -13.0f + 26.0f * (float)i / (N - 1);
    for (int b = 0; b < 2; b++) {
        dg_backend *be = open_backend(BACKENDS[b]);
        if (!be) continue;
        be->gelu(be, y, x, N);
        for (int i = 0; i < N; i++) {
            const double z = x[i] / sqrt(2.0), r = 0.5 * x[i] * erfc(-z);
            if (r == 0.0) CHECK(y[i] == 0.0f);
            else CHECK_NEAR(y[i] / r, 1.0, 2e-6 + 3e-7 * z * z);
        }
        float lo[5] = {-13.5f, -20.0f, -100.0f, -1e30f, -0.0f}, ylo[5];
        be->gelu(be, ylo, lo, 5);
        for (int i = 0; i < 4; i++) CHECK(ylo[i] <= 0.0f && ylo[i] >= -1e-36f);
        CHECK(ylo[4] == 0.0f);
        dg_backend_free(be);
    }
}

/* head_dim 16 (one vector of 8 pairs), 20 (one and a tail of 2), 80 (the vision tower's);
 * within 1e-6 of double (products of |x| < 1 and a unit rotation: a few float ulps), and the
 * vector path equal to the scalar one bit for bit (the same roundings, no fused products). */
TEST(rope_table_strided_rows) {
    enum { M = 7, H = 3, HD_MAX = 80, STRIDE_MAX = 3 * H * HD_MAX };
    static const int HDS[3] = {16, 20, 80};
    static float x[2][M * STRIDE_MAX], x0[M * STRIDE_MAX], cs[M * HD_MAX / 2], sn[M * HD_MAX / 2];
    for (int t = 0; t < 3; t++) {
        const int HD = HDS[t], STRIDE = 3 * H * HD;
        for (int i = 0; i < M * STRIDE; i++) x0[i] = frand();
        for (int i = 0; i < M * HD / 2; i++) {
            double a = frand() * 10.0;
            cs[i] = (float)cos(a);
            sn[i] = (float)sin(a);
        }
        int ran = 0;
        for (int b = 0; b < 2; b++) {
            dg_backend *be = open_backend(BACKENDS[b]);
            if (!be) continue;
            ran++;
            memcpy(x[b], x0, sizeof(float) * M * STRIDE);
            be->rope_table(be, x[b] + H * HD, STRIDE, cs, sn, M, H, HD);   /* the k slice */
            for (int i = 0; i < M; i++)
                for (int col = 0; col < STRIDE; col++) {
                    const int in_k = col >= H * HD && col < 2 * H * HD;
                    double r = x0[i * STRIDE + col];
                    if (in_k) {
                        const int d = (col - H * HD) % HD, base = i * STRIDE + col - d, j = d % (HD / 2);
                        const double c = cs[i * HD / 2 + j], s = sn[i * HD / 2 + j];
                        r = d < HD / 2 ? x0[base + d] * c - x0[base + d + HD / 2] * s
                                       : x0[base + d] * c + x0[base + d - HD / 2] * s;
                    }
                    CHECK_NEAR(x[b][i * STRIDE + col], r, 1e-6);
                }
            dg_backend_free(be);
        }
        CHECK(ran == 2);
        CHECK(memcmp(x[0], x[1], sizeof(float) * M * STRIDE) == 0);
    }
}

TEST(gather_rows_permutes) {
    enum { M = 5, N = 300 };
    float x[M * N], y[M * N];
    const int32_t idx[M] = {3, 0, 4, 4, 1};
    for (int i = 0; i < M * N; i++) x[i] = frand();
    dg_backend *be = open_backend("cpu");
    if (!be) return;
    be->gather_rows(be, y, x, idx, M, N);
    for (int i = 0; i < M; i++) CHECK(memcmp(y + i * N, x + idx[i] * N, sizeof(float) * N) == 0);
    dg_backend_free(be);
}

int main(void) { return test_main(); }
