/* bench_dit — image generation on the CPU backend, small preset: one DiT step (one network
 * evaluation) at 256x256 and 512x512 pixels (32x32 and 64x64 latents) with 0, 1 and 3
 * condition frames of the target's size and a 512-row context, and VAE encode and decode of
 * one image at the same sizes. Times in ms a run: the best round's mean (a round is `reps`
 * runs; one round without a baseline), after a warm-up.
 *
 * The model is --model DIR or build/models/small; its dit/, vae/ and connector are written
 * by build/mkmodel --preset small --seed 1 when missing. --quick: 256x256 only, 0 and 1
 * condition frames.
 *
 * The baseline is diffusers of the same compute (float32 against our fp32 compute; with
 * --bf16-compute the DiT in bfloat16, the VAE, whose weights are fp32, without a bf16
 * figure). With --diffusers CMD (tools/reference/bench_diffusers.py --serve [--dtype bf16],
 * which `make bench-image` passes when the reference venv is there) it runs as a co-process
 * turn about with ours (bench.h bench_peer): 3 rounds of each figure, each round `reps` of
 * our runs and as many of its (the order alternating); the speed-up, its time over ours, is
 * the median of the rounds' with their range ("<key>_speedup_vs_diffusers", above 1: ours
 * faster), its time "diffusers_<key>" (the best round's mean, as ours). Without a live
 * co-process there are no diffusers figures ("diffusers_baseline_missing" says why), never
 * an earlier run's file. A DiT step's time is also printed
 * as GFLOP/s (dit_flop) and as a fraction of the instruction's rate measured in the same run
 * (bench_peak_gflops), for ours and the baseline, as the vision benchmark does. */
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
#define ROUNDS 3
#define ERRLEN 512   /* the err buffers the jobs below write into */

/* The arithmetic of one DiT forward over n tokens in nf frames against n_ctx context rows,
 * flop: every matmul (the weights' shapes: per token, per context row, or per frame for the
 * time embedding and the modulations) and the attention's two products (self-attention
 * over all n tokens, cross-attention to the context). Norms, RoPE, softmax and GELU are not
 * counted: the work both sides must do at the instruction's rate. */
static double dit_flop(const dg_dit *m, double n, double nf, double n_ctx) {
#define W(w) ((double)(w).rows * (double)(w).cols)
    const double d = m->cfg.hidden;
    double flop = 2 * n * (W(m->patch) + W(m->proj_out)) + 2 * nf * (W(m->t1) + W(m->t2) + W(m->out1) + W(m->out2));
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const dg_dit_block *B = &m->blocks[l];
        flop += 2 * n * (W(B->wq) + W(B->wk) + W(B->wv) + W(B->wo) + W(B->cq) + W(B->co) + W(B->ff1) + W(B->ff2)) +
                2 * n_ctx * (W(B->ck) + W(B->cv)) + 4 * n * n * d + 4 * n * n_ctx * d;
        for (int i = 0; i < 3; i++) flop += 2 * nf * (W(B->mod1[i]) + W(B->mod2[i]));
    }
    return flop;
#undef W
}

/* One figure of ours (ms a run, the best round's mean) beside the peer's, turn about: each round
 * `reps` of our runs (run(arg): one, 0 or < 0 when it failed, the message in the job's err)
 * and peer_cmd, the peer's command for as many; rounds alternate who goes first. With flop
 * > 0 (the work of a run), both sides' rates against `peak` too, each from its best round's
 * mean. Returns 0, or -1 when ours failed. */
typedef int (*run_fn)(void *arg);

static int figure(bench_ctx *ctx, json_t *out, bench_peer *peer, const char *key, const char *peer_cmd, int reps,
                  run_fn run, void *arg, double flop, double peak) {
    const int rounds = bench_peer_live(peer) ? ROUNDS : 1;
    double ours[ROUNDS], theirs[ROUNDS] = {0}, speedup[ROUNDS];
    char k2[160];
    for (int r = 0; r < rounds; r++) {
        if (r % 2) theirs[r] = bench_peer_turn(peer, "diffusers", peer_cmd, NULL) * 1e3;
        ours[r] = 0;
        for (int i = 0; i < reps; i++) {
            const double t0 = bench_now_ms();
            if (run(arg) < 0) return -1;
            ours[r] += bench_now_ms() - t0;
        }
        if (!(r % 2)) theirs[r] = bench_peer_turn(peer, "diffusers", peer_cmd, NULL) * 1e3;
    }
    double our_mean = 1e30;   /* each side's figure and rate: its best round's mean */
    for (int r = 0; r < rounds; r++)
        if (ours[r] / reps < our_mean) our_mean = ours[r] / reps;
    bench_record(out, key, our_mean, "ms (the best round's mean)");
    if (flop > 0) bench_record_rate(out, key, flop / our_mean / 1e6, peak);
    if (!bench_peer_live(peer)) return 0;   /* bench_peer_outcome says why */
    double their_best = 1e30;
    for (int r = 0; r < rounds; r++) {
        speedup[r] = theirs[r] / ours[r];
        if (theirs[r] / reps < their_best) their_best = theirs[r] / reps;
    }
    snprintf(k2, sizeof k2, "diffusers_%s", key);
    bench_record(out, k2, their_best, "ms (the best round's mean)");
    if (flop > 0) bench_record_rate(out, k2, flop / their_best / 1e6, peak);
    snprintf(k2, sizeof k2, "%s_speedup_vs_diffusers", key);
    bench_record_rounds(out, k2, speedup, rounds, "x");
    return 0;
}

/* A DiT forward (dit_run's arg). */
typedef struct {
    dg_dit             *dit;
    dg_dit_state       *s;
    const dg_dit_input *in;
    float              *vel;
    char               *err;
} dit_job;

static int dit_run(void *arg) {
    dit_job *j = arg;
    return dg_dit_forward(j->dit, j->s, j->in, j->vel, j->err, ERRLEN);
}

static int bench_dit_steps(bench_ctx *ctx, json_t *out, const char *pkg, int threads, int reps, bench_peer *peer) {
    static const int sides[2] = {256, 512}, conds[3] = {0, 1, 3};
    const int n_sides = ctx->quick ? 1 : 2, n_conds = ctx->quick ? 2 : 3;
    dg_backend *be = NULL;
    dg_dit dit = {0};
    dg_dit_state *s = NULL;
    float *lat = NULL, *ctxv = NULL, *vel = NULL;
    char err[ERRLEN], dir[1100], name[96];
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
    /* the instruction's limit at this thread count, in this run (the host's rate moves) */
    const double peak = bench_record_peak(out, threads, ctx->bf16_compute);
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
            const dg_dit_input in = {frames, t, ctxv, N_CTX};
            /* a warm-up (pages the weights in), then the figure */
            if (dg_dit_forward(&dit, s, &in, vel, err, sizeof err) < 0) goto fail;
            dit_job job = {&dit, s, &in, vel, err};
            char cmd[64];
            snprintf(name, sizeof name, "dit_step_ms_%d_c%d_t%d", sides[si], conds[ci], threads);
            snprintf(cmd, sizeof cmd, "dit %d %d %d", sides[si], conds[ci], reps);
            const double flop = dit_flop(&dit, (double)n * (hl / 2) * (hl / 2), n, N_CTX);
            if (figure(ctx, out, peer, name, cmd, reps, dit_run, &job, flop, peak) < 0) goto fail;
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

/* A VAE encode, or decode, of one image (vae_run's arg). */
typedef struct {
    dg_vae       *vae;
    dg_vae_state *s;
    float        *px, *lat;
    int           side, decode;
    char         *err;
} vae_job;

static int vae_run(void *arg) {
    vae_job *j = arg;
    return j->decode ? dg_vae_decode(j->vae, j->s, j->lat, 1, j->side / 8, j->side / 8, j->px, j->err, ERRLEN)
                     : dg_vae_encode(j->vae, j->s, j->px, 1, j->side, j->side, j->lat, j->err, ERRLEN);
}

static int bench_vae(bench_ctx *ctx, json_t *out, const char *pkg, int threads, int reps, bench_peer *peer) {
    static const int sides[2] = {256, 512};
    const int n_sides = ctx->quick ? 1 : 2, max_side = sides[n_sides - 1];
    dg_backend *be = NULL;
    dg_vae vae = {0};
    dg_vae_state *s = NULL;
    float *px = NULL, *lat = NULL;
    char err[ERRLEN], dir[1100], name[96];
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
        for (int i = 0; i < 3 * S * S; i++) px[i] = (float)((i * 7919 % 2001) / 1000.0 - 1.0);
        /* a warm-up of both (the decode's input is the encode's output), then the figures;
         * the peer has no bf16 VAE */
        if (dg_vae_encode(&vae, s, px, 1, S, S, lat, err, sizeof err) < 0 ||
            dg_vae_decode(&vae, s, lat, 1, S / 8, S / 8, px, err, sizeof err) < 0)
            goto fail;
        bench_peer none = {.pid = -1, .from = -1}, *p = ctx->bf16_compute ? &none : peer;
        for (int d = 0; d < 2; d++) {
            vae_job job = {&vae, s, px, lat, S, d, err};
            char cmd[64];
            snprintf(cmd, sizeof cmd, "vae %d %d %s", S, reps, d ? "decode" : "encode");
            snprintf(name, sizeof name, "vae_%s_ms_%d_t%d", d ? "decode" : "encode", S, threads);
            if (figure(ctx, out, p, name, cmd, reps, vae_run, &job, 0, 0) < 0) goto fail;
        }
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
    bench_peer peer = {.pid = -1, .from = -1};
    char err[512], cmd[2200];
    if (ctx->diffusers) {
        bench_peer_command(ctx, ctx->diffusers, threads, 0, cmd, sizeof cmd);
        if (bench_peer_start(&peer, cmd, err, sizeof err) < 0)
            fprintf(stderr, "bench_image: no diffusers baseline: %s\n", err);
        bench_peer_announce(&peer, out, "diffusers", "diffusers");
    }
    int rc = bench_vae(ctx, out, pkg, threads, reps, &peer);
    if (rc == 0) rc = bench_dit_steps(ctx, out, pkg, threads, reps, &peer);
    bench_peer_outcome(&peer, out, "diffusers", "diffusers", "--diffusers", "");
    bench_peer_stop(&peer);
    return rc;
}

DG_BENCH(image, "DiT step (0/1/3 condition frames) and VAE encode/decode at 256 and 512 px, small preset", bench_image)
