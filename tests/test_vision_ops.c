/* The backend operations added for the vision tower and the DiT (attention_segments,
 * gelu, rope_table, gather_rows) against double-precision
 * references written here, on both kernel sets ("cpu", "cpu-scalar").
 *
 * Tolerances: attention is a softmax-weighted mean of values in [-1, 1] after dot products
 * of head_dim <= 80 fp32 terms; fp32 rounding in the products, the online softmax and the
 * final division stays below 1e-5 (2e-5 allowed). GELU: a few ulp of libm's erff,
 * 1e-5 relative + 1e-6 absolute. The rotary and the gather are exact up to one rounding. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "backend.h"
#include "duogen.h"

static const char *BACKENDS[] = {"cpu", "cpu-scalar"};

static uint64_t rng = 777;
static float frand(void) {   /* uniform in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
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
                            const int32_t *q_cu, const int32_t *kv_cu, int n_seg) {
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
    ref_attention(ref, q, q_stride, k, v, kv_stride, q_cu, kv_cu, n_seg, n_heads, n_kv_heads, hd, scale);
    double worst = 0.0;
    for (int64_t i = 0; i < (int64_t)nq * QD; i++) {
        double d = fabs(out[i] - ref[i]);
        if (d > worst) worst = d;
    }
    if (worst > 2e-5)
        test_fail(__FILE__, __LINE__, "%s attention_segments fused=%d: max error %.3g", be->name, fused, worst);
    free(qkv); free(kb); free(vb); free(out); free(ref);
}

TEST(attention_segments_windows_and_cross) {
    for (int b = 0; b < 2; b++) {
        dg_backend *be = open_backend(BACKENDS[b]);
        if (!be) continue;
        /* one segment longer than a query block (128) and a key tile (256) */
        const int32_t win[] = {0, 64, 128, 420, 421, 460};
        check_attention(be, 1, 4, 4, 80, win, win, 5);
        const int32_t q_cu[] = {0, 37, 37, 90}, kv_cu[] = {0, 300, 311, 311};
        check_attention(be, 0, 6, 2, 16, q_cu, kv_cu, 3);
        dg_backend_free(be);
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

TEST(rope_table_strided_rows) {
    enum { M = 7, H = 3, HD = 16, STRIDE = 3 * H * HD };
    float x[M * STRIDE], x0[M * STRIDE], cs[M * HD / 2], sn[M * HD / 2];
    for (int i = 0; i < M * STRIDE; i++) x0[i] = frand();
    for (int i = 0; i < M * HD / 2; i++) {
        double a = frand() * 10.0;
        cs[i] = (float)cos(a);
        sn[i] = (float)sin(a);
    }
    for (int b = 0; b < 2; b++) {
        dg_backend *be = open_backend(BACKENDS[b]);
        if (!be) continue;
        memcpy(x, x0, sizeof x);
        be->rope_table(be, x + H * HD, STRIDE, cs, sn, M, H, HD);   /* the k slice */
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
                CHECK_NEAR(x[i * STRIDE + col], r, 1e-6);
            }
        dg_backend_free(be);
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
