/* scheduler.h — the scheduler's sequences and slots (sched.c). Not a public header; the
 * drawing code (draw/painter.h) does not see it: a slot owns a painter and drives it. */
#ifndef DG_SCHEDULER_H
#define DG_SCHEDULER_H

#include <stdint.h>
#include <string.h>

#include "draw/connector.h"
#include "draw/painter.h"
#include "io/image.h"
#include "cache/kv_cache.h"
#include "cache/latent_cache.h"
#include "model.h"
#include "text/sampler.h"
#include "cache/vision_cache.h"

#define DG_KV_BLOCK        16    /* positions per KV block */
#define DG_SCHED_CHUNK     256   /* prefill tokens one step's forward takes, all sequences
                                    together, beside one row per decoding sequence
                                    (docs/DESIGN.md §6 "Batching") */
#define DG_SEQ_MAX_IMAGES  DG_MAX_IMAGES   /* input and generated images of one sequence */
#define DG_SEQ_PROMPT_TEXT 4096  /* bytes of each of an image's two prompt texts (prompt conditioning) */
#define DG_SCHED_AUTO_INFLIGHT 16 /* the most sequences max_inflight 0 gives */
#define DG_SCHED_GROUP_TOKENS 4096 /* the most DiT tokens of one shared forward (sched_draw.c):
                                     e.g. two 512² images with guidance, ~400 MiB of state
                                     at the full DiT's width */
#define DG_SCHED_GROUP_CTX 4096   /* the most context rows of one shared forward */
#define DG_SCHED_DRAFT_MAX 7      /* the most drafted tokens a sequence feeds in a step
                                     (dg_sched_opts draft_tokens; sched_feed.c "Drafts") */
#define DG_SCHED_DRAFT_DEFAULT 2  /* draft_tokens 0 on a backend with exact rows, for a
                                     decoder of DG_SCHED_DRAFT_MIN_BYTES or more: on the CPU
                                     2 rows cost what 1 does, 3 1.25x, 5 1.7x (the GEMV is
                                     compute-bound from 3 rows), and `small`'s bench jobs ran
                                     42.7 / 43.2 / 40.4 / 39.3 tok/s with 1 / 2 / 3 / 4 */
#define DG_SCHED_DRAFT_MIN_BYTES (64 << 20)   /* the weights a decode token reads: from here
                                     on a step is their stream, which 1 + k rows share; a
                                     smaller decoder (in cache) pays for each row (the shapes
                                     model's 2.4 MB ran 0.89x with drafts: engine/MODELS.md) */
#define DG_SCHED_DRAFT_NGRAM 3    /* the longest suffix looked up; 2 the shortest */
#define DG_SCHED_DRAFT_ROWS 8     /* a step's decode rows, drafts included, at most: the rows
                                     one pass of the CPU's multi-row GEMV takes as they come
                                     from memory (a step's products at 8 rows 1.6x one row's;
                                     past 8 each 8 more take the weights again from L2, 9 rows
                                     2.1x); so 8 or more decoding sequences feed no drafts */

typedef enum { SEQ_FREE, SEQ_PREFILL, SEQ_DECODE, SEQ_DRAW } dg_seq_state;

/* An image of the conversation, input or generated. */
typedef struct {
    dg_image       *img;        /* owned: 8-bit RGB */
    dg_image_digest hash;       /* content hash: cache key */
    int32_t         grid[3];    /* vision patch grid (t, h, w) */
    int             n_tokens;   /* its <|image_pad|> tokens in the context */
    int             token0;     /* context position of the first of them */
} dg_seq_image;

/* The 64-bit KV key of an image's tokens from its 128-bit content hash (all of it, keyed by
 * the process's secret: cache/kv_cache.h). */
static inline uint64_t dg_seq_image_key(const dg_image_digest *h) { return dg_kv_image_key(h->bytes); }

typedef struct dg_seq {
    struct dg_sched *sched;      /* borrowed: the slot's scheduler */
    dg_seq_state  state;
    uint64_t      id;
    dg_sink       sink;
    char          job_id[160];
    uint64_t      seed;
    dg_kv_seq     kv;
    dg_sampler   *sampler;       /* owned */
    dg_stop      *stop;          /* owned */
    dg_stop      *marker;        /* owned: the package's draw marker as a matcher; NULL: none */
    int           stopped;       /* a stop string matched inside the marker matcher's output */
    char          rest[DG_TOK_STREAM_OUT_MAX];   /* text after a marker in its token's text,
                                                    fed after the image (or at once: none) */
    size_t        n_rest;
    int           draw_pending;  /* <BOV> or the marker was taken: the image begins once every
                                    sequence has taken its tokens of the step (a published
                                    pipeline's prompt runs the decoder on the shared state) */
    dg_tok_stream stream;
    dg_tok_ids    prompt;        /* owned: the whole prompt */
    int32_t      *pos;           /* owned [3, prompt.n] M-RoPE positions of the prompt */
    uint64_t     *keys;          /* owned [prompt.n] KV keys (image tokens: their image's hash) */
    int           rope_delta;    /* position of cache index p = p + rope_delta */
    int           n_fed;         /* prompt tokens in the KV cache */
    int32_t       last;          /* the sampled token to feed next */
    /* drafts (sched_feed.c): this step's fed tokens draft[0 .. n_draft], q->last and the
     * drafted ones, whose logits rows begin at draft_row; taken one at a time after the
     * forward (dg_sched_draft_take) */
    int32_t       draft[1 + DG_SCHED_DRAFT_MAX];
    int           n_draft;
    int           draft_row;
    int           draft_kept;    /* drafted tokens kept this step */
    int           draft_wait, draft_skip;   /* after drafts all refused: steps to wait before
                                    the next (doubling, at most 15), and those left */
    int32_t      *hist;          /* slot-owned [max_context] when drafts are on: the tokens at
                                    the KV's positions 0 .. kv.n_tokens - 1, then q->last */

    /* the feed (state SEQ_PREFILL): tokens on their way into the KV cache, a chunk a step —
     * the prompt after its cached prefix, or a drawn image's <BOV> <|vision_start|>
     * <|image_pad|>*n <|vision_end|> */
    const int32_t  *feed_ids;    /* borrowed [feed_n]: prompt.ids or image_ids */
    const int32_t  *feed_pos;    /* borrowed [3, feed_n] M-RoPE positions */
    const uint64_t *feed_keys;   /* borrowed [feed_n] KV keys */
    int           feed_n, feed_done;
    int           feed_rows;     /* 1: image tokens remain whose rows are not in s->embeds yet */
    int           feed_image;    /* 1: a drawn image's feed */
    int           feed_begun;    /* a chunk of this feed went through a forward (blocks of a
                                    prefix-cache hit alone are not a begun feed) */
    int           emb_row;       /* s->embeds row of the next image token, while it holds them */
    int32_t      *image_ids;     /* owned [feed_n]: a drawn image's feed; NULL otherwise */
    int32_t      *image_pos;     /* owned [3, feed_n] */
    uint64_t     *image_keys;    /* owned [feed_n] */

    /* this step's outcome of the drawing and the decoder forward (sched_draw.c,
     * sched_feed.c), for sched.c */
    int           draw_due;      /* a drawing sequence whose denoising step is still to come */
    int           sampled;       /* q->last is a newly sampled token, not yet handled */
    int           step_rc;       /* a failure of this sequence: negative DG_E*, with step_err */
    char          step_err[256];
    int           max_new, generated, cancelled;
    int64_t       deadline_ms;
    dg_image_params ip;          /* resolved: the request's values over the model's defaults */
    dg_seq_image  images[DG_SEQ_MAX_IMAGES];
    int           n_images, n_inputs;

    /* the condition accumulator (slot-owned; NULL when the model does not draw) */
    dg_cond_acc  *acc;
    int           cond_saved;    /* leading full blocks whose rows are in the block store */

    /* prompt conditioning (m->cond_from_prompt; prompt_cond.h): the image's prompt is the last
     * user message's text (its first DG_SEQ_PROMPT_TEXT bytes) and the answer's text since the
     * last image (its last DG_SEQ_PROMPT_TEXT bytes), both cut between UTF-8 sequences */
    char          cond_user[DG_SEQ_PROMPT_TEXT], cond_answer[DG_SEQ_PROMPT_TEXT];
    size_t        n_cond_user, n_cond_answer;

    /* drawing (state SEQ_DRAW: the painter has an image in progress) */
    int           n_drawn;       /* images drawn so far */
    dg_painter   *painter;       /* slot-owned; NULL when the model does not draw */

    dg_usage      usage;
    dg_timings    t;
    double        t_submit;
} dg_seq;

/* Whether q may begin an image (<BOV> not banned, a draw marker acts): the model draws, the
 * job's max_images is not reached and the conversation has room for one more picture. */
static inline int dg_seq_may_draw(const dg_model *m, const dg_seq *q) {
    return m->has_draw && q->n_drawn < q->ip.max_images && q->n_images < DG_SEQ_MAX_IMAGES;
}

/* The scheduler's counters (cache lookups, drafts, the logit screen), raw. */
typedef struct {
    dg_cache_stats cache;   /* hits and misses; the bytes are not counters */
    int64_t        drafted, accepted, screened, unscreened;
} dg_sched_counts;

struct dg_sched {
    dg_model        *m;          /* borrowed */
    dg_backend      *be;         /* owned: a fork of m->be (backend.h), on which everything of
                                    this scheduler runs, so that schedulers on other threads
                                    share the weights but no execution state */
    dg_sched_opts    o;
    dg_kv_cache     *kv;         /* owned */
    dg_qwen2_state  *st;         /* owned */
    dg_seq          *seqs;       /* owned [max_inflight] */
    int              n_seqs;
    size_t           sized_from; /* the free memory max_inflight 0 read (dg_sched_sized_from) */
    int              kv_holds;   /* sequences the KV pool holds at full context (dg_sched_kv_holds) */
    uint64_t         next_id;
    /* one step's forward (sched_feed.c) */
    dg_qwen2_batch_seq *batch;   /* owned [n_seqs]: the sequences of the forward, in row order */
    dg_seq          **batch_of;  /* owned [n_seqs]: the slot of each */
    dg_qwen2_hook    *hooks;     /* owned [n_seqs]: each one's condition hook */
    int32_t          chunk_pos[3 * DG_SCHED_CHUNK];   /* the prefill chunks' positions, [3, c] each */
    /* images in */
    dg_vision_state *vs;         /* owned; NULL without a vision tower */
    dg_vision_cache *vcache;     /* owned */
    float           *embeds;     /* backend [embed_rows, D]: vision rows of one feed */
    int              embed_rows;
    dg_seq          *embeds_of;  /* borrowed: the sequence whose feed's rows embeds holds, or NULL:
                                    one at a time; another that needs rows waits for it */
    /* images out */
    dg_latent_cache *lcache;     /* owned */
    dg_painter_scratch *scratch; /* owned: the VAE state and pixels every slot's painter uses */
    dg_dit_state    *dit;        /* owned, or NULL: the DiT state shared by the images of one
                                    layout stepped together (sched_draw.c) */
    int              dit_tokens, dit_ctx;   /* what it holds: tokens and context rows */
    float           *normed;     /* backend [DG_SCHED_CHUNK, D]: the last layer after model.norm */
    float           *cond_store; /* host [n_blocks, DG_KV_BLOCK, d_cond]: condition rows by KV block */
    dg_prompt_cond  *pc;         /* owned: prompt conditioning (m->cond_from_prompt), else NULL */
    int              draft;      /* the most drafted tokens a sequence feeds a step; 0: none */
    int64_t          n_drafted, n_accepted;   /* drafted tokens fed, and kept, since dg_sched_new */
    int64_t          n_screened, n_unscreened;/* greedy tokens chosen from the logit screen's
                                                 bounds, and those whose bounds did not decide
                                                 (the row computed whole), since dg_sched_new */
    dg_sched_counts  skipped;    /* the warm-ups' share of the counters: the stats functions
                                    leave it out, so that a worker's figures count its jobs
                                    only (dg_sched_warmup) */
};

/* The counters as they stand, warm-ups included; and the stats functions
 * (dg_sched_cache_stats, _draft_stats, _screen_stats) leave out what was counted since
 * `before` was taken. */
void dg_sched_counts_now(const dg_sched *s, dg_sched_counts *out);
void dg_sched_counts_skip(dg_sched *s, const dg_sched_counts *before);

/* ---- sched_draw.c: the drawing side of a step ---- */

/* On a sampled <BOV>: the slot's painter begins the image (state SEQ_DRAW, the event
 * sent), or 1 when the context has no room for <BOV>, the image's tokens and one more. */
int  dg_sched_draw_begin(dg_sched *s, dg_seq *q, char *err, size_t errlen);
/* The context positions a picture of ip's size takes once drawn: <BOV>, its vision tokens
 * between their start and end, and room for one more token; or a DG_E* of its size. */
int  dg_sched_picture_room(const dg_model *m, const dg_image_params *ip, char *err, size_t errlen);
/* One denoising step of every drawing sequence (images of one layout in one forward). A
 * sequence whose image ended is fed next (state SEQ_PREFILL); one that failed has q->step_rc
 * and q->step_err. Returns the number of sequences that drew. */
int  dg_sched_draw(dg_sched *s);
/* What the image in progress cost, into the sequence's timings and usage: once, when the
 * image ends or the sequence ends while drawing. */
void dg_sched_draw_account(dg_seq *q);

/* ---- sched_feed.c: the decoder's side of a step ---- */

/* The feed of a sequence just admitted: its prompt after the n_fed cached positions, whose
 * condition rows (a drawing model) come from the block store. */
void dg_sched_feed_prompt(dg_sched *s, dg_seq *q);
/* A drawn image (q->images[q->n_images - 1]), to follow the q->kv.n_tokens positions in the
 * KV, as the next feed: <BOV> <|vision_start|> <|image_pad|>*n <|vision_end|> with its M-RoPE positions
 * (state SEQ_PREFILL). DG_ENOMEM or an image error. */
int  dg_sched_feed_image(dg_sched *s, dg_seq *q, char *err, size_t errlen);
/* One forward of the decoder for the step: a row for every decoding sequence and prefill
 * chunks of the feeding ones, oldest first, within DG_SCHED_CHUNK tokens. Each sequence
 * that took part either has q->sampled (a token to handle) or nothing, or q->step_rc with
 * q->step_err. A negative return is a failure of the whole forward, fatal. */
int  dg_sched_forward(dg_sched *s, char *err, size_t errlen);
/* Forgets the sequence's feed (its image arrays, its hold on s->embeds). */
void dg_sched_feed_clear(dg_sched *s, dg_seq *q);
/* A sequence that fed drafted tokens (q->n_draft > 0), after the forward, for j = 0, 1, ..
 * in order: commits the K/V of fed token j and samples the logits of its row into q->last
 * (the token plain decoding would have sampled there). The caller goes on to j + 1 only
 * while the token sampled at j is drafted token j + 1 and the sequence decodes on; then
 * dg_sched_draft_end. */
void dg_sched_draft_take(dg_sched *s, dg_seq *q, int j);
/* After the last dg_sched_draft_take of a sequence still live: the condition rows of the
 * positions not committed are dropped, those of full blocks kept. */
void dg_sched_draft_end(dg_sched *s, dg_seq *q);

#endif
