/* Sampling: greedy, repetition penalty, logit bias, temperature, top-k, top-p, seeds;
 * stop strings. Distribution checks use 20000 draws: a frequency is within 0.015 of its
 * probability with margin > 4 standard deviations (sd <= 0.0036).
 *
 * The device path (dg_sampler_sample_device over the CPU backends' logits_adjust and topk)
 * must pick exactly the host path's token: compared over random rows of several shapes
 * (peaked, flat, tied, banned), vocabularies and every combination of the parameters. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "backend.h"
#include "text/sampler.h"

static dg_sampler *make(int v, dg_sampler_params p) {
    dg_sampler *s;
    char err[128];
    CHECK(dg_sampler_new(v, &p, &s, err, sizeof err) == 0);
    return s;
}

static int32_t draw(dg_sampler *s, const float *l, int n) {
    float buf[16];
    memcpy(buf, l, sizeof(float) * (size_t)n);
    return dg_sampler_sample(s, buf);
}

TEST(greedy_penalty_bias) {
    const float l[4] = {2.0f, -1.0f, 1.9f, 0.5f};
    dg_sampler *s = make(4, (dg_sampler_params){0});
    CHECK_EQ_INT(draw(s, l, 4), 0);
    dg_sampler_free(s);
    /* transformers: seen positive logits are divided, negative ones multiplied */
    s = make(4, (dg_sampler_params){.repetition_penalty = 1.1f});
    dg_sampler_accept(s, 0);
    float buf[4] = {2.0f, -1.0f, 1.9f, 0.5f};
    CHECK_EQ_INT(dg_sampler_sample(s, buf), 2);
    CHECK_NEAR(buf[0], 2.0f / 1.1f, 1e-6);
    dg_sampler_free(s);
    s = make(4, (dg_sampler_params){.repetition_penalty = 2.0f});
    dg_sampler_accept(s, 1);
    float neg[4] = {-3.0f, -1.0f, -2.5f, -1.9f};
    CHECK_EQ_INT(dg_sampler_sample(s, neg), 3);   /* -1 becomes -2 */
    dg_sampler_free(s);
    dg_logit_bias ban[2] = {{0, -INFINITY}, {3, 1.0f}};
    s = make(4, (dg_sampler_params){.logit_bias = ban, .n_logit_bias = 2});
    CHECK_EQ_INT(draw(s, l, 4), 2);        /* 0 banned; 3 gets 1.5 < 1.9 */
    dg_sampler_free(s);
    dg_logit_bias bad = {4, 1.0f};
    dg_sampler *x;
    char err[128];
    CHECK_EQ_INT(dg_sampler_new(4, &(dg_sampler_params){.logit_bias = &bad, .n_logit_bias = 1}, &x,
                                err, sizeof err), DG_EINVAL);
    /* the field named as the worker's own checks name it (README: errors name the field) */
    CHECK_EQ_STR(err, "text.logit_bias: token 4 is outside the vocabulary (ids 0 .. 3)");
}

/* Top-p over a flat distribution of Qwen2's vocabulary (the floor pass: ~10^5 candidates):
 * the nucleus is transformers' TopP, its cumulative mass summed exactly. A float sum drifted
 * 1e-3 over the tiny terms and kept ~50 tokens past it (helper replay: 45111 for 45058). */
TEST(top_p_over_a_flat_vocabulary_keeps_transformers_nucleus) {
    enum { V = 151936 };
    float *l = malloc(sizeof *l * V);
    double *w = malloc(sizeof *w * V);
    for (int i = 0; i < V; i++) l[i] = -1e-6f * (float)i;   /* best first, weights 1 .. 0.86: near flat */
    const float top_p = 0.3f;
    double z = 0.0;
    for (int i = 0; i < V; i++) z += (w[i] = expf(l[i]));
    int removed = 0;   /* ascending: tokens whose cumulative mass is <= 1 - top_p go */
    double cum = 0.0;
    for (int i = V - 1; i > 0; i--) {
        cum += w[i] / z;
        if (cum > 1.0 - (double)top_p) break;
        removed++;
    }
    dg_sampler *s = make(V, (dg_sampler_params){.temperature = 1.0f, .top_p = top_p, .seed = 3});
    float *row = malloc(sizeof *row * V);
    memcpy(row, l, sizeof *row * V);
    int32_t tok = dg_sampler_sample(s, row);
    /* exact: the sampler's float z (the whole vocabulary's weight) is within 1e-6 of the
     * double sum here, far under one token's 6.6e-6 of it, and its cumulative sum is double */
    CHECK_EQ_INT(dg_sampler_kept(s), V - removed);
    CHECK(tok >= 0 && tok < V - removed);
    printf("  nucleus of %d tokens of %d\n", V - removed, V);
    dg_sampler_free(s);
    free(row);
    free(w);
    free(l);
}

static void freq(dg_sampler_params p, const float *l, int n, double *f) {
    dg_sampler *s = make(n, p);
    for (int i = 0; i < n; i++) f[i] = 0;
    for (int i = 0; i < 20000; i++) f[draw(s, l, n)] += 1.0 / 20000;
    dg_sampler_free(s);
}

TEST(temperature_top_k_top_p_distributions) {
    const float l[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    double f[4];
    freq((dg_sampler_params){.temperature = 1.0f, .seed = 1}, l, 4, f);
    CHECK_NEAR(f[0], 0.5, 0.015); CHECK_NEAR(f[1], 0.3, 0.015);
    CHECK_NEAR(f[2], 0.15, 0.015); CHECK_NEAR(f[3], 0.05, 0.015);
    /* temperature 2: p ∝ sqrt(p) */
    double z = sqrt(0.5) + sqrt(0.3) + sqrt(0.15) + sqrt(0.05);
    freq((dg_sampler_params){.temperature = 2.0f, .seed = 2}, l, 4, f);
    CHECK_NEAR(f[0], sqrt(0.5) / z, 0.015); CHECK_NEAR(f[3], sqrt(0.05) / z, 0.015);
    /* top-k 2: renormalised over the two best */
    freq((dg_sampler_params){.temperature = 1.0f, .top_k = 2, .seed = 3}, l, 4, f);
    CHECK_NEAR(f[0], 0.625, 0.015); CHECK_NEAR(f[1], 0.375, 0.015);
    CHECK(f[2] == 0 && f[3] == 0);
    /* top-p 0.7: ascending cumulative 0.05, 0.20 <= 0.3 removed; 0.5 kept -> {0, 1} */
    freq((dg_sampler_params){.temperature = 1.0f, .top_p = 0.7f, .seed = 4}, l, 4, f);
    CHECK_NEAR(f[0], 0.625, 0.015); CHECK(f[2] == 0 && f[3] == 0);
    /* top-p 0.9: 0.05 removed only */
    freq((dg_sampler_params){.temperature = 1.0f, .top_p = 0.9f, .seed = 5}, l, 4, f);
    CHECK(f[2] > 0.1 && f[3] == 0);
    /* a tiny top-p keeps the best token */
    freq((dg_sampler_params){.temperature = 1.0f, .top_p = 0.01f, .seed = 6}, l, 4, f);
    CHECK(f[0] > 0.9999);
}

TEST(seeded_and_reproducible) {
    float l[16];
    for (int i = 0; i < 16; i++) l[i] = (float)(i % 5) * 0.3f;
    dg_sampler_params p = {.temperature = 1.0f, .top_k = 10, .top_p = 0.95f, .seed = 42};
    dg_sampler *a = make(16, p), *b = make(16, p);
    p.seed = 43;
    dg_sampler *c = make(16, p);
    int same = 1, differ = 0;
    for (int i = 0; i < 200; i++) {
        int x = draw(a, l, 16), y = draw(b, l, 16), z = draw(c, l, 16);
        same &= x == y;
        differ |= x != z;
    }
    CHECK(same && differ);
    dg_sampler_free(a); dg_sampler_free(b); dg_sampler_free(c);
}

TEST(top_k_ties_keep_lower_ids) {
    /* four equal logits, k = 2: ids 0 and 1, whatever order the heap met them in */
    const float l[6] = {1.0f, 1.0f, 1.0f, 0.5f, 1.0f, 0.0f};
    double f[6];
    freq((dg_sampler_params){.temperature = 1.0f, .top_k = 2, .seed = 7}, l, 6, f);
    CHECK(f[0] > 0.4 && f[1] > 0.4 && f[2] == 0 && f[4] == 0);
    /* one better token first: {2, 0} */
    const float m[4] = {1.0f, 1.0f, 2.0f, 1.0f};
    freq((dg_sampler_params){.temperature = 1.0f, .top_k = 2, .seed = 8}, m, 4, f);
    CHECK(f[2] > 0.6 && f[0] > 0.2 && f[1] == 0 && f[3] == 0);
}

/* ---- the device path against the host path ----------------------------------------- */

#define TEST_RNG_SEED 0x2545f4914f6cdd1dull
#include "common/rng.h"

/* near: distinct logits a few ulps apart, whose weights exp(l/T - max) collapse into a few
 * equal values, so that the host's order (weight, then id) is not the logits' order */
enum { ROW_GAUSS, ROW_LM, ROW_TIED, ROW_BANNED, ROW_FLAT, ROW_FEW, ROW_NONE, ROW_NEAR, ROW_KINDS };
static const char *ROW_NAMES[] = {"gauss", "lm", "tied", "banned", "flat", "few", "all-banned", "near"};

static void make_row(float *l, int V, int kind) {
    for (int i = 0; i < V; i++) {
        float g = gauss();
        switch (kind) {
        case ROW_GAUSS:  l[i] = 3.0f * g; break;
        case ROW_LM:     l[i] = 2.0f * g + (rnd32() % 500 == 0 ? 12.0f + 4.0f * g : 0.0f); break;
        case ROW_TIED:   l[i] = roundf(4.0f * g) / 4.0f; if (l[i] == 0.0f && rnd32() % 2) l[i] = -0.0f; break;
        case ROW_BANNED: l[i] = rnd32() % 3 ? 3.0f * g : -INFINITY; break;
        case ROW_FLAT:   l[i] = rnd32() % 50 ? 1.5f : 1.5f + fabsf(g); break;
        case ROW_FEW:    l[i] = rnd32() % 97 ? -INFINITY : g; break;
        case ROW_NEAR:   l[i] = 0.25f + (float)(rnd32() % 64) * 0x1p-25f; break;
        default:         l[i] = -INFINITY; break;
        }
    }
}

/* The CPU backend with its download counted: a download is the device path's fallback. */
static dg_backend counted, *base[2];   /* base: "cpu", "cpu-scalar", opened once */
static void (*real_download)(dg_backend *, float *, const float *, int64_t);
static int n_downloads;
static void count_download(dg_backend *be, float *host, const float *src, int64_t n) {
    n_downloads++;
    real_download(be, host, src, n);
}

static dg_backend *counting_backend(const char *name) {
    char err[128];
    int which = strcmp(name, "cpu") != 0;
    if (!base[which]) CHECK(dg_backend_new(name, 1, &base[which], err, sizeof err) == 0);
    counted = *base[which];
    real_download = base[which]->download;
    counted.download = count_download;
    return &counted;
}

typedef struct {
    int decided, fell_back;
} path_count;

/* `steps` rows of one kind through two samplers of the same parameters, one per path, with
 * the same prompt accepted and a <BOV>-like ban on some steps. */
static void compare_paths(dg_backend *be, int V, dg_sampler_params p, int kind, int steps,
                          path_count *pc) {
    dg_sampler *a = make(V, p), *b = make(V, p);
    float *ref = malloc(sizeof(float) * (size_t)V), *host = malloc(sizeof(float) * (size_t)V);
    float *scratch = malloc(sizeof(float) * (size_t)V);
    float *row = be->alloc(be, sizeof(float) * (size_t)V);
    for (int i = 0; i < 24; i++) {
        int32_t t = (int32_t)(rnd32() % (uint32_t)V);
        dg_sampler_accept(a, t);
        dg_sampler_accept(b, t);
    }
    for (int step = 0; step < steps; step++) {
        make_row(ref, V, kind);
        int32_t ban = rnd32() % 3 == 0 ? (int32_t)(rnd32() % (uint32_t)V) : -1;
        memcpy(host, ref, sizeof(float) * (size_t)V);
        if (ban >= 0) host[ban] = -INFINITY;
        int32_t ta = dg_sampler_sample(a, host);
        be->upload(be, row, ref, V);
        int before = n_downloads;
        int32_t tb = dg_sampler_sample_device(b, be, row, ban, scratch);
        if (n_downloads > before) pc->fell_back++; else pc->decided++;
        if (ta != tb) {
            test_fail(__FILE__, __LINE__, "%s V %d %s step %d: T %g top_k %d top_p %g penalty %g "
                      "bias %zu ban %d: host %d, device %d", be->name, V, ROW_NAMES[kind], step,
                      p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.n_logit_bias, ban, ta, tb);
            break;
        }
    }
    be->release(be, row);
    free(ref);
    free(host);
    free(scratch);
    dg_sampler_free(a);
    dg_sampler_free(b);
}

TEST(device_ops_cpu) {
    dg_backend *be = counting_backend("cpu");
    char name[64];
    for (int V = 1; V <= 3000; V = V * 3 + 1) {
        float *x = malloc(sizeof(float) * (size_t)V), *val = malloc(sizeof(float) * DG_BACKEND_TOPK_MAX);
        int32_t *idx = malloc(sizeof(int32_t) * DG_BACKEND_TOPK_MAX), *order = malloc(sizeof(int32_t) * (size_t)V);
        for (int kind = 0; kind < ROW_KINDS; kind++) {
            make_row(x, V, kind);
            /* the reference order: value descending, lower index first (selection sort) */
            for (int i = 0; i < V; i++) order[i] = i;
            for (int i = 0; i < V && i < DG_BACKEND_TOPK_MAX; i++)
                for (int j = i + 1; j < V; j++)
                    if (x[order[j]] > x[order[i]] || (x[order[j]] == x[order[i]] && order[j] < order[i])) {
                        int32_t t = order[i]; order[i] = order[j]; order[j] = t;
                    }
            const int ks[] = {1, 2, 33, V / 2, V, DG_BACKEND_TOPK_MAX};
            for (size_t q = 0; q < sizeof ks / sizeof *ks; q++) {
                int k = ks[q];
                if (k < 1 || k > V || k > DG_BACKEND_TOPK_MAX) continue;
                double lse = 0;
                be->topk(be, x, V, k, 1.0f / 0.7f, val, idx, &lse);
                int same = 1;
                for (int i = 0; i < k; i++) same &= idx[i] == order[i] && val[i] == x[order[i]];
                snprintf(name, sizeof name, "V %d %s k %d", V, ROW_NAMES[kind], k);
                if (!same) test_fail(__FILE__, __LINE__, "topk %s: not the reference order", name);
                double ref = -INFINITY, m = x[order[0]] / 0.7, acc = 0;
                for (int i = 0; i < V; i++) acc += exp(x[i] / 0.7 - m);
                if (m != -INFINITY) ref = m + log(acc);
                if (ref == -INFINITY) CHECK(lse == -INFINITY);
                else if (!(fabs(lse - ref) <= 1e-5 * (1 + fabs(ref))))
                    test_fail(__FILE__, __LINE__, "topk %s: lse %.9g, reference %.9g", name, lse, ref);
            }
        }
        /* the biases in order (a repeated id adds twice), then the penalty on the seen ids,
         * its sign rule on the biased value (transformers' order) */
        for (int i = 0; i < V; i++) x[i] = (float)(i % 7) - 3.0f;
        int32_t seen[3] = {0, V / 2, V - 1};
        dg_logit_bias bias[3] = {{V - 1, 0.5f}, {0, -INFINITY}, {V - 1, 0.25f}};
        const float b2 = x[V - 1] + 0.5f + 0.25f;
        float want[3] = {-INFINITY, x[V / 2] < 0 ? x[V / 2] * 1.5f : x[V / 2] / 1.5f, b2 < 0 ? b2 * 1.5f : b2 / 1.5f};
        if (V >= 3) {
            be->logits_adjust(be, x, V, seen, 3, 1.5f, bias, 3);
            CHECK(x[0] == -INFINITY);
            CHECK(x[V / 2] == want[1]);
            CHECK(x[V - 1] == want[2]);
        }
        free(x); free(val); free(idx); free(order);
    }
}

/* A choice from bounds (dg_sampler_sample_bounds, the logit screen's path) is the token the
 * device path picks from the whole row, and a sampled one makes the same draws: greedy and
 * top-k (k 1, 2, 40 and DG_SAMPLER_BOUNDS_TOPK, with and without top-p) over rows of every
 * kind, with and without penalty and biases (an infinite one among them) and the ban, under
 * bounds of random widths around the row (zero, ulps, the row's spread, one side only), each
 * token's exact value handed out only when asked for (and each token asked for at most
 * once); the two samplers' streams of tokens stay equal step after step, so their draws
 * did. Where the bounds cannot decide (NaN, more than DG_SAMPLER_BOUNDS_MAX candidates,
 * every token -inf, the k-th weight too close to one left out) it returns -1 and accepts and draws nothing: the next choice is still the one
 * the device path makes. */
typedef struct {
    const float *row;
    int          asked, twice;
    uint8_t     *seen;
} bounds_pick;

static void pick_exact(void *user, const int32_t *ids, int n, float *out) {
    bounds_pick *b = user;
    for (int i = 0; i < n; i++) {
        CHECK(i == 0 || ids[i] > ids[i - 1]);
        b->twice += b->seen[ids[i]]++ > 0;
        out[i] = b->row[ids[i]];
    }
    b->asked += n;
}

TEST(choice_from_bounds_is_the_rows_token) {
    dg_backend *be = counting_backend("cpu");
    const int vocabs[] = {5, 97, 1500, 5000};
    const struct { float t; int k; float p; } modes[] = {
        {0.0f, 0, 1.0f}, {0.7f, 1, 1.0f}, {0.7f, 2, 0.6f}, {0.9f, 40, 1.0f}, {1.3f, 40, 0.8f},
        {1.0f, DG_SAMPLER_BOUNDS_TOPK, 0.95f}};
    const int n_modes = (int)(sizeof modes / sizeof *modes);
    int decided[6] = {0}, undecided[6] = {0};
    long asked[6] = {0};
    for (size_t v = 0; v < sizeof vocabs / sizeof *vocabs; v++) {
        const int V = vocabs[v];
        dg_logit_bias bias[4] = {{V / 3, 2.5f}, {V - 1, -INFINITY}, {V / 3, -1.0f}, {0, INFINITY}};
        float *ref = malloc(sizeof(float) * (size_t)V), *lo = malloc(sizeof(float) * (size_t)V),
              *hi = malloc(sizeof(float) * (size_t)V), *scratch = malloc(sizeof(float) * (size_t)V);
        float *row = be->alloc(be, sizeof(float) * (size_t)V);
        uint8_t *seen = malloc((size_t)V);
        for (int mode = 0; mode < n_modes; mode++)
        for (int kind = 0; kind < ROW_KINDS; kind++)
            for (int pen = 0; pen < 2; pen++)
                for (int nb = 0; nb <= 4; nb += 2) {
                    dg_sampler_params p = {.temperature = modes[mode].t, .top_k = modes[mode].k,
                                           .top_p = modes[mode].p, .repetition_penalty = pen ? 1.3f : 1.0f,
                                           .logit_bias = nb ? bias : NULL,
                                           .n_logit_bias = (size_t)(nb == 4 && kind % 2 ? 3 : nb),
                                           .seed = (uint64_t)(mode * 1000 + kind * 10 + pen + nb)};
                    dg_sampler *a = make(V, p), *b = make(V, p);
                    for (int i = 0; i < 24; i++) {
                        int32_t t = (int32_t)(rnd32() % (uint32_t)V);
                        dg_sampler_accept(a, t);
                        dg_sampler_accept(b, t);
                    }
                    for (int step = 0; step < 6; step++) {
                        make_row(ref, V, kind);
                        const float w = step % 3 == 0 ? 0.0f : step % 3 == 1 ? 1e-6f : 2.0f;   /* widths */
                        for (int j = 0; j < V; j++) {
                            float d = w * (float)(rnd32() % 1000) / 1000.0f;
                            lo[j] = ref[j] - (step == 4 ? 0.0f : d);
                            hi[j] = ref[j] + (step == 5 ? 0.0f : d);
                            if (w > 0.0f && w < 1e-5f) {   /* a few ulps */
                                lo[j] = nextafterf(lo[j], -INFINITY);
                                hi[j] = nextafterf(hi[j], INFINITY);
                            }
                        }
                        if (kind == ROW_GAUSS && step == 1) lo[V / 2] = NAN;
                        int32_t ban = rnd32() % 3 == 0 ? (int32_t)(rnd32() % (uint32_t)V) : -1;
                        be->upload(be, row, ref, V);
                        int32_t ta = dg_sampler_sample_device(a, be, row, ban, scratch);
                        bounds_pick bp = {.row = ref, .seen = seen};
                        memset(seen, 0, (size_t)V);
                        int32_t tb = dg_sampler_sample_bounds(b, lo, hi, ban, pick_exact, &bp);
                        CHECK_EQ_INT(bp.twice, 0);
                        if (tb < 0) {   /* not decided: nothing accepted or drawn; the whole row decides */
                            undecided[mode]++;
                            be->upload(be, row, ref, V);
                            tb = dg_sampler_sample_device(b, be, row, ban, scratch);
                        } else {
                            decided[mode]++;
                            asked[mode] += bp.asked;
                        }
                        if (ta != tb) {
                            test_fail(__FILE__, __LINE__, "V %d %s step %d T %g top_k %d top_p %g penalty %d biases %zu "
                                      "ban %d: row %d, bounds %d", V, ROW_NAMES[kind], step, p.temperature, p.top_k,
                                      p.top_p, pen, p.n_logit_bias, ban, ta, tb);
                            break;
                        }
                        /* decided where it must be: narrow bounds of a peaked row (the candidates: the k
                         * best and the few the bounds cannot tell from the k-th) */
                        if (kind == ROW_LM && w < 1.0f && V > 5 * (modes[mode].k + 1) && !(nb == 4 && kind % 2)) {
                            CHECK(tb >= 0);
                            CHECK(bp.asked > 0 && bp.asked <= modes[mode].k + 64);
                        }
                    }
                    dg_sampler_free(a);
                    dg_sampler_free(b);
                }
        be->release(be, row);
        free(ref);
        free(lo);
        free(hi);
        free(scratch);
        free(seen);
    }
    for (int mode = 0; mode < n_modes; mode++) {
        printf("  T %g top_k %d top_p %g: decided from the bounds %d, not %d; exact values asked for %.1f a decided "
               "row\n", modes[mode].t, modes[mode].k, modes[mode].p, decided[mode], undecided[mode],
               decided[mode] ? (double)asked[mode] / decided[mode] : 0.0);
        CHECK(decided[mode] > 0);
    }
    CHECK(decided[0] > undecided[0]);
    /* plain temperature, top-p alone and a top-k over DG_SAMPLER_BOUNDS_TOPK: never decided */
    const dg_sampler_params never[] = {{.temperature = 0.7f}, {.temperature = 0.7f, .top_p = 0.9f},
                                       {.temperature = 0.7f, .top_k = DG_SAMPLER_BOUNDS_TOPK + 1}};
    for (size_t i = 0; i < sizeof never / sizeof *never; i++) {
        const int V = 600;
        dg_sampler *t = make(V, never[i]);
        float *l = calloc((size_t)V, sizeof *l), *h = calloc((size_t)V, sizeof *h);
        h[3] = 1.0f;
        CHECK(!dg_sampler_bounded(t));
        CHECK_EQ_INT(dg_sampler_sample_bounds(t, l, h, -1, pick_exact, NULL), -1);
        dg_sampler_free(t);
        free(l);
        free(h);
    }
}

/* One row through the sampler's three paths: the host's (t->a), the device's (t->b) and the
 * bounds' (t->c, lo = hi = the row; undecided, the device path), each sampler with its own
 * history, the same parameters. Their tokens must be one; it is returned (-1 after a
 * failure, reported under `what`). */
typedef struct {
    dg_sampler *a, *b, *c;
    int         decided, undecided;
} three;

static int32_t three_paths(dg_backend *be, three *t, const float *ref, int V, const char *what) {
    const size_t bytes = sizeof(float) * (size_t)V;
    float *host = malloc(bytes), *lo = malloc(bytes), *hi = malloc(bytes), *scratch = malloc(bytes);
    float *row = be->alloc(be, bytes);
    bounds_pick bp = {.row = ref, .seen = calloc((size_t)V, 1)};
    memcpy(host, ref, bytes);
    memcpy(lo, ref, bytes);
    memcpy(hi, ref, bytes);
    be->upload(be, row, ref, V);
    int32_t ta = dg_sampler_sample(t->a, host), tb = dg_sampler_sample_device(t->b, be, row, -1, scratch);
    int32_t tc = dg_sampler_sample_bounds(t->c, lo, hi, -1, pick_exact, &bp);
    if (tc < 0) {
        t->undecided++;
        be->upload(be, row, ref, V);
        tc = dg_sampler_sample_device(t->c, be, row, -1, scratch);
    } else {
        t->decided++;
    }
    be->release(be, row);
    free(host);
    free(lo);
    free(hi);
    free(scratch);
    free(bp.seen);
    if (ta == tb && tb == tc && ta >= 0 && ta < V) return ta;
    test_fail(__FILE__, __LINE__, "%s: host %d, device %d, bounds %d", what, ta, tb, tc);
    return -1;
}

static three three_new(int V, dg_sampler_params p) { return (three){make(V, p), make(V, p), make(V, p), 0, 0}; }

static void three_free(three *t) {
    dg_sampler_free(t->a);
    dg_sampler_free(t->b);
    dg_sampler_free(t->c);
}

/* Rows the daemon never makes but the engine's API can: an infinite bias (+inf) and a NaN
 * logit. Every mode of sampling returns a token of the vocabulary, the +inf token where
 * there is one (its probability is 1), the same on the three paths; top-p alone over a row
 * with a NaN (z is NaN, so no token reaches the nucleus) the argmax: it read before its
 * candidates (cand[-1], token 0 here without ASan). */
TEST(sampling_survives_infinite_and_nan_logits) {
    dg_backend *be = counting_backend("cpu");
    const int V = 3000;
    const dg_sampler_params modes[] = {{.temperature = 0.8f}, {.temperature = 0.8f, .top_k = 40},
                                       {.temperature = 0.8f, .top_p = 0.9f},
                                       {.temperature = 0.8f, .top_k = 40, .top_p = 0.9f}, {.temperature = 0.0f}};
    float *ref = malloc(sizeof(float) * (size_t)V);
    char what[96];
    for (size_t m = 0; m < sizeof modes / sizeof *modes; m++)
        for (int nan_at = -1; nan_at < V; nan_at += V / 3) {
            const dg_logit_bias up = {1234, INFINITY};
            dg_sampler_params p = modes[m];
            p.logit_bias = nan_at < 0 ? &up : NULL;
            p.n_logit_bias = nan_at < 0;
            three t = three_new(V, p);
            for (int step = 0; step < 4; step++) {
                for (int j = 0; j < V; j++) ref[j] = 3.0f * gauss();
                if (nan_at >= 0) ref[nan_at] = NAN;
                snprintf(what, sizeof what, "mode %zu NaN at %d step %d", m, nan_at, step);
                int32_t tok = three_paths(be, &t, ref, V, what), best = 0;
                for (int j = 1; j < V; j++) best = ref[j] > ref[best] ? j : best;   /* NaN never wins */
                if (nan_at < 0) CHECK_EQ_INT(tok, up.token);
                else if (p.top_p > 0.0f && p.top_p < 1.0f && !p.top_k) CHECK_EQ_INT(tok, best);   /* top-p alone */
            }
            three_free(&t);
        }
    free(ref);
}

/* Logits or temperatures whose scaled values leave the float range, or whose log-sum-exp
 * the device path cannot read back (both found by tests/fuzz_sampler.c): a temperature of
 * 1e-30 scales a logit of 3 past FLT_MAX (the distribution is then the argmax's: no draw,
 * on every path), and logits of ~1e22 (with ties, so that top-p keeps many tokens) make the
 * backend's lse = m + log z lose log z in m's rounding (the device path then sums z on the
 * host). The three paths give the same tokens, their draws in step over four rows. */
TEST(sampling_with_scales_past_the_float_range) {
    dg_backend *be = counting_backend("cpu");
    const int V = 2000;
    const float temps[] = {1e-30f, 1e-8f, 0.7f};
    const int top_ks[] = {0, 1, 40};
    const float top_ps[] = {1.0f, 0.5f};
    const float scales[] = {3.0f, 1e22f};
    float *ref = malloc(sizeof(float) * (size_t)V);
    char what[128];
    int decided = 0, undecided = 0;
    for (int t = 0; t < 3; t++)
        for (int k = 0; k < 3; k++)
            for (int q = 0; q < 2; q++)
                for (int sc = 0; sc < 2; sc++) {
                    dg_sampler_params p = {.temperature = temps[t], .top_k = top_ks[k], .top_p = top_ps[q],
                                           .repetition_penalty = 1.3f, .seed = (uint64_t)(t * 100 + k * 10 + q)};
                    three th = three_new(V, p);
                    for (int step = 0; step < 4; step++) {
                        for (int j = 0; j < V; j++) ref[j] = scales[sc] * roundf(2.0f * gauss()) / 2.0f;
                        snprintf(what, sizeof what, "T %g top_k %d top_p %g scale %g step %d", p.temperature,
                                 p.top_k, p.top_p, scales[sc], step);
                        if (three_paths(be, &th, ref, V, what) < 0) break;
                    }
                    decided += th.decided;
                    undecided += th.undecided;
                    three_free(&th);
                }
    printf("  from the bounds: %d decided, %d not (plain and top-p alone: never)\n", decided, undecided);
    CHECK(decided > 0);
    free(ref);
}

/* Every combination of the parameters on small vocabularies, a few rows of each kind. */
TEST(device_path_equals_host_path) {
    const float temps[] = {0.0f, 0.1f, 0.7f, 1.3f};
    const int top_ks[] = {0, 1, 2, 40, 1000, 2016, 2017};
    const float top_ps[] = {1.0f, 0.05f, 0.6f, 0.95f};
    const int vocabs[] = {5, 64, 97, 300, 1500, 5000};
    path_count by_mode[4] = {{0}};   /* greedy, top-k, top-p alone, plain */
    for (int b = 0; b < 2; b++) {
        dg_backend *be = counting_backend(b ? "cpu-scalar" : "cpu");
        for (size_t v = 0; v < sizeof vocabs / sizeof *vocabs; v++) {
            const int V = vocabs[v];
            dg_logit_bias bias[4] = {{V / 3, 2.5f}, {V - 1, -INFINITY}, {V / 3, -1.0f}, {0, 0.75f}};
            for (size_t t = 0; t < 4; t++)
                for (size_t k = 0; k < sizeof top_ks / sizeof *top_ks; k++)
                    for (size_t q = 0; q < 4; q++)
                        for (int pen = 0; pen < 2; pen++)
                            for (int kind = 0; kind < ROW_KINDS; kind++) {
                                if (b && (kind % 2 || V > 1500)) continue;   /* the scalar backend: a sample */
                                dg_sampler_params p = {.temperature = temps[t], .top_k = top_ks[k],
                                                       .top_p = top_ps[q], .repetition_penalty = pen ? 1.3f : 1.0f,
                                                       .logit_bias = kind % 3 ? bias : NULL,
                                                       .n_logit_bias = kind % 3 ? 4 : 0,
                                                       .seed = rnd32()};
                                int mode = temps[t] <= 0 ? 0 : top_ks[k] > 0 && top_ks[k] < V ? 1
                                         : top_ps[q] < 1 ? 2 : 3;
                                path_count pc = {0};
                                compare_paths(be, V, p, kind, 3, &pc);
                                by_mode[mode].decided += pc.decided;
                                by_mode[mode].fell_back += pc.fell_back;
                                /* greedy never needs the row; peaked rows decide top-k within the
                                 * limit and small nuclei; plain sampling always needs the row */
                                if (mode == 0 || (kind == ROW_LM && V > 96 &&
                                                  ((mode == 1 && V > top_ks[k] + 32 && top_ks[k] <= 1000) ||
                                                   (mode == 2 && temps[t] <= 0.1f))))
                                    CHECK_EQ_INT(pc.fell_back, 0);
                                if (mode == 3) CHECK_EQ_INT(pc.decided, 0);
                            }
        }
    }
    static const char *modes[] = {"greedy", "top-k", "top-p", "plain"};
    for (int m = 0; m < 4; m++)
        printf("  %-7s decided on the device %d, fell back %d\n", modes[m], by_mode[m].decided,
               by_mode[m].fell_back);
    CHECK(by_mode[1].decided > 4 * by_mode[1].fell_back);
}

/* A backend without the sampling pair (a GPU whose kernels for it are not verified): every
 * token is chosen on the host from the downloaded row, and is the host path's token. */
TEST(backend_without_sampling_ops_takes_the_host_path) {
    dg_backend *be = counting_backend("cpu");
    counted.logits_adjust = NULL;
    counted.topk = NULL;
    const float temps[] = {0.0f, 0.7f};
    const int top_ks[] = {0, 40};
    for (int t = 0; t < 2; t++)
        for (int k = 0; k < 2; k++)
            for (int kind = 0; kind < ROW_KINDS; kind++) {
                dg_logit_bias bias[2] = {{7, 2.5f}, {300, -INFINITY}};
                dg_sampler_params p = {.temperature = temps[t], .top_k = top_ks[k], .top_p = 0.9f,
                                       .repetition_penalty = 1.3f, .logit_bias = bias, .n_logit_bias = 2,
                                       .seed = rnd32()};
                path_count pc = {0};
                compare_paths(be, 1500, p, kind, 4, &pc);
                CHECK_EQ_INT(pc.decided, 0);   /* every step downloaded the row */
                CHECK_EQ_INT(pc.fell_back, 4);
            }
}

/* The full Qwen2.5-VL vocabulary, the shapes a model gives (peaked, with penalty and bias). */
TEST(device_path_full_vocabulary) {
    const int V = 152064;
    dg_backend *be = counting_backend("cpu");
    dg_logit_bias bias[2] = {{151643, -INFINITY}, {1000, 3.0f}};
    const dg_sampler_params ps[] = {
        {.seed = 1},
        {.temperature = 0.7f, .top_k = 50, .seed = 2},
        {.temperature = 0.7f, .top_k = 50, .top_p = 0.8f, .repetition_penalty = 1.05f, .seed = 3},
        {.temperature = 1.0f, .top_p = 0.9f, .repetition_penalty = 1.1f, .logit_bias = bias, .n_logit_bias = 2, .seed = 4},
        {.temperature = 0.1f, .top_p = 0.001f, .top_k = 1, .repetition_penalty = 1.05f, .seed = 5},
        {.temperature = 1.0f, .seed = 6},
    };
    for (size_t i = 0; i < sizeof ps / sizeof *ps; i++) {
        path_count pc = {0};
        for (int kind = ROW_GAUSS; kind <= ROW_LM; kind++) compare_paths(be, V, ps[i], kind, 3, &pc);
        printf("  V %d, T %g top_k %d top_p %g: decided on the device %d, fell back %d\n", V,
               ps[i].temperature, ps[i].top_k, ps[i].top_p, pc.decided, pc.fell_back);
        if (ps[i].temperature <= 0 || ps[i].top_k) CHECK_EQ_INT(pc.fell_back, 0);
        if (ps[i].temperature > 0 && !ps[i].top_k && !ps[i].top_p) CHECK_EQ_INT(pc.decided, 0);
    }
}

static char out[256];
static size_t out_len;
static int calls;
static void collect(void *user, const char *t, size_t n) {
    (void)user;
    memcpy(out + out_len, t, n);
    out_len += n;
    out[out_len] = 0;
    calls++;
}

TEST(stop_strings) {
    const char *stops[] = {"STOP", "\n\n", "ab"};
    dg_stop *s;
    char err[128];
    CHECK(dg_stop_new(stops, 3, &s, err, sizeof err) == 0);
    out_len = 0;
    CHECK_EQ_INT(dg_stop_feed(s, "Hello wor", 9, collect, NULL), 0);
    CHECK_EQ_STR(out, "Hello wor");
    CHECK_EQ_INT(dg_stop_feed(s, "ld! ST", 6, collect, NULL), 0);
    CHECK_EQ_STR(out, "Hello world! ");              /* "ST" held back */
    CHECK_EQ_INT(dg_stop_feed(s, "Ox", 2, collect, NULL), 0);
    CHECK_EQ_STR(out, "Hello world! STOx");          /* not a stop after all */
    CHECK_EQ_INT(dg_stop_feed(s, " then\n", 6, collect, NULL), 0);
    CHECK_EQ_INT(dg_stop_feed(s, "\nlater", 6, collect, NULL), 1);
    CHECK_EQ_STR(out, "Hello world! STOx then");     /* stop string not emitted */
    dg_stop_free(s);
    /* the stop string that completes first wins; flush releases a held tail */
    CHECK(dg_stop_new(stops, 3, &s, err, sizeof err) == 0);
    out_len = 0; out[0] = 0;
    CHECK_EQ_INT(dg_stop_feed(s, "xxSTOPab", 8, collect, NULL), 1);
    CHECK_EQ_STR(out, "xx");
    dg_stop_free(s);
    CHECK(dg_stop_new(stops, 3, &s, err, sizeof err) == 0);
    out_len = 0; out[0] = 0;
    CHECK_EQ_INT(dg_stop_feed(s, "end a", 5, collect, NULL), 0);
    CHECK_EQ_STR(out, "end ");
    dg_stop_flush(s, collect, NULL);
    CHECK_EQ_STR(out, "end a");
    dg_stop_free(s);
    /* no stop strings: everything passes through */
    CHECK(dg_stop_new(NULL, 0, &s, err, sizeof err) == 0);
    out_len = 0; out[0] = 0;
    CHECK_EQ_INT(dg_stop_feed(s, "abc", 3, collect, NULL), 0);
    CHECK_EQ_STR(out, "abc");
    dg_stop_free(s);
}

/* The bias before the penalty, as transformers (SequenceBias, then RepetitionPenalty: its
 * sign rule reads the biased logit), on the host, device and bounds paths. Ours applied the
 * penalty first: {2, 4} with 0 seen and +3 gave 0 (2/1.5 + 3 = 4.33 > 4), transformers 1
 * ((2 + 3)/1.5 = 3.33); {-1, 0.25} with 0 seen and +2 under penalty 2 gave 1 (-2 + 2 = 0),
 * transformers 0 ((-1 + 2)/2 = 0.5). */
TEST(bias_before_penalty_as_transformers) {
    dg_backend *be = counting_backend("cpu");
    static const struct { float row[2], bias, penalty; int32_t want; } cases[] = {
        {{2.0f, 4.0f}, 3.0f, 1.5f, 1}, {{-1.0f, 0.25f}, 2.0f, 2.0f, 0}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        dg_logit_bias b = {0, cases[c].bias};
        three t = three_new(2, (dg_sampler_params){.repetition_penalty = cases[c].penalty, .logit_bias = &b,
                                                   .n_logit_bias = 1});
        dg_sampler_accept(t.a, 0);
        dg_sampler_accept(t.b, 0);
        dg_sampler_accept(t.c, 0);
        CHECK_EQ_INT(three_paths(be, &t, cases[c].row, 2, "bias before penalty"), cases[c].want);
        dg_sampler_free(t.a); dg_sampler_free(t.b); dg_sampler_free(t.c);
    }
}

/* Biases that ban every token are refused when the sampler is made (nothing could be
 * written). A row whose every token is -inf all the same (the job's bans and the row's own
 * -inf, or the engine's ban): the argmax comes back (there is nothing else) and the sampler
 * says it was starved, on every path; the scheduler then ends the sequence instead of
 * emitting a banned token. A NaN logit under plain temperature sampling: the argmax (draw()
 * ran off its NaN sum and took the last id every time). */
TEST(starved_rows_and_nan_under_plain_sampling) {
    dg_backend *be = counting_backend("cpu");
    enum { V = 300 };
    dg_logit_bias ban[V];
    for (int i = 0; i < V; i++) ban[i] = (dg_logit_bias){i, -INFINITY};
    dg_sampler *none = NULL;
    char err[256];
    CHECK_EQ_INT(dg_sampler_new(V, &(dg_sampler_params){.logit_bias = ban, .n_logit_bias = V}, &none, err,
                                sizeof err), DG_EINVAL);
    CHECK(strstr(err, "every token of the vocabulary (300) is banned") != NULL);
    float row[V];
    for (int i = 0; i < V; i++) row[i] = (float)(i % 11);
    row[V - 1] = -INFINITY;   /* the one token the biases leave */
    for (int greedy = 0; greedy < 2; greedy++) {
        three t = three_new(V, (dg_sampler_params){.temperature = greedy ? 0.0f : 0.8f, .top_k = greedy ? 0 : 40,
                                                   .logit_bias = ban, .n_logit_bias = V - 1, .seed = 3});
        three_paths(be, &t, row, V, "all banned");
        CHECK(dg_sampler_starved(t.a) && dg_sampler_starved(t.b) && dg_sampler_starved(t.c));
        dg_sampler_free(t.a); dg_sampler_free(t.b); dg_sampler_free(t.c);
    }
    row[V - 1] = 1.0f;
    three t = three_new(V, (dg_sampler_params){.temperature = 0.8f, .seed = 3});
    three_paths(be, &t, row, V, "nothing banned");
    CHECK(!dg_sampler_starved(t.a) && !dg_sampler_starved(t.b) && !dg_sampler_starved(t.c));
    dg_sampler_free(t.a); dg_sampler_free(t.b); dg_sampler_free(t.c);
    int last = 0;
    for (uint64_t seed = 0; seed < 100; seed++) {
        dg_sampler *s = make(4, (dg_sampler_params){.temperature = 1.0f, .seed = seed});
        float l[4] = {5.0f, NAN, 1.0f, -3.0f};
        const int32_t tok = dg_sampler_sample(s, l);
        CHECK(tok >= 0 && tok < 4);
        last += tok == 3;
        dg_sampler_free(s);
    }
    CHECK_EQ_INT(last, 0);
}

int main(void) {
    int rc = test_main();
    dg_backend_free(base[0]);
    dg_backend_free(base[1]);
    return rc;
}
