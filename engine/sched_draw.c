/* sched_draw.c — the scheduler's side of drawing (docs/DESIGN.md §6 "Batching"): an image
 * begins on a sampled <BOV> (the slot's painter, draw/painter.h, is given the conditions),
 * takes one denoising step a scheduler step, and at its end is sent as a PNG and fed back
 * into the context. The sequences whose images have the same DiT layout take their step
 * in one forward (both CFG branches of each, DG_DIT_MAX_BATCH inputs at most) on the
 * scheduler's shared DiT state, which grows when an image begins that could join others,
 * up to a bound (small images are where company pays: a large image's forward is large
 * GEMMs already, and its state would cost a GPU much memory); an image alone steps on its
 * painter's own state. On the CPU the pictures are the same
 * bits either way (dit.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "scheduler.h"

int dg_sched_picture_room(const dg_model *m, const dg_image_params *ip, char *err, size_t errlen) {
    int32_t grid[3];
    int rc = dg_image_grid(ip->height, ip->width, &m->pp, grid, err, errlen);
    return rc < 0 ? rc : dg_vision_tokens(&m->vision, grid[0], grid[1], grid[2]) + 4;
}

/* On a sampled <BOV>: the slot's painter begins the image (state SEQ_DRAW), or 1 when the
 * context has no room for <BOV>, the image's tokens and one more token. */
static int painter_begin(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    int rc, room = dg_sched_picture_room(m, &q->ip, err, errlen);
    if (room < 0) return room;
    if (q->n_images == DG_SEQ_MAX_IMAGES || q->kv.n_tokens + room >= m->max_context) return 1;
    /* The negative condition drops the last text segment, the positions after the most
     * recent image; with no earlier image the whole conversation is that segment, and
     * the negative keeps only the first position, the way an empty prompt is the
     * unconditional branch of text-to-image guidance. */
    dg_painter_cond conds[DG_SEQ_MAX_IMAGES];
    int seg = 0, n_conds = 0;
    const int first = s->o.max_condition_frames && q->n_images > s->o.max_condition_frames
                          ? q->n_images - s->o.max_condition_frames : 0;   /* the latest frames only */
    for (int i = 0; i < q->n_images; i++) {
        int end = q->images[i].token0 + q->images[i].n_tokens + 1;   /* after <|vision_end|> */
        if (end > seg) seg = end;
        if (i >= first) conds[n_conds++] = (dg_painter_cond){q->images[i].img, &q->images[i].hash};
    }
    dg_painter_job job = {.acc = q->acc, .n_pos = q->kv.n_tokens, .n_neg = seg > 0 ? seg : 1, .conds = conds,
                          .n_conds = n_conds, .lcache = s->lcache, .seed = q->seed, .index = q->n_drawn,
                          .params = q->ip, .guided_above = m->cond_from_prompt ? 1.0f : 0.0f};
    if (m->cond_from_prompt) {   /* a published pipeline's condition: the image's prompt alone */
        if ((rc = dg_prompt_cond_encode(s->pc, s->st, q->cond_user, q->n_cond_user, q->cond_answer,
                                        q->n_cond_answer, &job.acc, err, errlen)) < 0 ||
            (q->ip.guidance_scale > job.guided_above &&   /* the negative prompt only where it guides */
             (rc = dg_prompt_cond_negative(s->pc, s->st, &job.acc_neg, err, errlen)) < 0))
            return rc;
        job.n_pos = job.n_neg = m->recipe.max_tokens;
    }
    if ((rc = dg_painter_begin(q->painter, &job, err, errlen)) < 0) return rc;
    q->state = SEQ_DRAW;
    q->sink.image_started(q->sink.user, q->n_drawn + 1, q->ip.width, q->ip.height, q->ip.steps);
    return 0;
}

void dg_sched_draw_account(dg_seq *q) {
    dg_painter_cost c;
    dg_painter_cost_get(q->painter, &c);
    q->t.diffusion_ms += c.diffusion_ms;
    q->t.vae_ms += c.vae_ms;
    q->usage.cached_latents += c.cached_latents;
    q->usage.dit_forwards += c.dit_forwards;
    q->usage.nonfinite_images += c.nonfinite;
}

/* The drawn image as a PNG (with the job id, seed and model in text chunks) to the sink. */
static int send_png(dg_sched *s, dg_seq *q, const dg_image *img, char *err, size_t errlen) {
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)q->seed);
    dg_kv text[3] = {{"duogen:job", q->job_id}, {"duogen:seed", seed}, {"duogen:model", dg_model_describe(s->m)}};
    uint8_t *png = NULL;
    size_t png_len = 0;
    int rc = dg_image_encode_png(img, text, 3, &png, &png_len, err, errlen);
    if (rc < 0) return rc;
    q->n_drawn++;
    q->sink.image_done(q->sink.user, q->n_drawn, img->width, img->height, png, png_len);
    free(png);
    return 0;
}

/* After the painter's step `step` (or its failure): the event; after the last, the image
 * is finished, sent and becomes the sequence's feed (state SEQ_PREFILL), which this step's
 * forward begins. */
static int stepped(dg_sched *s, dg_seq *q, int step, char *err, size_t errlen) {
    if (step < 0) return step;
    q->sink.step(q->sink.user, q->n_drawn + 1, step, q->ip.steps);
    if (step < q->ip.steps) return 0;
    q->state = SEQ_DECODE;
    dg_seq_image *im = &q->images[q->n_images];
    int rc = dg_painter_finish(q->painter, &im->img, &im->hash, err, errlen);
    dg_sched_draw_account(q);
    if (rc < 0) return rc;
    q->n_images++;
    if ((rc = send_png(s, q, im->img, err, errlen)) < 0) return rc;
    return dg_sched_feed_image(s, q, err, errlen);
}
/* The shared DiT state holds a step of every image of the layout of q's (q's included), up
 * to DG_SCHED_GROUP_TOKENS and DG_SCHED_GROUP_CTX: grown when needed; left as it was when it
 * cannot grow (those images then step apart). */
static void group_room(dg_sched *s, dg_seq *q) {
    const dg_dit_layout *L = dg_painter_layout(q->painter);
    dg_dit_input in[2];
    float *vel[2];
    int inputs = 0, ctx = 0, others = 0;
    char err[256];
    for (int i = 0; i < s->n_seqs; i++) {
        dg_seq *r = &s->seqs[i];
        if (r->state != SEQ_DRAW || !dg_dit_layout_same(dg_painter_layout(r->painter), L)) continue;
        int k = dg_painter_inputs(r->painter, in, vel);
        if (inputs + k > DG_DIT_MAX_BATCH) break;
        for (int j = 0; j < k; j++) ctx += in[j].n_ctx;
        inputs += k;
        others += r != q;
    }
    int t = inputs * (int)L->n_tokens, c = ctx;
    if (t > DG_SCHED_GROUP_TOKENS) t = DG_SCHED_GROUP_TOKENS;
    if (c > DG_SCHED_GROUP_CTX) c = DG_SCHED_GROUP_CTX;
    if (!others || (s->dit_tokens >= t && s->dit_ctx >= c)) return;
    if (t < s->dit_tokens) t = s->dit_tokens;
    if (c < s->dit_ctx) c = s->dit_ctx;
    dg_dit_state *grown = NULL;
    if (dg_dit_state_new(&s->m->dit, s->be, t, c, &grown, err, sizeof err) < 0) return;
    dg_dit_state_free(&s->m->dit, s->dit);
    s->dit = grown;
    s->dit_tokens = t;
    s->dit_ctx = c;
}

int dg_sched_draw_begin(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    int rc = painter_begin(s, q, err, errlen);
    if (rc == 0) group_room(s, q);
    return rc;
}

/* One forward for the images of g[0..n-1] (one layout) on the shared state; each painter
 * then takes its step with its share of the forward's time. */
static void group_step(dg_sched *s, dg_seq **g, int n, const dg_dit_input *in, float *const *vel, int n_in) {
    const dg_dit_layout *L = dg_painter_layout(g[0]->painter);
    char msg[512] = "";
    int rc = 0;
    if (!s->dit->has_layout || !dg_dit_layout_same(&s->dit->layout, L))
        rc = dg_dit_set_layout(&s->m->dit, s->dit, L, msg, sizeof msg);
    double t0 = dg_clock_now_ms();
    if (rc == 0) rc = dg_dit_forward_batch(&s->m->dit, s->dit, in, n_in, vel, msg, sizeof msg);
    const double ms = dg_clock_now_ms() - t0;
    for (int i = 0; i < n; i++) {
        dg_seq *q = g[i];
        int step = rc < 0 ? rc : dg_painter_advance(q->painter, ms * dg_painter_branches(q->painter) / n_in,
                                                     q->step_err, sizeof q->step_err);
        if (rc < 0) snprintf(q->step_err, sizeof q->step_err, "%s", msg);
        if ((step = stepped(s, q, step, q->step_err, sizeof q->step_err)) < 0) q->step_rc = step;
    }
}

int dg_sched_draw(dg_sched *s) {
    dg_seq *g[DG_DIT_MAX_BATCH];
    dg_dit_input in[DG_DIT_MAX_BATCH];
    float *vel[DG_DIT_MAX_BATCH];
    int drawing = 0;
    for (int i = 0; i < s->n_seqs; i++) {
        s->seqs[i].draw_due = s->seqs[i].state == SEQ_DRAW;
        s->seqs[i].step_rc = 0;
        drawing += s->seqs[i].draw_due;
    }
    for (int i = 0; i < s->n_seqs; i++) {
        dg_seq *q = &s->seqs[i];
        if (!q->draw_due) continue;
        const dg_dit_layout *L = dg_painter_layout(q->painter);
        int n = 0, n_in = 0, ctx = 0;
        /* q, then the later images of its layout that fit the shared state */
        for (int j = i; j < s->n_seqs && s->dit; j++) {
            dg_seq *r = &s->seqs[j];
            if (!r->draw_due || !dg_dit_layout_same(dg_painter_layout(r->painter), L)) continue;
            dg_dit_input ri[2];
            float *rv[2];
            int k = dg_painter_inputs(r->painter, ri, rv), c = ri[0].n_ctx + (k == 2 ? ri[1].n_ctx : 0);
            if (n_in + k > DG_DIT_MAX_BATCH || (n_in + k) * L->n_tokens > s->dit_tokens || ctx + c > s->dit_ctx) {
                if (r == q) break;   /* q steps on its own state */
                continue;
            }
            for (int b = 0; b < k; b++) {
                in[n_in + b] = ri[b];
                vel[n_in + b] = rv[b];
            }
            n_in += k;
            ctx += c;
            g[n++] = r;
            r->draw_due = 0;
        }
        if (n > 1) {
            group_step(s, g, n, in, vel, n_in);
            continue;
        }
        q->draw_due = 0;
        int step = dg_painter_step(q->painter, q->step_err, sizeof q->step_err);
        if ((step = stepped(s, q, step, q->step_err, sizeof q->step_err)) < 0) q->step_rc = step;
    }
    return drawing;
}
