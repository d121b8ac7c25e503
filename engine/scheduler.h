/* scheduler.h — the scheduler's sequences and slots (sched.c). Not a public header; the
 * drawing code (draw/painter.h) does not see it: a slot owns a painter and drives it. */
#ifndef DG_SCHEDULER_H
#define DG_SCHEDULER_H

#include <stdint.h>

#include "draw/connector.h"
#include "draw/painter.h"
#include "io/image.h"
#include "cache/kv_cache.h"
#include "cache/latent_cache.h"
#include "model.h"
#include "text/sampler.h"
#include "cache/vision_cache.h"

#define DG_KV_BLOCK        16    /* positions per KV block */
#define DG_SCHED_CHUNK     256   /* tokens per decoder forward: bounds the forward state */
#define DG_SEQ_MAX_IMAGES  32    /* input and generated images of one sequence */
#define DG_SEQ_PROMPT_TEXT 4096  /* bytes of an image's prompt (prompt conditioning) */

typedef enum { SEQ_FREE, SEQ_PREFILL, SEQ_DECODE, SEQ_DRAW } dg_seq_state;

/* An image of the conversation, input or generated. */
typedef struct {
    dg_image       *img;        /* owned: 8-bit RGB */
    dg_image_digest hash;       /* content hash: cache key */
    int32_t         grid[3];    /* vision patch grid (t, h, w) */
    int             n_tokens;   /* its <|image_pad|> tokens in the context */
    int             token0;     /* context position of the first of them */
} dg_seq_image;

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
                                                    fed after the image */
    size_t        n_rest;
    dg_tok_stream stream;
    dg_tok_ids    prompt;        /* owned: the whole prompt */
    int32_t      *pos;           /* owned [3, prompt.n] M-RoPE positions of the prompt */
    uint64_t     *keys;          /* owned [prompt.n] KV keys (image tokens: their image's hash) */
    int           rope_delta;    /* position of cache index p = p + rope_delta */
    int           n_fed;         /* prompt tokens in the KV cache */
    int32_t       last;          /* the sampled token to feed next */
    int           max_new, generated, cancelled;
    int64_t       deadline_ms;
    dg_image_params ip;          /* resolved: the request's values over the model's defaults */
    dg_seq_image  images[DG_SEQ_MAX_IMAGES];
    int           n_images, n_inputs;

    /* the condition accumulator (slot-owned; NULL when the model does not draw) */
    dg_cond_acc  *acc;
    int           cond_saved;    /* leading full blocks whose rows are in the block store */
    int           hook_rc;

    /* prompt conditioning (m->cond_from_prompt): the image's prompt is the last user message's
     * text, then the answer's text since the last image, each cut at DG_SEQ_PROMPT_TEXT / 2 */
    char          cond_text[DG_SEQ_PROMPT_TEXT];
    size_t        n_cond_user, n_cond_text;

    /* drawing (state SEQ_DRAW: the painter has an image in progress) */
    int           n_drawn;       /* images drawn so far */
    dg_painter   *painter;       /* slot-owned; NULL when the model does not draw */

    dg_usage      usage;
    dg_timings    t;
    double        t_submit;
} dg_seq;

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
    uint64_t         next_id;
    int32_t          chunk_pos[3 * DG_SCHED_CHUNK];
    /* images in */
    dg_vision_state *vs;         /* owned; NULL without a vision tower */
    dg_vision_cache *vcache;     /* owned */
    float           *embeds;     /* backend [embed_rows, D]: vision rows of one feed */
    int              embed_rows;
    /* images out */
    dg_latent_cache *lcache;     /* owned */
    float           *normed;     /* backend [DG_SCHED_CHUNK, D]: the last layer after model.norm */
    float           *cond_store; /* host [n_blocks, DG_KV_BLOCK, d_cond]: condition rows by KV block */
    dg_prompt_cond  *pc;         /* owned: prompt conditioning (m->cond_from_prompt), else NULL */
};

#endif
