/* Fidelity of the Wan2.1 VAE against diffusers' AutoencoderKLWan.
 *
 * Goldens (tests/golden/dit/vae_*.f32, tools/reference/make_dit_goldens.py): diffusers
 * 0.42 in float32 on the tiny package's vae/ (base width 8, the real depth, resampling and
 * first-frame rules) for one 32x48 image and a 5-frame 16x24 clip (2 latent frames):
 * the normalized posterior mean of encode, and decode of a fixed latent (clamped output).
 * diffusers encodes in chunks of 1+4 frames and decodes one latent frame at a time with
 * feature caches; we run whole sequences, so the clip also checks that equivalence.
 *
 * Tolerance: |ours - golden| <= 2e-4 + 1e-3·|golden|. Both sides are fp32 with different
 * summation orders (im2col+sgemm vs. PyTorch's conv kernels) through ~40 convolutions of
 * unit-scale activations; seen errors are ~1e-6 (printed). A wrong tap order, padding
 * side or first-frame rule gives errors of order 0.1. */
#include "common/harness.h"
#include "dit_common.h"

#include "backend.h"
#include "cpu/cpu_kernels.h"
#include "duogen.h"
#include "draw/vae.h"

#define ABS_TOL 2e-4
#define REL_TOL 1e-3

static void run_cases(const char *backend_name) {
    json_t *g = dit_goldens();
    const char *pkg = dit_package("vae");
    dg_backend *be = NULL;
    dg_vae vae;
    dg_vae_state *s = NULL;
    char err[512], dir[300];
    CHECK(g && pkg);
    if (!g || !pkg) return;
    snprintf(dir, sizeof dir, "%s/vae", pkg);
    CHECK(dg_backend_new(backend_name, 0, &be, err, sizeof err) == 0);
    if (dg_vae_load(&vae, dir, be, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "load: %s", err);
        dg_backend_free(be);
        return;
    }
    CHECK(dg_vae_state_new(&vae, vae.be, 5, 32, 48, &s, err, sizeof err) == 0);
    json_t *c;
    size_t i;
    json_array_foreach(json_object_get(json_object_get(g, "vae"), "cases"), i, c) {
        const int T = (int)json_integer_value(json_object_get(c, "frames"));
        const int H = (int)json_integer_value(json_object_get(c, "height"));
        const int W = (int)json_integer_value(json_object_get(c, "width"));
        const int Tl = 1 + (T - 1) / 4, h = H / 8, w = W / 8;
        const int64_t n_px = (int64_t)T * 3 * H * W, n_lat = (int64_t)Tl * 16 * h * w;
        float *px = malloc(sizeof(float) * n_px), *lat = malloc(sizeof(float) * n_lat);
        float *want_lat = dit_read_f32(json_object_get(c, "encode"), n_lat);
        float *want_px = dit_read_f32(json_object_get(c, "decode"), n_px);
        double e, m;
        CHECK(want_lat && want_px);
        if (!want_lat || !want_px) goto next;
        dit_wave(px, n_px, 0.9, 0.37, 0.1);
        CHECK(dg_vae_encode(&vae, s, px, T, H, W, lat, err, sizeof err) == 0);
        e = dit_err(lat, want_lat, n_lat, ABS_TOL, REL_TOL, &m);
        printf("  vae %s (%s) encode: max |err| %.3g\n", json_string_value(json_object_get(c, "name")), be->name, m);
        CHECK(e <= 1.0);
        dit_wave(lat, n_lat, 1.5, 0.61, 0.3);
        CHECK(dg_vae_decode(&vae, s, lat, Tl, h, w, px, err, sizeof err) == 0);
        e = dit_err(px, want_px, n_px, ABS_TOL, REL_TOL, &m);
        printf("  vae %s (%s) decode: max |err| %.3g\n", json_string_value(json_object_get(c, "name")), be->name, m);
        CHECK(e <= 1.0);
    next:
        free(px);
        free(lat);
        free(want_lat);
        free(want_px);
    }
    dg_vae_state_free(&vae, s);
    dg_vae_unload(&vae);
    dg_backend_free(be);
}

TEST(vae_matches_diffusers) { run_cases("cpu"); }

TEST(vae_matches_diffusers_scalar) { run_cases("cpu-scalar"); }

/* Bad clips are refused with DG_EINVAL / DG_ELIMIT and a message, not computed. */
TEST(vae_rejects_bad_shapes) {
    const char *pkg = dit_package("vae");
    dg_backend *be = NULL;
    dg_vae vae;
    dg_vae_state *s = NULL;
    char err[512] = "", dir[300];
    float buf[3 * 64 * 64];
    if (!pkg) { CHECK(pkg); return; }
    snprintf(dir, sizeof dir, "%s/vae", pkg);
    CHECK(dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    CHECK(dg_vae_load(&vae, dir, be, err, sizeof err) == 0);
    CHECK(dg_vae_state_new(&vae, vae.be, 1, 16, 16, &s, err, sizeof err) == 0);
    CHECK(dg_vae_encode(&vae, s, buf, 1, 12, 16, buf, err, sizeof err) == DG_EINVAL);
    CHECK(strstr(err, "multiples of 8") != NULL);
    CHECK(dg_vae_encode(&vae, s, buf, 2, 16, 16, buf, err, sizeof err) == DG_EINVAL);
    CHECK(dg_vae_encode(&vae, s, buf, 1, 32, 32, buf, err, sizeof err) == DG_ELIMIT);
    dg_vae_state_free(&vae, s);
    dg_vae_unload(&vae);
    dg_backend_free(be);
}

/* A checkpoint whose shapes disagree with its config names the tensor, expected and found;
 * a missing directory is DG_EMODEL with a message. */
TEST(vae_load_names_bad_tensor) {
    const char *pkg = dit_package("vae");
    dg_backend *be = NULL;
    dg_vae vae;
    char err[512] = "", cmd[1024], dir[300];
    if (!pkg) { CHECK(pkg); return; }
    CHECK(dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    CHECK(dg_vae_load(&vae, "/nonexistent", be, err, sizeof err) == DG_EMODEL);
    CHECK(err[0] != 0);
    /* the same weights under a config that says base_dim 16 */
    snprintf(dir, sizeof dir, "%s/vae16", pkg);
    snprintf(cmd, sizeof cmd, "mkdir -p %s && ln -sf ../vae/diffusion_pytorch_model.safetensors %s/ && "
             "sed 's/\"base_dim\": 8/\"base_dim\": 16/' %s/vae/config.json > %s/config.json", dir, dir, pkg, dir);
    CHECK(system(cmd) == 0);
    CHECK(dg_vae_load(&vae, dir, be, err, sizeof err) == DG_EMODEL);
    CHECK(strstr(err, "encoder.conv_in.weight") && strstr(err, "[16, 3, 3, 3, 3]") && strstr(err, "[8, 3, 3, 3, 3]"));
    dg_backend_free(be);
}

/* ---- the VAE's backend operations against direct definitions ---------------------------- */

/* Direct causal conv3d on frame-major x[t, ci, h, w], PyTorch weight order [co, ci, kt, kh, kw]. */
static void conv_ref(float *y, const float *x, const float *w_pt, const float *bias, const dg_conv3d_shape *s) {
    const int to = dg_conv3d_out_t(s), ho = dg_conv3d_out_h(s), wo = dg_conv3d_out_w(s);
    for (int t = 0; t < to; t++)
        for (int o = 0; o < s->c_out; o++)
            for (int oy = 0; oy < ho; oy++)
                for (int ox = 0; ox < wo; ox++) {
                    double acc = bias[o];
                    for (int i = 0; i < s->c_in; i++)
                        for (int a = 0; a < s->kt; a++)
                            for (int b = 0; b < s->kh; b++)
                                for (int c = 0; c < s->kw; c++) {
                                    const int ti = t * s->st + a - s->pad_t, iy = oy * s->sh + b - s->pad_top;
                                    const int ix = ox * s->sw + c - s->pad_left;
                                    if (ti < 0 || ti >= s->t || iy < 0 || iy >= s->h || ix < 0 || ix >= s->w) continue;
                                    acc += (double)w_pt[(((o * s->c_in + i) * s->kt + a) * s->kh + b) * s->kw + c] *
                                           x[((ti * s->c_in + i) * s->h + iy) * s->w + ix];
                                }
                    y[((t * s->c_out + o) * ho + oy) * wo + ox] = (float)acc;
                }
}

/* Tolerance 1e-5 relative to the sum of |terms| (<= 5·27 products of unit values): fp32
 * sgemm against a double loop. */
TEST(vae_op_conv3d_matches_direct) {
    static const dg_conv3d_shape cases[] = {
        {.c_in = 5, .c_out = 7, .t = 4, .h = 9, .w = 11, .kt = 3, .kh = 3, .kw = 3, .st = 1, .sh = 1, .sw = 1,
         .pad_t = 2, .pad_top = 1, .pad_bottom = 1, .pad_left = 1, .pad_right = 1},     /* causal 3x3x3 */
        {.c_in = 4, .c_out = 4, .t = 1, .h = 8, .w = 6, .kt = 3, .kh = 3, .kw = 3, .st = 1, .sh = 1, .sw = 1,
         .pad_t = 2, .pad_top = 1, .pad_bottom = 1, .pad_left = 1, .pad_right = 1},     /* one image */
        {.c_in = 3, .c_out = 5, .t = 2, .h = 9, .w = 7, .kt = 1, .kh = 3, .kw = 3, .st = 1, .sh = 2, .sw = 2,
         .pad_bottom = 1, .pad_right = 1},                                               /* downsample2d */
        {.c_in = 6, .c_out = 6, .t = 5, .h = 3, .w = 4, .kt = 3, .kh = 1, .kw = 1, .st = 2, .sh = 1, .sw = 1}, /* time_conv down */
        {.c_in = 6, .c_out = 9, .t = 3, .h = 5, .w = 5, .kt = 1, .kh = 1, .kw = 1, .st = 1, .sh = 1, .sw = 1}, /* pointwise */
        /* frames that see only the causal padding (backend.h allows pad_t up to any value):
         * the bias alone; a pointwise kernel behind one padding frame, and pad_t beyond kt */
        {.c_in = 4, .c_out = 3, .t = 2, .h = 5, .w = 6, .kt = 1, .kh = 1, .kw = 1, .st = 1, .sh = 1, .sw = 1, .pad_t = 1},
        {.c_in = 3, .c_out = 4, .t = 3, .h = 4, .w = 5, .kt = 2, .kh = 3, .kw = 3, .st = 1, .sh = 1, .sw = 1,
         .pad_t = 3, .pad_top = 1, .pad_bottom = 1, .pad_left = 1, .pad_right = 1},
    };
    dg_backend *be = NULL;
    char err[256];
    CHECK(dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        const dg_conv3d_shape *s = &cases[k];
        const int K = s->c_in * s->kt * s->kh * s->kw;
        const int64_t nx = (int64_t)s->t * s->c_in * s->h * s->w;
        const int64_t ny = (int64_t)dg_conv3d_out_t(s) * s->c_out * dg_conv3d_out_h(s) * dg_conv3d_out_w(s);
        float *x = malloc(sizeof(float) * nx), *w = malloc(sizeof(float) * s->c_out * K);
        float *wr = malloc(sizeof(float) * s->c_out * K), *b = malloc(sizeof(float) * s->c_out);
        float *y = malloc(sizeof(float) * ny), *yr = malloc(sizeof(float) * ny);
        dit_wave(x, nx, 1.0, 0.77, 0.1);
        dit_wave(w, (int64_t)s->c_out * K, 0.5, 1.31, 0.4);
        dit_wave(b, s->c_out, 0.2, 0.9, 0.0);
        for (int64_t i = 0; i < ny; i++) y[i] = 12345.0f;   /* what an output left unwritten shows */
        for (int o = 0; o < s->c_out; o++)   /* [co, ci, kt, khw] -> [co, kt, ci, khw] */
            for (int i = 0; i < s->c_in; i++)
                for (int a = 0; a < s->kt; a++)
                    for (int p = 0; p < s->kh * s->kw; p++)
                        wr[((o * s->kt + a) * s->c_in + i) * s->kh * s->kw + p] =
                            w[((o * s->c_in + i) * s->kt + a) * s->kh * s->kw + p];
        be->conv3d(be, y, x, wr, b, s);
        conv_ref(yr, x, w, b, s);
        double m;
        CHECK(dit_err(y, yr, ny, 1e-5 * K, 0.0, &m) <= 1.0);
        free(x); free(w); free(wr); free(b); free(y); free(yr);
    }
    dg_backend_free(be);
}

/* The spatial attention's softmax over a plane of 2^20 pixels (backend.h's bound): each
 * probability within 1e-6 relative of double (its sum in fp32 was 1.5e-3 off at this length). */
TEST(vae_softmax_long_row) {
    enum { N = 1 << 20 };
    dg_backend *be = NULL;
    char err[256];
    CHECK(dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    float *x = malloc(sizeof(float) * N), *p = malloc(sizeof(float) * N);
    dit_wave(x, N, 4.0, 0.61, 0.3);
    memcpy(p, x, sizeof(float) * N);
    dg_cpu_softmax(be->impl, p, 1, N);
    float mx = -INFINITY;
    for (int j = 0; j < N; j++) mx = fmaxf(mx, x[j]);
    double z = 0, worst = 0;
    for (int j = 0; j < N; j++) z += exp((double)x[j] - mx);
    for (int j = 0; j < N; j++) {
        const double ref = exp((double)x[j] - mx) / z;
        worst = fmax(worst, fabs(p[j] / ref - 1.0));
    }
    printf("  softmax over 2^20: max relative error %.3g\n", worst);
    CHECK(worst <= 1e-6);
    free(x); free(p);
    dg_backend_free(be);
}

/* Channel RMS norm (+SiLU), nearest x2 and the single-head spatial attention. */
TEST(vae_op_norm_upsample_attention) {
    enum { F = 2, C = 5, H = 3, W = 4, P = H * W };
    dg_backend *be = NULL;
    char err[256];
    float x[F * C * P], y[F * C * P], g[C], up[C * 4 * P], qkv[3 * C * P], o[C * P];
    CHECK(dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    dit_wave(x, F * C * P, 2.0, 0.53, 0.3);
    dit_wave(g, C, 0.3, 1.1, 0.0);
    for (int c = 0; c < C; c++) g[c] += 1.0f;
    be->channel_rmsnorm(be, y, x, g, F, C, P, 1);
    for (int f = 0; f < F; f++)
        for (int p = 0; p < P; p++) {
            double ss = 0;
            for (int c = 0; c < C; c++) ss += (double)x[(f * C + c) * P + p] * x[(f * C + c) * P + p];
            for (int c = 0; c < C; c++) {
                double v = x[(f * C + c) * P + p] / sqrt(ss) * sqrt((double)C) * g[c];
                CHECK_NEAR(y[(f * C + c) * P + p], v / (1.0 + exp(-v)), 1e-5);
            }
        }
    be->upsample2x(be, up, x, C, H, W);
    for (int c = 0; c < C; c++)
        for (int yy = 0; yy < 2 * H; yy++)
            for (int xx = 0; xx < 2 * W; xx++)
                CHECK(up[(c * 2 * H + yy) * 2 * W + xx] == x[(c * H + yy / 2) * W + xx / 2]);
    dit_wave(qkv, 3 * C * P, 1.5, 0.41, 0.2);
    be->spatial_attention(be, o, qkv, C, P);
    for (int i = 0; i < P; i++) {
        double s[P], mx = -1e30, z = 0;
        for (int j = 0; j < P; j++) {
            s[j] = 0;
            for (int c = 0; c < C; c++) s[j] += (double)qkv[c * P + i] * qkv[(C + c) * P + j];
            s[j] /= sqrt((double)C);
            if (s[j] > mx) mx = s[j];
        }
        for (int j = 0; j < P; j++) z += (s[j] = exp(s[j] - mx));
        for (int c = 0; c < C; c++) {
            double v = 0;
            for (int j = 0; j < P; j++) v += s[j] / z * qkv[(2 * C + c) * P + j];
            CHECK_NEAR(o[c * P + i], v, 1e-5);
        }
    }
    dg_backend_free(be);
}

/* conv3d tiles its im2col columns (c_in·kt·kh·kw values) and spatial_attention its rows of
 * scores (plane values) in the CPU backend's scratch of 4M floats: past it the tiles were 0
 * wide and the loops endless. Such a shape is refused before any buffer is touched (NULL
 * here, where the data would take gigabytes) and kept as the backend's status, as a CUDA
 * fault is. A pointwise conv over as many channels needs no scratch and still runs. */
TEST(vae_ops_refuse_shapes_past_the_scratch) {
    const dg_conv3d_shape wide = {.c_in = 1 << 19, .c_out = 1, .t = 1, .h = 1, .w = 1, .kt = 3, .kh = 3, .kw = 3,
                                  .st = 1, .sh = 1, .sw = 1, .pad_t = 2, .pad_top = 1, .pad_bottom = 1,
                                  .pad_left = 1, .pad_right = 1};   /* 27·2^19 = 14155776 values a column */
    dg_backend *be = NULL;
    char err[256] = "";
    CHECK(dg_backend_new("cpu", 1, &be, err, sizeof err) == 0);
    if (!be) return;
    CHECK_EQ_INT(be->status(be, err, sizeof err), 0);
    be->conv3d(be, NULL, NULL, NULL, NULL, &wide);
    CHECK_EQ_INT(be->status(be, err, sizeof err), DG_EDEVICE);
    CHECK(strstr(err, "conv3d") != NULL && strstr(err, "14155776") != NULL);
    dg_backend_free(be);

    CHECK(dg_backend_new("cpu", 1, &be, err, sizeof err) == 0);
    if (!be) return;
    be->spatial_attention(be, NULL, NULL, 1, (4 << 20) + 1);
    CHECK_EQ_INT(be->status(be, err, sizeof err), DG_EDEVICE);
    CHECK(strstr(err, "spatial_attention") != NULL && strstr(err, "4194305") != NULL);
    dg_backend_free(be);

    /* 2^22 + 1 channels of 1 against weights of 0.5: every partial sum is a multiple of 0.5
     * below 2^22, exact in fp32 whatever the order, so the result is exact */
    const dg_conv3d_shape point = {.c_in = (4 << 20) + 1, .c_out = 1, .t = 1, .h = 1, .w = 1, .kt = 1, .kh = 1,
                                   .kw = 1, .st = 1, .sh = 1, .sw = 1};
    float *x = malloc(sizeof(float) * (size_t)point.c_in), *w = malloc(sizeof(float) * (size_t)point.c_in), y = 0;
    for (int i = 0; i < point.c_in; i++) x[i] = 1.0f, w[i] = 0.5f;
    CHECK(dg_backend_new("cpu", 1, &be, err, sizeof err) == 0);
    if (be) {
        be->conv3d(be, &y, x, w, NULL, &point);
        CHECK_EQ_INT(be->status(be, err, sizeof err), 0);
        CHECK(y == 0.5f * (float)point.c_in);
        dg_backend_free(be);
    }
    free(x);
    free(w);
}

int main(void) { return test_main(); }
