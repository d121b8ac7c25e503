/* The flow-matching sampler against diffusers' schedulers, and the seeded noise.
 *
 * Goldens (tests/golden/dit/flow_*.f32, tools/reference/make_dit_goldens.py): diffusers
 * 0.42 UniPCMultistepScheduler (use_karras_sigmas + use_flow_sigmas, flow_prediction, bh2,
 * order 2, lower_order_final, sigma 0.01..200: the post-trained Cosmos-Predict2.5 sampler)
 * over 36 and 6 steps, and FlowMatchEulerDiscreteScheduler(shift=5) over 10 steps, driven by
 * the synthetic velocity v = 0.8·x − 0.3·sin(3σ + 0.05k) from the same start x.
 *
 * Tolerances: sigmas 1e-6 (float32 of the same double formula); final x 2e-5 absolute:
 * diffusers computes the coefficients in float32 tensors, we in double; over 36 steps of
 * a contracting ODE the seen difference is ~1e-6 (printed). A wrong corrector or
 * predictor coefficient changes x by 1e-3..1e-1. */
#include "common/harness.h"
#include "dit_common.h"

#include "duogen.h"
#include "draw/flow.h"

static void velocity(float *v, const float *x, float sigma, int n) {
    for (int k = 0; k < n; k++) v[k] = 0.8f * x[k] - 0.3f * sinf(3.0f * sigma + 0.05f * (float)k);
}

TEST(flow_matches_diffusers) {
    json_t *g = dit_goldens(), *fl = json_object_get(g, "flow"), *c;
    size_t ci;
    char err[256];
    CHECK(fl != NULL);
    if (!fl) return;
    const int n = (int)json_integer_value(json_object_get(fl, "n"));
    json_array_foreach(json_object_get(fl, "cases"), ci, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        const int steps = (int)json_integer_value(json_object_get(c, "steps"));
        const int unipc = !strcmp(json_string_value(json_object_get(c, "solver")), "unipc");
        float sig[DG_FLOW_MAX_STEPS + 1], x[256], v[256];
        if (!strcmp(json_string_value(json_object_get(c, "schedule")), "karras"))
            dg_flow_sigmas_karras(sig, steps, 0.01, 200.0, 7.0);
        else
            dg_flow_sigmas_shifted(sig, steps, json_number_value(json_object_get(c, "shift")),
                                   json_number_value(json_object_get(c, "u_first")),
                                   json_number_value(json_object_get(c, "u_last")));
        json_t *gs = json_object_get(c, "sigmas");
        CHECK_EQ_INT(json_array_size(gs), steps + 1);
        for (int i = 0; i <= steps; i++) CHECK_NEAR(sig[i], json_number_value(json_array_get(gs, i)), 1e-6);
        dg_flow *f = NULL;
        CHECK(dg_flow_new(unipc ? DG_FLOW_UNIPC : DG_FLOW_EULER, sig, steps, n, &f, err, sizeof err) == 0);
        if (!f) continue;
        dit_wave(x, n, 1.0, 0.7, 0.2);
        for (int i = 0; i < steps; i++) {
            velocity(v, x, dg_flow_sigma(f), n);
            CHECK(dg_flow_step(f, x, v) == 0);
        }
        CHECK(dg_flow_step(f, x, v) == DG_EINVAL);
        float *want = dit_read_f32(json_object_get(c, "x"), n);
        double m;
        CHECK(want && dit_err(x, want, n, 2e-5, 0.0, &m) <= 1.0);
        printf("  %s: max |err| %.3g\n", name, want ? m : -1.0);
        /* reset gives the same trajectory */
        dg_flow_reset(f);
        float y[256];
        dit_wave(y, n, 1.0, 0.7, 0.2);
        for (int i = 0; i < steps; i++) {
            velocity(v, y, dg_flow_sigma(f), n);
            dg_flow_step(f, y, v);
        }
        CHECK(memcmp(x, y, sizeof(float) * (size_t)n) == 0);
        free(want);
        dg_flow_free(f);
    }
}

/* The pre-trained Cosmos-Predict2.5 schedule: linspace(0.999, 0, 36)[:-1] shifted by 5
 * (spec §5.2b lists its first and last values). */
TEST(flow_shifted_schedule_of_the_spec) {
    float sig[36];
    dg_flow_sigmas_shifted(sig, 35, 5.0, 0.999, 0.999 / 35.0);
    CHECK_NEAR(sig[0], 0.999800, 1e-6);
    CHECK_NEAR(sig[1], 0.993948, 1e-6);
    CHECK_NEAR(sig[33], 0.232369, 1e-6);
    CHECK_NEAR(sig[34], 0.128090, 1e-6);
    CHECK(sig[35] == 0.0f);
}

TEST(flow_rejects_bad_sigmas) {
    float sig[4] = {0.9f, 0.95f, 0.1f, 0.0f};
    dg_flow *f = NULL;
    char err[256];
    CHECK(dg_flow_new(DG_FLOW_UNIPC, sig, 3, 8, &f, err, sizeof err) == DG_EINVAL && !f);
    sig[1] = 0.5f;
    sig[3] = 0.01f;
    CHECK(dg_flow_new(DG_FLOW_UNIPC, sig, 3, 8, &f, err, sizeof err) == DG_EINVAL);
    sig[3] = 0.0f;
    sig[0] = 1.0f;
    CHECK(dg_flow_new(DG_FLOW_UNIPC, sig, 3, 8, &f, err, sizeof err) == DG_EINVAL);
    CHECK(dg_flow_new(DG_FLOW_EULER, sig, 3, 8, &f, err, sizeof err) == 0);
    dg_flow_free(f);
}

TEST(flow_cfg) {
    float c[3] = {1, 2, 3}, u[3] = {0, 2, 5}, v[3];
    dg_flow_cfg(v, c, u, 7.0f, 3);
    CHECK(v[0] == 8.0f && v[1] == 2.0f && v[2] == -11.0f);
}

/* Noise: fixed values (a change of the stream is a change of every seeded image), slices
 * drawn alone equal the whole, moments of N(0,1), seeds differ. */
TEST(flow_noise_is_reproducible) {
    enum { N = 1 << 16 };
    static float a[N], b[N];
    dg_flow_noise(a, N, 42, 0);
    dg_flow_noise(b + 1000, 777, 42, 1000);
    CHECK(memcmp(a + 1000, b + 1000, 777 * sizeof(float)) == 0);
    double s = 0, s2 = 0;
    for (int i = 0; i < N; i++) {
        s += a[i];
        s2 += (double)a[i] * a[i];
    }
    CHECK_NEAR(s / N, 0.0, 0.02);
    CHECK_NEAR(s2 / N, 1.0, 0.03);
    dg_flow_noise(b, 4, 43, 0);
    CHECK(memcmp(a, b, 4 * sizeof(float)) != 0);
    printf("  noise(42)[0..3] = %.9g %.9g %.9g %.9g\n", a[0], a[1], a[2], a[3]);
    static const float want[4] = {-0.143625244f, 0.0797699392f, -0.9039042f, 1.04701936f};
    for (int i = 0; i < 4; i++) CHECK(a[i] == want[i]);
}

/* The noise the parity goldens handed to the diffusers pipeline as its `latents`
 * (tools/reference/make_pipeline_goldens.py recomputes dg_flow_noise in Python): bit for bit
 * the engine's, so the pipeline and duogend start from the same x. */
TEST(flow_noise_is_what_the_pipeline_goldens_used) {
    FILE *f = fopen("tests/golden/pipeline/goldens.json", "rb");
    json_error_t je;
    json_t *g = f ? json_loadf(f, 0, &je) : NULL, *noise = json_object_get(g, "noise");
    if (f) fclose(f);
    CHECK(noise != NULL);
    if (!noise) return;
    const json_t *shape = json_object_get(noise, "shape");
    const int64_t n = json_integer_value(json_array_get(shape, 0)) * json_integer_value(json_array_get(shape, 1)) *
                      json_integer_value(json_array_get(shape, 2));
    float want[4096], got[4096];
    FILE *b = fopen("tests/golden/pipeline/noise.f32", "rb");
    CHECK(b && n > 0 && n <= 4096 && fread(want, sizeof(float), (size_t)n, b) == (size_t)n);
    if (b) fclose(b);
    dg_flow_noise(got, n, (uint64_t)json_integer_value(json_object_get(noise, "stream")), 0);
    CHECK(memcmp(got, want, (size_t)n * sizeof(float)) == 0);
    json_decref(g);
}

int main(void) { return test_main(); }
