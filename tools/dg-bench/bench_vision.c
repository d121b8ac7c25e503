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
 * When build/bench/transformers_vision.json exists
 * (tools/reference/bench_transformers_vision.py), the ratios to it are printed too; with
 * --bf16-compute, to transformers_vision_bf16.json (its --dtype bf16). */
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

/* The transformers baseline of the same compute: float32 against our fp32 compute, bf16
 * against our bf16 compute (tools/reference/bench_transformers_vision.py --dtype). */
static void ratio(const bench_ctx *ctx, json_t *out, const char *key, double ours) {
    bench_ratio(out, ctx->bf16_compute ? "build/bench/transformers_vision_bf16.json" : "build/bench/transformers_vision.json",
                key, "transformers", ours);
}

static int run(bench_ctx *ctx, json_t *out, const char *dir, int threads) {
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
        /* one run pages the weights in and warms the caches; then timed runs */
        const int reps = ctx->quick ? 1 : sides[k] <= 448 ? 4 : 2;
        rc = dg_vision_forward(&m, s, list, 1, emb, err, sizeof err);
        double t2 = bench_now_ms();
        for (int r = 0; rc == 0 && r < reps; r++) rc = dg_vision_forward(&m, s, list, 1, emb, err, sizeof err);
        double t3 = bench_now_ms();
        if (rc == 0) {
            snprintf(name, sizeof name, "preprocess_ms_%d", sides[k]);
            bench_record(out, name, t1 - t0, "ms");
            snprintf(name, sizeof name, "images_s_%d_t%d", sides[k], threads);
            bench_record(out, name, reps / ((t3 - t2) / 1e3), "img/s");
            ratio(ctx, out, name, reps / ((t3 - t2) / 1e3));
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
    if (ctx->threads > 0) return run(ctx, out, dir, ctx->threads);
    for (int t = 1; t <= 2; t++)
        if (run(ctx, out, dir, t) < 0) return -1;
    return 0;
}

DG_BENCH(vision, "Qwen2.5-VL vision tower, small preset: images/s at 448x448 and 1024x1024", bench_vision)
