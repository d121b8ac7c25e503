/* painter.c — drawing one image: conditions, DiT steps with the flow sampler, VAE
 * (painter.h says what and in which order). One painter per scheduler slot; its buffers
 * grow at begin when an image needs more and are kept for the next. */
#include "draw/painter.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "draw/flow.h"
#include "io/image_preprocess.h"

#define COND_TIMESTEP 1e-4f   /* the timestep of clean condition frames (post-trained Cosmos) */

struct dg_painter {
    const dg_dit       *dit;    /* borrowed */
    const dg_vae       *vae;    /* borrowed */
    const dg_connector *conn;   /* borrowed */
    dg_backend         *be;     /* borrowed: the scheduler's fork */
    int                 max_context;
    int64_t             max_condition_pixels;

    /* buffers, grown at begin and kept for the next image */
    dg_painter_scratch *scr;    /* the VAE's state and the pixels: shared, or own */
    int                 own_scr;
    float   *latents;  int64_t latents_cap;   /* host: every frame's latent, frame after frame */
    float   *vel_c;    int64_t vel_c_cap;     /* host: the DiT's velocity of every frame, conditional */
    float   *vel_u;    int64_t vel_u_cap;     /* host: the same, unconditional */
    float   *ctx_pos, *ctx_neg;               /* host [max_context, d_cond] */
    int32_t *positions;                       /* [max_context] 0, 1, 2, ... */

    /* the image in progress */
    dg_flow         *flow;      /* owned; NULL when no image is in progress */
    dg_dit_layout    layout;
    int              n_frames, target;                 /* frames; the target's frame index */
    float           *frame_lat[DG_DIT_MAX_FRAMES];     /* into latents */
    float            timesteps[DG_DIT_MAX_FRAMES];
    int              n_ctx_pos, n_ctx_neg;
    int              W, H, lat_w, lat_h;
    int              steps;
    float            guidance_scale;
    int              guided;                           /* both branches (guidance_scale > guided_above) */
    dg_painter_cost  cost;
};

struct dg_painter_scratch {
    const dg_vae *vae;          /* borrowed */
    dg_backend   *be;           /* borrowed */
    const dg_dit *dit;          /* borrowed: of the state below, set by the first painter */
    dg_dit_state *dit_state;    int dit_tokens, dit_ctx;   /* of one forward: both CFG branches;
                                                              its layout the last stepped one's */
    dg_vae_state *vae_state;    int vae_h, vae_w;
    float        *pixels;       int64_t pixels_cap;    /* host [3, H, W] in [-1, 1] */
};

dg_painter_scratch *dg_painter_scratch_new(const dg_vae *vae, dg_backend *be) {
    dg_painter_scratch *s = calloc(1, sizeof *s);
    if (s) {
        s->vae = vae;
        s->be = be;
    }
    return s;
}

void dg_painter_scratch_free(dg_painter_scratch *s) {
    if (!s) return;
    if (s->dit) dg_dit_state_free(s->dit, s->dit_state);
    dg_vae_state_free(s->vae, s->vae_state);
    free(s->pixels);
    free(s);
}

int dg_painter_new(const dg_dit *dit, const dg_vae *vae, const dg_connector *conn, dg_backend *be,
                   dg_painter_scratch *scratch, int max_context, int64_t max_condition_pixels, dg_painter **out,
                   char *err, size_t errlen) {
    *out = NULL;
    if (max_condition_pixels < 0) {
        snprintf(err, errlen, "max_condition_pixels %lld: must be 0 (the default) or positive",
                 (long long)max_condition_pixels);
        return DG_EINVAL;
    }
    *out = calloc(1, sizeof **out);
    if (!*out) {
        snprintf(err, errlen, "out of memory for a painter");
        return DG_ENOMEM;
    }
    if (!((*out)->scr = scratch ? scratch : dg_painter_scratch_new(vae, be))) {
        free(*out);
        *out = NULL;
        snprintf(err, errlen, "out of memory for a painter");
        return DG_ENOMEM;
    }
    (*out)->own_scr = !scratch;
    (*out)->dit = dit;
    (*out)->vae = vae;
    (*out)->conn = conn;
    (*out)->be = be;
    (*out)->max_context = max_context;
    (*out)->max_condition_pixels = max_condition_pixels ? max_condition_pixels : DG_PAINTER_MAX_CONDITION_PIXELS;
    return 0;
}

void dg_painter_free(dg_painter *p) {
    if (!p) return;
    dg_flow_free(p->flow);
    if (p->own_scr) dg_painter_scratch_free(p->scr);
    free(p->latents);
    free(p->vel_c);
    free(p->vel_u);
    free(p->ctx_pos);
    free(p->ctx_neg);
    free(p->positions);
    free(p);
}

int dg_painter_check(const dg_painter *p, const dg_image_params *params, char *err, size_t errlen) {
    int f = dg_vae_spatial_factor(p->vae) * p->dit->cfg.patch_h;
    if (params->width <= 0 || params->height <= 0 || params->width % f || params->height % f) {
        snprintf(err, errlen, "image size %dx%d: width and height must be positive multiples of %d", params->width,
                 params->height, f);
        return DG_EINVAL;
    }
    /* the DiT's positions reach max_size / patch latents a side (Cosmos-Predict2.5: 240 / 2
     * patches of 16 pixels, 1920): a larger picture would fail at its first step, after the
     * answer's text and the state for it */
    const int fh = dg_vae_spatial_factor(p->vae) * p->dit->cfg.patch_h, fw = dg_vae_spatial_factor(p->vae) * p->dit->cfg.patch_w;
    if (params->height / fh > p->dit->cfg.max_h || params->width / fw > p->dit->cfg.max_w) {
        snprintf(err, errlen, "image size %dx%d: this model draws at most %dx%d (its DiT's max_size)", params->width,
                 params->height, p->dit->cfg.max_w * fw, p->dit->cfg.max_h * fh);
        return DG_ELIMIT;
    }
    if (params->steps < 1 || params->steps > DG_FLOW_MAX_STEPS) {
        snprintf(err, errlen, "image steps %d: must be 1..%d", params->steps, DG_FLOW_MAX_STEPS);
        return DG_EINVAL;
    }
    return 0;
}

void dg_painter_cost_get(const dg_painter *p, dg_painter_cost *out) { *out = p->cost; }

/* ---- buffers ----------------------------------------------------------------------------- */

/* Grows a host float buffer to n elements (at the start of an image, never per step). */
static int grow(float **buf, int64_t *cap, int64_t n, const char *what, char *err, size_t errlen) {
    if (*cap >= n) return 0;
    float *q = realloc(*buf, (size_t)n * sizeof *q);
    if (!q) {
        snprintf(err, errlen, "out of memory for %lld %s values", (long long)n, what);
        return DG_ENOMEM;
    }
    *buf = q;
    *cap = n;
    return 0;
}

/* Makes sure the VAE state fits an h x w frame: kept while it does, else made for h x w
 * alone (growing each side to the largest seen made a 16x1920 then a 1920x16 picture hold
 * the scratch of a 1920x1920 one: ~11 GB at the published VAE's width, where 0.1 GB did). */
static int vae_room(dg_painter_scratch *s, int h, int w, char *err, size_t errlen) {
    if (s->vae_state && s->vae_h >= h && s->vae_w >= w) return 0;
    dg_vae_state_free(s->vae, s->vae_state);
    s->vae_state = NULL;
    int rc = dg_vae_state_new(s->vae, s->be, 1, h, w, &s->vae_state, err, errlen);
    if (rc < 0) return rc;
    s->vae_h = h;
    s->vae_w = w;
    return 0;
}

/* ---- begin -------------------------------------------------------------------------------- */

/* The connector's rows of the conditional branch into ctx_pos, and of the unconditional
 * one into ctx_neg when the image is guided (p->guided set). */
static int semantic_conditions(dg_painter *p, const dg_painter_job *job, char *err, size_t errlen) {
    if (!p->positions) {   /* made last: an earlier try may have got the others only */
        size_t rows = (size_t)p->max_context * (size_t)p->conn->d_cond;
        if (!p->ctx_pos) p->ctx_pos = malloc(rows * sizeof(float));
        if (!p->ctx_neg) p->ctx_neg = malloc(rows * sizeof(float));
        if (!p->ctx_pos || !p->ctx_neg || !(p->positions = malloc((size_t)p->max_context * sizeof(int32_t)))) {
            snprintf(err, errlen, "out of memory for the condition rows");
            return DG_ENOMEM;
        }
        for (int i = 0; i < p->max_context; i++) p->positions[i] = i;
    }
    int rc;
    if ((rc = dg_cond_acc_finish(p->conn, job->acc, p->positions, job->n_pos, p->ctx_pos, err, errlen)) < 0 ||
        (p->guided && (rc = dg_cond_acc_finish(p->conn, job->acc_neg ? job->acc_neg : job->acc, p->positions,
                                               job->n_neg, p->ctx_neg, err, errlen)) < 0))
        return rc;
    p->n_ctx_pos = job->n_pos;
    p->n_ctx_neg = p->guided ? job->n_neg : 0;
    return 0;
}

/* A condition frame's size in pixels, multiples of f (the VAE factor times the DiT patch,
 * at least f each): the image's own size, rounded to the nearest multiples; when the image
 * has more than max_condition_pixels pixels or more patches than the DiT's RoPE range,
 * scaled down first, aspect kept (rounded down where the nearest multiples would break
 * the pixel bound). */
static void cond_size(const dg_painter *p, int w0, int h0, int f, int *w, int *h) {
    const double max_px = (double)p->max_condition_pixels;
    const double max_w = (double)p->dit->cfg.max_w * f, max_h = (double)p->dit->cfg.max_h * f;
    double s = 1.0;
    if ((double)w0 * h0 > max_px) s = sqrt(max_px / ((double)w0 * h0));
    if (w0 * s > max_w) s = max_w / w0;
    if (h0 * s > max_h) s = max_h / h0;
    long nw = lround(w0 * s / f), nh = lround(h0 * s / f);
    if ((double)nw * nh * f * f > max_px) {
        nw = (long)floor(w0 * s / f);
        nh = (long)floor(h0 * s / f);
    }
    *w = (int)(nw < 1 ? 1 : nw) * f;
    *h = (int)(nh < 1 ? 1 : nh) * f;
}

/* Frame sizes (the earlier images, then the target), their places in the latent buffer,
 * and the DiT layout; the buffers grown to fit. */
static int place_frames(dg_painter *p, const dg_painter_job *job, char *err, size_t errlen) {
    int f = dg_vae_spatial_factor(p->vae), z = p->vae->cfg.z_dim;
    int n_frames = job->n_conds + 1, rc;
    if (n_frames > DG_DIT_MAX_FRAMES) {
        snprintf(err, errlen, "%d earlier images: the DiT takes at most %d condition frames", job->n_conds,
                 DG_DIT_MAX_FRAMES - 1);
        return DG_ELIMIT;
    }
    int lat_h[DG_DIT_MAX_FRAMES], lat_w[DG_DIT_MAX_FRAMES], cond[DG_DIT_MAX_FRAMES];
    int64_t total = 0;
    for (int i = 0; i < n_frames; i++) {
        int w = p->W, h = p->H;
        if (i < job->n_conds)
            cond_size(p, job->conds[i].img->width, job->conds[i].img->height, f * p->dit->cfg.patch_h, &w, &h);
        lat_h[i] = h / f;
        lat_w[i] = w / f;
        cond[i] = i < job->n_conds;
        total += (int64_t)z * lat_h[i] * lat_w[i];
    }
    if ((rc = grow(&p->latents, &p->latents_cap, total, "latent", err, errlen)) < 0 ||
        (rc = grow(&p->vel_c, &p->vel_c_cap, total, "velocity", err, errlen)) < 0 ||
        (rc = grow(&p->vel_u, &p->vel_u_cap, total, "velocity", err, errlen)) < 0)
        return rc;
    float *lat = p->latents;
    for (int i = 0; i < n_frames; i++) {
        p->frame_lat[i] = lat;
        p->timesteps[i] = COND_TIMESTEP;
        lat += (int64_t)z * lat_h[i] * lat_w[i];
    }
    p->n_frames = n_frames;
    p->target = n_frames - 1;
    return dg_dit_layout_build(&p->layout, lat_h, lat_w, cond, n_frames, z, p->dit->cfg.patch_h,
                               p->dit->cfg.patch_w, err, errlen);
}

static void rgb_to_pixels(const dg_image *img, float *px) {
    int64_t plane = (int64_t)img->width * img->height;
    for (int64_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++) px[c * plane + i] = img->rgb[i * 3 + c] / 127.5f - 1.0f;
}

/* The latent of earlier image i at its frame's size into its frame: the VAE encoding of
 * its 8-bit pixels (resized to the frame when they differ), from the cache, or encoded and
 * then cached. */
static int cond_latent(dg_painter *p, const dg_painter_job *job, int i, char *err, size_t errlen) {
    int f = dg_vae_spatial_factor(p->vae), z = p->vae->cfg.z_dim;
    int h = p->layout.frames[i].h * f, w = p->layout.frames[i].w * f;
    int64_t n = (int64_t)z * p->layout.frames[i].h * p->layout.frames[i].w;
    const dg_painter_cond *c = &job->conds[i];
    float *out = p->frame_lat[i];
    const float *hit = dg_latent_cache_get(job->lcache, c->hash, h, w, n);
    if (hit) {
        memcpy(out, hit, (size_t)n * sizeof *out);
        p->cost.cached_latents++;
        return 0;
    }
    double t0 = dg_clock_now_ms();
    dg_image *sized = NULL;
    int rc = 0;
    if (c->img->width != w || c->img->height != h) rc = dg_image_resize(c->img, w, h, &sized);
    if (rc < 0) {
        snprintf(err, errlen, "image %d: resizing to %dx%d failed", i + 1, w, h);
        return rc;
    }
    dg_painter_scratch *scr = p->scr;
    if ((rc = vae_room(scr, h, w, err, errlen)) < 0 ||
        (rc = grow(&scr->pixels, &scr->pixels_cap, 3LL * w * h, "pixel", err, errlen)) < 0)
        goto out;
    rgb_to_pixels(sized ? sized : c->img, scr->pixels);
    if ((rc = dg_vae_encode(p->vae, scr->vae_state, scr->pixels, 1, h, w, out, err, errlen)) < 0) goto out;
    if ((rc = dg_latent_cache_put(job->lcache, c->hash, h, w, out, n)) < 0)
        snprintf(err, errlen, "image %d: out of memory for the latent cache", i + 1);
out:
    dg_image_free(sized);
    p->cost.vae_ms += dg_clock_now_ms() - t0;
    return rc;
}

/* The shared DiT state made to fit this painter's forward (both branches when guided) and
 * set to its layout. The state only grows: a new one is made before the old is let go, so
 * that a failure leaves the other painters' images a state that fits them. */
static int dit_room(dg_painter *p, char *err, size_t errlen) {
    dg_painter_scratch *scr = p->scr;
    const int branches = dg_painter_branches(p), tokens = branches * (int)p->layout.n_tokens;
    const int ctx = branches * p->max_context;
    if (!scr->dit_state || scr->dit_tokens < tokens || scr->dit_ctx < ctx) {
        const int t = scr->dit_tokens > tokens ? scr->dit_tokens : tokens, c = scr->dit_ctx > ctx ? scr->dit_ctx : ctx;
        dg_dit_state *grown = NULL;
        int rc = dg_dit_state_new(p->dit, p->be, t, c, &grown, err, errlen);
        if (rc < 0) return rc;
        if (scr->dit_state) dg_dit_state_free(scr->dit, scr->dit_state);
        scr->dit = p->dit;
        scr->dit_state = grown;
        scr->dit_tokens = t;
        scr->dit_ctx = c;
    }
    if (scr->dit_state->has_layout && dg_dit_layout_same(&scr->dit_state->layout, &p->layout)) return 0;
    return dg_dit_set_layout(p->dit, scr->dit_state, &p->layout, err, errlen);
}

/* The target's noise, a DiT state that fits the layout, and the sampler. */
static int prepare_sampler(dg_painter *p, const dg_painter_job *job, char *err, size_t errlen) {
    int64_t n_target = (int64_t)p->vae->cfg.z_dim * p->lat_h * p->lat_w;
    dg_flow_noise(p->frame_lat[p->target], n_target, job->seed * 0x9E3779B97F4A7C15ull + (uint64_t)job->index + 1, 0);
    int rc;
    /* with guidance both branches go through one forward: twice the tokens, both contexts */
    if ((rc = dit_room(p, err, errlen)) < 0) return rc;
    const dg_image_params *ip = &job->params;
    float sig[DG_FLOW_MAX_STEPS + 1];
    if (ip->schedule == DG_SCHEDULE_SHIFTED) dg_flow_sigmas_shifted(sig, ip->steps, ip->shift, 0.999, 0.999 / ip->steps);
    else dg_flow_sigmas_karras(sig, ip->steps, 0.01, 200.0, 7.0);
    return dg_flow_new(DG_FLOW_UNIPC, sig, ip->steps, n_target, &p->flow, err, errlen);
}

int dg_painter_begin(dg_painter *p, const dg_painter_job *job, char *err, size_t errlen) {
    double t0 = dg_clock_now_ms();
    int f = dg_vae_spatial_factor(p->vae), rc;
    dg_flow_free(p->flow);
    p->flow = NULL;
    p->cost = (dg_painter_cost){0};
    p->W = job->params.width;
    p->H = job->params.height;
    p->lat_w = p->W / f;
    p->lat_h = p->H / f;
    p->steps = job->params.steps;
    p->guidance_scale = job->params.guidance_scale;
    p->guided = job->params.guidance_scale > job->guided_above;
    if ((rc = semantic_conditions(p, job, err, errlen)) < 0 || (rc = place_frames(p, job, err, errlen)) < 0)
        return rc;
    for (int i = 0; i < job->n_conds; i++)
        if ((rc = cond_latent(p, job, i, err, errlen)) < 0) return rc;
    if ((rc = prepare_sampler(p, job, err, errlen)) < 0) return rc;
    p->cost.diffusion_ms += dg_clock_now_ms() - t0;
    return 0;
}

/* ---- steps and the result ------------------------------------------------------------------- */

const dg_dit_layout *dg_painter_layout(const dg_painter *p) { return p->flow ? &p->layout : NULL; }

int dg_painter_branches(const dg_painter *p) { return p->guided ? 2 : 1; }

int dg_painter_inputs(dg_painter *p, dg_dit_input *in, float **velocity) {
    p->timesteps[p->target] = dg_flow_sigma(p->flow);
    const float *const *lat = (const float *const *)p->frame_lat;
    in[0] = (dg_dit_input){.latents = lat, .timesteps = p->timesteps, .ctx = p->ctx_pos, .n_ctx = p->n_ctx_pos};
    velocity[0] = p->vel_c;
    if (!p->guided) return 1;
    in[1] = (dg_dit_input){.latents = lat, .timesteps = p->timesteps, .ctx = p->ctx_neg, .n_ctx = p->n_ctx_neg};
    velocity[1] = p->vel_u;
    return 2;
}

int dg_painter_advance(dg_painter *p, double forward_ms, char *err, size_t errlen) {
    double t0 = dg_clock_now_ms();
    const int branches = dg_painter_branches(p);
    p->cost.dit_forwards += branches;
    int64_t off = p->frame_lat[p->target] - p->latents;   /* the target's velocity follows the conditions' */
    int64_t n_target = (int64_t)p->vae->cfg.z_dim * p->lat_h * p->lat_w;
    float *v = p->vel_c + off;
    if (branches == 2) dg_flow_cfg(v, v, p->vel_u + off, p->guidance_scale, n_target);
    if (dg_flow_step(p->flow, p->frame_lat[p->target], v) < 0) {
        snprintf(err, errlen, "sampler: step past the end");
        return DG_EINTERNAL;
    }
    p->cost.diffusion_ms += forward_ms + dg_clock_now_ms() - t0;
    return p->flow->step;
}

int dg_painter_step(dg_painter *p, char *err, size_t errlen) {
    dg_dit_input in[2];
    float *vel[2];
    const int branches = dg_painter_inputs(p, in, vel);
    double t0 = dg_clock_now_ms();
    /* the shared state: another painter's layout may be set on it since this one's step */
    int rc = dit_room(p, err, errlen);
    if (rc < 0) return rc;
    /* the conditional branch and, with guidance, the unconditional one: one forward */
    rc = dg_dit_forward_batch(p->dit, p->scr->dit_state, in, branches, vel, err, errlen);
    if (rc < 0) return rc;
    return dg_painter_advance(p, dg_clock_now_ms() - t0, err, errlen);
}

/* 1 when any value was NaN or infinite. */
static int pixels_to_rgb(const float *px, dg_image *img) {
    int64_t plane = (int64_t)img->width * img->height;
    int nonfinite = 0;
    for (int64_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++) {
            float v = (px[c * plane + i] + 1.0f) * 127.5f;
            nonfinite |= !isfinite(v);
            /* NaN (a diverged latent) fails every comparison: it goes to 0, for lrintf's
             * result for it is unspecified (C11 7.12.9.5) */
            img->rgb[i * 3 + c] = (uint8_t)(!(v > 0) ? 0 : v >= 255 ? 255 : lrintf(v));
        }
    return nonfinite;
}

int dg_painter_finish(dg_painter *p, dg_image **out, dg_image_digest *hash, char *err, size_t errlen) {
    *out = NULL;
    double t0 = dg_clock_now_ms();
    dg_image *img = NULL;
    int W = p->W, H = p->H, rc;
    const float *target = p->frame_lat[p->target];
    dg_painter_scratch *scr = p->scr;
    if ((rc = vae_room(scr, H, W, err, errlen)) < 0 ||
        (rc = grow(&scr->pixels, &scr->pixels_cap, 3LL * W * H, "pixel", err, errlen)) < 0 ||
        (rc = dg_vae_decode(p->vae, scr->vae_state, target, 1, p->lat_h, p->lat_w, scr->pixels, err, errlen)) < 0)
        goto out;
    if ((rc = dg_image_new(W, H, &img)) < 0) {
        snprintf(err, errlen, "out of memory for a %dx%d image", W, H);
        goto out;
    }
    p->cost.nonfinite = pixels_to_rgb(scr->pixels, img);
    dg_image_hash(img, hash);
    *out = img;
    img = NULL;
out:
    dg_image_free(img);
    dg_flow_free(p->flow);
    p->flow = NULL;
    p->cost.vae_ms += dg_clock_now_ms() - t0;
    return rc;
}
