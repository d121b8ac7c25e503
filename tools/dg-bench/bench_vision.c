/* bench_vision — the Qwen2.5-VL vision tower on the CPU backend, small preset (real widths:
 * 1280 wide, 16 heads, MLP 3420, 4 blocks of which block 3 is full attention; merger to
 * 896): images/s of the tower (pixel_values to merged embeddings) for a 448x448 image (32x32
 * patches, 256 tokens) and a 1024x1024 one (smart_resize to 1036x1036: 74x74 patches, 1369
 * tokens), with 1 and 2 threads (or --threads N); preprocessing (resize, normalise,
 * patchify) is timed apart. The images are drawn here (content does not change the work).
 *
 * The model is --model DIR (a package: DIR/mllm) or build/models/small, written by
 * build/mkmodel --preset small --seed 1 when missing. --quick: the 448 image only, once.
 *
 * The baseline is transformers of the same compute (float32 against our fp32 compute, bf16
 * against --bf16-compute). With --transformers CMD (tools/reference/
 * bench_transformers_vision.py --serve [--dtype bf16], which `make bench-vision` passes when
 * the reference venv is there) it runs as a co-process turn about with ours: 3 rounds at
 * each size and thread count, each round our timed runs and then the same number of its
 * (the order alternating), a ratio the median of the rounds' ratios with their range beside
 * it (bench.h bench_peer says why). Without a live co-process there are no transformers
 * figures ("transformers_baseline_missing" says why), never an earlier run's file.
 *
 * The tower is bound by arithmetic, so each rate is also printed as GFLOP/s (tower_flop: the
 * matmuls and the attention's products) and as a fraction of the instruction's rate at that
 * thread count, measured in the same run (bench_peak_gflops: VDPBF16PS with --bf16-compute,
 * else FMA), for ours and for the baseline: the vision tower's counterpart of the decoder's
 * fraction of the read bandwidth. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "bench.h"
#include "mllm/qwen2vl_config.h"
#include "io/image.h"
#include "io/image_preprocess.h"
#include "io/safetensors.h"
#include "mllm/vision.h"

/* The small package's MLLM folder. */
static int ensure_model(bench_ctx *ctx, char *dir, size_t len) {
    char pkg[900];
    if (bench_small_package(ctx, pkg, sizeof pkg) < 0) return -1;
    snprintf(dir, len, "%s/mllm", pkg);
    return 0;
}

/* Colour ramps and a checker: an ordinary photo-sized workload. */
static dg_image *draw(int side) {
    dg_image *img;
    if (dg_image_new(side, side, &img) < 0) return NULL;
    for (int y = 0; y < side; y++)
        for (int x = 0; x < side; x++) {
            uint8_t *p = img->rgb + ((size_t)y * side + x) * 3;
            p[0] = (uint8_t)(x * 255 / side);
            p[1] = (uint8_t)(y * 255 / side);
            p[2] = ((x / 37 + y / 29) & 1) ? 200 : 40;
        }
    return img;
}

#define ROUNDS 3

/* The tower's arithmetic for one image of p's grid, flop: the matmuls (the patch
 * embedding; each block's qkv, proj and gated MLP; the merger's two) and the attention's
 * two products (over the whole image in the full-attention blocks, within each window of
 * window_size pixels in the others). Norms, RoPE, softmax and activations are not counted:
 * the work both sides must do at the instruction's rate. */
static double tower_flop(const dg_vision_config *v, const dg_image_patches *p) {
    const double n = (double)p->grid_t * p->grid_h * p->grid_w, d = v->hidden_size, f = v->intermediate_size;
    const int ms = v->spatial_merge_size, side = v->window_size / v->patch_size / ms;   /* merged units */
    const int lh = p->grid_h / ms, lw = p->grid_w / ms;
    double windows = 0;   /* the sum of the windows' tokens squared */
    for (int i = 0; i < lh; i += side)
        for (int j = 0; j < lw; j += side) {
            const double t = (double)(lh - i < side ? lh - i : side) * (lw - j < side ? lw - j : side) * ms * ms;
            windows += p->grid_t * t * t;
        }
    double flop = 2 * n * d * p->patch_dim;
    for (int b = 0; b < v->depth; b++) {
        int full = 0;
        for (int i = 0; i < v->n_fullatt; i++) full |= v->fullatt_block_indexes[i] == b;
        flop += 2 * n * d * (4 * d + 3 * f) + 4 * d * (full ? n * n : windows);
    }
    const double merged = n / (ms * ms), dm = d * ms * ms;
    return flop + 2 * merged * dm * (dm + v->out_hidden_size);
}

/* The figures of one size: ours (and the peer's, turn about) over `rounds` rounds of `reps`
 * runs, images/s and the arithmetic rate of `flop` an image against `peak` GFLOP/s. */
static void record(bench_ctx *ctx, json_t *out, bench_peer *peer, const char *key, int reps, int rounds,
                   const double *ours_s, const double *theirs_s, double flop, double peak) {
    double sum = 0, sum_t = 0, r[ROUNDS];
    for (int i = 0; i < rounds; i++) sum += ours_s[i], sum_t += theirs_s[i];
    bench_record(out, key, rounds * reps / sum, "img/s");
    bench_record_rate(out, key, rounds * reps / sum * flop / 1e9, peak);
    if (!bench_peer_live(peer)) return;   /* bench_peer_outcome says why */
    char k2[128];
    for (int i = 0; i < rounds; i++) r[i] = theirs_s[i] / ours_s[i];
    snprintf(k2, sizeof k2, "transformers_%s", key);
    bench_record(out, k2, rounds * reps / sum_t, "img/s");
    bench_record_rate(out, k2, rounds * reps / sum_t * flop / 1e9, peak);
    snprintf(k2, sizeof k2, "%s_vs_transformers", key);
    bench_record_rounds(out, k2, r, rounds, "x");
}

static int run(bench_ctx *ctx, json_t *out, const char *dir, int threads, bench_peer *peer) {
    static const int sides[2] = {448, 1024};
    const int n_sides = ctx->quick ? 1 : 2;
    dg_qwen2vl_config cfg;
    dg_image_preprocess_config pp;
    dg_backend *be = NULL;
    dg_st *st = NULL;
    dg_vision m = {0};
    dg_vision_state *s = NULL;
    float *emb = NULL;
    char err[512], name[96];
    int rc = -1;
    dg_image_preprocess_config_default(&pp);
    if (dg_config_load(dir, &cfg, err, sizeof err) < 0 ||
        bench_cpu_backend(ctx, threads, &be, err, sizeof err) < 0 ||
        dg_st_open_flags(dir, be->weights_hugepages ? DG_ST_HUGEPAGES : 0, NULL, NULL, &st, err, sizeof err) < 0 ||
        dg_vision_load(&m, &cfg.vision, st, be, err, sizeof err) < 0 ||
        dg_vision_state_new(&m, m.be, 74 * 74, &s, err, sizeof err) < 0) {
        fprintf(stderr, "bench_vision: %s\n", err);
        goto out;
    }
    emb = be->alloc(be, sizeof(float) * 74 * 74 / 4 * (size_t)cfg.vision.out_hidden_size);
    /* the instruction's limit at this thread count, in this run (the host's rate moves) */
    const double peak = bench_record_peak(out, threads, ctx->bf16_compute);
    for (int k = 0; k < n_sides; k++) {
        dg_image *img = draw(sides[k]);
        dg_image_patches *p = NULL;
        if (!img) goto out;
        double t0 = bench_now_ms();
        if (dg_image_patches_new(img, &pp, &p, err, sizeof err) < 0) {
            dg_image_free(img);
            fprintf(stderr, "bench_vision: %s\n", err);
            goto out;
        }
        double t1 = bench_now_ms();
        const dg_image_patches *list[1] = {p};
        /* one run pages the weights in and warms the caches; then timed rounds */
        const int reps = ctx->quick ? 1 : sides[k] <= 448 ? 4 : 2, rounds = ctx->quick ? 1 : ROUNDS;
        double ours_s[ROUNDS], theirs_s[ROUNDS] = {0};
        char cmd[64];
        snprintf(cmd, sizeof cmd, "tower %d %d %d", sides[k], threads, reps);
        rc = dg_vision_forward(&m, s, list, 1, emb, err, sizeof err);
        for (int r = 0; rc == 0 && r < rounds; r++) {
            if (r % 2) theirs_s[r] = bench_peer_turn(peer, "transformers", cmd, NULL);
            double t2 = bench_now_ms();
            for (int i = 0; rc == 0 && i < reps; i++) rc = dg_vision_forward(&m, s, list, 1, emb, err, sizeof err);
            ours_s[r] = (bench_now_ms() - t2) / 1e3;
            if (!(r % 2)) theirs_s[r] = bench_peer_turn(peer, "transformers", cmd, NULL);
        }
        if (rc == 0) {
            snprintf(name, sizeof name, "preprocess_ms_%d", sides[k]);
            bench_record(out, name, t1 - t0, "ms");
            const double flop = tower_flop(&cfg.vision, p);
            snprintf(name, sizeof name, "gflop_%d", sides[k]);
            bench_record(out, name, flop / 1e9, "GFLOP an image");
            snprintf(name, sizeof name, "images_s_%d_t%d", sides[k], threads);
            record(ctx, out, peer, name, reps, rounds, ours_s, theirs_s, flop, peak);
        } else {
            fprintf(stderr, "bench_vision: %s\n", err);
        }
        dg_image_patches_free(p);
        dg_image_free(img);
        if (rc < 0) goto out;
    }
    rc = 0;
out:
    if (be) be->release(be, emb);
    if (m.be) dg_vision_state_free(&m, s);
    dg_vision_unload(&m);
    dg_st_close(st);
    dg_backend_free(be);
    return rc;
}

static int bench_vision(bench_ctx *ctx, json_t *out) {
    char dir[1024];
    const char *coretype = getenv("OPENBLAS_CORETYPE");
    if (ensure_model(ctx, dir, sizeof dir) < 0) return -1;
    printf("  model %s, OPENBLAS_CORETYPE=%s\n", dir, coretype ? coretype : "(unset)");
    json_object_set_new(out, "openblas_coretype", json_string(coretype ? coretype : ""));
    bench_record_compute(ctx, out);
    bench_peer peer = {.pid = -1, .from = -1};
    char err[512];
    int rc = 0;
    if (ctx->transformers) {
        char cmd[2200];
        bench_peer_command(ctx, ctx->transformers, 0, 0, cmd, sizeof cmd);
        if (bench_peer_start(&peer, cmd, err, sizeof err) < 0)
            fprintf(stderr, "bench_vision: no transformers baseline: %s\n", err);
        bench_peer_announce(&peer, out, "transformers", "transformers");
    }
    if (ctx->threads > 0) rc = run(ctx, out, dir, ctx->threads, &peer);
    for (int t = 1; ctx->threads <= 0 && t <= 2 && rc == 0; t++) rc = run(ctx, out, dir, t, &peer);
    bench_peer_outcome(&peer, out, "transformers", "transformers", "--transformers", "");
    bench_peer_stop(&peer);
    return rc < 0 ? -1 : 0;
}

DG_BENCH(vision, "Qwen2.5-VL vision tower, small preset: images/s at 448x448 and 1024x1024", bench_vision)
