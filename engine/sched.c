/* dg_sched: the step-driven scheduler (docs/DESIGN.md §6). Each dg_sched_step() advances every
 * active sequence by one unit of work: a prefill chunk, one decode token, or one
 * denoising step of the image it is drawing. Batch size 1 is the first case of the same
 * loop.
 *
 * A sequence's life:
 *   submit   input images decoded and hashed; the conversation goes through the chat
 *            template into token ids (each image as <|vision_start|> + n <|image_pad|> +
 *            <|vision_end|>, an image of an assistant message with the <BOV> before it that
 *            the model emitted), M-RoPE positions and per-token KV keys (an image's tokens
 *            are keyed by its content hash); the longest cached prefix of full KV blocks is
 *            shared, with the condition rows kept beside those blocks
 *   prefill  the images with a position after the shared prefix through the vision tower
 *            (cached by content hash; an image wholly inside the prefix needs no rows), then
 *            the rest of the prompt in chunks; every decoder layer's hidden states feed the
 *            condition accumulator
 *   decode   sample; text streams as whole UTF-8 characters, stop strings held back; the
 *            answer ends at EOS, a stop string, max_new_tokens, cancellation or deadline
 *   draw     on <BOV>, if the image's tokens fit in the context: the slot's painter
 *            (draw/painter.h) is given the condition positions — all before <BOV>, and for
 *            the negative those before the text after the most recent image — and the
 *            earlier images (it VAE-encodes each from its pixels, or takes the latent
 *            cache's copy of that encoding); one painter step per dg_sched_step(), then its
 *            8-bit RGB image, which the scheduler sends as a PNG, runs through the vision
 *            tower and feeds as <BOV> <|vision_start|> <|image_pad|>*n <|vision_end|> with
 *            its M-RoPE positions; the next token is sampled and decoding goes on. After
 *            max_images, <BOV> is banned.
 * What a cache holds never changes an answer, only the work (docs/DESIGN.md §6
 * "Determinism"): a cached row is the row the sequence would have computed.
 * The painter knows nothing of sequences: the scheduler calls it and emits the events.
 * Buffers are sized at dg_sched_new or at submit (the painter's at an image's start);
 * nothing is allocated per token or step. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "text/chat_template.h"
#include "mllm/mrope.h"
#include "params.h"
#include "scheduler.h"

static int64_t unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- the decoder hook: condition rows ---------------------------------------------------- */

/* After decoder layer `layer` of a forward: that layer's share of the connector's first
 * Linear for the forward's positions. Cosmos' last condition layer is HF hidden_states[L],
 * which is after the final RMSNorm (model.norm); the others are the raw residual stream. */
static void cond_hook(void *user, int layer, const float *hidden, int n, int pos0) {
    dg_seq *q = user;
    dg_sched *s = q->sched;
    const dg_model *m = s->m;
    const float *h = hidden;
    if (q->hook_rc) return;
    if (layer == m->cfg.text.n_layers - 1) {
        s->be->rmsnorm(s->be, s->normed, hidden, m->llm.norm, n, m->cfg.text.hidden_size,
                       m->cfg.text.rms_norm_eps);
        h = s->normed;
    }
    q->hook_rc = dg_cond_acc_add(&m->conn, q->acc, layer, h, n, pos0);
}

/* Keeps the condition rows of the sequence's full blocks beside the blocks (by block id),
 * so that a later sequence that shares those blocks from the prefix cache gets them too. */
static void cond_save_blocks(dg_sched *s, dg_seq *q) {
    const dg_model *m = s->m;
    int full = q->kv.n_tokens / DG_KV_BLOCK, d = m->conn.d_cond;
    for (int b = q->cond_saved; b < full; b++)
        s->be->download(s->be, s->cond_store + (int64_t)q->kv.blocks[b] * DG_KV_BLOCK * d,
                        q->acc->acc + (int64_t)b * DG_KV_BLOCK * d, (int64_t)DG_KV_BLOCK * d);
    if (full > q->cond_saved) q->cond_saved = full;
}

static void cond_load_blocks(dg_sched *s, dg_seq *q, int n_positions) {
    const dg_model *m = s->m;
    int d = m->conn.d_cond;
    for (int b = 0; b < n_positions / DG_KV_BLOCK; b++)
        s->be->upload(s->be, q->acc->acc + (int64_t)b * DG_KV_BLOCK * d,
                      s->cond_store + (int64_t)q->kv.blocks[b] * DG_KV_BLOCK * d, (int64_t)DG_KV_BLOCK * d);
    /* these positions now hold every layer's share, as if the decoder had run on them */
    memset(q->acc->seen, m->conn.n_layers, (size_t)n_positions);
    q->cond_saved = n_positions / DG_KV_BLOCK;
}

/* ---- scheduler ------------------------------------------------------------------------------ */

#define DG_CACHE_DEFAULT_IMAGES 64   /* images the vision and latent caches hold by default */

/* The default budgets of the vision and latent caches: DG_CACHE_DEFAULT_IMAGES images at
 * the package's default image size (its vision-tower rows; its VAE latent), so that the
 * caches hold as many images whatever the model's width (docs/DESIGN.md §6). */
static void default_cache_budgets(const dg_model *m, size_t *vision_bytes, size_t *latent_bytes) {
    const dg_image_params *d = &m->image_defaults;
    int32_t grid[3];
    char err[128];
    *vision_bytes = *latent_bytes = 0;
    if (m->has_vision && dg_image_grid(d->height, d->width, &m->pp, grid, err, sizeof err) == 0) {
        size_t rows = (size_t)dg_vision_tokens(&m->vision, grid[0], grid[1], grid[2]);
        *vision_bytes = DG_CACHE_DEFAULT_IMAGES * rows * (size_t)m->cfg.vision.out_hidden_size * sizeof(float);
    }
    if (m->has_draw) {
        int f = dg_vae_spatial_factor(&m->vae);
        *latent_bytes = (size_t)DG_CACHE_DEFAULT_IMAGES * (size_t)m->vae.cfg.z_dim * (size_t)(d->height / f) *
                        (size_t)(d->width / f) * sizeof(float);
    }
}

int dg_sched_new(dg_model *m, const dg_sched_opts *o, dg_sched **out, char *err, size_t errlen) {
    *out = NULL;
    dg_sched *s = calloc(1, sizeof *s);
    if (!s) return DG_ENOMEM;
    s->m = m;
    s->o = o ? *o : (dg_sched_opts){0};
    if (s->o.max_inflight <= 0) s->o.max_inflight = 1;
    const dg_text_config *c = &m->cfg.text;
    size_t kv_dim = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    size_t block_bytes = 2u * (size_t)c->n_layers * kv_dim * DG_KV_BLOCK * sizeof(float);
    /* room for every sequence at full context, plus as much again for cached prefixes,
     * unless the caller set a budget */
    int per_seq = (m->max_context + DG_KV_BLOCK - 1) / DG_KV_BLOCK;
    int n_blocks = s->o.kv_cache_bytes ? (int)(s->o.kv_cache_bytes / block_bytes) : 2 * per_seq * s->o.max_inflight;
    int rc = DG_ENOMEM;
    if (n_blocks < per_seq) {
        snprintf(err, errlen, "kv_cache_bytes %zu holds %d blocks of %d positions; one sequence of "
                 "max_context %d needs %d", s->o.kv_cache_bytes, n_blocks, DG_KV_BLOCK, m->max_context, per_seq);
        rc = DG_EINVAL;
        goto fail;
    }
    if ((rc = dg_backend_fork(m->be, &s->be, err, errlen)) < 0) goto fail;
    rc = DG_ENOMEM;
    s->n_seqs = s->o.max_inflight;
    s->seqs = calloc((size_t)s->n_seqs, sizeof *s->seqs);
    if (!s->seqs) goto fail;
    if ((rc = dg_kv_cache_new(s->be, c->n_layers, (int)kv_dim, DG_KV_BLOCK, n_blocks, &s->kv, err, errlen)) < 0)
        goto fail;
    if ((rc = dg_qwen2_state_new(&m->llm, s->be, DG_SCHED_CHUNK, 1, &s->st, err, errlen)) < 0) goto fail;
    size_t vision_default, latent_default;
    default_cache_budgets(m, &vision_default, &latent_default);
    rc = DG_ENOMEM;
    if (m->has_vision) {
        /* one image can have at most max_context tokens of m² patches each */
        int64_t max_patches = (int64_t)m->max_context * m->pp.merge_size * m->pp.merge_size;
        int64_t by_pixels = m->pp.max_pixels / ((int64_t)m->pp.patch_size * m->pp.patch_size);
        if (by_pixels < max_patches) max_patches = by_pixels;
        if ((rc = dg_vision_state_new(&m->vision, s->be, (int)max_patches, &s->vs, err, errlen)) < 0) goto fail;
        size_t vc = s->o.vision_cache_bytes ? s->o.vision_cache_bytes : vision_default;
        if (dg_vision_cache_new(vc, &s->vcache) < 0) goto fail;
        s->embed_rows = m->max_context;
        if (!(s->embeds = s->be->alloc(s->be, (size_t)s->embed_rows * c->hidden_size * sizeof(float)))) goto fail;
    }
    if (m->has_draw) {
        size_t lc = s->o.latent_cache_bytes ? s->o.latent_cache_bytes : latent_default;
        if (dg_latent_cache_new(lc, &s->lcache) < 0) goto fail;
        if (!(s->normed = s->be->alloc(s->be, (size_t)DG_SCHED_CHUNK * c->hidden_size * sizeof(float)))) goto fail;
        if (!(s->cond_store = calloc((size_t)n_blocks * DG_KV_BLOCK * (size_t)m->conn.d_cond, sizeof(float))))
            goto fail;
        for (int i = 0; i < s->n_seqs; i++)
            if ((rc = dg_cond_acc_new(&m->conn, s->be, m->max_context, DG_SCHED_CHUNK, &s->seqs[i].acc, err, errlen)) < 0 ||
                (rc = dg_painter_new(&m->dit, &m->vae, &m->conn, s->be, m->max_context, s->o.max_condition_pixels,
                                     &s->seqs[i].painter, err, errlen)) < 0)
                goto fail;
        if (m->cond_from_prompt &&
            (rc = dg_prompt_cond_new(&m->llm, &m->conn, m->tok, &m->recipe, s->be, DG_SCHED_CHUNK, &s->pc, err,
                                     errlen)) < 0)
            goto fail;
    }
    for (int i = 0; i < s->n_seqs; i++) s->seqs[i].sched = s;
    *out = s;
    return 0;
fail:
    if (rc == DG_ENOMEM && !err[0]) snprintf(err, errlen, "out of memory for the scheduler's buffers");
    dg_sched_free(s);
    return rc;
}

static void seq_clear(dg_sched *s, dg_seq *q) {
    if (q->state != SEQ_FREE) dg_kv_seq_release(s->kv, &q->kv);
    dg_kv_seq_free(&q->kv);
    dg_sampler_free(q->sampler);
    dg_stop_free(q->stop);
    dg_stop_free(q->marker);
    dg_tok_ids_free(&q->prompt);
    free(q->pos);
    free(q->keys);
    for (int i = 0; i < q->n_images; i++) dg_image_free(q->images[i].img);
    /* the slot keeps its sched pointer, accumulator and painter (an image in progress is
     * dropped by the painter's next begin) */
    dg_sched *keep_s = q->sched;
    dg_cond_acc *keep_acc = q->acc;
    dg_painter *keep_painter = q->painter;
    memset(q, 0, sizeof *q);
    q->sched = keep_s;
    q->acc = keep_acc;
    q->painter = keep_painter;
}

void dg_sched_free(dg_sched *s) {
    if (!s) return;
    const dg_model *m = s->m;
    for (int i = 0; s->seqs && i < s->n_seqs; i++) {
        seq_clear(s, &s->seqs[i]);
        if (m->has_draw) dg_cond_acc_free(&m->conn, s->seqs[i].acc);
        dg_painter_free(s->seqs[i].painter);
    }
    free(s->seqs);
    if (s->embeds) s->be->release(s->be, s->embeds);
    if (s->normed) s->be->release(s->be, s->normed);
    free(s->cond_store);
    dg_prompt_cond_free(s->pc);
    dg_latent_cache_free(s->lcache);
    dg_vision_cache_free(s->vcache);
    dg_vision_state_free(&m->vision, s->vs);
    dg_qwen2_state_free(&m->llm, s->st);
    dg_kv_cache_free(s->kv);
    dg_backend_free(s->be);
    free(s);
}

int dg_sched_active(const dg_sched *s) {
    int n = 0;
    for (int i = 0; i < s->n_seqs; i++) n += s->seqs[i].state != SEQ_FREE;
    return n;
}

void dg_sched_cache_stats(const dg_sched *s, dg_cache_stats *out) {
    dg_kv_stats k;
    dg_kv_cache_stats(s->kv, &k);
    *out = (dg_cache_stats){.kv_hits = k.hits, .kv_misses = k.misses, .kv_bytes = k.bytes};
    if (s->vcache) {
        dg_vision_cache_counters v;
        dg_vision_cache_stats(s->vcache, &v);
        out->vision_hits = v.hits;
        out->vision_misses = v.misses;
        out->vision_bytes = v.bytes;
    }
    if (s->lcache) dg_latent_cache_counters(s->lcache, &out->latent_hits, &out->latent_misses, &out->latent_bytes);
}

int dg_sched_cancel(dg_sched *s, uint64_t seq) {
    for (int i = 0; i < s->n_seqs; i++)
        if (s->seqs[i].state != SEQ_FREE && s->seqs[i].id == seq) {
            s->seqs[i].cancelled = 1;
            return 0;
        }
    return DG_EINVAL;
}

/* ---- submit ------------------------------------------------------------------------------ */

/* A 64-bit KV key of an image from its 128-bit content hash. */
static uint64_t image_key(const dg_image_digest *h) {
    uint64_t k;
    memcpy(&k, h->bytes, sizeof k);
    return k | 1;   /* never 0, the key of a text token */
}

static int add_input_image(dg_sched *s, dg_seq *q, const dg_part *part, int index, char *err, size_t errlen) {
    const dg_model *m = s->m;
    char label[48];
    snprintf(label, sizeof label, "image %d", index);
    if (!m->has_vision) {
        snprintf(err, errlen, "%s: this model package has no vision tower", label);
        return DG_EINVAL;
    }
    if (q->n_images == DG_SEQ_MAX_IMAGES) {
        snprintf(err, errlen, "%s: more than %d images in one conversation", label, DG_SEQ_MAX_IMAGES);
        return DG_ELIMIT;
    }
    dg_seq_image *im = &q->images[q->n_images];
    int rc = dg_image_decode(part->image, part->image_len, label, &(dg_image_limits){0}, &im->img, err, errlen);
    if (rc < 0) return rc;
    q->n_images++;
    dg_image_hash(im->img, &im->hash);
    if ((rc = dg_image_grid(im->img->height, im->img->width, &m->pp, im->grid, err, errlen)) < 0) {
        char why[256];
        snprintf(why, sizeof why, "%s", err);
        snprintf(err, errlen, "%s: %s", label, why);
        return rc;
    }
    im->n_tokens = dg_vision_tokens(&m->vision, im->grid[0], im->grid[1], im->grid[2]);
    return 0;
}

static int build_prompt(dg_sched *s, dg_seq *q, const dg_request *r, char *err, size_t errlen) {
    size_t n_parts = 1;
    for (size_t i = 0; i < r->n_messages; i++) n_parts += r->messages[i].n_parts;
    dg_chat_message *msgs = calloc(r->n_messages + 1, sizeof *msgs);
    dg_chat_part *parts = calloc(n_parts, sizeof *parts);
    int rc = DG_ENOMEM;
    if (!msgs || !parts) goto out;
    dg_chat_part *p = parts;
    /* the package's system prompt for a job that has none (a draw marker's instructions) */
    size_t n_msgs = 0, n_user = 0;
    if (s->m->system_prompt && r->messages[0].role != DG_ROLE_SYSTEM) {
        *p = (dg_chat_part){.kind = DG_CHAT_TEXT, .text = s->m->system_prompt, .text_len = strlen(s->m->system_prompt)};
        msgs[n_msgs++] = (dg_chat_message){DG_CHAT_SYSTEM, p++, 1};
    }
    for (size_t i = 0; i < r->n_messages; i++) {
        const dg_message *in = &r->messages[i];
        dg_chat_message *out = &msgs[n_msgs++];
        if (in->role == DG_ROLE_USER) n_user = 0;   /* the last user message's text: an image's prompt */
        out->role = in->role == DG_ROLE_SYSTEM ? DG_CHAT_SYSTEM : in->role == DG_ROLE_USER ? DG_CHAT_USER
                                                                                          : DG_CHAT_ASSISTANT;
        out->parts = p;
        out->n_parts = in->n_parts;
        for (size_t k = 0; k < in->n_parts; k++, p++) {
            if (in->parts[k].kind == DG_PART_IMAGE) {
                if ((rc = add_input_image(s, q, &in->parts[k], q->n_images + 1, err, errlen)) < 0) goto out;
                p->kind = DG_CHAT_IMAGE;
                p->image_tokens = q->images[q->n_images - 1].n_tokens;
                /* as the model produced it: <BOV> before an image of its own answer */
                if (in->role == DG_ROLE_ASSISTANT && s->m->bov_id >= 0) p->bov = s->m->bov_text;
            } else {
                p->kind = DG_CHAT_TEXT;
                p->text = in->parts[k].text;
                p->text_len = in->parts[k].text_len;
                size_t take = p->text_len < DG_SEQ_PROMPT_TEXT / 2 - n_user ? p->text_len : DG_SEQ_PROMPT_TEXT / 2 - n_user;
                if (in->role == DG_ROLE_USER) {
                    memcpy(q->cond_text + n_user, p->text, take);
                    n_user += take;
                }
            }
        }
    }
    q->n_inputs = q->n_images;
    q->n_cond_user = q->n_cond_text = n_user;
    rc = dg_chat_encode(s->m->tok, msgs, n_msgs, true, &q->prompt, err, errlen);
out:
    free(msgs);
    free(parts);
    return rc < 0 ? rc : 0;
}

/* M-RoPE positions and KV keys of the prompt; the image tokens' context positions. */
static int place_prompt(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    int n = (int)q->prompt.n;
    q->pos = malloc((size_t)3 * n * sizeof *q->pos);
    q->keys = calloc((size_t)n, sizeof *q->keys);
    if (!q->pos || !q->keys) return DG_ENOMEM;
    int32_t grids[DG_SEQ_MAX_IMAGES][3];
    for (int i = 0; i < q->n_images; i++) memcpy(grids[i], q->images[i].grid, sizeof grids[i]);
    int next, rc;
    dg_mrope_params mp = {m->image_pad_id, m->pp.merge_size};
    if ((rc = dg_mrope_index(q->prompt.ids, n, 0, &mp, (const int32_t (*)[3])grids, q->n_images, q->pos, &next,
                             err, errlen)) < 0)
        return rc;
    q->rope_delta = dg_mrope_delta(next, n);
    int img = 0, in_run = 0;
    for (int i = 0; i < n; i++) {
        if (q->prompt.ids[i] != m->image_pad_id) { in_run = 0; continue; }
        if (!in_run) q->images[img++].token0 = i;
        in_run = 1;
        q->keys[i] = image_key(&q->images[img - 1].hash);
    }
    return 0;
}

int dg_sched_submit(dg_sched *s, const dg_request *r, const dg_sink *sink, uint64_t *seq,
                    char *err, size_t errlen) {
    const dg_model *m = s->m;
    dg_seq *q = NULL;
    for (int i = 0; i < s->n_seqs && !q; i++) if (s->seqs[i].state == SEQ_FREE) q = &s->seqs[i];
    if (!q) {
        snprintf(err, errlen, "all %d sequences are busy", s->n_seqs);
        return DG_EAGAIN;
    }
    if (r->n_messages == 0) {
        snprintf(err, errlen, "the request has no messages");
        return DG_EINVAL;
    }
    int rc = build_prompt(s, q, r, err, errlen);
    if (rc < 0) goto fail;
    if ((int)q->prompt.n >= m->max_context) {
        snprintf(err, errlen, "the prompt is %zu tokens; this model takes at most %d in all", q->prompt.n,
                 m->max_context);
        rc = DG_ELIMIT;
        goto fail;
    }
    if ((rc = place_prompt(s, q, err, errlen)) < 0) goto fail;

    dg_text_params tp;
    dg_image_params ip;
    if ((rc = dg_params_resolve_text(&r->text, &m->text_defaults, &tp, err, errlen)) < 0 ||
        (rc = dg_params_resolve_image(&r->image, &m->image_defaults, &ip, err, errlen)) < 0)
        goto fail;
    if (m->has_draw && (rc = dg_painter_check(q->painter, &ip, err, errlen)) < 0) goto fail;
    q->ip = ip;

    dg_sampler_params sp = {.temperature = tp.temperature, .top_k = tp.top_k, .top_p = tp.top_p,
                            .repetition_penalty = tp.repetition_penalty, .logit_bias = tp.logit_bias,
                            .n_logit_bias = tp.n_logit_bias, .seed = r->seed};
    if ((rc = dg_sampler_new(m->cfg.text.vocab_size, &sp, &q->sampler, err, errlen)) < 0) goto fail;
    if ((rc = dg_stop_new(tp.stop, tp.n_stop, &q->stop, err, errlen)) < 0) goto fail;
    const char *marker = m->draw_marker;
    if (marker[0] && (rc = dg_stop_new(&marker, 1, &q->marker, err, errlen)) < 0) goto fail;
    if ((rc = dg_kv_seq_init(&q->kv, m->max_context, DG_KV_BLOCK)) < 0) {
        snprintf(err, errlen, "out of memory for a block table");
        goto fail;
    }
    for (size_t i = 0; i < q->prompt.n; i++) dg_sampler_accept(q->sampler, q->prompt.ids[i]);
    dg_tok_stream_init(&q->stream, DG_TOK_SKIP_SPECIAL);
    q->state = SEQ_PREFILL;   /* from here on the KV sequence holds blocks */
    if (m->has_draw) dg_cond_acc_reset(&m->conn, q->acc);
    q->n_fed = dg_kv_seq_match_prefix(s->kv, &q->kv, q->prompt.ids, q->keys, (int)q->prompt.n);
    if (m->has_draw && q->n_fed) cond_load_blocks(s, q, q->n_fed);
    q->usage.prompt_tokens = (int64_t)q->prompt.n;
    q->usage.cached_prompt_tokens = q->n_fed;
    q->max_new = tp.max_new_tokens;
    q->deadline_ms = r->deadline_unix_ms;
    q->seed = r->seed;
    snprintf(q->job_id, sizeof q->job_id, "%s", r->id ? r->id : "");
    q->sink = *sink;
    q->id = ++s->next_id;
    q->t_submit = dg_clock_now_ms();
    *seq = q->id;
    return 0;
fail:
    seq_clear(s, q);
    return rc;
}

/* ---- feeding the decoder ------------------------------------------------------------------- */

/* Runs n tokens through the decoder in chunks, with their positions (3 rows of stride
 * `pos_stride`, or NULL for text after rope_delta), image embeddings (backend rows of the
 * image tokens among them, in order) and KV keys. When want_logits, samples the next
 * token into q->last (with <BOV> banned when no image may be drawn). */
static int seq_feed(dg_sched *s, dg_seq *q, const int32_t *ids, int n, const int32_t *pos, int pos_stride,
                    const float *embeds, const uint64_t *keys, int want_logits, char *err, size_t errlen) {
    const dg_model *m = s->m;
    int D = m->cfg.text.hidden_size, done = 0, emb_row = 0;
    dg_qwen2_hook hook = {cond_hook, q};
    while (done < n) {
        int c = n - done < DG_SCHED_CHUNK ? n - done : DG_SCHED_CHUNK;
        if (pos)
            for (int r = 0; r < 3; r++) memcpy(s->chunk_pos + r * c, pos + (int64_t)r * pos_stride + done, (size_t)c * sizeof *pos);
        int img_tokens = 0;
        for (int i = 0; i < c; i++) img_tokens += ids[done + i] == m->image_pad_id;
        dg_qwen2_input in = {.ids = ids + done, .n = c, .pos = pos ? s->chunk_pos : NULL, .rope_delta = q->rope_delta,
                             .image_embeds = img_tokens ? embeds + (int64_t)emb_row * D : NULL,
                             .token_keys = keys ? keys + done : NULL,
                             .n_logits = want_logits && done + c == n ? 1 : 0,
                             .logits_on_device = 1};
        q->hook_rc = 0;
        int rc = dg_qwen2_forward(&m->llm, s->st, s->kv, &q->kv, &in, m->has_draw ? &hook : NULL, err, errlen);
        if (rc < 0) return rc;
        if (q->hook_rc < 0) {
            snprintf(err, errlen, "condition accumulator: position %d out of range", q->kv.n_tokens);
            return q->hook_rc;
        }
        if (m->has_draw) cond_save_blocks(s, q);
        emb_row += img_tokens;
        done += c;
    }
    if (!want_logits) return 0;
    /* On every backend: on a GPU it spares the 0.6 MB download and the host pass over the
     * vocabulary; on the CPU it picks the same token and is no slower (V = 152064, one
     * core: greedy 0.06 vs 0.56 ms, top-k 50 0.10 vs 1.2 ms, top-p 0.9 alone 0.61 vs
     * 1.2 ms, plain temperature 1.16 ms both). st->logits is its scratch for the rows the
     * candidates do not decide. */
    int32_t ban = m->bov_id >= 0 && (!m->has_draw || q->n_drawn >= q->ip.max_images) ? m->bov_id : -1;
    q->last = dg_sampler_sample_device(q->sampler, s->be, s->st->dev_logits, ban, s->st->logits);
    return 0;
}

/* ---- drawing: the scheduler's side of an image ---------------------------------------------- */

/* On a sampled <BOV>: the slot's painter begins the image (state SEQ_DRAW), or 1 when the
 * context has no room for <BOV>, the image's tokens and one more token. */
static int draw_begin(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    int32_t grid[3];
    int rc;
    if ((rc = dg_image_grid(q->ip.height, q->ip.width, &m->pp, grid, err, errlen)) < 0) return rc;
    int tokens = dg_vision_tokens(&m->vision, grid[0], grid[1], grid[2]);
    if (q->n_images == DG_SEQ_MAX_IMAGES || q->kv.n_tokens + tokens + 4 >= m->max_context) return 1;
    /* The negative condition drops the last text segment, the positions after the most
     * recent image; with no earlier image the whole conversation is that segment, and
     * the negative keeps only the first position, the way an empty prompt is the
     * unconditional branch of text-to-image guidance. */
    dg_painter_cond conds[DG_SEQ_MAX_IMAGES];
    int seg = 0;
    for (int i = 0; i < q->n_images; i++) {
        int end = q->images[i].token0 + q->images[i].n_tokens + 1;   /* after <|vision_end|> */
        if (end > seg) seg = end;
        conds[i] = (dg_painter_cond){q->images[i].img, &q->images[i].hash};
    }
    dg_painter_job job = {.acc = q->acc, .n_pos = q->kv.n_tokens, .n_neg = seg > 0 ? seg : 1, .conds = conds,
                          .n_conds = q->n_images, .lcache = s->lcache, .seed = q->seed, .index = q->n_drawn,
                          .params = q->ip};
    if (m->cond_from_prompt) {   /* a published pipeline's condition: the image's prompt alone */
        if ((rc = dg_prompt_cond_encode(s->pc, s->st, q->cond_text, q->n_cond_text, &job.acc, err, errlen)) < 0 ||
            (rc = dg_prompt_cond_negative(s->pc, s->st, &job.acc_neg, err, errlen)) < 0)
            return rc;
        job.n_pos = job.n_neg = m->recipe.max_tokens;
    }
    if ((rc = dg_painter_begin(q->painter, &job, err, errlen)) < 0) return rc;
    q->state = SEQ_DRAW;
    q->sink.image_started(q->sink.user, q->n_drawn + 1, q->ip.width, q->ip.height, q->ip.steps);
    return 0;
}

/* What the image in progress cost, into the sequence's timings and usage: once, when the
 * image ends or the sequence ends while drawing. */
static void draw_account(dg_seq *q) {
    dg_painter_cost c;
    dg_painter_cost_get(q->painter, &c);
    q->t.diffusion_ms += c.diffusion_ms;
    q->t.vae_ms += c.vae_ms;
    q->usage.cached_latents += c.cached_latents;
    q->usage.dit_forwards += c.dit_forwards;
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

/* A drawn image into the context: through the vision tower, then <BOV> <|vision_start|>
 * <|image_pad|>*n <|vision_end|> fed with M-RoPE positions from n_past + rope_delta; the
 * next token is sampled into q->last. */
static int feed_image(dg_sched *s, dg_seq *q, dg_seq_image *im, char *err, size_t errlen) {
    const dg_model *m = s->m;
    double t0 = dg_clock_now_ms();
    int rc = dg_image_grid(im->img->height, im->img->width, &m->pp, im->grid, err, errlen);
    if (rc < 0) return rc;
    im->n_tokens = dg_vision_tokens(&m->vision, im->grid[0], im->grid[1], im->grid[2]);
    const dg_image *one[1] = {im->img};
    int computed = 0;
    if ((rc = dg_vision_encode(&m->vision, s->vs, s->vcache, &m->pp, one, 1, s->embeds, &computed, err, errlen)) < 0)
        return rc;
    q->t.vision_ms += dg_clock_now_ms() - t0;
    q->usage.cached_vision += computed == 0;
    int n = im->n_tokens + 3, n_past = q->kv.n_tokens;
    int32_t *ids = malloc((size_t)n * sizeof *ids), *pos = malloc((size_t)3 * n * sizeof *pos);
    uint64_t *keys = calloc((size_t)n, sizeof *keys);
    if (!ids || !pos || !keys) {
        rc = DG_ENOMEM;
        snprintf(err, errlen, "out of memory for an image's tokens");
        goto out;
    }
    ids[0] = q->last;   /* <BOV>, or the draw marker's last token */
    ids[1] = m->vision_start_id;
    for (int i = 0; i < im->n_tokens; i++) {
        ids[2 + i] = m->image_pad_id;
        keys[2 + i] = image_key(&im->hash);
    }
    ids[n - 1] = m->vision_end_id;
    im->token0 = n_past + 2;
    int next;
    dg_mrope_params mp = {m->image_pad_id, m->pp.merge_size};
    if ((rc = dg_mrope_index(ids, n, n_past + q->rope_delta, &mp, (const int32_t (*)[3])im->grid, 1, pos, &next, err,
                             errlen)) < 0)
        goto out;
    t0 = dg_clock_now_ms();
    rc = seq_feed(s, q, ids, n, pos, n, s->embeds, keys, 1, err, errlen);
    q->t.prefill_ms += dg_clock_now_ms() - t0;
    q->rope_delta = dg_mrope_delta(next, n_past + n);
    q->n_cond_text = q->n_cond_user;   /* the next image's prompt: the text after this one */
out:
    free(ids);
    free(pos);
    free(keys);
    return rc;
}

/* One denoising step of the image in progress; after the last, the image is finished, sent
 * and fed, and the next token is in q->last (state SEQ_DECODE). */
static int draw_step(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    int step = dg_painter_step(q->painter, err, errlen);
    if (step < 0) return step;
    q->sink.step(q->sink.user, q->n_drawn + 1, step, q->ip.steps);
    if (step < q->ip.steps) return 0;
    q->state = SEQ_DECODE;
    dg_seq_image *im = &q->images[q->n_images];
    int rc = dg_painter_finish(q->painter, &im->img, &im->hash, err, errlen);
    draw_account(q);
    if (rc < 0) return rc;
    q->n_images++;
    if ((rc = send_png(s, q, im->img, err, errlen)) < 0) return rc;
    return feed_image(s, q, im, err, errlen);
}

/* ---- stepping ------------------------------------------------------------------------------ */

static void emit_text(void *user, const char *text, size_t len) {
    dg_seq *q = user;
    if (!len) return;
    q->sink.text(q->sink.user, text, len);
    /* the answer since the last image, after the user's text: the next image's prompt */
    size_t room = DG_SEQ_PROMPT_TEXT / 2 - (q->n_cond_text - q->n_cond_user);
    if (q->n_cond_text == q->n_cond_user && room && q->n_cond_user) {
        q->cond_text[q->n_cond_text++] = '\n';
        room--;
    }
    if (len > room) len = room;
    memcpy(q->cond_text + q->n_cond_text, text, len);
    q->n_cond_text += len;
}

/* Text through the stop strings; a completed one sets q->stopped. */
static void emit_checked(void *user, const char *text, size_t len) {
    dg_seq *q = user;
    if (!q->stopped && dg_stop_feed(q->stop, text, len, emit_text, q)) q->stopped = 1;
}

/* The answer's text: through the draw marker's matcher (the marker is never emitted), then
 * the stop strings. 0: go on; 1: a stop string ended the answer; 2: the marker completed
 * (the text after it in `text` waits in q->rest for after the image). */
static int feed_text(dg_seq *q, const char *text, size_t len) {
    if (!q->marker) return dg_stop_feed(q->stop, text, len, emit_text, q);
    int hit = dg_stop_feed(q->marker, text, len, emit_checked, q);
    if (q->stopped) return 1;
    if (!hit) return 0;
    size_t end = dg_stop_match_end(q->marker);
    q->n_rest = len - end;
    memcpy(q->rest, text + end, q->n_rest);
    return 2;
}

/* Ends a sequence. flush: emit what the stream decoder and the stop matcher still hold
 * (not after a stop string matched: what they hold then is the stop string). */
static void finish(dg_sched *s, dg_seq *q, dg_finish_reason why, int flush) {
    char tail[DG_TOK_STREAM_OUT_MAX];
    size_t n = dg_tok_stream_finish(&q->stream, tail);
    if (flush && !(n && feed_text(q, tail, n) == 1)) {
        if (q->marker) dg_stop_flush(q->marker, emit_checked, q);
        if (!q->stopped) dg_stop_flush(q->stop, emit_text, q);
    }
    if (q->state == SEQ_DRAW) draw_account(q);   /* cancelled or past the deadline while drawing */
    q->usage.generated_tokens = q->generated;
    q->usage.images = q->n_drawn;
    q->t.total_ms = dg_clock_now_ms() - q->t_submit;
    dg_sink sink = q->sink;
    dg_usage u = q->usage;
    dg_timings t = q->t;
    seq_clear(s, q);
    sink.finished(sink.user, why, &u, &t);
}

static void fail_seq(dg_sched *s, dg_seq *q, int code, const char *msg) {
    dg_sink sink = q->sink;
    seq_clear(s, q);
    sink.failed(sink.user, code, msg);
}

static int is_stop_token(const dg_model *m, int32_t t) {
    for (int i = 0; i < m->n_stop_ids; i++) if (m->stop_ids[i] == t) return 1;
    return 0;
}

/* The image rows the prefill still needs, into s->embeds: those of the prompt's images with
 * a position at or after n_fed, through the vision tower (or the vision cache). An image
 * whose positions all came from the prefix KV cache needs none and skips the tower. The
 * images that need rows are the last ones of the prompt; *skip_rows gets the rows of the
 * first of them whose positions came from the cache, where the feed's rows begin. */
static int encode_inputs(dg_sched *s, dg_seq *q, int *skip_rows, char *err, size_t errlen) {
    const dg_model *m = s->m;
    const dg_image *imgs[DG_SEQ_MAX_IMAGES];
    int first = 0, n = 0, rows = 0, computed = 0;
    *skip_rows = 0;
    while (first < q->n_inputs && q->images[first].token0 + q->images[first].n_tokens <= q->n_fed) first++;
    q->usage.cached_vision += first;
    for (int i = first; i < q->n_inputs; i++) {
        imgs[n++] = q->images[i].img;
        rows += q->images[i].n_tokens;
    }
    if (n == 0) return 0;
    if (rows > s->embed_rows) {
        snprintf(err, errlen, "the images take %d tokens, more than the context of %d", rows, s->embed_rows);
        return DG_ELIMIT;
    }
    if (q->images[first].token0 < q->n_fed) *skip_rows = q->n_fed - q->images[first].token0;
    double t0 = dg_clock_now_ms();
    int rc = dg_vision_encode(&m->vision, s->vs, s->vcache, &m->pp, imgs, n, s->embeds, &computed, err, errlen);
    q->t.vision_ms += dg_clock_now_ms() - t0;
    q->usage.cached_vision += n - computed;
    return rc;
}

static int step_seq(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    if (q->cancelled) { finish(s, q, DG_FINISH_CANCELLED, 1); return 0; }
    if (q->deadline_ms && unix_ms() >= q->deadline_ms) { finish(s, q, DG_FINISH_DEADLINE, 1); return 0; }
    int rc;
    if (q->state == SEQ_DRAW) {
        if ((rc = draw_step(s, q, err, errlen)) < 0) return rc;
        if (q->state == SEQ_DRAW) return 0;
        /* the image is in the context and the next token was sampled: handle it below */
    } else if (q->state == SEQ_PREFILL) {
        /* the whole rest of the prompt in one step (in chunks), so that the first token
         * follows in the same step; the images' embeddings first */
        int skip_rows = 0;
        if ((rc = encode_inputs(s, q, &skip_rows, err, errlen)) < 0) return rc;
        double t0 = dg_clock_now_ms();
        rc = seq_feed(s, q, q->prompt.ids + q->n_fed, (int)q->prompt.n - q->n_fed, q->pos + q->n_fed,
                      (int)q->prompt.n, s->embeds + (int64_t)skip_rows * m->cfg.text.hidden_size,
                      q->keys + q->n_fed, 1, err, errlen);
        q->t.prefill_ms += dg_clock_now_ms() - t0;
        if (rc < 0) return rc;
        q->n_fed = (int)q->prompt.n;
        q->state = SEQ_DECODE;
    } else {
        double t0 = dg_clock_now_ms();
        rc = seq_feed(s, q, &q->last, 1, NULL, 0, NULL, NULL, 1, err, errlen);
        q->t.decode_ms += dg_clock_now_ms() - t0;
        if (rc < 0) return rc;
    }
    int32_t tok = q->last;   /* the newly sampled token, not yet in the KV cache */
    if (tok == m->bov_id) {
        if ((rc = draw_begin(s, q, err, errlen)) == 1) finish(s, q, DG_FINISH_LENGTH, 1);
        return rc < 0 ? rc : 0;
    }
    if (is_stop_token(m, tok)) { finish(s, q, DG_FINISH_STOP, 1); return 0; }
    q->generated++;
    char text[DG_TOK_STREAM_OUT_MAX];
    int fed = 0;
    if (q->n_rest) {   /* what followed a draw marker, now after its image; a marker in it draws nothing */
        size_t n = q->n_rest;
        q->n_rest = 0;
        fed = feed_text(q, q->rest, n) == 1;
    }
    size_t len = dg_tok_stream_push(m->tok, &q->stream, tok, text);
    if (!fed && len) fed = feed_text(q, text, len);
    if (fed == 1) { finish(s, q, DG_FINISH_STOP, 0); return 0; }
    if (fed == 2 && m->has_draw && q->n_drawn < q->ip.max_images) {   /* the marker acts as <BOV> */
        if ((rc = draw_begin(s, q, err, errlen)) == 1) finish(s, q, DG_FINISH_LENGTH, 1);
        return rc < 0 ? rc : 0;
    }
    if (q->generated >= q->max_new || q->kv.n_tokens + 1 >= m->max_context) {
        finish(s, q, DG_FINISH_LENGTH, 1);
        return 0;
    }
    return 0;
}

int dg_sched_step(dg_sched *s, char *err, size_t errlen) {
    dg_backend *be = s->be;
    for (int i = 0; i < s->n_seqs; i++) {
        dg_seq *q = &s->seqs[i];
        if (q->state == SEQ_FREE) continue;
        char msg[512] = "";
        int rc = step_seq(s, q, msg, sizeof msg);
        if (rc == 0) continue;
        if (dg_error_class(rc) == DG_ERROR_FATAL) {
            snprintf(err, errlen, "%s", msg);
            return rc;
        }
        fail_seq(s, q, rc, msg);   /* this sequence only: out of KV blocks, a limit, a bad image */
    }
    /* a device fault during the step: nothing it computed can be trusted, and the process
     * should go (the daemon exits 75; the jobs stay pending for a new start) */
    int rc = be->status(be, err, errlen);
    return rc < 0 ? rc : 0;
}
