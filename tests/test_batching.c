/* Continuous batching changes no answer (docs/DESIGN.md §6 "Batching"): eight jobs of
 * different lengths stepped together on one scheduler — one decoder forward a step for all
 * of them, prefill chunks beside the decoding rows — stream the same text and the same PNG
 * bytes as each job run alone on a scheduler of its own, on the tiny package. The mix: a
 * prompt of several chunks, input images (two jobs share one picture), images drawn, a
 * prefix-cache hit (a job submitted once another's system prompt is in the KV blocks), a
 * job cancelled while the others run (its text is a prefix of its alone answer), greedy
 * and seeded sampling, and two images of one layout drawn at the same time (one DiT forward
 * for both, each with its two guidance branches).
 *
 * Equality is exact (bytes), for the text and for the pictures: on the CPU every row of a
 * forward is the same bits whatever rows are stacked beside it (backend.h matmul; the
 * attention reads each sequence's own blocks, the DiT's each input's own tokens), so a
 * token, a condition row and a picture do not depend on the batch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/device.h"
#include "common/harness.h"
#include "common/jobs.h"
#include "common/package.h"
#include "duogen.h"
#include "model.h"
#include "scheduler.h"

#define N_JOBS 8

static const char *pkg;   /* the tiny package of seed 11 with the Qwen2 vocabulary, made once */
static dg_model *model;

static int setup(void) { return (model = test_model_once("tiny", 11, TEST_QWEN2_VOCAB, &pkg)) != NULL; }

static const char *SYSTEM = "You are a patient cook who answers in short steps and draws each dish "
                            "as it should look on the plate, from above, on a round white plate, with a fork.";

typedef struct {
    dg_part       parts[2][3];
    dg_message    msgs[2];
    dg_logit_bias bias;
    dg_logit_bias loop[4];   /* job_loop's biases */
    dg_request    r;
} job_spec;

static void text_part(dg_part *p, const char *text) {
    *p = (dg_part){.kind = DG_PART_TEXT, .text = text, .text_len = strlen(text)};
}

static void image_part(dg_part *p, const uint8_t *png, size_t len) {
    *p = (dg_part){.kind = DG_PART_IMAGE, .image = png, .image_len = len};
}

/* Job i: [system] user [image] text; max_new tokens; <BOV> biased by bov (0: not). */
static void job(job_spec *j, const char *id, const char *system, const uint8_t *png, size_t png_len,
                const char *text, int max_new, float bov, int greedy) {
    int m = 0, k = 0;
    if (system) {
        text_part(&j->parts[0][0], system);
        j->msgs[m++] = (dg_message){DG_ROLE_SYSTEM, j->parts[0], 1};
    }
    if (png) image_part(&j->parts[1][k++], png, png_len);
    text_part(&j->parts[1][k++], text);
    j->msgs[m++] = (dg_message){DG_ROLE_USER, j->parts[1], (size_t)k};
    j->bias = (dg_logit_bias){test_bov_id(pkg), bov};
    j->r = (dg_request){.id = id, .messages = j->msgs, .n_messages = (size_t)m, .seed = 7,
                        .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = max_new,
                                 .temperature = greedy ? 0.0f : 0.9f, .logit_bias = &j->bias, .n_logit_bias = bov > 0},
                        .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_GUIDANCE_SCALE |
                                         DG_IMAGE_MAX_IMAGES,
                                  .width = 32, .height = 48, .steps = 3, .guidance_scale = 3.0f, .max_images = 1}};
}

/* Job j's answer made of three tokens (ids 100, 200, 300 raised by 40 over the random
 * model's logits, which span a few units; <BOV>'s bias kept): the order of the three is
 * still the model's, so a drafted continuation is sometimes right and sometimes not. */
static void job_loop(job_spec *j) {
    int n = 0;
    if (j->r.text.n_logit_bias) j->loop[n++] = j->bias;
    for (int k = 1; k <= 3; k++) j->loop[n++] = (dg_logit_bias){100 * k, 40.0f};
    j->r.text.logit_bias = j->loop;
    j->r.text.n_logit_bias = (size_t)n;
}

/* The eight jobs; their inputs (a, b: PNGs; longer: a prompt of more than two chunks of
 * DG_SCHED_CHUNK = 256 tokens) outlive them. */
typedef struct {
    uint8_t *a, *b;
    size_t   la, lb;
    char    *longer;
    job_spec J[N_JOBS];
} eight;

static void eight_make(eight *e) {
    memset(e, 0, sizeof *e);
    e->a = test_png(60, 40, 1, &e->la);
    e->b = test_png(33, 71, 2, &e->lb);
    e->longer = malloc(8192);
    e->longer[0] = 0;
    for (int i = 0; i < 40; i++) strcat(e->longer, "Then stir the sauce slowly, taste it, and add salt. ");
    strcat(e->longer, "Summarize.");
    job(&e->J[0], "b-0", SYSTEM, NULL, 0, "How long does rice take?", 20, 0, 1);
    job(&e->J[1], "b-1", NULL, e->a, e->la, "What is on this plate?", 12, 0, 1);
    job(&e->J[2], "b-2", NULL, NULL, 0, e->longer, 6, 0, 1);
    job(&e->J[3], "b-3", NULL, e->b, e->lb, "Draw it on a blue plate.", 10, 100.0f, 1);
    job(&e->J[4], "b-4", SYSTEM, e->a, e->la, "And how long do the noodles take?", 16, 0, 1);   /* prefix hit */
    job(&e->J[5], "b-5", NULL, NULL, 0, "Tell me everything about knives.", 40, 0, 1);       /* cancelled */
    job(&e->J[6], "b-6", NULL, NULL, 0, "Draw a pancake.", 8, 100.0f, 0);                     /* sampled */
    job(&e->J[7], "b-7", NULL, NULL, 0, "Draw a bowl.", 3, 100.0f, 1);
}

static void eight_free(eight *e) {
    free(e->a);
    free(e->b);
    free(e->longer);
}

/* Each job on a fresh scheduler of one sequence of m (draft: dg_sched_opts draft_tokens);
 * the steps they took in all. */
static int run_alone(dg_model *m, eight *e, test_job *alone, int draft) {
    char err[512];
    int steps = 0;
    for (int i = 0; i < N_JOBS; i++) {
        dg_sched *s = NULL;
        CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = draft}, &s, err, sizeof err), 0);
        if (!s) break;
        dg_sink sink = test_job_sink(&alone[i]);
        uint64_t seq;
        CHECK_EQ_INT(dg_sched_submit(s, &e->J[i].r, &sink, &seq, err, sizeof err), 0);
        while (dg_sched_active(s) > 0 && dg_sched_step(s, err, sizeof err) == 0) steps++;
        CHECK(alone[i].finished && !alone[i].error[0]);
        dg_sched_free(s);
    }
    return steps;
}

/* The jobs together on a scheduler of eight sequences (kept for the caller, *out): job 0
 * first, until its system prompt is in full KV blocks; then the others; job 5 cancelled
 * after 6 more steps. The steps taken. */
static int run_batched(dg_model *m, eight *e, test_job *batched, dg_sched **out, int draft) {
    char err[512];
    dg_sched *s = NULL;
    dg_sink sinks[N_JOBS];
    uint64_t seqs[N_JOBS];
    int steps = 0;
    *out = NULL;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = N_JOBS, .draft_tokens = draft}, &s, err, sizeof err), 0);
    if (!s) return 0;
    for (int i = 0; i < N_JOBS; i++) sinks[i] = test_job_sink(&batched[i]);
    CHECK_EQ_INT(dg_sched_submit(s, &e->J[0].r, &sinks[0], &seqs[0], err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);
    steps++;
    for (int i = 1; i < N_JOBS; i++) CHECK_EQ_INT(dg_sched_submit(s, &e->J[i].r, &sinks[i], &seqs[i], err, sizeof err), 0);
    CHECK_EQ_INT(dg_sched_active(s), N_JOBS);
    for (; dg_sched_active(s) > 0; steps++) {
        if (steps == 7) CHECK_EQ_INT(dg_sched_cancel(s, seqs[5]), 0);
        if (dg_sched_step(s, err, sizeof err) < 0) {
            CHECK(!"step");
            printf("  %s\n", err);
            break;
        }
    }
    for (int i = 0; i < N_JOBS; i++) CHECK(batched[i].finished && !batched[i].error[0]);
    CHECK(batched[5].reason == DG_FINISH_CANCELLED);
    CHECK(batched[3].n_png == 1 && batched[6].n_png == 1 && batched[7].n_png == 1);
    *out = s;
    return steps;
}

/* Every job of `run` streamed what it streamed in `alone`, events and token counts too; the
 * cancelled job 5 a prefix of it. */
static void same_answers(const test_job *run, const test_job *alone) {
    for (int i = 0; i < N_JOBS; i++) {
        if (i == 5) continue;
        if (!test_job_same(&run[i], &alone[i]) || strcmp(run[i].events, alone[i].events)) {
            printf("  job %d differs: \"%s\" / \"%s\"\n", i, run[i].text, alone[i].text);
            CHECK(!"the same answer as alone");
        }
        CHECK_EQ_INT(run[i].usage.generated_tokens, alone[i].usage.generated_tokens);
    }
    CHECK(run[5].len <= alone[5].len && memcmp(run[5].text, alone[5].text, run[5].len) == 0);
}

TEST(batching_eight_jobs_answer_as_each_alone) {
    if (!setup()) { CHECK(!"setup"); return; }
    eight e;
    eight_make(&e);
    test_job alone[N_JOBS] = {0}, batched[N_JOBS] = {0};
    int steps_alone = run_alone(model, &e, alone, 0);
    CHECK_EQ_INT(alone[3].n_png, 1);
    CHECK(alone[5].usage.generated_tokens > 10);
    dg_sched *s = NULL;
    int steps = run_batched(model, &e, batched, &s, 0);
    same_answers(batched, alone);
    CHECK(batched[5].len < alone[5].len);   /* cancelled before its end */
    CHECK(batched[4].usage.cached_prompt_tokens > 0);
    CHECK_EQ_INT(alone[4].usage.cached_prompt_tokens, 0);
    /* jobs 6 and 7 drew images of one layout at the same time: in one DiT forward, on the
     * scheduler's shared state (job 3's, with a condition frame, is another layout) */
    CHECK(s && s->dit != NULL && s->dit_tokens >= 4 * 6);   /* 2 images x 2 branches x 6 tokens (4x6 latents) */
    /* the jobs went together: far fewer steps than one after another */
    printf("  %d steps batched, %d alone; job 4 reused %lld prompt tokens; images drawn:", steps, steps_alone,
           (long long)batched[4].usage.cached_prompt_tokens);
    for (int i = 0; i < N_JOBS; i++) printf(" %d", batched[i].n_png);
    printf("; prompts:");
    for (int i = 0; i < N_JOBS; i++) printf(" %lld", (long long)batched[i].usage.prompt_tokens);
    printf("\n");
    CHECK(2 * steps < steps_alone);
    for (int i = 0; i < N_JOBS; i++) {
        test_job_free(&batched[i]);
        test_job_free(&alone[i]);
    }
    dg_sched_free(s);
    eight_free(&e);
}

/* Drafts change no answer (engine/sched_feed.c "Drafts"): the eight jobs alone with drafts
 * off, and together with up to 7 drafted tokens a step, stream the same bytes (text and
 * PNGs; the cancelled job a prefix); four of them answer in three tokens (job_loop), so
 * their contexts repeat: drafts were fed, some kept and some refused, and the batched run
 * took fewer steps than the same run without drafts. Exact, as the test above: a drafted row's
 * logits are the bits the row has when fed alone (rows_exact), and the tokens are sampled
 * in the same order, the seeded job's random stream included. */
TEST(drafts_change_no_answer) {
    if (!setup()) { CHECK(!"setup"); return; }
    eight e;
    eight_make(&e);
    test_job alone[N_JOBS] = {0}, batched[N_JOBS] = {0}, plain[N_JOBS] = {0};
    const int loops[] = {0, 1, 5, 6};   /* greedy, greedy after an image, cancelled, sampled with an image */
    for (size_t i = 0; i < sizeof loops / sizeof loops[0]; i++) job_loop(&e.J[loops[i]]);
    e.J[6].r.text.max_new_tokens = 40;   /* sampled among the three: drafts refused too */
    run_alone(model, &e, alone, -1);
    dg_sched *s = NULL, *s_plain = NULL;
    int steps = run_batched(model, &e, batched, &s, 7), steps_plain = run_batched(model, &e, plain, &s_plain, -1);
    same_answers(batched, alone);
    int64_t drafted = 0, kept = 0, drafted_plain = 0, kept_plain = 0;
    if (s) dg_sched_draft_stats(s, &drafted, &kept);
    if (s_plain) dg_sched_draft_stats(s_plain, &drafted_plain, &kept_plain);
    printf("  drafts: %lld fed, %lld kept; %d steps, %d without drafts\n", (long long)drafted, (long long)kept, steps,
           steps_plain);
    CHECK(drafted > kept && kept > 0 && drafted_plain == 0);   /* drafts kept and refused */
    CHECK(steps < steps_plain);
    for (int i = 0; i < N_JOBS; i++) {
        test_job_free(&batched[i]);
        test_job_free(&alone[i]);
        test_job_free(&plain[i]);
    }
    dg_sched_free(s);
    dg_sched_free(s_plain);
    eight_free(&e);
}

/* The logit screen changes no answer (engine/MODELS.md "The logit screen"): the eight jobs
 * batched with drafts, on the package opened with the screen for every step (logit_screen
 * 1: whatever this CPU's kernels, and steps of up to 15 logits rows) and without it, stream
 * the same bytes. Their greedy tokens came from the screen's bounds (the full
 * lm_head read for a few rows only) — counted, so that a screen that never decided would
 * fail here — with penalties (job 1), biases (<BOV> raised by 100, the three tokens of
 * job_loop raised by 40) and the ban of <BOV> once a job's images are drawn applied to the
 * bounds; the sampled job 6, given top-k 30 and top-p 0.9 here, took its tokens and draws
 * from them too (run alone as well, so that its own count is seen), while a plain
 * temperature job (job 7, made sampled here) took the whole row. Exact: the screen only
 * narrows down the tokens whose exact logits are computed, and those are the lm_head's bits
 * (matmul_pick). */
TEST(logit_screen_changes_no_answer) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    dg_model *off = NULL;
    dg_model *on = NULL;   /* the screen wherever the CPU backend has it, for any rows a step */
    if (dg_model_open(pkg, &(dg_model_opts){.logit_screen = -1}, &off, err, sizeof err) < 0 ||
        dg_model_open(pkg, &(dg_model_opts){.logit_screen = 1}, &on, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "model with or without the screen: %s", err);
        dg_model_close(off);
        return;
    }
    CHECK(on->llm.screen != NULL && off->llm.screen == NULL);
    eight e;
    eight_make(&e);
    const int loops[] = {0, 5};
    for (size_t i = 0; i < sizeof loops / sizeof loops[0]; i++) job_loop(&e.J[loops[i]]);
    e.J[1].r.text.set |= DG_TEXT_REPETITION_PENALTY;
    e.J[1].r.text.repetition_penalty = 1.3f;
    e.J[6].r.text.set |= DG_TEXT_TOP_K | DG_TEXT_TOP_P;
    e.J[6].r.text.top_k = 30;
    e.J[6].r.text.top_p = 0.9f;
    e.J[7].r.text.temperature = 0.8f;
    test_job with[N_JOBS] = {0}, without[N_JOBS] = {0};
    dg_sched *s = NULL, *s_off = NULL;
    run_batched(on, &e, with, &s, 7);
    run_batched(off, &e, without, &s_off, 7);
    same_answers(with, without);
    for (int i = 0; i < N_JOBS; i++) CHECK(test_job_same(&with[i], &without[i]));   /* job 5 too: both cancelled alike */
    int64_t screened = 0, unscreened = 0, screened_off = 0, unscreened_off = 0;
    if (s) dg_sched_screen_stats(s, &screened, &unscreened);
    if (s_off) dg_sched_screen_stats(s_off, &screened_off, &unscreened_off);
    printf("  tokens from the bounds: %lld, from the whole row: %lld (without the screen: %lld, %lld)\n",
           (long long)screened, (long long)unscreened, (long long)screened_off, (long long)unscreened_off);
    CHECK(screened > 0 && screened_off == 0 && unscreened_off == 0);
    for (int i = 0; i < N_JOBS; i++) {
        test_job_free(&with[i]);
        test_job_free(&without[i]);
    }
    dg_sched_free(s);
    dg_sched_free(s_off);
    /* job 6 alone (one sequence, drafts off: one logits row a step): top-k with top-p from
     * the bounds, the same answer and draws; job 7 (plain temperature) alone: never */
    for (int j = 6; j <= 7; j++) {
        test_job one = {0}, one_off = {0};
        s = s_off = NULL;
        CHECK_EQ_INT(dg_sched_new(on, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = -1}, &s, err, sizeof err), 0);
        CHECK_EQ_INT(dg_sched_new(off, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = -1}, &s_off, err, sizeof err),
                     0);
        if (s && s_off) {
            CHECK_EQ_INT(test_job_run(s, &e.J[j].r, &one), 0);
            CHECK_EQ_INT(test_job_run(s_off, &e.J[j].r, &one_off), 0);
            CHECK(test_job_same(&one, &one_off) && !strcmp(one.events, one_off.events));
            dg_sched_screen_stats(s, &screened, &unscreened);
            printf("  job %d alone (T %g top_k %d): tokens from the bounds %lld, from the whole row %lld\n", j,
                   e.J[j].r.text.temperature, e.J[j].r.text.top_k, (long long)screened, (long long)unscreened);
            if (j == 6) CHECK(screened > 0);
            else CHECK(screened == 0 && unscreened == 0);
        }
        test_job_free(&one);
        test_job_free(&one_off);
        dg_sched_free(s);
        dg_sched_free(s_off);
    }
    eight_free(&e);
    dg_model_close(off);
    dg_model_close(on);
}

/* The default (logit_screen 0: the screen where it pays) on a CPU that has AVX-512 VNNI:
 * the model made a screen for steps of up to its backend's screen_rows logits rows, and
 * the eight jobs run each alone (one sequence, drafts off, so every greedy step has one
 * row) took their greedy tokens from it, streaming what they stream without it. Elsewhere
 * the default makes no screen, which is checked instead. */
TEST(logit_screen_by_default_where_it_pays) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    if (!model->be->screen_rows) {
        CHECK(model->llm.screen == NULL);
        SKIP("this CPU has no AVX-512 VNNI: the default makes no logit screen (checked: none made)");
    }
    CHECK(model->llm.screen != NULL && model->llm.screen_rows == model->be->screen_rows);
    dg_model *off = NULL;
    if (dg_model_open(pkg, &(dg_model_opts){.logit_screen = -1}, &off, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "model without the screen: %s", err);
        return;
    }
    eight e;
    eight_make(&e);
    test_job with[N_JOBS] = {0}, without[N_JOBS] = {0};
    int64_t screened = 0;
    for (int i = 0; i < N_JOBS; i++) {
        dg_sched *s = NULL, *s_off = NULL;
        CHECK_EQ_INT(dg_sched_new(model, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = -1}, &s, err, sizeof err), 0);
        CHECK_EQ_INT(dg_sched_new(off, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = -1}, &s_off, err, sizeof err), 0);
        if (!s || !s_off) {
            dg_sched_free(s);
            dg_sched_free(s_off);
            break;
        }
        CHECK_EQ_INT(test_job_run(s, &e.J[i].r, &with[i]), 0);
        CHECK_EQ_INT(test_job_run(s_off, &e.J[i].r, &without[i]), 0);
        CHECK(test_job_same(&with[i], &without[i]) && !strcmp(with[i].events, without[i].events));
        int64_t a = 0, b = 0;
        dg_sched_screen_stats(s, &a, &b);
        screened += a;
        dg_sched_free(s);
        dg_sched_free(s_off);
    }
    printf("  default screen (rows <= %d): %lld greedy tokens from the bounds\n", model->be->screen_rows,
           (long long)screened);
    CHECK(screened > 0);
    for (int i = 0; i < N_JOBS; i++) {
        test_job_free(&with[i]);
        test_job_free(&without[i]);
    }
    eight_free(&e);
    dg_model_close(off);
}

/* The same eight jobs on the CUDA backend: they run together to their ends (the cancelled
 * one cancelled, the drawn images of the requested size, no device fault). The answers are
 * not compared with the jobs alone: the CUDA backend computes a row differently by the
 * number of rows beside it (backend.h matmul: a GEMV up to 8 rows, cuBLAS above), which can
 * flip a near tie of a random model's tokens; how many jobs agree is printed. */
TEST(batching_on_cuda) {
    if (!test_cuda_present()) SKIP("%s", test_cuda_absent_reason());
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    dg_model *m = NULL;
    if (dg_model_open(pkg, &(dg_model_opts){.device = "cuda:0"}, &m, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "model on cuda:0: %s", err);
        return;
    }
    eight e;
    eight_make(&e);
    test_job alone[N_JOBS] = {0}, batched[N_JOBS] = {0};
    int steps_alone = run_alone(m, &e, alone, 0);
    dg_sched *s = NULL;
    int steps = run_batched(m, &e, batched, &s, 0), same = 0;
    for (int i = 0; i < N_JOBS; i++) {
        same += i != 5 && test_job_same(&batched[i], &alone[i]);
        for (int k = 0; k < batched[i].n_png; k++) CHECK(batched[i].png_w[k] == 32 && batched[i].png_h[k] == 48);
    }
    printf("  cuda: %d steps batched, %d alone; %d of 7 jobs the same bytes as alone\n", steps, steps_alone, same);
    for (int i = 0; i < N_JOBS; i++) {
        test_job_free(&batched[i]);
        test_job_free(&alone[i]);
    }
    dg_sched_free(s);
    eight_free(&e);
    dg_model_close(m);
}

/* Fairness (docs/DESIGN.md §6 "Batching"): a decoding job gets a token every step however
 * many long prompts arrive beside it, and the long prompts, fed 256 tokens a step oldest
 * first, each get their first token within the steps their own and the older prompts'
 * tokens take: no job waits for ever, whatever keeps arriving. Four slots: job A decodes 24
 * tokens; the three others are kept full of long-prompt jobs (one token each). */
typedef struct {
    test_job job;
    int      submitted, done_step;
} fair_job;

TEST(batching_no_job_starves) {
    if (!setup()) { CHECK(!"setup"); return; }
    enum { SLOTS = 4, LONG = 9 };
    char err[512];
    char *texts[LONG];
    dg_sched *s = NULL;
    CHECK_EQ_INT(dg_sched_new(model, &(dg_sched_opts){.max_inflight = SLOTS}, &s, err, sizeof err), 0);
    if (!s) return;
    job_spec a = {0}, lj[LONG];
    fair_job A = {0}, L[LONG];
    memset(lj, 0, sizeof lj);
    memset(L, 0, sizeof L);
    job(&a, "fair-a", NULL, NULL, 0, "Tell me everything about knives.", 24, 0, 1);
    a.r.text.logit_bias = NULL;
    for (int i = 0; i < LONG; i++) {
        texts[i] = malloc(8192);
        snprintf(texts[i], 8192, "Job %d. ", i);
        for (int k = 0; k < 40; k++) strcat(texts[i], "Then stir the sauce slowly, taste it, and add salt. ");
        job(&lj[i], "fair-long", NULL, NULL, 0, texts[i], 1, 0, 1);
    }
    dg_sink sink = test_job_sink(&A.job);
    uint64_t seq;
    CHECK_EQ_INT(dg_sched_submit(s, &a.r, &sink, &seq, err, sizeof err), 0);
    int next = 0, step = 0, prompt = 0;
    while (dg_sched_active(s) > 0 && step < 200) {
        while (next < LONG && dg_sched_active(s) < SLOTS) {
            sink = test_job_sink(&L[next].job);
            CHECK_EQ_INT(dg_sched_submit(s, &lj[next].r, &sink, &seq, err, sizeof err), 0);
            L[next++].submitted = step;
        }
        CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);
        step++;
        if (A.job.finished && !A.done_step) A.done_step = step;
        for (int i = 0; i < next; i++)
            if (L[i].job.finished && !L[i].done_step) L[i].done_step = step;
    }
    /* A: its first token in step 1 (its prompt is one chunk), then one a step to 24 */
    CHECK(A.job.finished && A.job.usage.generated_tokens >= 1);
    if (A.job.reason == DG_FINISH_LENGTH) CHECK_EQ_INT(A.done_step, 24);
    CHECK(A.done_step <= 24);
    /* each long prompt: its tokens and those of the prompts submitted before it that were
     * still feeding, 256 a step (a step may begin with a partial chunk: + 1) */
    prompt = (int)L[0].job.usage.prompt_tokens;
    CHECK(prompt > 2 * 256);
    for (int i = 0; i < LONG; i++) {
        CHECK(L[i].job.finished && !L[i].job.error[0]);
        int bound = (SLOTS - 1) * prompt / 256 + 2;
        if (L[i].done_step - L[i].submitted > bound)
            printf("  long job %d: submitted at step %d, first token at step %d (bound %d)\n", i, L[i].submitted,
                   L[i].done_step, bound);
        CHECK(L[i].done_step - L[i].submitted <= bound);
    }
    printf("  %d steps: A finished at step %d (%lld tokens), %d long prompts of %d tokens\n", step, A.done_step,
           (long long)A.job.usage.generated_tokens, LONG, prompt);
    for (int i = 0; i < LONG; i++) free(texts[i]);
    dg_sched_free(s);
}

/* A pool of one context's worth of KV and two jobs that need more together. Two long
 * prompts with short answers: the second waits for room while the first ends, and both
 * answer as each alone (the second was failed at its first full pool, a job that fits the
 * pool alone dead-lettered after its attempts). Two prompts whose answers run long: each
 * holds what the other needs, and the youngest is failed with the step's message (not an
 * empty one: the slot was cleared, its message with it, before the sink was told) while
 * the other answers in full. */
/* max_inflight sequences over a KV pool of one full context (fp32 KV, 16-token blocks). */
static dg_sched_opts one_context_pool(int max_inflight) {
    const dg_text_config *c = &model->cfg.text;
    const size_t block = 2u * (size_t)c->n_layers * (size_t)c->n_kv_heads * (size_t)c->head_dim * 16 * sizeof(float);
    return (dg_sched_opts){.max_inflight = max_inflight,
                           .kv_cache_bytes = (size_t)((model->max_context + 15) / 16) * block};
}

static char *sentences(const char *sentence, double of_context) {   /* ~12 tokens a sentence */
    const int n = (int)(of_context * model->max_context / 12);
    char *text = malloc((size_t)n * strlen(sentence) + 1);
    text[0] = 0;
    for (int k = 0; k < n; k++) strcat(text, sentence);
    return text;
}

TEST(batching_a_full_kv_pool_waits_then_fails_the_youngest) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    const dg_sched_opts one_context = one_context_pool(2);
    char *text[2] = {sentences("Then stir the sauce slowly, taste it, and add salt. ", 0.6),
                     sentences("Slice the onions thin and fry them until golden. ", 0.6)};
    job_spec j[2];
    test_job alone[2] = {0}, both[2] = {0};
    dg_sink sinks[2];
    uint64_t seq;
    for (int k = 0; k < 2; k++) {
        job(&j[k], k ? "room-b" : "room-a", NULL, NULL, 0, text[k], 4, 0, 1);
        dg_sched *s1 = NULL;
        CHECK_EQ_INT(dg_sched_new(model, &one_context, &s1, err, sizeof err), 0);
        if (!s1) return;
        sinks[k] = test_job_sink(&alone[k]);
        CHECK_EQ_INT(dg_sched_submit(s1, &j[k].r, &sinks[k], &seq, err, sizeof err), 0);
        while (dg_sched_active(s1) > 0 && dg_sched_step(s1, err, sizeof err) == 0) {}
        dg_sched_free(s1);
    }
    dg_sched *s = NULL;
    CHECK_EQ_INT(dg_sched_new(model, &one_context, &s, err, sizeof err), 0);
    if (!s) return;
    for (int k = 0; k < 2; k++) {
        sinks[k] = test_job_sink(&both[k]);
        CHECK_EQ_INT(dg_sched_submit(s, &j[k].r, &sinks[k], &seq, err, sizeof err), 0);
    }
    for (int step = 0; dg_sched_active(s) > 0 && step < 200; step++) CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);
    for (int k = 0; k < 2; k++) {
        CHECK(both[k].finished && !both[k].error[0] && alone[k].finished && !alone[k].error[0]);
        if (both[k].error[0]) printf("  job %d: %s\n", k, both[k].error);
        CHECK(test_job_same(&both[k], &alone[k]));
        test_job_free(&both[k]);
        test_job_free(&alone[k]);
    }

    /* answers that run long (three tokens biased far above the rest: no end of text) */
    for (int k = 0; k < 2; k++) {
        free(text[k]);
        text[k] = sentences(k ? "Slice the onions thin and fry them until golden. "
                              : "Then stir the sauce slowly, taste it, and add salt. ", 0.4);
        job(&j[k], k ? "long-b" : "long-a", NULL, NULL, 0, text[k], (int)(0.35 * model->max_context), 0, 1);
        job_loop(&j[k]);
        sinks[k] = test_job_sink(&both[k]);
        CHECK_EQ_INT(dg_sched_submit(s, &j[k].r, &sinks[k], &seq, err, sizeof err), 0);
    }
    for (int step = 0; dg_sched_active(s) > 0 && step < 2000; step++) CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);
    CHECK(both[0].finished && !both[0].error[0]);
    CHECK_EQ_INT(both[0].usage.generated_tokens, (int)(0.35 * model->max_context));
    CHECK(both[1].finished && both[1].n_events > 0 && both[1].events[both[1].n_events - 1] == 'x');
    CHECK(strstr(both[1].error, "cache full") && strstr(both[1].error, "the youngest of those waiting is given up"));
    printf("  the youngest failed: \"%s\"\n", both[1].error);
    for (int k = 0; k < 2; k++) {
        test_job_free(&both[k]);
        free(text[k]);
    }
    dg_sched_free(s);
}

/* A prompt that hits the prefix cache holds its blocks from submit, before any forward:
 * counted as begun, it made an older prompt that did not fit beside it wait, and the older
 * one's wait held it back in turn (first come, first served): no row, no failure, the two
 * stepped for ever. Now a prefix hit is not a begun feed, a held prompt never holds a begun
 * one back, and a held prompt with nothing else in the step goes (the pool decides). */
TEST(batching_a_prefix_hit_behind_a_held_prompt_goes_on) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    dg_sched *s = NULL;
    const dg_sched_opts pool = one_context_pool(2);
    CHECK_EQ_INT(dg_sched_new(model, &pool, &s, err, sizeof err), 0);
    if (!s) return;
    char *sys = sentences("You are a patient cook who answers in short steps. ", 0.45);
    char *longer = sentences("Slice the onions thin and fry them until golden. ", 0.8);
    job_spec ja, jy, jx;
    test_job a = {0}, y = {0}, x = {0};
    dg_sink sa = test_job_sink(&a), sy = test_job_sink(&y), sx = test_job_sink(&x);
    uint64_t seq;
    job(&ja, "a", sys, NULL, 0, "How long does rice take?", 2, 0, 1);
    job(&jy, "y", NULL, NULL, 0, longer, 2, 0, 1);
    job(&jx, "x", sys, NULL, 0, "And the noodles?", 2, 0, 1);
    CHECK_EQ_INT(dg_sched_submit(s, &ja.r, &sa, &seq, err, sizeof err), 0);
    while (dg_sched_active(s) > 0 && dg_sched_step(s, err, sizeof err) == 0) {}
    CHECK(a.finished && !a.error[0]);
    CHECK_EQ_INT(dg_sched_submit(s, &jy.r, &sy, &seq, err, sizeof err), 0);   /* older, no prefix */
    CHECK_EQ_INT(dg_sched_submit(s, &jx.r, &sx, &seq, err, sizeof err), 0);   /* a's system prompt */
    int x_hit = 0;
    for (int i = 0; i < s->n_seqs; i++) x_hit |= s->seqs[i].state != SEQ_FREE && s->seqs[i].n_fed > 0;
    CHECK(x_hit);   /* the case: the younger one holds cached blocks from submit */
    int step = 0;
    for (; dg_sched_active(s) > 0 && step < 1000; step++) CHECK_EQ_INT(dg_sched_step(s, err, sizeof err), 0);
    CHECK(y.finished && x.finished);
    CHECK(!x.error[0]);
    if (!y.finished || !x.finished) printf("  after %d steps: %d still active\n", step, dg_sched_active(s));
    test_job_free(&a);
    test_job_free(&y);
    test_job_free(&x);
    free(sys);
    free(longer);
    dg_sched_free(s);
}

/* The slots' painters share one VAE state, pixel buffer and DiT state (painter.h
 * dg_painter_scratch): four pictures of three sizes, guided and not, one with a condition
 * frame, drawn at the same time (other layouts: each steps on the shared state in turn, its
 * layout set again) come out byte for byte as each drawn alone on a fresh scheduler. */
TEST(batching_pictures_of_other_sizes_share_the_painters_scratch) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    size_t la = 0;
    uint8_t *a = test_png(60, 40, 1, &la);
    static const struct { int w, h, steps; float guidance; int cond; } pic[] = {
        {32, 48, 3, 3.0f, 0}, {48, 32, 2, 3.0f, 0}, {64, 32, 4, 0.0f, 0}, {32, 48, 3, 3.0f, 1}};
    enum { N = sizeof pic / sizeof pic[0] };
    job_spec J[N];
    char ids[N][16];
    for (int i = 0; i < N; i++) {
        snprintf(ids[i], sizeof ids[i], "pic-%d", i);
        job(&J[i], ids[i], NULL, pic[i].cond ? a : NULL, la, "Draw a plate.", 3, 100.0f, 1);
        J[i].r.image.width = pic[i].w;
        J[i].r.image.height = pic[i].h;
        J[i].r.image.steps = pic[i].steps;
        J[i].r.image.guidance_scale = pic[i].guidance;
    }
    test_job alone[N] = {0}, together[N] = {0};
    for (int i = 0; i < N; i++) {
        dg_sched *s = NULL;
        CHECK_EQ_INT(dg_sched_new(model, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err), 0);
        if (!s) break;
        dg_sink sink = test_job_sink(&alone[i]);
        uint64_t seq;
        CHECK_EQ_INT(dg_sched_submit(s, &J[i].r, &sink, &seq, err, sizeof err), 0);
        while (dg_sched_active(s) > 0 && dg_sched_step(s, err, sizeof err) == 0) {}
        CHECK(alone[i].finished && !alone[i].error[0] && alone[i].n_png == 1);
        dg_sched_free(s);
    }
    dg_sched *s = NULL;
    CHECK_EQ_INT(dg_sched_new(model, &(dg_sched_opts){.max_inflight = N}, &s, err, sizeof err), 0);
    if (s) {
        dg_sink sinks[N];
        uint64_t seq;
        for (int i = 0; i < N; i++) {
            sinks[i] = test_job_sink(&together[i]);
            CHECK_EQ_INT(dg_sched_submit(s, &J[i].r, &sinks[i], &seq, err, sizeof err), 0);
        }
        int most_drawing = 0;
        while (dg_sched_active(s) > 0) {
            int drawing = 0;
            for (int i = 0; i < s->n_seqs; i++) drawing += s->seqs[i].state == SEQ_DRAW;
            if (drawing > most_drawing) most_drawing = drawing;
            if (dg_sched_step(s, err, sizeof err) < 0) {
                CHECK(!"step");
                printf("  %s\n", err);
                break;
            }
        }
        CHECK(most_drawing >= 3);   /* the pictures were in progress at the same time */
        for (int i = 0; i < N; i++) {
            CHECK(together[i].finished && !together[i].error[0]);
            if (!test_job_same(&together[i], &alone[i])) {
                printf("  picture %d (%dx%d) differs from its drawing alone\n", i, pic[i].w, pic[i].h);
                CHECK(!"the same picture as alone");
            }
        }
    }
    for (int i = 0; i < N; i++) {
        test_job_free(&alone[i]);
        test_job_free(&together[i]);
    }
    dg_sched_free(s);
    free(a);
}

/* max_inflight 0: as many sequences as the KV budget holds at full context with as much
 * again for cached prefixes (here 5), at most 16; with no budget the backend's free memory
 * decides (at least 1). */
TEST(batching_max_inflight_from_memory) {
    if (!setup()) { CHECK(!"setup"); return; }
    char err[512];
    const dg_text_config *c = &model->cfg.text;
    size_t block = 2u * (size_t)c->n_layers * (size_t)c->n_kv_heads * (size_t)c->head_dim * 16 * sizeof(float);
    size_t per_seq = 2 * (size_t)((model->max_context + 15) / 16) * block;
    dg_sched *s = NULL;
    CHECK_EQ_INT(dg_sched_new(model, &(dg_sched_opts){.kv_cache_bytes = 5 * per_seq + block}, &s, err, sizeof err), 0);
    if (s) {
        CHECK_EQ_INT(s->n_seqs, 5);
        CHECK(dg_sched_sized_from(s) == 0);   /* the budget decided: no memory was read */
        CHECK_EQ_INT(dg_sched_kv_holds(s), 10);   /* each sized at twice its full context */
    }
    dg_sched_free(s);
    s = NULL;
    /* a budget of one full context beside max_inflight 4: it holds one (the worker warns) */
    CHECK_EQ_INT(dg_sched_new(model, &(dg_sched_opts){.kv_cache_bytes = per_seq / 2, .max_inflight = 4}, &s, err,
                              sizeof err), 0);
    if (s) {
        CHECK_EQ_INT(dg_sched_max_inflight(s), 4);
        CHECK_EQ_INT(dg_sched_kv_holds(s), 1);
    }
    dg_sched_free(s);
    s = NULL;
    CHECK_EQ_INT(dg_sched_new(model, &(dg_sched_opts){.kv_cache_bytes = 100 * per_seq}, &s, err, sizeof err), 0);
    if (s) CHECK_EQ_INT(s->n_seqs, 16);
    dg_sched_free(s);
    s = NULL;
    CHECK_EQ_INT(dg_sched_new(model, &(dg_sched_opts){0}, &s, err, sizeof err), 0);
    if (s) {
        /* the figure it read is the one it sized by (the worker's log line prints it): half of
         * it over a sequence's KV and condition rows, clamped to 1 .. 16 */
        size_t got = dg_sched_sized_from(s);
        size_t cond = model->has_draw ? 3 * (size_t)model->max_context * (size_t)model->conn.d_cond * sizeof(float) : 0;
        size_t n = got / 2 / (per_seq + cond);
        CHECK(got > 0);   /* the CPU backend always says (MemAvailable) */
        CHECK_EQ_INT(s->n_seqs, n < 1 ? 1 : n > 16 ? 16 : (int)n);
        printf("  no budget: %d sequences (%zu MiB free, %zu MiB a sequence)\n", s->n_seqs, got >> 20,
               (per_seq + cond) >> 20);
    }
    dg_sched_free(s);
}

int main(void) {
    int rc = test_main();
    dg_model_close(model);
    return rc;
}
