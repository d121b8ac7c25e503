/* bench_batch — continuous batching on the CPU (docs/DESIGN.md §6 "Batching"), small preset
 * (--model DIR, else build/models/small, written when missing), against the number of
 * concurrent jobs N = 1, 2, 4, 8, 16 (--quick: jobs to 8):
 *
 *   decode_tok_s_nN   aggregate decode tok/s of N sequences stepped in one forward each
 *                     step (dg_qwen2_forward_batch: every weight one GEMM over N rows,
 *                     attention per sequence), 16 steps after a 64-token prompt each
 *                     (--quick: 4 after 16), the best of 3 rounds that take the sizes in
 *                     turn (the cores are shared: a round another process slowed is not
 *                     kept); fixed token ids, so the figure is the forward alone, sampling
 *                     excluded.
 *                     decode_speedup_nN = decode_tok_s_nN / decode_tok_s_n1 (goal at
 *                     N = 8: >= 4, issue 17).
 *   jobs_per_hour_nN  N whole jobs through the public API on one scheduler of N slots
 *                     (dg_sched): a 40-odd-token prompt each, <BOV> made certain (random
 *                     weights never choose it), one 64x64 image in 4 steps with guidance,
 *                     then 24 tokens of text (--quick: 32x32, 2 steps, 8 tokens); wall time
 *                     from the first submit to the last finish. One job of another text
 *                     runs first, untimed, so that N = 1 does not pay the first use
 *                     (pages, scratch) alone.
 *   prefill_ms_nN, decode_ms_nN, draw_ms_nN   where those jobs' time went, summed over
 *                     the jobs (dg_timings: a batched forward's time is shared by its
 *                     sequences by their rows, so the sums add up to the worker's time;
 *                     prefill includes the vision tower's, draw = the DiT's steps and the
 *                     VAE).
 *   tokens_nN, images_nN   what those jobs wrote and drew, all together: the work the
 *                     figures are of.
 *
 * Threads: --threads N, else 2. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "bench.h"
#include "cache/kv_cache.h"
#include "duogen.h"
#include "io/safetensors.h"
#include "model.h"
#include "mllm/qwen2.h"
#include "mllm/qwen2vl_config.h"

#define MAX_N 16

/* ---- the decoder alone: N sequences, one forward a step ---------------------------------- */

#define N_SIZES 5    /* 1, 2, 4, 8, 16 sequences */
#define ROUNDS 3     /* each size timed this many times, interleaved: the best counts (the
                        cores are shared; a round that another process slowed is not kept) */

typedef struct {
    const dg_qwen2 *m;
    dg_qwen2_state *s;
    dg_kv_cache    *kv;
    dg_kv_seq       seqs[2 * MAX_N];   /* sequences of size n at seqs[n - 1 ..]: 1, 2, 4, 8, 16 */
    int32_t         ids[2 * MAX_N][64];
} decode_bench;

/* n_decode steps of the n sequences from seqs[first]; the milliseconds. */
static int decode_steps(decode_bench *d, int first, int n, int n_decode, double *ms, char *err, size_t errlen) {
    dg_qwen2_batch_seq batch[MAX_N];
    double t0 = bench_now_ms();
    for (int step = 0; step < n_decode; step++) {
        for (int i = 0; i < n; i++)
            batch[i] = (dg_qwen2_batch_seq){.seq = &d->seqs[first + i],
                                            .in = {.ids = &d->ids[first + i][(d->seqs[first + i].n_tokens) % 64],
                                                   .n = 1, .n_logits = 1, .logits_on_device = 1}};
        if (dg_qwen2_forward_batch(d->m, d->s, d->kv, batch, n, err, errlen) < 0) return -1;
    }
    *ms = bench_now_ms() - t0;
    return 0;
}

static int decode_curve(bench_ctx *ctx, json_t *out, const char *pkg, int threads) {
    char dir[1100], err[512] = "", name[64];
    dg_qwen2vl_config cfg;
    dg_backend *be = NULL;
    dg_st *st = NULL;
    decode_bench d = {0};
    dg_qwen2 m = {0};
    const int n_prompt = ctx->quick ? 16 : 64, n_decode = ctx->quick ? 4 : 16, n_seqs = 2 * MAX_N - 1;
    const int per_seq = (n_prompt + ROUNDS * n_decode) / 16 + 2;
    double best[N_SIZES];
    int rc = -1;
    snprintf(dir, sizeof dir, "%s/mllm", pkg);
    if (dg_config_load(dir, &cfg, err, sizeof err) < 0 || bench_cpu_backend(ctx, threads, &be, err, sizeof err) < 0 ||
        dg_st_open_flags(dir, be->weights_hugepages ? DG_ST_HUGEPAGES : 0, NULL, NULL, &st, err, sizeof err) < 0 || dg_qwen2_load(&m, &cfg.text, st, be, err, sizeof err) < 0 ||
        dg_qwen2_state_new(&m, be, n_prompt > MAX_N ? n_prompt : MAX_N, MAX_N, &d.s, err, sizeof err) < 0 ||
        dg_kv_cache_new(be, cfg.text.n_layers, cfg.text.n_kv_heads * cfg.text.head_dim, 16, n_seqs * per_seq,
                        DG_DTYPE_F32, &d.kv, err, sizeof err) < 0)
        goto out;
    d.m = &m;
    uint64_t x = 1;
    for (int i = 0; i < n_seqs; i++) {
        if (dg_kv_seq_init(&d.seqs[i], n_prompt + ROUNDS * n_decode, 16) < 0) goto out;
        for (int j = 0; j < 64; j++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            d.ids[i][j] = (int32_t)((x >> 33) % 151643u % (uint64_t)cfg.text.vocab_size);
        }
        dg_qwen2_input in = {.ids = d.ids[i], .n = n_prompt, .n_logits = 1, .logits_on_device = 1};
        if (dg_qwen2_forward(&m, d.s, d.kv, &d.seqs[i], &in, NULL, err, sizeof err) < 0) goto out;
    }
    for (int r = 0; r < ROUNDS; r++)
        for (int k = 0; k < N_SIZES; k++) {
            double ms;
            if (decode_steps(&d, (1 << k) - 1, 1 << k, n_decode, &ms, err, sizeof err) < 0) goto out;
            if (r == 0 || ms < best[k]) best[k] = ms;
        }
    for (int k = 0; k < N_SIZES; k++) {
        const double tok_s = (double)(1 << k) * n_decode / (best[k] / 1e3), one = n_decode / (best[0] / 1e3);
        snprintf(name, sizeof name, "decode_tok_s_n%d", 1 << k);
        bench_record(out, name, tok_s, "tok/s");
        snprintf(name, sizeof name, "decode_speedup_n%d", 1 << k);
        bench_record(out, name, tok_s / one, "x");
    }
    rc = 0;
out:
    if (rc < 0) fprintf(stderr, "bench_batch: %s\n", err);
    for (int i = 0; i < n_seqs; i++) {
        if (d.kv) dg_kv_seq_release(d.kv, &d.seqs[i]);
        dg_kv_seq_free(&d.seqs[i]);
    }
    dg_kv_cache_free(d.kv);
    if (m.be) dg_qwen2_state_free(&m, d.s);
    dg_qwen2_unload(&m);
    dg_st_close(st);
    dg_backend_free(be);
    return rc;
}

/* ---- whole jobs through the scheduler ------------------------------------------------------ */

/* N jobs on a scheduler of N slots; bov: <BOV>'s id (-1: the package has none). out NULL:
 * the warm-up, one job of its own text, nothing recorded. */
static int jobs_run(bench_ctx *ctx, json_t *out, dg_model *model, int n, int32_t bov) {
    static const char *topics[MAX_N] = {"rice", "noodles", "bread", "soup", "fish", "salad", "eggs", "beans",
                                        "pasta", "curry", "pie", "tofu", "stew", "cake", "tea", "corn"};
    char err[512], text[MAX_N][160], name[64];
    dg_sched *s = NULL;
    bench_obs obs[MAX_N];
    dg_part parts[MAX_N];
    dg_message msgs[MAX_N];
    dg_logit_bias bias = {bov, 100.0f};
    int side = ctx->quick ? 32 : 64;
    if (dg_sched_new(model, &(dg_sched_opts){.max_inflight = n}, &s, err, sizeof err) < 0) {
        fprintf(stderr, "bench_batch: %s\n", err);
        return -1;
    }
    double t0 = bench_now_ms();
    for (int i = 0; i < n; i++) {
        snprintf(text[i], sizeof text[i], "%s %d. Draw a plate of %s from above, on a white plate with a fork, "
                 "and then say how long it takes to cook.", out ? "Job" : "Warm-up", i, topics[i]);
        parts[i] = (dg_part){.kind = DG_PART_TEXT, .text = text[i], .text_len = strlen(text[i])};
        msgs[i] = (dg_message){DG_ROLE_USER, &parts[i], 1};
        dg_request r = {.id = "bench", .messages = &msgs[i], .n_messages = 1, .seed = (uint64_t)i + 1,
                        .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = ctx->quick ? 8 : 24,
                                 .logit_bias = &bias, .n_logit_bias = bov >= 0},
                        .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                                  .width = side, .height = side, .steps = ctx->quick ? 2 : 4, .max_images = 1}};
        dg_sink sink = bench_obs_sink(&obs[i]);
        uint64_t seq;
        if (dg_sched_submit(s, &r, &sink, &seq, err, sizeof err) < 0) goto fail;
    }
    while (dg_sched_active(s) > 0)
        if (dg_sched_step(s, err, sizeof err) < 0) goto fail;
    double wall = bench_now_ms() - t0, prefill = 0, decode = 0, draw = 0, tokens = 0, images = 0;
    for (int i = 0; i < n; i++) {
        if (obs[i].failed) {
            snprintf(err, sizeof err, "job %d: %s", i, obs[i].message);
            goto fail;
        }
        prefill += obs[i].t.prefill_ms + obs[i].t.vision_ms;
        decode += obs[i].t.decode_ms;
        draw += obs[i].t.diffusion_ms + obs[i].t.vae_ms;
        tokens += (double)obs[i].usage.generated_tokens;
        images += (double)obs[i].usage.images;
    }
    if (!out) {
        dg_sched_free(s);
        return 0;
    }
    snprintf(name, sizeof name, "tokens_n%d", n);
    bench_record(out, name, tokens, "tokens written");
    snprintf(name, sizeof name, "images_n%d", n);
    bench_record(out, name, images, bov >= 0 ? "images drawn" : "images drawn (the package has no <BOV>)");
    snprintf(name, sizeof name, "jobs_per_hour_n%d", n);
    bench_record(out, name, n / (wall / 3.6e6), "jobs/h");
    snprintf(name, sizeof name, "prefill_ms_n%d", n);
    bench_record(out, name, prefill, "ms (prefill and vision)");
    snprintf(name, sizeof name, "decode_ms_n%d", n);
    bench_record(out, name, decode, "ms");
    snprintf(name, sizeof name, "draw_ms_n%d", n);
    bench_record(out, name, draw, "ms");
    dg_sched_free(s);
    return 0;
fail:
    fprintf(stderr, "bench_batch: %s\n", err);
    dg_sched_free(s);
    return -1;
}

static int bench_batch_decode(bench_ctx *ctx, json_t *out) {
    char pkg[1024];
    int threads = ctx->threads > 0 ? ctx->threads : 2;
    if (bench_small_package(ctx, pkg, sizeof pkg) < 0) return -1;
    printf("  model %s, %d threads\n", pkg, threads);
    bench_record_compute(ctx, out);
    return decode_curve(ctx, out, pkg, threads);
}

static int bench_batch_jobs(bench_ctx *ctx, json_t *out) {
    char pkg[1024], err[512];
    int threads = ctx->threads > 0 ? ctx->threads : 2, max_n = ctx->quick ? 8 : MAX_N;
    if (bench_small_package(ctx, pkg, sizeof pkg) < 0) return -1;
    printf("  model %s, %d threads\n", pkg, threads);
    bench_record_compute(ctx, out);
    dg_model *model = NULL;
    if (dg_model_open(pkg,
                      &(dg_model_opts){.threads = threads, .cpu_bf16_compute = ctx->bf16_compute,
                                       .cpu_mapped_weights = ctx->mapped_weights},
                      &model, err, sizeof err) < 0) {
        fprintf(stderr, "bench_batch: %s\n", err);
        return -1;
    }
    int32_t bov = model->bov_id;
    int rc = jobs_run(ctx, NULL, model, 1, bov);   /* the warm-up */
    for (int n = 1; n <= max_n && rc == 0; n *= 2) rc = jobs_run(ctx, out, model, n, bov);
    dg_model_close(model);
    return rc;
}

DG_BENCH(batch_decode, "continuous batching, small preset: aggregate decode tok/s against concurrent sequences",
         bench_batch_decode)
DG_BENCH(batch_jobs, "continuous batching, small preset: jobs/hour and the prefill/decode/draw split against "
         "concurrent jobs", bench_batch_jobs)
