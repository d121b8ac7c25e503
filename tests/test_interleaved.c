/* The interleaved loop on the tiny package (mllm + vision + DiT + VAE + connector): with a
 * logit bias that makes <BOV> likely, the scheduler draws max_images images of the
 * requested size between text, sends events in order, never lets <BOV> into the text, and
 * bans it after max_images. A second run of the same job, now served by the prefix KV,
 * vision and latent caches, gives byte-identical text and PNGs; and caches never change
 * an answer, only the work done. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/device.h"
#include "common/harness.h"
#include "common/jobs.h"
#include "common/package.h"
#include "duogen.h"
#include "io/image.h"
#include "model.h"
#include "text/tokenizer.h"

static const char *pkg;   /* the tiny package of seed 11 with the Qwen2 vocabulary, made once */

static int setup(void) { return (pkg = test_package_once("tiny", 11, TEST_QWEN2_VOCAB)) != NULL; }

/* The package opened on the CPU, or NULL after failing the case. */
static dg_model *open_tiny(void) {
    char err[512];
    dg_model *m = NULL;
    if (!setup()) {
        CHECK(!"setup");
        return NULL;
    }
    int rc = dg_model_open(pkg, NULL, &m, err, sizeof err);
    CHECK_EQ_INT(rc, 0);
    if (rc) printf("  %s\n", err);
    return m;
}

TEST(interleaved_two_images_with_two_inputs_and_caches) {
    char err[512];
    dg_model *m = open_tiny();
    if (!m) return;
    dg_sched *s;
    int rc;
    CHECK(strstr(dg_model_describe(m), "vision") && strstr(dg_model_describe(m), "cosmos dit"));
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);

    size_t l1, l2;
    uint8_t *a = test_png(60, 40, 1, &l1), *b = test_png(33, 71, 2, &l2);
    dg_part parts[3] = {{.kind = DG_PART_IMAGE, .image = a, .image_len = l1},
                        {.kind = DG_PART_IMAGE, .image = b, .image_len = l2},
                        {.kind = DG_PART_TEXT, .text = "Cook these two.", .text_len = 15}};
    dg_message msg = {DG_ROLE_USER, parts, 3};
    dg_logit_bias bias = {test_bov_id(pkg), 8.0f};   /* <BOV>: mkmodel adds it after the last added token */
    dg_request r = {.id = "inter-1", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 24, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_GUIDANCE_SCALE |
                                     DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 48, .steps = 3, .guidance_scale = 3.0f, .max_images = 2}};
    test_job c1 = {0};
    rc = test_job_run(s, &r, &c1);
    CHECK_EQ_INT(rc, 0);
    if (rc) printf("  %s\n", c1.error);
    CHECK_EQ_INT(c1.n_png, 2);
    for (int i = 0; i < c1.n_png; i++) {
        CHECK_EQ_INT(c1.png_w[i], 32);
        CHECK_EQ_INT(c1.png_h[i], 48);
        dg_image *img = NULL;
        CHECK_EQ_INT(dg_image_decode(c1.png[i], c1.png_len[i], "out", &(dg_image_limits){0}, &img, err, sizeof err), 0);
        if (img) CHECK(img->width == 32 && img->height == 48);
        dg_image_free(img);
    }
    /* two images: started, 3 steps, done, each; <BOV> banned afterwards; then finished */
    CHECK(strstr(c1.events, "spppi") != NULL);
    const char *second = strstr(c1.events, "spppi");
    CHECK(second && strstr(second + 5, "spppi") != NULL);
    CHECK_EQ_INT(c1.events[c1.n_events - 1], 'f');
    CHECK(strstr(c1.text, "<BOV>") == NULL);
    CHECK_EQ_INT(c1.usage.images, 2);
    CHECK_EQ_INT(c1.usage.cached_vision, 0);
    /* the first image encodes both inputs; the second finds them in the latent cache and
     * encodes the first drawn image (from its pixels, as any later job would) */
    CHECK_EQ_INT(c1.usage.cached_latents, 2);

    /* again: the same answer from the caches */
    test_job c2 = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c2), 0);
    CHECK_EQ_INT(c2.len, c1.len);
    CHECK(c2.len == c1.len && memcmp(c2.text, c1.text, c1.len) == 0);
    CHECK_EQ_INT(c2.n_png, c1.n_png);
    for (int i = 0; i < c1.n_png && i < c2.n_png; i++)
        CHECK(c1.png_len[i] == c2.png_len[i] && memcmp(c1.png[i], c2.png[i], c1.png_len[i]) == 0);
    CHECK(c2.usage.cached_prompt_tokens > 0);
    /* the inputs' positions all come from the prefix KV cache (no tower run), the drawn
     * images' tower outputs from the vision cache */
    CHECK_EQ_INT(c2.usage.cached_vision, 4);
    CHECK_EQ_INT(c2.usage.cached_latents, 5);     /* 2 for the first image, 3 for the second */
    dg_cache_stats cs;
    dg_sched_cache_stats(s, &cs);
    CHECK(cs.vision_hits >= 2 && cs.latent_hits >= 5 && cs.kv_hits > 0);

    /* and on a scheduler with empty caches */
    dg_sched *s2;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s2, err, sizeof err), 0);
    test_job c3 = {0};
    CHECK_EQ_INT(test_job_run(s2, &r, &c3), 0);
    CHECK(c3.len == c1.len && memcmp(c3.text, c1.text, c1.len) == 0);
    for (int i = 0; i < c1.n_png && i < c3.n_png; i++)
        CHECK(c1.png_len[i] == c3.png_len[i] && memcmp(c1.png[i], c3.png[i], c1.png_len[i]) == 0);
    test_job_free(&c1);
    test_job_free(&c2);
    test_job_free(&c3);
    free(a);
    free(b);
    dg_sched_free(s2);
    dg_sched_free(s);
    dg_model_close(m);
}

/* A conversation holds DG_MAX_IMAGES pictures: with one place left the job draws one and
 * then writes on with <BOV> banned, as after max_images (it used to end there as if out of
 * tokens); one input too many is refused with DG_ELIMIT, naming the limit. */
TEST(a_full_conversation_draws_no_more_and_writes_on) {
    char err[512];
    dg_model *m = open_tiny();
    if (!m) return;
    dg_sched *s;
    int rc;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    enum { N = DG_MAX_IMAGES + 1 };
    uint8_t *png[N];
    dg_part parts[N + 1];
    for (int i = 0; i < N; i++) {
        size_t len;
        png[i] = test_png(28, 28, i, &len);
        parts[i] = (dg_part){.kind = DG_PART_IMAGE, .image = png[i], .image_len = len};
    }
    dg_message msg = {DG_ROLE_USER, parts, DG_MAX_IMAGES};   /* DG_MAX_IMAGES - 1 images, then the text */
    parts[DG_MAX_IMAGES - 1] = (dg_part){.kind = DG_PART_TEXT, .text = "Go on.", .text_len = 6};
    dg_logit_bias bias = {test_bov_id(pkg), 100.0f};   /* <BOV> whenever it is allowed */
    dg_request r = {.id = "full-1", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 6, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 32, .steps = 1, .max_images = 4}};
    test_job c = {0};
    rc = test_job_run(s, &r, &c);
    CHECK_EQ_INT(rc, 0);
    if (rc) printf("  %s\n", c.error);
    CHECK_EQ_INT(c.n_png, 1);
    CHECK_EQ_INT(c.usage.images, 1);
    CHECK_EQ_INT(c.usage.generated_tokens, 6);   /* the text went on to max_new_tokens */
    CHECK_EQ_INT(c.reason, DG_FINISH_LENGTH);
    CHECK(strstr(c.text, "<BOV>") == NULL);
    test_job_free(&c);

    /* DG_MAX_IMAGES + 1 inputs: refused, naming the limit */
    parts[DG_MAX_IMAGES - 1] = parts[DG_MAX_IMAGES];
    parts[N] = (dg_part){.kind = DG_PART_TEXT, .text = "Go on.", .text_len = 6};
    msg.n_parts = N + 1;
    r.id = "full-2";
    test_job c2 = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c2), DG_ELIMIT);
    CHECK(strstr(c2.error, "more than 32 images"));
    test_job_free(&c2);
    for (int i = 0; i < N; i++) free(png[i]);
    dg_sched_free(s);
    dg_model_close(m);
}

/* A drawn picture goes back into the context: a size whose picture alone fills it was
 * accepted, and the answer ended at its first <BOV>, "done" and "length", with no picture
 * and no word (a 1024x1024 picture of the shapes model, 1024 tokens of context). Refused at
 * admission, naming the size and the tokens. */
TEST(a_picture_size_that_fills_the_context_is_refused) {
    char err[512];
    dg_model *m = open_tiny();
    if (!m) return;
    dg_sched *s;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    /* the smallest square of multiples of 16 whose picture does not fit, and the one before */
    int side = 16, tokens = 0;
    for (;; side += 16) {
        int32_t grid[3];
        CHECK_EQ_INT(dg_image_grid(side, side, &m->pp, grid, err, sizeof err), 0);
        tokens = dg_vision_tokens(&m->vision, grid[0], grid[1], grid[2]);
        if (tokens + 5 >= m->max_context) break;
    }
    CHECK(side <= m->dit.cfg.max_w * 16);   /* within what the DiT draws: the context decides */
    dg_part part = {.kind = DG_PART_TEXT, .text = "Draw.", .text_len = 5};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_logit_bias bias = {test_bov_id(pkg), 100.0f};
    dg_request r = {.id = "ctx-1", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 2, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                              .width = side, .height = side, .steps = 1, .max_images = 1}};
    test_job c = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c), DG_ELIMIT);
    char want[160];
    snprintf(want, sizeof want, "image size %dx%d: a picture of it takes %d tokens of the context once drawn; "
             "this model's context is %d tokens in all", side, side, tokens + 2, m->max_context);
    CHECK(strcmp(c.error, want) == 0);
    if (strcmp(c.error, want)) printf("  got \"%s\", want \"%s\"\n", c.error, want);
    test_job_free(&c);
    /* max_images 0: no picture is drawn, the size is not looked at */
    r.id = "ctx-2";
    r.image.max_images = 0;
    test_job c2 = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c2), 0);
    CHECK_EQ_INT(c2.n_png, 0);
    test_job_free(&c2);
    /* half the side: drawn */
    r.id = "ctx-3";
    r.image.max_images = 1;
    r.image.width = r.image.height = side / 32 * 16;
    test_job c3 = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c3), 0);
    CHECK_EQ_INT(c3.n_png, 1);
    test_job_free(&c3);
    dg_sched_free(s);
    dg_model_close(m);
}

/* A job whose pictures alone take the whole context is refused from their headers, before
 * any is decoded (sixteen 7000x7000 PNGs were 2.4 GB of pixels held for half a minute, then
 * refused for the prompt's length). The PNGs here are headers and nothing more: the job's
 * refusal names the tokens, not a truncated file; a small one that fits goes on to the
 * decoder, which names it truncated. */
TEST(images_over_the_context_are_refused_before_decoding) {
    char err[512];
    dg_model *m = open_tiny();
    if (!m) return;
    dg_sched *s;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    static const uint8_t big[24] = "\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\x1b\x58\0\0\x1b\x58";   /* 7000x7000 */
    static const uint8_t small[24] = "\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x38\0\0\0\x38";   /* 56x56 */
    enum { N = 16 };
    dg_part parts[N + 1];
    for (int i = 0; i < N; i++) parts[i] = (dg_part){.kind = DG_PART_IMAGE, .image = big, .image_len = sizeof big};
    parts[N] = (dg_part){.kind = DG_PART_TEXT, .text = "Compare.", .text_len = 8};
    dg_message msg = {DG_ROLE_USER, parts, N + 1};
    dg_request r = {.id = "huge-1", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 2}};
    int32_t grid[3];
    CHECK_EQ_INT(dg_image_grid(7000, 7000, &m->pp, grid, err, sizeof err), 0);
    const int64_t each = dg_vision_tokens(&m->vision, grid[0], grid[1], grid[2]);
    CHECK(each * N >= m->max_context);   /* the case this test is about */
    test_job c = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c), DG_ELIMIT);
    char want[128];
    snprintf(want, sizeof want, "the 16 images take %lld tokens; this model takes at most %d in all",
             (long long)(each * N), m->max_context);
    CHECK(strstr(c.error, want) != NULL);
    if (!strstr(c.error, want)) printf("  got \"%s\", want \"%s\"\n", c.error, want);
    test_job_free(&c);

    parts[0] = (dg_part){.kind = DG_PART_IMAGE, .image = small, .image_len = sizeof small};
    parts[1] = parts[N];
    msg.n_parts = 2;
    r.id = "huge-2";
    test_job c2 = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c2), DG_EIMAGE);
    CHECK(strstr(c2.error, "image 1: truncated PNG") != NULL);
    if (!strstr(c2.error, "image 1: truncated PNG")) printf("  got \"%s\"\n", c2.error);
    test_job_free(&c2);
    dg_sched_free(s);
    dg_model_close(m);
}

/* A favoured id that is no token (a padding row of lm_head: the tiny package's tokenizer has
 * ids below 151666, its lm_head 151936 rows) is refused, naming both sizes: the job ran
 * "done" with an answer of nothing. A ban of one is taken: the job runs. */
TEST(a_bias_for_a_padding_row_is_refused_and_a_ban_of_one_is_taken) {
    char err[512];
    dg_model *m = open_tiny();
    if (!m) return;
    const int32_t pad = m->cfg.text.vocab_size - 1;
    CHECK(!dg_tok_has(m->tok, pad) && dg_tok_has(m->tok, 48));   /* the case this test is about */
    dg_sched *s;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    dg_part part = {.kind = DG_PART_TEXT, .text = "Say it.", .text_len = 7};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_logit_bias bias = {pad, 100.0f};
    dg_request r = {.id = "pad-1", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 2, .logit_bias = &bias, .n_logit_bias = 1}};
    test_job c = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c), DG_EINVAL);
    char want[160];
    snprintf(want, sizeof want, "text.logit_bias: token %d is not one of the tokenizer's (ids below %d; the model's %d",
             pad, dg_tok_n_ids(m->tok), m->cfg.text.vocab_size);
    CHECK(strstr(c.error, want) == c.error);
    if (strstr(c.error, want) != c.error) printf("  got \"%s\"\n", c.error);
    test_job_free(&c);
    bias.bias = -INFINITY;
    r.id = "pad-2";
    test_job c2 = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c2), 0);
    CHECK_EQ_INT(c2.usage.generated_tokens, 2);
    test_job_free(&c2);
    dg_sched_free(s);
    dg_model_close(m);
}

/* A drawn image's tokens join the context the repetition penalty reads, as a prompt
 * image's do (and as transformers reads every id of its input). <|vision_start|> is
 * biased +100 and "Q" (id 48) +90, the penalty 2: after the drawn image the first is
 * (logit + 100) / 2 and "Q" is sampled; before, <|vision_start|> had not been seen and came
 * first (a special token: no text; max_new_tokens 1, <BOV> not counted, leaves room for
 * that one token only). The margins are wide: with no penalty <|vision_start|> still wins
 * against "Q" at +80. */
TEST(a_drawn_images_tokens_count_for_the_repetition_penalty) {
    char err[512];
    dg_model *m = open_tiny();
    if (!m) return;
    dg_sched *s;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    dg_part part = {.kind = DG_PART_TEXT, .text = "Draw.", .text_len = 5};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_logit_bias bias[3] = {{test_bov_id(pkg), 200.0f}, {m->vision_start_id, 100.0f}, {48, 90.0f}};
    dg_request r = {.id = "penalty-1", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE | DG_TEXT_REPETITION_PENALTY,
                             .max_new_tokens = 1, .temperature = 0.0f, .repetition_penalty = 2.0f,
                             .logit_bias = bias, .n_logit_bias = 3},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 32, .steps = 1, .max_images = 1}};
    test_job c = {0};
    int rc = test_job_run(s, &r, &c);
    CHECK_EQ_INT(rc, 0);
    if (rc) printf("  %s\n", c.error);
    CHECK_EQ_INT(c.n_png, 1);
    CHECK_EQ_INT(c.usage.generated_tokens, 1);   /* the one token after the picture */
    CHECK(strcmp(c.text, "Q") == 0);
    if (strcmp(c.text, "Q")) printf("  text after the image: \"%s\"\n", c.text);
    test_job_free(&c);
    dg_sched_free(s);
    dg_model_close(m);
}

/* max_condition_frames: a picture is conditioned on the latest earlier pictures only. Three
 * inputs, one drawing: with a bound of 1 the DiT sees one condition frame (the latent cache
 * serves one on the job's second run, not three) and draws another picture; a bound of 3 or
 * more is no bound: the same PNG bytes as none. */
TEST(max_condition_frames_keeps_the_latest_pictures) {
    char err[512];
    dg_model *m = open_tiny();
    if (!m) return;
    int rc;
    size_t len[3];
    uint8_t *png[3] = {test_png(60, 40, 1, &len[0]), test_png(33, 71, 2, &len[1]), test_png(48, 48, 3, &len[2])};
    dg_part parts[4] = {{.kind = DG_PART_IMAGE, .image = png[0], .image_len = len[0]},
                        {.kind = DG_PART_IMAGE, .image = png[1], .image_len = len[1]},
                        {.kind = DG_PART_IMAGE, .image = png[2], .image_len = len[2]},
                        {.kind = DG_PART_TEXT, .text = "Now the next one.", .text_len = 17}};
    dg_message msg = {DG_ROLE_USER, parts, 4};
    dg_logit_bias bias = {test_bov_id(pkg), 100.0f};
    dg_request r = {.id = "frames", .messages = &msg, .n_messages = 1, .seed = 9,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 4, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_GUIDANCE_SCALE |
                                     DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 32, .steps = 2, .guidance_scale = 3.0f, .max_images = 1}};
    static const int bound[3] = {0, 1, 3};
    test_job first[3] = {0}, again[3] = {0};
    for (int b = 0; b < 3; b++) {
        dg_sched *s;
        rc = dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1, .max_condition_frames = bound[b]}, &s, err, sizeof err);
        CHECK_EQ_INT(rc, 0);
        if (rc) break;
        CHECK_EQ_INT(test_job_run(s, &r, &first[b]), 0);
        CHECK_EQ_INT(test_job_run(s, &r, &again[b]), 0);
        CHECK_EQ_INT(first[b].n_png, 1);
        CHECK_EQ_INT(first[b].usage.cached_latents, 0);
        CHECK_EQ_INT(again[b].usage.cached_latents, bound[b] ? bound[b] : 3);   /* the frames the DiT saw */
        CHECK(test_job_same(&first[b], &again[b]));
        dg_sched_free(s);
    }
    CHECK(test_job_same(&first[0], &first[2]));
    CHECK(first[0].n_png == 1 && first[1].n_png == 1 &&
          (first[0].png_len[0] != first[1].png_len[0] || memcmp(first[0].png[0], first[1].png[0], first[0].png_len[0])));
    dg_sched *bad = NULL;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_condition_frames = -1}, &bad, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "max_condition_frames -1"));
    for (int b = 0; b < 3; b++) {
        test_job_free(&first[b]);
        test_job_free(&again[b]);
    }
    for (int i = 0; i < 3; i++) free(png[i]);
    dg_model_close(m);
}

/* dir/file's tensor `name` (BF16) set to NaN in place: 0, or -1 when it is not there. */
static int nan_tensor(const char *dir, const char *file, const char *name) {
    char path[700];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r+b");
    uint8_t len8[8];
    if (!f || fread(len8, 1, 8, f) != 8) {
        if (f) fclose(f);
        return -1;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | len8[i];
    char *head = malloc(hlen + 1);
    int rc = -1;
    json_t *h = head && fread(head, 1, hlen, f) == hlen ? json_loadb(head, hlen, 0, NULL) : NULL;
    json_t *off = json_object_get(json_object_get(h, name), "data_offsets");
    const char *dtype = json_string_value(json_object_get(json_object_get(h, name), "dtype"));
    if (off && dtype && !strcmp(dtype, "BF16")) {
        const long b = (long)json_integer_value(json_array_get(off, 0)), e = (long)json_integer_value(json_array_get(off, 1));
        rc = fseek(f, 8 + (long)hlen + b, SEEK_SET);
        for (long i = b; rc == 0 && i < e; i += 2) rc = fputc(0xc0, f) == EOF || fputc(0x7f, f) == EOF ? -1 : 0;
    }
    json_decref(h);
    free(head);
    return fclose(f) || rc ? -1 : 0;
}

/* A package whose DiT weights hold NaN drew black pictures, each job "done", and its
 * warm-up passed: the warm-up's picture, NaN, now refuses it. */
TEST(warmup_refuses_a_package_that_draws_nan) {
    char dir[512], err[512];
    if (test_make_package("tiny", 3, NULL, dir, sizeof dir) < 0) { CHECK(!"package"); return; }
    CHECK_EQ_INT(nan_tensor(dir, "dit/diffusion_pytorch_model.safetensors", "proj_out.weight"), 0);
    dg_model *m = NULL;
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), 0);
    if (!m) return;
    dg_sched *s = NULL;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    if (s) {
        CHECK_EQ_INT(dg_sched_warmup(s, NULL, err, sizeof err), DG_EMODEL);
        if (!strstr(err, "warm-up: its picture came out NaN or infinite (black)"))
            test_fail(__FILE__, __LINE__, "message: %s", err);
    }
    dg_sched_free(s);
    dg_model_close(m);
}

/* dg_sched_warmup: a prompt, two tokens and one smallest picture through every part; the
 * scheduler answers the same afterwards as a fresh one; refused while a job runs. */
TEST(warmup_runs_every_part_and_changes_no_answer) {
    char err[512];
    dg_model *m = open_tiny();
    if (!m) return;
    int rc;
    dg_sched *warm, *fresh;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2}, &warm, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2}, &fresh, err, sizeof err), 0);
    dg_usage u = {0};
    rc = dg_sched_warmup(warm, &u, err, sizeof err);
    CHECK_EQ_INT(rc, 0);
    if (rc) printf("  %s\n", err);
    CHECK(u.prompt_tokens > 0 && u.generated_tokens >= 1);
    CHECK_EQ_INT(u.images, 1);
    CHECK(u.dit_forwards >= 1);
    CHECK_EQ_INT(dg_sched_active(warm), 0);
    /* the warm-up's work is not the worker's: its lookups and screened tokens are not in
     * the figures a worker reports (they were: a fresh worker showed a prefix-cache miss
     * and tokens screened before its first job) */
    dg_cache_stats cs;
    int64_t n1, n2;
    dg_sched_cache_stats(warm, &cs);
    CHECK(cs.kv_hits == 0 && cs.kv_misses == 0 && cs.vision_hits == 0 && cs.vision_misses == 0 &&
          cs.latent_hits == 0 && cs.latent_misses == 0);
    CHECK(cs.kv_cached_bytes > 0);   /* its prompt stays cached, as any job's */
    dg_sched_screen_stats(warm, &n1, &n2);
    CHECK(n1 == 0 && n2 == 0);
    dg_sched_draft_stats(warm, &n1, &n2);
    CHECK(n1 == 0 && n2 == 0);

    size_t l1;
    uint8_t *a = test_png(60, 40, 1, &l1);
    dg_part parts[2] = {{.kind = DG_PART_IMAGE, .image = a, .image_len = l1},
                        {.kind = DG_PART_TEXT, .text = "Hello. Cook this.", .text_len = 17}};
    dg_message msg = {DG_ROLE_USER, parts, 2};
    dg_logit_bias bias = {test_bov_id(pkg), 8.0f};
    dg_request r = {.id = "after-warm", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 16, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 48, .steps = 2, .max_images = 1}};
    test_job c1 = {0}, c2 = {0};
    CHECK_EQ_INT(test_job_run(warm, &r, &c1), 0);
    CHECK_EQ_INT(test_job_run(fresh, &r, &c2), 0);
    CHECK(c1.n_png == 1 && test_job_same(&c1, &c2));
    /* from here on the counts are the job's, as a fresh scheduler's */
    dg_cache_stats cf;
    dg_sched_cache_stats(warm, &cs);
    dg_sched_cache_stats(fresh, &cf);
    CHECK(cs.vision_misses == cf.vision_misses && cs.vision_misses > 0);
    CHECK(cs.kv_hits + cs.kv_misses == cf.kv_hits + cf.kv_misses && cs.kv_misses > 0);
    /* a later warm-up takes out its own counts only: the job's stay (the counters went back
     * to 0 when the warm-up set the baseline to the totals) */
    CHECK_EQ_INT(dg_sched_warmup(warm, NULL, err, sizeof err), 0);
    dg_sched_cache_stats(warm, &cf);
    CHECK(cf.kv_hits == cs.kv_hits && cf.kv_misses == cs.kv_misses && cf.vision_hits == cs.vision_hits &&
          cf.vision_misses == cs.vision_misses && cf.latent_hits == cs.latent_hits &&
          cf.latent_misses == cs.latent_misses);

    uint64_t seq;
    dg_sink sink = test_job_sink(&c1);
    CHECK_EQ_INT(dg_sched_submit(warm, &r, &sink, &seq, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_warmup(warm, NULL, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "warm-up: needs an idle scheduler (1 active)"));
    test_job_free(&c1);
    test_job_free(&c2);
    free(a);
    dg_sched_free(warm);
    dg_sched_free(fresh);
    dg_model_close(m);
}

/* The same job on the CUDA backend (skipped where there is no GPU): the loop
 * runs end to end and gives images of the requested size. The text may differ from the
 * CPU's: bf16 weights and TF32 convolutions move logits by ~1e-2 (tests/test_cuda_parity.c),
 * enough to change greedy choices between near-equal tokens of a random model. */
TEST(interleaved_on_cuda) {
    if (!test_cuda_present()) SKIP("%s", test_cuda_absent_reason());
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    dg_model *m;
    if (dg_model_open(pkg, &(dg_model_opts){.device = "cuda:0"}, &m, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "model on cuda:0: %s", err);
        return;
    }
    dg_sched *s;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    size_t l1;
    uint8_t *a = test_png(60, 40, 1, &l1);
    dg_part parts[2] = {{.kind = DG_PART_IMAGE, .image = a, .image_len = l1},
                        {.kind = DG_PART_TEXT, .text = "Cook this.", .text_len = 10}};
    dg_message msg = {DG_ROLE_USER, parts, 2};
    dg_logit_bias bias = {test_bov_id(pkg), 8.0f};
    dg_request r = {.id = "inter-cuda", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 16, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_GUIDANCE_SCALE |
                                     DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 48, .steps = 3, .guidance_scale = 3.0f, .max_images = 2}};
    test_job c = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c), 0);
    CHECK_EQ_INT(c.n_png, 2);
    for (int i = 0; i < c.n_png; i++) CHECK(c.png_w[i] == 32 && c.png_h[i] == 48);
    CHECK_EQ_INT(c.events[c.n_events - 1], 'f');
    printf("  cuda: %zu bytes of text, %d images\n", c.len, c.n_png);
    test_job_free(&c);
    free(a);
    dg_sched_free(s);
    dg_model_close(m);
}

int main(void) { return test_main(); }
