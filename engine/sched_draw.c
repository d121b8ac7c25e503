/* Drawing an image on <BOV> (DESIGN §2 step 4, §6):
 *
 *   semantic condition  the connector over the accumulated condition rows of every position
 *                       before <BOV>; the negative (CFG) condition drops the last text
 *                       segment, i.e. the positions after the most recent image. With no
 *                       earlier image the whole conversation is that segment, and the
 *                       negative keeps only the first position, the way an empty prompt is
 *                       the unconditional branch of text-to-image guidance.
 *   visual condition    every earlier image, input or generated, as a clean VAE latent frame
 *                       at its own aspect ratio, scaled to the target's area (multiples of
 *                       16 pixels) so that the DiT's work stays bounded; latents come from the
 *                       latent cache when the image (by content hash) was seen at that size,
 *                       and a drawn image's latent goes there straight from the sampler
 *   sampling            the flow-matching sampler (UniPC over the post-trained Karras
 *                       schedule; a job's shift > 0 selects the shifted schedule), one
 *                       dg_sched_step() per denoising step, classifier-free guidance with the
 *                       visual conditions in both branches
 *   after               VAE decode, PNG (with the job id, seed and model in text chunks), the
 *                       image through the vision tower, and <BOV> <|vision_start|>
 *                       <|image_pad|>*n <|vision_end|> into the context; decoding goes on. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/image_preprocess.h"
#include "mllm/mrope.h"
#include "scheduler.h"

#define COND_TIMESTEP 1e-4f   /* the timestep of clean condition frames (post-trained Cosmos) */

int dg_draw_check(dg_sched *s, const dg_image_params *ip, char *err, size_t errlen) {
    const dg_model *m = s->m;
    int f = dg_vae_spatial_factor(&m->vae) * m->dit.cfg.patch_h;
    if (ip->width <= 0 || ip->height <= 0 || ip->width % f || ip->height % f) {
        snprintf(err, errlen, "image size %dx%d: width and height must be positive multiples of %d", ip->width,
                 ip->height, f);
        return DG_EINVAL;
    }
    if (ip->steps < 1 || ip->steps > DG_FLOW_MAX_STEPS) {
        snprintf(err, errlen, "image steps %d: must be 1..%d", ip->steps, DG_FLOW_MAX_STEPS);
        return DG_EINVAL;
    }
    return 0;
}

void dg_draw_clear(dg_sched *s, dg_seq *q) {
    (void)s;
    dg_flow_free(q->flow);
    q->flow = NULL;
}

void dg_draw_buffers_free(dg_sched *s, dg_draw_buffers *b) {
    const dg_model *m = s->m;
    dg_dit_state_free(&m->dit, b->dit);
    dg_vae_state_free(&m->vae, b->vae);
    free(b->latents);
    free(b->vel_c);
    free(b->vel_u);
    free(b->pixels);
    free(b->ctx_pos);
    free(b->ctx_neg);
    free(b->positions);
    memset(b, 0, sizeof *b);
}

/* Grows a host float buffer to n elements (at the start of an image, never per step). */
static int grow(float **buf, int64_t *cap, int64_t n) {
    if (*cap >= n) return 0;
    float *p = realloc(*buf, (size_t)n * sizeof *p);
    if (!p) return DG_ENOMEM;
    *buf = p;
    *cap = n;
    return 0;
}

/* A condition frame's size: the image's aspect ratio at about the target's area, in
 * multiples of `f` pixels. */
static void cond_size(int w0, int h0, int W, int H, int f, int *w, int *h) {
    double scale = sqrt((double)W * H / ((double)w0 * h0));
    *w = (int)lround(w0 * scale / f) * f;
    *h = (int)lround(h0 * scale / f) * f;
    if (*w < f) *w = f;
    if (*h < f) *h = f;
}

static void rgb_to_pixels(const dg_image *img, float *px) {
    int64_t plane = (int64_t)img->width * img->height;
    for (int64_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++) px[c * plane + i] = img->rgb[i * 3 + c] / 127.5f - 1.0f;
}

/* Makes sure the slot's VAE state fits an h x w frame. */
static int vae_room(dg_sched *s, dg_seq *q, int h, int w, char *err, size_t errlen) {
    dg_draw_buffers *b = &q->draw_buf;
    if (b->vae && b->vae_h >= h && b->vae_w >= w) return 0;
    int nh = h > b->vae_h ? h : b->vae_h, nw = w > b->vae_w ? w : b->vae_w;
    dg_vae_state_free(&s->m->vae, b->vae);
    b->vae = NULL;
    int rc = dg_vae_state_new(&s->m->vae, s->be, 1, nh, nw, &b->vae, err, errlen);
    if (rc < 0) return rc;
    b->vae_h = nh;
    b->vae_w = nw;
    return 0;
}

/* The latent of earlier image i at w x h pixels into `out`: from the cache, or encoded. */
static int cond_latent(dg_sched *s, dg_seq *q, int i, int w, int h, float *out, char *err, size_t errlen) {
    const dg_model *m = s->m;
    int f = dg_vae_spatial_factor(&m->vae), z = m->vae.cfg.z_dim;
    int64_t n = (int64_t)z * (h / f) * (w / f);
    const dg_seq_image *im = &q->images[i];
    const float *hit = dg_latent_cache_get(s->lcache, &im->hash, h, w, n);
    if (hit) {
        memcpy(out, hit, (size_t)n * sizeof *out);
        q->usage.cached_latents++;
        return 0;
    }
    double t0 = dg_sched_now_ms();
    dg_image *sized = NULL;
    int rc = 0;
    if (im->img->width != w || im->img->height != h) rc = dg_image_resize(im->img, w, h, &sized);
    if (rc < 0) {
        snprintf(err, errlen, "image %d: resizing to %dx%d failed", i + 1, w, h);
        return rc;
    }
    if ((rc = vae_room(s, q, h, w, err, errlen)) < 0 ||
        (rc = grow(&q->draw_buf.pixels, &q->draw_buf.pixels_cap, 3LL * w * h)) < 0)
        goto out;
    rgb_to_pixels(sized ? sized : im->img, q->draw_buf.pixels);
    if ((rc = dg_vae_encode(&m->vae, q->draw_buf.vae, q->draw_buf.pixels, 1, h, w, out, err, errlen)) < 0) goto out;
    rc = dg_latent_cache_put(s->lcache, &im->hash, h, w, out, n);
out:
    dg_image_free(sized);
    q->t.vae_ms += dg_sched_now_ms() - t0;
    return rc;
}

int dg_draw_begin(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    dg_draw_buffers *b = &q->draw_buf;
    int W = q->ip.width, H = q->ip.height, rc;
    int f = dg_vae_spatial_factor(&m->vae), z = m->vae.cfg.z_dim;

    /* room in the context for <BOV> and the image's tokens, plus one more token */
    int32_t grid[3];
    if ((rc = dg_image_grid(H, W, &m->pp, grid, err, errlen)) < 0) return rc;
    int tokens = dg_vision_tokens(&m->vision, grid[0], grid[1], grid[2]);
    if (q->n_images == DG_SEQ_MAX_IMAGES || q->kv.n_tokens + tokens + 4 >= m->max_context) return 1;

    double t0 = dg_sched_now_ms();
    /* semantic condition and its negative */
    int n_ctx = q->kv.n_tokens, seg = 0;
    for (int i = 0; i < q->n_images; i++) {
        int end = q->images[i].token0 + q->images[i].n_tokens + 1;   /* after <|vision_end|> */
        if (end > seg) seg = end;
    }
    int n_neg = seg > 0 ? seg : 1;
    if (!b->ctx_pos) {
        size_t rows = (size_t)m->max_context * (size_t)m->conn.d_cond;
        if (!(b->ctx_pos = malloc(rows * sizeof(float))) || !(b->ctx_neg = malloc(rows * sizeof(float))) ||
            !(b->positions = malloc((size_t)m->max_context * sizeof(int32_t)))) {
            snprintf(err, errlen, "out of memory for the condition rows");
            return DG_ENOMEM;
        }
    }
    for (int i = 0; i < n_ctx; i++) b->positions[i] = i;
    if ((rc = dg_cond_acc_finish(&m->conn, q->acc, b->positions, n_ctx, b->ctx_pos, err, errlen)) < 0 ||
        (rc = dg_cond_acc_finish(&m->conn, q->acc, b->positions, n_neg, b->ctx_neg, err, errlen)) < 0)
        return rc;
    q->n_ctx_pos = n_ctx;
    q->n_ctx_neg = n_neg;

    /* frames: the earlier images, then the noisy target */
    int hs[DG_DIT_MAX_FRAMES], ws[DG_DIT_MAX_FRAMES], cond[DG_DIT_MAX_FRAMES];
    int n_frames = q->n_images + 1;
    if (n_frames > DG_DIT_MAX_FRAMES) {
        snprintf(err, errlen, "%d earlier images: the DiT takes at most %d condition frames", q->n_images,
                 DG_DIT_MAX_FRAMES - 1);
        return DG_ELIMIT;
    }
    int64_t total = 0;
    for (int i = 0; i < n_frames; i++) {
        int w = W, h = H;
        if (i < q->n_images) cond_size(q->images[i].img->width, q->images[i].img->height, W, H, f * m->dit.cfg.patch_h, &w, &h);
        ws[i] = w;
        hs[i] = h;
        cond[i] = i < q->n_images;
        total += (int64_t)z * (h / f) * (w / f);
    }
    if ((rc = grow(&b->latents, &b->latents_cap, total)) < 0 || (rc = grow(&b->vel_c, &b->vel_cap, total)) < 0)
        goto nomem;
    b->vel_cap = 0;   /* vel_u grows to the same size */
    if ((rc = grow(&b->vel_u, &b->vel_cap, total)) < 0) goto nomem;
    int lat_h[DG_DIT_MAX_FRAMES], lat_w[DG_DIT_MAX_FRAMES];
    float *p = b->latents;
    for (int i = 0; i < n_frames; i++) {
        lat_h[i] = hs[i] / f;
        lat_w[i] = ws[i] / f;
        q->frame_lat[i] = p;
        q->timesteps[i] = COND_TIMESTEP;
        p += (int64_t)z * lat_h[i] * lat_w[i];
        if (i < q->n_images && (rc = cond_latent(s, q, i, ws[i], hs[i], q->frame_lat[i], err, errlen)) < 0) return rc;
    }
    q->n_frames = n_frames;
    q->target = n_frames - 1;
    q->W = W;
    q->H = H;
    q->lat_w = W / f;
    q->lat_h = H / f;
    int64_t n_target = (int64_t)z * q->lat_h * q->lat_w;
    dg_flow_noise(q->frame_lat[q->target], n_target, q->seed * 0x9E3779B97F4A7C15ull + (uint64_t)q->n_drawn + 1, 0);

    if ((rc = dg_dit_layout_build(&q->layout, lat_h, lat_w, cond, n_frames, z, m->dit.cfg.patch_h,
                                  m->dit.cfg.patch_w, err, errlen)) < 0)
        return rc;
    if (!b->dit || b->dit_tokens < q->layout.n_tokens) {
        dg_dit_state_free(&m->dit, b->dit);
        b->dit = NULL;
        if ((rc = dg_dit_state_new(&m->dit, s->be, (int)q->layout.n_tokens, m->max_context, &b->dit, err, errlen)) < 0)
            return rc;
        b->dit_tokens = (int)q->layout.n_tokens;
    }
    if ((rc = dg_dit_set_layout(&m->dit, b->dit, &q->layout, err, errlen)) < 0) return rc;

    float sig[DG_FLOW_MAX_STEPS + 1];
    if (q->ip.shift > 0) dg_flow_sigmas_shifted(sig, q->ip.steps, q->ip.shift, 0.999, 0.999 / q->ip.steps);
    else dg_flow_sigmas_karras(sig, q->ip.steps, 0.01, 200.0, 7.0);
    if ((rc = dg_flow_new(DG_FLOW_UNIPC, sig, q->ip.steps, n_target, &q->flow, err, errlen)) < 0) return rc;
    q->t.diffusion_ms += dg_sched_now_ms() - t0;
    q->state = SEQ_DRAW;
    q->sink.image_started(q->sink.user, q->n_drawn + 1, W, H, q->ip.steps);
    return 0;
nomem:
    snprintf(err, errlen, "out of memory for %lld latent values", (long long)total);
    return rc;
}

/* The drawn latent -> VAE -> RGB -> PNG -> the sink; the image joins the conversation. */
static int finish_image(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    dg_draw_buffers *b = &q->draw_buf;
    int W = q->W, H = q->H, rc;
    double t0 = dg_sched_now_ms();
    if ((rc = vae_room(s, q, H, W, err, errlen)) < 0 || (rc = grow(&b->pixels, &b->pixels_cap, 3LL * W * H)) < 0)
        return rc;
    if ((rc = dg_vae_decode(&m->vae, b->vae, q->frame_lat[q->target], 1, q->lat_h, q->lat_w, b->pixels, err,
                            errlen)) < 0)
        return rc;
    dg_seq_image *im = &q->images[q->n_images];
    if ((rc = dg_image_new(W, H, &im->img)) < 0) {
        snprintf(err, errlen, "out of memory for a %dx%d image", W, H);
        return rc;
    }
    int64_t plane = (int64_t)W * H;
    for (int64_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++) {
            float v = (b->pixels[c * plane + i] + 1.0f) * 127.5f;
            im->img->rgb[i * 3 + c] = (uint8_t)(v <= 0 ? 0 : v >= 255 ? 255 : lrintf(v));
        }
    q->n_images++;
    dg_image_hash(im->img, &im->hash);
    /* the sampler's latent, so that this image as a later condition is not encoded again */
    int64_t n_target = (int64_t)m->vae.cfg.z_dim * q->lat_h * q->lat_w;
    if ((rc = dg_latent_cache_put(s->lcache, &im->hash, H, W, q->frame_lat[q->target], n_target)) < 0) return rc;
    q->t.vae_ms += dg_sched_now_ms() - t0;

    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)q->seed);
    dg_kv text[3] = {{"duogen:job", q->job_id}, {"duogen:seed", seed}, {"duogen:model", dg_model_describe(m)}};
    uint8_t *png = NULL;
    size_t png_len = 0;
    if ((rc = dg_image_encode_png(im->img, text, 3, &png, &png_len, err, errlen)) < 0) return rc;
    q->n_drawn++;
    q->sink.image_done(q->sink.user, q->n_drawn, W, H, png, png_len);
    free(png);

    /* into the context: <BOV> <|vision_start|> <|image_pad|>*n <|vision_end|> */
    t0 = dg_sched_now_ms();
    if ((rc = dg_image_grid(H, W, &m->pp, im->grid, err, errlen)) < 0) return rc;
    im->n_tokens = dg_vision_tokens(&m->vision, im->grid[0], im->grid[1], im->grid[2]);
    const dg_image *one[1] = {im->img};
    int computed = 0;
    if ((rc = dg_vision_encode(&m->vision, s->vs, s->vcache, &m->pp, one, 1, s->embeds, &computed, err, errlen)) < 0)
        return rc;
    q->t.vision_ms += dg_sched_now_ms() - t0;
    int n = im->n_tokens + 3, n_past = q->kv.n_tokens;
    int32_t *ids = malloc((size_t)n * sizeof *ids), *pos = malloc((size_t)3 * n * sizeof *pos);
    uint64_t *keys = calloc((size_t)n, sizeof *keys);
    if (!ids || !pos || !keys) {
        rc = DG_ENOMEM;
        snprintf(err, errlen, "out of memory for an image's tokens");
        goto out;
    }
    ids[0] = m->bov_id;
    ids[1] = m->vision_start_id;
    for (int i = 0; i < im->n_tokens; i++) {
        ids[2 + i] = m->image_pad_id;
        keys[2 + i] = dg_sched_image_key(&im->hash);
    }
    ids[n - 1] = m->vision_end_id;
    im->token0 = n_past + 2;
    int next;
    dg_mrope_params mp = {m->image_pad_id, m->pp.merge_size};
    if ((rc = dg_mrope_index(ids, n, n_past + q->rope_delta, &mp, (const int32_t (*)[3])im->grid, 1, pos, &next, err,
                             errlen)) < 0)
        goto out;
    t0 = dg_sched_now_ms();
    rc = dg_sched_feed(s, q, ids, n, pos, n, s->embeds, keys, 1, err, errlen);
    q->t.prefill_ms += dg_sched_now_ms() - t0;
    q->rope_delta = dg_mrope_delta(next, n_past + n);
out:
    free(ids);
    free(pos);
    free(keys);
    return rc;
}

int dg_draw_step(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    dg_draw_buffers *b = &q->draw_buf;
    double t0 = dg_sched_now_ms();
    float sigma = dg_flow_sigma(q->flow);
    q->timesteps[q->target] = sigma;
    const float *const *lat = (const float *const *)q->frame_lat;
    dg_dit_input in = {.latents = lat, .timesteps = q->timesteps, .ctx = b->ctx_pos, .n_ctx = q->n_ctx_pos};
    int rc = dg_dit_forward(&m->dit, b->dit, &in, b->vel_c, err, errlen);
    if (rc < 0) return rc;
    int64_t off = q->frame_lat[q->target] - b->latents;   /* the target's velocity follows the conditions' */
    int64_t n_target = (int64_t)m->vae.cfg.z_dim * q->lat_h * q->lat_w;
    float *v = b->vel_c + off;
    if (q->ip.guidance_scale > 0) {
        in.ctx = b->ctx_neg;
        in.n_ctx = q->n_ctx_neg;
        if ((rc = dg_dit_forward(&m->dit, b->dit, &in, b->vel_u, err, errlen)) < 0) return rc;
        dg_flow_cfg(v, v, b->vel_u + off, q->ip.guidance_scale, n_target);
    }
    if ((rc = dg_flow_step(q->flow, q->frame_lat[q->target], v)) < 0) {
        snprintf(err, errlen, "sampler: step past the end");
        return rc;
    }
    q->t.diffusion_ms += dg_sched_now_ms() - t0;
    int step = q->flow->step;
    q->sink.step(q->sink.user, q->n_drawn + 1, step, q->ip.steps);
    if (step < q->ip.steps) return 0;
    dg_draw_clear(s, q);
    q->state = SEQ_DECODE;
    return finish_image(s, q, err, errlen);
}
