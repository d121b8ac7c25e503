/* qwen2.c — Qwen2.5-VL text decoder: weight binding and the forward pass. */
#include "mllm/qwen2.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"
#include "io/weights.h"

/* ---- binding ------------------------------------------------------------------------------ */

int dg_qwen2_load(dg_qwen2 *m, const dg_text_config *cfg, const dg_st *st, dg_backend *be,
                  char *err, size_t errlen) {
    const int64_t D = cfg->hidden_size, F = cfg->intermediate_size, V = cfg->vocab_size;
    const int64_t QD = (int64_t)cfg->n_heads * cfg->head_dim, KD = (int64_t)cfg->n_kv_heads * cfg->head_dim;
    const int64_t per_layer = 2 * D + QD + 2 * KD, n_vec = cfg->n_layers * per_layer + D;
    float *host = NULL;   /* owned: the vectors before upload */
    dg_binder b = {.st = st, .be = be, .err = err, .errlen = errlen};
    char prefix[64];
    int rc = DG_ENOMEM;

    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->be = be;
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    host = malloc(sizeof(float) * (size_t)n_vec);
    m->vectors = be->alloc(be, sizeof(float) * (size_t)n_vec);
    if (!m->layers || !host || !m->vectors) {
        snprintf(err, errlen, "qwen2: out of memory");
        goto fail;
    }
    /* norm weights and biases: widened to fp32 once into one buffer (tiny, read often) */
#define VEC(field, off, n, name)                                         \
    do {                                                                 \
        dg_bind_fp32_host(&b, host + (off), DG_SHAPE(n), name);          \
        field = m->vectors + (off);                                      \
    } while (0)
    dg_bind_matrix(&b, &m->embed, DG_SHAPE(V, D), "model.embed_tokens.weight");
    for (int l = 0; l < cfg->n_layers; l++) {
        dg_qwen2_layer *L = &m->layers[l];
        const int64_t o = l * per_layer;
        snprintf(prefix, sizeof prefix, "model.layers.%d.", l);
        b.prefix = prefix;
        VEC(L->input_norm, o, D, "input_layernorm.weight");
        VEC(L->post_norm, o + D, D, "post_attention_layernorm.weight");
        VEC(L->bq, o + 2 * D, QD, "self_attn.q_proj.bias");
        VEC(L->bk, o + 2 * D + QD, KD, "self_attn.k_proj.bias");
        VEC(L->bv, o + 2 * D + QD + KD, KD, "self_attn.v_proj.bias");
        dg_bind_matrix(&b, &L->wq, DG_SHAPE(QD, D), "self_attn.q_proj.weight");
        dg_bind_matrix(&b, &L->wk, DG_SHAPE(KD, D), "self_attn.k_proj.weight");
        dg_bind_matrix(&b, &L->wv, DG_SHAPE(KD, D), "self_attn.v_proj.weight");
        dg_bind_matrix(&b, &L->wo, DG_SHAPE(D, QD), "self_attn.o_proj.weight");
        dg_bind_matrix(&b, &L->w_gate, DG_SHAPE(F, D), "mlp.gate_proj.weight");
        dg_bind_matrix(&b, &L->w_up, DG_SHAPE(F, D), "mlp.up_proj.weight");
        dg_bind_matrix(&b, &L->w_down, DG_SHAPE(D, F), "mlp.down_proj.weight");
    }
    b.prefix = NULL;
    VEC(m->norm, cfg->n_layers * per_layer, D, "model.norm.weight");
#undef VEC
    /* tied: the published 3B and 0.5B files carry no lm_head.weight; one that is present
     * anyway (re-saved checkpoints) equals the embedding and is not needed */
    if (cfg->tie_word_embeddings)
        m->lm_head = m->embed;
    else
        dg_bind_matrix(&b, &m->lm_head, DG_SHAPE(V, D), "lm_head.weight");
    if ((rc = b.rc) < 0) goto fail;
    be->upload(be, m->vectors, host, n_vec);
    free(host);
    return 0;
fail:
    free(host);
    dg_qwen2_unload(m);
    return rc;
}

double dg_qwen2_decode_bytes(const dg_qwen2 *q) {
    const dg_weight *w[7];
    double b = (double)q->lm_head.rows * (double)q->lm_head.cols * (double)dg_dtype_size(q->lm_head.dtype);
    for (int l = 0; l < q->cfg.n_layers; l++) {
        const dg_qwen2_layer *y = &q->layers[l];
        w[0] = &y->wq, w[1] = &y->wk, w[2] = &y->wv, w[3] = &y->wo, w[4] = &y->w_gate, w[5] = &y->w_up,
        w[6] = &y->w_down;
        for (int i = 0; i < 7; i++) b += (double)w[i]->rows * (double)w[i]->cols * (double)dg_dtype_size(w[i]->dtype);
    }
    return b;
}

int dg_qwen2_screen(dg_qwen2 *m, int force, char *err, size_t errlen) {
    char e[256];
    int rc;
    if (m->screen || !m->be->screen_new || (!force && !m->be->screen_rows)) return 0;
    m->screen_rows = force ? INT_MAX : m->be->screen_rows;
    if ((rc = m->be->screen_new(m->be, &m->lm_head, &m->screen, e, sizeof e)) < 0)
        snprintf(err, errlen, "qwen2: %s (%s)", e, m->cfg.tie_word_embeddings ? "model.embed_tokens.weight as the tied lm_head" : "lm_head.weight");
    return rc;
}

void dg_qwen2_pick(const dg_qwen2 *m, dg_qwen2_state *s, int row, const int32_t *ids, int n, float *out) {
    s->be->matmul_pick(s->be, out, s->h + (int64_t)row * m->cfg.hidden_size, &m->lm_head, ids, n);
}

void dg_qwen2_logits_row(const dg_qwen2 *m, dg_qwen2_state *s, int row) {
    s->be->matmul(s->be, s->dev_logits + (int64_t)row * m->cfg.vocab_size, s->h + (int64_t)row * m->cfg.hidden_size,
                  &m->lm_head, NULL, 1);
}

void dg_qwen2_unload(dg_qwen2 *m) {
    if (m->be && m->screen) m->be->screen_free(m->be, m->screen);
    if (m->be) m->be->release(m->be, m->vectors);
    free(m->layers);
    memset(m, 0, sizeof *m);
}

/* ---- state -------------------------------------------------------------------------------- */

int dg_qwen2_state_new(const dg_qwen2 *m, dg_backend *be, int max_tokens, int max_logits,
                       dg_qwen2_state **out, char *err, size_t errlen) {
    const dg_text_config *c = &m->cfg;
    const size_t T = (size_t)max_tokens, D = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    const size_t QD = (size_t)c->n_heads * (size_t)c->head_dim, KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    const size_t VL = (size_t)c->vocab_size * (size_t)max_logits;
    dg_qwen2_state *s = calloc(1, sizeof *s);
    *out = NULL;
    if (max_tokens < 1 || max_logits < 0 || max_logits > max_tokens) {
        free(s);
        snprintf(err, errlen, "qwen2 state: max_tokens %d / max_logits %d out of range", max_tokens, max_logits);
        return DG_EINVAL;
    }
    if (!s) goto nomem;
    s->be = be;
    s->max_tokens = max_tokens;
    s->max_logits = max_logits;
    s->x = be->alloc(be, T * D * sizeof(float));
    s->h = be->alloc(be, T * D * sizeof(float));
    s->q = be->alloc(be, (T * QD > QD + 2 * KD ? T * QD : QD + 2 * KD) * sizeof(float));
    s->k = be->alloc(be, T * KD * sizeof(float));
    s->v = be->alloc(be, T * KD * sizeof(float));
    s->att = be->alloc(be, T * QD * sizeof(float));
    s->gate = be->alloc(be, T * F * sizeof(float));
    s->up = be->alloc(be, T * F * sizeof(float));
    s->dev_logits = be->alloc(be, (VL ? VL : 1) * sizeof(float));
    s->logits = malloc((VL ? VL : 1) * sizeof(float));
    if (m->screen) {   /* for the forwards that take it: at most screen_rows logits rows */
        const size_t BL = (size_t)c->vocab_size * (size_t)(max_logits < m->screen_rows ? max_logits : m->screen_rows);
        s->lo = malloc((BL ? BL : 1) * sizeof(float));
        s->hi = malloc((BL ? BL : 1) * sizeof(float));
        if (!s->lo || !s->hi) goto nomem;
    }
    s->pos = malloc(3 * T * sizeof(int32_t));
    s->ids = malloc(T * sizeof(int32_t));
    s->logit_rows = malloc(((size_t)max_logits + 1) * sizeof(int32_t));
    s->graphs = calloc(2 * (size_t)c->n_layers, sizeof *s->graphs);
    s->att_seqs = malloc(T * sizeof *s->att_seqs);
    if (!s->x || !s->h || !s->q || !s->k || !s->v || !s->att || !s->gate || !s->up ||
        !s->dev_logits || !s->logits || !s->pos || !s->ids || !s->logit_rows || !s->graphs || !s->att_seqs)
        goto nomem;
    *out = s;
    return 0;
nomem:
    dg_qwen2_state_free(m, s);
    snprintf(err, errlen, "qwen2 state: out of memory for %d tokens", max_tokens);
    return DG_ENOMEM;
}

void dg_qwen2_state_free(const dg_qwen2 *m, dg_qwen2_state *s) {
    if (!s) return;
    dg_backend *be = s->be;
    float *bufs[] = {s->x, s->h, s->q, s->k, s->v, s->att, s->gate, s->up, s->dev_logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->release(be, bufs[i]);
    for (int i = 0; s->graphs && be->graph_release && i < 2 * m->cfg.n_layers; i++) be->graph_release(be, s->graphs[i]);
    free(s->graphs);
    free(s->logits);
    free(s->lo);
    free(s->hi);
    free(s->pos);
    free(s->ids);
    free(s->logit_rows);
    free(s->att_seqs);
    free(s);
}

/* ---- forward ------------------------------------------------------------------------------ */

/* The runs of a layer that are the same at every token (pointers, sizes, no staged host
 * array), as functions of their arguments, so that a GPU backend can record one token's
 * and replay them (backend.h graph_run): the input norm and q, k, v; and everything after
 * the attention (output projection, residual, norm, MLP, residual). */
typedef struct {
    const dg_qwen2 *m;
    const dg_qwen2_layer *L;
    dg_qwen2_state *s;
    const dg_matmul_part *qkv;
    int n;
} layer_run;

static void run_qkv(void *ctx) {
    const layer_run *r = ctx;
    const dg_text_config *c = &r->m->cfg;
    dg_backend *be = r->s->be;
    be->rmsnorm(be, r->s->h, r->s->x, r->L->input_norm, r->n, c->hidden_size, c->rms_norm_eps);
    dg_matmul_parts(be, r->s->h, r->qkv, 3, r->n);
}

static void run_after_attention(void *ctx) {
    const layer_run *r = ctx;
    const dg_text_config *c = &r->m->cfg;
    dg_qwen2_state *s = r->s;
    dg_backend *be = s->be;
    const int n = r->n, D = c->hidden_size;
    be->matmul(be, s->h, s->att, &r->L->wo, NULL, n);
    dg_add_rmsnorm(be, s->h, s->x, s->h, r->L->post_norm, n, D, c->rms_norm_eps);
    dg_matmul_swiglu(be, s->gate, s->up, s->h, &r->L->w_gate, &r->L->w_up, n);
    be->matmul(be, s->h, s->gate, &r->L->w_down, NULL, n);
    be->add(be, s->x, s->h, (int64_t)n * D);
}

/* One decoder layer over the n stacked rows of the batch's sequences, in place on
 * s->x [n, D] (spec §3.1): norms and every weight over all rows at once, K/V written and
 * attention read per sequence, in its own blocks (one attention_batch call for all). */
static void layer_forward(const dg_qwen2 *m, int l, dg_qwen2_state *s, const dg_kv_cache *kv,
                          const dg_qwen2_batch_seq *seqs, int n_seqs, int n) {
    const dg_text_config *c = &m->cfg;
    const dg_qwen2_layer *L = &m->layers[l];
    dg_backend *be = s->be;
    const int hd = c->head_dim, QD = c->n_heads * hd, KD = c->n_kv_heads * hd;
    const dg_rope_params rope = {c->rope_theta, {c->mrope_section[0], c->mrope_section[1],
                                                 c->mrope_section[2]}};

    /* one row (a decode step alone): q, k, v as one row [q | k | v] in s->q, so that one
     * RoPE call rotates the heads of q and k together; the fused forms save a GPU four
     * launches a layer (the step is ~300 small launches otherwise), and the fixed runs
     * around the per-token operations (RoPE positions, the KV slot, the attention's length)
     * may be replayed rather than launched */
    const int one = n == 1;
    float *q = s->q, *k = one ? s->q + QD : s->k, *v = one ? k + KD : s->v;
    const dg_matmul_part qkv[3] = {{q, &L->wq, L->bq}, {k, &L->wk, L->bk}, {v, &L->wv, L->bv}};
    layer_run r = {m, L, s, qkv, n};

    dg_graph_run(be, one ? &s->graphs[2 * l] : NULL, run_qkv, &r);
    if (one) {
        be->rope(be, q, s->pos, 1, c->n_heads + c->n_kv_heads, hd, &rope);
    } else {
        be->rope(be, q, s->pos, n, c->n_heads, hd, &rope);
        be->rope(be, k, s->pos, n, c->n_kv_heads, hd, &rope);
    }
    for (int i = 0; i < n_seqs; i++)
        s->att_seqs[i] = (dg_attn_seq){dg_kv_cache_layer(kv, seqs[i].seq, l), seqs[i].seq->n_tokens, seqs[i].in.n};
    dg_attention_batch(be, s->att, q, k, v, s->att_seqs, n_seqs, c->n_heads, c->n_kv_heads, hd,
                       1.0f / sqrtf((float)hd));
    dg_graph_run(be, one ? &s->graphs[2 * l + 1] : NULL, run_after_attention, &r);
}

/* The x rows x0.. of the <|image_pad|> tokens <- image_embeds rows, in order (masked_scatter). */
static void insert_image_rows(const dg_qwen2 *m, dg_qwen2_state *s, float *x0, const dg_qwen2_input *in) {
    const int D = m->cfg.hidden_size, image = m->cfg.image_token_id;
    int32_t idx[64];   /* embedding rows of one run of image tokens, 64 at a time */
    for (int i = 0, e = 0; i < in->n;) {
        int run = 0;
        while (i + run < in->n && run < 64 && in->ids[i + run] == image) {
            idx[run] = e + run;
            run++;
        }
        if (run) s->be->gather_rows(s->be, x0 + (int64_t)i * D, in->image_embeds, idx, run, D);
        i += run ? run : 1;
        e += run;
    }
}

/* The batch's sizes and token ids against the state and the vocabulary; then its ids and
 * positions stacked into s->ids and s->pos [3, n] (text: n_past + i + rope_delta), and the
 * rows whose logits are asked for into s->logit_rows. *n_rows, *n_logits: the totals. */
static int batch_stack(const dg_qwen2 *m, dg_qwen2_state *s, dg_qwen2_batch_seq *seqs, int n_seqs, int *n_rows,
                       int *n_logits, char *err, size_t errlen) {
    const dg_text_config *c = &m->cfg;
    int n = 0, nl = 0;
    for (int i = 0; i < n_seqs; i++) {
        const dg_qwen2_input *in = &seqs[i].in;
        if (in->n < 1 || in->n_logits < 0 || in->n_logits > in->n || n + in->n > s->max_tokens ||
            nl + in->n_logits > s->max_logits) {
            snprintf(err, errlen, "qwen2: %d tokens / %d logits after %d / %d for a state of %d / %d", in->n,
                     in->n_logits, n, nl, s->max_tokens, s->max_logits);
            return DG_EINVAL;
        }
        for (int j = 0; j < in->n; j++)
            if (in->ids[j] < 0 || in->ids[j] >= c->vocab_size) {
                snprintf(err, errlen, "qwen2: token %d at %d is outside the vocabulary of %d", in->ids[j], j,
                         c->vocab_size);
                return DG_EINVAL;
            }
        n += in->n;
        nl += in->n_logits;
    }
    if (n_seqs < 1) {
        snprintf(err, errlen, "qwen2: a batch of no sequences");
        return DG_EINVAL;
    }
    for (int i = 0, row = 0, lr = 0; i < n_seqs; row += seqs[i].in.n, i++) {
        const dg_qwen2_input *in = &seqs[i].in;
        const int n_past = seqs[i].seq->n_tokens;
        memcpy(s->ids + row, in->ids, (size_t)in->n * sizeof *in->ids);
        for (int r = 0; r < 3; r++)
            for (int j = 0; j < in->n; j++)
                s->pos[r * n + row + j] = in->pos ? in->pos[r * in->n + j] : n_past + j + in->rope_delta;
        seqs[i].logits_row = lr;
        for (int j = in->n - in->n_logits; j < in->n; j++) s->logit_rows[lr++] = row + j;
    }
    *n_rows = n;
    *n_logits = nl;
    return 0;
}

int dg_qwen2_forward(const dg_qwen2 *m, dg_qwen2_state *s, dg_kv_cache *kv, dg_kv_seq *seq,
                     const dg_qwen2_input *in, const dg_qwen2_hook *hook, char *err,
                     size_t errlen) {
    dg_qwen2_batch_seq one = {.seq = seq, .in = *in, .hook = hook};
    return dg_qwen2_forward_batch(m, s, kv, &one, 1, err, errlen);
}

int dg_qwen2_forward_batch(const dg_qwen2 *m, dg_qwen2_state *s, dg_kv_cache *kv,
                           dg_qwen2_batch_seq *seqs, int n_seqs, char *err, size_t errlen) {
    const dg_text_config *c = &m->cfg;
    dg_backend *be = s->be;
    const int D = c->hidden_size;
    int n, n_logits, rc, download = 0;

    if ((rc = batch_stack(m, s, seqs, n_seqs, &n, &n_logits, err, errlen)) < 0) return rc;
    for (int i = 0; i < n_seqs; i++) {
        if ((rc = dg_kv_seq_reserve(kv, seqs[i].seq, seqs[i].in.n)) < 0) {
            snprintf(err, errlen, "qwen2: no KV room for %d more tokens after %d (%s; sequence %d of the batch)",
                     seqs[i].in.n, seqs[i].seq->n_tokens, rc == DG_ELIMIT ? "sequence limit" : "cache full", i);
            return rc;
        }
        download |= seqs[i].in.n_logits > 0 && !seqs[i].in.logits_on_device;
    }

    be->embed(be, s->x, &m->embed, s->ids, n);
    for (int i = 0, row = 0; i < n_seqs; row += seqs[i].in.n, i++)
        if (seqs[i].in.image_embeds) insert_image_rows(m, s, s->x + (int64_t)row * D, &seqs[i].in);
    for (int l = 0; l < c->n_layers; l++) {
        layer_forward(m, l, s, kv, seqs, n_seqs, n);
        for (int i = 0, row = 0; i < n_seqs; row += seqs[i].in.n, i++)
            if (seqs[i].hook && seqs[i].hook->fn)
                seqs[i].hook->fn(seqs[i].hook->user, l, s->x + (int64_t)row * D, seqs[i].in.n, seqs[i].seq->n_tokens);
    }
    s->bounded = 0;
    if (n_logits > 0) {
        int bounds = m->screen && s->lo && n_logits <= m->screen_rows;   /* and every sequence with logits asks */
        for (int i = 0; i < n_seqs; i++) bounds &= !seqs[i].in.n_logits || seqs[i].in.bounds;
        be->gather_rows(be, s->h, s->x, s->logit_rows, n_logits, D);
        be->rmsnorm(be, s->h, s->h, m->norm, n_logits, D, c->rms_norm_eps);
        if (bounds) {
            be->matmul_bounds(be, s->lo, s->hi, s->h, m->screen, n_logits);
            s->bounded = 1;
        } else {
            be->matmul(be, s->dev_logits, s->h, &m->lm_head, NULL, n_logits);
            if (download) be->download(be, s->logits, s->dev_logits, (int64_t)n_logits * c->vocab_size);
        }
    }
    for (int i = 0; i < n_seqs; i++)
        if (!seqs[i].in.no_commit) dg_kv_seq_commit(kv, seqs[i].seq, seqs[i].in.ids, seqs[i].in.token_keys, seqs[i].in.n);
    return 0;
}
