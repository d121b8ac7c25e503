/* The answer's text around its pictures, and what the jobs of one scheduler leave each
 * other (the tiny package of seed 11 with the Qwen2 vocabulary, and variants of its
 * duogen.json):
 * - text the stop-string matcher holds back when <BOV> comes is text before the picture:
 *   it comes out before image_started, and no stop string spans a picture;
 * - the text after a draw marker in the marker's own token is never lost: it follows the
 *   picture, or comes at once where none may be drawn, also when the answer ends there;
 * - drafted tokens that fill a KV block keep its condition rows beside it, also when the
 *   answer ends on that token: a later job served from the prefix cache draws the picture a
 *   fresh scheduler draws;
 * - a published pipeline's prompt, encoded on the scheduler's decoder state when one job's
 *   image begins, leaves the other jobs' drafted rows of that step alone.
 * Each was found by review and fails without its fix. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "common/jobs.h"
#include "common/package.h"
#include "duogen.h"
#include "model.h"

/* The tiny package of seed 11, once; a copy of it with duogen.json's `key` set to `value`
 * (stolen), in a directory of its own. */
static const char *tiny(void) { return test_package_once("tiny", 11, TEST_QWEN2_VOCAB); }

static int variant(const char *key, json_t *value, char *dir, size_t len) {
    if (test_make_package("tiny", 11, TEST_QWEN2_VOCAB, dir, len) < 0) return -1;
    char path[600];
    snprintf(path, sizeof path, "%s/duogen.json", dir);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    int rc = j && json_object_set_new(j, key, value) == 0 && json_dump_file(j, path, JSON_INDENT(1)) == 0 ? 0 : -1;
    json_decref(j);
    return rc;
}

/* A sink that writes the job's events as one string: text pieces in [], an image as <I and
 * >, the end as {f} or {x}. */
typedef struct {
    char log[8192];
    char text[4096];   /* the text alone */
    int  at_image;     /* bytes of text before the first image_started, -1: none */
    int  ended;
} trace;

static void cat(char *dst, size_t cap, const char *s, size_t n) {
    size_t at = strlen(dst);
    if (at + n < cap) {
        memcpy(dst + at, s, n);
        dst[at + n] = 0;
    }
}
static void t_text(void *u, const char *d, size_t n) {
    trace *t = u;
    cat(t->log, sizeof t->log, "[", 1);
    cat(t->log, sizeof t->log, d, n);
    cat(t->log, sizeof t->log, "]", 1);
    cat(t->text, sizeof t->text, d, n);
}
static void t_started(void *u, int i, int w, int h, int s) {
    trace *t = u;
    cat(t->log, sizeof t->log, "<I", 2);
    if (t->at_image < 0) t->at_image = (int)strlen(t->text);
}
static void t_step(void *u, int i, int s, int n) {}
static void t_done(void *u, int i, int w, int h, const uint8_t *p, size_t l) {
    cat(((trace *)u)->log, sizeof ((trace *)u)->log, ">", 1);
}
static void t_fin(void *u, dg_finish_reason r, const dg_usage *us, const dg_timings *tm) {
    trace *t = u;
    cat(t->log, sizeof t->log, "{f}", 3);
    t->ended = 1;
}
static void t_fail(void *u, int c, const char *m) {
    trace *t = u;
    cat(t->log, sizeof t->log, "{x}", 3);
    t->ended = 1;
}

static int traced(dg_model *m, const dg_request *r, trace *t) {
    char err[512];
    dg_sched *s;
    memset(t, 0, sizeof *t);
    t->at_image = -1;
    int rc = dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err);
    dg_sink sink = {t, t_text, t_started, t_step, t_done, t_fin, t_fail};
    uint64_t seq;
    if (rc == 0 && (rc = dg_sched_submit(s, r, &sink, &seq, err, sizeof err)) == 0)
        while (rc == 0 && dg_sched_active(s) > 0) rc = dg_sched_step(s, err, sizeof err);
    if (rc) printf("  %s\n", err);
    dg_sched_free(s);
    return rc;
}

TEST(held_text_comes_out_before_the_picture) {
    const char *pkg = tiny();
    if (!pkg) { CHECK(!"package"); return; }
    char err[512];
    dg_model *m;
    if (dg_model_open(pkg, NULL, &m, err, sizeof err) < 0) { CHECK(!"model"); return; }
    dg_part part = {.kind = DG_PART_TEXT, .text = "Cook these two.", .text_len = 15};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_logit_bias bov = {test_bov_id(pkg), 6.0f};
    dg_request r = {.id = "held", .messages = &msg, .n_messages = 1,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .temperature = 1.0f,
                             .max_new_tokens = 12, .logit_bias = &bov, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 32, .steps = 1, .max_images = 1}};
    /* a seed whose answer writes text, then draws, the text's last byte ASCII */
    trace plain, held;
    char *img = NULL;
    for (r.seed = 1; r.seed < 200; r.seed++) {
        if (traced(m, &r, &plain)) break;
        img = strstr(plain.log, "<I");
        if (img && img - plain.log >= 3 && img[-1] == ']' && (unsigned char)img[-2] < 0x80) break;
        img = NULL;
    }
    CHECK(img != NULL);
    if (img) {
        /* a stop string of that byte and one never written: the matcher holds the byte when
         * <BOV> comes; it is text before the picture */
        char stop[3] = {img[-2], '\x01', 0};
        const char *stops[1] = {stop};
        r.text.stop = stops;
        r.text.n_stop = 1;
        CHECK_EQ_INT(traced(m, &r, &held), 0);
        CHECK_EQ_STR(held.text, plain.text);   /* the same text ... */
        CHECK_EQ_INT(held.at_image, plain.at_image);   /* ... the same of it before the picture */
        if (held.at_image != plain.at_image) printf("  without the stop string: %s\n  with it: %s\n", plain.log, held.log);
    }
    dg_model_close(m);
}

/* The greedy answer of the plain tiny package to "Talk.", token by token. */
static int deltas(dg_model *m, char (*piece)[64], int max) {
    trace t;
    dg_part part = {.kind = DG_PART_TEXT, .text = "Talk.", .text_len = 5};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_request r = {.id = "talk", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = max,
                             .temperature = 0},
                    .image = {.set = DG_IMAGE_MAX_IMAGES, .max_images = 0}};
    if (traced(m, &r, &t)) return 0;
    int n = 0;   /* the log's [pieces], one a token (whole characters) */
    for (const char *p = t.log; *p == '[' && n < max; n++) {
        const char *e = strchr(p, ']');
        while (e && e[1] != '[' && e[1] != '{') e = strchr(e + 1, ']');   /* a ']' inside the text */
        if (!e || e - p - 1 >= 64) return n;
        memcpy(piece[n], p + 1, (size_t)(e - p - 1));
        piece[n][e - p - 1] = 0;
        p = e + 1;
    }
    return n;
}

TEST(the_text_after_a_draw_marker_is_never_lost) {
    const char *pkg = tiny();
    if (!pkg) { CHECK(!"package"); return; }
    char err[512], dir[512], piece[40][64];
    dg_model *m;
    if (dg_model_open(pkg, NULL, &m, err, sizeof err) < 0) { CHECK(!"model"); return; }
    const int n = deltas(m, piece, 40);
    dg_model_close(m);
    /* the marker: the first two (ASCII) bytes of a token of at least 4 bytes, found nowhere
     * else in the answer, so that the marked package writes the same tokens up to there */
    int j = -1;
    char all[4096] = "", marker[3] = "";
    for (int i = 1; i < n && j < 0; i++) {
        cat(all, sizeof all, piece[i - 1], strlen(piece[i - 1]));
        if (strlen(piece[i]) < 4 || (piece[i][0] & 0x80) || (piece[i][1] & 0x80)) continue;
        char mk[3] = {piece[i][0], piece[i][1], 0};
        int uses = 0;
        for (int k = 0; k < n; k++) uses += strstr(piece[k], mk) != NULL;
        if (uses == 1 && !strstr(all, mk)) j = i, memcpy(marker, mk, 3);
    }
    CHECK(j > 0);
    if (j <= 0 || variant("draw_marker", json_string(marker), dir, sizeof dir) < 0 ||
        dg_model_open(dir, NULL, &m, err, sizeof err) < 0) {
        CHECK(!"a marked package");
        return;
    }
    char before[4096] = "", rest[64];
    for (int i = 0; i < j; i++) cat(before, sizeof before, piece[i], strlen(piece[i]));
    snprintf(rest, sizeof rest, "%s", piece[j] + 2);
    dg_part part = {.kind = DG_PART_TEXT, .text = "Talk.", .text_len = 5};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_request r = {.id = "marker", .messages = &msg, .n_messages = 1, .seed = 5,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = j + 1,
                             .temperature = 0},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                              .width = 32, .height = 32, .steps = 1, .max_images = 0}};
    trace t;
    /* no picture may be drawn: the marker is taken out and its rest follows at once, also
     * when the answer ends on the marker's token */
    for (int extra = 0; extra < 2; extra++) {
        r.text.max_new_tokens = j + 1 + extra;
        CHECK_EQ_INT(traced(m, &r, &t), 0);
        char want[4096];
        snprintf(want, sizeof want, "%s%s%s", before, rest, extra ? piece[j + 1] : "");
        CHECK_EQ_STR(t.text, want);
    }
    /* a picture: the text before the marker, the picture, then the rest (the answer ends on
     * the marker's token: the rest is still written, after the picture) */
    r.image.max_images = 1;
    r.text.max_new_tokens = j + 1;
    CHECK_EQ_INT(traced(m, &r, &t), 0);
    char want[4096];
    snprintf(want, sizeof want, "<I>[%s]", rest);
    CHECK(strstr(t.log, want) != NULL);
    CHECK(!strncmp(t.text, before, strlen(before)) && strstr(t.log, "<I") && !strstr(strstr(t.log, "<I"), "{x}"));
    if (!strstr(t.log, want)) printf("  marker \"%s\", rest \"%s\": %s\n", marker, rest, t.log);
    dg_model_close(m);
}

/* A repeating answer (three tokens biased up, in turn the likeliest): drafts are kept. */
static dg_request talk_loop(dg_message *msg, dg_part *part, dg_logit_bias *loop, int max_new) {
    *part = (dg_part){.kind = DG_PART_TEXT, .text = "Talk.", .text_len = 5};
    *msg = (dg_message){DG_ROLE_USER, part, 1};
    return (dg_request){.id = "loop", .messages = msg, .n_messages = 1, .seed = 5,
                        .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = max_new,
                                 .temperature = 0, .logit_bias = loop, .n_logit_bias = 3},
                        .image = {.set = DG_IMAGE_MAX_IMAGES, .max_images = 0}};
}

TEST(drafted_blocks_keep_their_condition_rows) {
    const char *pkg = tiny();
    if (!pkg) { CHECK(!"package"); return; }
    char err[512];
    dg_model *m;
    if (dg_model_open(pkg, NULL, &m, err, sizeof err) < 0) { CHECK(!"model"); return; }
    dg_logit_bias loop[3] = {{100, 40.0f}, {200, 40.0f}, {300, 40.0f}};
    static const int max_new[] = {13, 29, 45};   /* answers that end on a drafted token filling a block */
    for (int t = 0; t < 3; t++) {
        /* A (text) with drafts, then B continues A's conversation and draws: served from A's
         * blocks, B's picture is the one a fresh scheduler draws */
        dg_sched *drafted, *fresh;
        CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = 7}, &drafted, err, sizeof err), 0);
        CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = -1}, &fresh, err, sizeof err), 0);
        dg_message ma;
        dg_part pa;
        dg_request ra = talk_loop(&ma, &pa, loop, max_new[t]);
        test_job a = {0}, b[2] = {{0}};
        CHECK_EQ_INT(test_job_run(drafted, &ra, &a), 0);
        dg_part p1 = {.kind = DG_PART_TEXT, .text = "Talk.", .text_len = 5};
        dg_part p2 = {.kind = DG_PART_TEXT, .text = a.text, .text_len = a.len};
        dg_part p3 = {.kind = DG_PART_TEXT, .text = "Draw.", .text_len = 5};
        dg_message msgs[3] = {{DG_ROLE_USER, &p1, 1}, {DG_ROLE_ASSISTANT, &p2, 1}, {DG_ROLE_USER, &p3, 1}};
        dg_logit_bias bov = {test_bov_id(pkg), 100.0f};
        dg_request rb = {.id = "b", .messages = msgs, .n_messages = 3, .seed = 7,
                         .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 2, .logit_bias = &bov, .n_logit_bias = 1},
                         .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                                   .width = 32, .height = 32, .steps = 2, .max_images = 1}};
        CHECK_EQ_INT(test_job_run(drafted, &rb, &b[0]), 0);
        CHECK_EQ_INT(test_job_run(fresh, &rb, &b[1]), 0);
        int64_t kept = 0, fed = 0;
        dg_sched_draft_stats(drafted, &fed, &kept);
        CHECK(kept > 0);                            /* A's answer was drafted */
        CHECK(b[0].usage.cached_prompt_tokens > 0);  /* B was served from A's blocks */
        CHECK(b[0].n_png == 1 && test_job_same(&b[0], &b[1]));
        test_job_free(&a);
        test_job_free(&b[0]);
        test_job_free(&b[1]);
        dg_sched_free(drafted);
        dg_sched_free(fresh);
    }
    dg_model_close(m);
}

TEST(a_published_prompt_leaves_other_jobs_drafts_alone) {
    char err[512], dir[512];
    json_t *cond = json_pack("{s:s,s:i,s:s,s:s,s:s,s:s}", "source", "prompt", "max_tokens", 32, "pad_token",
                             "<|endoftext|>", "system_prompt", "Describe an image.", "negative_prompt", "blurry",
                             "padding_side", "right");
    dg_model *m;
    if (variant("condition", cond, dir, sizeof dir) < 0 || dg_model_open(dir, NULL, &m, err, sizeof err) < 0) {
        CHECK(!"a package with a published pipeline's condition");
        return;
    }
    dg_logit_bias loop[3] = {{279, 40.0f}, {8251, 40.0f}, {7578, 40.0f}};
    dg_message mb;
    dg_part pb;
    dg_request rb = talk_loop(&mb, &pb, loop, 40);
    for (int draft = 2; draft <= 7; draft += 5) {
        test_job ref = {0};
        dg_sched *s;
        CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2, .draft_tokens = draft}, &s, err, sizeof err), 0);
        CHECK_EQ_INT(test_job_run(s, &rb, &ref), 0);   /* B alone */
        dg_sched_free(s);
        int changed = 0;
        for (int t = 1; t <= 12; t++) {
            /* B decodes (drafting) in slot 1; A takes slot 0 after t steps and draws at
             * once: its prompt is encoded in the step where B's drafted rows are taken */
            CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2, .draft_tokens = draft}, &s, err, sizeof err), 0);
            test_job d = {0}, b = {0}, a = {0};
            uint64_t sd, sb, sa;
            dg_sink kd = test_job_sink(&d), kb = test_job_sink(&b), ka = test_job_sink(&a);
            dg_part pd = {.kind = DG_PART_TEXT, .text = "Hi.", .text_len = 3};
            dg_message md = {DG_ROLE_USER, &pd, 1};
            dg_request rd = {.id = "d", .messages = &md, .n_messages = 1,
                             .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 200},
                             .image = {.set = DG_IMAGE_MAX_IMAGES, .max_images = 0}};
            CHECK_EQ_INT(dg_sched_submit(s, &rd, &kd, &sd, err, sizeof err), 0);
            CHECK_EQ_INT(dg_sched_submit(s, &rb, &kb, &sb, err, sizeof err), 0);
            for (int k = 0; k < t; k++) CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);
            dg_sched_cancel(s, sd);
            CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);   /* slot 0 free */
            dg_part pa = {.kind = DG_PART_TEXT, .text = "Draw.", .text_len = 5};
            dg_message ma = {DG_ROLE_USER, &pa, 1};
            dg_logit_bias bov = {test_bov_id(dir), 100.0f};
            dg_request ra = {.id = "a", .messages = &ma, .n_messages = 1,
                             .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = 3,
                                      .temperature = 0, .logit_bias = &bov, .n_logit_bias = 1},
                             .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                                       .width = 32, .height = 32, .steps = 1, .max_images = 1}};
            CHECK_EQ_INT(dg_sched_submit(s, &ra, &ka, &sa, err, sizeof err), 0);
            while (dg_sched_active(s) > 0) CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);
            CHECK_EQ_INT(a.n_png, 1);
            if (!test_job_same(&b, &ref)) {
                changed++;
                printf("  drafts %d, A's <BOV> after %d steps: B \"%.60s\", alone \"%.60s\"\n", draft, t, b.text, ref.text);
            }
            test_job_free(&d);
            test_job_free(&b);
            test_job_free(&a);
            dg_sched_free(s);
        }
        CHECK_EQ_INT(changed, 0);
        test_job_free(&ref);
    }
    dg_model_close(m);
}

/* The tiny package opened with a scheduler of one sequence, or 0 (failed, said). */
static int tiny_sched(dg_model **m, dg_sched **s) {
    const char *pkg = tiny();
    char err[512];
    if (!pkg) { CHECK(!"package"); return 0; }
    if (dg_model_open(pkg, NULL, m, err, sizeof err) < 0) { CHECK(!"model"); return 0; }
    CHECK_EQ_INT(dg_sched_new(*m, &(dg_sched_opts){.max_inflight = 1}, s, err, sizeof err), 0);
    return 1;
}

/* A user who types the model's image token: the tokenizer makes the special token of it, as
 * transformers' does, and the job failed with "mrope: image tokens at 17 but only 0 images";
 * it is refused naming the token. */
TEST(the_image_token_typed_in_text_is_refused_by_name) {
    dg_model *m;
    dg_sched *s;
    if (!tiny_sched(&m, &s)) return;
    dg_part part = {.kind = DG_PART_TEXT, .text = "what is <|image_pad|>?", .text_len = 22};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_request r = {.id = "pad", .messages = &msg, .n_messages = 1};
    test_job c = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c), DG_EINVAL);
    CHECK(strstr(c.error, "holds the model's image token") != NULL);
    test_job_free(&c);
    dg_sched_free(s);
    dg_model_close(m);
}

/* A stop string that is a special token's text: the answer's text never holds one, so it
 * never matched and the answer ran on to max_new_tokens; refused naming the token. The
 * same letters without the markers are a stop string like any. */
TEST(a_stop_string_of_a_special_token_is_refused) {
    dg_model *m;
    dg_sched *s;
    if (!tiny_sched(&m, &s)) return;
    dg_part part = {.kind = DG_PART_TEXT, .text = "Say something.", .text_len = 14};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    const char *stop[] = {"\n", "then <|im_start|>user"};
    dg_request r = {.id = "stop-special", .messages = &msg, .n_messages = 1,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 4, .stop = stop,
                             .n_stop = 2}};
    test_job c = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c), DG_EINVAL);
    CHECK_EQ_STR(c.error, "text.stop: \"then <|im_start|>user\" holds the special token <|im_start|> (id 151644), "
                          "which the answer's text never holds: it cannot match (an end token ends the answer "
                          "anyway; logit_bias bans one)");
    test_job_free(&c);
    stop[1] = "im_start";
    memset(&c, 0, sizeof c);
    CHECK_EQ_INT(test_job_run(s, &r, &c), 0);
    CHECK(c.finished && !c.error[0]);
    test_job_free(&c);
    dg_sched_free(s);
    dg_model_close(m);
}

/* A job whose logit_bias bans every token (-inf) has nothing to write: refused at submit,
 * naming why (it wrote banned tokens: the argmax of an all -inf row, "!!!!"). One that leaves
 * only <BOV>: its images are drawn, and when max_images are, the engine's own ban of <BOV>
 * leaves nothing: the answer ends there with "length", as at max_new_tokens (it failed as a
 * bad request, after its picture). */
TEST(a_job_that_bans_every_token) {
    dg_model *m;
    dg_sched *s;
    if (!tiny_sched(&m, &s)) return;
    const int V = m->cfg.text.vocab_size, bov = m->bov_id;
    dg_logit_bias *ban = malloc(sizeof *ban * (size_t)V);
    int n = 0;
    for (int i = 0; i < V; i++) ban[n++] = (dg_logit_bias){i, -INFINITY};
    dg_part part = {.kind = DG_PART_TEXT, .text = "Say something.", .text_len = 14};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_request r = {.id = "banned", .messages = &msg, .n_messages = 1, .seed = 1,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = 8,
                             .temperature = 0.7f, .logit_bias = ban, .n_logit_bias = (size_t)n}};
    test_job c = {0};
    CHECK_EQ_INT(test_job_run(s, &r, &c), DG_EINVAL);
    CHECK(strstr(c.error, "every token of the vocabulary") != NULL);
    CHECK_EQ_INT((int)c.len, 0);
    test_job_free(&c);
    n = 0;   /* all but <BOV> */
    for (int i = 0; i < V; i++)
        if (i != bov) ban[n++] = (dg_logit_bias){i, -INFINITY};
    for (int sampled = 0; sampled < 2; sampled++) {
        r.text = (dg_text_params){.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = 8,
                                  .temperature = sampled ? 0.7f : 0.0f, .logit_bias = ban, .n_logit_bias = (size_t)n};
        r.image = (dg_image_params){.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                                    .width = 32, .height = 32, .steps = 2, .max_images = 1};
        memset(&c, 0, sizeof c);
        CHECK_EQ_INT(test_job_run(s, &r, &c), 0);
        CHECK(c.finished && c.error[0] == 0 && c.reason == DG_FINISH_LENGTH && c.n_png == 1);
        CHECK_EQ_INT((int)c.len, 0);   /* no banned token written after the picture */
        if (c.error[0]) printf("  %s\n", c.error);
        test_job_free(&c);
    }
    free(ban);
    dg_sched_free(s);
    dg_model_close(m);
}

int main(void) { return test_main(); }
