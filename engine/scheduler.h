/* scheduler.h — the scheduler's sequences, shared by sched.c (prompt, prefill,
 * decode) and sched_draw.c (drawing an image on <BOV>). Not a public header. */
#ifndef DG_SCHEDULER_H
#define DG_SCHEDULER_H

#include <stdint.h>
#include <time.h>

#include "draw/connector.h"
#include "draw/dit.h"
#include "draw/flow.h"
#include "io/image.h"
#include "cache/kv_cache.h"
#include "cache/latent_cache.h"
#include "model.h"
#include "text/sampler.h"
#include "draw/vae.h"
#include "cache/vision_cache.h"

#define DG_KV_BLOCK        16    /* positions per KV block */
#define DG_SCHED_CHUNK     256   /* tokens per decoder forward: bounds the forward state */
#define DG_SEQ_MAX_IMAGES  32    /* input and generated images of one sequence */

typedef enum { SEQ_FREE, SEQ_PREFILL, SEQ_DECODE, SEQ_DRAW } dg_seq_state;

/* An image of the conversation, input or generated. */
typedef struct {
    dg_image       *img;        /* owned: 8-bit RGB */
    dg_image_digest hash;       /* content hash: cache key */
    int32_t         grid[3];    /* vision patch grid (t, h, w) */
    int             n_tokens;   /* its <|image_pad|> tokens in the context */
    int             token0;     /* context position of the first of them */
} dg_seq_image;

/* A slot's drawing buffers, grown when an image needs more and kept for the next. */
typedef struct {
    dg_dit_state *dit;   int dit_tokens;
    dg_vae_state *vae;   int vae_h, vae_w;
    float   *latents;    int64_t latents_cap;   /* host: every frame's latent, frame after frame */
    float   *vel_c, *vel_u; int64_t vel_cap;    /* host: the DiT's velocity, both CFG branches */
    float   *pixels;     int64_t pixels_cap;    /* host [3, H, W] in [-1, 1] */
    float   *ctx_pos, *ctx_neg;                 /* host [max_context, d_cond] */
    int32_t *positions;                         /* [max_context] */
} dg_draw_buffers;

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
    dg_tok_stream stream;
    dg_tok_ids    prompt;        /* owned: the whole prompt */
    int32_t      *pos;           /* owned [3, prompt.n] M-RoPE positions of the prompt */
    uint64_t     *keys;          /* owned [prompt.n] KV keys (image tokens: their image's hash) */
    int           rope_delta;    /* position of cache index p = p + rope_delta */
    int           n_fed;         /* prompt tokens in the KV cache */
    int32_t       last;          /* the sampled token to feed next */
    int           max_new, generated, cancelled;
    int64_t       deadline_ms;
    dg_image_params ip;          /* with the model's defaults filled in */
    dg_seq_image  images[DG_SEQ_MAX_IMAGES];
    int           n_images, n_inputs;

    /* the condition accumulator (slot-owned; NULL when the model does not draw) */
    dg_cond_acc  *acc;
    int           cond_saved;    /* leading full blocks whose rows are in the block store */
    int           hook_rc;

    /* drawing the current image */
    int           n_drawn;
    dg_flow      *flow;          /* owned while drawing */
    dg_dit_layout layout;
    int           n_frames, target;           /* frames; the target's frame index */
    float        *frame_lat[DG_DIT_MAX_FRAMES];   /* into draw_buf.latents */
    float         timesteps[DG_DIT_MAX_FRAMES];
    int           n_ctx_pos, n_ctx_neg;
    int           W, H, lat_w, lat_h;
    dg_draw_buffers draw_buf;    /* slot-owned */

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
};

double   dg_sched_now_ms(void);
uint64_t dg_sched_image_key(const dg_image_digest *h);
int      dg_sched_feed(struct dg_sched *s, dg_seq *q, const int32_t *ids, int n, const int32_t *pos,
                       int pos_stride, const float *embeds, const uint64_t *keys, int want_logits,
                       char *err, size_t errlen);

/* sched_draw.c */
int  dg_draw_check(struct dg_sched *s, const dg_image_params *ip, char *err, size_t errlen);
/* On a sampled <BOV>: sets the sequence drawing (state SEQ_DRAW), or returns 1 when the
 * context has no room for another image (the answer then ends "length"). */
int  dg_draw_begin(struct dg_sched *s, dg_seq *q, char *err, size_t errlen);
/* One denoising step; after the last, the image is decoded, sent, put into the context,
 * and the next token is sampled into q->last (state SEQ_DECODE). */
int  dg_draw_step(struct dg_sched *s, dg_seq *q, char *err, size_t errlen);
void dg_draw_clear(struct dg_sched *s, dg_seq *q);              /* the current image's state */
void dg_draw_buffers_free(struct dg_sched *s, dg_draw_buffers *b);

#endif
