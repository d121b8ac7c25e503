/* Every CPU backend operation against a plain double-precision reference written here,
 * for both kernel sets ("cpu": AVX2/FMA or AVX-512 where present, "cpu-scalar": portable);
 * the matmul's row invariance is tests/test_gemm.c.
 *
 * Tolerances: a dot product of k fp32 terms in any summation order is within
 * k·2^-24·Σ|a_i·b_i| of the exact value; the checks use 1e-5·Σ|a_i·b_i| + 1e-6
 * (k <= 300 here gives a bound of 1.8e-5·Σ, and typical errors are far smaller). Element-wise
 * ops (silu, exp, rsqrt, cos/sin) use 1e-5 relative + 1e-6 absolute: a few ulp of libm. Shapes
 * are odd on purpose (37 rows, 83 columns) so that every SIMD tail runs. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/harness.h"
#include "cpu/cpu_backend.h"
#include "backend.h"
#include "dtype.h"
#include "duogen.h"

static const char *BACKENDS[] = {"cpu", "cpu-scalar"};

static uint64_t rng = 12345;
static float frand(void) {   /* uniform in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

/* A weight of the given dtype whose values are exactly representable in it. */
static void *make_weight(dg_dtype t, int64_t n, float *exact) {
    void *p = malloc((size_t)n * dg_dtype_size(t));
    for (int64_t i = 0; i < n; i++) {
        float v = frand();
        if (t == DG_DTYPE_BF16) {
            ((uint16_t *)p)[i] = dg_f32_to_bf16(v);
            exact[i] = dg_bf16_to_f32(((uint16_t *)p)[i]);
        } else if (t == DG_DTYPE_F16) {
            /* f16 with an 8-bit mantissa grid: exactly representable */
            float q = roundf(v * 256.0f) / 256.0f;
            uint32_t bits; memcpy(&bits, &q, 4);
            uint16_t h;
            if (q == 0.0f) h = (uint16_t)(bits >> 16 & 0x8000);
            else h = (uint16_t)((bits >> 16 & 0x8000) | (((bits >> 23 & 0xff) - 112) << 10) | (bits >> 13 & 0x3ff));
            ((uint16_t *)p)[i] = h;
            exact[i] = dg_f16_to_f32(h);
        } else {
            ((float *)p)[i] = v;
            exact[i] = v;
        }
    }
    return p;
}

static void check_matmul(dg_backend *be, dg_dtype t, int m, int n, int k, int with_bias) {
    float *wx = malloc(sizeof(float) * (size_t)n * k), *x = malloc(sizeof(float) * (size_t)m * k);
    float *y = malloc(sizeof(float) * (size_t)m * n), *b = malloc(sizeof(float) * (size_t)n);
    void *wd = make_weight(t, (int64_t)n * k, wx);
    for (int i = 0; i < m * k; i++) x[i] = frand();
    for (int i = 0; i < n; i++) b[i] = frand();
    dg_weight w = {wd, t, n, k, 0};
    be->matmul(be, y, x, &w, with_bias ? b : NULL, m);
    int bad = 0;
    for (int i = 0; i < m && !bad; i++)
        for (int r = 0; r < n && !bad; r++) {
            double ref = with_bias ? b[r] : 0.0, mag = 0.0;
            for (int j = 0; j < k; j++) {
                ref += (double)wx[(int64_t)r * k + j] * x[(int64_t)i * k + j];
                mag += fabs((double)wx[(int64_t)r * k + j] * x[(int64_t)i * k + j]);
            }
            if (fabs(y[(int64_t)i * n + r] - ref) > 1e-5 * mag + 1e-6) {
                test_fail(__FILE__, __LINE__, "%s matmul %s m=%d: y[%d,%d] %.8g vs %.8g", be->name,
                          dg_dtype_name(t), m, i, r, y[(int64_t)i * n + r], ref);
                bad = 1;
            }
        }
    free(wx); free(x); free(y); free(b); free(wd);
}

TEST(matmul_all_dtypes_gemv_and_gemm) {
    for (int bi = 0; bi < 2; bi++) {
        dg_backend *be;
        char err[128];
        CHECK(dg_backend_new(BACKENDS[bi], 2, &be, err, sizeof err) == 0);
        for (int t = 0; t < 3; t++) {
            check_matmul(be, (dg_dtype)t, 1, 37, 83, 1);     /* GEMV with every tail */
            check_matmul(be, (dg_dtype)t, 1, 256, 64, 0);
            check_matmul(be, (dg_dtype)t, 5, 37, 83, 1);     /* GEMM */
            check_matmul(be, (dg_dtype)t, 9, 300, 300, 0);
            check_matmul(be, (dg_dtype)t, 0, 37, 83, 1);     /* no rows: nothing (the GEMM's blocking divided by 0) */
        }
        dg_backend_free(be);
    }
}

TEST(rmsnorm_silu_add_embed) {
    for (int bi = 0; bi < 2; bi++) {
        dg_backend *be;
        char err[128];
        CHECK(dg_backend_new(BACKENDS[bi], 2, &be, err, sizeof err) == 0);
        enum { M = 3, N = 83 };
        float x[M * N], y[M * N], w[N], g[M * N], u[M * N];
        for (int i = 0; i < M * N; i++) { x[i] = frand() * 3; g[i] = frand() * 6; u[i] = frand(); }
        for (int i = 0; i < N; i++) w[i] = 1 + frand() * 0.5f;
        be->rmsnorm(be, y, x, w, M, N, 1e-6f);
        for (int i = 0; i < M; i++) {
            double ss = 0;
            for (int j = 0; j < N; j++) ss += (double)x[i * N + j] * x[i * N + j];
            double r = 1.0 / sqrt(ss / N + 1e-6);
            for (int j = 0; j < N; j++) CHECK_NEAR(y[i * N + j], w[j] * x[i * N + j] * r, 1e-5 * fabs(w[j] * x[i * N + j] * r) + 1e-6);
        }
        be->silu_mul(be, y, g, u, M * N);
        for (int i = 0; i < M * N; i++) {
            double ref = g[i] / (1 + exp(-(double)g[i])) * u[i];
            CHECK_NEAR(y[i], ref, 1e-5 * fabs(ref) + 1e-6);
        }
        memcpy(y, x, sizeof x);
        be->add(be, y, g, M * N);
        for (int i = 0; i < M * N; i++) CHECK(y[i] == x[i] + g[i]);
        float tab_exact[10 * N];
        void *tab = make_weight(DG_DTYPE_BF16, 10 * N, tab_exact);
        dg_weight tw = {tab, DG_DTYPE_BF16, 10, N, 0};
        int32_t ids[M] = {7, 0, 9};
        be->embed(be, y, &tw, ids, M);
        for (int i = 0; i < M; i++)
            CHECK(!memcmp(y + i * N, tab_exact + ids[i] * N, sizeof(float) * N));
        free(tab);
        dg_backend_free(be);
    }
}

TEST(rope_text_and_mrope_sections) {
    enum { M = 4, H = 3, HD = 16 };
    const dg_rope_params ps[2] = {{10000.0f, {8, 0, 0}}, {1000000.0f, {2, 3, 3}}};
    const int32_t pos[3 * M] = {0, 1, 5, 100, 0, 2, 7, 130, 0, 3, 9, 170};
    for (int bi = 0; bi < 2; bi++) {
        dg_backend *be;
        char err[128];
        CHECK(dg_backend_new(BACKENDS[bi], 2, &be, err, sizeof err) == 0);
        for (int pi = 0; pi < 2; pi++) {
            float x[M * H * HD], y[M * H * HD];
            for (int i = 0; i < M * H * HD; i++) x[i] = y[i] = frand();
            be->rope(be, y, pos, M, H, HD, &ps[pi]);
            for (int i = 0; i < M; i++)
                for (int h = 0; h < H; h++)
                    for (int j = 0; j < HD / 2; j++) {
                        const int *s = ps[pi].section;
                        int row = j < s[0] ? 0 : j < s[0] + s[1] ? 1 : 2;
                        double f = 1.0 / pow(ps[pi].theta, 2.0 * j / HD), a = pos[row * M + i] * f;
                        const float *v = x + (i * H + h) * HD;
                        double r0 = v[j] * cos(a) - v[j + HD / 2] * sin(a);
                        double r1 = v[j + HD / 2] * cos(a) + v[j] * sin(a);
                        /* fp32 angle: |pos·f| up to 170 loses ~1e-5 absolute to rounding */
                        CHECK_NEAR(y[(i * H + h) * HD + j], r0, 5e-5);
                        CHECK_NEAR(y[(i * H + h) * HD + j + HD / 2], r1, 5e-5);
                    }
        }
        dg_backend_free(be);
    }
}

/* Causal GQA attention over a block table in scrambled order, after cached positions; with
 * the KV in fp32 and in bf16, at head_dim 8 (on this CPU the AVX2 path: not a multiple of
 * 16) and 64 (the AVX-512 path, attention_zmm.c), the second over 150 keys (three chunks of
 * 64, the last part full). In bf16 the reference takes K and V rounded to bf16 as kv_write
 * stores them, so the same bound holds: the rounding is the only difference. The bound,
 * 1e-5 absolute on outputs of magnitude <= 1: fp32 scores of |s| <= ~11 (error ~1e-6) and a
 * softmax-weighted sum over up to 150 values, against double. */
TEST(attention_paged_gqa_causal) {
    enum { BS = 4, H = 4, KVH = 2, M = 6 };
    const int hds[2] = {8, 64}, pasts[2] = {9, 144};
    for (int hi = 0; hi < 2; hi++)
        for (int bi = 0; bi < 2; bi++)
            for (int ti = 0; ti < 2; ti++) {
                const int HD = hds[hi], KVD = KVH * HD, PAST = pasts[hi], N = PAST + M, NB = (N + BS - 1) / BS;
                const dg_dtype dt = ti ? DG_DTYPE_BF16 : DG_DTYPE_F32;
                dg_backend *be;
                char err[128];
                CHECK(dg_backend_new(BACKENDS[bi], 2, &be, err, sizeof err) == 0);
                CHECK(be->kv_bf16 == 1);
                int32_t *table = malloc(sizeof(int32_t) * NB);
                for (int i = 0; i < NB; i++) table[i] = (i * 5 + 3) % NB;   /* scrambled: 5 is prime to NB */
                void *K = calloc((size_t)NB * BS * KVD, dg_dtype_size(dt)), *Vv = calloc((size_t)NB * BS * KVD, dg_dtype_size(dt));
                float *kx = malloc(sizeof(float) * N * KVD), *vx = malloc(sizeof(float) * N * KVD);
                float *kr = malloc(sizeof(float) * N * KVD), *vr = malloc(sizeof(float) * N * KVD);   /* what the cache holds */
                float *q = malloc(sizeof(float) * M * H * HD), *out = malloc(sizeof(float) * M * H * HD);
                double *sc = malloc(sizeof(double) * N);
                for (int i = 0; i < N * KVD; i++) {
                    kx[i] = frand() * 2 / sqrtf((float)HD / 8);
                    vx[i] = frand();
                    kr[i] = ti ? dg_bf16_to_f32(dg_f32_to_bf16(kx[i])) : kx[i];
                    vr[i] = ti ? dg_bf16_to_f32(dg_f32_to_bf16(vx[i])) : vx[i];
                }
                for (int i = 0; i < M * H * HD; i++) q[i] = frand() * 2;
                dg_kv_view kv = {K, Vv, table, BS, dt};
                be->kv_write(be, &kv, 0, kx, vx, PAST, KVD);
                be->kv_write(be, &kv, PAST, kx + PAST * KVD, vx + PAST * KVD, M, KVD);
                be->attention(be, out, q, &kv, PAST, M, H, KVH, HD, 0.35f);
                for (int i = 0; i < M; i++)
                    for (int h = 0; h < H; h++) {
                        int kvh = h / (H / KVH), n = PAST + i + 1;
                        double mx = -1e30, z = 0;
                        for (int p = 0; p < n; p++) {
                            sc[p] = 0;
                            for (int d = 0; d < HD; d++) sc[p] += (double)q[(i * H + h) * HD + d] * kr[p * KVD + kvh * HD + d];
                            sc[p] *= 0.35;
                            mx = fmax(mx, sc[p]);
                        }
                        for (int p = 0; p < n; p++) z += (sc[p] = exp(sc[p] - mx));
                        for (int d = 0; d < HD; d++) {
                            double ref = 0;
                            for (int p = 0; p < n; p++) ref += sc[p] / z * vr[p * KVD + kvh * HD + d];
                            CHECK_NEAR(out[(i * H + h) * HD + d], ref, 1e-5);
                        }
                    }
                free(table), free(K), free(Vv), free(kx), free(vx), free(kr), free(vr), free(q), free(out), free(sc);
                dg_backend_free(be);
            }
}

/* m-invariance over several key chunks (64 keys each): query i's output from a prefill of m
 * queries must equal, bit for bit, that of a one-query decode at the same position, for F32
 * and BF16 KV, with blocks smaller than a chunk (rows gathered) and larger (F32 read in
 * place). The reference values are checked by attention_paged_gqa_causal above. */
TEST(attention_m_invariant_bits) {
    enum { H = 14, KVH = 2, HD = 64, KVD = KVH * HD, PAST = 100, M = 70 };
    const int bss[2] = {16, 128};
    const int32_t table[12] = {3, 1, 0, 2, 7, 5, 4, 6, 11, 9, 8, 10};
    for (int bi = 0; bi < 2; bi++)
        for (int ti = 0; ti < 2; ti++) {
            const int bs = bss[bi];
            const dg_dtype dt = ti ? DG_DTYPE_BF16 : DG_DTYPE_F32;
            dg_backend *be;
            char err[128];
            CHECK(dg_backend_new("cpu", 2, &be, err, sizeof err) == 0);
            const size_t rows = (size_t)12 * bs;
            void *K = calloc(rows * KVD, dg_dtype_size(dt)), *Vv = calloc(rows * KVD, dg_dtype_size(dt));
            float *kx = malloc(sizeof(float) * (PAST + M) * KVD), *vx = malloc(sizeof(float) * (PAST + M) * KVD);
            float *q = malloc(sizeof(float) * M * H * HD), *out = malloc(sizeof(float) * M * H * HD);
            float one[H * HD];
            for (int i = 0; i < (PAST + M) * KVD; i++) {
                kx[i] = frand() * 2;
                vx[i] = frand();
            }
            for (int i = 0; i < M * H * HD; i++) q[i] = frand() * 2;
            dg_kv_view kv = {K, Vv, table, bs, dt};
            be->kv_write(be, &kv, 0, kx, vx, PAST + M, KVD);
            be->attention(be, out, q, &kv, PAST, M, H, KVH, HD, 0.125f);
            const int probe[3] = {0, 37, M - 1};
            for (int pi = 0; pi < 3; pi++) {
                const int i = probe[pi];
                be->attention(be, one, q + (size_t)i * H * HD, &kv, PAST + i, 1, H, KVH, HD, 0.125f);
                CHECK(memcmp(one, out + (size_t)i * H * HD, sizeof one) == 0);
            }
            free(K);
            free(Vv);
            free(kx);
            free(vx);
            free(q);
            free(out);
            dg_backend_free(be);
        }
}

/* A bf16 cache gives, bit for bit, what an fp32 cache holding its values (K and V rounded to
 * bf16 first) gives: widening is exact, and each path computes the same operations on the
 * same values (the AVX-512 path reads the bf16 rows where they lie and widens them in
 * registers; the others widen them into a buffer). Head_dim 64 and 80 (a multiple of 16
 * that is not of 64), 150 cached keys in blocks of 16 (chunks spanning blocks), blocks of
 * 128 (rows in place), prefill rows and a decode row, both backends. */
TEST(attention_bf16_cache_equals_fp32_cache_of_its_values) {
    enum { H = 14, KVH = 2, PAST = 150, M = 5, N = PAST + M };
    const int hds[2] = {64, 80}, bss[2] = {16, 128};
    for (size_t b = 0; b < sizeof BACKENDS / sizeof BACKENDS[0]; b++)
        for (int hi = 0; hi < 2; hi++)
            for (int bi = 0; bi < 2; bi++) {
                const int HD = hds[hi], KVD = KVH * HD, BS = bss[bi], NB = (N + BS - 1) / BS;
                dg_backend *be;
                char err[128];
                CHECK(dg_backend_new(BACKENDS[b], 2, &be, err, sizeof err) == 0);
                int32_t *table = malloc(sizeof(int32_t) * NB);
                for (int i = 0; i < NB; i++) table[i] = NB - 1 - i;
                float *kx = malloc(sizeof(float) * N * KVD), *vx = malloc(sizeof(float) * N * KVD);
                float *q = malloc(sizeof(float) * M * H * HD), *out[2] = {malloc(sizeof(float) * M * H * HD),
                                                                           malloc(sizeof(float) * M * H * HD)};
                for (int i = 0; i < N * KVD; i++) {   /* bf16 values, so that both caches hold the same */
                    kx[i] = dg_bf16_to_f32(dg_f32_to_bf16(frand() * 2));
                    vx[i] = dg_bf16_to_f32(dg_f32_to_bf16(frand()));
                }
                for (int i = 0; i < M * H * HD; i++) q[i] = frand() * 2;
                void *pools[2][2];
                for (int ti = 0; ti < 2; ti++) {
                    const dg_dtype dt = ti ? DG_DTYPE_BF16 : DG_DTYPE_F32;
                    pools[ti][0] = calloc((size_t)NB * BS * KVD, dg_dtype_size(dt));
                    pools[ti][1] = calloc((size_t)NB * BS * KVD, dg_dtype_size(dt));
                    dg_kv_view kv = {pools[ti][0], pools[ti][1], table, BS, dt};
                    be->kv_write(be, &kv, 0, kx, vx, N, KVD);
                    be->attention(be, out[ti], q, &kv, PAST, M - 1, H, KVH, HD, 0.125f);      /* prefill rows */
                    be->attention(be, out[ti] + (size_t)(M - 1) * H * HD, q + (size_t)(M - 1) * H * HD, &kv,
                                  PAST + M - 1, 1, H, KVH, HD, 0.125f);                      /* a decode row */
                }
                if (memcmp(out[0], out[1], sizeof(float) * M * H * HD))
                    test_fail(__FILE__, __LINE__, "%s head_dim %d blocks of %d: a bf16 cache differs from an fp32 cache "
                              "of its values", BACKENDS[b], HD, BS);
                for (int ti = 0; ti < 2; ti++) free(pools[ti][0]), free(pools[ti][1]), free(out[ti]);
                free(table), free(kx), free(vx), free(q);
                dg_backend_free(be);
            }
}

/* attention_batch: five sequences of different histories and new rows (decode rows, a
 * prefill chunk, an empty history, one spanning blocks), each in its own blocks of one pool,
 * in one call: the pools and every output row the same bits as kv_write + attention per
 * sequence (dg_attention_batch's composition), in F32 and BF16 KV, on both backends. */
TEST(attention_batch_equals_each_sequence) {
    enum { H = 8, KVH = 2, HD = 64, KVD = KVH * HD, QD = H * HD, BS = 16, NSEQ = 5, PER = 8 };
    static const int past[NSEQ] = {37, 0, 100, 5, 16}, rows[NSEQ] = {1, 20, 1, 3, 1};
    int n = 0;
    for (int i = 0; i < NSEQ; i++) n += rows[i];
    int32_t tables[NSEQ][PER];
    for (int i = 0; i < NSEQ; i++)   /* sequence i owns blocks i, i + 5, i + 10, ... shuffled */
        for (int b = 0; b < PER; b++) tables[i][b] = ((b * 3) % PER) * NSEQ + i;
    const size_t pool = (size_t)NSEQ * PER * BS * KVD;
    float *q = malloc(sizeof(float) * n * QD), *k = malloc(sizeof(float) * n * KVD), *v = malloc(sizeof(float) * n * KVD);
    float *hist = malloc(sizeof(float) * 100 * KVD), *outs[2];
    for (int i = 0; i < n * QD; i++) q[i] = frand() * 2;
    for (int i = 0; i < n * KVD; i++) k[i] = frand() * 2, v[i] = frand();
    for (int i = 0; i < 100 * KVD; i++) hist[i] = frand();
    for (size_t b = 0; b < sizeof BACKENDS / sizeof BACKENDS[0]; b++)
        for (int ti = 0; ti < 2; ti++) {
            const dg_dtype dt = ti ? DG_DTYPE_BF16 : DG_DTYPE_F32;
            dg_backend *be;
            char err[128];
            CHECK(dg_backend_new(BACKENDS[b], 2, &be, err, sizeof err) == 0);
            CHECK(be->attention_batch != NULL);
            void *pools[2][2];
            for (int way = 0; way < 2; way++) {   /* 0: one attention_batch call; 1: per sequence */
                pools[way][0] = calloc(pool, dg_dtype_size(dt));
                pools[way][1] = calloc(pool, dg_dtype_size(dt));
                outs[way] = malloc(sizeof(float) * n * QD);
                dg_attn_seq seqs[NSEQ];
                for (int i = 0; i < NSEQ; i++) {
                    seqs[i] = (dg_attn_seq){{pools[way][0], pools[way][1], tables[i], BS, dt}, past[i], rows[i]};
                    be->kv_write(be, &seqs[i].kv, 0, hist, hist, past[i], KVD);   /* the history */
                }
                if (way == 0) {
                    be->attention_batch(be, outs[0], q, k, v, seqs, NSEQ, H, KVH, HD, 0.125f);
                } else {
                    dg_backend plain = *be;   /* the same backend without the member: the helper's composition */
                    plain.attention_batch = NULL;
                    dg_attention_batch(&plain, outs[1], q, k, v, seqs, NSEQ, H, KVH, HD, 0.125f);
                }
            }
            CHECK(memcmp(pools[0][0], pools[1][0], pool * dg_dtype_size(dt)) == 0);
            CHECK(memcmp(pools[0][1], pools[1][1], pool * dg_dtype_size(dt)) == 0);
            CHECK(memcmp(outs[0], outs[1], sizeof(float) * n * QD) == 0);
            for (int way = 0; way < 2; way++) free(pools[way][0]), free(pools[way][1]), free(outs[way]);
            dg_backend_free(be);
        }
    free(q), free(k), free(v), free(hist);
}

TEST(dtype_conversions) {
    CHECK(dg_bf16_to_f32(0x3f80) == 1.0f);
    CHECK(dg_f32_to_bf16(1.0f) == 0x3f80);
    CHECK(dg_f32_to_bf16(1.00390625f) == 0x3f80);       /* halfway: to even */
    CHECK(dg_f32_to_bf16(1.01171875f) == 0x3f82);       /* halfway: to even (up) */
    CHECK(dg_f16_to_f32(0x3c00) == 1.0f);
    CHECK(dg_f16_to_f32(0xc000) == -2.0f);
    CHECK(dg_f16_to_f32(0x0001) == ldexpf(1.0f, -24));  /* smallest subnormal */
    CHECK(isinf(dg_f16_to_f32(0x7c00)));
}

TEST(unknown_backend_is_refused) {
    dg_backend *be;
    char err[128];
    CHECK_EQ_INT(dg_backend_new("tpu:0", 1, &be, err, sizeof err), DG_EINVAL);
    CHECK(be == NULL && strstr(err, "tpu:0") != NULL);
}

TEST(table_check_names_missing_members) {
    for (int bi = 0; bi < 2; bi++) {
        dg_backend *be;
        char err[256];
        CHECK(dg_backend_new(BACKENDS[bi], 1, &be, err, sizeof err) == 0);
        CHECK_EQ_INT(dg_backend_check(be, err, sizeof err), 0);
        dg_backend copy = *be;   /* the fused forms and graphs may be absent */
        copy.matmul_parts = NULL;
        copy.matmul_swiglu = NULL;
        copy.add_rmsnorm = NULL;
        copy.graph_run = NULL;
        copy.graph_release = NULL;
        CHECK_EQ_INT(dg_backend_check(&copy, err, sizeof err), 0);
        copy.fork = NULL;
        CHECK_EQ_INT(dg_backend_check(&copy, err, sizeof err), DG_EINTERNAL);
        CHECK(strstr(err, BACKENDS[bi]) && strstr(err, "no fork"));
        copy.conv3d = NULL;
        CHECK_EQ_INT(dg_backend_check(&copy, err, sizeof err), DG_EINTERNAL);
        CHECK(strstr(err, "fork, conv3d") != NULL);
        copy.topk = NULL;   /* the sampling pair is optional, but only as a pair */
        CHECK_EQ_INT(dg_backend_check(&copy, err, sizeof err), DG_EINTERNAL);
        CHECK(strstr(err, "fork, conv3d, topk (it comes with logits_adjust)") != NULL);
        copy.fork = be->fork;
        copy.conv3d = be->conv3d;
        copy.logits_adjust = NULL;
        CHECK_EQ_INT(dg_backend_check(&copy, err, sizeof err), 0);
        dg_backend *f;
        CHECK_EQ_INT(dg_backend_fork(be, &f, err, sizeof err), 0);
        CHECK(f && f != be && f->impl != be->impl && !strcmp(f->name, be->name) && f->n_threads == 1);
        dg_backend_free(f);
        dg_backend_free(be);
    }
}

/* ---- forks: the ops that use the backend's scratch, on two threads at once ---------------- */

enum { FK_M = 9, FK_N = 300, FK_K = 300, FK_C = 16, FK_PLANE = 48 * 48, FK_ROUNDS = 12 };

typedef struct {
    dg_backend     *be;
    const dg_weight *w;          /* bf16: GEMM through the conversion scratch */
    const float    *x, *cw, *qkv;
    float           y[FK_M * FK_N];
    float           conv[FK_C * FK_PLANE];
    float           att[FK_C * FK_PLANE];
    const float    *ref_y, *ref_conv, *ref_att;   /* NULL: this run is the reference */
    int             differ;
} fork_run;

static const dg_conv3d_shape FK_CONV = {FK_C, FK_C, 1, 48, 48, 1, 3, 3, 1, 1, 1, 0, 1, 1, 1, 1};

static void *fork_ops(void *arg) {
    fork_run *r = arg;
    for (int i = 0; i < (r->ref_y ? FK_ROUNDS : 1); i++) {
        r->be->matmul(r->be, r->y, r->x, r->w, NULL, FK_M);
        r->be->conv3d(r->be, r->conv, r->qkv, r->cw, NULL, &FK_CONV);
        r->be->spatial_attention(r->be, r->att, r->qkv, FK_C, FK_PLANE);
        if (r->ref_y && (memcmp(r->y, r->ref_y, sizeof r->y) || memcmp(r->conv, r->ref_conv, sizeof r->conv) ||
                         memcmp(r->att, r->ref_att, sizeof r->att)))
            r->differ++;
    }
    return NULL;
}

/* Two forks of one backend, each on its own thread, give the parent's bits on every round:
 * their scratch is their own (a shared one would mix the threads' GEMM slabs, im2col tiles
 * and score tiles). */
TEST(forks_on_two_threads_give_the_same_bits) {
    for (int bi = 0; bi < 2; bi++) {
        dg_backend *be, *f[2];
        char err[256];
        CHECK(dg_backend_new(BACKENDS[bi], 2, &be, err, sizeof err) == 0);
        CHECK(dg_backend_fork(be, &f[0], err, sizeof err) == 0);
        CHECK(dg_backend_fork(be, &f[1], err, sizeof err) == 0);
        float *wx = malloc(sizeof(float) * FK_N * FK_K), *x = malloc(sizeof(float) * FK_M * FK_K);
        float *cw = malloc(sizeof(float) * FK_C * FK_C * 9), *qkv = malloc(sizeof(float) * 3 * FK_C * FK_PLANE);
        void *wd = make_weight(DG_DTYPE_BF16, (int64_t)FK_N * FK_K, wx);
        for (int i = 0; i < FK_M * FK_K; i++) x[i] = frand();
        for (int i = 0; i < FK_C * FK_C * 9; i++) cw[i] = frand() * 0.1f;
        for (int i = 0; i < 3 * FK_C * FK_PLANE; i++) qkv[i] = frand();
        dg_weight w = {wd, DG_DTYPE_BF16, FK_N, FK_K, 0};
        fork_run *ref = calloc(1, sizeof *ref), *run = calloc(2, sizeof *run);
        *ref = (fork_run){.be = be, .w = &w, .x = x, .cw = cw, .qkv = qkv};
        fork_ops(ref);
        pthread_t t[2];
        for (int k = 0; k < 2; k++) {
            run[k] = (fork_run){.be = f[k], .w = &w, .x = x, .cw = cw, .qkv = qkv,
                                .ref_y = ref->y, .ref_conv = ref->conv, .ref_att = ref->att};
            CHECK(pthread_create(&t[k], NULL, fork_ops, &run[k]) == 0);
        }
        for (int k = 0; k < 2; k++) pthread_join(t[k], NULL);
        CHECK_EQ_INT(run[0].differ, 0);
        CHECK_EQ_INT(run[1].differ, 0);
        free(ref); free(run); free(wx); free(x); free(cw); free(qkv); free(wd);
        dg_backend_free(f[0]);
        dg_backend_free(f[1]);
        dg_backend_free(be);
    }
}

/* A CUDA module of another build (build/tests/fake_cuda_module.so, beside this program) is
 * refused before anything in it is called: a new duogend beside an old module called into
 * a dg_backend of another layout. */
TEST(cuda_module_of_another_build_is_refused) {
    char exe[4096], path[4200], err[512] = "";
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    CHECK(n > 0);
    if (n <= 0) return;
    exe[n] = 0;
    *strrchr(exe, '/') = 0;
    snprintf(path, sizeof path, "%s/fake_cuda_module.so", exe);
    const char *before = getenv("DG_CUDA_MODULE");
    char *saved = before ? strdup(before) : NULL;
    setenv("DG_CUDA_MODULE", path, 1);
    dg_backend *be = NULL;
    int rc = dg_backend_new("cuda:0", 1, &be, err, sizeof err);
    if (saved) setenv("DG_CUDA_MODULE", saved, 1);
    else unsetenv("DG_CUDA_MODULE");
    free(saved);
    if (strstr(err, "has no CUDA backend")) SKIP("this build has no CUDA backend (no nvcc): no module to load");
    CHECK(rc < 0 && be == NULL);
    if (!strstr(err, "was built with another duogen") || !strstr(err, "another-build") || strstr(err, "fake module"))
        test_fail(__FILE__, __LINE__, "error: \"%s\"", err);
    dg_backend_free(be);
}

/* A file of a fake cgroup tree (made with its folders). */
static void cg_write(const char *root, const char *rel, const char *text) {
    char path[512], cmd[600];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    snprintf(cmd, sizeof cmd, "mkdir -p \"$(dirname '%s')\"", path);
    CHECK(system(cmd) == 0);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* max_inflight 0 sizes the KV by the memory free: under a systemd unit's MemoryMax= or a
 * container's limit that is the limit's room, not the host's MemAvailable (which a worker
 * under a 4 GiB limit on a large host read before, sizing its KV for memory it could not
 * have: the OOM killer's once its jobs filled it). Fake /proc/self/cgroup files and
 * /sys/fs/cgroup trees, v2 and v1. */
TEST(cgroup_memory_room_is_the_tightest_limit_less_the_working_set) {
    char root[] = "/tmp/dg_cgroup_XXXXXX", proc[600], cg[600];
    CHECK(mkdtemp(root) != NULL);
    snprintf(proc, sizeof proc, "%s/proc_self_cgroup", root);
    snprintf(cg, sizeof cg, "%s/sys", root);
    const uint64_t G = 1ull << 30;

    /* no such file, or no limit anywhere: no bound */
    CHECK(dg_cgroup_memory_room("/nonexistent/cgroup", cg) == SIZE_MAX);
    cg_write(root, "proc_self_cgroup", "0::/system.slice/duogend@0.service\n");
    cg_write(root, "sys/system.slice/duogend@0.service/memory.max", "max\n");
    cg_write(root, "sys/system.slice/duogend@0.service/memory.current", "1073741824\n");
    CHECK(dg_cgroup_memory_room(proc, cg) == SIZE_MAX);

    /* v2: the slice's 8 GiB less its working set (1 GiB used, half of it inactive file pages,
     * which the kernel takes back first) */
    cg_write(root, "sys/system.slice/memory.max", "8589934592\n");
    cg_write(root, "sys/system.slice/memory.current", "1073741824\n");
    cg_write(root, "sys/system.slice/memory.stat", "anon 536870912\nfile 536870912\ninactive_file 536870912\n");
    CHECK_EQ_INT(dg_cgroup_memory_room(proc, cg), 8 * G - G / 2);
    /* the unit's own MemoryMax= of 4 GiB with 3 GiB used is tighter: 1 GiB */
    cg_write(root, "sys/system.slice/duogend@0.service/memory.max", "4294967296\n");
    cg_write(root, "sys/system.slice/duogend@0.service/memory.current", "3221225472\n");
    CHECK_EQ_INT(dg_cgroup_memory_room(proc, cg), G);
    /* over its limit (swap, a burst): nothing left, not a wrapped-around number */
    cg_write(root, "sys/system.slice/duogend@0.service/memory.current", "5368709120\n");
    CHECK_EQ_INT(dg_cgroup_memory_room(proc, cg), 0);

    /* inside a container without a cgroup namespace the path is the host's and the mount
     * shows only the container's subtree: found by dropping the path's leading parts */
    cg_write(root, "proc_self_cgroup", "0::/kubepods/pod1/ctr\n");
    cg_write(root, "sys/ctr/memory.max", "2147483648\n");
    cg_write(root, "sys/ctr/memory.current", "1073741824\n");
    CHECK_EQ_INT(dg_cgroup_memory_room(proc, cg), G);
    /* but a group whose folder is there without the memory files (no controller at its
     * levels) is its own, unlimited: not another group that ends in the same name */
    cg_write(root, "proc_self_cgroup", "0::/other/ctr\n");
    cg_write(root, "sys/other/ctr/cgroup.procs", "1\n");
    CHECK(dg_cgroup_memory_room(proc, cg) == SIZE_MAX);

    /* v1 (the memory controller's own hierarchy; a hybrid host's v2 tree has none): the
     * parent's 2 GiB limit, the child's "no limit" (LLONG_MAX rounded to a page) ignored */
    cg_write(root, "proc_self_cgroup", "12:pids:/x\n4:memory:/process_api/job7\n1:name=systemd:/x\n0::/\n");
    cg_write(root, "sys/memory/process_api/job7/memory.limit_in_bytes", "9223372036854771712\n");
    cg_write(root, "sys/memory/process_api/job7/memory.usage_in_bytes", "805306368\n");
    cg_write(root, "sys/memory/process_api/memory.limit_in_bytes", "2147483648\n");
    cg_write(root, "sys/memory/process_api/memory.usage_in_bytes", "1073741824\n");
    cg_write(root, "sys/memory/process_api/memory.stat", "cache 268435456\ninactive_file 1\n"
                                                        "total_inactive_file 268435456\n");
    CHECK_EQ_INT(dg_cgroup_memory_room(proc, cg), G + G / 4);

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    CHECK(system(cmd) == 0);
}

int main(void) { return test_main(); }
