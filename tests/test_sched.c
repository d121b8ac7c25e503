/* The scheduler on the tiny package (text path): the answer it streams is the greedy
 * continuation the decoder gives directly; the prefix KV cache changes nothing but the
 * work done; limits, stop strings, cancellation, and bad packages give clear results. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/harness.h"
#include "common/package.h"
#include "duogen.h"
#include "cache/kv_cache.h"
#include "model.h"
#include "mllm/qwen2.h"

static char pkg[256];

static int write_manifest(const char *dir, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s/duogen.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs(text, f);
    return fclose(f);
}

static int setup(void) {
    static int state;
    if (state) return state > 0;
    state = -1;
    char tmpl[200];
    if (test_make_package("tiny", 3, TEST_QWEN2_VOCAB, tmpl, sizeof tmpl) < 0) return 0;
    if (write_manifest(tmpl, "{\"format\": \"duogen-package-1\", \"name\": \"tiny-test\", "
                             "\"components\": {\"mllm\": \"mllm\"}, \"max_context\": 512, "
                             "\"defaults\": {\"max_new_tokens\": 24}}") != 0) return 0;
    snprintf(pkg, sizeof pkg, "%s", tmpl);
    state = 1;
    return 1;
}

typedef struct {
    char   text[8192];
    size_t len;
    int    finished, failed;
    dg_finish_reason reason;
    dg_usage usage;
    char   error[256];
} collect;

static void on_text(void *u, const char *d, size_t n) {
    collect *c = u;
    if (c->len + n < sizeof c->text) { memcpy(c->text + c->len, d, n); c->len += n; c->text[c->len] = 0; }
}
static void on_finished(void *u, dg_finish_reason r, const dg_usage *us, const dg_timings *t) {
    collect *c = u;
    (void)t;
    c->finished++;
    c->reason = r;
    c->usage = *us;
}
static void on_failed(void *u, int code, const char *msg) {
    collect *c = u;
    (void)code;
    c->failed++;
    snprintf(c->error, sizeof c->error, "%s", msg);
}

static dg_sink sink_for(collect *c) {
    return (dg_sink){.user = c, .text = on_text, .finished = on_finished, .failed = on_failed};
}

static int run_one(dg_sched *s, const dg_request *r, collect *c, int cancel_after) {
    char err[256];
    uint64_t seq;
    dg_sink sk = sink_for(c);
    int rc = dg_sched_submit(s, r, &sk, &seq, err, sizeof err);
    if (rc) return rc;
    for (int steps = 0; dg_sched_active(s) > 0; steps++) {
        if (steps == cancel_after) dg_sched_cancel(s, seq);
        if (dg_sched_step(s, err, sizeof err) < 0) return -100;
    }
    return 0;
}

static dg_request text_request(dg_message *msgs, dg_part *parts, const char *system, const char *user) {
    parts[0] = (dg_part){.kind = DG_PART_TEXT, .text = system, .text_len = strlen(system)};
    parts[1] = (dg_part){.kind = DG_PART_TEXT, .text = user, .text_len = strlen(user)};
    msgs[0] = (dg_message){DG_ROLE_SYSTEM, &parts[0], 1};
    msgs[1] = (dg_message){DG_ROLE_USER, &parts[1], 1};
    return (dg_request){.id = "t", .messages = msgs, .n_messages = 2};
}

static const char *SYSTEM = "You are a careful assistant who answers questions about cooking, "
                            "baking and kitchen safety in short, precise sentences, and who says so "
                            "plainly when a question is outside what a kitchen can answer.";

/* The scheduler's greedy answer is the decoder's own greedy decode of the chat prompt, token
 * for token; with the KV in bf16 on both sides too (kv_bf16: the same rounding either way). */
static void text_matches_direct_greedy_decode(int kv_bf16) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[256];
    dg_model *m;
    dg_sched *s;
    CHECK_EQ_INT(dg_model_open(pkg, &(dg_model_opts){.device = "cpu"}, &m, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1, .kv_bf16 = kv_bf16}, &s, err, sizeof err), 0);
    dg_message msgs[2];
    dg_part parts[2];
    dg_request r = text_request(msgs, parts, SYSTEM, "How long do I boil an egg?");
    collect c = {0};
    CHECK_EQ_INT(run_one(s, &r, &c, -1), 0);
    CHECK_EQ_INT(c.finished, 1);
    CHECK(c.reason == DG_FINISH_LENGTH || c.reason == DG_FINISH_STOP);

    /* the same prompt, greedy, straight through the decoder */
    dg_tok_ids ids = {0};
    char prompt[1024];
    snprintf(prompt, sizeof prompt, "<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\nHow long do I boil an egg?"
             "<|im_end|>\n<|im_start|>assistant\n", SYSTEM);
    CHECK_EQ_INT(dg_tok_encode(m->tok, prompt, strlen(prompt), &ids, err, sizeof err), 0);
    CHECK_EQ_INT(c.usage.prompt_tokens, (int64_t)ids.n);
    dg_kv_cache *kv;
    dg_qwen2_state *st;
    dg_kv_seq seq;
    CHECK_EQ_INT(dg_kv_cache_new(m->be, m->cfg.text.n_layers, m->cfg.text.n_kv_heads * m->cfg.text.head_dim, 16, 64,
                                 kv_bf16 ? DG_DTYPE_BF16 : DG_DTYPE_F32, &kv, err, sizeof err), 0);
    CHECK_EQ_INT(dg_qwen2_state_new(&m->llm, m->llm.be, 256, 1, &st, err, sizeof err), 0);
    dg_kv_seq_init(&seq, 512, 16);
    dg_tok_ids out = {0};
    dg_qwen2_input in = {.ids = ids.ids, .n = (int)ids.n, .n_logits = 1};
    for (int step = 0; step < 24; step++) {
        CHECK_EQ_INT(dg_qwen2_forward(&m->llm, st, kv, &seq, &in, NULL, err, sizeof err), 0);
        int32_t best = 0;
        for (int v = 1; v < m->cfg.text.vocab_size; v++) if (st->logits[v] > st->logits[best]) best = v;
        int stop = 0;
        for (int k = 0; k < m->n_stop_ids; k++) stop |= best == m->stop_ids[k];
        if (stop) break;
        dg_tok_ids_push(&out, best);
        in = (dg_qwen2_input){.ids = &out.ids[out.n - 1], .n = 1, .n_logits = 1};
    }
    char *direct;
    size_t direct_len;
    CHECK_EQ_INT(dg_tok_decode(m->tok, out.ids, out.n, DG_TOK_SKIP_SPECIAL, &direct, &direct_len, err, sizeof err), 0);
    CHECK_EQ_INT(c.usage.generated_tokens, (int64_t)out.n);
    CHECK_EQ_INT(c.len, direct_len);
    CHECK(c.len == direct_len && memcmp(c.text, direct, direct_len) == 0);
    free(direct);
    dg_tok_ids_free(&out);
    dg_tok_ids_free(&ids);
    dg_kv_seq_release(kv, &seq);
    dg_kv_seq_free(&seq);
    dg_qwen2_state_free(&m->llm, st);
    dg_kv_cache_free(kv);
    dg_sched_free(s);
    dg_model_close(m);
}

TEST(sched_text_matches_direct_greedy_decode) { text_matches_direct_greedy_decode(0); }
TEST(sched_text_matches_direct_greedy_decode_kv_bf16) { text_matches_direct_greedy_decode(1); }

/* kv_bf16 halves the KV pool of the same blocks; 0 follows the backend's default. */
TEST(sched_kv_bf16_halves_the_pool) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[256];
    dg_model *m;
    dg_sched *f, *h;
    dg_cache_stats sf, sh;
    CHECK_EQ_INT(dg_model_open(pkg, &(dg_model_opts){.device = "cpu"}, &m, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2}, &f, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2, .kv_bf16 = 1}, &h, err, sizeof err), 0);
    dg_sched_cache_stats(f, &sf);
    dg_sched_cache_stats(h, &sh);
    CHECK(sf.kv_bytes > 0 && sh.kv_bytes * 2 == sf.kv_bytes);
    dg_sched_free(h);
    dg_sched_free(f);
    /* kv_bf16 0 is the backend's default: fp32 on the CPU; bf16 on a backend whose default
     * it is (a GPU's), unless -1 asks for fp32 */
    dg_sched *d, *g, *x;
    dg_cache_stats sd, sg, sx;
    CHECK_EQ_INT(m->be->kv_bf16_default, 0);
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2, .kv_bf16 = 0}, &d, err, sizeof err), 0);
    m->be->kv_bf16_default = 1;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2, .kv_bf16 = 0}, &g, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2, .kv_bf16 = -1}, &x, err, sizeof err), 0);
    m->be->kv_bf16_default = 0;
    dg_sched_cache_stats(d, &sd);
    dg_sched_cache_stats(g, &sg);
    dg_sched_cache_stats(x, &sx);
    CHECK(sd.kv_bytes == sf.kv_bytes && sg.kv_bytes == sh.kv_bytes && sx.kv_bytes == sf.kv_bytes);
    dg_sched_free(x);
    dg_sched_free(g);
    dg_sched_free(d);
    dg_model_close(m);
}

TEST(sched_prefix_cache_reuses_blocks_and_changes_nothing) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[256];
    dg_model *m;
    dg_sched *s;
    CHECK_EQ_INT(dg_model_open(pkg, NULL, &m, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
    dg_message msgs[2];
    dg_part parts[2];
    dg_request r1 = text_request(msgs, parts, SYSTEM, "What is a roux?");
    collect a = {0}, b = {0}, fresh = {0};
    CHECK_EQ_INT(run_one(s, &r1, &a, -1), 0);
    CHECK_EQ_INT(a.usage.cached_prompt_tokens, 0);
    dg_message msgs2[2];
    dg_part parts2[2];
    dg_request r2 = text_request(msgs2, parts2, SYSTEM, "Why does bread rise?");
    CHECK_EQ_INT(run_one(s, &r2, &b, -1), 0);
    /* every full 16-token block of the common prefix (system turn and the user turn's
     * header) is shared */
    char p1[1024], p2[1024];
    snprintf(p1, sizeof p1, "<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\nWhat is a roux?", SYSTEM);
    snprintf(p2, sizeof p2, "<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\nWhy does bread rise?", SYSTEM);
    dg_tok_ids i1 = {0}, i2 = {0};
    dg_tok_encode(m->tok, p1, strlen(p1), &i1, err, sizeof err);
    dg_tok_encode(m->tok, p2, strlen(p2), &i2, err, sizeof err);
    size_t common = 0;
    while (common < i1.n && common < i2.n && i1.ids[common] == i2.ids[common]) common++;
    CHECK(common >= 32);
    CHECK_EQ_INT(b.usage.cached_prompt_tokens, (int64_t)(common / 16 * 16));
    dg_tok_ids_free(&i1);
    dg_tok_ids_free(&i2);
    dg_cache_stats cs;
    dg_sched_cache_stats(s, &cs);
    CHECK_EQ_INT(cs.kv_hits, (int64_t)(common / 16));
    /* the same request on a scheduler whose cache is empty: the same answer */
    dg_sched *s2;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s2, err, sizeof err), 0);
    CHECK_EQ_INT(run_one(s2, &r2, &fresh, -1), 0);
    CHECK_EQ_INT(fresh.usage.cached_prompt_tokens, 0);
    CHECK_EQ_STR(b.text, fresh.text);
    dg_sched_free(s2);
    dg_sched_free(s);
    dg_model_close(m);
}

TEST(sched_limits_stop_strings_cancel) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[256];
    dg_model *m;
    dg_sched *s;
    CHECK_EQ_INT(dg_model_open(pkg, NULL, &m, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 2}, &s, err, sizeof err), 0);
    dg_message msgs[2];
    dg_part parts[2];
    dg_request r = text_request(msgs, parts, SYSTEM, "Tell me about knives.");
    r.text.set = DG_TEXT_MAX_NEW_TOKENS;
    r.text.max_new_tokens = 5;
    collect c = {0};
    CHECK_EQ_INT(run_one(s, &r, &c, -1), 0);
    CHECK(c.reason == DG_FINISH_LENGTH || c.reason == DG_FINISH_STOP);
    if (c.reason == DG_FINISH_LENGTH) CHECK_EQ_INT(c.usage.generated_tokens, 5);

    /* a stop string taken from the middle of the full answer: the text ends before it */
    r.text.set = 0;   /* the package's max_new_tokens */
    collect full = {0};
    CHECK_EQ_INT(run_one(s, &r, &full, -1), 0);
    if (full.len > 8) {
        char stop[8];
        memcpy(stop, full.text + full.len / 2, 3);
        stop[3] = 0;
        const char *stops[1] = {stop};
        r.text.stop = stops;
        r.text.n_stop = 1;
        collect cut = {0};
        CHECK_EQ_INT(run_one(s, &r, &cut, -1), 0);
        CHECK(cut.reason == DG_FINISH_STOP);
        char *first = strstr(full.text, stop);
        CHECK(first != NULL);
        if (first) CHECK_EQ_INT(cut.len, (size_t)(first - full.text));
        r.text.stop = NULL;
        r.text.n_stop = 0;
    }
    collect cc = {0};
    CHECK_EQ_INT(run_one(s, &r, &cc, 3), 0);
    CHECK(cc.reason == DG_FINISH_CANCELLED);
    CHECK(cc.usage.generated_tokens <= 3);

    /* an image that is not one: refused at submit, naming it */
    dg_part img_parts[2] = {{.kind = DG_PART_TEXT, .text = "see", .text_len = 3},
                            {.kind = DG_PART_IMAGE, .image = (const uint8_t *)"\x89PNG", .image_len = 4}};
    dg_message img_msg = {DG_ROLE_USER, img_parts, 2};
    dg_request ri = {.messages = &img_msg, .n_messages = 1};
    uint64_t seq;
    dg_sink sk = sink_for(&c);
    CHECK_EQ_INT(dg_sched_submit(s, &ri, &sk, &seq, err, sizeof err), DG_EIMAGE);
    CHECK(strstr(err, "image 1") != NULL);
    CHECK_EQ_INT(dg_sched_active(s), 0);
    dg_sched_free(s);
    dg_model_close(m);
}

/* Drafts at the edges (engine/sched_feed.c "Drafts"): answers of 1, 2, 3 and 40 tokens (the
 * cut by max_new_tokens inside a step's drafts), a prompt whose answer runs into the
 * context's end (max_context 512: drafts must stop short of it), stop strings met inside a
 * drafted run; greedy and sampled, three tokens raised by 40 so that the answers repeat and
 * drafts are taken. Each with drafts 7 streams what it streams with drafts off: text,
 * reason, token count; and drafts were kept. */
TEST(sched_drafts_at_the_limits) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[256], longer[4096] = "";
    dg_model *m;
    dg_sched *s[2];
    CHECK_EQ_INT(dg_model_open(pkg, NULL, &m, err, sizeof err), 0);
    for (int d = 0; d < 2; d++)
        CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = d ? 7 : -1}, &s[d], err,
                                  sizeof err), 0);
    for (int i = 0; i < 38; i++) strcat(longer, "Then stir the sauce slowly, and taste it. ");
    dg_logit_bias loop[3] = {{100, 40.0f}, {200, 40.0f}, {300, 40.0f}};
    char stop[8] = "";   /* from the middle of case 3's answer */
    const char *stops[1] = {stop};
    struct { const char *user; int max_new, sampled, stop; } cases[] = {
        {"Say one word.", 1, 0, 0},  {"Say two words.", 2, 0, 0}, {"Say three words.", 3, 1, 0},
        {"Talk.", 40, 0, 0},         {"Talk.", 40, 1, 0},         {longer, 200, 0, 0},
        {"Talk.", 40, 0, 1},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        collect c[2] = {{0}, {0}};
        for (int d = 0; d < 2; d++) {
            dg_message msgs[2];
            dg_part parts[2];
            dg_request r = text_request(msgs, parts, SYSTEM, cases[k].user);
            r.seed = 5;
            r.text = (dg_text_params){.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE,
                                      .max_new_tokens = cases[k].max_new,
                                      .temperature = cases[k].sampled ? 0.8f : 0.0f, .logit_bias = loop,
                                      .n_logit_bias = 3, .stop = cases[k].stop ? stops : NULL,
                                      .n_stop = cases[k].stop ? 1 : 0};
            CHECK_EQ_INT(run_one(s[d], &r, &c[d], -1), 0);
            CHECK_EQ_INT(c[d].finished, 1);
        }
        CHECK_EQ_INT(c[1].len, c[0].len);
        CHECK(c[1].len == c[0].len && memcmp(c[1].text, c[0].text, c[0].len) == 0);
        CHECK_EQ_INT((int)c[1].reason, (int)c[0].reason);
        CHECK_EQ_INT(c[1].usage.generated_tokens, c[0].usage.generated_tokens);
        if (k == 3 && c[0].len > 8) {   /* 3 bytes or so from the middle, whole characters (a stop string is UTF-8) */
            size_t at = c[0].len / 2 + 1, n = 3;
            while (at < c[0].len && ((unsigned char)c[0].text[at] & 0xC0) == 0x80) at++;
            while (at + n < c[0].len && ((unsigned char)c[0].text[at + n] & 0xC0) == 0x80 && n < 7) n++;
            if (at + n <= c[0].len) memcpy(stop, c[0].text + at, n);
        }
        if (k == 5) CHECK(c[0].reason == DG_FINISH_LENGTH && c[0].usage.prompt_tokens + c[0].usage.generated_tokens >= 510);
        if (k == 6) CHECK(c[0].reason == DG_FINISH_STOP);
    }
    int64_t drafted, kept;
    dg_sched_draft_stats(s[1], &drafted, &kept);
    printf("  drafts: %lld fed, %lld kept\n", (long long)drafted, (long long)kept);
    CHECK(kept > 0);
    for (int d = 0; d < 2; d++) dg_sched_free(s[d]);
    dg_model_close(m);
}

/* Temperature 0, set, is greedy on a package whose default samples (temperature 1): the
 * answer is the default package's greedy one whatever the seed, while the unset temperature
 * samples (two seeds, two answers). Exact text comparisons: greedy decoding is one argmax
 * chain on the same weights. */
TEST(sched_set_zero_temperature_is_greedy_over_a_sampling_default) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512], hot[512];
    snprintf(hot, sizeof hot, "%s/hot", pkg);
    CHECK_EQ_INT(mkdir(hot, 0755), 0);
    CHECK_EQ_INT(write_manifest(hot, "{\"format\": \"duogen-package-1\", \"components\": {\"mllm\": \"../mllm\"}, "
                                     "\"max_context\": 512, \"defaults\": {\"max_new_tokens\": 24, \"temperature\": 1.0}}"), 0);
    dg_model *m, *mh;
    dg_sched *s, *sh;
    CHECK_EQ_INT(dg_model_open(pkg, NULL, &m, err, sizeof err), 0);
    CHECK_EQ_INT(dg_model_open(hot, NULL, &mh, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(m, NULL, &s, err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_new(mh, NULL, &sh, err, sizeof err), 0);
    dg_message msgs[2];
    dg_part parts[2];
    dg_request r = text_request(msgs, parts, SYSTEM, "What goes into a vinaigrette?");
    collect greedy = {0}, sampled[2] = {{0}}, forced[2] = {{0}};
    CHECK_EQ_INT(run_one(s, &r, &greedy, -1), 0);   /* the default package's temperature is 0 */
    for (int i = 0; i < 2; i++) {
        r.seed = (uint64_t)i + 1;
        r.text.set = 0;
        CHECK_EQ_INT(run_one(sh, &r, &sampled[i], -1), 0);
        r.text.set = DG_TEXT_TEMPERATURE;
        r.text.temperature = 0.0f;
        CHECK_EQ_INT(run_one(sh, &r, &forced[i], -1), 0);
        CHECK_EQ_INT(forced[i].len, greedy.len);
        CHECK(strcmp(forced[i].text, greedy.text) == 0);
    }
    CHECK(strcmp(sampled[0].text, sampled[1].text) != 0);
    /* a set value out of range fails the submission with the field's name */
    uint64_t seq;
    collect bad = {0};
    dg_sink sk = sink_for(&bad);
    r.text.set = DG_TEXT_TOP_P;
    r.text.top_p = 0.0f;
    CHECK_EQ_INT(dg_sched_submit(sh, &r, &sk, &seq, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "text.top_p: 0 is not in (0, 1]"));
    CHECK_EQ_INT(dg_sched_active(sh), 0);
    dg_sched_free(sh);
    dg_sched_free(s);
    dg_model_close(mh);
    dg_model_close(m);
}

TEST(model_open_errors_name_the_problem) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512], dir[512];
    dg_model *m = NULL;
    CHECK_EQ_INT(dg_model_open("/nonexistent/pkg", NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "/nonexistent/pkg/duogen.json") && strstr(err, "needs its duogen.json"));
    CHECK(m == NULL);
    snprintf(dir, sizeof dir, "%s/bad1", pkg);
    CHECK_EQ_INT(mkdir(dir, 0755), 0);
    write_manifest(dir, "{\"format\": \"duogen-package-1\", \"components\": {}}");
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"components\" must name at least \"mllm\""));
    write_manifest(dir, "{\"format\": \"duogen-package-1\", \"components\": {\"mllm\": \"../mllm\"}, "
                        "\"bov_token\": \"<NOPE>\"}");
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "bov_token \"<NOPE>\""));
    write_manifest(dir, "{\"format\": \"duogen-package-1\", \"components\": {\"mllm\": \"../mllm\"}, "
                        "\"defaults\": {\"steps\": -3}}");
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"steps\" must be a number in 1..1000"));
    write_manifest(dir, "{\"format\": \"duogen-package-1\", \"components\": {\"mllm\": \"../mllm\"}, "
                        "\"defaults\": {\"schedule\": \"fancy\"}}");
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "defaults \"schedule\" must be \"karras\" or \"shifted\""));
    write_manifest(dir, "{\"format\": \"duogen-package-1\", \"components\": {\"mllm\": \"../mllm\"}, "
                        "\"defaults\": {\"schedule\": \"shifted\", \"shift\": 0}}");
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"shift\" is 0"));
    write_manifest(dir, "{not json");
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "duogen.json: line 1"));
}

int main(void) { return test_main(); }
