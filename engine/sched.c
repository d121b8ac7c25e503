/* dg_sched: the step-driven scheduler (DESIGN §6). Each dg_sched_step() advances every
 * active sequence by one unit of work: its prefill, one decode token, or (when the
 * interleaved image path is present) one denoising step. Batch size 1 is the first case
 * of the same loop.
 *
 * A sequence's life:
 *   submit   the conversation goes through the chat template into token ids; the longest
 *            cached prefix of full KV blocks is shared (dg_kv_seq_match_prefix)
 *   prefill  the remaining prompt tokens in chunks of at most the state's max_tokens
 *   decode   sample, stream the text (whole UTF-8 characters, stop strings held back),
 *            end at an EOS token, a stop string, max_new_tokens, cancellation or deadline
 * Nothing is allocated per token: the sampler, stop matcher and stream decoder are made at
 * submit, the forward state and KV pool at dg_sched_new. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chat_template.h"
#include "kv_cache.h"
#include "model_internal.h"
#include "sampler.h"

#define PREFILL_CHUNK 256     /* tokens per prefill forward: bounds the state's buffers */
#define KV_BLOCK 16           /* positions per KV block */

typedef enum { SEQ_FREE, SEQ_PREFILL, SEQ_DECODE } seq_state;

typedef struct {
    seq_state     state;
    uint64_t      id;
    dg_sink       sink;
    dg_kv_seq     kv;
    dg_sampler   *sampler;       /* owned */
    dg_stop      *stop;          /* owned */
    dg_tok_stream stream;
    dg_tok_ids    prompt;        /* owned: the whole prompt */
    int           n_fed;         /* prompt tokens in the KV cache */
    int32_t       last;          /* the sampled token to feed next */
    int           max_new, generated, images, max_images;
    int           cancelled;
    int64_t       deadline_ms;
    dg_usage      usage;
    dg_timings    t;
    double        t_submit;
} dg_seq;

struct dg_sched {
    dg_model       *m;           /* borrowed */
    dg_sched_opts   o;
    dg_kv_cache    *kv;          /* owned */
    dg_qwen2_state *st;          /* owned */
    dg_seq         *seqs;        /* owned [max_inflight] */
    int             n_seqs;
    uint64_t        next_id;
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int64_t unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
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
    size_t block_bytes = 2u * (size_t)c->n_layers * kv_dim * KV_BLOCK * sizeof(float);
    /* room for every sequence at full context, plus as much again for cached prefixes,
     * unless the caller set a budget */
    int per_seq = (m->max_context + KV_BLOCK - 1) / KV_BLOCK;
    int n_blocks = s->o.kv_cache_bytes ? (int)(s->o.kv_cache_bytes / block_bytes) : 2 * per_seq * s->o.max_inflight;
    int rc;
    if (n_blocks < per_seq) {
        snprintf(err, errlen, "kv_cache_bytes %zu holds %d blocks of %d positions; one sequence of "
                 "max_context %d needs %d", s->o.kv_cache_bytes, n_blocks, KV_BLOCK, m->max_context, per_seq);
        rc = DG_EINVAL;
        goto fail;
    }
    s->n_seqs = s->o.max_inflight;
    s->seqs = calloc((size_t)s->n_seqs, sizeof *s->seqs);
    if (!s->seqs) { rc = DG_ENOMEM; goto fail; }
    if ((rc = dg_kv_cache_new(m->be, c->n_layers, (int)kv_dim, KV_BLOCK, n_blocks, &s->kv, err, errlen)) < 0)
        goto fail;
    if ((rc = dg_qwen2_state_new(&m->llm, PREFILL_CHUNK, 1, &s->st, err, errlen)) < 0) goto fail;
    *out = s;
    return 0;
fail:
    dg_sched_free(s);
    return rc;
}

static void seq_clear(dg_sched *s, dg_seq *q) {
    if (q->state != SEQ_FREE || q->kv.blocks) {
        dg_kv_seq_release(s->kv, &q->kv);
        dg_kv_seq_free(&q->kv);
    }
    dg_sampler_free(q->sampler);
    dg_stop_free(q->stop);
    dg_tok_ids_free(&q->prompt);
    memset(q, 0, sizeof *q);
}

void dg_sched_free(dg_sched *s) {
    if (!s) return;
    for (int i = 0; s->seqs && i < s->n_seqs; i++) seq_clear(s, &s->seqs[i]);
    free(s->seqs);
    dg_qwen2_state_free(&s->m->llm, s->st);
    dg_kv_cache_free(s->kv);
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

static int build_prompt(dg_sched *s, const dg_request *r, dg_tok_ids *ids, char *err, size_t errlen) {
    size_t n_parts = 0;
    for (size_t i = 0; i < r->n_messages; i++) n_parts += r->messages[i].n_parts;
    dg_chat_message *msgs = calloc(r->n_messages ? r->n_messages : 1, sizeof *msgs);
    dg_chat_part *parts = calloc(n_parts ? n_parts : 1, sizeof *parts);
    int rc = DG_ENOMEM;
    if (!msgs || !parts) goto out;
    dg_chat_part *p = parts;
    for (size_t i = 0; i < r->n_messages; i++) {
        const dg_message *in = &r->messages[i];
        msgs[i].role = in->role == DG_ROLE_SYSTEM ? DG_CHAT_SYSTEM : in->role == DG_ROLE_USER ? DG_CHAT_USER
                                                                                          : DG_CHAT_ASSISTANT;
        msgs[i].parts = p;
        msgs[i].n_parts = in->n_parts;
        for (size_t k = 0; k < in->n_parts; k++, p++) {
            if (in->parts[k].kind == DG_PART_IMAGE) {
                snprintf(err, errlen, "messages[%zu].parts[%zu]: this model package takes no input images yet "
                         "(the vision tower is not wired into the scheduler)", i, k);
                rc = DG_EINVAL;
                goto out;
            }
            p->kind = DG_CHAT_TEXT;
            p->text = in->parts[k].text;
            p->text_len = in->parts[k].text_len;
        }
    }
    rc = dg_chat_encode(s->m->tok, msgs, r->n_messages, true, ids, err, errlen);
out:
    free(msgs);
    free(parts);
    return rc < 0 ? rc : 0;
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
    memset(q, 0, sizeof *q);
    int rc = build_prompt(s, r, &q->prompt, err, errlen);
    if (rc < 0) goto fail;

    dg_text_params tp = r->text;
    const dg_text_params *d = &m->text_defaults;
    if (!tp.max_new_tokens) tp.max_new_tokens = d->max_new_tokens;
    if (!tp.top_p) tp.top_p = d->top_p;
    if (!tp.repetition_penalty) tp.repetition_penalty = d->repetition_penalty;
    if (!tp.top_k) tp.top_k = d->top_k;
    if ((int64_t)q->prompt.n + tp.max_new_tokens > m->max_context) {
        if ((int)q->prompt.n >= m->max_context) {
            snprintf(err, errlen, "the prompt is %zu tokens; this model takes at most %d in all",
                     q->prompt.n, m->max_context);
            rc = DG_ELIMIT;
            goto fail;
        }
        tp.max_new_tokens = m->max_context - (int)q->prompt.n;   /* the answer ends "length" there */
    }
    dg_sampler_params sp = {.temperature = tp.temperature, .top_k = tp.top_k, .top_p = tp.top_p,
                            .repetition_penalty = tp.repetition_penalty, .logit_bias = tp.logit_bias,
                            .n_logit_bias = tp.n_logit_bias, .seed = r->seed};
    if ((rc = dg_sampler_new(m->cfg.text.vocab_size, &sp, &q->sampler, err, errlen)) < 0) goto fail;
    if ((rc = dg_stop_new(tp.stop, tp.n_stop, &q->stop, err, errlen)) < 0) goto fail;
    if ((rc = dg_kv_seq_init(&q->kv, m->max_context, KV_BLOCK)) < 0) {
        snprintf(err, errlen, "out of memory for a block table");
        goto fail;
    }
    for (size_t i = 0; i < q->prompt.n; i++) dg_sampler_accept(q->sampler, q->prompt.ids[i]);
    dg_tok_stream_init(&q->stream, DG_TOK_SKIP_SPECIAL);
    q->n_fed = dg_kv_seq_match_prefix(s->kv, &q->kv, q->prompt.ids, NULL, (int)q->prompt.n);
    q->usage.prompt_tokens = (int64_t)q->prompt.n;
    q->usage.cached_prompt_tokens = q->n_fed;
    q->max_new = tp.max_new_tokens;
    q->max_images = r->image.max_images ? r->image.max_images : m->image_defaults.max_images;
    q->deadline_ms = r->deadline_unix_ms;
    q->sink = *sink;
    q->id = ++s->next_id;
    q->t_submit = now_ms();
    q->state = SEQ_PREFILL;
    *seq = q->id;
    return 0;
fail:
    seq_clear(s, q);
    return rc;
}

/* ---- stepping ------------------------------------------------------------------------------ */

static void emit_text(void *user, const char *text, size_t len) {
    dg_seq *q = user;
    if (len) q->sink.text(q->sink.user, text, len);
}

/* Ends a sequence. flush: emit what the stream decoder and the stop matcher still hold
 * (not after a stop string matched: what they hold then is the stop string). */
static void finish(dg_sched *s, dg_seq *q, dg_finish_reason why, int flush) {
    char tail[DG_TOK_STREAM_OUT_MAX];
    size_t n = dg_tok_stream_finish(&q->stream, tail);
    if (flush && !(n && dg_stop_feed(q->stop, tail, n, emit_text, q)))
        dg_stop_flush(q->stop, emit_text, q);
    q->usage.generated_tokens = q->generated;
    q->usage.images = q->images;
    q->t.total_ms = now_ms() - q->t_submit;
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

/* Feeds `n` tokens to the decoder (prefill chunk or one decode token) and, when last,
 * samples the next token from the last position's logits. */
static int forward(dg_sched *s, dg_seq *q, const int32_t *ids, int n, int want_logits, char *err, size_t errlen) {
    const dg_model *m = s->m;
    dg_qwen2_input in = {.ids = ids, .n = n, .n_logits = want_logits ? 1 : 0};
    int rc = dg_qwen2_forward(&m->llm, s->st, s->kv, &q->kv, &in, NULL, err, errlen);
    if (rc < 0 || !want_logits) return rc;
    float *logits = s->st->logits;
    /* <BOV> is banned when the image budget is spent (and until the image path runs here) */
    if (m->bov_id >= 0) logits[m->bov_id] = -INFINITY;
    q->last = dg_sampler_sample(q->sampler, logits);
    return 0;
}

static int step_seq(dg_sched *s, dg_seq *q, char *err, size_t errlen) {
    const dg_model *m = s->m;
    if (q->cancelled) { finish(s, q, DG_FINISH_CANCELLED, 1); return 0; }
    if (q->deadline_ms && unix_ms() >= q->deadline_ms) { finish(s, q, DG_FINISH_DEADLINE, 1); return 0; }
    double t0 = now_ms();
    int rc;
    if (q->state == SEQ_PREFILL) {
        int left = (int)q->prompt.n - q->n_fed;
        int n = left < PREFILL_CHUNK ? left : PREFILL_CHUNK;
        rc = forward(s, q, q->prompt.ids + q->n_fed, n, n == left, err, errlen);
        q->t.prefill_ms += now_ms() - t0;
        if (rc < 0) return rc;
        q->n_fed += n;
        if (q->n_fed < (int)q->prompt.n) return 0;
        q->state = SEQ_DECODE;
    } else {
        rc = forward(s, q, &q->last, 1, 1, err, errlen);
        q->t.decode_ms += now_ms() - t0;
        if (rc < 0) return rc;
    }
    /* q->last is the newly sampled token */
    int32_t tok = q->last;
    if (is_stop_token(m, tok)) { finish(s, q, DG_FINISH_STOP, 1); return 0; }
    q->generated++;
    char text[DG_TOK_STREAM_OUT_MAX];
    size_t len = dg_tok_stream_push(m->tok, &q->stream, tok, text);
    if (len && dg_stop_feed(q->stop, text, len, emit_text, q)) { finish(s, q, DG_FINISH_STOP, 0); return 0; }
    if (q->generated >= q->max_new) { finish(s, q, DG_FINISH_LENGTH, 1); return 0; }
    return 0;
}

int dg_sched_step(dg_sched *s, char *err, size_t errlen) {
    for (int i = 0; i < s->n_seqs; i++) {
        dg_seq *q = &s->seqs[i];
        if (q->state == SEQ_FREE) continue;
        char msg[512];
        int rc = step_seq(s, q, msg, sizeof msg);
        if (rc == 0) continue;
        if (dg_error_class(rc) == DG_ERROR_FATAL) {
            snprintf(err, errlen, "%s", msg);
            return rc;
        }
        fail_seq(s, q, rc, msg);   /* this sequence only: out of KV blocks, a limit */
    }
    return 0;
}
