/* Fidelity of the Cosmos-Predict2.5 DiT and DuoGen's packing against diffusers.
 *
 * Goldens (tests/golden/dit/dit_*.f32, tools/reference/make_dit_goldens.py) on the tiny
 * package's dit/ (2 heads x 32, 2 blocks, bf16 weights, computed in float32):
 *   video    diffusers CosmosTransformer3DModel.forward on 3 frames of 8x8 latents, the
 *            first two conditions (mask channel 1, timestep 1e-4), the third at σ = 0.7:
 *            our packed path over three equal frames must equal the plain video path;
 *   packed   frames at their own resolutions (conditions 8x12 and 6x8, target 8x8), the
 *            reference assembled from diffusers' own modules (patch_embed, rope with the
 *            frame's temporal index and grid, time_embed, the blocks, norm_out, proj_out),
 *            which the script checks against the video forward for equal frames;
 *   native   the painter's packing of earlier images at their own sizes: conditions 12x8
 *            (larger than the target, another aspect), 4x10 and 10x6, target 6x8, each
 *            frame's spatial RoPE from its own grid, the same reference;
 *   sampling a complete 6-step UniPC run (Karras sigmas) with guidance 7 on the packed
 *            frames, the target starting from dg_flow_noise(seed 7), the negative
 *            context being the positive one less its last text segment (4 rows).
 *
 * Tolerances: one forward |ours - golden| <= 1e-4 + 1e-4·|golden| (outputs up to ~5; fp32
 * on both sides from the same bf16 weights, different summation orders; seen ~1e-6). The
 * sampling run: 1e-3 absolute on a result up to ~6: guidance multiplies the velocity
 * difference by 8 and six steps compound it (seen ~1e-5). A wrong RoPE axis, modulation
 * order, mask channel or gate gives errors of order 0.1..1. */
#include "common/harness.h"
#include "dit_common.h"

#include "backend.h"
#include "draw/dit.h"
#include "duogen.h"
#include "draw/flow.h"

static dg_backend *be;
static dg_dit dit;
static dg_dit_state *st;
static int loaded, loaded_bf16;   /* loaded: 1 yes, -1 failed; loaded_bf16: its backend's bf16 compute */

static void teardown(void) {
    if (loaded > 0) {
        dg_dit_state_free(&dit, st);
        dg_dit_unload(&dit);
        dg_backend_free(be);
    }
    loaded = 0;
}

/* The package on a "cpu" backend, in fp32 compute or (bf16) bf16 compute. */
static int setup_mode(int bf16) {
    char err[512], dir[300];
    if (loaded && loaded_bf16 != bf16) teardown();
    if (loaded) return loaded > 0;
    loaded = -1;
    loaded_bf16 = bf16;
    const char *pkg = dit_package("dit");
    if (!pkg) return 0;
    snprintf(dir, sizeof dir, "%s/dit", pkg);
    if (dg_backend_new_opts("cpu", &(dg_backend_opts){.cpu_bf16_compute = bf16}, &be, err, sizeof err) < 0 ||
        dg_dit_load(&dit, dir, be, err, sizeof err) < 0 ||
        dg_dit_state_new(&dit, dit.be, 256, 64, &st, err, sizeof err) < 0) {
        fprintf(stderr, "setup: %s\n", err);
        return 0;
    }
    loaded = 1;
    return 1;
}

static int setup(void) { return setup_mode(0); }

typedef struct {
    dg_dit_layout L;
    float        *lat, *ctx;
    const float  *frames[DG_DIT_MAX_FRAMES];
    float         t[DG_DIT_MAX_FRAMES];
    int           n_ctx;
} dit_case;

/* The case's layout, latents (one wave over the frames in order) and context. */
static int case_inputs(json_t *c, dit_case *k) {
    json_t *d = json_object_get(dit_goldens(), "dit"), *wave = json_object_get(c, "latent");
    int h[8], w[8], cond[8], n = (int)json_array_size(json_object_get(c, "h"));
    char err[256];
    for (int i = 0; i < n; i++) {
        h[i] = (int)json_integer_value(json_array_get(json_object_get(c, "h"), i));
        w[i] = (int)json_integer_value(json_array_get(json_object_get(c, "w"), i));
        cond[i] = (int)json_integer_value(json_array_get(json_object_get(c, "cond"), i));
        k->t[i] = (float)json_number_value(json_array_get(json_object_get(c, "timesteps"), i));
    }
    if (dg_dit_layout_build(&k->L, h, w, cond, n, 16, 2, 2, err, sizeof err) < 0) return -1;
    k->lat = malloc(sizeof(float) * (size_t)k->L.n_latent);
    dit_wave(k->lat, k->L.n_latent, json_number_value(json_array_get(wave, 0)),
             json_number_value(json_array_get(wave, 1)), json_number_value(json_array_get(wave, 2)));
    for (int i = 0, o = 0; i < n; o += 16 * h[i] * w[i], i++) k->frames[i] = k->lat + o;
    k->n_ctx = (int)json_integer_value(json_object_get(d, "n_ctx"));
    json_t *cw = json_object_get(d, "ctx");
    k->ctx = malloc(sizeof(float) * (size_t)k->n_ctx * dit.cfg.text_dim);
    dit_wave(k->ctx, (int64_t)k->n_ctx * dit.cfg.text_dim, json_number_value(json_array_get(cw, 0)),
             json_number_value(json_array_get(cw, 1)), json_number_value(json_array_get(cw, 2)));
    return 0;
}

/* The forward of the goldens' case `name`, in fp32 or bf16 compute, within abs + rel·|golden|. */
static void forward_case_tol(const char *name, int bf16, double abs_tol, double rel_tol) {
    json_t *c, *cases = json_object_get(json_object_get(dit_goldens(), "dit"), "cases");
    size_t i;
    char err[512];
    if (!setup_mode(bf16)) { CHECK(!"setup"); return; }
    json_array_foreach(cases, i, c) {
        if (strcmp(json_string_value(json_object_get(c, "name")), name)) continue;
        dit_case k;
        CHECK(case_inputs(c, &k) == 0);
        float *v = malloc(sizeof(float) * (size_t)k.L.n_latent);
        float *want = dit_read_f32(json_object_get(c, "velocity"), k.L.n_latent);
        CHECK(dg_dit_set_layout(&dit, st, &k.L, err, sizeof err) == 0);
        CHECK(dg_dit_forward(&dit, st, &(dg_dit_input){k.frames, k.t, k.ctx, k.n_ctx}, v, err, sizeof err) == 0);
        double m = 0, e = want ? dit_err(v, want, k.L.n_latent, abs_tol, rel_tol, &m) : INFINITY;
        printf("  dit %s%s: %lld tokens, max |err| %.3g\n", name, bf16 ? " (bf16 compute)" : "",
               (long long)k.L.n_tokens, m);
        CHECK(e <= 1.0);
        free(v);
        free(want);
        free(k.lat);
        free(k.ctx);
        return;
    }
    CHECK(!"case not in the goldens");
}

static void forward_case(const char *name) { forward_case_tol(name, 0, 1e-4, 1e-4); }

TEST(dit_video_path_matches_diffusers) { forward_case("video"); }

TEST(dit_packed_frames_match_reference) { forward_case("packed"); }

TEST(dit_native_resolution_frames_match_reference) { forward_case("native"); }

/* Six UniPC steps with CFG on the packed frames, the noise from the flow RNG. */
TEST(dit_sampling_matches_diffusers) {
    json_t *d = json_object_get(dit_goldens(), "dit"), *sm = json_object_get(d, "sampling"), *c = NULL;
    size_t i;
    char err[512];
    if (!setup()) { CHECK(!"setup"); return; }
    json_array_foreach(json_object_get(d, "cases"), i, c)
        if (!strcmp(json_string_value(json_object_get(c, "name")), "packed")) break;
    dit_case k;
    CHECK(case_inputs(c, &k) == 0);
    const int steps = (int)json_integer_value(json_object_get(sm, "steps"));
    const float scale = (float)json_number_value(json_object_get(sm, "guidance"));
    const int drop = (int)json_integer_value(json_object_get(sm, "drop_last_rows"));
    const dg_dit_frame_meta *tg = &k.L.frames[2];
    const int64_t n = 16LL * tg->h * tg->w, off = k.L.n_latent - n;
    float *x = malloc(sizeof(float) * n), *vc = malloc(sizeof(float) * k.L.n_latent);
    float *vu = malloc(sizeof(float) * k.L.n_latent), sig[DG_FLOW_MAX_STEPS + 1];
    dg_flow *f = NULL;
    dg_flow_noise(x, n, (uint64_t)json_integer_value(json_object_get(sm, "seed")), 0);
    dg_flow_sigmas_karras(sig, steps, 0.01, 200.0, 7.0);
    CHECK(dg_flow_new(DG_FLOW_UNIPC, sig, steps, n, &f, err, sizeof err) == 0);
    CHECK(dg_dit_set_layout(&dit, st, &k.L, err, sizeof err) == 0);
    k.frames[2] = x;
    for (int s = 0; f && s < steps; s++) {
        k.t[2] = dg_flow_sigma(f);
        CHECK(dg_dit_forward(&dit, st, &(dg_dit_input){k.frames, k.t, k.ctx, k.n_ctx}, vc, err, sizeof err) == 0);
        CHECK(dg_dit_forward(&dit, st, &(dg_dit_input){k.frames, k.t, k.ctx, k.n_ctx - drop}, vu, err, sizeof err) == 0);
        dg_flow_cfg(vc + off, vc + off, vu + off, scale, n);
        dg_flow_step(f, x, vc + off);
    }
    float *want = dit_read_f32(json_object_get(sm, "x"), n);
    double m = 0, e = want ? dit_err(x, want, n, 1e-3, 0.0, &m) : INFINITY;
    printf("  dit sampling (%d UniPC steps, CFG %g): max |err| %.3g\n", steps, scale, m);
    CHECK(e <= 1.0);
    dg_flow_free(f);
    free(want);
    free(x);
    free(vc);
    free(vu);
    free(k.lat);
    free(k.ctx);
}

/* Batched forwards (docs/DESIGN.md §6 "Batching"): the two CFG branches of one image (the
 * same frames, contexts of different lengths) and a third input of the same layout with
 * other latents and timesteps (another job's image) in one forward give each the velocity
 * of its own forward, bit for bit: every row of a matmul is the same whatever m, and
 * attention runs within each input. Exact comparison, no tolerance. */
static void batched_equals_alone(int bf16) {
    json_t *d = json_object_get(dit_goldens(), "dit"), *c = NULL;
    size_t i;
    char err[512];
    if (!setup_mode(bf16)) { CHECK(!"setup"); return; }
    json_array_foreach(json_object_get(d, "cases"), i, c)
        if (!strcmp(json_string_value(json_object_get(c, "name")), "packed")) break;
    dit_case k;
    CHECK(case_inputs(c, &k) == 0);
    dg_dit_state *big = NULL;
    CHECK(dg_dit_state_new(&dit, dit.be, 3 * (int)k.L.n_tokens, 3 * k.n_ctx, &big, err, sizeof err) == 0);
    CHECK(dg_dit_set_layout(&dit, st, &k.L, err, sizeof err) == 0);
    CHECK(big && dg_dit_set_layout(&dit, big, &k.L, err, sizeof err) == 0);
    const int64_t nl = k.L.n_latent;
    float *other = malloc(sizeof(float) * nl), *alone = malloc(sizeof(float) * 3 * nl);
    float *batched = malloc(sizeof(float) * 3 * nl), t2[DG_DIT_MAX_FRAMES];
    const float *frames2[DG_DIT_MAX_FRAMES];
    dg_flow_noise(other, nl, 99, 0);
    for (int f = 0; f < k.L.n_frames; f++) {
        frames2[f] = other + (k.frames[f] - k.frames[0]);
        t2[f] = k.t[f] * 0.5f + 0.1f;
    }
    const dg_dit_input in[4] = {{k.frames, k.t, k.ctx, k.n_ctx}, {k.frames, k.t, k.ctx, k.n_ctx - 4},
                                {frames2, t2, k.ctx + 2LL * dit.cfg.text_dim, k.n_ctx - 2},
                                {k.frames, k.t, k.ctx, k.n_ctx}};
    float *const vel[4] = {batched, batched + nl, batched + 2 * nl, batched};
    printf("  %d context rows, %lld tokens a forward\n", k.n_ctx, (long long)k.L.n_tokens);
    for (int b = 0; b < 3; b++) CHECK(dg_dit_forward(&dit, st, &in[b], alone + b * nl, err, sizeof err) == 0);
    CHECK(big && dg_dit_forward_batch(&dit, big, in, 3, vel, err, sizeof err) == 0);
    CHECK(memcmp(alone, batched, sizeof(float) * 3 * nl) == 0);
    /* and what does not fit the state is refused, naming the sizes */
    CHECK(big && dg_dit_forward_batch(&dit, big, in, 4, vel, err, sizeof err) == DG_ELIMIT);
    CHECK(strstr(err, "4 inputs of 52 tokens") != NULL);
    dg_dit_state_free(&dit, big);
    free(other);
    free(alone);
    free(batched);
    free(k.lat);
    free(k.ctx);
}

TEST(dit_batched_forward_equals_each_alone) {
    batched_equals_alone(0);
    batched_equals_alone(1);   /* bf16 compute: its products' rows are as independent */
}

/* Packing metadata: offsets, temporal index per image, sizes that do not fit the patch. */
TEST(dit_layout_metadata) {
    dg_dit_layout L;
    char err[256];
    int h[3] = {8, 6, 8}, w[3] = {12, 8, 8}, cond[3] = {1, 1, 0};
    CHECK(dg_dit_layout_build(&L, h, w, cond, 3, 16, 2, 2, err, sizeof err) == 0);
    CHECK_EQ_INT(L.n_tokens, 24 + 12 + 16);
    CHECK_EQ_INT(L.frames[1].token0, 24);
    CHECK_EQ_INT(L.frames[2].token0, 36);
    CHECK_EQ_INT(L.frames[2].t_index, 2);
    CHECK_EQ_INT(L.frames[2].condition, 0);
    CHECK_EQ_INT(L.n_latent, 16 * (96 + 48 + 64));
    h[1] = 7;
    CHECK(dg_dit_layout_build(&L, h, w, cond, 3, 16, 2, 2, err, sizeof err) == DG_EINVAL);
    CHECK(strstr(err, "frame 1") != NULL);
}

/* Patchify then unpatchify of the same channel layout is the identity on the latent. */
TEST(dit_patchify_roundtrip) {
    dg_dit_layout L;
    char err[256];
    int h = 6, w = 10, cond = 1;
    float lat[16 * 60], back[16 * 60], tok[15 * 72], out[15 * 64];
    CHECK(dg_dit_layout_build(&L, &h, &w, &cond, 1, 16, 2, 2, err, sizeof err) == 0);
    dit_wave(lat, 16 * 60, 1.0, 0.3, 0.0);
    dg_dit_patchify(&L, 0, lat, 16, tok);
    CHECK(tok[16 * 4] == 1.0f && tok[17 * 4] == 0.0f);   /* mask, padding channels */
    for (int t = 0; t < 15; t++)   /* (c, m, n) order in -> (m, n, c) order out */
        for (int c = 0; c < 16; c++)
            for (int p = 0; p < 4; p++) out[t * 64 + p * 16 + c] = tok[t * 72 + c * 4 + p];
    dg_dit_unpatchify(&L, 0, out, 16, back);
    CHECK(memcmp(lat, back, sizeof lat) == 0);
}

/* The largest difference of y = modulate(x) [m, n] from its definition in double: LayerNorm
 * without affine (biased variance, eps 1e-6), times 1 + scale, plus shift. */
static double modulate_error(const float *y, const float *x, const float *shift, const float *scale, int m, int n) {
    double worst = 0;
    for (int i = 0; i < m; i++) {
        double mean = 0, var = 0;
        for (int j = 0; j < n; j++) mean += x[i * n + j];
        mean /= n;
        for (int j = 0; j < n; j++) var += (x[i * n + j] - mean) * (x[i * n + j] - mean);
        var /= n;
        for (int j = 0; j < n; j++) {
            const double ref = (x[i * n + j] - mean) / sqrt(var + 1e-6) * (1 + scale[j]) + shift[j];
            worst = fmax(worst, fabs(y[i * n + j] - ref));
        }
    }
    return worst;
}

/* The DiT's own backend operations against their definitions: adaLN modulate (LayerNorm
 * without affine, biased variance, eps 1e-6) and the gated residual. Tolerance 1e-5. */
TEST(dit_op_modulate_and_gate) {
    enum { M = 3, N = 40 };
    dg_backend *b = NULL;
    char err[256];
    float x[M * N], y[M * N], shift[N], scale[N], gate[N], acc[M * N];
    CHECK(dg_backend_new("cpu", 0, &b, err, sizeof err) == 0);
    dit_wave(x, M * N, 3.0, 0.71, 0.2);
    for (int i = 0; i < M * N; i++) x[i] += 5.0f;   /* a large mean */
    dit_wave(shift, N, 0.5, 0.3, 0.0);
    dit_wave(scale, N, 0.7, 0.9, 1.0);
    dit_wave(gate, N, 1.2, 0.4, 2.0);
    b->modulate(b, y, x, shift, scale, M, N, 1e-6f);
    CHECK(modulate_error(y, x, shift, scale, M, N) <= 1e-5);
    memcpy(acc, x, sizeof x);
    b->add_gated(b, acc, y, gate, M, N);
    for (int i = 0; i < M * N; i++) CHECK_NEAR(acc[i], x[i] + gate[i % N] * y[i], 1e-5);
    dg_backend_free(b);
}

/* Rows whose mean is large against their spread (mean 1000, spread 1, n 5120: a DiT's
 * residual stream can carry such offsets): the normalized values within 2e-6 of double, one
 * rounding of values below 4 (in fp32 sums they were 3e-3 off). */
TEST(dit_op_modulate_large_mean) {
    enum { M = 2, N = 5120 };
    dg_backend *b = NULL;
    char err[256];
    static float x[M * N], y[M * N], shift[N], scale[N];
    CHECK(dg_backend_new("cpu", 0, &b, err, sizeof err) == 0);
    dit_wave(x, M * N, 1.0, 0.37, 0.5);
    for (int i = 0; i < M * N; i++) x[i] += 1000.0f;
    dit_wave(shift, N, 0.5, 0.3, 0.0);
    dit_wave(scale, N, 0.3, 0.9, 0.0);
    b->modulate(b, y, x, shift, scale, M, N, 1e-6f);
    const double worst = modulate_error(y, x, shift, scale, M, N);
    printf("  modulate, mean 1000: max abs error %.3g\n", worst);
    CHECK(worst <= 2e-6);
    dg_backend_free(b);
}

/* bf16 compute (dg_backend_opts.cpu_bf16_compute): every matmul's and, on AVX-512 BF16,
 * the attention's products take bf16 inputs (kernels/cpu/matmul.h, attention_bf16.h), as
 * PyTorch's bf16 does. Against the float32 goldens: an input rounded to bf16 is off by up to
 * 2^-9 = 0.2% relative, and each of the ~20 products on a path through the two blocks (the
 * embedding, q/k/v, the scores and the weighted values, the output, the MLP's two, the
 * adaLN's) adds an error of that order, on values whose scale is set by the largest outputs
 * (~5): 5e-2 + 3e-2·|golden|. Seen: 2.3e-2 and 2.7e-2, of which the matmuls' rounding alone
 * (the attention's products in fp32) 2.1e-2 and 2.5e-2. fp32 compute stays within 1e-4 of
 * the same goldens (above); a wrong pairing or layout in the bf16 products gives errors of
 * order 1. */
TEST(dit_bf16_compute_matches_diffusers) {
    forward_case_tol("video", 1, 5e-2, 3e-2);
    forward_case_tol("native", 1, 5e-2, 3e-2);
}

int main(void) {
    int rc = test_main();
    teardown();
    return rc;
}
