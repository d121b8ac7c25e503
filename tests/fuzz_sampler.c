/* libFuzzer target for the sampler's three paths (engine/text/sampler.h): any parameters the
 * engine's API accepts and any row of floats (NaN, infinities, denormals, huge values)
 * must give a token of the vocabulary, never a crash or undefined behaviour; and the
 * choice from bounds (the logit screen's path), where it decides, must be the device
 * path's token, its draws the same (two steps, so a draw out of step shows).
 *
 * Input: eight bytes of parameters (vocabulary 1..300, temperature, top-k, top-p, penalty,
 * biases, ban, the bounds' width), then the row's floats, four bytes each, the input read
 * again from its start where it runs out. The host path is also held to the device path's
 * token where the row and biases are finite and the adjusted values cannot overflow
 * (sampler.h: the same token on the CPU backends for finite logits) and no ban applies. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "text/sampler.h"

static dg_backend *cpu(void) {
    static dg_backend *be;
    char err[128];
    if (!be && dg_backend_new("cpu", 1, &be, err, sizeof err) < 0) abort();
    return be;
}

typedef struct {
    const uint8_t *data;
    size_t         size, at;
} input;

static uint8_t byte(input *in) {
    if (!in->size) return 0;
    uint8_t b = in->data[in->at % in->size];
    in->at++;
    return b;
}

static float any_float(input *in) {
    uint32_t u = 0;
    for (int i = 0; i < 4; i++) u = u << 8 | byte(in);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void pick_row(void *user, const int32_t *ids, int n, float *out) {
    const float *row = user;
    for (int i = 0; i < n; i++) out[i] = row[ids[i]];
}

/* A disagreement: the case, for the crash's reader, then abort(). */
static void differ(const char *what, int V, const dg_sampler_params *p, int32_t ban, int step, int32_t a, int32_t b,
                   const float *row) {
    fprintf(stderr, "fuzz_sampler: %s differ at step %d: %d vs %d (V %d, T %g, top_k %d, top_p %g, penalty %g, "
            "%zu biases, ban %d)\n", what, step, a, b, V, p->temperature, p->top_k, p->top_p, p->repetition_penalty,
            p->n_logit_bias, ban);
    for (size_t i = 0; i < p->n_logit_bias; i++)
        fprintf(stderr, "  bias %d: %g\n", p->logit_bias[i].token, p->logit_bias[i].bias);
    for (int j = 0; j < V && j < 64; j++) fprintf(stderr, "  row[%d] = %a (%g)\n", j, row[j], row[j]);
    abort();
}

/* NULL where the API refuses the parameters, which it may do only with a reason (biases
 * that ban every token of the vocabulary: nothing could be written). */
static dg_sampler *make(int V, const dg_sampler_params *p) {
    dg_sampler *s;
    char err[160] = "";
    if (dg_sampler_new(V, p, &s, err, sizeof err) < 0) {
        if (!strstr(err, "is banned")) {   /* biases are in range: no other refusal is right */
            fprintf(stderr, "fuzz_sampler: refused: %s\n", err);
            abort();
        }
        return NULL;
    }
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const float temps[] = {0.0f, 0.1f, 0.7f, 1.3f, 1e-3f, 50.0f, -1.0f, 1e-30f};
    static const float top_ps[] = {1.0f, 0.05f, 0.5f, 0.9f, 0.999f, 0.0f, 1e-7f, 2.0f};
    static const float penalties[] = {1.0f, 1.3f, 0.7f, 0.0f};
    static const float widths[] = {0.0f, 1e-6f, 0.5f, 4.0f};
    input in = {data, size, 0};
    const int V = 1 + byte(&in) % 300;
    const uint8_t mode = byte(&in), k = byte(&in), pp = byte(&in), nb = byte(&in) % 4, ban_b = byte(&in),
                  wb = byte(&in), pen = byte(&in);
    dg_logit_bias bias[3];
    int finite = 1;
    for (int i = 0; i < nb; i++) {
        bias[i] = (dg_logit_bias){byte(&in) % V, any_float(&in)};
        finite &= isfinite(bias[i].bias) && fabsf(bias[i].bias) < 1e30f;
    }
    dg_sampler_params p = {.temperature = temps[mode % 8], .top_k = k % (V + 2), .top_p = top_ps[pp % 8],
                           .repetition_penalty = penalties[pen % 4], .logit_bias = bias, .n_logit_bias = nb,
                           .seed = mode};
    const int32_t ban = ban_b % 3 ? -1 : ban_b % V;
    dg_backend *be = cpu();
    float *row = malloc(sizeof(float) * (size_t)V), *host = malloc(sizeof(float) * (size_t)V),
          *lo = malloc(sizeof(float) * (size_t)V), *hi = malloc(sizeof(float) * (size_t)V),
          *scratch = malloc(sizeof(float) * (size_t)V);
    float *dev = be->alloc(be, sizeof(float) * (size_t)V);
    if (!row || !host || !lo || !hi || !scratch || !dev) abort();
    dg_sampler *h = make(V, &p), *d = h ? make(V, &p) : NULL, *b = d ? make(V, &p) : NULL;
    if (!b) goto out;   /* refused (found by `make fuzz`: a ban of the one token of V = 1 aborted here) */
    for (int i = 0; i < 3; i++) {   /* a prompt, for the penalty */
        int32_t t = byte(&in) % V;
        dg_sampler_accept(h, t);
        dg_sampler_accept(d, t);
        dg_sampler_accept(b, t);
    }
    for (int step = 0; step < 2; step++) {
        for (int j = 0; j < V; j++) {
            row[j] = any_float(&in);
            finite &= isfinite(row[j]) && fabsf(row[j]) < 1e30f;
        }
        /* the host path (no ban: it has none) and the device path on the CPU backend */
        memcpy(host, row, sizeof(float) * (size_t)V);
        const int32_t th = dg_sampler_sample(h, host);
        be->upload(be, dev, row, V);
        const int32_t td = dg_sampler_sample_device(d, be, dev, ban, scratch);
        if (th < 0 || th >= V || td < 0 || td >= V) abort();
        if (finite && ban < 0 && th != td) differ("host and device", V, &p, ban, step, th, td, row);
        /* from bounds around the row, widened outward so that they hold */
        const float w = widths[(wb >> (2 * step)) % 4];
        for (int j = 0; j < V; j++) {
            float r = w * (float)((j * 2654435761u) >> 28) / 16.0f;
            lo[j] = row[j] - r;
            hi[j] = row[j] + r;
            if (w > 0.0f) {
                lo[j] = nextafterf(lo[j], -INFINITY);
                hi[j] = nextafterf(hi[j], INFINITY);
            }
            if (!(lo[j] <= row[j])) lo[j] = isnan(row[j]) ? row[j] : -INFINITY;
            if (!(hi[j] >= row[j])) hi[j] = isnan(row[j]) ? row[j] : INFINITY;
        }
        int32_t tb = dg_sampler_sample_bounds(b, lo, hi, ban, pick_row, row);
        if (tb >= 0 && tb != td) differ("bounds and device", V, &p, ban, step, tb, td, row);
        if (tb < 0) {   /* undecided: nothing accepted or drawn; the whole row decides */
            be->upload(be, dev, row, V);
            tb = dg_sampler_sample_device(b, be, dev, ban, scratch);
            if (tb != td) differ("device after bounds and device", V, &p, ban, step, tb, td, row);
        }
    }
out:
    dg_sampler_free(h);
    dg_sampler_free(d);
    dg_sampler_free(b);
    be->release(be, dev);
    free(row);
    free(host);
    free(lo);
    free(hi);
    free(scratch);
    return 0;
}
