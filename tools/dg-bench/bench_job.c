/* bench_job — whole interleaved jobs through the public engine API (dg_model_open, dg_sched)
 * on DG_BENCH_DEVICE (default "cuda:0"; "cpu" works for a smoke run), on the package given
 * by --model DIR. The model of issue 9's figures is the full preset with seeded weights:
 *
 *     build/mkmodel --preset full --seed 1 --out /tmp/full --seeded
 *     build/dg-bench --model /tmp/full job
 *
 * (dg-bench sets DG_SEEDED_WEIGHTS=1 itself when the environment does not say otherwise.)
 * Three jobs, each one image prompt with a logit bias that makes <BOV> certain (random
 * weights never choose it on their own), sampling at temperature 1 with a fixed seed:
 *   warm-up   max_images 1 at the measured side, 2 steps: every kernel and cuBLAS shape once;
 *   image     max_images 1, `steps` steps with classifier-free guidance: the DiT's seconds
 *             per image (the sum of the denoising steps, two network evaluations each), the
 *             VAE decode, and the DiT's model TFLOP/s (formula below);
 *   job       max_images `images`: the whole interleaved job end to end (each image drawn
 *             with all earlier ones as condition frames, goes through the vision tower back
 *             into the context; then text to max_new_tokens).
 * Sizes: DG_BENCH_SIDE (default 1024), DG_BENCH_STEPS (35), DG_BENCH_IMAGES (4),
 * DG_BENCH_GUIDANCE (7); --quick: 512, 8 steps, 2 images. Without the device, or without
 * --model, it prints "skipped" and records nothing.
 *
 * DiT flops per network evaluation, counted from dit/config.json (D = heads·head_dim,
 * F = mlp_ratio·D, L blocks, N = (side/16)² tokens of the target frame, C context rows):
 * linear layers 2·N·L·(4D² self-attention + 2D² cross-attention q, out + 2·D·F MLP),
 * attention 4·N²·D·L (scores and values) + 4·N·C·D·L (cross). The patch embedding, adaLN
 * and the final layer are left out (<1%). "of peak" divides by the dense bf16 tensor-core
 * peak of an H100/H200 SXM, 989.4 TFLOP/s (NVIDIA's datasheet figure without sparsity). */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "duogen.h"

#define PEAK_BF16_TFLOPS 989.4

/* <BOV>'s id: duogen.json's bov_id (an import's, where the tokenizer has no such token),
 * else the package's tokenizer_config.json's added token (mkmodel adds it after the last
 * added token); -1 when absent. */
static int32_t bov_id(const char *pkg) {
    char path[4200];
    snprintf(path, sizeof path, "%s/duogen.json", pkg);
    json_t *man = json_load_file(path, 0, NULL), *tc = NULL, *v;
    const char *mllm = json_string_value(json_object_get(json_object_get(man, "components"), "mllm")), *key;
    int32_t id = -1;
    if (json_is_integer(json_object_get(man, "bov_id"))) {
        id = (int32_t)json_integer_value(json_object_get(man, "bov_id"));
        mllm = NULL;
    }
    if (mllm) {
        snprintf(path, sizeof path, "%s/%s/tokenizer_config.json", pkg, mllm);
        tc = json_load_file(path, 0, NULL);
    }
    json_object_foreach(json_object_get(tc, "added_tokens_decoder"), key, v) {
        const char *content = json_string_value(json_object_get(v, "content"));
        if (content && !strcmp(content, "<BOV>")) id = (int32_t)atol(key);
    }
    json_decref(tc);
    json_decref(man);
    return id;
}

static int env_int(const char *name, int dflt) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}

/* One job to its end; 0, or -1 after printing why. */
static int run_job(dg_sched *s, int32_t bov, const char *id, uint64_t seed, int side, int steps, float guidance, int images,
                   int tokens, bench_obs *o) {
    /* the id first and a seed per job: no job's prompt, images or their vision-tower
     * output come from the caches the previous job filled */
    char prompt[256];
    const int len = snprintf(prompt, sizeof prompt, "%s: show me, step by step with a picture for each step, "
                             "how to make a bowl of tomato soup.", id);
    dg_part part = {.kind = DG_PART_TEXT, .text = prompt, .text_len = (size_t)len};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_logit_bias bias = {bov, 100.0f};
    dg_request r = {.id = id, .messages = &msg, .n_messages = 1, .seed = seed,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = tokens,
                             .temperature = 1.0f, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_GUIDANCE_SCALE |
                                     DG_IMAGE_MAX_IMAGES,
                              .width = side, .height = side, .steps = steps, .guidance_scale = guidance,
                              .max_images = images}};
    dg_sink sink = bench_obs_sink(o);
    char err[512];
    uint64_t seq;
    if (dg_sched_submit(s, &r, &sink, &seq, err, sizeof err) < 0) {
        fprintf(stderr, "bench_job: %s: %s\n", id, err);
        return -1;
    }
    while (dg_sched_active(s) > 0)
        if (dg_sched_step(s, err, sizeof err) < 0) {
            fprintf(stderr, "bench_job: %s: %s\n", id, err);
            return -1;
        }
    if (o->failed) {
        fprintf(stderr, "bench_job: %s failed (%s): %s\n", id, dg_error_name(o->code), o->message);
        return -1;
    }
    if (o->images != images)
        fprintf(stderr, "bench_job: %s drew %d images, not %d\n", id, o->images, images);
    return 0;
}

/* The flops of one DiT evaluation at n tokens with c context rows (see the top). */
static double dit_flops(const char *pkg, double n, double c) {
    char path[4200];
    snprintf(path, sizeof path, "%s/dit/config.json", pkg);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) return 0;
    const double heads = (double)json_integer_value(json_object_get(j, "num_attention_heads"));
    const double hd = (double)json_integer_value(json_object_get(j, "attention_head_dim"));
    const double layers = (double)json_integer_value(json_object_get(j, "num_layers"));
    json_t *mr = json_object_get(j, "mlp_ratio");
    const double ratio = json_is_number(mr) ? json_number_value(mr) : 4.0;
    json_decref(j);
    const double D = heads * hd, F = ratio * D;
    return 2.0 * n * layers * (6.0 * D * D + 2.0 * D * F) + 4.0 * n * n * D * layers + 4.0 * n * c * D * layers;
}

static int bench_job(bench_ctx *ctx, json_t *out) {
    const char *dev = getenv("DG_BENCH_DEVICE") ? getenv("DG_BENCH_DEVICE") : "cuda:0";
    const int side = env_int("DG_BENCH_SIDE", ctx->quick ? 512 : 1024);
    const int steps = env_int("DG_BENCH_STEPS", ctx->quick ? 8 : 35);
    const int images = env_int("DG_BENCH_IMAGES", ctx->quick ? 2 : 4);
    const float guidance = getenv("DG_BENCH_GUIDANCE") ? (float)atof(getenv("DG_BENCH_GUIDANCE")) : 7.0f;
    const int tokens = images + 48;   /* the images first (the bias), then 48 tokens of text */
    if (!ctx->model_dir) {
        printf("  skipped: needs --model DIR (build/mkmodel --preset full --seed 1 --seeded --out DIR, "
               "then DG_SEEDED_WEIGHTS=1)\n");
        return 0;
    }
    if (images < 1 || images > 8 || side < 16 || steps < 1) {
        fprintf(stderr, "bench_job: DG_BENCH_IMAGES 1..8, DG_BENCH_SIDE >= 16, DG_BENCH_STEPS >= 1\n");
        return -1;
    }
    dg_model *m = NULL;
    dg_sched *s = NULL;
    char err[512];
    setenv("DG_SEEDED_WEIGHTS", "1", 0);   /* a benchmark: a seeded package is what it expects */
    double t0 = bench_now_ms();
    char manifest[4200];
    snprintf(manifest, sizeof manifest, "%s/duogen.json", ctx->model_dir);
    if (access(manifest, R_OK)) {   /* no package there: the user's to mend, not a device this machine lacks */
        fprintf(stderr, "bench_job: --model %s: no model package there (%s: %s)\n", ctx->model_dir, manifest,
                strerror(errno));
        return -1;
    }
    if (dg_model_open(ctx->model_dir,
                      &(dg_model_opts){.device = dev, .threads = ctx->threads, .cpu_bf16_compute = ctx->bf16_compute},
                      &m, err, sizeof err) < 0) {   /* mostly the device (cuda:0 on a CPU machine) */
        printf("  skipped: %s\n", err);
        return 0;
    }
    printf("  %s (open %.1f s); %dx%d, %d steps, guidance %.1f, %d images\n", dg_model_describe(m),
           (bench_now_ms() - t0) / 1e3, side, side, steps, guidance, images);
    bench_record(out, "open_s", (bench_now_ms() - t0) / 1e3, "s");
    int rc = -1;
    const int32_t bov = bov_id(ctx->model_dir);
    if (bov < 0) {
        fprintf(stderr, "bench_job: %s: no <BOV>: neither duogen.json's bov_id nor an added token of its "
                "tokenizer_config.json\n", ctx->model_dir);
        goto out;
    }
    bench_obs o;
    if (dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err) < 0) {
        fprintf(stderr, "bench_job: %s\n", err);
        goto out;
    }
    t0 = bench_now_ms();
    if (run_job(s, bov, "bench-warmup", 1, side, 2, guidance, 1, 2, &o) < 0) goto out;
    printf("  warm-up job: %.1f s\n", (bench_now_ms() - t0) / 1e3);

    char key[96];
    t0 = bench_now_ms();
    if (run_job(s, bov, "bench-image", 2, side, steps, guidance, 1, 1, &o) < 0) goto out;
    const double dit_s = o.t.diffusion_ms / 1e3, n_tok = (double)(side / 16) * (side / 16);
    const double evals = (double)o.usage.dit_forwards;   /* the engine's count: guidance may run one branch */
    /* context rows: the prompt as chat-templated (the conditional branch; the negative one
     * has a single row), a fair stand-in for both */
    const double flops = dit_flops(ctx->model_dir, n_tok, (double)o.usage.prompt_tokens) * evals;
    snprintf(key, sizeof key, "dit_s_per_image_%d_%d%s", side, steps, guidance > 0 ? "_cfg" : "");
    bench_record(out, key, dit_s, "s");
    snprintf(key, sizeof key, "dit_eval_ms_%d", side);   /* one network evaluation, the sampler's share included */
    bench_record(out, key, o.t.diffusion_ms / evals, "ms");
    if (flops > 0) {
        bench_record(out, "dit_tflops", flops / dit_s / 1e12, "TFLOP/s");
        bench_record(out, "dit_fraction_of_bf16_peak", flops / dit_s / 1e12 / PEAK_BF16_TFLOPS, "x");
    }
    snprintf(key, sizeof key, "vae_decode_ms_%d", side);
    bench_record(out, key, o.t.vae_ms, "ms");
    bench_record(out, "image_job_s", (o.done_ms - t0) / 1e3, "s");

    t0 = bench_now_ms();
    if (run_job(s, bov, "bench-job", 3, side, steps, guidance, images, tokens, &o) < 0) goto out;
    snprintf(key, sizeof key, "job_%d_images_s", images);
    bench_record(out, key, (o.done_ms - t0) / 1e3, "s");
    bench_record(out, "job_images_drawn", o.images, "");
    bench_record(out, "job_prefill_ms", o.t.prefill_ms, "ms");
    bench_record(out, "job_decode_ms", o.t.decode_ms, "ms");
    bench_record(out, "job_vision_ms", o.t.vision_ms, "ms");
    bench_record(out, "job_diffusion_ms", o.t.diffusion_ms, "ms");
    bench_record(out, "job_vae_ms", o.t.vae_ms, "ms");
    bench_record(out, "job_generated_tokens", (double)o.usage.generated_tokens, "");
    for (int i = 0; i < o.images && i < 8; i++) {   /* image k has k condition frames */
        snprintf(key, sizeof key, "job_image%d_steps_s", i + 1);   /* condition latents + steps */
        bench_record(out, key, (o.last_step_ms[i] - o.start_ms[i]) / 1e3, "s");
    }
    rc = 0;
out:
    dg_sched_free(s);
    dg_model_close(m);
    return rc;
}

DG_BENCH(job, "whole interleaved jobs on DG_BENCH_DEVICE (--model DIR, e.g. the seeded full package): "
              "DiT s/image, VAE decode ms, a 4-image job end to end", bench_job)
