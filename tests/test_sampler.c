/* Sampling: greedy, repetition penalty, logit bias, temperature, top-k, top-p, seeds;
 * stop strings. Distribution checks use 20000 draws: a frequency is within 0.015 of its
 * probability with margin > 4 standard deviations (sd <= 0.0036). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "sampler.h"

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

int main(void) { return test_main(); }
