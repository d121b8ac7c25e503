/* qwen2.h — the Qwen2.5-VL text decoder (docs/specs/qwen2_5_vl.md §3) over the backend interface.
 *
 * The model (dg_qwen2) is the bound weights: read-only after dg_qwen2_load, shareable.
 * The state (dg_qwen2_state) is one caller's scratch, sized once for the largest forward
 * call, and the backend its forwards run on (the load's, or a fork of it for another
 * thread: backend.h); nothing is allocated per token. K/V live in a dg_kv_cache (on the
 * same backend), per sequence.
 *
 *     dg_qwen2 m; dg_qwen2_state *s;
 *     dg_qwen2_load(&m, &cfg, st, be, err, sizeof err);
 *     dg_qwen2_state_new(&m, be, 512, 1, &s, err, sizeof err);
 *     dg_qwen2_forward(&m, s, kv, &seq, &(dg_qwen2_input){.ids = prompt, .n = n, .n_logits = 1},
 *                      NULL, err, sizeof err);           // prefill: s->logits = last row
 *     dg_qwen2_forward(&m, s, kv, &seq, &(dg_qwen2_input){.ids = &tok, .n = 1, .n_logits = 1},
 *                      NULL, err, sizeof err);           // one decode step
 *
 * Several sequences share one forward (dg_qwen2_forward_batch, docs/DESIGN.md §6
 * "Batching"): their rows are stacked, so that every weight is one GEMM over all of them,
 * and attention runs per sequence over its own paged KV. On the CPU a sequence's rows,
 * K/V and logits are the same bits batched or alone (backend.h matmul: rows whatever m).
 *
 * Numerics: fp32 everywhere (weights widened from their stored dtype as they are read),
 * which matches transformers run in float32 on the same bf16 checkpoint to fp32 rounding. */
#ifndef DG_QWEN2_H
#define DG_QWEN2_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "mllm/qwen2vl_config.h"
#include "cache/kv_cache.h"
#include "io/safetensors.h"

typedef struct {
    float    *input_norm;   /* [D]              input_layernorm.weight, fp32 copy */
    dg_weight wq;           /* [H*hd, D]        self_attn.q_proj.weight */
    float    *bq;           /* [H*hd]           self_attn.q_proj.bias */
    dg_weight wk;           /* [KV*hd, D]       self_attn.k_proj.weight */
    float    *bk;           /* [KV*hd] */
    dg_weight wv;           /* [KV*hd, D]       self_attn.v_proj.weight */
    float    *bv;           /* [KV*hd] */
    dg_weight wo;           /* [D, H*hd]        self_attn.o_proj.weight (no bias) */
    float    *post_norm;    /* [D]              post_attention_layernorm.weight */
    dg_weight w_gate;       /* [F, D]           mlp.gate_proj.weight */
    dg_weight w_up;         /* [F, D]           mlp.up_proj.weight */
    dg_weight w_down;       /* [D, F]           mlp.down_proj.weight */
} dg_qwen2_layer;

typedef struct {
    dg_text_config  cfg;
    dg_backend     *be;       /* borrowed: the load's (weights, vectors); forwards use the state's */
    dg_weight       embed;    /* [V, D]  model.embed_tokens.weight */
    dg_qwen2_layer *layers;   /* owned: [L] */
    float          *norm;     /* [D]     model.norm.weight */
    dg_weight       lm_head;  /* [V, D]  lm_head.weight, or embed when tie_word_embeddings */
    float          *vectors;  /* owned (backend memory): every fp32 norm weight and bias */
    dg_screen      *screen;   /* owned, or NULL: the lm_head's logit screen (dg_qwen2_screen) */
    int             screen_rows; /* the most logits rows of a forward that take the screen */
} dg_qwen2;

/* Called after each decoder layer with that layer's output (the residual stream, HF
 * hidden_states[layer + 1]) for the n tokens of the call, at positions pos0 ..; `hidden`
 * is the forward's own buffer [n, D] in backend memory: read it, do not keep it. This is
 * where the condition accumulator (docs/DESIGN.md §6) adds norm(h_l) · W_l per position. */
typedef struct {
    void (*fn)(void *user, int layer, const float *hidden, int n, int pos0);
    void  *user;
} dg_qwen2_hook;

typedef struct {
    const int32_t *ids;       /* [n] token ids */
    const int32_t *pos;       /* [3, n] M-RoPE positions (t, h, w rows), or NULL for text:
                                 every row = n_past + i + rope_delta (spec §3.4) */
    int            rope_delta;
    const float   *image_embeds; /* [image tokens in ids, D] backend memory, or NULL: the rows
                                 that replace the embeddings of the image_token_id tokens, in
                                 order (spec §3.5; engine/vision.h makes them) */
    const uint64_t *token_keys; /* [n] or NULL: per-token extra keys of the KV blocks (image
                                 tokens: their image's content hash, so that a different
                                 image of the same size never shares cached blocks) */
    int            n;         /* tokens, 1 ..state max_tokens */
    int            n_logits;  /* logits for the last n_logits tokens, 0 ..min(n, max_logits) */
    int            logits_on_device; /* 1: the logits stay in s->dev_logits (the caller samples
                                 there: dg_sampler_sample_device); 0: also copied to s->logits */
    int            bounds;    /* 1: this sequence's logits rows may come as bounds (its caller
                                 chooses greedily or by top-k: dg_sampler_sample_bounds): where the model
                                 has a screen, every sequence of the forward asks for them and
                                 the forward has at most m->screen_rows logits rows,
                                 s->bounded is set, s->lo and s->hi hold each logits row's
                                 bounds and the logits are not computed (dg_qwen2_pick gives
                                 the outputs asked for, dg_qwen2_logits_row a whole row) */
    int            no_commit; /* 1: the rows' K/V are written at the sequence's next positions
                                 but not committed: the caller commits those it keeps
                                 (dg_kv_seq_commit, in order); the rest are written over by
                                 the next forward (drafted tokens, engine/sched_feed.c) */
} dg_qwen2_input;

typedef struct {
    dg_backend *be;           /* borrowed: the buffers' and the forwards' backend */
    int      max_tokens, max_logits;   /* rows and logits rows of one forward, all sequences */
    float   *x;               /* [max_tokens, D]       residual stream */
    float   *h;               /* [max_tokens, D]       normed input / block output */
    float   *q;               /* [max_tokens, H*hd]; one token: [q | k | v] */
    float   *k;               /* [max_tokens, KV*hd] */
    float   *v;               /* [max_tokens, KV*hd] */
    float   *att;             /* [max_tokens, H*hd]    attention output */
    float   *gate;            /* [max_tokens, F] */
    float   *up;              /* [max_tokens, F] */
    float   *dev_logits;      /* [max_logits, V]       backend memory */
    float   *logits;          /* [max_logits, V]       host copy: the result of a forward */
    float   *lo, *hi;         /* [min(max_logits, m->screen_rows), V] host, where the model
                                 has a screen: the bounds of a forward whose logits rows all
                                 asked for them */
    int      bounded;         /* 1: the last forward left bounds, not logits (input.bounds) */
    int32_t *pos;             /* [3, max_tokens]       the rows' positions, stacked here */
    int32_t *ids;             /* [max_tokens]          the rows' token ids, stacked here */
    int32_t *logit_rows;      /* [max_logits]          rows of x whose logits are asked for */
    void   **graphs;          /* [2 * layers]          one token's fixed runs per layer
                                 (backend.h graph_run): before and after the attention */
    dg_attn_seq *att_seqs;    /* [max_tokens]          a layer's sequences for attention_batch */
} dg_qwen2_state;

/* Binds every text tensor of `st` to its field, checking dtype and shape; the error names
 * the tensor with the expected and found shapes. */
int  dg_qwen2_load(dg_qwen2 *m, const dg_text_config *cfg, const dg_st *st, dg_backend *be,
                   char *err, size_t errlen);
void dg_qwen2_unload(dg_qwen2 *m);   /* accepts a zeroed or half-loaded model */
/* The bytes of weights a decode token reads: every layer's matrices and the lm_head. */
double dg_qwen2_decode_bytes(const dg_qwen2 *m);
/* Makes m->screen, the lm_head's logit screen (backend.h screen_new: an int8 copy, half the
 * lm_head's bf16 bytes more memory), where m's backend has one and it pays (screen_rows),
 * for forwards of up to screen_rows logits rows; force: wherever the backend has one, for
 * any number of rows (tests). Nothing elsewhere. Before the states whose forwards use it
 * are made. DG_EINVAL (an lm_head value that is not finite), DG_ENOMEM. */
int    dg_qwen2_screen(dg_qwen2 *m, int force, char *err, size_t errlen);
/* After a forward that left bounds (s->bounded): out[i] = the logit of token ids[i] in
 * logits row `row`, the bits the full lm_head would have given (backend.h matmul_pick). */
void   dg_qwen2_pick(const dg_qwen2 *m, dg_qwen2_state *s, int row, const int32_t *ids, int n, float *out);
/* After such a forward: logits row `row` computed whole into s->dev_logits (the bits the
 * forward would have given it), for a row that the bounds do not decide. */
void   dg_qwen2_logits_row(const dg_qwen2 *m, dg_qwen2_state *s, int row);

/* be: m's backend or a fork of it (backend.h), which must outlive the state. */
int  dg_qwen2_state_new(const dg_qwen2 *m, dg_backend *be, int max_tokens, int max_logits,
                        dg_qwen2_state **out, char *err, size_t errlen);
void dg_qwen2_state_free(const dg_qwen2 *m, dg_qwen2_state *s);   /* accepts NULL */

/* Runs in->n tokens of one sequence (prefill: many; decode: one) after the seq's
 * n_tokens cached positions; writes their K/V (reserving blocks), commits them to the
 * sequence, and leaves the logits of the last in->n_logits tokens in s->dev_logits and
 * (unless in->logits_on_device) s->logits [n_logits, V]. DG_EAGAIN: no free KV block (nothing was committed); DG_ELIMIT/DG_EINVAL:
 * sizes out of range. */
int  dg_qwen2_forward(const dg_qwen2 *m, dg_qwen2_state *s, dg_kv_cache *kv, dg_kv_seq *seq,
                      const dg_qwen2_input *in, const dg_qwen2_hook *hook, char *err,
                      size_t errlen);

/* One sequence's share of a batched forward. */
typedef struct {
    dg_kv_seq           *seq;        /* its KV (distinct sequences): rows go after n_tokens */
    dg_qwen2_input       in;         /* its tokens; in.n_logits of them get logits */
    const dg_qwen2_hook *hook;       /* or NULL: called with this sequence's rows only */
    int                  logits_row; /* out: the row of s->dev_logits (s->logits) holding its
                                        first logits; its n_logits rows follow in order */
} dg_qwen2_batch_seq;

/* dg_qwen2_forward for n_seqs sequences at once: their rows stacked in the order given
 * ([Σ in.n, D] <= s->max_tokens, Σ in.n_logits <= s->max_logits), each sequence's K/V
 * written into and attention read from its own blocks, its logits rows after those of the
 * sequences before it. s->logits is filled when any sequence has !logits_on_device.
 * Blocks are reserved for every sequence before anything runs: DG_EAGAIN or DG_ELIMIT
 * names the sequence (its index in the batch) and commits nothing (a caller that reserved
 * each sequence's room itself, dg_kv_seq_reserve, meets neither). */
int  dg_qwen2_forward_batch(const dg_qwen2 *m, dg_qwen2_state *s, dg_kv_cache *kv,
                            dg_qwen2_batch_seq *seqs, int n_seqs, char *err, size_t errlen);

#endif
