/* dg_sched: the step-driven scheduler (docs/DESIGN.md §6). Each dg_sched_step() advances every
 * active sequence by one unit of work: a prefill chunk, one decode token, or one
 * denoising step of the image it is drawing — all of them together: one DiT forward for
 * the images of one layout (sched_draw.c), then one decoder forward for every sequence
 * that needs the decoder (sched_feed.c; docs/DESIGN.md §6 "Batching"). This file admits
 * sequences, runs the step, takes the sampled tokens and ends sequences.
 *
 * A sequence's life:
 *   submit   input images decoded and hashed; the conversation goes through the chat
 *            template into token ids (each image as <|vision_start|> + n <|image_pad|> +
 *            <|vision_end|>, an image of an assistant message with the <BOV> before it that
 *            the model emitted), M-RoPE positions and per-token KV keys (an image's tokens
 *            are keyed by its content hash); the longest cached prefix of full KV blocks is
 *            shared, with the condition rows kept beside those blocks
 *   prefill  the feed: the images with a position after the shared prefix through the
 *            vision tower (cached by content hash; an image wholly inside the prefix needs
 *            no rows), then the rest of the prompt a chunk a step, the oldest feeds first;
 *            every decoder layer's hidden states feed the condition accumulator
 *   decode   sample; text streams as whole UTF-8 characters, stop strings held back; the
 *            answer ends at EOS, a stop string, max_new_tokens, cancellation or deadline
 *   draw     on <BOV>, if the image's tokens fit in the context: the slot's painter
 *            (draw/painter.h) is given the condition positions — all before <BOV>, and for
 *            the negative those before the text after the most recent image — and the
 *            earlier images (it VAE-encodes each from its pixels, or takes the latent
 *            cache's copy of that encoding); one painter step per dg_sched_step(), then its
 *            8-bit RGB image, which the scheduler sends as a PNG and makes the next feed:
 *            <BOV> <|vision_start|> <|image_pad|>*n <|vision_end|> with its M-RoPE
 *            positions, the rows from the vision tower; at the feed's end the next token is
 *            sampled and decoding goes on. After max_images, <BOV> is banned.
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

/* max_inflight 0 (docs/DESIGN.md §6 "Batching"): as many sequences as the memory holds,
 * each at its full context with as much KV again for cached prefixes: in the KV budget
 * when one is set (the condition rows live in host memory beside it), else with its
 * condition rows in half the backend's free memory (the other half for the forwards' and
 * the painters' scratch and the other caches); at least 1, at most DG_SCHED_AUTO_INFLIGHT. */
static int default_inflight(const dg_model *m, dg_backend *be, size_t kv_budget, size_t block_bytes, int per_seq,
                            size_t *free_read) {
    size_t seq_kv = 2 * (size_t)per_seq * block_bytes;
    size_t cond = m->has_draw ? 3 * (size_t)m->max_context * (size_t)m->conn.d_cond * sizeof(float) : 0;
    size_t budget = kv_budget, per = kv_budget ? seq_kv : seq_kv + cond;
    if (!budget) {
        *free_read = be->memory_free ? be->memory_free(be) : 0;
        budget = *free_read / 2;
    }
    size_t n = budget / per;
    return n < 1 ? 1 : n > DG_SCHED_AUTO_INFLIGHT ? DG_SCHED_AUTO_INFLIGHT : (int)n;
}

int dg_sched_new(dg_model *m, const dg_sched_opts *o, dg_sched **out, char *err, size_t errlen) {
    *out = NULL;
    if (errlen) err[0] = 0;
    dg_sched *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory for a scheduler");
        return DG_ENOMEM;
    }
    s->m = m;
    s->o = o ? *o : (dg_sched_opts){0};
    const dg_text_config *c = &m->cfg.text;
    size_t kv_dim = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    const int bf16 = s->o.kv_bf16 > 0 || (s->o.kv_bf16 == 0 && m->be->kv_bf16_default);
    if (s->o.draft_tokens < -1 || s->o.draft_tokens > DG_SCHED_DRAFT_MAX) {
        snprintf(err, errlen, "draft_tokens %d: -1 (off), 0 (the backend's default) or 1 .. %d", s->o.draft_tokens,
                 DG_SCHED_DRAFT_MAX);
        free(s);
        return DG_EINVAL;
    }
    if (s->o.max_image_pixels < 0) {
        snprintf(err, errlen, "max_image_pixels %lld: 0 (the default) or positive", (long long)s->o.max_image_pixels);
        free(s);
        return DG_EINVAL;
    }
    if (s->o.max_condition_frames < 0) {
        snprintf(err, errlen, "max_condition_frames %d: 0 (all) or positive", s->o.max_condition_frames);
        free(s);
        return DG_EINVAL;
    }
    s->draft = s->o.draft_tokens > 0 ? s->o.draft_tokens
               : s->o.draft_tokens == 0 && m->be->rows_exact && dg_qwen2_decode_bytes(&m->llm) >= DG_SCHED_DRAFT_MIN_BYTES
                   ? DG_SCHED_DRAFT_DEFAULT
                   : 0;
    const dg_dtype kv_dtype = bf16 ? DG_DTYPE_BF16 : DG_DTYPE_F32;
    size_t block_bytes = 2u * (size_t)c->n_layers * kv_dim * DG_KV_BLOCK * dg_dtype_size(kv_dtype);
    int per_seq = (m->max_context + DG_KV_BLOCK - 1) / DG_KV_BLOCK;
    if (s->o.max_inflight <= 0)
        s->o.max_inflight = default_inflight(m, m->be, s->o.kv_cache_bytes, block_bytes, per_seq, &s->sized_from);
    /* room for every sequence at full context, plus as much again for cached prefixes,
     * unless the caller set a budget */
    int n_blocks = s->o.kv_cache_bytes ? (int)(s->o.kv_cache_bytes / block_bytes) : 2 * per_seq * s->o.max_inflight;
    int rc = DG_ENOMEM;
    if (n_blocks < per_seq) {
        snprintf(err, errlen, "kv_cache_bytes %zu holds %d blocks of %d positions; one sequence of "
                 "max_context %d needs %d", s->o.kv_cache_bytes, n_blocks, DG_KV_BLOCK, m->max_context, per_seq);
        rc = DG_EINVAL;
        goto fail;
    }
    s->kv_holds = n_blocks / per_seq;
    if ((rc = dg_backend_fork(m->be, &s->be, err, errlen)) < 0) goto fail;
    rc = DG_ENOMEM;
    s->n_seqs = s->o.max_inflight;
    s->seqs = calloc((size_t)s->n_seqs, sizeof *s->seqs);
    s->batch = calloc((size_t)s->n_seqs, sizeof *s->batch);
    s->batch_of = calloc((size_t)s->n_seqs, sizeof *s->batch_of);
    s->hooks = calloc((size_t)s->n_seqs, sizeof *s->hooks);
    if (!s->seqs || !s->batch || !s->batch_of || !s->hooks) goto fail;
    if ((rc = dg_kv_cache_new(s->be, c->n_layers, (int)kv_dim, DG_KV_BLOCK, n_blocks, kv_dtype, &s->kv, err,
                              errlen)) < 0)
        goto fail;
    /* a step's forward: the prefill chunks' tokens, a row for each decoding sequence and the
     * drafts (fewer than DG_SCHED_DRAFT_ROWS in all); a logits row for each sequence and
     * each draft */
    const int drafts = s->n_seqs * s->draft < DG_SCHED_DRAFT_ROWS - 1 ? s->n_seqs * s->draft : DG_SCHED_DRAFT_ROWS - 1;
    if ((rc = dg_qwen2_state_new(&m->llm, s->be, DG_SCHED_CHUNK + s->n_seqs + drafts, s->n_seqs + drafts, &s->st, err,
                                 errlen)) < 0)
        goto fail;
    rc = DG_ENOMEM;
    for (int i = 0; s->draft && i < s->n_seqs; i++)
        if (!(s->seqs[i].hist = malloc(sizeof(int32_t) * (size_t)m->max_context))) goto fail;
    size_t vision_default, latent_default;
    default_cache_budgets(m, &vision_default, &latent_default);
    rc = DG_ENOMEM;
    if (m->has_vision) {
        /* one image can have at most max_context tokens of m² patches each */
        int64_t max_patches = (int64_t)m->max_context * m->pp.merge_size * m->pp.merge_size;
        int64_t by_pixels = m->pp.max_pixels / ((int64_t)m->pp.patch_size * m->pp.patch_size);
        /* a picture's patches come in whole m x m groups, and at least one (transformers'
         * smart_resize: sides of m * patch pixels, never below one such square): a
         * max_pixels of 1960 (10 patches) stopped the start, "max_patches 10 is not a
         * positive multiple of 4"; it holds 8 */
        const int64_t group = (int64_t)m->pp.merge_size * m->pp.merge_size;
        by_pixels = by_pixels / group * group;
        if (by_pixels < group) by_pixels = group;
        if (by_pixels < max_patches) max_patches = by_pixels;
        if ((rc = dg_vision_state_new(&m->vision, s->be, (int)max_patches, &s->vs, err, errlen)) < 0) goto fail;
        rc = DG_ENOMEM;   /* for each failure below (a 0 from the call above returned the scheduler NULL) */
        size_t vc = s->o.vision_cache_bytes ? s->o.vision_cache_bytes : vision_default;
        if (dg_vision_cache_new(vc, &s->vcache) < 0) goto fail;
        s->embed_rows = m->max_context;
        if (!(s->embeds = s->be->alloc(s->be, (size_t)s->embed_rows * c->hidden_size * sizeof(float)))) goto fail;
    }
    if (m->has_draw) {
        rc = DG_ENOMEM;
        size_t lc = s->o.latent_cache_bytes ? s->o.latent_cache_bytes : latent_default;
        if (dg_latent_cache_new(lc, &s->lcache) < 0) goto fail;
        if (!(s->normed = s->be->alloc(s->be, (size_t)DG_SCHED_CHUNK * c->hidden_size * sizeof(float)))) goto fail;
        if (!(s->cond_store = calloc((size_t)n_blocks * DG_KV_BLOCK * (size_t)m->conn.d_cond, sizeof(float))))
            goto fail;
        if (!(s->scratch = dg_painter_scratch_new(&m->vae, s->be))) goto fail;
        for (int i = 0; i < s->n_seqs; i++)
            if ((rc = dg_cond_acc_new(&m->conn, s->be, m->max_context, DG_SCHED_CHUNK, &s->seqs[i].acc, err, errlen)) < 0 ||
                (rc = dg_painter_new(&m->dit, &m->vae, &m->conn, s->be, s->scratch, m->max_context,
                                     s->o.max_condition_pixels, &s->seqs[i].painter, err, errlen)) < 0)
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
    dg_sched_feed_clear(s, q);
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
    int32_t *keep_hist = q->hist;
    memset(q, 0, sizeof *q);
    q->sched = keep_s;
    q->acc = keep_acc;
    q->painter = keep_painter;
    q->hist = keep_hist;
}

void dg_sched_free(dg_sched *s) {
    if (!s) return;
    const dg_model *m = s->m;
    for (int i = 0; s->seqs && i < s->n_seqs; i++) {
        seq_clear(s, &s->seqs[i]);
        if (m->has_draw) dg_cond_acc_free(&m->conn, s->seqs[i].acc);
        dg_painter_free(s->seqs[i].painter);
        free(s->seqs[i].hist);
    }
    dg_painter_scratch_free(s->scratch);
    free(s->seqs);
    free(s->batch);
    free(s->batch_of);
    free(s->hooks);
    if (s->embeds) s->be->release(s->be, s->embeds);
    if (s->normed) s->be->release(s->be, s->normed);
    free(s->cond_store);
    dg_prompt_cond_free(s->pc);
    dg_latent_cache_free(s->lcache);
    if (m->has_draw) dg_dit_state_free(&m->dit, s->dit);
    dg_vision_cache_free(s->vcache);
    dg_vision_state_free(&m->vision, s->vs);
    dg_qwen2_state_free(&m->llm, s->st);
    dg_kv_cache_free(s->kv);
    dg_backend_free(s->be);
    free(s);
}

int dg_sched_max_inflight(const dg_sched *s) { return s->n_seqs; }
size_t dg_sched_sized_from(const dg_sched *s) { return s->sized_from; }
int dg_sched_kv_holds(const dg_sched *s) { return s->kv_holds; }

void dg_sched_defaults(const dg_sched *s, dg_text_params *text, dg_image_params *image) {
    if (text) *text = s->m->text_defaults;
    if (image) *image = s->m->image_defaults;
}

int dg_sched_active(const dg_sched *s) {
    int n = 0;
    for (int i = 0; i < s->n_seqs; i++) n += s->seqs[i].state != SEQ_FREE;
    return n;
}

/* The counters as they stand, the warm-up's included. */
static void cache_counters(const dg_sched *s, dg_cache_stats *out) {
    dg_kv_stats k;
    dg_kv_cache_stats(s->kv, &k);
    *out = (dg_cache_stats){.kv_hits = k.hits, .kv_misses = k.misses, .kv_bytes = k.bytes,
                            .kv_cached_bytes = k.cached_bytes};
    if (s->vcache) {
        dg_vision_cache_counters v;
        dg_vision_cache_stats(s->vcache, &v);
        out->vision_hits = v.hits;
        out->vision_misses = v.misses;
        out->vision_bytes = v.bytes;
    }
    if (s->lcache) dg_latent_cache_counters(s->lcache, &out->latent_hits, &out->latent_misses, &out->latent_bytes);
}

void dg_sched_counts_now(const dg_sched *s, dg_sched_counts *out) {
    cache_counters(s, &out->cache);
    out->drafted = s->n_drafted;
    out->accepted = s->n_accepted;
    out->screened = s->n_screened;
    out->unscreened = s->n_unscreened;
}

/* to += sign * x, over the counters (not the bytes). */
static void counts_add(dg_sched_counts *to, const dg_sched_counts *x, int64_t sign) {
    to->cache.kv_hits += sign * x->cache.kv_hits;
    to->cache.kv_misses += sign * x->cache.kv_misses;
    to->cache.vision_hits += sign * x->cache.vision_hits;
    to->cache.vision_misses += sign * x->cache.vision_misses;
    to->cache.latent_hits += sign * x->cache.latent_hits;
    to->cache.latent_misses += sign * x->cache.latent_misses;
    to->drafted += sign * x->drafted;
    to->accepted += sign * x->accepted;
    to->screened += sign * x->screened;
    to->unscreened += sign * x->unscreened;
}

void dg_sched_counts_skip(dg_sched *s, const dg_sched_counts *before) {
    dg_sched_counts now;
    dg_sched_counts_now(s, &now);
    counts_add(&s->skipped, &now, 1);
    counts_add(&s->skipped, before, -1);
}

/* The counters the stats report: as they stand, less the warm-ups' share. */
static dg_sched_counts counted(const dg_sched *s) {
    dg_sched_counts c;
    dg_sched_counts_now(s, &c);
    counts_add(&c, &s->skipped, -1);
    return c;
}

void dg_sched_cache_stats(const dg_sched *s, dg_cache_stats *out) { *out = counted(s).cache; }

void dg_sched_draft_stats(const dg_sched *s, int64_t *drafted, int64_t *kept) {
    dg_sched_counts c = counted(s);
    *drafted = c.drafted;
    *kept = c.accepted;
}

void dg_sched_screen_stats(const dg_sched *s, int64_t *screened, int64_t *unscreened) {
    dg_sched_counts c = counted(s);
    *screened = c.screened;
    *unscreened = c.unscreened;
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
    int rc = dg_image_decode(part->image, part->image_len, label, &(dg_image_limits){.max_pixels = s->o.max_image_pixels},
                             &im->img, err, errlen);
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

/* The request's images weighed by their headers before any is decoded: a job whose
 * pictures alone take the whole context is refused without holding their pixels (sixteen
 * 7000x7000 PNGs are 2.4 GB decoded, though a few MB sent). An image whose header does not
 * tell, or is over a limit, is left to the decoder to name; so are more than
 * DG_SEQ_MAX_IMAGES. The token count does not depend on an EXIF rotation: smart_resize
 * treats both sides alike. */
static int images_fit(const dg_sched *s, const dg_request *r, char *err, size_t errlen) {
    const dg_model *m = s->m;
    const int64_t max_pixels = s->o.max_image_pixels > 0 ? s->o.max_image_pixels : DG_IMAGE_DEFAULT_MAX_PIXELS;
    int64_t tokens = 0;
    int n = 0, seen = 0;   /* images weighed, images seen */
    if (!m->has_vision) return 0;
    for (size_t i = 0; i < r->n_messages; i++)
        for (size_t k = 0; k < r->messages[i].n_parts; k++) {
            const dg_part *part = &r->messages[i].parts[k];
            int32_t w, h, grid[3];
            char why[8];
            if (part->kind != DG_PART_IMAGE || ++seen > DG_SEQ_MAX_IMAGES ||
                dg_image_peek_size(part->image, part->image_len, &w, &h) < 0 ||
                (int64_t)w * h > max_pixels || w > 65535 || h > 65535 ||
                dg_image_grid(h, w, &m->pp, grid, why, sizeof why) < 0)
                continue;
            tokens += dg_vision_tokens(&m->vision, grid[0], grid[1], grid[2]);
            n++;
        }
    if (tokens < m->max_context) return 0;
    snprintf(err, errlen, "the %d image%s take%s %lld tokens; this model takes at most %d in all", n,
             n == 1 ? "" : "s", n == 1 ? "s" : "", (long long)tokens, m->max_context);
    return DG_ELIMIT;
}

static int build_prompt(dg_sched *s, dg_seq *q, const dg_request *r, char *err, size_t errlen) {
    int rc = images_fit(s, r, err, errlen);
    if (rc < 0) return rc;
    size_t n_parts = 1;
    for (size_t i = 0; i < r->n_messages; i++) n_parts += r->messages[i].n_parts;
    dg_chat_message *msgs = calloc(r->n_messages + 1, sizeof *msgs);
    dg_chat_part *parts = calloc(n_parts, sizeof *parts);
    rc = DG_ENOMEM;
    if (!msgs || !parts) {
        snprintf(err, errlen, "out of memory for the prompt's %zu parts", n_parts);
        goto out;
    }
    dg_chat_part *p = parts;
    /* the package's system prompt for a job that has none (a draw marker's instructions) */
    size_t n_msgs = 0, n_user = 0;
    int user_cut = 0;   /* the last user message's text is over DG_SEQ_PROMPT_TEXT: no more of it */
    if (s->m->system_prompt && r->messages[0].role != DG_ROLE_SYSTEM) {
        *p = (dg_chat_part){.kind = DG_CHAT_TEXT, .text = s->m->system_prompt, .text_len = strlen(s->m->system_prompt)};
        msgs[n_msgs++] = (dg_chat_message){DG_CHAT_SYSTEM, p++, 1};
    }
    for (size_t i = 0; i < r->n_messages; i++) {
        const dg_message *in = &r->messages[i];
        dg_chat_message *out = &msgs[n_msgs++];
        if (in->role == DG_ROLE_USER) n_user = 0, user_cut = 0;   /* the last user message's text: an image's prompt */
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
                if (in->role == DG_ROLE_USER && !user_cut) {
                    size_t take = dg_utf8_head(p->text, p->text_len, DG_SEQ_PROMPT_TEXT - n_user);
                    user_cut = take < p->text_len;
                    memcpy(q->cond_user + n_user, p->text, take);
                    n_user += take;
                }
            }
        }
    }
    q->n_inputs = q->n_images;
    q->n_cond_user = n_user;
    q->n_cond_answer = 0;
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
    if (!q->pos || !q->keys) {
        snprintf(err, errlen, "out of memory for the positions of %d prompt tokens", n);
        return DG_ENOMEM;
    }
    int32_t grids[DG_SEQ_MAX_IMAGES][3];
    int64_t want = 0, got = 0;
    for (int i = 0; i < q->n_images; i++) {
        memcpy(grids[i], q->images[i].grid, sizeof grids[i]);
        want += q->images[i].n_tokens;
    }
    /* the text itself may hold the image token: a special token, which the tokenizer makes of
     * the typed text as transformers' does; the positions would then not add up */
    for (int i = 0; i < n; i++) got += q->prompt.ids[i] == m->image_pad_id;
    if (got != want) {
        snprintf(err, errlen, "text: holds the model's image token (%lld of them beyond the %lld of %d images): "
                 "<|image_pad|> is not a text to send", (long long)(got - want), (long long)want, q->n_images);
        return DG_EINVAL;
    }
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
        q->keys[i] = dg_seq_image_key(&q->images[img - 1].hash);
    }
    return 0;
}

/* Stop strings are matched on the answer's text, which never holds a special token
 * (DG_TOK_SKIP_SPECIAL): a stop string that is, or holds, one ("<|im_start|>") would never
 * match, and the answer ran on to max_new_tokens (transformers' stop_strings match token
 * strings, special ones too). Refused, naming the token; an end token ends the answer
 * anyway, and logit_bias bans one. */
static int stop_is_writable(const dg_tok *tok, const char *stop, char *err, size_t errlen) {
    dg_tok_ids ids = {0};
    int rc = dg_tok_encode(tok, stop, strlen(stop), &ids, err, errlen);
    for (size_t i = 0; rc == 0 && i < ids.n; i++) {
        char *shown = NULL, *all = NULL;
        size_t n_shown = 0, n_all = 0;
        if ((rc = dg_tok_decode(tok, &ids.ids[i], 1, DG_TOK_SKIP_SPECIAL, &shown, &n_shown, err, errlen)) == 0 &&
            (rc = dg_tok_decode(tok, &ids.ids[i], 1, 0, &all, &n_all, err, errlen)) == 0 && !n_shown && n_all) {
            snprintf(err, errlen, "text.stop: \"%s\" holds the special token %s (id %d), which the answer's text "
                     "never holds: it cannot match (an end token ends the answer anyway; logit_bias bans one)",
                     stop, all, (int)ids.ids[i]);
            rc = DG_EINVAL;
        }
        free(shown);
        free(all);
    }
    dg_tok_ids_free(&ids);
    return rc;
}

/* A drawn picture goes back into the context (sched_draw.c: <BOV>, its tokens and one more
 * must fit): a size whose picture alone fills this model's context is never drawn, and
 * its answer would end at its first <BOV>, "length", without a word. Refused, naming it. */
static int picture_fits(const dg_model *m, const dg_image_params *ip, char *err, size_t errlen) {
    const int room = dg_sched_picture_room(m, ip, err, errlen);
    if (room < 0) return room;
    if (1 + room < m->max_context) return 0;   /* after a prompt of one token, it fits */
    snprintf(err, errlen, "image size %dx%d: a picture of it takes %d tokens of the context once drawn; this "
             "model's context is %d tokens in all", ip->width, ip->height, room - 2, m->max_context);
    return DG_ELIMIT;
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
    if (m->has_draw && ip.max_images > 0 && (rc = picture_fits(m, &ip, err, errlen)) < 0) goto fail;
    q->ip = ip;

    /* a favoured id the tokenizer does not have (a padding row of lm_head) would be an
     * answer of nothing, "done"; a ban of one is fine (random weights may sample them) */
    for (size_t i = 0; i < tp.n_logit_bias; i++)
        if (tp.logit_bias[i].bias > 0 && tp.logit_bias[i].token >= 0 &&
            tp.logit_bias[i].token < m->cfg.text.vocab_size && !dg_tok_has(m->tok, tp.logit_bias[i].token)) {
            snprintf(err, errlen, "text.logit_bias: token %d is not one of the tokenizer's (ids below %d; the "
                     "model's %d output rows past them, or in gaps, are padding): only a ban (a negative bias) "
                     "may name it", tp.logit_bias[i].token, dg_tok_n_ids(m->tok), m->cfg.text.vocab_size);
            rc = DG_EINVAL;
            goto fail;
        }
    dg_sampler_params sp = {.temperature = tp.temperature, .top_k = tp.top_k, .top_p = tp.top_p,
                            .repetition_penalty = tp.repetition_penalty, .logit_bias = tp.logit_bias,
                            .n_logit_bias = tp.n_logit_bias, .seed = r->seed};
    if ((rc = dg_sampler_new(m->cfg.text.vocab_size, &sp, &q->sampler, err, errlen)) < 0) goto fail;
    for (size_t i = 0; i < tp.n_stop; i++)
        if ((rc = stop_is_writable(m->tok, tp.stop[i], err, errlen)) < 0) goto fail;
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
    if (q->hist) memcpy(q->hist, q->prompt.ids, sizeof *q->hist * (size_t)q->n_fed);
    dg_sched_feed_prompt(s, q);
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

/* ---- stepping ------------------------------------------------------------------------------ */

static void emit_text(void *user, const char *text, size_t len) {
    dg_seq *q = user;
    if (!len) return;
    q->sink.text(q->sink.user, text, len);
    /* the answer since the last image, its last DG_SEQ_PROMPT_TEXT bytes: the next image's
     * prompt's words nearest the picture */
    q->n_cond_answer = dg_utf8_keep_tail(q->cond_answer, q->n_cond_answer, DG_SEQ_PROMPT_TEXT, text, len);
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
    memmove(q->rest, text + end, q->n_rest);   /* text may be q->rest's own copy */
    return 2;
}

/* The text that followed a draw marker in its token (q->rest): after the marker's image, or
 * at once where none is drawn. A marker in it draws nothing (its own rest follows at once).
 * 1: a stop string ended the answer. */
static int feed_rest(dg_seq *q) {
    char rest[sizeof q->rest];
    int fed = 2;
    while (fed == 2 && q->n_rest) {
        const size_t n = q->n_rest;
        memcpy(rest, q->rest, n);
        q->n_rest = 0;
        fed = feed_text(q, rest, n);
    }
    return fed == 1;
}

/* Ends a sequence. flush: emit what the stream decoder and the stop matcher still hold
 * (not after a stop string matched: what they hold then is the stop string). */
static void finish(dg_sched *s, dg_seq *q, dg_finish_reason why, int flush) {
    char tail[DG_TOK_STREAM_OUT_MAX];
    size_t n = dg_tok_stream_finish(&q->stream, tail);
    if (flush) {   /* a marker's rest, then the stream decoder's tail, then what the matchers hold */
        int fed = q->n_rest && feed_rest(q);
        if (!fed && n) fed = feed_text(q, tail, n);
        if (fed == 2) fed = feed_rest(q);   /* a marker at the very end draws nothing */
        if (fed != 1) {
            if (q->marker) dg_stop_flush(q->marker, emit_checked, q);
            if (!q->stopped) dg_stop_flush(q->stop, emit_text, q);
        }
    }
    if (q->state == SEQ_DRAW) dg_sched_draw_account(q);   /* cancelled or past the deadline while drawing */
    q->usage.generated_tokens = q->generated;
    q->usage.images = q->n_drawn;
    q->t.total_ms = dg_clock_now_ms() - q->t_submit;
    dg_sink sink = q->sink;
    dg_usage u = q->usage;
    dg_timings t = q->t;
    seq_clear(s, q);
    sink.finished(sink.user, why, &u, &t);
}

/* msg may be the slot's own q->step_err, which seq_clear wipes: copied first. */
static void fail_seq(dg_sched *s, dg_seq *q, int code, const char *msg) {
    dg_sink sink = q->sink;
    char why[sizeof q->step_err > 512 ? sizeof q->step_err : 512];
    snprintf(why, sizeof why, "%s", msg);
    seq_clear(s, q);
    sink.failed(sink.user, code, why);
}

static int is_stop_token(const dg_model *m, int32_t t) {
    for (int i = 0; i < m->n_stop_ids; i++) if (m->stop_ids[i] == t) return 1;
    return 0;
}

/* The token the forward sampled for q (q->last, not yet in the KV cache): <BOV> (or the
 * draw marker) makes an image due (q->draw_pending: begun by begin_draw once every sequence
 * has taken its tokens), a stop token, stop string or limit ends the sequence, anything else
 * streams. */
static int take_token(dg_sched *s, dg_seq *q) {
    const dg_model *m = s->m;
    int32_t tok = q->last;
    /* nothing may come next, not a banned token: the job's bans (refused at submit when they
     * alone cover the vocabulary) and the engine's <BOV> ban once max_images are drawn leave
     * nothing but <BOV>: the image limit ends the answer, as max_new_tokens would */
    if (dg_sampler_starved(q->sampler)) {
        finish(s, q, DG_FINISH_LENGTH, 1);
        return 0;
    }
    /* what followed a draw marker, held for after its image: the image is done now */
    if (q->n_rest && feed_rest(q)) { finish(s, q, DG_FINISH_STOP, 0); return 0; }
    if (tok == m->bov_id) { q->draw_pending = 1; return 0; }
    if (is_stop_token(m, tok)) { finish(s, q, DG_FINISH_STOP, 1); return 0; }
    q->generated++;
    char text[DG_TOK_STREAM_OUT_MAX];
    size_t len = dg_tok_stream_push(m->tok, &q->stream, tok, text);
    int fed = len ? feed_text(q, text, len) : 0;
    if (fed == 2) {
        if (dg_seq_may_draw(m, q)) { q->draw_pending = 1; return 0; }   /* the marker acts as <BOV> */
        fed = feed_rest(q);   /* no image may be drawn: the text goes on at once */
    }
    if (fed == 1) { finish(s, q, DG_FINISH_STOP, 0); return 0; }
    if (q->generated >= q->max_new || q->kv.n_tokens + 1 >= m->max_context) finish(s, q, DG_FINISH_LENGTH, 1);
    return 0;
}

/* An image that became due this step begins. What the matchers hold (a part of the marker
 * or of a stop string) is text before the picture: it comes out first, and no stop string
 * spans a picture. */
static int begin_draw(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    q->draw_pending = 0;
    if (q->marker) dg_stop_flush(q->marker, emit_checked, q);
    if (q->stopped) { finish(s, q, DG_FINISH_STOP, 0); return 0; }
    dg_stop_flush(q->stop, emit_text, q);
    const int rc = dg_sched_draw_begin(s, q, err, errlen);
    if (rc == 1) finish(s, q, DG_FINISH_LENGTH, 1);
    return rc < 0 ? rc : 0;
}

/* The tokens of a sequence that fed drafts (sched_feed.c "Drafts"): row by row, each
 * sampled token taken as take_token takes it, while it is the next drafted token and the
 * sequence decodes on. */
static void take_drafted(dg_sched *s, dg_seq *q) {
    for (int j = 0;; j++) {
        dg_sched_draft_take(s, q, j);
        const int32_t t = q->last;
        take_token(s, q);
        if (q->state == SEQ_FREE) return;   /* ended: nothing more of it to keep */
        if (q->draw_pending || j == q->n_draft || t != q->draft[j + 1]) {
            dg_sched_draft_end(s, q);
            return;
        }
    }
}

/* A sequence's problem of this step: a fatal one is the scheduler's (returned, with its
 * message in err); any other fails this sequence only (out of KV blocks, a limit, a bad
 * image). */
static int seq_problem(dg_sched *s, dg_seq *q, int rc, const char *msg, char *err, size_t errlen) {
    if (dg_error_class(rc) == DG_ERROR_FATAL) {
        snprintf(err, errlen, "%s", msg);
        return rc;
    }
    fail_seq(s, q, rc, msg);
    return 0;
}

/* A step: the sequences that end (cancelled, past their deadline) end; each drawing one
 * takes a denoising step; then one decoder forward for all the others (sched_feed.c), and
 * each token it sampled is taken. */
int dg_sched_step(dg_sched *s, char *err, size_t errlen) {
    dg_backend *be = s->be;
    char msg[512];
    int rc;
    for (int i = 0; i < s->n_seqs; i++) {
        dg_seq *q = &s->seqs[i];
        if (q->state == SEQ_FREE) continue;
        if (q->cancelled) finish(s, q, DG_FINISH_CANCELLED, 1);
        else if (q->deadline_ms && unix_ms() >= q->deadline_ms) finish(s, q, DG_FINISH_DEADLINE, 1);
    }
    if (dg_sched_draw(s) > 0)
        for (int i = 0; i < s->n_seqs; i++)
            if (s->seqs[i].state != SEQ_FREE && s->seqs[i].step_rc &&
                (rc = seq_problem(s, &s->seqs[i], s->seqs[i].step_rc, s->seqs[i].step_err, err, errlen)) < 0)
                return rc;
    if ((rc = dg_sched_forward(s, err, errlen)) < 0) return rc;
    for (int i = 0; i < s->n_seqs; i++) {
        dg_seq *q = &s->seqs[i];
        if (q->state == SEQ_FREE) continue;
        if (q->step_rc) {
            if ((rc = seq_problem(s, q, q->step_rc, q->step_err, err, errlen)) < 0) return rc;
        } else if (q->sampled) {
            if (q->n_draft) take_drafted(s, q);
            else take_token(s, q);
        }
    }
    /* the images that became due, once every sequence's tokens are taken: a drafted row is
     * sampled from the forward's state, which a published pipeline's prompt overwrites */
    for (int i = 0; i < s->n_seqs; i++) {
        dg_seq *q = &s->seqs[i];
        if (q->state != SEQ_FREE && q->draw_pending && (rc = begin_draw(s, q, msg, sizeof msg)) < 0 &&
            (rc = seq_problem(s, q, rc, msg, err, errlen)) < 0)
            return rc;
    }
    /* a device fault during the step: nothing it computed can be trusted, and the process
     * should go (the daemon exits 75; the jobs stay pending for a new start) */
    rc = be->status(be, err, errlen);
    return rc < 0 ? rc : 0;
}
