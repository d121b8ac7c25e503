/* The connector and the condition accumulator against the full-concatenation recipe.
 *
 * Golden (tests/golden/dit/connector_ctx.f32, tools/reference/make_dit_goldens.py): PyTorch
 * on the tiny package's connector.safetensors (2 layers x 64 -> 32): each layer's hidden
 * states standardized per token with the unbiased std + 1e-8, concatenated in layer order,
 * Linear + GELU. Hidden states of the two layers differ in scale (3 vs 48) and offset.
 * We add each layer's share by chunks of positions in mixed order, as the decoder hook
 * would, and finish at <BOV>: equal to projecting the whole concatenation, and the
 * negative condition (last text segment dropped) equals the golden's leading rows.
 *
 * Tolerance 1e-5 + 1e-5·|golden| on values up to ~2.4: fp32 accumulation of two layer
 * shares vs. one 128-wide dot product (seen ~1e-7). */
#include "common/harness.h"
#include "dit_common.h"

#include "backend.h"
#include "draw/connector.h"
#include "duogen.h"

TEST(connector_accumulator_equals_full_concatenation) {
    json_t *g = json_object_get(dit_goldens(), "connector");
    const char *pkg = dit_package("connector");
    char path[300], err[512];
    CHECK(g && pkg);
    if (!g || !pkg) return;
    const int L = (int)json_integer_value(json_object_get(g, "layers"));
    const int D = (int)json_integer_value(json_object_get(g, "hidden"));
    const int P = (int)json_integer_value(json_object_get(g, "positions"));
    const int drop = (int)json_integer_value(json_object_get(g, "drop_last"));
    const int layers[2] = {0, 1};
    dg_backend *be = NULL;
    dg_connector cn;
    dg_cond_acc *acc = NULL;
    snprintf(path, sizeof path, "%s/connector.safetensors", pkg);
    CHECK(L == 2 && dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    if (dg_connector_load(&cn, path, layers, L, D, be, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "load: %s", err);
        dg_backend_free(be);
        return;
    }
    CHECK_EQ_INT(cn.d_cond, 32);
    CHECK(dg_cond_acc_new(&cn, cn.be, 64, 4, &acc, err, sizeof err) == 0);   /* chunks of 4: splits */
    float *h[2], *dev = be->alloc(be, sizeof(float) * (size_t)P * D);
    for (int l = 0; l < L; l++) {
        json_t *w = json_array_get(json_object_get(g, "hidden_waves"), l);
        h[l] = malloc(sizeof(float) * (size_t)P * D);
        dit_wave(h[l], (int64_t)P * D, json_number_value(json_array_get(w, 0)), json_number_value(json_array_get(w, 1)),
                 json_number_value(json_array_get(w, 2)));
        for (int i = 0; i < P * D; i++) h[l][i] += (float)json_number_value(json_array_get(w, 3));
    }
    /* a prefill of 6 positions (layer 1 first, then an unused layer, then layer 0) and a
     * second forward of 4 */
    const int order[3] = {1, 5, 0};
    for (int j = 0; j < 3; j++) {
        be->upload(be, dev, h[order[j] % 2], (int64_t)6 * D);
        CHECK(dg_cond_acc_add(&cn, acc, order[j], dev, 6, 0) == 0);
    }
    for (int l = 0; l < L; l++) {
        be->upload(be, dev, h[l] + 6 * D, (int64_t)4 * D);
        CHECK(dg_cond_acc_add(&cn, acc, l, dev, 4, 6) == 0);
    }
    int32_t pos[16];
    for (int i = 0; i < P; i++) pos[i] = i;
    float ctx[16 * 32];
    float *want = dit_read_f32(json_object_get(g, "ctx"), (int64_t)P * 32);
    double m = 0;
    CHECK(dg_cond_acc_finish(&cn, acc, pos, P, ctx, err, sizeof err) == 0);
    CHECK(want && dit_err(ctx, want, (int64_t)P * 32, 1e-5, 1e-5, &m) <= 1.0);
    printf("  connector: max |err| %.3g\n", m);
    /* the negative condition: the last text segment dropped */
    CHECK(dg_cond_acc_finish(&cn, acc, pos, P - drop, ctx, err, sizeof err) == 0);
    CHECK(want && dit_err(ctx, want, (int64_t)(P - drop) * 32, 1e-5, 1e-5, &m) <= 1.0);
    /* a rewound sequence: positions 6.. must come again before they can be used */
    dg_cond_acc_truncate(&cn, acc, 6);
    CHECK(dg_cond_acc_finish(&cn, acc, pos, P, ctx, err, sizeof err) == DG_EINVAL);
    CHECK(strstr(err, "position 6") != NULL);
    be->upload(be, dev, h[0] + 6 * D, (int64_t)4 * D);
    CHECK(dg_cond_acc_add(&cn, acc, 0, dev, 4, 6) == 0);
    be->upload(be, dev, h[1] + 5 * D, (int64_t)5 * D);
    CHECK(dg_cond_acc_add(&cn, acc, 1, dev, 5, 5) == DG_EINVAL);   /* 5 has both, 6.. one */
    be->upload(be, dev, h[1] + 6 * D, (int64_t)4 * D);
    CHECK(dg_cond_acc_add(&cn, acc, 1, dev, 4, 6) == 0);
    CHECK(dg_cond_acc_finish(&cn, acc, pos, P, ctx, err, sizeof err) == 0);
    CHECK(want && dit_err(ctx, want, (int64_t)P * 32, 1e-5, 1e-5, &m) <= 1.0);
    CHECK(dg_cond_acc_add(&cn, acc, 0, dev, 4, 62) == DG_ELIMIT);
    free(want);
    free(h[0]);
    free(h[1]);
    be->release(be, dev);
    dg_cond_acc_free(&cn, acc);
    dg_connector_unload(&cn);
    dg_backend_free(be);
}

/* A connector whose width does not match the configured layers names the tensor. */
TEST(connector_rejects_wrong_layers) {
    const char *pkg = dit_package("connector");
    char path[300], err[512] = "";
    const int layers[3] = {0, 1, 2};
    dg_backend *be = NULL;
    dg_connector cn;
    if (!pkg) { CHECK(pkg); return; }
    snprintf(path, sizeof path, "%s/connector.safetensors", pkg);
    CHECK(dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    CHECK(dg_connector_load(&cn, path, layers, 3, 64, be, err, sizeof err) == DG_EMODEL);
    CHECK(strstr(err, "crossattn_proj.0.weight") && strstr(err, "[32, 192]") && strstr(err, "[32, 128]"));
    dg_backend_free(be);
}

/* The standardize op: unbiased std, eps added to the std, on rows with a large mean. */
TEST(connector_op_standardize) {
    enum { M = 2, N = 3584 };
    static float x[M * N], y[M * N];
    dg_backend *be = NULL;
    char err[256];
    CHECK(dg_backend_new("cpu", 0, &be, err, sizeof err) == 0);
    dit_wave(x, M * N, 40.0, 0.0123, 0.3);
    for (int i = 0; i < N; i++) x[i] += 1000.0f;
    be->standardize(be, y, x, M, N, 1e-8f);
    for (int r = 0; r < M; r++) {
        double mean = 0, var = 0;
        for (int j = 0; j < N; j++) mean += x[r * N + j];
        mean /= N;
        for (int j = 0; j < N; j++) var += (x[r * N + j] - mean) * (x[r * N + j] - mean);
        const double sd = sqrt(var / (N - 1)) + 1e-8;
        double worst = 0;
        for (int j = 0; j < N; j++) worst = fmax(worst, fabs(y[r * N + j] - (x[r * N + j] - mean) / sd));
        CHECK(worst < 1e-5);
    }
    dg_backend_free(be);
}

int main(void) { return test_main(); }
