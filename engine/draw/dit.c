/* dit.c — Cosmos-Predict2.5 DiT: binding (diffusers names) and the packed forward pass. */
#include "draw/dit.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"
#include "io/json_config.h"

#define LN_EPS 1e-6f       /* CosmosAdaLayerNorm(Zero): nn.LayerNorm(eps=1e-6), no affine */
#define T_NORM_EPS 1e-6f   /* time_embed.norm: RMSNorm(eps=1e-6) */
#define QK_EPS 1e-5f       /* diffusers Attention(qk_norm="rms_norm") default eps (spec §9.3) */

/* ---- binding ------------------------------------------------------------------------------ */

static int json_triple(json_t *j, const char *key, const char *path, float *out, char *err,
                       size_t errlen) {
    int n;
    int rc = dg_json_floats(j, key, out, 3, &n, path, err, errlen);
    if (rc == 0 && n != 3) {
        snprintf(err, errlen, "%s: \"%s\" must have 3 values", path, key);
        return DG_EMODEL;
    }
    return rc;
}

/* Keys that select a Cosmos variant this forward does not have (Cosmos-Predict2.5 has none):
 * null or 0 in its published config, and read nowhere else. img_context_num_tokens and
 * img_context_dim_out only size the image-context projection that img_context_dim_in
 * turns on, so any value is accepted with it off. A key the file leaves out takes
 * CosmosTransformer3DModel's default (diffusers transformer_cosmos.py __init__):
 * img_context_dim_in and controlnet_block_every_n None, concat_padding_mask True, but
 * extra_pos_embed_type "learnable" (an absolute position embedding added in every block),
 * so a file without that key is refused; the published files say null. */
static int check_variant(json_t *j, const char *path, char *err, size_t errlen) {
    static const char *must_be_null[] = {"extra_pos_embed_type", "img_context_dim_in",
                                         "controlnet_block_every_n"};
    if (!json_object_get(j, "extra_pos_embed_type")) {
        snprintf(err, errlen, "%s: \"extra_pos_embed_type\" is missing: diffusers then adds its default \"learnable\" "
                 "position embedding, which this DiT does not have (Cosmos-Predict2.5 says null)", path);
        return DG_EMODEL;
    }
    for (size_t i = 0; i < sizeof must_be_null / sizeof *must_be_null; i++) {
        json_t *v = json_object_get(j, must_be_null[i]);
        if (v && !json_is_null(v) && !(json_is_integer(v) && json_integer_value(v) == 0)) {
            snprintf(err, errlen, "%s: \"%s\" is not supported (Cosmos-Predict2.5 has none)", path,
                     must_be_null[i]);
            return DG_EMODEL;
        }
    }
    json_t *v = json_object_get(j, "concat_padding_mask");
    if (v && !json_is_true(v)) {
        snprintf(err, errlen, "%s: \"concat_padding_mask\" must be true", path);
        return DG_EMODEL;
    }
    return 0;
}

/* use_crossattn_projection: the checkpoint carries crossattn_proj (Linear + GELU) from
 * crossattn_proj_in_channels to encoder_hidden_states_channels, which must be the blocks'
 * cross-attention width (text_embed_dim). */
static int read_projection(dg_dit_config *c, json_t *j, const char *path, char *err, size_t errlen) {
    json_t *v = json_object_get(j, "use_crossattn_projection");
    int rc, out_ch;
    if (v && !json_is_boolean(v)) {
        snprintf(err, errlen, "%s: \"use_crossattn_projection\" must be true or false", path);
        return DG_EMODEL;
    }
    c->proj_in = 0;
    if (!json_is_true(v)) return 0;
    if ((rc = dg_json_int(j, "crossattn_proj_in_channels", 0, 1, &c->proj_in, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "encoder_hidden_states_channels", 0, 1, &out_ch, path, err, errlen)) < 0)
        return rc;
    if (out_ch != c->text_dim || c->proj_in < 1) {
        snprintf(err, errlen, "%s: crossattn_proj gives encoder_hidden_states_channels %d, the blocks take "
                 "text_embed_dim %d", path, out_ch, c->text_dim);
        return DG_EMODEL;
    }
    return 0;
}

static int read_config(dg_dit_config *c, const char *path, char *err, size_t errlen) {
    json_error_t je;
    json_t *j;
    float ratio, patch[3], max_size[3];
    int in_ch, rc = dg_json_load_file(path, 0, &j, &je);
    if (rc) {
        snprintf(err, errlen, "%s: %s", path, rc == DG_ENOMEM ? "out of memory reading it" : je.text);
        return rc;
    }
    memset(c, 0, sizeof *c);
    if ((rc = dg_json_name(j, "_class_name", "CosmosTransformer3DModel", path, err, errlen)) < 0 ||
        (rc = check_variant(j, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "in_channels", 0, 1, &in_ch, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "out_channels", 0, 1, &c->out_channels, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "num_attention_heads", 0, 1, &c->n_heads, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "attention_head_dim", 0, 1, &c->head_dim, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "num_layers", 0, 1, &c->n_layers, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "text_embed_dim", 0, 1, &c->text_dim, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "adaln_lora_dim", 0, 1, &c->lora_dim, path, err, errlen)) < 0 ||
        (rc = dg_json_float(j, "mlp_ratio", 4.0, &ratio, path, err, errlen)) < 0 ||
        (rc = json_triple(j, "patch_size", path, patch, err, errlen)) < 0 ||
        (rc = json_triple(j, "max_size", path, max_size, err, errlen)) < 0 ||
        (rc = json_triple(j, "rope_scale", path, c->rope_scale, err, errlen)) < 0 ||
        (rc = read_projection(c, j, path, err, errlen)) < 0)
        goto out;
    rc = DG_EMODEL;
    /* the patch sizes are checked before anything is divided by them */
    for (int i = 0; i < 3; i++)
        if (!(patch[i] >= 1.0f && patch[i] <= 64.0f) || patch[i] != (float)(int)patch[i] || !(max_size[i] >= 0.0f) ||
            max_size[i] > 1e6f) {
            snprintf(err, errlen, "%s: patch_size [%g, %g, %g] / max_size [%g, %g, %g]: whole numbers, patches 1..64",
                     path, patch[0], patch[1], patch[2], max_size[0], max_size[1], max_size[2]);
            goto out;
        }
    /* the RoPE's NTK factors, pow(rope_scale, d / (d - 2)) times its theta: 0 or below gave
     * infinite or NaN frequencies, and every picture came out black with the job "done" */
    for (int i = 0; i < 3; i++)
        if (!(c->rope_scale[i] > 0.0f && c->rope_scale[i] <= 1e6f)) {
            snprintf(err, errlen, "%s: rope_scale [%g, %g, %g]: each must be above 0 (at most 1e6)", path,
                     c->rope_scale[0], c->rope_scale[1], c->rope_scale[2]);
            goto out;
        }
    /* counts and widths bounded before they are multiplied (a head count that wrapped the
     * product to the checkpoint's width loaded, and the first step read past its arrays) */
    static const int most = 1 << 16;
    const struct { const char *key; int v; } sizes[] = {{"num_attention_heads", c->n_heads}, {"num_layers", c->n_layers},
                                                       {"text_embed_dim", c->text_dim}, {"adaln_lora_dim", c->lora_dim}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i].v < 1 || sizes[i].v > most) {
            snprintf(err, errlen, "%s: \"%s\" %d must be 1 .. %d", path, sizes[i].key, sizes[i].v, most);
            goto out;
        }
    if ((int64_t)c->n_heads * c->head_dim > most || !(ratio > 0.0f && ratio <= 64.0f)) {
        snprintf(err, errlen, "%s: num_attention_heads %d x attention_head_dim %d (at most %d) / mlp_ratio %g (0 .. 64)",
                 path, c->n_heads, c->head_dim, most, ratio);
        goto out;
    }
    c->latent_channels = in_ch - 1;   /* in_channels counts the condition mask */
    c->hidden = c->n_heads * c->head_dim;
    c->mlp_hidden = (int)(c->hidden * ratio);
    c->patch_h = (int)patch[1];
    c->patch_w = (int)patch[2];
    c->max_t = (int)max_size[0] / (int)patch[0];
    c->max_h = (int)max_size[1] / c->patch_h;
    c->max_w = (int)max_size[2] / c->patch_w;
    if (patch[0] != 1.0f || c->latent_channels < 1 || c->head_dim < 16 || c->head_dim > 512 || c->head_dim % 2 ||
        c->hidden < 1 || c->mlp_hidden < 1 || c->out_channels < 1) {
        snprintf(err, errlen, "%s: unsupported shape (patch_size, in_channels, attention_head_dim)", path);
        goto out;
    }
    /* no published DiT has non-square patches, and the painter sizes pictures and condition
     * frames by one patch side (painter.c: dg_painter_check, cond_size): refused here */
    if (c->patch_h != c->patch_w) {
        snprintf(err, errlen, "%s: patch_size [%g, %g, %g]: patches must be square (patch_size[1] == patch_size[2])",
                 path, patch[0], patch[1], patch[2]);
        goto out;
    }
    /* the network predicts the latent's velocity: as many channels as the latent has */
    if (c->out_channels != c->latent_channels) {
        snprintf(err, errlen, "%s: out_channels %d must be in_channels - 1 = %d (the latent's channels; in_channels "
                 "counts the condition mask too)", path, c->out_channels, c->latent_channels);
        goto out;
    }
    rc = 0;
out:
    json_decref(j);
    return rc;
}

int dg_dit_load(dg_dit *m, const char *dir, dg_backend *be, char *err, size_t errlen) {
    char path[4096], prefix[64];
    int rc;
    memset(m, 0, sizeof *m);
    m->be = be;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if ((rc = read_config(&m->cfg, path, err, errlen)) < 0) goto fail;
    if ((rc = dg_st_open_flags(dir, be->weights_hugepages ? DG_ST_HUGEPAGES : 0, NULL, NULL, &m->st, err, errlen)) < 0) goto fail;
    const dg_dit_config *c = &m->cfg;
    const int64_t D = c->hidden, F = c->mlp_hidden, hd = c->head_dim, R = c->lora_dim;
    const int64_t pp = (int64_t)c->patch_h * c->patch_w, X = c->text_dim;
    if (!(m->blocks = calloc((size_t)c->n_layers, sizeof *m->blocks))) {
        rc = DG_ENOMEM;
        snprintf(err, errlen, "dit: out of memory");
        goto fail;
    }
    /* the panel layout where the backend reads it: only the matmul reads these matrices */
    dg_binder b = {.st = m->st, .be = be, .owned = &m->owned, .panels = 1, .err = err, .errlen = errlen};
    dg_bind_matrix(&b, &m->patch, DG_SHAPE(D, (c->latent_channels + 2) * pp), "patch_embed.proj.weight");
    dg_bind_matrix(&b, &m->t1, DG_SHAPE(D, D), "time_embed.t_embedder.linear_1.weight");
    dg_bind_matrix(&b, &m->t2, DG_SHAPE(3 * D, D), "time_embed.t_embedder.linear_2.weight");
    dg_bind_fp32(&b, &m->t_norm, DG_SHAPE(D), "time_embed.norm.weight");
    for (int l = 0; l < c->n_layers; l++) {
        dg_dit_block *B = &m->blocks[l];
        snprintf(prefix, sizeof prefix, "transformer_blocks.%d.", l);
        b.prefix = prefix;
        dg_bind_matrix(&b, &B->wq, DG_SHAPE(D, D), "attn1.to_q.weight");
        dg_bind_matrix(&b, &B->wk, DG_SHAPE(D, D), "attn1.to_k.weight");
        dg_bind_matrix(&b, &B->wv, DG_SHAPE(D, D), "attn1.to_v.weight");
        dg_bind_matrix(&b, &B->wo, DG_SHAPE(D, D), "attn1.to_out.0.weight");
        dg_bind_fp32(&b, &B->q_norm, DG_SHAPE(hd), "attn1.norm_q.weight");
        dg_bind_fp32(&b, &B->k_norm, DG_SHAPE(hd), "attn1.norm_k.weight");
        dg_bind_matrix(&b, &B->cq, DG_SHAPE(D, D), "attn2.to_q.weight");
        dg_bind_matrix(&b, &B->ck, DG_SHAPE(D, X), "attn2.to_k.weight");
        dg_bind_matrix(&b, &B->cv, DG_SHAPE(D, X), "attn2.to_v.weight");
        dg_bind_matrix(&b, &B->co, DG_SHAPE(D, D), "attn2.to_out.0.weight");
        dg_bind_fp32(&b, &B->cq_norm, DG_SHAPE(hd), "attn2.norm_q.weight");
        dg_bind_fp32(&b, &B->ck_norm, DG_SHAPE(hd), "attn2.norm_k.weight");
        dg_bind_matrix(&b, &B->ff1, DG_SHAPE(F, D), "ff.net.0.proj.weight");
        dg_bind_matrix(&b, &B->ff2, DG_SHAPE(D, F), "ff.net.2.weight");
        for (int k = 0; k < 3; k++) {
            dg_bind_matrix(&b, &B->mod1[k], DG_SHAPE(R, D), "norm%d.linear_1.weight", k + 1);
            dg_bind_matrix(&b, &B->mod2[k], DG_SHAPE(3 * D, R), "norm%d.linear_2.weight", k + 1);
        }
    }
    b.prefix = NULL;
    dg_bind_matrix(&b, &m->out1, DG_SHAPE(R, D), "norm_out.linear_1.weight");
    dg_bind_matrix(&b, &m->out2, DG_SHAPE(2 * D, R), "norm_out.linear_2.weight");
    dg_bind_matrix(&b, &m->proj_out, DG_SHAPE(pp * c->out_channels, D), "proj_out.weight");
    /* crossattn_proj (use_crossattn_projection) is the connector's first Linear: the
     * connector binds it from m->st (connector.h); here only its presence and shape */
    if (c->proj_in) {
        const dg_st_tensor *t;
        dg_bind_find(&b, DG_SHAPE(X, c->proj_in), &t, "crossattn_proj.0.weight");
        dg_bind_find(&b, DG_SHAPE(X), &t, "crossattn_proj.0.bias");
    } else if (dg_bind_has(&b, "crossattn_proj.0.weight")) {
        snprintf(err, errlen, "%s/config.json: use_crossattn_projection is false, yet the checkpoint "
                 "has crossattn_proj.0.weight", dir);
        rc = DG_EMODEL;
        goto fail;
    }
    if ((rc = b.rc) < 0) goto fail;
    return 0;
fail:
    dg_dit_unload(m);
    return rc;
}

void dg_dit_unload(dg_dit *m) {
    dg_buffer_list_release(&m->owned);
    dg_st_close(m->st);
    free(m->blocks);
    memset(m, 0, sizeof *m);
}

/* ---- state -------------------------------------------------------------------------------- */

int dg_dit_state_new(const dg_dit *m, dg_backend *be, int max_tokens, int max_ctx, dg_dit_state **out,
                     char *err, size_t errlen) {
    const dg_dit_config *c = &m->cfg;
    const size_t T = (size_t)max_tokens, D = (size_t)c->hidden, F = (size_t)c->mlp_hidden;
    const size_t pp = (size_t)c->patch_h * c->patch_w, in_dim = (c->latent_channels + 2) * pp;
    const size_t out_dim = pp * c->out_channels, half = (size_t)c->head_dim / 2;
    /* frame rows (time embedding, modulation): a frame has at least one token */
    const size_t FR = (size_t)max_tokens < (size_t)DG_DIT_MAX_FRAMES * DG_DIT_MAX_BATCH
                          ? (size_t)max_tokens : (size_t)DG_DIT_MAX_FRAMES * DG_DIT_MAX_BATCH;
    const size_t X = (size_t)max_ctx, sf = sizeof(float);
    dg_dit_state *s;
    *out = NULL;
    if (max_tokens < 1 || max_ctx < 1) {
        snprintf(err, errlen, "dit state: %d tokens, %d context rows", max_tokens, max_ctx);
        return DG_EINVAL;
    }
    if (!(s = calloc(1, sizeof *s))) goto nomem;
    s->be = be;
    s->max_tokens = max_tokens;
    s->max_ctx = max_ctx;
    float **dev[] = {&s->x, &s->h, &s->q, &s->k, &s->v, &s->att, &s->ff, &s->ctx, &s->ck, &s->cv,
                     &s->tok, &s->out, &s->cos, &s->sin, &s->sinus, &s->temb, &s->emb, &s->lora, &s->mod};
    const size_t dev_n[] = {T * D, T * D, T * D, T * D, T * D, T * D, T * F, X * c->text_dim, X * D,
                            X * D, T * in_dim, T * out_dim, T * half, T * half, FR * D, FR * 3 * D,
                            FR * D, FR * c->lora_dim, FR * 3 * D};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++)
        if (!(*dev[i] = be->alloc(be, dev_n[i] * sf))) goto nomem;
    if (!(s->host_tok = malloc(T * in_dim * sf)) || !(s->host_out = malloc(T * out_dim * sf)) ||
        !(s->host_rope = malloc(2 * T * half * sf)) || !(s->host_sinus = malloc(FR * D * sf)))
        goto nomem;
    *out = s;
    return 0;
nomem:
    dg_dit_state_free(m, s);
    snprintf(err, errlen, "dit state: out of memory for %d tokens", max_tokens);
    return DG_ENOMEM;
}

void dg_dit_state_free(const dg_dit *m, dg_dit_state *s) {
    if (!s) return;
    dg_backend *be = s->be;
    float *dev[] = {s->x, s->h, s->q, s->k, s->v, s->att, s->ff, s->ctx, s->ck, s->cv, s->tok,
                    s->out, s->cos, s->sin, s->sinus, s->temb, s->emb, s->lora, s->mod};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++) be->release(be, dev[i]);
    free(s->host_tok);
    free(s->host_out);
    free(s->host_rope);
    free(s->host_sinus);
    free(s);
}

int dg_dit_set_layout(const dg_dit *m, dg_dit_state *s, const dg_dit_layout *L, char *err,
                      size_t errlen) {
    const dg_dit_config *c = &m->cfg;
    const int64_t half = c->head_dim / 2;
    if (L->patch_h != c->patch_h || L->patch_w != c->patch_w) {
        snprintf(err, errlen, "dit: layout patch %dx%d, model patch %dx%d", L->patch_h, L->patch_w,
                 c->patch_h, c->patch_w);
        return DG_EINVAL;
    }
    if (L->n_tokens > s->max_tokens || L->n_frames > c->max_t) {
        snprintf(err, errlen, "dit: %lld tokens in %d frames exceed the state's %d tokens or %d frames",
                 (long long)L->n_tokens, L->n_frames, s->max_tokens, c->max_t);
        return DG_ELIMIT;
    }
    for (int f = 0; f < L->n_frames; f++)
        if (L->frames[f].h / c->patch_h > c->max_h || L->frames[f].w / c->patch_w > c->max_w) {
            snprintf(err, errlen, "dit: frame %d (%dx%d latents) exceeds the RoPE range %dx%d patches",
                     f, L->frames[f].h, L->frames[f].w, c->max_h, c->max_w);
            return DG_ELIMIT;
        }
    float *cs = s->host_rope, *sn = s->host_rope + L->n_tokens * half;
    dg_dit_rope_table(L, c->head_dim, c->rope_scale, cs, sn);
    s->be->upload(s->be, s->cos, cs, L->n_tokens * half);
    s->be->upload(s->be, s->sin, sn, L->n_tokens * half);
    s->layout = *L;
    s->has_layout = 1;
    return 0;
}

/* ---- forward ------------------------------------------------------------------------------ */

/* One forward's inputs stacked: input b's tokens are rows b·n1 .. (b+1)·n1 − 1 (the layout's
 * n1 tokens), its frames rows b·nf .. of the per-frame buffers, its context rows
 * ctx_cu[b] .. ctx_cu[b + 1] − 1. */
typedef struct {
    int     n_in, n1, nf;
    int32_t tok_cu[DG_DIT_MAX_BATCH + 1];
    int32_t ctx_cu[DG_DIT_MAX_BATCH + 1];
} stack;

/* Timestep embedding per frame row (spec §1.2; diffusers Timesteps(flip_sin_to_cos=True,
 * downscale_freq_shift=0) in float32): s = [cos(t·f), sin(t·f)], f_i = exp(−ln(1e4)·i/half);
 * temb = W2·SiLU(W1·s) (the adaLN-LoRA term, 3D wide); emb = SiLU(RMSNorm(s)·g), the input
 * every modulation MLP starts from. timesteps: [n_rows]. */
static void time_embed(const dg_dit *m, dg_dit_state *s, const float *timesteps, int n_frames) {
    dg_backend *be = s->be;
    const int D = m->cfg.hidden, half = D / 2;
    for (int f = 0; f < n_frames; f++)
        for (int i = 0; i < half; i++) {
            const float freq = expf(-logf(10000.0f) * (float)i / (float)half);
            const float a = timesteps[f] * freq;
            s->host_sinus[(int64_t)f * D + i] = cosf(a);
            s->host_sinus[(int64_t)f * D + half + i] = sinf(a);
        }
    be->upload(be, s->sinus, s->host_sinus, (int64_t)n_frames * D);
    be->matmul(be, s->h, s->sinus, &m->t1, NULL, n_frames);
    be->silu(be, s->h, s->h, (int64_t)n_frames * D);
    be->matmul(be, s->temb, s->h, &m->t2, NULL, n_frames);
    be->rmsnorm(be, s->emb, s->sinus, m->t_norm, n_frames, D, T_NORM_EPS);
    be->silu(be, s->emb, s->emb, (int64_t)n_frames * D);
}

/* mod[f] = W2·(W1·emb[f]) + temb[f] (first `width` values): shift, scale(, gate) per frame row. */
static void modulation(const dg_dit *m, dg_dit_state *s, const dg_weight *w1, const dg_weight *w2,
                       int n_frames) {
    dg_backend *be = s->be;
    const int64_t width = w2->rows, D = m->cfg.hidden;
    be->matmul(be, s->lora, s->emb, w1, NULL, n_frames);
    be->matmul(be, s->mod, s->lora, w2, NULL, n_frames);
    for (int f = 0; f < n_frames; f++) be->add(be, s->mod + f * width, s->temb + f * 3 * D, width);
}

/* h = LN(x)·(1 + scale_f) + shift_f over each frame's tokens, in every input; the frame
 * rows of mod are `width` apart. */
static void modulate(const dg_dit *m, dg_dit_state *s, const stack *st, float *h, const float *x, int64_t width) {
    const dg_dit_layout *L = &s->layout;
    const int64_t D = m->cfg.hidden;
    for (int b = 0; b < st->n_in; b++)
        for (int f = 0; f < L->n_frames; f++) {
            const dg_dit_frame_meta *fm = &L->frames[f];
            const int64_t t0 = st->tok_cu[b] + fm->token0;
            const float *mf = s->mod + (int64_t)(b * st->nf + f) * width;
            s->be->modulate(s->be, h + t0 * D, x + t0 * D, mf, mf + D, (int)fm->n_tokens, (int)D, LN_EPS);
        }
}

/* x += gate_f · y over each frame's tokens, in every input. */
static void gated_add(const dg_dit *m, dg_dit_state *s, const stack *st, const float *y) {
    const dg_dit_layout *L = &s->layout;
    const int64_t D = m->cfg.hidden;
    for (int b = 0; b < st->n_in; b++)
        for (int f = 0; f < L->n_frames; f++) {
            const dg_dit_frame_meta *fm = &L->frames[f];
            const int64_t t0 = st->tok_cu[b] + fm->token0;
            s->be->add_gated(s->be, s->x + t0 * D, y + t0 * D, s->mod + (int64_t)(b * st->nf + f) * 3 * D + 2 * D,
                             (int)fm->n_tokens, (int)D);
        }
}

/* One transformer block over the stacked tokens (spec §3; diffusers CosmosTransformerBlock):
 * every weight over all inputs' tokens at once, attention within each input. */
static void block_forward(const dg_dit *m, const dg_dit_block *B, dg_dit_state *s, const stack *st) {
    dg_backend *be = s->be;
    const dg_dit_config *c = &m->cfg;
    const int n = st->tok_cu[st->n_in], D = c->hidden, H = c->n_heads, hd = c->head_dim;
    const int n_ctx = st->ctx_cu[st->n_in], nf = st->n_in * st->nf;
    const float scale = 1.0f / sqrtf((float)hd);

    /* self-attention: RMSNorm per head on q and k, RoPE, full attention over all frames */
    modulation(m, s, &B->mod1[0], &B->mod2[0], nf);
    modulate(m, s, st, s->h, s->x, 3 * D);
    be->matmul(be, s->q, s->h, &B->wq, NULL, n);
    be->matmul(be, s->k, s->h, &B->wk, NULL, n);
    be->matmul(be, s->v, s->h, &B->wv, NULL, n);
    be->rmsnorm(be, s->q, s->q, B->q_norm, n * H, hd, QK_EPS);
    be->rmsnorm(be, s->k, s->k, B->k_norm, n * H, hd, QK_EPS);
    for (int b = 0; b < st->n_in; b++) {
        be->rope_table(be, s->q + (int64_t)st->tok_cu[b] * D, D, s->cos, s->sin, st->n1, H, hd);
        be->rope_table(be, s->k + (int64_t)st->tok_cu[b] * D, D, s->cos, s->sin, st->n1, H, hd);
    }
    be->attention_segments(be, s->att, s->q, D, s->k, s->v, D, st->tok_cu, st->tok_cu, st->n_in, H, H, hd, scale);
    be->matmul(be, s->h, s->att, &B->wo, NULL, n);
    gated_add(m, s, st, s->h);

    /* cross-attention to each input's context: no RoPE, no mask */
    modulation(m, s, &B->mod1[1], &B->mod2[1], nf);
    modulate(m, s, st, s->h, s->x, 3 * D);
    be->matmul(be, s->q, s->h, &B->cq, NULL, n);
    be->rmsnorm(be, s->q, s->q, B->cq_norm, n * H, hd, QK_EPS);
    be->matmul(be, s->ck, s->ctx, &B->ck, NULL, n_ctx);
    be->rmsnorm(be, s->ck, s->ck, B->ck_norm, n_ctx * H, hd, QK_EPS);
    be->matmul(be, s->cv, s->ctx, &B->cv, NULL, n_ctx);
    be->attention_segments(be, s->att, s->q, D, s->ck, s->cv, D, st->tok_cu, st->ctx_cu, st->n_in, H, H, hd, scale);
    be->matmul(be, s->h, s->att, &B->co, NULL, n);
    gated_add(m, s, st, s->h);

    /* MLP: GELU (erf), no biases */
    modulation(m, s, &B->mod1[2], &B->mod2[2], nf);
    modulate(m, s, st, s->h, s->x, 3 * D);
    be->matmul(be, s->ff, s->h, &B->ff1, NULL, n);
    be->gelu(be, s->ff, s->ff, (int64_t)n * c->mlp_hidden);
    be->matmul(be, s->h, s->ff, &B->ff2, NULL, n);
    gated_add(m, s, st, s->h);
}

/* The inputs against the state and the layout; their tokens, contexts and timesteps into the
 * state (host_sinus holds the timesteps of every frame row until time_embed). */
static int stack_inputs(const dg_dit *m, dg_dit_state *s, const dg_dit_input *in, int n_in, stack *st, char *err,
                        size_t errlen) {
    dg_backend *be = s->be;
    const dg_dit_config *c = &m->cfg;
    const dg_dit_layout *L = &s->layout;
    const int64_t in_dim = (int64_t)(c->latent_channels + 2) * c->patch_h * c->patch_w;
    if (!s->has_layout) {
        snprintf(err, errlen, "dit: no layout installed (dg_dit_set_layout)");
        return DG_EINVAL;
    }
    if (n_in < 1 || n_in > DG_DIT_MAX_BATCH || (int64_t)n_in * L->n_tokens > s->max_tokens) {
        snprintf(err, errlen, "dit: %d inputs of %lld tokens for a state of %d tokens (at most %d inputs)", n_in,
                 (long long)L->n_tokens, s->max_tokens, DG_DIT_MAX_BATCH);
        return DG_ELIMIT;
    }
    *st = (stack){.n_in = n_in, .n1 = (int)L->n_tokens, .nf = L->n_frames};
    for (int b = 0; b < n_in; b++) {
        st->tok_cu[b + 1] = st->tok_cu[b] + st->n1;
        st->ctx_cu[b + 1] = st->ctx_cu[b] + in[b].n_ctx;
        if (in[b].n_ctx < 1 || st->ctx_cu[b + 1] > s->max_ctx) {
            snprintf(err, errlen, "dit: %d context rows after %d for a state of %d", in[b].n_ctx, st->ctx_cu[b],
                     s->max_ctx);
            return DG_ELIMIT;
        }
    }
    for (int b = 0; b < n_in; b++) {
        for (int f = 0; f < L->n_frames; f++)
            dg_dit_patchify(L, f, in[b].latents[f], c->latent_channels, s->host_tok + (int64_t)st->tok_cu[b] * in_dim);
        be->upload(be, s->ctx + (int64_t)st->ctx_cu[b] * c->text_dim, in[b].ctx, (int64_t)in[b].n_ctx * c->text_dim);
    }
    be->upload(be, s->tok, s->host_tok, (int64_t)st->tok_cu[n_in] * in_dim);
    return 0;
}

int dg_dit_forward(const dg_dit *m, dg_dit_state *s, const dg_dit_input *in, float *velocity,
                   char *err, size_t errlen) {
    return dg_dit_forward_batch(m, s, in, 1, &velocity, err, errlen);
}

int dg_dit_forward_batch(const dg_dit *m, dg_dit_state *s, const dg_dit_input *in, int n_in,
                         float *const *velocity, char *err, size_t errlen) {
    dg_backend *be = s->be;
    const dg_dit_config *c = &m->cfg;
    const dg_dit_layout *L = &s->layout;
    const int D = c->hidden;
    const int64_t out_dim = (int64_t)c->patch_h * c->patch_w * c->out_channels;
    float t[DG_DIT_MAX_FRAMES * DG_DIT_MAX_BATCH];
    stack st;
    int rc = stack_inputs(m, s, in, n_in, &st, err, errlen);
    if (rc < 0) return rc;
    const int n = st.tok_cu[n_in], nf = n_in * st.nf;
    be->matmul(be, s->x, s->tok, &m->patch, NULL, n);
    for (int b = 0; b < n_in; b++) memcpy(t + b * st.nf, in[b].timesteps, (size_t)st.nf * sizeof *t);
    time_embed(m, s, t, nf);
    for (int l = 0; l < c->n_layers; l++) block_forward(m, &m->blocks[l], s, &st);

    /* final layer: shift, scale from norm_out (+ the first 2D of temb), then proj_out */
    be->matmul(be, s->lora, s->emb, &m->out1, NULL, nf);
    be->matmul(be, s->mod, s->lora, &m->out2, NULL, nf);
    for (int f = 0; f < nf; f++) be->add(be, s->mod + (int64_t)f * 2 * D, s->temb + (int64_t)f * 3 * D, 2 * D);
    modulate(m, s, &st, s->q, s->x, 2 * D);
    be->matmul(be, s->out, s->q, &m->proj_out, NULL, n);
    be->download(be, s->host_out, s->out, (int64_t)n * out_dim);
    for (int b = 0; b < n_in; b++) {
        float *dst = velocity[b];
        for (int f = 0; f < L->n_frames; f++) {
            dg_dit_unpatchify(L, f, s->host_out + (int64_t)st.tok_cu[b] * out_dim, c->out_channels, dst);
            dst += (int64_t)c->out_channels * L->frames[f].h * L->frames[f].w;
        }
    }
    return 0;
}
