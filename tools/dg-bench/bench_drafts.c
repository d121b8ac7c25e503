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
 * never change an answer, tests/test_batching.c checks it exactly).
 *
 * The small preset against llama.cpp (--llamacpp CMD: tools/reference/bench_llamacpp.py
 * --serve, a BF16 GGUF of the same weights; --bf16-compute for the same precision), timed
 * turn about in each of 3 rounds (bench.h bench_peer): the same prompt ids (our chat
 * template's), greedy, plain and with drafts taken by our rule (the peer's "generate":
 * the same lookup, budget and waits, its rows' argmax as our sampler's). Ratios are the
 * median of the rounds' (ours off / its plain, ours on / its drafts, ours on / its plain);
 * its answers are compared with ours as text (same_text_*: 1 when every job's matched).
 * Without a peer (none given, it did not start or it dropped) there are no llama.cpp
 * figures and "llamacpp_baseline_missing" says why: never an earlier run's file. The two
 * sides' windows differ a little: ours is the scheduler's decode time (forwards; sampling
 * and the draft lookup are outside it), its the wall time of its decode loop, its argmax
 * over the rows included (about 0.1 ms a row at V = 151936). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "duogen.h"
#include "scheduler.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

#define MAX_JOBS 4
#define PEER_ROUNDS 3   /* rounds with the llama.cpp peer: its ratio is their median */

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

/* llama.cpp's figures of one pass over the jobs (the peer's "generate"). */
typedef struct {
    double  s;                     /* decode seconds, its own clock */
    int64_t tokens, steps, drafted, kept;
    int     same_text;             /* every job's text equals ours (plain decoding's) */
    int64_t agree, bytes;          /* bytes of our answers before its first differs; all of ours */
} peer_figures;

#define PEER_LINE 8192

/* The n jobs through the peer with drafts of up to k tokens (0: plain): their prompt ids
 * (ours, rendered), our stop ids and the ids never drafted; its answers decoded as our
 * stream decodes (DG_TOK_SKIP_SPECIAL) and compared with ours[i]. 0, or -1 when the peer
 * was dropped (with a message). */
static int peer_jobs(bench_peer *peer, const dg_model *m, const dg_tok_ids *ids, int n, int max_new, int k,
                     const bench_obs *ours, peer_figures *f) {
    static char line[PEER_LINE];
    const int32_t nodraft[4] = {m->image_pad_id, m->vision_start_id, m->vision_end_id, m->bov_id};
    char err[512];
    *f = (peer_figures){.same_text = 1};
    for (int i = 0; i < n; i++) {
        int at = snprintf(line, sizeof line, "generate %d %d ", max_new, k);
        for (int j = 0; j < m->n_stop_ids; j++) at += snprintf(line + at, sizeof line - at, "%s%d", j ? "," : "", m->stop_ids[j]);
        at += snprintf(line + at, sizeof line - at, "%s", m->n_stop_ids ? " " : "- ");
        int any = 0;
        for (int j = 0; j < 4; j++)
            if (nodraft[j] >= 0) at += snprintf(line + at, sizeof line - at, "%s%d", any++ ? "," : "", nodraft[j]);
        at += snprintf(line + at, sizeof line - at, "%s", any ? "" : "-");
        for (size_t j = 0; j < ids[i].n && at < PEER_LINE - 16; j++) at += snprintf(line + at, sizeof line - at, " %d", ids[i].ids[j]);
        if (at >= PEER_LINE - 16) {
            fprintf(stderr, "dg-bench: the llama.cpp baseline dropped: prompt %d is too long for one line\n", i);
            bench_peer_stop(peer);
            return -1;
        }
        json_t *r = bench_peer_ask(peer, line, err, sizeof err);
        const json_t *toks = r ? json_object_get(r, "tokens") : NULL;
        if (!json_is_array(toks)) {
            if (r) snprintf(err, sizeof err, "baseline: no tokens in its reply to \"generate\"");
            fprintf(stderr, "dg-bench: the llama.cpp baseline dropped: %s\n", err);
            json_decref(r);
            bench_peer_stop(peer);
            return -1;
        }
        const size_t nt = json_array_size(toks);
        int32_t *t = malloc((nt ? nt : 1) * sizeof *t);
        char *text = NULL;
        size_t len = 0;
        for (size_t j = 0; t && j < nt; j++) t[j] = (int32_t)json_integer_value(json_array_get(toks, j));
        if (!t || dg_tok_decode(m->tok, t, nt, DG_TOK_SKIP_SPECIAL, &text, &len, err, sizeof err) < 0) len = 0;
        f->same_text &= text && len == ours[i].len && !memcmp(text, ours[i].text, len);
        size_t a = 0;
        while (text && a < len && a < ours[i].len && text[a] == ours[i].text[a]) a++;
        f->agree += (int64_t)a;
        f->bytes += (int64_t)ours[i].len;
        free(text);
        free(t);
        f->s += json_number_value(json_object_get(r, "s"));
        f->tokens += (int64_t)nt;
        f->steps += json_integer_value(json_object_get(r, "steps"));
        f->drafted += json_integer_value(json_object_get(r, "drafted"));
        f->kept += json_integer_value(json_object_get(r, "kept"));
        json_decref(r);
    }
    return 0;
}

/* The peer's two passes of a round (plain, then with drafts of k) into p[0], p[1]. */
static void peer_round(bench_peer *peer, const dg_model *m, const dg_tok_ids *ids, int n, int max_new, int k,
                       const bench_obs *ours, peer_figures p[2]) {
    for (int j = 0; j < 2 && bench_peer_live(peer); j++) peer_jobs(peer, m, ids, n, max_new, j ? k : 0, ours, &p[j]);
}

/* Off and on, alternated `rounds` times (with the peer's plain and drafts turn about, when
 * there is one); the figures under prefix. */
static int compare(json_t *out, dg_model *m, const char *prefix, const char *const *prompts, int n,
                   int max_new, int threads, bench_peer *peer) {
    static bench_obs o[2][MAX_JOBS];
    run_figures best[2] = {{0}}, f, fr[PEER_ROUNDS][2];
    peer_figures pf[PEER_ROUNDS][2];
    dg_tok_ids ids[MAX_JOBS] = {{0}};
    char err[512], name[96];
    const int draft[2] = {-1, DG_SCHED_DRAFT_DEFAULT};
    int same = 1, rounds = 2;
    if (bench_peer_live(peer)) {   /* the prompts as the scheduler renders them */
        rounds = PEER_ROUNDS;
        for (int i = 0; i < n; i++) {
            const dg_chat_part part = {.kind = DG_CHAT_TEXT, .text = prompts[i], .text_len = strlen(prompts[i])};
            const dg_chat_message msg = {DG_CHAT_USER, &part, 1};
            if (dg_chat_encode(m->tok, &msg, 1, true, &ids[i], err, sizeof err) < 0) {
                fprintf(stderr, "bench_drafts: prompt %d: %s\n", i, err);
                for (int j = 0; j <= i; j++) dg_tok_ids_free(&ids[j]);
                return -1;
            }
        }
    }
    for (int r = 0; r < rounds; r++) {
        /* ours first in even rounds; the peer compares its text with plain decoding's, so
         * it goes first only once ours has run */
        if (r % 2) peer_round(peer, m, ids, n, max_new, DG_SCHED_DRAFT_DEFAULT, o[0], pf[r]);
        for (int k = 0; k < 2; k++) {
            if (run_jobs(m, prompts, n, max_new, draft[k], o[k], &f, err, sizeof err) < 0) {
                fprintf(stderr, "bench_drafts: %s\n", err);
                for (int i = 0; i < n; i++) dg_tok_ids_free(&ids[i]);
                return -1;
            }
            fr[r][k] = f;
            if (r == 0 || f.tok_s > best[k].tok_s) best[k] = f;
        }
        if (!(r % 2)) peer_round(peer, m, ids, n, max_new, DG_SCHED_DRAFT_DEFAULT, o[0], pf[r]);
    }
    for (int i = 0; i < n; i++) dg_tok_ids_free(&ids[i]);
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
    if (bench_peer_live(peer)) {
        double ratio[3][PEER_ROUNDS], s[2] = {0}, tokens[2] = {0};
        int same_text[2] = {1, 1};
        static const char *const what[3] = {"off_vs_llamacpp_plain", "on_vs_llamacpp_drafts", "on_vs_llamacpp_plain"};
        for (int r = 0; r < rounds; r++) {
            for (int j = 0; j < 2; j++) {
                s[j] += pf[r][j].s;
                tokens[j] += (double)pf[r][j].tokens;
                same_text[j] &= pf[r][j].same_text;
            }
            const double plain = (double)pf[r][0].tokens / pf[r][0].s, drafts = (double)pf[r][1].tokens / pf[r][1].s;
            ratio[0][r] = fr[r][0].tok_s / plain;
            ratio[1][r] = fr[r][1].tok_s / drafts;
            ratio[2][r] = fr[r][1].tok_s / plain;
        }
        bench_peer_announce(peer, out, "llama.cpp", "llamacpp");
        for (int j = 0; j < 2; j++) {
            snprintf(name, sizeof name, "%s_llamacpp_%s_tok_s_t%d", prefix, j ? "drafts" : "plain", threads);
            bench_record(out, name, tokens[j] / s[j], "tok/s (its decode, all rounds)");
            snprintf(name, sizeof name, "%s_llamacpp_steps_%s", prefix, j ? "drafts" : "plain");
            bench_record(out, name, (double)pf[0][j].steps, "steps");
            snprintf(name, sizeof name, "%s_llamacpp_same_text_%s", prefix, j ? "drafts" : "plain");
            bench_record(out, name, same_text[j], "(1: its answers equal ours)");
            snprintf(name, sizeof name, "%s_llamacpp_text_agrees_%s", prefix, j ? "drafts" : "plain");
            bench_record(out, name, pf[0][j].bytes ? (double)pf[0][j].agree / (double)pf[0][j].bytes : 0,
                         "(of our answers' bytes, before its first differs)");
        }
        snprintf(name, sizeof name, "%s_llamacpp_kept", prefix);
        bench_record(out, name, (double)pf[0][1].kept, "tokens");
        snprintf(name, sizeof name, "%s_llamacpp_drafted", prefix);
        bench_record(out, name, (double)pf[0][1].drafted, "tokens");
        for (int w = 0; w < 3; w++) {
            snprintf(name, sizeof name, "%s_%s_t%d", prefix, what[w], threads);
            bench_record_rounds(out, name, ratio[w], rounds, "x");
        }
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
    bench_peer peer = {.pid = -1, .from = -1};
    if (ctx->llamacpp) {
        char cmd[2200];
        bench_peer_command(ctx, ctx->llamacpp, threads, 1, cmd, sizeof cmd);
        if (bench_peer_start(&peer, cmd, err, sizeof err) < 0)
            fprintf(stderr, "bench_drafts: no llama.cpp baseline: %s\n", err);
    }
    int rc = compare(out, m, "small", small_prompts, 3, ctx->quick ? 24 : 96, threads, &peer);
    bench_peer_outcome(&peer, out, "llama.cpp", "llamacpp", "--llamacpp", "");
    bench_peer_stop(&peer);
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
    rc = compare(out, m, "shapes", shapes_prompts, ctx->quick ? 2 : 4, 0, threads, &peer);
    dg_model_close(m);
    return rc;
}

DG_BENCH(drafts, "decoding with drafts by prompt lookup against without: the small preset and the shapes model",
         bench_drafts)
