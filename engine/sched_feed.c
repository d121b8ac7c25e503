/* sched_feed.c — the decoder's side of a scheduler step (docs/DESIGN.md §6 "Batching"):
 * every sequence that needs the decoder joins ONE forward. A decoding sequence brings one
 * row (its sampled token), a feeding one (state SEQ_PREFILL) a chunk of its feed; the
 * chunks go to the oldest feeds first, DG_SCHED_CHUNK tokens in all, so that a long prompt
 * arriving never stalls the running jobs for more than one chunk's work a step. Their rows
 * are stacked: each weight is one GEMM over all of them (dg_qwen2_forward_batch), and
 * attention reads each sequence's own blocks. On the CPU a row is the same bits in any
 * batch and any chunk (backend.h matmul), so a job's tokens do not depend on the others.
 *
 * Image rows: s->embeds holds the vision rows of one feed at a time; a feed that needs
 * rows takes it when it is free (running the tower, or the vision cache) and holds it to
 * its end; another waits, and its chunks wait with it.
 *
 * Drafts (speculative decoding by prompt lookup, dg_sched_opts draft_tokens). Where the
 * context's last 3 (else 2) tokens occurred before, a decoding sequence feeds, after its
 * sampled token, the tokens that followed that occurrence, up to s->draft of them: its
 * row becomes 1 + k rows with a logits row each, whose K/V the forward writes but does
 * not commit. After the forward the rows are taken in order (sched.c): row j's K/V is
 * committed and its logits sampled, exactly as plain decoding would sample after feeding
 * that token; while the token sampled is the next drafted one, the next row is taken too.
 * So a step emits 1 + (drafted tokens kept) tokens, and every one is the token plain
 * decoding gives: on a backend whose rows are the same bits at any batch size (rows_exact:
 * the CPU) the logits are the same bits, the sampler is called with the same rows in the
 * same order (its random stream included), and no token after the first refused draft is
 * sampled. The rows not kept are written over by the next forward; their condition rows
 * are dropped. Decode on the CPU streams the weights once for 1 to 8 rows in one pass (the
 * multi-row GEMV), so a step of 1 + k rows costs little more than one of 1 row; drafts take
 * only the rows up to 8 that the step's decoding sequences leave (DG_SCHED_DRAFT_ROWS). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "mllm/mrope.h"
#include "scheduler.h"

/* ---- condition rows ------------------------------------------------------------------------ */

/* After decoder layer `layer`: that layer's share of the connector's first Linear for the
 * sequence's rows. Cosmos' last condition layer is HF hidden_states[L], which is after the
 * final RMSNorm (model.norm); the others are the raw residual stream. */
static void cond_hook(void *user, int layer, const float *hidden, int n, int pos0) {
    dg_seq *q = user;
    dg_sched *s = q->sched;
    const dg_model *m = s->m;
    const float *h = hidden;
    if (q->step_rc) return;
    if (layer == m->cfg.text.n_layers - 1) {
        s->be->rmsnorm(s->be, s->normed, hidden, m->llm.norm, n, m->cfg.text.hidden_size,
                       m->cfg.text.rms_norm_eps);
        h = s->normed;
    }
    int rc = dg_cond_acc_add(&m->conn, q->acc, layer, h, n, pos0);
    if (rc < 0) {
        q->step_rc = rc;
        snprintf(q->step_err, sizeof q->step_err, "condition accumulator: positions %d..%d out of range", pos0,
                 pos0 + n - 1);
    }
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

/* ---- feeds ------------------------------------------------------------------------------- */

void dg_sched_feed_prompt(dg_sched *s, dg_seq *q) {
    const dg_model *m = s->m;
    if (m->has_draw && q->n_fed) cond_load_blocks(s, q, q->n_fed);
    q->feed_ids = q->prompt.ids;
    q->feed_pos = q->pos;
    q->feed_keys = q->keys;
    q->feed_n = (int)q->prompt.n;
    q->feed_done = q->n_fed;
    q->feed_image = 0;
    q->feed_begun = 0;
    q->feed_rows = 0;
    for (int i = q->n_fed; i < q->feed_n && !q->feed_rows; i++) q->feed_rows = q->feed_ids[i] == m->image_pad_id;
    /* the images whose positions all came from the prefix cache skip the tower */
    for (int i = 0; i < q->n_inputs && q->images[i].token0 + q->images[i].n_tokens <= q->n_fed; i++)
        q->usage.cached_vision++;
}

void dg_sched_feed_clear(dg_sched *s, dg_seq *q) {
    if (s->embeds_of == q) s->embeds_of = NULL;
    free(q->image_ids);
    free(q->image_pos);
    free(q->image_keys);
    q->image_ids = NULL;
    q->image_pos = NULL;
    q->image_keys = NULL;
    q->feed_ids = NULL;
    q->feed_pos = NULL;
    q->feed_keys = NULL;
    q->feed_n = q->feed_done = q->feed_rows = q->feed_image = q->feed_begun = 0;
}

int dg_sched_feed_image(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    dg_seq_image *im = &q->images[q->n_images - 1];
    int rc = dg_image_grid(im->img->height, im->img->width, &m->pp, im->grid, err, errlen);
    if (rc < 0) return rc;
    im->n_tokens = dg_vision_tokens(&m->vision, im->grid[0], im->grid[1], im->grid[2]);
    int n = im->n_tokens + 3, n_past = q->kv.n_tokens, next;
    dg_sched_feed_clear(s, q);
    q->image_ids = malloc((size_t)n * sizeof *q->image_ids);
    q->image_pos = malloc((size_t)3 * n * sizeof *q->image_pos);
    q->image_keys = calloc((size_t)n, sizeof *q->image_keys);
    if (!q->image_ids || !q->image_pos || !q->image_keys) {
        snprintf(err, errlen, "out of memory for an image's tokens");
        return DG_ENOMEM;
    }
    q->image_ids[0] = q->last;   /* <BOV>, or the draw marker's last token */
    q->image_ids[1] = m->vision_start_id;
    for (int i = 0; i < im->n_tokens; i++) {
        q->image_ids[2 + i] = m->image_pad_id;
        q->image_keys[2 + i] = dg_seq_image_key(&im->hash);
    }
    q->image_ids[n - 1] = m->vision_end_id;
    /* the image's tokens join the context the repetition penalty reads, as a prompt
     * image's do: a conversation sent again with this image gives the same penalties */
    for (int i = 1; i < n; i++) dg_sampler_accept(q->sampler, q->image_ids[i]);
    im->token0 = n_past + 2;
    dg_mrope_params mp = {m->image_pad_id, m->pp.merge_size};
    if ((rc = dg_mrope_index(q->image_ids, n, n_past + q->rope_delta, &mp, (const int32_t (*)[3])im->grid, 1,
                             q->image_pos, &next, err, errlen)) < 0)
        return rc;
    q->rope_delta = dg_mrope_delta(next, n_past + n);
    q->n_cond_answer = 0;   /* the next image's prompt: the answer's text after this one */
    q->feed_ids = q->image_ids;
    q->feed_pos = q->image_pos;
    q->feed_keys = q->image_keys;
    q->feed_n = n;
    q->feed_done = 0;
    q->feed_rows = 1;
    q->feed_image = 1;
    q->state = SEQ_PREFILL;
    return 0;
}

/* The image rows the prompt's feed still needs, into s->embeds: those of the prompt's
 * images with a position at or after n_fed, through the vision tower (or the vision cache).
 * An image whose positions all came from the prefix KV cache needs none and skips the
 * tower. The images that need rows are the last ones of the prompt; q->emb_row gets the
 * rows of the first of them whose positions came from the cache, where the feed's rows
 * begin. */
static int encode_inputs(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    const dg_image *imgs[DG_SEQ_MAX_IMAGES];
    int first = 0, n = 0, rows = 0, computed = 0;
    q->emb_row = 0;
    while (first < q->n_inputs && q->images[first].token0 + q->images[first].n_tokens <= q->n_fed) first++;
    for (int i = first; i < q->n_inputs; i++) {
        imgs[n++] = q->images[i].img;
        rows += q->images[i].n_tokens;
    }
    if (n == 0) return 0;
    if (rows > s->embed_rows) {
        snprintf(err, errlen, "the images take %d tokens, more than the context of %d", rows, s->embed_rows);
        return DG_ELIMIT;
    }
    if (q->images[first].token0 < q->n_fed) q->emb_row = q->n_fed - q->images[first].token0;
    double t0 = dg_clock_now_ms();
    int rc = dg_vision_encode(&m->vision, s->vs, s->vcache, &m->pp, imgs, n, s->embeds, &computed, err, errlen);
    q->t.vision_ms += dg_clock_now_ms() - t0;
    q->usage.cached_vision += n - computed;
    return rc;
}

/* A drawn image's rows into s->embeds. */
static int encode_drawn(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    const dg_image *one[1] = {q->images[q->n_images - 1].img};
    int computed = 0;
    double t0 = dg_clock_now_ms();
    int rc = dg_vision_encode(&m->vision, s->vs, s->vcache, &m->pp, one, 1, s->embeds, &computed, err, errlen);
    q->t.vision_ms += dg_clock_now_ms() - t0;
    q->usage.cached_vision += computed == 0;
    q->emb_row = 0;
    return rc;
}

/* 0 when the feed's image rows are in s->embeds (taking them now if it is free), 1 when
 * another feed holds it, or a negative code. */
static int feed_take_rows(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    if (!q->feed_rows || s->embeds_of == q) return 0;
    if (s->embeds_of) return 1;
    int rc = q->feed_image ? encode_drawn(s, q, err, errlen) : encode_inputs(s, q, err, errlen);
    if (rc < 0) return rc;
    s->embeds_of = q;
    return 0;
}

/* ---- one forward for the step ---------------------------------------------------------------- */

static void batch_add(dg_sched *s, int *n, dg_seq *q, dg_qwen2_input in) {
    in.bounds = dg_sampler_bounded(q->sampler);   /* greedy or top-k from the logit screen's bounds, where there is one */
    s->batch[*n] = (dg_qwen2_batch_seq){.seq = &q->kv, .in = in, .hook = s->m->has_draw ? &s->hooks[*n] : NULL};
    s->hooks[*n] = (dg_qwen2_hook){cond_hook, q};
    s->batch_of[*n] = q;
    (*n)++;
}

/* The next chunk of q's feed, at most *budget tokens, into the batch; *pos_used: floats of
 * s->chunk_pos taken so far. */
static void add_chunk(dg_sched *s, int *n, dg_seq *q, int *budget, int *pos_used) {
    const dg_model *m = s->m;
    const int D = m->cfg.text.hidden_size, left = q->feed_n - q->feed_done;
    const int c = left < *budget ? left : *budget, at = q->feed_done;
    int32_t *pos = s->chunk_pos + *pos_used;
    int img_tokens = 0;
    for (int r = 0; r < 3; r++) memcpy(pos + r * c, q->feed_pos + (int64_t)r * q->feed_n + at, (size_t)c * sizeof *pos);
    for (int i = 0; i < c; i++) img_tokens += q->feed_ids[at + i] == m->image_pad_id;
    batch_add(s, n, q, (dg_qwen2_input){.ids = q->feed_ids + at, .n = c, .pos = pos, .rope_delta = q->rope_delta,
                                        .image_embeds = img_tokens ? s->embeds + (int64_t)q->emb_row * D : NULL,
                                        .token_keys = q->feed_keys + at, .n_logits = c == left,
                                        .logits_on_device = 1});
    *budget -= c;
    *pos_used += 3 * c;
}

/* The exact logits of some tokens of logits row `row` (the logit screen's candidates). */
typedef struct {
    dg_sched *s;
    int       row;
} pick_ctx;

static void pick_row(void *user, const int32_t *ids, int n, float *out) {
    const pick_ctx *p = user;
    dg_qwen2_pick(&p->s->m->llm, p->s->st, p->row, ids, n, out);
}

/* q->last = the token sampled from logits row `row` of the forward (with <BOV> banned when
 * no image may be drawn).
 * On every backend: on a GPU it spares the 0.6 MB download and the host pass over the
 * vocabulary; on the CPU it picks the same token and is no slower (V = 152064, one
 * core: greedy 0.06 vs 0.56 ms, top-k 50 0.10 vs 1.2 ms, top-p 0.9 alone 0.61 vs
 * 1.2 ms, plain temperature 1.16 ms both). st->logits is its scratch for the rows the
 * candidates do not decide.
 * After a forward that left the logit screen's bounds (every row greedy or top-k), the token comes
 * from them, else (bounds that do not decide, rare) from the row computed whole. */
static void sample_row(dg_sched *s, dg_seq *q, int row) {
    const dg_model *m = s->m;
    const int64_t V = m->cfg.text.vocab_size;
    int32_t ban = m->bov_id >= 0 && !dg_seq_may_draw(m, q) ? m->bov_id : -1;
    float *logits = s->st->dev_logits + (int64_t)row * V;
    if (s->st->bounded) {
        pick_ctx p = {s, row};
        if ((q->last = dg_sampler_sample_bounds(q->sampler, s->st->lo + row * V, s->st->hi + row * V, ban, pick_row,
                                                &p)) >= 0) {
            s->n_screened++;
            return;
        }
        dg_qwen2_logits_row(&m->llm, s->st, row);
        s->n_unscreened++;
    }
    q->last = dg_sampler_sample_device(q->sampler, s->be, logits, ban, s->st->logits);
}

/* ---- drafts ---------------------------------------------------------------------------------- */

/* A token no draft goes through: an image's tokens and <BOV> begin work of their own. */
static int draft_stops(const dg_model *m, int32_t t) {
    return t == m->image_pad_id || t == m->vision_start_id || t == m->vision_end_id || t == m->bov_id;
}

/* The drafted tokens of a decoding sequence into q->draft[1 ..]: the context is q->hist's
 * committed tokens and q->last; for g = DG_SCHED_DRAFT_NGRAM down to 2, the latest earlier
 * occurrence of its last g tokens whose next token may be drafted gives the tokens that
 * follow it (up to s->draft and `rows`, within the context, none at or past a draft_stops
 * token). Fewer where the context or max_new_tokens ends first. Returns how many (0: none
 * found). */
static int draft_lookup(dg_sched *s, dg_seq *q, int rows) {
    const dg_model *m = s->m;
    const int n = q->kv.n_tokens + 1;   /* the context's length, q->last included */
    int max = s->draft < rows ? s->draft : rows;
    if (max > m->max_context - 1 - n) max = m->max_context - 1 - n;   /* positions n-1 .. n-1+k must fit */
    if (max > q->max_new - q->generated - 1) max = q->max_new - q->generated - 1;
    if (max <= 0) return 0;
    int32_t *h = q->hist;
    h[n - 1] = q->last;
    for (int g = DG_SCHED_DRAFT_NGRAM; g >= 2; g--) {
        if (n <= g) continue;
        const int32_t *suf = h + n - g;
        for (int p = n - g - 1; p >= 0; p--) {   /* an occurrence h[p .. p+g) with a next token */
            if (h[p] != suf[0] || memcmp(h + p + 1, suf + 1, sizeof *h * (size_t)(g - 1)) != 0) continue;
            int k = 0;
            while (k < max && p + g + k < n && !draft_stops(m, h[p + g + k])) {
                q->draft[1 + k] = h[p + g + k];
                k++;
            }
            if (k) return k;
        }
    }
    return 0;
}

void dg_sched_draft_take(dg_sched *s, dg_seq *q, int j) {
    q->hist[q->kv.n_tokens] = q->draft[j];
    dg_kv_seq_commit(s->kv, &q->kv, &q->draft[j], NULL, 1);
    /* a block this commit filled is shareable from now on: its condition rows go beside it
     * now, not at dg_sched_draft_end (the sequence may end on this very row) */
    if (s->m->has_draw) cond_save_blocks(s, q);
    s->n_accepted += j > 0;
    q->draft_kept = j;
    sample_row(s, q, q->draft_row + j);
}

/* Drafts all refused make a sequence wait 1, 3, 7, 15, 15 .. steps before it drafts again
 * (text that does not repeat itself costs the rows of one draft now and then); one kept
 * ends the wait. */
void dg_sched_draft_end(dg_sched *s, dg_seq *q) {
    const dg_model *m = s->m;
    if (m->has_draw) {
        dg_cond_acc_truncate(&m->conn, q->acc, q->kv.n_tokens);
        cond_save_blocks(s, q);
    }
    if (q->draft_kept) q->draft_wait = 0;
    else q->draft_skip = q->draft_wait = q->draft_wait * 2 + 1 < 15 ? q->draft_wait * 2 + 1 : 15;
    q->n_draft = q->draft_kept = 0;
}

/* Marks a sequence's failure for sched.c (which fails it after the forward). */
static void seq_failed(dg_seq *q, int rc, const char *msg) {
    q->step_rc = rc;
    snprintf(q->step_err, sizeof q->step_err, "%s", msg);
}

/* A sequence that holds KV it computed, or will: decoding, drawing, or feeding past its
 * first chunk or an image. */
static int begun(const dg_seq *q) {
    return q->state == SEQ_DECODE || q->state == SEQ_DRAW ||
           (q->state == SEQ_PREFILL && (q->feed_begun || q->feed_image));
}

/* Whether a prompt not begun may begin: it has the KV room for all of it (and its first
 * token) in the blocks free or evictable, less one for each of the step's rows planned
 * before it, or no other sequence has begun (alone, a prompt fits the pool). Else it
 * waits, holding nothing, rather than take the blocks the running sequences need to end (a
 * prompt begun in a pool too small for it and them made them all wait on each other, and
 * one failed, again and again). */
static int feed_may_begin(const dg_sched *s, const dg_seq *q, int planned) {
    if (begun(q)) return 1;
    int others = 0;
    for (int i = 0; i < s->n_seqs; i++) others += &s->seqs[i] != q && begun(&s->seqs[i]);
    if (!others) return 1;
    dg_kv_stats st;
    dg_kv_cache_stats(s->kv, &st);
    const int bs = DG_KV_BLOCK, end = q->kv.n_tokens + (q->feed_n - q->feed_done) + 1;
    const int need = (end + bs - 1) / bs - q->kv.n_blocks;
    return st.n_free + st.n_cached - planned >= need;
}

/* The step's batch: every decoding sequence's row, then chunks of the feeds, oldest first,
 * within DG_SCHED_CHUNK tokens. The sequences' KV room is reserved here: one that cannot
 * get it waits out the step (below), or fails alone. Returns the batch's size. */
static int batch_plan(dg_sched *s) {
    int n = 0, budget = DG_SCHED_CHUNK, pos_used = 0, draft_rows = DG_SCHED_DRAFT_ROWS;
    char msg[256];
    for (int i = 0; i < s->n_seqs; i++) draft_rows -= s->seqs[i].state == SEQ_DECODE;
    for (int i = 0; i < s->n_seqs; i++) {
        dg_seq *q = &s->seqs[i];
        q->sampled = q->step_rc = 0;
        if (q->state == SEQ_DECODE) {
            const int k = s->draft && draft_rows > 0 && !(q->draft_skip && q->draft_skip--)
                              ? draft_lookup(s, q, draft_rows) : 0;
            draft_rows -= k;
            q->draft[0] = q->last;
            q->n_draft = k;
            s->n_drafted += k;
            batch_add(s, &n, q, (dg_qwen2_input){.ids = q->draft, .n = 1 + k, .rope_delta = q->rope_delta,
                                                 .n_logits = 1 + k, .logits_on_device = 1, .no_commit = k > 0});
        }
    }
    dg_seq *held = NULL;   /* the oldest prompt not begun that waits for room */
    for (uint64_t after = 0; budget > 0;) {
        dg_seq *q = NULL;   /* the oldest feed not yet considered */
        for (int i = 0; i < s->n_seqs; i++) {
            dg_seq *c = &s->seqs[i];
            if (c->state == SEQ_PREFILL && c->id > after && (!q || c->id < q->id)) q = c;
        }
        if (!q) break;
        after = q->id;
        /* a prompt held for room holds back the younger prompts not begun (first come,
         * first served), never a feed begun: the room it waits for is theirs to free */
        if (!begun(q) && (held || !feed_may_begin(s, q, n))) {
            if (!held) held = q;
            continue;
        }
        int rc = feed_take_rows(s, q, msg, sizeof msg);
        if (rc < 0) seq_failed(q, rc, msg);
        else if (rc == 0) add_chunk(s, &n, q, &budget, &pos_used);
    }
    /* nothing else in the step and no picture in progress: nothing will free room for the
     * prompt held (prefix-cache blocks of prompts behind it, say), so it goes now; the pool
     * then has it wait or fail below, as any */
    int drawing = 0;
    for (int i = 0; i < s->n_seqs; i++) drawing += s->seqs[i].state == SEQ_DRAW;
    if (held && n == 0 && !drawing) {
        int rc = feed_take_rows(s, held, msg, sizeof msg);
        if (rc < 0) seq_failed(held, rc, msg);
        else if (rc == 0) add_chunk(s, &n, held, &budget, &pos_used);
    }
    int kept = 0, waiting = 0;
    dg_seq *youngest = NULL;   /* of those waiting for room */
    for (int i = 0; i < n; i++) {
        int rc = dg_kv_seq_reserve(s->kv, s->batch[i].seq, s->batch[i].in.n);
        dg_seq *q = s->batch_of[i];
        if (rc == DG_EAGAIN && q->n_draft) {   /* no room for the drafts: the plain row */
            s->n_drafted -= q->n_draft;
            q->n_draft = 0;
            s->batch[i].in.n = s->batch[i].in.n_logits = 1;
            s->batch[i].in.no_commit = 0;
            rc = dg_kv_seq_reserve(s->kv, s->batch[i].seq, 1);
        }
        if (rc == DG_EAGAIN) {   /* the pool full: it waits a step for the others to free blocks */
            waiting++;
            if (!youngest || q->id > youngest->id) youngest = q;
            continue;
        }
        if (rc < 0) {
            snprintf(msg, sizeof msg, "no KV room for %d more tokens after %d (sequence limit)", s->batch[i].in.n,
                     s->batch[i].seq->n_tokens);
            seq_failed(q, rc, msg);
            continue;
        }
        s->batch[kept] = s->batch[i];
        s->hooks[kept] = s->hooks[i];
        s->batch[kept].hook = s->batch[i].hook ? &s->hooks[kept] : NULL;
        s->batch_of[kept++] = s->batch_of[i];
    }
    /* No row got room and no picture is being drawn: the sequences hold the pool and wait
     * on each other. The youngest is failed (for a later attempt), and its blocks let the
     * others go on; a sequence waited while any other moved (ending, they free blocks) -
     * failing one at the first full pool failed jobs that fit the pool alone, one after
     * another, while the others were about to end. */
    if (waiting && !kept && !drawing) {
        snprintf(msg, sizeof msg, "no KV room for its next tokens after %d (cache full: %d jobs running hold the "
                 "pool, which holds %d at full context; the youngest of those waiting is given up)",
                 youngest->kv.n_tokens, dg_sched_active(s), s->kv_holds);
        seq_failed(youngest, DG_EAGAIN, msg);
    }
    return kept;
}

/* After the forward, for batch entry i: the feed moves on (at its end the sequence
 * decodes), the condition rows are kept, the next token is sampled, and the forward's
 * time goes to the sequence by its share of rows. */
static void batch_done(dg_sched *s, int i, int n_rows, double ms) {
    const dg_model *m = s->m;
    dg_seq *q = s->batch_of[i];
    const dg_qwen2_input *in = &s->batch[i].in;
    double share = ms * in->n / n_rows;
    if (q->step_rc) return;
    if (q->hist && !in->no_commit)   /* the tokens the forward committed */
        memcpy(q->hist + q->kv.n_tokens - in->n, in->ids, (size_t)in->n * sizeof *in->ids);
    if (m->has_draw) cond_save_blocks(s, q);
    if (q->state == SEQ_PREFILL) {
        q->feed_begun = 1;
        q->t.prefill_ms += share;
        for (int j = 0; j < in->n; j++) q->emb_row += in->ids[j] == m->image_pad_id;
        q->feed_done += in->n;
        if (!q->feed_image) q->n_fed = q->feed_done;
        if (q->feed_done == q->feed_n) {
            dg_sched_feed_clear(s, q);
            q->state = SEQ_DECODE;
        }
    } else {
        q->t.decode_ms += share;
    }
    if (!in->n_logits) return;
    if (q->n_draft) {   /* its rows are taken one at a time (dg_sched_draft_take) */
        q->draft_row = s->batch[i].logits_row;
        q->sampled = 1;
        return;
    }
    sample_row(s, q, s->batch[i].logits_row);
    q->sampled = 1;
}

int dg_sched_forward(dg_sched *s, char *err, size_t errlen) {
    int n = batch_plan(s), n_rows = 0;
    if (n == 0) return 0;
    for (int i = 0; i < n; i++) n_rows += s->batch[i].in.n;
    double t0 = dg_clock_now_ms();
    char msg[512] = "";
    int rc = dg_qwen2_forward_batch(&s->m->llm, s->st, s->kv, s->batch, n, msg, sizeof msg);
    if (rc < 0) {
        if (dg_error_class(rc) == DG_ERROR_FATAL) {
            snprintf(err, errlen, "%s", msg);
            return rc;
        }
        for (int i = 0; i < n; i++) seq_failed(s->batch_of[i], rc, msg);
        return 0;
    }
    double ms = dg_clock_now_ms() - t0;
    for (int i = 0; i < n; i++) batch_done(s, i, n_rows, ms);
    return 0;
}
