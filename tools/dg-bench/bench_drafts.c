/* bench_drafts — decoding with drafts by prompt lookup (dg_sched_opts draft_tokens;
 * engine/sched_feed.c "Drafts") against decoding without, the same jobs through the public
 * API, alternated (off, on, off, on: the best of each kept; the cores are shared); on is
 * draft_tokens DG_SCHED_DRAFT_DEFAULT, what the CPU's default takes for a decoder of 64 MiB
 * or more (the shapes model's decoder, smaller, is measured with them all the same):
 *
 *   small   the small preset (--model DIR, else build/models/small: the decoder of the
 *           `decoder` bench), three text jobs, greedy, 96 new tokens each (--quick: 24),
 *           one at a time on a scheduler of one slot. Random weights write no language; what
 *           a draft finds is what their greedy text repeats of the prompt and of itself.
 *   shapes  the shipped shapes model (tools/train/shapes, the demo's), four requests of
 *           the kinds it was trained on (a scene step by step, a description of a picture
 *           it draws, a drawing, talk), sampled as the demo samples (its package's
 *           defaults), pictures included; skipped when the package is absent.
 *
 * Figures per package: decode_tok_s_{off,on} (generated tokens over the decode time the
 * scheduler accounts to the jobs, dg_timings.decode_ms; the first token of each answer
 * comes from the prefill and is counted too, the same on both sides), their ratio,
 * jobs_s_{off,on} (whole jobs), steps_{off,on}, drafted and kept tokens and their ratio
 * (acceptance), and same_answers (1 when every job's text and token count matched: drafts
 * never change an answer, tests/test_batching.c checks it exactly). The small preset's
 * decode_tok_s_on is also compared with llama.cpp's plain decode of the same weights
 * (build/bench/llamacpp_decoder.json, BF16 GGUF; --bf16-compute for the same precision):
 * the same greedy answer, produced with fewer passes over the weights where drafts hold. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "duogen.h"
#include "scheduler.h"

#define MAX_JOBS 4

typedef struct {
    double tok_s, jobs_s;
    int    steps;
    int64_t drafted, kept;
} run_figures;

/* The n jobs one after another on a scheduler of one slot with draft_tokens `draft`. */
static int run_jobs(dg_model *m, const char *const *prompts, int n, int max_new, int draft, bench_obs *o,
                    run_figures *f, char *err, size_t errlen) {
    dg_sched *s = NULL;
    int rc = dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1, .draft_tokens = draft}, &s, err, errlen);
    if (rc < 0) return rc;
    double t0 = bench_now_ms(), decode_ms = 0;
    int64_t tokens = 0;
    *f = (run_figures){0};
    for (int i = 0; i < n && rc == 0; i++) {
        dg_part part = {.kind = DG_PART_TEXT, .text = prompts[i], .text_len = strlen(prompts[i])};
        dg_message msg = {DG_ROLE_USER, &part, 1};
        dg_request r = {.id = "bench", .messages = &msg, .n_messages = 1, .seed = (uint64_t)i + 1,
                        .text = {.set = max_new ? DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE : 0,
                                 .max_new_tokens = max_new, .temperature = 0.0f}};
        dg_sink sink = bench_obs_sink(&o[i]);
        uint64_t seq;
        if ((rc = dg_sched_submit(s, &r, &sink, &seq, err, errlen)) < 0) break;
        while (rc == 0 && dg_sched_active(s) > 0) {
            rc = dg_sched_step(s, err, errlen);
            f->steps++;
        }
        if (rc == 0 && o[i].failed) {
            snprintf(err, errlen, "job %d: %s", i, o[i].message);
            rc = -1;
        }
        decode_ms += o[i].t.decode_ms;
        tokens += o[i].usage.generated_tokens;
    }
    if (rc == 0) {
        f->tok_s = tokens / (decode_ms / 1e3);
        f->jobs_s = n / ((bench_now_ms() - t0) / 1e3);
        dg_sched_draft_stats(s, &f->drafted, &f->kept);
    }
    dg_sched_free(s);
    return rc;
}

/* Off and on, alternated `rounds` times; the figures under prefix. */
static int compare(json_t *out, dg_model *m, const char *prefix, const char *const *prompts, int n,
                   int max_new, int threads) {
    static bench_obs o[2][MAX_JOBS];
    run_figures best[2] = {{0}}, f;
    char err[512], name[96];
    const int rounds = 2, draft[2] = {-1, DG_SCHED_DRAFT_DEFAULT};
    int same = 1;
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < 2; k++) {
            if (run_jobs(m, prompts, n, max_new, draft[k], o[k], &f, err, sizeof err) < 0) {
                fprintf(stderr, "bench_drafts: %s\n", err);
                return -1;
            }
            if (r == 0 || f.tok_s > best[k].tok_s) best[k] = f;
        }
    for (int i = 0; i < n; i++)
        same &= o[0][i].len == o[1][i].len && !memcmp(o[0][i].text, o[1][i].text, o[0][i].len) &&
                o[0][i].usage.generated_tokens == o[1][i].usage.generated_tokens && o[0][i].images == o[1][i].images;
    const char *side[2] = {"off", "on"};
    for (int k = 0; k < 2; k++) {
        snprintf(name, sizeof name, "%s_decode_tok_s_%s_t%d", prefix, side[k], threads);
        bench_record(out, name, best[k].tok_s, "tok/s");
        snprintf(name, sizeof name, "%s_jobs_s_%s_t%d", prefix, side[k], threads);
        bench_record(out, name, best[k].jobs_s, "jobs/s");
        snprintf(name, sizeof name, "%s_steps_%s", prefix, side[k]);
        bench_record(out, name, best[k].steps, "steps");
    }
    snprintf(name, sizeof name, "%s_decode_speedup_t%d", prefix, threads);
    bench_record(out, name, best[1].tok_s / best[0].tok_s, "x");
    snprintf(name, sizeof name, "%s_drafted", prefix);
    bench_record(out, name, (double)best[1].drafted, "tokens");
    snprintf(name, sizeof name, "%s_kept", prefix);
    bench_record(out, name, (double)best[1].kept, "tokens");
    snprintf(name, sizeof name, "%s_acceptance", prefix);
    bench_record(out, name, best[1].drafted ? (double)best[1].kept / (double)best[1].drafted : 0.0, "of drafted");
    snprintf(name, sizeof name, "%s_same_answers", prefix);
    bench_record(out, name, same, "(1: yes)");
    if (!strcmp(prefix, "small")) {   /* llama.cpp's figure is "decode_tok_s_tN" */
        snprintf(name, sizeof name, "decode_tok_s_t%d", threads);
        bench_ratio(out, "build/bench/llamacpp_decoder.json", name, "llamacpp_plain_decode", best[1].tok_s);
    }
    return 0;
}

static int bench_drafts(bench_ctx *ctx, json_t *out) {
    static const char *const small_prompts[3] = {
        "Write out the steps of a simple bread recipe: flour, water, salt and yeast, mixed, kneaded, left to rise, "
        "shaped, left to rise again and baked. Then write the same steps again as a numbered list.",
        "List the days of the week, then the months of the year, then the days of the week again.",
        "Tell a short story about a cat who walks to the market every morning, buys one fish, walks home, and "
        "does it again the next day, and the day after that."};
    static const char *const shapes_prompts[4] = {
        "Show me step by step how to draw a large red circle in the top left, a small blue square in the middle "
        "and a green triangle in the bottom right.",
        "Draw a small purple triangle in the top right and a large yellow circle in the bottom left.",
        "Show me step by step how to draw an orange square in the middle left and a blue circle in the top "
        "middle.",
        "What shapes do you know, and what colours?"};
    char pkg[1024], err[512];
    const int threads = ctx->threads > 0 ? ctx->threads : 2;
    if (bench_small_package(ctx, pkg, sizeof pkg) < 0) return -1;
    bench_record_compute(ctx, out);
    printf("  small: %s, %d threads, greedy; shapes: tools/train/shapes, its defaults\n", pkg, threads);
    dg_model *m = NULL;
    const dg_model_opts mo = {.threads = threads, .cpu_bf16_compute = ctx->bf16_compute,
                              .cpu_mapped_weights = ctx->mapped_weights};
    if (dg_model_open(pkg, &mo, &m, err, sizeof err) < 0) {
        fprintf(stderr, "bench_drafts: %s\n", err);
        return -1;
    }
    int rc = compare(out, m, "small", small_prompts, 3, ctx->quick ? 24 : 96, threads);
    dg_model_close(m);
    if (rc < 0) return rc;
    if (access("tools/train/shapes/duogen.json", R_OK) != 0) {
        printf("  shapes: no tools/train/shapes in this directory: skipped\n");
        return 0;
    }
    if (dg_model_open("tools/train/shapes", &mo, &m, err, sizeof err) < 0) {
        fprintf(stderr, "bench_drafts: %s\n", err);
        return -1;
    }
    rc = compare(out, m, "shapes", shapes_prompts, ctx->quick ? 2 : 4, 0, threads);
    dg_model_close(m);
    return rc;
}

DG_BENCH(drafts, "decoding with drafts by prompt lookup against without: the small preset and the shapes model",
         bench_drafts)
