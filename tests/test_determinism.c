/* The same job with the same seed gives the same text and the same PNG bytes whatever the
 * scheduler's caches hold (docs/DESIGN.md §6 "Determinism"), on the tiny package with
 * images drawn:
 *   (a) a cold scheduler, (b) the same scheduler again, every cache hitting (the usage
 *   counters and the cache statistics prove it), (c) a scheduler that first ran other jobs
 *   sharing a prefix and images, and ran another job beside it;
 *   (d) a follow-up job that sends the drawn PNGs back in an assistant message with the
 *   earlier answer's text: the same answer on the warm scheduler and on a fresh one, the
 *   earlier job's KV blocks reused up to the last full block of what it computed, and the
 *   images whose positions they cover never run through the vision tower.
 *   and below them, the rows those rest on: K/V, condition and vision rows are the same
 *   bits whichever way they were fed (determinism_rows_do_not_depend_on_chunking).
 * Equality is exact (bytes): both sides run the same kernels on one machine. It needs every
 * row of a matmul computed the same whatever the number of rows (a prompt's tail after a
 * prefix hit is a chunk of another size than the cold prefill's; decode computes one row
 * where a fresh prefill computes many): docs/DESIGN.md §6. The whole jobs can agree even
 * where rows differ in their last bits (8-bit pixels and biased text hide them), hence the
 * rows case. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "common/jobs.h"
#include "common/package.h"
#include "duogen.h"
#include "cache/kv_cache.h"
#include "cache/vision_cache.h"
#include "io/image.h"
#include "io/image_preprocess.h"
#include "model.h"
#include "scheduler.h"

static const char *pkg;   /* the tiny package of seed 11 with the Qwen2 vocabulary, made once */
static dg_model *model;

static int setup(void) { return (model = test_model_once("tiny", 11, TEST_QWEN2_VOCAB, &pkg)) != NULL; }

static dg_sched *sched_new(int max_inflight) {
    char err[512];
    dg_sched *s = NULL;
    if (dg_sched_new(model, &(dg_sched_opts){.max_inflight = max_inflight}, &s, err, sizeof err) < 0)
        printf("  %s\n", err);
    return s;
}

/* Long enough that two jobs with this system prompt share full KV blocks. */
static const char *SYSTEM = "You are a patient cook who answers in short steps and draws each dish "
                            "as it should look on the plate, from above, on a round white plate, with a fork.";

/* Request storage: messages and parts live beside the request. */
typedef struct {
    dg_part       parts[3][4];
    dg_message    msgs[3];
    dg_logit_bias bias[2];
    dg_request    r;
} job_spec;

static void text_part(dg_part *p, const char *text) {
    *p = (dg_part){.kind = DG_PART_TEXT, .text = text, .text_len = strlen(text)};
}

static void image_part(dg_part *p, const uint8_t *png, size_t len) {
    *p = (dg_part){.kind = DG_PART_IMAGE, .image = png, .image_len = len};
}

/* A job that draws up to two 32x48 images in 3 steps each, <BOV> biased by `bov_bias`. */
static void drawing_job(job_spec *j, const char *id, int n_messages, float bov_bias, int max_new, int max_images) {
    j->bias[0] = (dg_logit_bias){test_bov_id(pkg), bov_bias};
    j->r = (dg_request){.id = id, .messages = j->msgs, .n_messages = (size_t)n_messages, .seed = 5,
                        .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = max_new,
                                 .logit_bias = j->bias, .n_logit_bias = 1},
                        .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS |
                                         DG_IMAGE_GUIDANCE_SCALE | DG_IMAGE_MAX_IMAGES,
                                  .width = 32, .height = 48, .steps = 3, .guidance_scale = 3.0f,
                                  .max_images = max_images}};
}

static void stats(dg_sched *s, dg_cache_stats *out) { dg_sched_cache_stats(s, out); }

TEST(determinism_cold_warm_and_after_other_jobs) {
    if (!setup()) { CHECK(!"setup"); return; }
    size_t la, lb, lc;
    uint8_t *a = test_png(60, 40, 1, &la), *b = test_png(33, 71, 2, &lb), *c = test_png(80, 24, 3, &lc);

    /* R: the system prompt, then [A, text, B]; <BOV> made likely (two images drawn) */
    job_spec R = {0};
    text_part(&R.parts[0][0], SYSTEM);
    image_part(&R.parts[1][0], a, la);
    text_part(&R.parts[1][1], "Plate these two dishes side by side.");
    image_part(&R.parts[1][2], b, lb);
    R.msgs[0] = (dg_message){DG_ROLE_SYSTEM, R.parts[0], 1};
    R.msgs[1] = (dg_message){DG_ROLE_USER, R.parts[1], 3};
    drawing_job(&R, "det-r", 2, 8.0f, 24, 2);

    /* (a) cold */
    dg_sched *s1 = sched_new(1);
    test_job cold = {0}, warm = {0}, other = {0};
    CHECK_EQ_INT(test_job_run(s1, &R.r, &cold), 0);
    CHECK_EQ_INT(cold.n_png, 2);
    CHECK_EQ_INT(cold.usage.cached_prompt_tokens, 0);
    printf("  cold: %zu bytes of text, %d images, usage prompt %lld vision %lld latents %lld\n", cold.len, cold.n_png,
           (long long)cold.usage.cached_prompt_tokens, (long long)cold.usage.cached_vision,
           (long long)cold.usage.cached_latents);

    /* (b) warm: every cache hits, nothing is computed twice */
    dg_cache_stats before, after;
    stats(s1, &before);
    CHECK_EQ_INT(test_job_run(s1, &R.r, &warm), 0);
    stats(s1, &after);
    CHECK(test_job_same(&cold, &warm));
    CHECK(warm.usage.cached_prompt_tokens > 0);
    CHECK_EQ_INT(warm.usage.cached_vision, 4);    /* A and B from the KV blocks, both drawn ones from the cache */
    CHECK_EQ_INT(warm.usage.cached_latents, 5);   /* A, B for the first image; A, B, image 1 for the second */
    CHECK_EQ_INT(after.vision_misses, before.vision_misses);
    CHECK_EQ_INT(after.latent_misses, before.latent_misses);
    CHECK(after.kv_hits > before.kv_hits);
    printf("  warm: usage prompt %lld vision %lld latents %lld\n", (long long)warm.usage.cached_prompt_tokens,
           (long long)warm.usage.cached_vision, (long long)warm.usage.cached_latents);

    /* (c) another scheduler first runs X (the same system prompt and A, other text, one
     * 48x32 image) and Y (C and B, no system prompt), then R beside Z (text only) */
    dg_sched *s2 = sched_new(2);
    job_spec X = {0}, Y = {0}, Z = {0};
    text_part(&X.parts[0][0], SYSTEM);
    image_part(&X.parts[1][0], a, la);
    text_part(&X.parts[1][1], "What goes with this?");
    X.msgs[0] = (dg_message){DG_ROLE_SYSTEM, X.parts[0], 1};
    X.msgs[1] = (dg_message){DG_ROLE_USER, X.parts[1], 2};
    drawing_job(&X, "det-x", 2, 100.0f, 6, 1);
    X.r.image.width = 48;
    X.r.image.height = 32;
    image_part(&Y.parts[0][0], c, lc);
    image_part(&Y.parts[0][1], b, lb);
    text_part(&Y.parts[0][2], "Combine them.");
    Y.msgs[0] = (dg_message){DG_ROLE_USER, Y.parts[0], 3};
    drawing_job(&Y, "det-y", 1, 100.0f, 6, 1);
    text_part(&Z.parts[0][0], "How long does rice take?");
    Z.msgs[0] = (dg_message){DG_ROLE_USER, Z.parts[0], 1};
    Z.r = (dg_request){.id = "det-z", .messages = Z.msgs, .n_messages = 1, .seed = 9,
                       .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 16}};
    test_job x = {0}, y = {0}, z = {0};
    CHECK_EQ_INT(test_job_run(s2, &X.r, &x), 0);
    CHECK_EQ_INT(test_job_run(s2, &Y.r, &y), 0);
    CHECK(x.n_png == 1 && y.n_png == 1);
    char err[512];
    uint64_t seq;
    dg_sink zs = test_job_sink(&z), rs = test_job_sink(&other);
    CHECK_EQ_INT(dg_sched_submit(s2, &Z.r, &zs, &seq, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_submit(s2, &R.r, &rs, &seq, err, sizeof err), 0);
    while (dg_sched_active(s2) > 0) CHECK_EQ_INT(dg_sched_step(s2, err, sizeof err), 0);
    CHECK(z.finished && other.finished);
    CHECK(test_job_same(&cold, &other));
    /* X's blocks cover the system prompt; A's and B's latents come from X's and Y's images */
    CHECK(other.usage.cached_prompt_tokens > 0 && other.usage.cached_prompt_tokens < warm.usage.cached_prompt_tokens);
    CHECK(other.usage.cached_vision >= 2);
    CHECK(other.usage.cached_latents >= 4);
    printf("  after other jobs: usage prompt %lld vision %lld latents %lld\n",
           (long long)other.usage.cached_prompt_tokens, (long long)other.usage.cached_vision,
           (long long)other.usage.cached_latents);

    test_job_free(&cold);
    test_job_free(&warm);
    test_job_free(&other);
    test_job_free(&x);
    test_job_free(&y);
    test_job_free(&z);
    dg_sched_free(s1);
    dg_sched_free(s2);
    free(a);
    free(b);
    free(c);
}

/* The follow-up: job D draws two images at once (<BOV> forced) and then says " hello"
 * max_new times (biased below <BOV>, and alone once <BOV> is banned); job F sends D's
 * question, then D's answer as an assistant message [PNG 1, PNG 2, text], then a new
 * question, and draws again. */
TEST(determinism_follow_up_with_drawn_pngs) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    dg_tok_ids hello = {0};
    CHECK_EQ_INT(dg_tok_encode(model->tok, " hello", 6, &hello, err, sizeof err), 0);
    CHECK_EQ_INT(hello.n, 1);
    const int max_new = 20;

    job_spec D = {0};
    text_part(&D.parts[0][0], "Draw a pancake, twice.");
    D.msgs[0] = (dg_message){DG_ROLE_USER, D.parts[0], 1};
    drawing_job(&D, "det-d", 1, 100.0f, max_new, 2);
    D.bias[1] = (dg_logit_bias){hello.ids[0], 60.0f};
    D.r.text.n_logit_bias = 2;
    dg_sched *warm_s = sched_new(1);
    test_job d = {0};
    CHECK_EQ_INT(test_job_run(warm_s, &D.r, &d), 0);
    CHECK_EQ_INT(d.n_png, 2);
    CHECK(strncmp(d.events, "spppispppi", 10) == 0);   /* the images first */
    CHECK_EQ_INT(d.len, (size_t)6 * max_new);

    job_spec F = {0};
    F.parts[0][0] = D.parts[0][0];
    if (d.n_png == 2) {
        image_part(&F.parts[1][0], d.png[0], d.png_len[0]);
        image_part(&F.parts[1][1], d.png[1], d.png_len[1]);
    }
    F.parts[1][2] = (dg_part){.kind = DG_PART_TEXT, .text = d.text, .text_len = d.len};
    text_part(&F.parts[2][0], "Now slice it.");
    F.msgs[0] = (dg_message){DG_ROLE_USER, F.parts[0], 1};
    F.msgs[1] = (dg_message){DG_ROLE_ASSISTANT, F.parts[1], 3};
    F.msgs[2] = (dg_message){DG_ROLE_USER, F.parts[2], 1};
    drawing_job(&F, "det-f", 3, 100.0f, 4, 1);

    test_job fw = {0}, ff = {0};
    dg_cache_stats before, after;
    dg_sched_cache_stats(warm_s, &before);
    CHECK_EQ_INT(test_job_run(warm_s, &F.r, &fw), 0);
    dg_sched_cache_stats(warm_s, &after);
    dg_sched *fresh_s = sched_new(1);
    CHECK_EQ_INT(test_job_run(fresh_s, &F.r, &ff), 0);
    CHECK_EQ_INT(fw.n_png, 1);
    CHECK(test_job_same(&fw, &ff));

    /* D's KV held its prompt, <BOV> <|vision_start|> <|image_pad|>*n <|vision_end|> twice
     * and max_new - 1 " hello" (the last one sampled, never fed); F's prompt renders the
     * same tokens, so F reuses every full block of them */
    int32_t grid[3];
    CHECK_EQ_INT(dg_image_grid(48, 32, &model->pp, grid, err, sizeof err), 0);
    int n_img = dg_vision_tokens(&model->vision, grid[0], grid[1], grid[2]);
    int64_t d_kv = d.usage.prompt_tokens + 2 * (n_img + 3) + max_new - 1;
    CHECK_EQ_INT(fw.usage.cached_prompt_tokens, d_kv / 16 * 16);
    CHECK(fw.usage.cached_prompt_tokens >= d.usage.prompt_tokens + 2 * (n_img + 3));
    CHECK_EQ_INT(ff.usage.cached_prompt_tokens, 0);
    /* both PNGs' positions came from D's blocks: no tower run, no vision lookup for them
     * (the one lookup is F's own drawn image) */
    CHECK_EQ_INT(fw.usage.cached_vision, 2);
    CHECK_EQ_INT((after.vision_hits + after.vision_misses) - (before.vision_hits + before.vision_misses), 1);
    CHECK_EQ_INT(ff.usage.cached_vision, 0);
    /* PNG 1 was a condition of D's second image: its latent (the VAE encoding of its
     * pixels) is cached; PNG 2's is encoded now, as on the fresh scheduler */
    CHECK_EQ_INT(fw.usage.cached_latents, 1);
    CHECK_EQ_INT(ff.usage.cached_latents, 0);
    printf("  follow-up: prompt %lld tokens, %lld from D's blocks (D computed %lld)\n",
           (long long)fw.usage.prompt_tokens, (long long)fw.usage.cached_prompt_tokens, (long long)d_kv);

    test_job_free(&d);
    test_job_free(&fw);
    test_job_free(&ff);
    dg_tok_ids_free(&hello);
    dg_sched_free(warm_s);
    dg_sched_free(fresh_s);
}

/* ---- what the end-to-end equality rests on ----------------------------------------------- */

/* The rows one way of feeding a token sequence leaves: every layer's K and V of every
 * position, every position's condition row, the last position's logits (host copies). */
typedef struct {
    float *kv;       /* [layers, 2, n, kv_dim] */
    float *cond;     /* [n, d_cond] */
    float *logits;   /* [V] */
} fed_rows;

typedef struct {
    dg_cond_acc *acc;
    float       *normed;   /* backend [n, D] */
    int          rc;
} hook_ctx;

/* The scheduler's condition hook (sched.c cond_hook): the last layer after model.norm. */
static void cond_hook(void *user, int layer, const float *hidden, int n, int pos0) {
    hook_ctx *h = user;
    const dg_model *m = model;
    if (layer == m->cfg.text.n_layers - 1) {
        m->be->rmsnorm(m->be, h->normed, hidden, m->llm.norm, n, m->cfg.text.hidden_size, m->cfg.text.rms_norm_eps);
        hidden = h->normed;
    }
    if (!h->rc) h->rc = dg_cond_acc_add(&m->conn, h->acc, layer, hidden, n, pos0);
}

/* ids[0..n) through the decoder in pieces of pieces[0], pieces[1], ... tokens (one forward
 * each, as a prefill chunk, the tail after a prefix hit, or a decode step would be). */
static int feed_in_pieces(const int32_t *ids, int n, const int *pieces, int n_pieces, fed_rows *out) {
    const dg_model *m = model;
    const dg_text_config *c = &m->cfg.text;
    const int kv_dim = c->n_kv_heads * c->head_dim, d = m->conn.d_cond;
    char err[256];
    dg_kv_cache *kv = NULL;
    dg_qwen2_state *st = NULL;
    dg_kv_seq seq = {0};
    hook_ctx h = {0};
    int rc = -1, done = 0;
    *out = (fed_rows){malloc(sizeof(float) * (size_t)c->n_layers * 2 * n * kv_dim),
                      malloc(sizeof(float) * (size_t)n * d), malloc(sizeof(float) * (size_t)c->vocab_size)};
    if (!out->kv || !out->cond || !out->logits ||
        !(h.normed = m->be->alloc(m->be, sizeof(float) * (size_t)n * c->hidden_size)) ||
        dg_kv_cache_new(m->be, c->n_layers, kv_dim, 16, 64, DG_DTYPE_F32, &kv, err, sizeof err) < 0 ||
        dg_qwen2_state_new(&m->llm, m->be, 256, 1, &st, err, sizeof err) < 0 || dg_kv_seq_init(&seq, 1024, 16) < 0 ||
        dg_cond_acc_new(&m->conn, m->be, 1024, 256, &h.acc, err, sizeof err) < 0)
        goto out;
    dg_cond_acc_reset(&m->conn, h.acc);
    dg_qwen2_hook hook = {cond_hook, &h};
    for (int i = 0; i < n_pieces; done += pieces[i++]) {
        dg_qwen2_input in = {.ids = ids + done, .n = pieces[i], .n_logits = i == n_pieces - 1};
        if (dg_qwen2_forward(&m->llm, st, kv, &seq, &in, &hook, err, sizeof err) < 0 || h.rc < 0) goto out;
    }
    for (int l = 0; l < c->n_layers; l++) {
        dg_kv_view v = dg_kv_cache_layer(kv, &seq, l);
        for (int p = 0; p < n; p++) {
            int64_t row = (int64_t)v.block_table[p / v.block_size] * v.block_size + p % v.block_size;
            const float *k_row = (const float *)v.k + row * kv_dim, *v_row = (const float *)v.v + row * kv_dim;
            m->be->download(m->be, out->kv + (((int64_t)l * 2 + 0) * n + p) * kv_dim, k_row, kv_dim);
            m->be->download(m->be, out->kv + (((int64_t)l * 2 + 1) * n + p) * kv_dim, v_row, kv_dim);
        }
    }
    m->be->download(m->be, out->cond, h.acc->acc, (int64_t)n * d);
    memcpy(out->logits, st->logits, sizeof(float) * (size_t)c->vocab_size);
    rc = 0;
out:
    if (rc) printf("  feed: %s\n", err);
    dg_kv_seq_release(kv, &seq);
    dg_kv_seq_free(&seq);
    dg_cond_acc_free(&m->conn, h.acc);
    dg_qwen2_state_free(&m->llm, st);
    dg_kv_cache_free(kv);
    m->be->release(m->be, h.normed);
    return rc;
}

static void fed_rows_free(fed_rows *r) {
    free(r->kv);
    free(r->cond);
    free(r->logits);
}

/* Which of the three differ in any bit ("" when none). */
static const char *fed_rows_diff(const fed_rows *a, const fed_rows *b, int n, char *buf, size_t len) {
    const dg_text_config *c = &model->cfg.text;
    size_t kv = sizeof(float) * (size_t)c->n_layers * 2 * n * c->n_kv_heads * c->head_dim;
    snprintf(buf, len, "%s%s%s", memcmp(a->kv, b->kv, kv) ? " K/V" : "",
             memcmp(a->cond, b->cond, sizeof(float) * (size_t)n * model->conn.d_cond) ? " condition rows" : "",
             memcmp(a->logits, b->logits, sizeof(float) * (size_t)c->vocab_size) ? " logits" : "");
    return buf;
}

/* The caches hand a sequence rows that another way of feeding computed: K/V and condition
 * rows of a shared prefix (a cold prefill computed them in one chunk, the tail after a hit
 * is its own chunk), of decoded tokens (one row per forward) that a follow-up's prefill
 * computes many at a time, and vision rows of an image encoded beside others. Each way
 * must give the same bits, or a warm answer is not a cold one: this holds when every row
 * of the backend's matmul is bit-identical whatever the number of rows m (a GEMV at m = 1
 * beside a GEMM at larger m, or a GEMM whose blocking depends on m, differs in the last
 * bits); attention, norms and RoPE are per row already. */
/* Two pictures whose 128-bit digests differ but agree in their first 64 bits but one: the
 * KV key of an image's tokens took those 63 bits alone, and a picture made to agree with
 * another's there (a birthday search of 2^32.7 SHA-256 over its last 8 pixel bytes, the two
 * tails below) was answered from the other's cached KV: the vision tower skipped, the
 * other picture described. The keys now fold all 128 bits in, keyed by a per-process
 * secret; the job after the other is answered as on a cold scheduler. */
#define PAIR_W 56
#define PAIR_H 56

static uint8_t *pair_png(int which, uint64_t tail, size_t *len) {
    dg_image *img = NULL;
    uint8_t *png = NULL;
    char err[128];
    CHECK_EQ_INT(dg_image_new(PAIR_W, PAIR_H, &img), 0);
    for (int i = 0; i < PAIR_W * PAIR_H; i++) {   /* 0: a red-to-yellow gradient; 1: blue stripes */
        uint8_t *p = img->rgb + 3 * i;
        const int y = i / PAIR_W, x = i % PAIR_W;
        if (!which) p[0] = 230, p[1] = (uint8_t)(y * 4), p[2] = 20;
        else p[0] = 10, p[1] = (uint8_t)((x / 7) % 2 ? 200 : 40), p[2] = 240;
    }
    memcpy(img->rgb + PAIR_W * PAIR_H * 3 - 8, &tail, 8);   /* little-endian, as searched */
    CHECK_EQ_INT(dg_image_encode_png(img, NULL, 0, &png, len, err, sizeof err), 0);
    dg_image_free(img);
    return png;
}

TEST(determinism_pictures_alike_in_63_key_bits_are_told_apart) {
    if (!setup()) SKIP("tiny package");
    static const uint64_t tails[2] = {0x434634a80dabff8bull, 0x04e38bf5f90e85b5ull};
    static const char *ask = "Describe the colours of this picture, then tell me what it reminds you of.";
    size_t len[2];
    uint8_t *png[2];
    dg_image_digest d[2];
    for (int k = 0; k < 2; k++) {
        png[k] = pair_png((int)(tails[k] >> 1 & 1), tails[k], &len[k]);
        dg_image *img = NULL;
        char err[128];
        CHECK_EQ_INT(dg_image_decode(png[k], len[k], NULL, &(dg_image_limits){0}, &img, err, sizeof err), 0);
        dg_image_hash(img, &d[k]);
        dg_image_free(img);
    }
    CHECK(memcmp(&d[0], &d[1], sizeof d[0]) != 0);
    uint64_t lo[2];
    for (int k = 0; k < 2; k++) memcpy(&lo[k], d[k].bytes, 8);
    CHECK((lo[0] | 1) == (lo[1] | 1));   /* the pair: their first 63 bits agree */
    CHECK(dg_seq_image_key(&d[0]) != dg_seq_image_key(&d[1]));
    job_spec j[2];
    for (int k = 0; k < 2; k++) {
        text_part(&j[k].parts[0][0], SYSTEM);
        image_part(&j[k].parts[1][0], png[k], len[k]);
        text_part(&j[k].parts[1][1], ask);
        j[k].msgs[0] = (dg_message){DG_ROLE_SYSTEM, j[k].parts[0], 1};
        j[k].msgs[1] = (dg_message){DG_ROLE_USER, j[k].parts[1], 2};
        j[k].r = (dg_request){.id = k ? "v" : "x", .messages = j[k].msgs, .n_messages = 2, .seed = 3,
                              .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = 24,
                                       .temperature = 0.0f},
                              .image = {.set = DG_IMAGE_MAX_IMAGES, .max_images = 0}};
    }
    dg_sched *warm = sched_new(1), *cold = sched_new(1);
    test_job x = {0}, v_warm = {0}, v_cold = {0};
    CHECK_EQ_INT(test_job_run(warm, &j[0].r, &x), 0);
    CHECK_EQ_INT(test_job_run(warm, &j[1].r, &v_warm), 0);
    CHECK_EQ_INT(test_job_run(cold, &j[1].r, &v_cold), 0);
    printf("  x: [%s]\n  v after x: [%s] (%lld prompt tokens cached)\n  v cold: [%s]\n", x.text, v_warm.text,
           (long long)v_warm.usage.cached_prompt_tokens, v_cold.text);
    CHECK(test_job_same(&v_warm, &v_cold));
    test_job_free(&x);
    test_job_free(&v_warm);
    test_job_free(&v_cold);
    dg_sched_free(warm);
    dg_sched_free(cold);
    free(png[0]);
    free(png[1]);
}

TEST(determinism_rows_do_not_depend_on_chunking) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512], why[64];
    dg_tok_ids ids = {0};
    CHECK_EQ_INT(dg_tok_encode(model->tok, SYSTEM, strlen(SYSTEM), &ids, err, sizeof err), 0);
    const int n = (int)ids.n;
    CHECK(n > 24);
    int whole[1] = {n}, after_hit[2] = {16, n - 16}, decoded[7] = {n - 6, 1, 1, 1, 1, 1, 1};
    fed_rows cold = {0}, hit = {0}, dec = {0};
    CHECK_EQ_INT(feed_in_pieces(ids.ids, n, whole, 1, &cold), 0);
    CHECK_EQ_INT(feed_in_pieces(ids.ids, n, after_hit, 2, &hit), 0);
    CHECK_EQ_INT(feed_in_pieces(ids.ids, n, decoded, 7, &dec), 0);
    fed_rows_diff(&cold, &hit, n, why, sizeof why);
    if (why[0]) printf("  a prefix hit's tail differs from the cold prefill in:%s\n", why);
    CHECK(!why[0]);
    fed_rows_diff(&cold, &dec, n, why, sizeof why);
    if (why[0]) printf("  decoded tokens differ from the same tokens prefilled in:%s\n", why);
    CHECK(!why[0]);
    fed_rows_free(&cold);
    fed_rows_free(&hit);
    fed_rows_free(&dec);
    dg_tok_ids_free(&ids);

    /* an image's vision rows alone and second in one call with another image */
    size_t la, lb;
    uint8_t *a = test_png(60, 40, 1, &la), *b = test_png(33, 71, 2, &lb);
    dg_image *ia = NULL, *ib = NULL;
    dg_vision_state *vs = NULL;
    CHECK_EQ_INT(dg_image_decode(a, la, "a", &(dg_image_limits){0}, &ia, err, sizeof err), 0);
    CHECK_EQ_INT(dg_image_decode(b, lb, "b", &(dg_image_limits){0}, &ib, err, sizeof err), 0);
    CHECK_EQ_INT(dg_vision_state_new(&model->vision, model->be, 4096, &vs, err, sizeof err), 0);
    int32_t ga[3], gb[3];
    CHECK_EQ_INT(dg_image_grid(ia->height, ia->width, &model->pp, ga, err, sizeof err), 0);
    CHECK_EQ_INT(dg_image_grid(ib->height, ib->width, &model->pp, gb, err, sizeof err), 0);
    const int O = model->cfg.vision.out_hidden_size;
    const int na = dg_vision_tokens(&model->vision, ga[0], ga[1], ga[2]);
    const int nb = dg_vision_tokens(&model->vision, gb[0], gb[1], gb[2]);
    float *alone = model->be->alloc(model->be, sizeof(float) * (size_t)na * O);
    float *pair = model->be->alloc(model->be, sizeof(float) * (size_t)(na + nb) * O);
    const dg_image *one[1] = {ia}, *two[2] = {ib, ia};
    CHECK_EQ_INT(dg_vision_encode(&model->vision, vs, NULL, &model->pp, one, 1, alone, NULL, err, sizeof err), 0);
    CHECK_EQ_INT(dg_vision_encode(&model->vision, vs, NULL, &model->pp, two, 2, pair, NULL, err, sizeof err), 0);
    CHECK(memcmp(alone, pair + (int64_t)nb * O, sizeof(float) * (size_t)na * O) == 0);
    model->be->release(model->be, alone);
    model->be->release(model->be, pair);
    dg_vision_state_free(&model->vision, vs);
    dg_image_free(ia);
    dg_image_free(ib);
    free(a);
    free(b);
}

int main(void) {
    int rc = test_main();
    dg_model_close(model);
    return rc;
}
