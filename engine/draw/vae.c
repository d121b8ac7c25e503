/* vae.c — Wan2.1 VAE: binding (diffusers AutoencoderKLWan names) and the forward passes. */
#include "draw/vae.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"
#include "io/json_config.h"
#include "io/safetensors.h"

/* ---- binding ------------------------------------------------------------------------------ */

/* A convolution's weight and bias; kt = 0 for a 2-D conv (a 4-D weight [o, i, kh, kw]). */
static int bind_conv(dg_binder *b, dg_vae_conv *cv, const char *prefix, int c_out, int c_in, int kt,
                     int kh, int kw) {
    const int is3d = kt > 0;
    dg_bind_conv(b, &cv->w, is3d ? DG_SHAPE(c_out, c_in, kt, kh, kw) : DG_SHAPE(c_out, c_in, kh, kw),
                 "%s.weight", prefix);
    dg_bind_fp32(b, &cv->b, DG_SHAPE(c_out), "%s.bias", prefix);
    cv->shape = (dg_conv3d_shape){.c_in = c_in, .c_out = c_out, .kt = is3d ? kt : 1, .kh = kh,
                                  .kw = kw, .st = 1, .sh = 1, .sw = 1};
    return b->rc;
}

/* A causal 3x3x3 conv with padding 1: front pad 2 frames, 1 pixel on every side. */
static int bind_conv3(dg_binder *b, dg_vae_conv *cv, const char *prefix, int c_out, int c_in) {
    int rc = bind_conv(b, cv, prefix, c_out, c_in, 3, 3, 3);
    cv->shape.pad_t = 2;
    cv->shape.pad_top = cv->shape.pad_bottom = cv->shape.pad_left = cv->shape.pad_right = 1;
    return rc;
}

/* RMS_norm gamma: [c, 1, 1, 1] in residual blocks and heads, [c, 1, 1] in attention. */
static int bind_gamma(dg_binder *b, float **out, const char *prefix, int c, int n_dims) {
    return dg_bind_fp32(b, out, n_dims == 4 ? DG_SHAPE(c, 1, 1, 1) : DG_SHAPE(c, 1, 1), "%s.gamma", prefix);
}

static int bind_res(dg_binder *b, dg_vae_layer *L, const char *p, int c_in, int c_out) {
    char n[256];
    int rc;
    *L = (dg_vae_layer){.kind = DG_VAE_RES, .c_in = c_in, .c_out = c_out};
    snprintf(n, sizeof n, "%s.norm1", p);
    if ((rc = bind_gamma(b, &L->gamma1, n, c_in, 4)) < 0) return rc;
    snprintf(n, sizeof n, "%s.conv1", p);
    if ((rc = bind_conv3(b, &L->conv1, n, c_out, c_in)) < 0) return rc;
    snprintf(n, sizeof n, "%s.norm2", p);
    if ((rc = bind_gamma(b, &L->gamma2, n, c_out, 4)) < 0) return rc;
    snprintf(n, sizeof n, "%s.conv2", p);
    if ((rc = bind_conv3(b, &L->conv2, n, c_out, c_out)) < 0) return rc;
    if (c_in != c_out) {
        snprintf(n, sizeof n, "%s.conv_shortcut", p);
        if ((rc = bind_conv(b, &L->shortcut, n, c_out, c_in, 1, 1, 1)) < 0) return rc;
    }
    return 0;
}

static int bind_attn(dg_binder *b, dg_vae_layer *L, const char *p, int c) {
    char n[256];
    int rc;
    *L = (dg_vae_layer){.kind = DG_VAE_ATTN, .c_in = c, .c_out = c};
    snprintf(n, sizeof n, "%s.norm", p);
    if ((rc = bind_gamma(b, &L->gamma1, n, c, 3)) < 0) return rc;
    snprintf(n, sizeof n, "%s.to_qkv", p);
    if ((rc = bind_conv(b, &L->conv1, n, 3 * c, c, 0, 1, 1)) < 0) return rc;
    snprintf(n, sizeof n, "%s.proj", p);
    return bind_conv(b, &L->conv2, n, c, c, 0, 1, 1);
}

/* Resample(c, mode) (spec §6.3): the 2-D conv and, for the 3-D modes, the time conv. */
static int bind_resample(dg_binder *b, dg_vae_layer *L, const char *p, int c, dg_vae_layer_kind kind) {
    char n[256];
    int rc;
    const int up = kind == DG_VAE_UP2D || kind == DG_VAE_UP3D;
    *L = (dg_vae_layer){.kind = kind, .c_in = c, .c_out = up ? c / 2 : c};
    snprintf(n, sizeof n, "%s.resample.1", p);
    if ((rc = bind_conv(b, &L->conv1, n, L->c_out, c, 0, 3, 3)) < 0) return rc;
    if (up) {
        L->conv1.shape.pad_top = L->conv1.shape.pad_bottom = 1;
        L->conv1.shape.pad_left = L->conv1.shape.pad_right = 1;
    } else {   /* ZeroPad2d(0, 1, 0, 1), stride 2 */
        L->conv1.shape.pad_bottom = L->conv1.shape.pad_right = 1;
        L->conv1.shape.sh = L->conv1.shape.sw = 2;
    }
    if (kind == DG_VAE_DOWN3D || kind == DG_VAE_UP3D) {
        snprintf(n, sizeof n, "%s.time_conv", p);
        if ((rc = bind_conv(b, &L->time_conv, n, kind == DG_VAE_UP3D ? 2 * c : c, c, 3, 1, 1)) < 0)
            return rc;
        if (kind == DG_VAE_UP3D) L->time_conv.shape.pad_t = 2;
        else L->time_conv.shape.st = 2;
    }
    return 0;
}

static int bind_mid(dg_binder *b, dg_vae_layer *L, const char *stack, int c) {
    char n[256];
    int rc;
    snprintf(n, sizeof n, "%s.mid_block.resnets.0", stack);
    if ((rc = bind_res(b, &L[0], n, c, c)) < 0) return rc;
    snprintf(n, sizeof n, "%s.mid_block.attentions.0", stack);
    if ((rc = bind_attn(b, &L[1], n, c)) < 0) return rc;
    snprintf(n, sizeof n, "%s.mid_block.resnets.1", stack);
    return bind_res(b, &L[2], n, c, c);
}

static int bind_encoder(dg_binder *b, dg_vae *v) {
    const dg_vae_config *c = &v->cfg;
    dg_vae_stack *s = &v->enc;
    int dims[DG_VAE_MAX_LEVELS + 1], rc, k = 0;
    char n[256];
    dims[0] = c->base_dim;
    for (int i = 0; i < c->n_levels; i++) dims[i + 1] = c->base_dim * c->dim_mult[i];
    s->n_layers = c->n_levels * c->num_res_blocks + (c->n_levels - 1) + 3;
    if (!(s->layers = calloc((size_t)s->n_layers, sizeof *s->layers))) return DG_ENOMEM;
    if ((rc = bind_conv3(b, &s->conv_in, "encoder.conv_in", dims[0], 3)) < 0) return rc;
    for (int i = 0; i < c->n_levels; i++) {
        for (int r = 0; r < c->num_res_blocks; r++) {
            snprintf(n, sizeof n, "encoder.down_blocks.%d", k);
            if ((rc = bind_res(b, &s->layers[k++], n, r ? dims[i + 1] : dims[i], dims[i + 1])) < 0)
                return rc;
        }
        if (i == c->n_levels - 1) break;
        snprintf(n, sizeof n, "encoder.down_blocks.%d", k);
        if ((rc = bind_resample(b, &s->layers[k++], n, dims[i + 1],
                                c->temporal_down[i] ? DG_VAE_DOWN3D : DG_VAE_DOWN2D)) < 0)
            return rc;
    }
    const int cm = dims[c->n_levels];
    if ((rc = bind_mid(b, &s->layers[k], "encoder", cm)) < 0) return rc;
    if ((rc = bind_gamma(b, &s->norm_out, "encoder.norm_out", cm, 4)) < 0) return rc;
    return bind_conv3(b, &s->conv_out, "encoder.conv_out", 2 * c->z_dim, cm);
}

static int bind_decoder(dg_binder *b, dg_vae *v) {
    const dg_vae_config *c = &v->cfg;
    dg_vae_stack *s = &v->dec;
    const int L = c->n_levels;
    int dims[DG_VAE_MAX_LEVELS + 1], rc, k = 3;
    char n[256];
    dims[0] = c->base_dim * c->dim_mult[L - 1];
    for (int i = 0; i < L; i++) dims[i + 1] = c->base_dim * c->dim_mult[L - 1 - i];
    s->n_layers = 3 + L * (c->num_res_blocks + 1) + (L - 1);
    if (!(s->layers = calloc((size_t)s->n_layers, sizeof *s->layers))) return DG_ENOMEM;
    if ((rc = bind_conv3(b, &s->conv_in, "decoder.conv_in", dims[0], c->z_dim)) < 0) return rc;
    if ((rc = bind_mid(b, &s->layers[0], "decoder", dims[0])) < 0) return rc;
    for (int i = 0; i < L; i++) {
        int in = i > 0 ? dims[i] / 2 : dims[i];   /* Wan2.1: the upsampler halved the width */
        for (int r = 0; r <= c->num_res_blocks; r++) {
            snprintf(n, sizeof n, "decoder.up_blocks.%d.resnets.%d", i, r);
            if ((rc = bind_res(b, &s->layers[k++], n, in, dims[i + 1])) < 0) return rc;
            in = dims[i + 1];
        }
        if (i == L - 1) break;
        /* temporal upsampling mirrors the encoder's downsampling, deepest level first */
        snprintf(n, sizeof n, "decoder.up_blocks.%d.upsamplers.0", i);
        if ((rc = bind_resample(b, &s->layers[k++], n, dims[i + 1],
                                c->temporal_down[L - 2 - i] ? DG_VAE_UP3D : DG_VAE_UP2D)) < 0)
            return rc;
    }
    if ((rc = bind_gamma(b, &s->norm_out, "decoder.norm_out", dims[L], 4)) < 0) return rc;
    return bind_conv3(b, &s->conv_out, "decoder.conv_out", 3, dims[L]);
}

static int read_config(dg_vae_config *c, const char *path, char *err, size_t errlen) {
    json_error_t je;
    json_t *j;
    int rc = dg_json_load_file(path, 0, &j, &je), n, n_mean, n_std, scratch[DG_VAE_MAX_LEVELS], in_ch, out_ch;
    json_t *v;
    if (rc) {
        snprintf(err, errlen, "%s: %s", path, rc == DG_ENOMEM ? "out of memory reading it" : je.text);
        return rc;
    }
    rc = DG_EMODEL;
    memset(c, 0, sizeof *c);
    if ((rc = dg_json_name(j, "_class_name", "AutoencoderKLWan", path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "base_dim", 96, 0, &c->base_dim, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "z_dim", 16, 0, &c->z_dim, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "num_res_blocks", 2, 0, &c->num_res_blocks, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "in_channels", 3, 0, &in_ch, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "out_channels", 3, 0, &out_ch, path, err, errlen)) < 0 ||
        (rc = dg_json_ints(j, "dim_mult", c->dim_mult, DG_VAE_MAX_LEVELS, &c->n_levels, path, err, errlen)) < 0 ||
        (rc = dg_json_ints(j, "temperal_downsample", c->temporal_down, DG_VAE_MAX_LEVELS, &n, path, err, errlen)) < 0 ||
        (rc = dg_json_ints(j, "attn_scales", scratch, DG_VAE_MAX_LEVELS, &n_mean, path, err, errlen)) < 0)
        goto out;
    rc = DG_EMODEL;
    if (c->n_levels < 2 || n != c->n_levels - 1 || c->z_dim < 1 || c->z_dim > DG_VAE_MAX_Z ||
        c->base_dim < 1 || in_ch != 3 || out_ch != 3) {
        snprintf(err, errlen, "%s: unsupported shape (dim_mult, temperal_downsample, z_dim, channels)", path);
        goto out;
    }
    /* widths bounded before they are multiplied (base_dim x dim_mult) */
    int mult_ok = 1;
    for (int i = 0; i < c->n_levels; i++) mult_ok &= c->dim_mult[i] >= 1 && c->dim_mult[i] <= 64;
    if (c->base_dim > 4096 || !mult_ok || c->num_res_blocks < 1 || c->num_res_blocks > 64) {
        snprintf(err, errlen, "%s: base_dim %d (1 .. 4096), dim_mult entries 1 .. 64, num_res_blocks %d (1 .. 64)", path,
                 c->base_dim, c->num_res_blocks);
        goto out;
    }
    /* Wan2.2's variants (residual blocks, patchified input, separate decoder width) and
     * attention at other scales are not the Wan2.1 VAE */
    if (n_mean != 0 || ((v = json_object_get(j, "is_residual")) && json_is_true(v)) ||
        ((v = json_object_get(j, "patch_size")) && !json_is_null(v)) ||
        ((v = json_object_get(j, "decoder_base_dim")) && !json_is_null(v) &&
         !(json_is_integer(v) && json_integer_value(v) == c->base_dim))) {
        snprintf(err, errlen, "%s: not a Wan2.1 VAE (attn_scales, is_residual, patch_size or decoder_base_dim)", path);
        goto out;
    }
    /* the compression the pipeline reads from the config must be what the layers do; dropout
     * is a training setting, any value is accepted */
    int spatial = 1 << (c->n_levels - 1), temporal = 1, st, ss;
    for (int i = 0; i < n; i++) temporal <<= c->temporal_down[i] != 0;
    if ((rc = dg_json_int(j, "scale_factor_temporal", temporal, 0, &st, path, err, errlen)) < 0 ||
        (rc = dg_json_int(j, "scale_factor_spatial", spatial, 0, &ss, path, err, errlen)) < 0)
        goto out;
    rc = DG_EMODEL;
    if (st != temporal || ss != spatial) {
        snprintf(err, errlen, "%s: scale_factor_temporal %d / scale_factor_spatial %d, but dim_mult and "
                 "temperal_downsample compress by %d / %d", path, st, ss, temporal, spatial);
        goto out;
    }
    if ((rc = dg_json_floats(j, "latents_mean", c->latents_mean, DG_VAE_MAX_Z, &n_mean, path, err, errlen)) < 0 ||
        (rc = dg_json_floats(j, "latents_std", c->latents_std, DG_VAE_MAX_Z, &n_std, path, err, errlen)) < 0)
        goto out;
    rc = DG_EMODEL;
    if (n_mean != c->z_dim || n_std != c->z_dim) {
        snprintf(err, errlen, "%s: latents_mean/latents_std must have z_dim = %d values", path, c->z_dim);
        goto out;
    }
    /* the encoder's latent is divided by its std, the decoder's input multiplied by it: a
     * std of 0 made infinities, one below 0 a negated channel, one past a float's range
     * (1e39 in the file reads as inf) NaNs; all without an error */
    for (int i = 0; i < c->z_dim; i++) {
        const char *key = !isfinite(c->latents_mean[i]) ? "latents_mean" : "latents_std";
        const float x = !isfinite(c->latents_mean[i]) ? c->latents_mean[i] : c->latents_std[i];
        if (!isfinite(c->latents_mean[i]) || !(c->latents_std[i] > 0.0f && isfinite(c->latents_std[i]))) {
            snprintf(err, errlen, "%s: %s[%d] %g must be %sfinite", path, key, i, (double)x,
                     strcmp(key, "latents_std") ? "" : "above 0 and ");
            goto out;
        }
    }
    rc = 0;
out:
    json_decref(j);
    return rc;
}

int dg_vae_load(dg_vae *v, const char *dir, dg_backend *be, char *err, size_t errlen) {
    char path[4096];
    dg_st *st = NULL;
    int rc;
    memset(v, 0, sizeof *v);
    v->be = be;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if ((rc = read_config(&v->cfg, path, err, errlen)) < 0) goto fail;
    if ((rc = dg_st_open(dir, &st, err, errlen)) < 0) goto fail;
    dg_binder b = {.st = st, .be = be, .owned = &v->owned, .err = err, .errlen = errlen};
    const int z = v->cfg.z_dim;
    if ((rc = bind_encoder(&b, v)) < 0 || (rc = bind_decoder(&b, v)) < 0 ||
        (rc = bind_conv(&b, &v->quant_conv, "quant_conv", 2 * z, 2 * z, 1, 1, 1)) < 0 ||
        (rc = bind_conv(&b, &v->post_quant_conv, "post_quant_conv", z, z, 1, 1, 1)) < 0)
        goto fail;
    dg_st_close(st);
    return 0;
fail:
    if (rc == DG_ENOMEM && !err[0]) snprintf(err, errlen, "vae: out of memory");
    dg_st_close(st);
    dg_vae_unload(v);
    return rc;
}

void dg_vae_unload(dg_vae *v) {
    dg_buffer_list_release(&v->owned);
    free(v->enc.layers);
    free(v->dec.layers);
    memset(v, 0, sizeof *v);
}

int dg_vae_spatial_factor(const dg_vae *v) { return 1 << (v->cfg.n_levels - 1); }

int dg_vae_temporal_factor(const dg_vae *v) {
    int f = 1;
    for (int i = 0; i < v->cfg.n_levels - 1; i++) f <<= v->cfg.temporal_down[i] ? 1 : 0;
    return f;
}

/* ---- forward ------------------------------------------------------------------------------ */

/* A forward walks the layers over four ping-pong buffers. With s == NULL it only measures:
 * the same walk records the largest activation and attention input, which sizes a state. */
typedef struct {
    const dg_vae *v;
    dg_backend   *be;
    dg_vae_state *s;          /* NULL: measuring */
    int64_t       need, need_qkv;
    float        *cur;        /* the current activation: [t, c, h, w] */
    int           t, c, h, w;
} walk;

static float *spare(const walk *r, const float *a, const float *b, const float *c) {
    if (!r->s) return NULL;
    for (int i = 0; i < 4; i++) {
        float *p = r->s->buf[i];
        if (p != a && p != b && p != c) return p;
    }
    return NULL;
}

static void note(walk *r, int64_t n) {
    if (n > r->need) r->need = n;
}

/* y = conv(x) over t frames of h x w; returns the output frame count, size in *ho, *wo. */
static int conv(walk *r, const dg_vae_conv *cv, float *y, const float *x, int t, int h, int w,
                int *ho, int *wo) {
    dg_conv3d_shape sh = cv->shape;
    sh.t = t;
    sh.h = h;
    sh.w = w;
    const int to = dg_conv3d_out_t(&sh);
    *ho = dg_conv3d_out_h(&sh);
    *wo = dg_conv3d_out_w(&sh);
    note(r, (int64_t)to * sh.c_out * *ho * *wo);
    if (r->s) r->be->conv3d(r->be, y, x, cv->w, cv->b, &sh);
    return to;
}

/* Copies frame 0 of x[., n] into y (a device copy through the gather op). */
static void copy_first_frame(walk *r, float *y, const float *x, int64_t n) {
    static const int32_t zero = 0;
    if (r->s) r->be->gather_rows(r->be, y, x, &zero, 1, n);
}

static void norm(walk *r, float *y, const float *x, const float *gamma, int silu) {
    if (r->s) r->be->channel_rmsnorm(r->be, y, x, gamma, r->t, r->c, (int64_t)r->h * r->w, silu);
}

static void layer_res(walk *r, const dg_vae_layer *L) {
    float *a = r->cur, *b = spare(r, a, NULL, NULL), *c = spare(r, a, b, NULL);
    float *d = spare(r, a, b, c);
    const float *skip = a;
    int h, w;
    if (L->shortcut.w) {
        conv(r, &L->shortcut, d, a, r->t, r->h, r->w, &h, &w);
        skip = d;
    }
    norm(r, b, a, L->gamma1, 1);
    conv(r, &L->conv1, c, b, r->t, r->h, r->w, &h, &w);
    r->c = L->c_out;
    norm(r, c, c, L->gamma2, 1);
    conv(r, &L->conv2, b, c, r->t, r->h, r->w, &h, &w);
    if (r->s) r->be->add(r->be, b, skip, (int64_t)r->t * r->c * r->h * r->w);
    r->cur = b;
}

static void layer_attn(walk *r, const dg_vae_layer *L) {
    float *a = r->cur, *b = spare(r, a, NULL, NULL), *c = spare(r, a, b, NULL);
    float *d = spare(r, a, b, c);
    const int64_t plane = (int64_t)r->h * r->w, frame = r->c * plane;
    int h, w;
    if (3 * frame > r->need_qkv) r->need_qkv = 3 * frame;
    norm(r, b, a, L->gamma1, 0);
    for (int f = 0; r->s && f < r->t; f++) {
        conv(r, &L->conv1, r->s->qkv, b + f * frame, 1, r->h, r->w, &h, &w);
        r->be->spatial_attention(r->be, c + f * frame, r->s->qkv, r->c, plane);
    }
    conv(r, &L->conv2, d, c, r->t, r->h, r->w, &h, &w);
    if (r->s) r->be->add(r->be, a, d, (int64_t)r->t * frame);
}

/* Down: the 2-D conv per frame, then (3-D) o_0 = g_0, o_j = time_conv(g_2j-2, g_2j-1, g_2j).
 * Up (3-D): g_0 passes, g_1.. go through the causal time conv whose 2c outputs are two
 * frames each (frame-major layout: [2c, h, w] = two [c, h, w]); then nearest x2 and the
 * 2-D conv per frame. (spec §6.3-6.4) */
static void layer_resample(walk *r, const dg_vae_layer *L) {
    float *a = r->cur, *b = spare(r, a, NULL, NULL), *c = spare(r, a, b, NULL);
    int h, w;
    const int64_t plane = (int64_t)r->h * r->w;
    switch (L->kind) {
    case DG_VAE_DOWN2D:
    case DG_VAE_DOWN3D:
        conv(r, &L->conv1, b, a, r->t, r->h, r->w, &h, &w);
        r->h = h;
        r->w = w;
        r->cur = b;
        if (L->kind == DG_VAE_DOWN3D && r->t > 1) {
            const int64_t frame = (int64_t)r->c * h * w;
            copy_first_frame(r, c, b, frame);
            r->t = 1 + conv(r, &L->time_conv, c + frame, b, r->t, h, w, &h, &w);
            r->cur = c;
        }
        break;
    case DG_VAE_UP2D:
    case DG_VAE_UP3D:
        if (L->kind == DG_VAE_UP3D && r->t > 1) {
            const int64_t frame = (int64_t)r->c * plane;
            copy_first_frame(r, b, a, frame);
            r->t = 1 + 2 * conv(r, &L->time_conv, b + frame, a + frame, r->t - 1, r->h, r->w, &h, &w);
            a = b;
            b = spare(r, a, c, NULL);
        }
        note(r, (int64_t)r->t * r->c * plane * 4);
        if (r->s) r->be->upsample2x(r->be, c, a, (int64_t)r->t * r->c, r->h, r->w);
        conv(r, &L->conv1, b, c, r->t, 2 * r->h, 2 * r->w, &h, &w);
        r->h = h;
        r->w = w;
        r->cur = b;
        break;
    default:
        break;
    }
    r->c = L->c_out;
}

/* conv_in, the layers, norm_out + SiLU, conv_out. */
static void stack_forward(walk *r, const dg_vae_stack *st) {
    float *b = spare(r, r->cur, NULL, NULL), *c;
    int h, w;
    conv(r, &st->conv_in, b, r->cur, r->t, r->h, r->w, &h, &w);
    r->c = st->conv_in.shape.c_out;
    r->cur = b;
    for (int i = 0; i < st->n_layers; i++) {
        const dg_vae_layer *L = &st->layers[i];
        if (L->kind == DG_VAE_RES) layer_res(r, L);
        else if (L->kind == DG_VAE_ATTN) layer_attn(r, L);
        else layer_resample(r, L);
    }
    b = spare(r, r->cur, NULL, NULL);
    c = spare(r, r->cur, b, NULL);
    norm(r, b, r->cur, st->norm_out, 1);
    conv(r, &st->conv_out, c, b, r->t, r->h, r->w, &h, &w);
    r->c = st->conv_out.shape.c_out;
    r->cur = c;
}

static int check_clip(const dg_vae *v, const dg_vae_state *s, int T, int H, int W, char *err,
                      size_t errlen) {
    const int f = dg_vae_spatial_factor(v), ft = dg_vae_temporal_factor(v);
    if (T < 1 || H < f || W < f || H % f || W % f || (T - 1) % ft) {
        snprintf(err, errlen, "vae: a clip of %d frames of %dx%d: frames must be 1 + k*%d, sides multiples of %d",
                 T, H, W, ft, f);
        return DG_EINVAL;
    }
    /* every activation is (frames at its level) x (H·W / its scale²) x channels: monotone
     * in T and H·W, so the measured limits bound it */
    if (s && (T > s->max_frames || (int64_t)H * W > (int64_t)s->max_h * s->max_w)) {
        snprintf(err, errlen, "vae: a clip of %d frames of %dx%d exceeds the state (%d frames of %dx%d)",
                 T, H, W, s->max_frames, s->max_h, s->max_w);
        return DG_ELIMIT;
    }
    return 0;
}

/* Both directions measured at the limits: the larger of the two sizes each buffer. */
static void measure(const dg_vae *v, int T, int H, int W, int64_t *need, int64_t *need_qkv) {
    const int f = dg_vae_spatial_factor(v), ft = dg_vae_temporal_factor(v);
    walk e = {.v = v, .t = T, .c = 3, .h = H, .w = W};
    walk d = {.v = v, .t = 1 + (T - 1) / ft, .c = v->cfg.z_dim, .h = H / f, .w = W / f};
    note(&e, (int64_t)T * 3 * H * W);
    stack_forward(&e, &v->enc);
    stack_forward(&d, &v->dec);
    *need = e.need > d.need ? e.need : d.need;
    *need_qkv = e.need_qkv > d.need_qkv ? e.need_qkv : d.need_qkv;
}

int dg_vae_state_new(const dg_vae *v, dg_backend *be, int max_frames, int max_h, int max_w,
                     dg_vae_state **out, char *err, size_t errlen) {
    dg_vae_state *s;
    int64_t need, need_qkv;
    int rc;
    *out = NULL;
    if ((rc = check_clip(v, NULL, max_frames, max_h, max_w, err, errlen)) < 0) return rc;
    /* the middle attention scores one latent frame's pixels against each other: the
     * spatial_attention op takes planes of up to 2^20 (8192x8192 pixels) */
    if ((int64_t)(max_h / dg_vae_spatial_factor(v)) * (max_w / dg_vae_spatial_factor(v)) > (1 << 20)) {
        snprintf(err, errlen, "vae state: %dx%d is larger than the attention allows", max_h, max_w);
        return DG_ELIMIT;
    }
    measure(v, max_frames, max_h, max_w, &need, &need_qkv);
    if (!(s = calloc(1, sizeof *s))) goto nomem;
    s->be = be;
    s->max_frames = max_frames;
    s->max_h = max_h;
    s->max_w = max_w;
    s->buf_floats = need;
    for (int i = 0; i < 4; i++)
        if (!(s->buf[i] = be->alloc(be, sizeof(float) * (size_t)need))) goto nomem;
    if (!(s->qkv = be->alloc(be, sizeof(float) * (size_t)need_qkv))) goto nomem;
    if (!(s->io = malloc(sizeof(float) * (size_t)max_frames * 3 * max_h * max_w))) goto nomem;
    *out = s;
    return 0;
nomem:
    dg_vae_state_free(v, s);
    snprintf(err, errlen, "vae state: out of memory for %d frames of %dx%d", max_frames, max_h, max_w);
    return DG_ENOMEM;
}

void dg_vae_state_free(const dg_vae *v, dg_vae_state *s) {
    if (!s) return;
    for (int i = 0; i < 4; i++) s->be->release(s->be, s->buf[i]);
    s->be->release(s->be, s->qkv);
    free(s->io);
    free(s);
}

int dg_vae_encode(const dg_vae *v, dg_vae_state *s, const float *pixels, int T, int H, int W,
                  float *latent, char *err, size_t errlen) {
    const dg_vae_config *c = &v->cfg;
    int rc, h, w;
    if ((rc = check_clip(v, s, T, H, W, err, errlen)) < 0) return rc;
    walk r = {.v = v, .be = s->be, .s = s, .cur = s->buf[0], .t = T, .c = 3, .h = H, .w = W};
    s->be->upload(s->be, s->buf[0], pixels, (int64_t)T * 3 * H * W);
    stack_forward(&r, &v->enc);
    float *q = spare(&r, r.cur, NULL, NULL);
    conv(&r, &v->quant_conv, q, r.cur, r.t, r.h, r.w, &h, &w);
    /* the posterior mean: the first z of the 2z channels of every frame, then normalized */
    const int64_t plane = (int64_t)h * w;
    for (int t = 0; t < r.t; t++) {
        float *dst = latent + (int64_t)t * c->z_dim * plane;
        s->be->download(s->be, dst, q + (int64_t)t * 2 * c->z_dim * plane, c->z_dim * plane);
        for (int ch = 0; ch < c->z_dim; ch++)
            for (int64_t p = 0; p < plane; p++)
                dst[ch * plane + p] = (dst[ch * plane + p] - c->latents_mean[ch]) / c->latents_std[ch];
    }
    return 0;
}

int dg_vae_decode(const dg_vae *v, dg_vae_state *s, const float *latent, int T_lat, int h, int w,
                  float *pixels, char *err, size_t errlen) {
    const dg_vae_config *c = &v->cfg;
    const int f = dg_vae_spatial_factor(v), T = 1 + (T_lat - 1) * dg_vae_temporal_factor(v);
    const int64_t plane = (int64_t)h * w, n = (int64_t)T_lat * c->z_dim * plane;
    int rc, ho, wo;
    if (T_lat < 1 || (rc = check_clip(v, s, T, h * f, w * f, err, errlen)) < 0) {
        if (T_lat < 1) snprintf(err, errlen, "vae: %d latent frames", T_lat);
        return T_lat < 1 ? DG_EINVAL : rc;
    }
    for (int64_t i = 0; i < n; i++) {
        const int ch = (int)(i / plane % c->z_dim);
        s->io[i] = latent[i] * c->latents_std[ch] + c->latents_mean[ch];
    }
    walk r = {.v = v, .be = s->be, .s = s, .cur = s->buf[1], .t = T_lat, .c = c->z_dim, .h = h, .w = w};
    s->be->upload(s->be, s->buf[0], s->io, n);
    conv(&r, &v->post_quant_conv, s->buf[1], s->buf[0], T_lat, h, w, &ho, &wo);
    stack_forward(&r, &v->dec);
    const int64_t out_n = (int64_t)r.t * 3 * r.h * r.w;
    s->be->download(s->be, pixels, r.cur, out_n);
    for (int64_t i = 0; i < out_n; i++)
        pixels[i] = pixels[i] < -1.0f ? -1.0f : pixels[i] > 1.0f ? 1.0f : pixels[i];
    return 0;
}
