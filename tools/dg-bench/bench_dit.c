/* bench_dit — image generation on the CPU backend, small preset: one DiT step (one network
 * evaluation) at 256x256 and 512x512 pixels (32x32 and 64x64 latents) with 0, 1 and 3
 * condition frames of the target's size and a 512-row context, and VAE encode and decode of
 * one image at the same sizes. Times in ms, the best of `reps` runs after a warm-up.
 *
 * The model is --model DIR or build/models/small; its dit/, vae/ and connector are written
 * by build/mkmodel --preset small --seed 1 when missing. --quick: 256x256 only, 0 and 1
 * condition frames. When build/bench/diffusers_dit.json exists
 * (tools/reference/bench_diffusers.py, same keys, same machine and threads), the ratios
 * ours / diffusers are printed too (below 1: faster than diffusers); with --bf16-compute,
 * against diffusers_dit_bf16.json (--dtype bf16: the DiT in bf16; the VAE, whose weights
 * are fp32, has no bf16 figures). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "bench.h"
#include "draw/dit.h"
#include "draw/flow.h"
#include "draw/vae.h"

#define N_CTX 512
/* The diffusers baseline of the same compute: fp32 (weights widened) against our fp32
 * compute, bf16 against our bf16 compute (tools/reference/bench_diffusers.py --dtype). */
static void ratio(const bench_ctx *ctx, json_t *out, const char *key, double ours) {
    bench_ratio(out, ctx->bf16_compute ? "build/bench/diffusers_dit_bf16.json" : "build/bench/diffusers_dit.json", key,
                "diffusers", ours);
}

static int bench_dit_steps(bench_ctx *ctx, json_t *out, const char *pkg, int threads, int reps) {
    static const int sides[2] = {256, 512}, conds[3] = {0, 1, 3};
    const int n_sides = ctx->quick ? 1 : 2, n_conds = ctx->quick ? 2 : 3;
    dg_backend *be = NULL;
    dg_dit dit = {0};
    dg_dit_state *s = NULL;
    float *lat = NULL, *ctxv = NULL, *vel = NULL;
    char err[512], dir[1100], name[96];
    int rc = -1;
    snprintf(dir, sizeof dir, "%s/dit", pkg);
    const int max_lat = sides[n_sides - 1] / 8, max_frames = 1 + conds[n_conds - 1];
    const int max_tok = max_frames * (max_lat / 2) * (max_lat / 2);
    if (bench_cpu_backend(ctx, threads, &be, err, sizeof err) < 0 || dg_dit_load(&dit, dir, be, err, sizeof err) < 0 ||
        dg_dit_state_new(&dit, dit.be, max_tok, N_CTX, &s, err, sizeof err) < 0)
        goto fail;
    const int64_t frame = 16LL * max_lat * max_lat;
    lat = malloc(sizeof(float) * (size_t)(frame * max_frames));
    vel = malloc(sizeof(float) * (size_t)(frame * max_frames));
    ctxv = malloc(sizeof(float) * (size_t)N_CTX * dit.cfg.text_dim);
    if (!lat || !vel || !ctxv) goto fail;
    dg_flow_noise(lat, frame * max_frames, 1, 0);
    dg_flow_noise(ctxv, (int64_t)N_CTX * dit.cfg.text_dim, 2, 0);
    for (int si = 0; si < n_sides; si++)
        for (int ci = 0; ci < n_conds; ci++) {
            const int n = 1 + conds[ci], hl = sides[si] / 8;
            int h[8], w[8], cond[8];
            const float *frames[8];
            float t[8];
            dg_dit_layout L;
            for (int f = 0; f < n; f++) {
                h[f] = w[f] = hl;
                cond[f] = f < n - 1;
                t[f] = f < n - 1 ? 1e-4f : 0.9f;
                frames[f] = lat + f * 16LL * hl * hl;
            }
            if (dg_dit_layout_build(&L, h, w, cond, n, 16, 2, 2, err, sizeof err) < 0 ||
                dg_dit_set_layout(&dit, s, &L, err, sizeof err) < 0)
                goto fail;
            double best = 1e30;
            for (int r = 0; r <= reps; r++) {   /* r = 0: warm-up (pages the weights in) */
                double t0 = bench_now_ms();
                if (dg_dit_forward(&dit, s, &(dg_dit_input){frames, t, ctxv, N_CTX}, vel, err, sizeof err) < 0)
                    goto fail;
                double dt = bench_now_ms() - t0;
                if (r > 0 && dt < best) best = dt;
            }
            snprintf(name, sizeof name, "dit_step_ms_%d_c%d_t%d", sides[si], conds[ci], threads);
            bench_record(out, name, best, "ms");
            ratio(ctx, out, name, best);
        }
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "bench_dit: %s\n", err);
out:
    free(lat);
    free(vel);
    free(ctxv);
    if (dit.be) dg_dit_state_free(&dit, s);
    dg_dit_unload(&dit);
    dg_backend_free(be);
    return rc;
}

static int bench_vae(bench_ctx *ctx, json_t *out, const char *pkg, int threads, int reps) {
    static const int sides[2] = {256, 512};
    const int n_sides = ctx->quick ? 1 : 2, max_side = sides[n_sides - 1];
    dg_backend *be = NULL;
    dg_vae vae = {0};
    dg_vae_state *s = NULL;
    float *px = NULL, *lat = NULL;
    char err[512], dir[1100], name[96];
    int rc = -1;
    snprintf(dir, sizeof dir, "%s/vae", pkg);
    if (bench_cpu_backend(ctx, threads, &be, err, sizeof err) < 0 || dg_vae_load(&vae, dir, be, err, sizeof err) < 0 ||
        dg_vae_state_new(&vae, vae.be, 1, max_side, max_side, &s, err, sizeof err) < 0)
        goto fail;
    px = malloc(sizeof(float) * 3 * (size_t)max_side * max_side);
    lat = malloc(sizeof(float) * 16 * (size_t)(max_side / 8) * (max_side / 8));
    if (!px || !lat) goto fail;
    for (int si = 0; si < n_sides; si++) {
        const int S = sides[si];
        double enc = 1e30, dec = 1e30;
        for (int i = 0; i < 3 * S * S; i++) px[i] = (float)((i * 7919 % 2001) / 1000.0 - 1.0);
        for (int r = 0; r <= reps; r++) {
            double t0 = bench_now_ms();
            if (dg_vae_encode(&vae, s, px, 1, S, S, lat, err, sizeof err) < 0) goto fail;
            double t1 = bench_now_ms();
            if (dg_vae_decode(&vae, s, lat, 1, S / 8, S / 8, px, err, sizeof err) < 0) goto fail;
            double t2 = bench_now_ms();
            if (r > 0 && t1 - t0 < enc) enc = t1 - t0;
            if (r > 0 && t2 - t1 < dec) dec = t2 - t1;
        }
        snprintf(name, sizeof name, "vae_encode_ms_%d_t%d", S, threads);
        bench_record(out, name, enc, "ms");
        ratio(ctx, out, name, enc);
        snprintf(name, sizeof name, "vae_decode_ms_%d_t%d", S, threads);
        bench_record(out, name, dec, "ms");
        ratio(ctx, out, name, dec);
    }
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "bench_vae: %s\n", err);
out:
    free(px);
    free(lat);
    if (vae.be) dg_vae_state_free(&vae, s);
    dg_vae_unload(&vae);
    dg_backend_free(be);
    return rc;
}

static int bench_image(bench_ctx *ctx, json_t *out) {
    char pkg[1024];
    const char *coretype = getenv("OPENBLAS_CORETYPE");
    const int threads = ctx->threads > 0 ? ctx->threads : 2, reps = ctx->quick ? 1 : 2;
    if (bench_small_package(ctx, pkg, sizeof pkg) < 0) return -1;
    printf("  model %s, %d threads, OPENBLAS_CORETYPE=%s\n", pkg, threads, coretype ? coretype : "(unset)");
    json_object_set_new(out, "openblas_coretype", json_string(coretype ? coretype : ""));
    bench_record_compute(ctx, out);
    if (bench_vae(ctx, out, pkg, threads, reps) < 0) return -1;
    return bench_dit_steps(ctx, out, pkg, threads, reps);
}

DG_BENCH(image, "DiT step (0/1/3 condition frames) and VAE encode/decode at 256 and 512 px, small preset", bench_image)
