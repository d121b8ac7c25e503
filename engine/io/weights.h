/* weights.h — binding checkpoint tensors to a network's fields, at load (every network's
 * one way to do it: qwen2, vision, dit, vae, connector).
 *
 * A bind finds a tensor by name in a dg_st (one file, or the shards of an index: the
 * binder does not see the difference), checks its exact shape against what the
 * configuration says and its dtype against what the binder accepts, and binds it as one
 * of these kinds:
 *
 *   dg_bind_matrix     a dg_weight view of the mapped tensor, made usable by
 *                      be->weight_prepare (CPU: read in place, so the dg_st must outlive
 *                      the network; GPU: a device copy); any rank, used as the
 *                      [shape[0], product of the rest] matrix of its row-major layout.
 *                      Where dg_weight_kb_for asks for the blocked layout (backend.h; the
 *                      CPU, wide matrices), the tensor is rewritten where it lies
 *                      (dg_st_rewrite; a second bind, a tied lm_head, finds it so), or where
 *                      the set only borrows its buffer, copied into the binder's buffer
 *                      list (no list: left row-major, which the kernels also read).
 *                      Where the binder offers it (panels) and the backend reads it, the
 *                      panel layout instead, the same way; a backend that does not read
 *                      the panels gets a copy in its own layout of a tensor another bind
 *                      gave them (into the list: DG_EINVAL without one). A
 *                      backend without weights_blocked gets a row-major copy of a tensor
 *                      that another backend's bind rewrote, for its weight_prepare;
 *   dg_bind_fp32_host  a small tensor (norm weight, bias) widened to fp32 into the
 *                      caller's host array (a network that uploads all of them at once);
 *   dg_bind_fp32       the same into a backend buffer of its own, kept in the binder's
 *                      buffer list;
 *   dg_bind_conv       a convolution weight widened to fp32 into a backend buffer: a 5-D
 *                      [o, i, kt, kh, kw] is stored [o, kt, i, kh, kw] (backend.h's conv3d
 *                      layout), a 4-D [o, i, kh, kw] as it is (kt = 1);
 *   dg_bind_find       the checked tensor itself, for a network that lays it out its own
 *                      way (the connector's column blocks); DG_EMODEL for a tensor a bind
 *                      as a matrix rewrote (the other kinds read it through the layout);
 *   dg_bind_has        whether an optional tensor is there (bind it only then).
 *
 * Dtypes: every kind reads the three stored dtypes dtype.h names (BF16, F16, F32): each
 * backend's matmul reads them (the CUDA one converts to bf16 in weight_prepare) and
 * dg_load_f32 widens each. A binder's `dtypes` narrows that (a loader that must see the
 * published bf16 files, say); 0 accepts all three.
 *
 *     dg_buffer_list owned = {0};      // the network's: released by its unload
 *     dg_binder b = {.st = st, .be = be, .owned = &owned, .err = err, .errlen = sizeof err};
 *     dg_bind_matrix(&b, &m->embed, DG_SHAPE(V, D), "model.embed_tokens.weight");
 *     b.prefix = "model.layers.0.";    // prepended to the names that follow
 *     dg_bind_matrix(&b, &L->wq, DG_SHAPE(QD, D), "self_attn.q_proj.weight");
 *     dg_bind_fp32(&b, &L->bq, DG_SHAPE(QD), "self_attn.q_proj.bias");
 *     b.prefix = NULL;
 *     if (dg_bind_has(&b, "lm_head.weight")) dg_bind_matrix(&b, &m->lm_head, ...);
 *     if (b.rc < 0) goto fail;         // err names the first failure
 *
 * Errors are sticky (hiredis-style): each bind returns 0 or a negative DG_E* and stores the
 * first error in b->rc and b->err; once b->rc < 0, every later bind returns it at once and
 * touches nothing, so a long run of binds is checked once at the end. DG_EMODEL, naming
 * the checkpoint (the path the dg_st was opened from: the component's directory; nothing
 * for a set of buffers) and the tensor by its full name (prefix included):
 *     PATH: tensor "NAME": missing from the checkpoint
 *     PATH: tensor "NAME": expected shape [a, b], found [c, d]
 *     PATH: tensor "NAME": expected dtype BF16, found F32
 * DG_ENOMEM (host or backend memory), or what be->weight_prepare returns. Buffers made
 * before an error stay in the list, for the caller's unload to release.
 *
 * Load time only: a bind looks the name up (O(log n)) and converts on the host. */
#ifndef DG_WEIGHTS_H
#define DG_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "io/safetensors.h"

/* The shape a configuration expects: DG_SHAPE(rows, cols), DG_SHAPE(c, 1, 1, 1), ... */
typedef struct {
    int     n_dims;                       /* 1 .. DG_ST_MAX_DIMS */
    int64_t dims[DG_ST_MAX_DIMS];
} dg_shape;

#define DG_SHAPE(...)                                                                      \
    ((dg_shape){(int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), {__VA_ARGS__}})

/* A mask of accepted stored dtypes for dg_binder.dtypes. */
#define DG_DTYPE_BIT(t) (1u << (t))

/* The backend buffers a network owns (its fp32 copies), released together. */
typedef struct {
    dg_backend *be;   /* borrowed: the backend they belong to (set by the first bind) */
    void      **p;    /* owned: [n] backend buffers */
    int         n, cap;
} dg_buffer_list;

/* Releases every buffer and leaves the list empty; accepts an empty ({0}) list. */
void dg_buffer_list_release(dg_buffer_list *l);

typedef struct {
    const dg_st    *st;       /* borrowed */
    dg_backend     *be;       /* borrowed */
    dg_buffer_list *owned;    /* borrowed: receives dg_bind_fp32/conv buffers (NULL: the
                                 network makes none) */
    const char     *prefix;   /* borrowed: prepended to every name; NULL or "" for none */
    unsigned        dtypes;   /* accepted stored dtypes (DG_DTYPE_BIT); 0: all three */
    int             panels;   /* 1: dg_bind_matrix may give a matrix the panel layout where
                                 the backend reads it (dg_weight_layout_for): for a network
                                 whose matrices only be->matmul reads, and whose rows need
                                 not be the same bits as a decoder's GEMV (the vision tower,
                                 the DiT); 0: never */
    char           *err;      /* borrowed: [errlen], the first error's message */
    size_t          errlen;
    int             rc;       /* sticky: 0, or the first error */
} dg_binder;

/* The name (after the prefix) is printf-formatted from fmt. */
#define DG_BIND_FMT(i) __attribute__((format(printf, i, i + 1)))

/* *out = the tensor, its shape and dtype checked. */
int dg_bind_find(dg_binder *b, dg_shape shape, const dg_st_tensor **out, const char *fmt, ...)
    DG_BIND_FMT(4);
/* 1 when the tensor is in the set (shape and dtype are not checked: the bind does that),
 * 0 when absent or after an error. */
int dg_bind_has(dg_binder *b, const char *fmt, ...) DG_BIND_FMT(2);
/* *w = [shape[0], product of the other dims] in the stored dtype, after weight_prepare. */
int dg_bind_matrix(dg_binder *b, dg_weight *w, dg_shape shape, const char *fmt, ...)
    DG_BIND_FMT(4);
/* dst (host, [product of shape]) <- the tensor widened to fp32, row-major as stored. */
int dg_bind_fp32_host(dg_binder *b, float *dst, dg_shape shape, const char *fmt, ...)
    DG_BIND_FMT(4);
/* *out = a backend buffer [product of shape] of the tensor widened to fp32; b->owned
 * (required) owns it. */
int dg_bind_fp32(dg_binder *b, float **out, dg_shape shape, const char *fmt, ...) DG_BIND_FMT(4);
/* The same for a convolution weight: [o, i, kt, kh, kw] stored as [o, kt, i, kh, kw];
 * a 4-D [o, i, kh, kw] as it is. */
int dg_bind_conv(dg_binder *b, float **out, dg_shape shape, const char *fmt, ...) DG_BIND_FMT(4);

#endif
