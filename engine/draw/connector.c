/* connector.c — the connector's weights and the condition accumulator. */
#include "draw/connector.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"

int dg_connector_bind(dg_connector *c, const dg_st *st, const int *layers, int n_layers, int hidden,
                      dg_backend *be, char *err, size_t errlen) {
    const dg_st_tensor *w;
    int rc;
    memset(c, 0, sizeof *c);
    c->be = be;
    if (n_layers < 1 || n_layers > DG_CONNECTOR_MAX_LAYERS || hidden < 1) {
        snprintf(err, errlen, "connector: %d condition layers of width %d", n_layers, hidden);
        return DG_EMODEL;
    }
    /* d_cond is the checkpoint's: the DiT's text_embed_dim is checked against it (model.c) */
    const dg_st_tensor *probe = dg_st_find(st, "crossattn_proj.0.weight");
    const int64_t d_cond = probe && probe->n_dims == 2 ? probe->shape[0] : 0;
    dg_binder b = {.st = st, .be = be, .owned = &c->owned, .err = err, .errlen = errlen};
    dg_bind_find(&b, DG_SHAPE(d_cond, (int64_t)n_layers * hidden), &w, "crossattn_proj.0.weight");
    dg_bind_fp32(&b, &c->bias, DG_SHAPE(d_cond), "crossattn_proj.0.bias");
    if ((rc = b.rc) < 0) goto fail;
    c->n_layers = n_layers;
    c->hidden = hidden;
    c->d_cond = (int)d_cond;
    /* the column block of each layer, made contiguous in the stored dtype */
    const size_t es = dg_dtype_size(w->dtype), row = (size_t)hidden * es;
    if (!(c->slices = malloc((size_t)d_cond * n_layers * row))) {
        rc = DG_ENOMEM;
        snprintf(err, errlen, "connector: out of memory");
        goto fail;
    }
    /* in the blocked layout where the backend reads that (backend.h) */
    const int64_t kb = dg_weight_kb_for(be, w->dtype, hidden);
    for (int k = 0; k < n_layers; k++) {
        const dg_weight to = {(char *)c->slices + (size_t)k * d_cond * row, w->dtype, d_cond, hidden, kb};
        for (int64_t r = 0; r < d_cond; r++)
            for (int64_t c0 = 0; c0 < hidden; c0 += DG_WEIGHT_KB)
                memcpy((void *)dg_weight_at(&to, r, c0),
                       (const char *)w->data + ((size_t)r * n_layers + k) * row + (size_t)c0 * es,
                       (size_t)(hidden - c0 < DG_WEIGHT_KB ? hidden - c0 : DG_WEIGHT_KB) * es);
        c->layer_of[k] = layers[k];
        c->slice[k] = to;
        if ((rc = be->weight_prepare(be, &c->slice[k], err, errlen)) < 0) goto fail;
    }
    return 0;
fail:
    dg_connector_unload(c);
    return rc;
}

int dg_connector_load(dg_connector *c, const char *path, const int *layers, int n_layers,
                      int hidden, dg_backend *be, char *err, size_t errlen) {
    dg_st *st = NULL;
    int rc = dg_st_open(path, &st, err, errlen);
    if (rc < 0) {
        memset(c, 0, sizeof *c);
        return rc;
    }
    rc = dg_connector_bind(c, st, layers, n_layers, hidden, be, err, errlen);
    dg_st_close(st);
    return rc;
}

void dg_connector_unload(dg_connector *c) {
    dg_buffer_list_release(&c->owned);
    free(c->slices);
    memset(c, 0, sizeof *c);
}

int dg_cond_acc_new(const dg_connector *c, dg_backend *be, int max_positions, int max_chunk,
                    dg_cond_acc **out, char *err, size_t errlen) {
    dg_cond_acc *a;
    const size_t P = (size_t)max_positions, K = (size_t)max_chunk, sf = sizeof(float);
    *out = NULL;
    if (max_positions < 1 || max_chunk < 1) {
        snprintf(err, errlen, "condition accumulator: %d positions, chunks of %d", max_positions, max_chunk);
        return DG_EINVAL;
    }
    if (!(a = calloc(1, sizeof *a))) goto nomem;
    a->be = be;
    a->max_positions = max_positions;
    a->max_chunk = max_chunk;
    if (!(a->acc = be->alloc(be, P * c->d_cond * sf)) || !(a->ctx = be->alloc(be, P * c->d_cond * sf)) ||
        !(a->normed = be->alloc(be, K * c->hidden * sf)) || !(a->share = be->alloc(be, K * c->d_cond * sf)) ||
        !(a->seen = calloc(P, 1)))
        goto nomem;
    *out = a;
    return 0;
nomem:
    dg_cond_acc_free(c, a);
    snprintf(err, errlen, "condition accumulator: out of memory for %d positions", max_positions);
    return DG_ENOMEM;
}

void dg_cond_acc_free(const dg_connector *c, dg_cond_acc *a) {
    if (!a) return;
    a->be->release(a->be, a->acc);
    a->be->release(a->be, a->ctx);
    a->be->release(a->be, a->normed);
    a->be->release(a->be, a->share);
    free(a->seen);
    free(a);
}

void dg_cond_acc_reset(const dg_connector *c, dg_cond_acc *a) { dg_cond_acc_truncate(c, a, 0); }

void dg_cond_acc_truncate(const dg_connector *c, dg_cond_acc *a, int n_positions) {
    (void)c;
    if (n_positions < 0) n_positions = 0;
    if (n_positions < a->max_positions) memset(a->seen + n_positions, 0, (size_t)(a->max_positions - n_positions));
}

int dg_cond_acc_add(const dg_connector *c, dg_cond_acc *a, int layer, const float *hidden, int n,
                    int pos0) {
    dg_backend *be = a->be;
    int k = 0;
    while (k < c->n_layers && c->layer_of[k] != layer) k++;
    if (k == c->n_layers) return 0;
    if (pos0 < 0 || n < 0 || pos0 + n > a->max_positions) return DG_ELIMIT;
    for (int i = 1; i < n; i++)
        if (a->seen[pos0 + i] != a->seen[pos0]) return DG_EINVAL;
    for (int i0 = 0; i0 < n; i0 += a->max_chunk) {
        const int m = n - i0 < a->max_chunk ? n - i0 : a->max_chunk, p = pos0 + i0;
        float *dst = a->acc + (int64_t)p * c->d_cond;
        be->standardize(be, a->normed, hidden + (int64_t)i0 * c->hidden, m, c->hidden, DG_CONNECTOR_EPS);
        /* the first layer a position receives initialises its row: no separate clear */
        if (a->seen[p] == 0) {
            be->matmul(be, dst, a->normed, &c->slice[k], NULL, m);
        } else {
            be->matmul(be, a->share, a->normed, &c->slice[k], NULL, m);
            be->add(be, dst, a->share, (int64_t)m * c->d_cond);
        }
        for (int i = 0; i < m; i++) a->seen[p + i]++;
    }
    return 0;
}

int dg_cond_acc_finish(const dg_connector *c, dg_cond_acc *a, const int32_t *positions, int n,
                       float *ctx, char *err, size_t errlen) {
    dg_backend *be = a->be;
    if (n < 1 || n > a->max_positions) {
        snprintf(err, errlen, "connector: %d positions (1 .. %d)", n, a->max_positions);
        return DG_EINVAL;
    }
    for (int i = 0; i < n; i++)
        if (positions[i] < 0 || positions[i] >= a->max_positions || a->seen[positions[i]] != c->n_layers) {
            snprintf(err, errlen, "connector: position %d has %d of %d condition layers", positions[i],
                     positions[i] >= 0 && positions[i] < a->max_positions ? a->seen[positions[i]] : 0,
                     c->n_layers);
            return DG_EINVAL;
        }
    be->gather_rows(be, a->ctx, a->acc, positions, n, c->d_cond);
    for (int i = 0; i < n; i++) be->add(be, a->ctx + (int64_t)i * c->d_cond, c->bias, c->d_cond);
    be->gelu(be, a->ctx, a->ctx, (int64_t)n * c->d_cond);
    be->download(be, ctx, a->ctx, (int64_t)n * c->d_cond);
    return 0;
}
