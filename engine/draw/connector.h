/* connector.h — the MLLM→DiT connector and the condition accumulator (docs/DESIGN.md §6;
 * docs/specs/cosmos_dit_wan_vae.md §1.1, docs/specs/duogen_paper.md §1.2-1.4).
 *
 * The connector is Cosmos-Predict2.5's text projection: for every position, the hidden
 * states of L configured decoder layers, each standardized per token
 * ((h − mean)/(std_unbiased + 1e-8)), concatenated to L·D channels, then
 * ctx = GELU(W·concat + b) with W [d_cond, L·D] (connector.safetensors,
 * crossattn_proj.0.weight/bias, or the DiT checkpoint's own crossattn_proj). The standardization and W are position-wise and W splits
 * by layer into column blocks W_l [d_cond, D], so
 *     W·concat = Σ_l W_l · std(h_l)
 * and the accumulator adds each layer's share while the decoder runs, keeping one d_cond
 * row per position instead of L·D values. At <BOV> the caller picks the positions (all
 * earlier ones; the negative condition drops the last text segment — dropping rows
 * commutes with the sum) and dg_connector_finish adds the bias and applies the GELU.
 *
 *     dg_connector cn; dg_cond_acc *acc;
 *     dg_connector_load(&cn, "pkg/connector.safetensors", layers, n_layers, D, be, err, n);
 *     dg_cond_acc_new(&cn, be, max_positions, max_chunk, &acc, err, n);
 *     // decoder hook, after layer `layer` for n tokens at pos0 (hidden: backend [n, D]):
 *     dg_cond_acc_add(&cn, acc, layer, hidden, n, pos0);
 *     // at <BOV>:
 *     dg_cond_acc_finish(&cn, acc, positions, n_pos, ctx, err, n);   // host [n_pos, d_cond]
 *
 * Which hidden state a layer contributes is the caller's: Cosmos takes HF hidden_states[1..L]
 * — the output of decoder layers 0..L−1, where the LAST one is after the final RMSNorm
 * (model.norm), not the raw residual stream the qwen2 hook hands over. */
#ifndef DG_CONNECTOR_H
#define DG_CONNECTOR_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "io/safetensors.h"
#include "io/weights.h"

#define DG_CONNECTOR_MAX_LAYERS 128
#define DG_CONNECTOR_EPS 1e-8f     /* added to the std (spec §1.1) */

typedef struct {
    int        n_layers;                          /* L */
    int        hidden;                            /* D: the decoder's width */
    int        d_cond;                            /* the DiT's text_embed_dim */
    int        layer_of[DG_CONNECTOR_MAX_LAYERS]; /* slot k <- decoder layer layer_of[k] */
    dg_weight  slice[DG_CONNECTOR_MAX_LAYERS];    /* [d_cond, D] W's column block of slot k */
    float     *bias;                              /* [d_cond] backend memory */
    dg_buffer_list owned;                         /* the bias buffer */
    void      *slices;                            /* owned: the repacked blocks (host) */
    dg_backend *be;                               /* borrowed: the load's (weights, bias) */
} dg_connector;

/* One sequence's condition rows, on the backend the accumulator runs on (the connector's,
 * or a fork of it: backend.h). */
typedef struct {
    dg_backend *be;  /* borrowed: the buffers' and the operations' backend */
    int    max_positions, max_chunk;
    float *acc;      /* [max_positions, d_cond] Σ over the layers added so far */
    float *normed;   /* [max_chunk, D]      a standardized chunk */
    float *share;    /* [max_chunk, d_cond] its projection */
    float *ctx;      /* [max_positions, d_cond] finish's gathered rows */
    uint8_t *seen;   /* host [max_positions]: layers added per position (for checks) */
} dg_cond_acc;

/* Binds crossattn_proj.0.weight/bias of `st` (borrowed; the connector keeps copies, so st
 * may be closed after): a DuoGen connector.safetensors, or the DiT checkpoint's own
 * projection (Cosmos-Predict2.5 use_crossattn_projection). `layers` lists the decoder layers
 * (0-based, as the qwen2 hook numbers them) in concatenation order; D is the decoder width.
 * The weight must be [d_cond, n_layers·D]: a mismatch (an MLLM of another width or depth
 * than the one the projection was trained on) names the tensor, expected and found shapes. */
int  dg_connector_bind(dg_connector *c, const dg_st *st, const int *layers, int n_layers,
                       int hidden, dg_backend *be, char *err, size_t errlen);
/* The same from the file `path` (connector.safetensors). */
int  dg_connector_load(dg_connector *c, const char *path, const int *layers, int n_layers,
                       int hidden, dg_backend *be, char *err, size_t errlen);
void dg_connector_unload(dg_connector *c);   /* accepts a zeroed or half-loaded one */

/* be: c's backend or a fork of it, which must outlive the accumulator. */
int  dg_cond_acc_new(const dg_connector *c, dg_backend *be, int max_positions, int max_chunk,
                     dg_cond_acc **out, char *err, size_t errlen);
void dg_cond_acc_free(const dg_connector *c, dg_cond_acc *a);   /* accepts NULL */
/* Forgets every position (a new sequence). */
void dg_cond_acc_reset(const dg_connector *c, dg_cond_acc *a);

/* Adds decoder layer `layer`'s share std(h)·W_lᵀ for positions pos0 .. pos0+n−1; hidden is
 * backend memory [n, D]. A layer the connector does not use is ignored (returns 0), so
 * the hook can pass every layer. The positions of one call must have received the same
 * layers so far (one decoder forward's tokens do); DG_EINVAL otherwise. DG_ELIMIT beyond
 * max_positions. Calls larger than max_chunk are split. */
int  dg_cond_acc_add(const dg_connector *c, dg_cond_acc *a, int layer, const float *hidden, int n,
                     int pos0);
/* Drops positions >= n_positions (a rewound sequence): they must be added again. */
void dg_cond_acc_truncate(const dg_connector *c, dg_cond_acc *a, int n_positions);

/* ctx[i] = GELU(acc[positions[i]] + b), i < n (host output [n, d_cond]). DG_EINVAL when a
 * position is out of range or has not received every layer. */
int  dg_cond_acc_finish(const dg_connector *c, dg_cond_acc *a, const int32_t *positions, int n,
                        float *ctx, char *err, size_t errlen);

#endif
