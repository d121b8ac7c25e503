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
#include "duogen.h"
#include "vae.h"

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
    CHECK(dg_vae_state_new(&vae, 5, 32, 48, &s, err, sizeof err) == 0);
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
    CHECK(dg_vae_state_new(&vae, 1, 16, 16, &s, err, sizeof err) == 0);
    CHECK(dg_vae_encode(&vae, s, buf, 1, 12, 16, buf, err, sizeof err) == DG_EINVAL);
    CHECK(strstr(err, "multiples of 8") != NULL);
    CHECK(dg_vae_encode(&vae, s, buf, 2, 16, 16, buf, err, sizeof err) == DG_EINVAL);
    CHECK(dg_vae_encode(&vae, s, buf, 1, 32, 32, buf, err, sizeof err) == DG_ELIMIT);
    dg_vae_state_free(&vae, s);
    dg_vae_unload(&vae);
    dg_backend_free(be);
}

/* A checkpoint with a wrong shape names the tensor, expected and found. */
TEST(vae_load_names_bad_tensor) {
    dg_backend *be = NULL;
    dg_vae vae;
    char err[512] = "";
    CHECK(dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    CHECK(dg_vae_load(&vae, "/nonexistent", be, err, sizeof err) == DG_EMODEL);
    CHECK(err[0] != 0);
    dg_backend_free(be);
}

int main(void) { return test_main(); }
