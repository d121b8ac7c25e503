/* backend.h — the one compute interface the model code calls.
 *
 * A backend is a table of operations chosen at run time by name (dg_backend_new: "cpu",
 * "cpu-scalar", "cuda:N"). Model code (engine/mllm/qwen2.c and vision.c, engine/draw/dit.c,
 * vae.c and connector.c, the sampler's device path) is written once over these operations
 * and never includes a kernel header. The CPU implementation lives in kernels/cpu/; the
 * CUDA one in kernels/cuda/, built into the module build/libduogen_cuda.so that
 * engine/backend.c loads on the first "cuda:N".
 *
 * Conventions shared by every operation:
 *   - activations are fp32, row-major, contiguous: x[m, n] is m rows (tokens) of n values;
 *   - a weight is a dg_weight: a [rows, cols] matrix in its stored dtype (BF16, F16 or
 *     F32), rows = output features, cols = input features (PyTorch nn.Linear layout), so
 *     y = x · Wᵀ + b; row-major as stored, or (a backend with weights_blocked) cut into
 *     blocks of DG_WEIGHT_KB columns (dg_weight.kb, dg_weight_at below), or (a backend
 *     with weights_panels, for the matrices a loader offers) in panels of
 *     DG_WEIGHT_PANEL_ROWS rows;
 *   - buffers passed to operations come from be->alloc (host memory on the CPU, device
 *     memory on a GPU); weights are made usable by be->weight_prepare once, at load;
 *   - operations do not allocate: scratch they need is reserved when the backend is made;
 *   - operations cannot fail on valid shapes; shapes are validated at load time.
 *
 * Threads. A backend is used by one thread at a time: its operations, and the order in
 * which they run, are that thread's. dg_backend_fork makes another backend for another
 * thread (a scheduler each): the same operations and settings, its OWN execution state
 * (CPU: the scratch of GEMM, convolution and VAE attention; CUDA: a stream, cuBLAS and
 * cuBLASLt handles, their workspace and plans, the staging ring for host arrays, the
 * scratch, the readback buffer, the sticky status), and the parent's device-wide resources
 * SHARED: the device, its memory (CUDA: one arena, whose alloc and release are locked, so
 * any backend of the family may allocate or release while the others run operations), and
 * so the weights prepared by any of them. Hence:
 *   - backends of one family run operations concurrently on their own threads; two of
 *     them may read the same memory (weights) at once, but the operations of two
 *     backends are not ordered with each other (two CUDA streams), so memory that one
 *     writes is not touched by another — each thread's buffers are its own;
 *   - a fork sees everything its parent issued before dg_backend_fork returned (the
 *     weights uploaded at load); dg_backend_fork may run on any thread, several at once;
 *   - memory goes back through release on the backend that allocated it, which returns
 *     it to the shared pool only after that backend's issued work is done (so another
 *     backend's next alloc never gets memory still being read);
 *   - a fork is freed before its parent; freeing a fork frees its own state only.
 *
 * Extending it: a new operation adds a member to struct dg_backend, implements it in every
 * backend, and joins the list of required members in backend.c, which dg_backend_new and
 * dg_backend_fork check (a fused form that defaults to its composition may stay optional);
 * model code checks nothing. A member that no engine code calls is removed, not kept for
 * tests. */
#ifndef DG_BACKEND_H
#define DG_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "duogen.h"

/* The most candidates one topk call returns (the host sampler asks for at most 1024 + 32). */
#define DG_BACKEND_TOPK_MAX 2048

typedef struct {
    const void *data;          /* borrowed: the mapped tensor (CPU) or device copy */
    dg_dtype    dtype;
    int64_t     rows;          /* output features */
    int64_t     cols;          /* input features */
    int64_t     kb;            /* the layout: 0 row-major; DG_WEIGHT_KB blocked;
                                  DG_WEIGHT_PANELS panels (below) */
} dg_weight;

/* The blocked layout, which a backend with weights_blocked reads (the CPU's): the matrix
 * is stored block after block of DG_WEIGHT_KB columns (the last block narrower), each
 * block its rows one after another: column c of row r at element (c / KB)·KB·rows + r·bw
 * + c % KB, bw the block's width. A GEMV then reads one block at a time as one sequential
 * stream, with only that block's part of x in L1: row-major, a long x row shares the 32 KB
 * L1 with the weight stream (the small preset's down projection in fp32 compute, x 19 KB,
 * read at 16-17 GB/s where the others read at 30; the 7B's, 74 KB, at 12: engine/MODELS.md).
 * 2048 is the bf16 compute order's block and twice the fp32 order's (kernels/cpu/matmul.h),
 * so every block of either order lies in one block of the layout. dg_weight_kb_for (below
 * struct dg_backend) says which matrices a backend wants so. */
#define DG_WEIGHT_KB 2048

/* The panel layout, which a backend with weights_panels reads (the CPU's, in either
 * compute, for a BF16 matrix of an even number of columns that its loader offers: the
 * vision tower's and the DiT's, which only its matmul reads): the rows in panels of
 * DG_WEIGHT_PANEL_ROWS (the last panel p has np = rows - 64p of them, fewer when rows is
 * not a multiple), each panel the 32-bit pairs of columns 2s, 2s + 1 of its np rows, step
 * after step: column c of row r at element (r / 64)·64·cols + (c / 2)·2·np + (r % 64)·2 +
 * c % 2. A step of a panel is up to four zmm of pairs, which VDPBF16PS multiplies by a
 * pair of x broadcast to all lanes (or which are widened into even and odd columns for
 * FMAs by x's two values): each lane is one output, so no horizontal sums (the panel
 * orders, kernels/cpu/matmul.h), and W is read as one stream, in the order the products
 * use it. Only the matmul reads it: dg_weight_at gives an element's address,
 * but a run of columns is not contiguous (a pair is), and dg_weight_ld has no meaning. */
#define DG_WEIGHT_PANELS (-1)
#define DG_WEIGHT_PANEL_ROWS 64

/* The elements from one row to the next in column c's block: cols, or the block's width. */
static inline int64_t dg_weight_ld(const dg_weight *w, int64_t c) {
    if (!w->kb) return w->cols;
    const int64_t b0 = c / w->kb * w->kb;
    return w->cols - b0 < w->kb ? w->cols - b0 : w->kb;
}

/* The element of row r at column c (c, and the columns read after it, in c's block). A
 * kernel takes row 0's and dg_weight_ld once a block, and steps from row to row: a division
 * a row cost a GEMV of 896 columns 8% of its speed. */
static inline const void *dg_weight_at(const dg_weight *w, int64_t r, int64_t c) {
    const size_t es = w->dtype == DG_DTYPE_F32 ? 4 : 2;
    if (!w->kb) return (const char *)w->data + (size_t)(r * w->cols + c) * es;
    if (w->kb == DG_WEIGHT_PANELS) {
        const int64_t p0 = r / DG_WEIGHT_PANEL_ROWS * DG_WEIGHT_PANEL_ROWS,
                      np = w->rows - p0 < DG_WEIGHT_PANEL_ROWS ? w->rows - p0 : DG_WEIGHT_PANEL_ROWS;
        return (const char *)w->data + (size_t)(p0 * w->cols + c / 2 * 2 * np + (r - p0) * 2 + c % 2) * es;
    }
    const int64_t b0 = c / w->kb * w->kb;
    return (const char *)w->data + (size_t)(b0 * w->rows + r * dg_weight_ld(w, c) + c - b0) * es;
}

/* The KV of one layer as attention reads it: fixed-size blocks of positions, reached
 * through a sequence's block table (see cache/kv_cache.h). Position p of the sequence lives at
 * row (block_table[p / block_size] * block_size + p % block_size) of k and v. */
typedef struct {
    void          *k;            /* [n_blocks * block_size, n_kv_heads * head_dim] of dtype */
    void          *v;            /* [n_blocks * block_size, n_kv_heads * head_dim] of dtype */
    const int32_t *block_table;  /* [ceil(n_positions / block_size)] block ids */
    int            block_size;   /* positions per block */
    dg_dtype       dtype;        /* F32, or BF16 where the backend has kv_bf16 (kv_write rounds
                                    to nearest even; attention widens each row to fp32) */
} dg_kv_view;

/* One sequence of a batched attention call (attention_batch): its layer's view, the
 * positions already in it, and its new rows. */
typedef struct {
    dg_kv_view kv;
    int        n_past;
    int        m;
} dg_attn_seq;

/* Rotary embedding parameters (docs/specs/qwen2_5_vl.md §3.2-3.3). Frequency j < head_dim/2
 * rotates dims j and j + head_dim/2 (rotate_half pairing) by angle pos * theta^(-2j/head_dim),
 * where pos is taken from row t for j < section[0], row h for the next section[1]
 * frequencies, row w for the last section[2]. Plain 1-D RoPE is section {head_dim/2, 0, 0}. */
typedef struct {
    float theta;
    int   section[3];
} dg_rope_params;

/* A 3-D convolution over frame-major activations (the VAE's layout): x[t, c_in, h, w] ->
 * y[t_out, c_out, h_out, w_out], weights fp32 [c_out, kt, c_in, kh, kw] (PyTorch's
 * [c_out, c_in, kt, kh, kw] with kt moved forward, done once at load). Zero padding: pad_t
 * frames in front only (causal), the four spatial sides as given. A 2-D conv is kt = 1. */
typedef struct {
    int c_in, c_out, t, h, w;
    int kt, kh, kw;
    int st, sh, sw;                                     /* strides */
    int pad_t, pad_top, pad_bottom, pad_left, pad_right;
} dg_conv3d_shape;

static inline int dg_conv3d_out_t(const dg_conv3d_shape *s) { return (s->t + s->pad_t - s->kt) / s->st + 1; }
static inline int dg_conv3d_out_h(const dg_conv3d_shape *s) {
    return (s->h + s->pad_top + s->pad_bottom - s->kh) / s->sh + 1;
}
static inline int dg_conv3d_out_w(const dg_conv3d_shape *s) {
    return (s->w + s->pad_left + s->pad_right - s->kw) / s->sw + 1;
}

/* One of the weights of a dg_matmul_parts call: y[m, w->rows] = x · wᵀ (+ bias). */
typedef struct {
    float           *y;
    const dg_weight *w;
    const float     *bias;        /* NULL: none */
} dg_matmul_part;

#define DG_MATMUL_PARTS_MAX 4

typedef struct dg_backend dg_backend;
typedef struct dg_screen dg_screen;   /* a backend's coarse copy of a weight (matmul_bounds) */

struct dg_backend {
    const char *name;            /* "cpu", "cpu-scalar", "cuda" */
    /* Called with load_tick_user as each weight is bound (io/weights.h), before it is
     * converted and uploaded: dg_model_open's load progress between its phases, so that a
     * long upload keeps telling systemd it lives. NULL: none. Not an operation. */
    void      (*load_tick)(void *user);
    void       *load_tick_user;
    int         n_threads;       /* CPU threads an operation uses (CUDA: 1) */
    int         kv_bf16;         /* 1: kv_write and attention take a BF16 dg_kv_view */
    int         kv_bf16_default; /* 1: a scheduler keeps its KV in bf16 unless told fp32
                                    (dg_sched_opts kv_bf16 0): the GPU's default, where its
                                    bf16 attention is in use (CUDA: DG_CUDA_UNVERIFIED=1 until
                                    a device run verifies it); 0: fp32 unless asked (CPU) */
    int         rows_exact;      /* 1: a row of a decoder forward is the same bits whatever
                                    the batch: the matmul's rows (below) and attention of a
                                    chunk's row or a decode row (CPU); so a scheduler may feed
                                    drafted tokens and keep the answers (dg_sched_opts
                                    draft_tokens); 0: not promised (CUDA) */
    int         bf16_compute;    /* 1: matmul over a BF16 weight rounds x to bf16 and sums
                                    bf16 products (CPU: kernels/cpu/matmul.h, the bf16
                                    compute order); 0: fp32 compute */
    int         weights_blocked; /* 1: its kernels read either layout, and dg_bind_matrix
                                    gives it the blocked one where dg_weight_kb_for says
                                    (the CPU); 0: row-major only (CUDA, which copies weights
                                    at weight_prepare) */
    int         weights_panels;  /* 1: its matmul reads the panel layout (the CPU, in its
                                    compute's panel order), and dg_bind_matrix gives it
                                    that one where dg_weight_layout_for says (a BF16 matrix
                                    the binder offers, dg_binder.panels); 0: never */
    int         screen_rows;     /* the most logits rows of a forward for which the logit
                                    screen (matmul_bounds and the picks) reads faster than the
                                    lm_head's matmul: the CPU with AVX-512 VNNI 2 at one thread,
                                    4 at more (each row of x costs it a pass of VPDPBUSD over
                                    the copy, while the matmul reads W once for 8 rows:
                                    engine/MODELS.md "The logit screen"); 0 where it does not
                                    pay (a CPU without VNNI, whose ops are there all the same,
                                    and tested; CUDA, which has none) */
    int         weights_hugepages; /* 1: the loaders read weight files into huge pages
                                    (dg_st_open_flags DG_ST_HUGEPAGES): the CPU backend,
                                    which reads weights where they lie, unless
                                    cpu_mapped_weights; 0: mapped (GPU: uploaded from there) */
    void       *impl;            /* owned by the backend */

    void  (*free)(dg_backend *be);
    /* A new backend over the same device (see "Threads" above): *out, or a negative DG_E*
     * with err (DG_ENOMEM: its scratch does not fit; DG_EDEVICE: the parent has failed). */
    int   (*fork)(dg_backend *be, dg_backend **out, char *err, size_t errlen);
    void *(*alloc)(dg_backend *be, size_t bytes);   /* NULL on failure; 64-byte aligned */
    void  (*release)(dg_backend *be, void *p);      /* accepts NULL; see "Threads" */
    /* Makes a host weight usable by the ops (CPU: nothing; GPU: upload). */
    int   (*weight_prepare)(dg_backend *be, dg_weight *w, char *err, size_t errlen);

    /* y[m, w.rows] = x[m, w.cols] · Wᵀ (+ bias[w.rows] when bias != NULL).
     * m == 1 is the decode case (a bandwidth-bound GEMV); larger m a GEMM.
     * Rows are bit-identical whatever m (CPU backends): row i of y depends on row i of x, W
     * and bias only, not on m, the row's place in the batch or the thread count, so KV that
     * decode computed one token at a time equals KV that a prefill computed (the order:
     * kernels/cpu/matmul.h; "cpu" gives the same bits with AVX2 or AVX-512, and in
     * bf16_compute with or without AVX-512 BF16). The CUDA backend
     * does not promise it (a GEMV for m <= 8, cuBLAS above). */
    void (*matmul)(dg_backend *be, float *y, const float *x, const dg_weight *w,
                   const float *bias, int m);
    /* y[m, n] = x / sqrt(mean(x²) + eps) * weight[n], per row; y may equal x. */
    void (*rmsnorm)(dg_backend *be, float *y, const float *x, const float *weight, int m, int n,
                    float eps);
    /* In place on x[m, n_heads, head_dim]; pos is [3, m] (rows t, h, w). */
    void (*rope)(dg_backend *be, float *x, const int32_t *pos, int m, int n_heads, int head_dim,
                 const dg_rope_params *p);
    /* Stores k, v [m, kv_dim] at positions start .. start+m-1 of the view. */
    void (*kv_write)(dg_backend *be, const dg_kv_view *kv, int start, const float *k,
                     const float *v, int m, int kv_dim);
    /* Causal GQA attention of m new queries at positions n_past .. n_past+m-1 over the
     * positions 0 .. n_past+m-1 of the view (the new ones already written):
     * out[m, n_heads*head_dim]; q head h reads kv head h / (n_heads / n_kv_heads). */
    void (*attention)(dg_backend *be, float *out, const float *q, const dg_kv_view *kv,
                      int n_past, int m, int n_heads, int n_kv_heads, int head_dim, float scale);
    /* y[i] = silu(gate[i]) * up[i], i < n. */
    void (*silu_mul)(dg_backend *be, float *y, const float *gate, const float *up, int64_t n);
    /* y[i] += x[i], i < n. */
    void (*add)(dg_backend *be, float *y, const float *x, int64_t n);
    /* y[m, table.cols] = rows ids[0..m-1] of table, as fp32. */
    void (*embed)(dg_backend *be, float *y, const dg_weight *table, const int32_t *ids, int m);
    /* Copies n floats between host memory and backend memory (CPU: memcpy). */
    void (*download)(dg_backend *be, float *host, const float *src, int64_t n);
    void (*upload)(dg_backend *be, float *dst, const float *host, int64_t n);

    /* ---- vision tower and DiT (docs/specs/qwen2_5_vl.md §4; docs/specs/cosmos_dit_wan_vae.md) ---- */

    /* Non-causal attention within segments: the vision tower's window and full blocks
     * (cu_seqlens), DiT self-attention (one segment) and cross-attention (q and kv of
     * different lengths). Segment s: query rows q_cu[s] .. q_cu[s+1]-1 attend to key/value
     * rows kv_cu[s] .. kv_cu[s+1]-1, out = softmax(q·kᵀ·scale)·v per head, in fp32.
     * q_cu and kv_cu are HOST arrays of n_seg + 1 non-decreasing offsets. Row i of q holds
     * n_heads heads of head_dim at q + i·q_stride; row j of k (and v) holds n_kv_heads
     * heads at k + j·kv_stride (strides in floats: q, k, v may be column slices of one
     * fused QKV buffer). Query head h reads kv head h / (n_heads / n_kv_heads).
     * out[n_q, n_heads·head_dim] is contiguous; only the rows of the segments are written;
     * an empty kv segment gives zero rows. head_dim <= 256. */
    void (*attention_segments)(dg_backend *be, float *out, const float *q, int q_stride,
                               const float *k, const float *v, int kv_stride,
                               const int32_t *q_cu, const int32_t *kv_cu, int n_seg,
                               int n_heads, int n_kv_heads, int head_dim, float scale);
    /* y[i] = 0.5·x·(1 + erf(x/√2)), i < n (nn.GELU()); y may equal x. */
    void (*gelu)(dg_backend *be, float *y, const float *x, int64_t n);
    /* Rotary embedding from a table of angles, in place: for row i < m and head h of x
     * (row i at x + i·stride floats, n_heads heads of head_dim each), dims j and
     * j + head_dim/2 (rotate_half pairing) rotate by cos[i, j], sin[i, j], j < head_dim/2.
     * cos, sin [m, head_dim/2] are backend memory. For position schemes `rope` cannot
     * express (the vision tower's 2-D rotary, spec §4.3). */
    void (*rope_table)(dg_backend *be, float *x, int stride, const float *cos,
                       const float *sin, int m, int n_heads, int head_dim);
    /* y[i, 0..n-1] = x[idx[i], 0..n-1], i < m; idx is a HOST array; y must not overlap x. */
    void (*gather_rows)(dg_backend *be, float *y, const float *x, const int32_t *idx, int m,
                        int64_t n);

    /* ---- image generation: VAE and DiT (docs/specs/cosmos_dit_wan_vae.md §3, §6) ---- */

    /* y = conv3d(x) + bias (bias NULL: none); see dg_conv3d_shape. y must not overlap x.
     * c_in·kt·kh·kw <= 2^20 (the CPU tiles im2col in its 16 MiB scratch). */
    void (*conv3d)(dg_backend *be, float *y, const float *x, const float *w, const float *bias,
                   const dg_conv3d_shape *s);
    /* Wan RMS_norm over channels of x[n_frames, channels, plane]: at every pixel
     * y = x / max(‖x‖₂, 1e-12) · √channels · gamma[c], then SiLU when silu != 0; y may equal x. */
    void (*channel_rmsnorm)(dg_backend *be, float *y, const float *x, const float *gamma,
                            int n_frames, int channels, int64_t plane, int silu);
    /* Nearest ×2 (= nearest-exact at ×2): y[p, 2h, 2w] from x[p, h, w], p < n_planes. */
    void (*upsample2x)(dg_backend *be, float *y, const float *x, int64_t n_planes, int h, int w);
    /* Single-head attention over the pixels of one frame in channel-major layout:
     * qkv[3·channels, plane] (q, k, v stacked), out[channels, plane] =
     * (softmax(qᵀk / √channels) vᵀ)ᵀ. out must not overlap qkv. plane <= 2^20. */
    void (*spatial_attention)(dg_backend *be, float *out, const float *qkv, int channels,
                              int64_t plane);
    /* y[i] = x[i] · sigmoid(x[i]), i < n; y may equal x. */
    void (*silu)(dg_backend *be, float *y, const float *x, int64_t n);
    /* adaLN: y[m, n] = LayerNorm(x) (no affine, biased variance) · (1 + scale[n]) + shift[n]
     * per row; y may equal x. */
    void (*modulate)(dg_backend *be, float *y, const float *x, const float *shift,
                     const float *scale, int m, int n, float eps);
    /* Gated residual: y[i, j] += gate[j] · x[i, j], for x, y [m, n]. */
    void (*add_gated)(dg_backend *be, float *y, const float *x, const float *gate, int m, int n);
    /* Per-row standardization of x[m, n] (the Cosmos text-embedding recipe, spec §1.1):
     * y = (x − mean) / (std + eps) with the UNBIASED std (divide by n − 1) and eps added to
     * the std, not under the root; y may equal x. */
    void (*standardize)(dg_backend *be, float *y, const float *x, int m, int n, float eps);
    /* ---- fused forms (optional: NULL means the composition, see the dg_* helpers below).
     * A GPU gains from them in the decode step, where each launch costs more than the work
     * of the small ones; the results equal the composition's up to summation order. ---- */

    /* parts[i].y = x · parts[i].wᵀ (+ bias) for n_parts <= DG_MATMUL_PARTS_MAX weights of
     * equal cols sharing x (q, k and v): n_parts matmul calls in one. */
    void (*matmul_parts)(dg_backend *be, const float *x, const dg_matmul_part *parts, int n_parts, int m);
    /* y[m, F] = silu(x · gateᵀ) ⊙ (x · upᵀ), F = gate->rows = up->rows (the SwiGLU MLP's
     * first half); tmp [m, F] is backend memory the op may use. y must not overlap x. */
    void (*matmul_swiglu)(dg_backend *be, float *y, float *tmp, const float *x, const dg_weight *gate,
                          const dg_weight *up, int m);
    /* x[m, n] += r, then y = rmsnorm(x) · weight (a residual add and the next norm);
     * y may equal r, not x. */
    void (*add_rmsnorm)(dg_backend *be, float *y, float *x, const float *r, const float *weight, int m,
                        int n, float eps);
    /* The K/V writes and the attention of a batch's sequences in one call (the decode step
     * of many jobs: a launch or a parallel region per layer, not one per sequence). For each
     * seqs[i], its m new rows stacked after those of the sequences before it: kv_write of
     * k, v [m, n_kv_heads·head_dim] at n_past of its view, then attention of q
     * [m, n_heads·head_dim] into out. Each sequence's rows equal what its own kv_write and
     * attention give, up to summation order (CPU: the same bits). */
    void (*attention_batch)(dg_backend *be, float *out, const float *q, const float *k, const float *v,
                            const dg_attn_seq *seqs, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                            float scale);

    /* ---- sampling (engine/text/sampler.c: the device path of dg_sampler_sample_device).
     * Optional, the two together: NULL means the sampler downloads the row and chooses on
     * the host (a backend whose kernels for them are not verified on its device). ---- */

    /* In place on a logits row x[n] (backend memory), in the order the host sampler applies
     * them: for each of the n_seen DISTINCT ids in seen[], x = x < 0 ? x·penalty : x / penalty
     * (transformers' repetition penalty; pass n_seen 0 when penalty is 1); then
     * x[bias[j].token] += bias[j].bias for j = 0 .. n_bias-1 in that order (a token may occur
     * twice; -INFINITY bans). seen and bias are HOST arrays of ids in [0, n). Every step is
     * one IEEE operation per element, so all backends give the same bits. */
    void (*logits_adjust)(dg_backend *be, float *x, int n, const int32_t *seen, int n_seen,
                          float penalty, const dg_logit_bias *bias, int n_bias);
    /* The k best of x[n] (backend memory), 1 <= k <= min(n, DG_BACKEND_TOPK_MAX), into HOST
     * arrays val[k] and idx[k]: by value descending, equal values by lower index (-0 equals
     * +0, as float comparison has it), val[i] = x[idx[i]]; the same set and order on every
     * backend. A row holding NaN gives an unspecified (but in-range) answer.
     * lse != NULL: also *lse = log Σ_i exp(x_i·inv_temp), as m + log Σ_i exp(x_i·inv_temp − m)
     * with m = max·inv_temp rounded to fp32 (no overflow); -INFINITY when every x_i is
     * -INFINITY. The CPU sums z = Σ expf(x_i·inv_temp − m) in fp32 in index order (the host
     * sampler's own sum, bit for bit) and returns m + log(z) in double, so exp(lse − m)
     * rounded to fp32 is that z again; a GPU sums in its own order (kernels/cuda/sample.cu
     * states its error). */
    void (*topk)(dg_backend *be, const float *x, int n, int k, float inv_temp, float *val,
                 int32_t *idx, double *lse);

    /* ---- greedy and top-k decoding from bounds: the logit screen (optional, the four
     * together; the CPU's, kernels/cpu/screen.h). A greedy token needs the argmax of the
     * lm_head's outputs, not all of them (a top-k draw its k best): bounds on every output from a coarse copy of W (int8: half
     * the bytes of bf16), then the exact outputs of the few that could win, give the token
     * the whole matmul gives, reading about half its bytes (engine/text/sampler.h
     * dg_sampler_sample_bounds; engine/MODELS.md "The logit screen"). ---- */

    /* The coarse copy of a weight (row-major or blocked, not panels), made once at load and
     * read by every backend of the family; DG_EINVAL for a matrix holding a value that is
     * not finite or with rows too long for the backend's scratch (CPU: past 2^21 - 64
     * columns), DG_ENOMEM. */
    int  (*screen_new)(dg_backend *be, const dg_weight *w, dg_screen **out, char *err, size_t errlen);
    void (*screen_free)(dg_backend *be, dg_screen *sc);   /* accepts NULL */
    /* For x[m, w.cols] (backend memory) and the screen of w: HOST arrays lo, hi [m, w.rows]
     * with lo <= y <= hi for every output y of matmul(x, w) (this backend's, bit for bit
     * as it computes them); a row of x that is not finite (or too large to bound) gets
     * NaN in both. */
    void (*matmul_bounds)(dg_backend *be, float *lo, float *hi, const float *x, const dg_screen *sc, int m);
    /* out[i] = y[ids[i]] (a HOST array [n]) for y = matmul of the ONE row x[w.cols]
     * (backend memory) and w: the same bits as the matmul gives that output. */
    void (*matmul_pick)(dg_backend *be, float *out, const float *x, const dg_weight *w, const int32_t *ids,
                        int n);

    /* ---- a fixed sequence of operations, recorded once and replayed (optional) ----
     * ops(ctx) issues operations whose arguments (pointers, sizes, scalars) are the same at
     * every call with this *slot and that stage no host array: the decode step's runs
     * between its per-token operations. A GPU backend records them into *slot the first time
     * (a CUDA graph) and replays that from then on, instead of launching each; it runs
     * ops(ctx) directly where it cannot record. *slot starts NULL, belongs to the backend
     * that first ran it (a recording replays on that backend's stream) and is freed by its
     * graph_release. NULL members: ops(ctx) is called every time (dg_graph_run). */
    void (*graph_run)(dg_backend *be, void **slot, void (*ops)(void *ctx), void *ctx);
    void (*graph_release)(dg_backend *be, void *slot);   /* accepts NULL */

    /* Bytes of memory that allocations on this backend could still take: the device's free
     * memory (CUDA: what the arena has left), the host's available memory (CPU:
     * MemAvailable). Optional: NULL = not known. The scheduler sizes its default number of
     * sequences by it (engine/duogen.h max_inflight). */
    size_t (*memory_free)(dg_backend *be);

    /* Operations return nothing, so a device fault is kept: 0 while the backend is healthy;
     * after an operation failed, that failure's DG_E* code (DG_EDEVICE) with its message,
     * from then on (the backend is not usable again). Each backend of a family keeps its
     * own: a fault is seen by the thread whose operation met it. The CPU backend fails only
     * where conv3d or spatial_attention is given a shape its scratch cannot tile (past the
     * bounds stated at them), which it refuses instead of running. */
    int  (*status)(dg_backend *be, char *err, size_t errlen);

    /* Which of the backend's alternative kernel paths ran, and how often, since it was made:
     * "name count" pairs separated by spaces (CUDA: "gemv 12 gemv_fused 0 gemm 3
     * gemm_lt_bias 2 bias_kernel 1 ..."; kernels/cuda/cuda_common.cuh names each), each
     * backend of a family its own. Writes at most len bytes with the NUL (cut where it does
     * not fit) and returns the length of the whole text, as snprintf. For the tests that
     * must know which path an operation took, and the benchmarks' reports. Optional: NULL =
     * none kept (the CPU's paths are fixed by its dispatch at start: dg-bench states them). */
    size_t (*paths)(dg_backend *be, char *buf, size_t len);
};

/* The layout be reads a weight of dtype with cols columns in best: DG_WEIGHT_KB (blocked)
 * where be has weights_blocked and a GEMV's row of x, as its matmul reads it (2 bytes a
 * column in bf16 compute over a BF16 weight, else 4), is more than DG_WEIGHT_X_L1 bytes;
 * else 0 (row-major). Measured, one thread, from memory (engine/MODELS.md): fp32 x of
 * 4864 columns 17 -> 31 GB/s, of 3584 29 -> 31, of 3072 and 2560 1-2% slower blocked; bf16
 * x of 18944 and 9728 columns 21-22 -> 32-34, of 6144 alike, of 4864 3% slower. */
#define DG_WEIGHT_X_L1 (12 * 1024)
static inline int64_t dg_weight_kb_for(const dg_backend *be, dg_dtype dtype, int64_t cols) {
    const int64_t x_bytes = cols * (be->bf16_compute && dtype == DG_DTYPE_BF16 ? 2 : 4);
    return be->weights_blocked && x_bytes > DG_WEIGHT_X_L1 ? DG_WEIGHT_KB : 0;
}

/* The layout dg_bind_matrix gives a matrix: the panels where be reads them, the matrix is
 * BF16 of an even number of columns, at most DG_WEIGHT_PANEL_COLS_MAX (a row of x, rounded
 * for the bf16 panel order, fits the CPU's buffer many times over), and its loader offers
 * it (panels: 1); else dg_weight_kb_for's. */
#define DG_WEIGHT_PANEL_COLS_MAX (1 << 20)
static inline int64_t dg_weight_layout_for(const dg_backend *be, dg_dtype dtype, int64_t cols, int panels) {
    if (panels && be->weights_panels && dtype == DG_DTYPE_BF16 && cols % 2 == 0 && cols <= DG_WEIGHT_PANEL_COLS_MAX)
        return DG_WEIGHT_PANELS;
    return dg_weight_kb_for(be, dtype, cols);
}

/* A backend's settings at creation (dg_backend_new_opts); zeros are the defaults. */
typedef struct {
    int    n_threads;          /* CPU threads an operation uses; 0 = all cores */
    size_t device_bytes;       /* the device memory a GPU backend takes at creation, once, for
                                  weights, KV blocks, activations and its forks' scratch (0:
                                  DG_GPU_MEMORY from the environment, else 90% of the
                                  device's free memory); the CPU backends ignore it */
    int    cpu_bf16_compute;   /* CPU: 1 = matmuls over BF16 weights in the bf16 compute
                                  order (activations rounded to bf16, VDPBF16PS or the same
                                  bits without it: kernels/cpu/matmul.h), and on AVX-512
                                  BF16 the segment attention's products in bf16
                                  (kernels/cpu/attention_bf16.h); 0 = fp32, the default.
                                  The CUDA backend ignores it */
    int    cpu_mapped_weights; /* CPU: 1 = weights read from the files' memory maps (shared
                                  page cache, no copy; a matrix rewritten into the blocked
                                  layout, dg_weight_kb_for, becomes the process's own
                                  pages); 0 = copied into transparent huge pages at load
                                  (weights_hugepages), the default: decode streams them
                                  faster. The CUDA backend ignores it */
} dg_backend_opts;

/* Creates a backend by name: "cpu" (best kernels this CPU has: AVX-512 (BF16), AVX2/FMA or
 * scalar), "cpu-scalar" (the portable kernels only; the reference in tests) or "cuda:N"
 * ("cuda" is "cuda:0"; DG_EINVAL where the build or the machine has no such device), with
 * the settings o (NULL: the defaults). The only place that chooses an implementation. The
 * table is checked (dg_backend_check): a missing operation fails the creation with
 * DG_EINTERNAL. */
int  dg_backend_new_opts(const char *name, const dg_backend_opts *o, dg_backend **out, char *err,
                         size_t errlen);
/* The same with the default settings but n_threads (0 = all cores). */
int  dg_backend_new(const char *name, int n_threads, dg_backend **out, char *err, size_t errlen);
/* A backend for another thread, sharing be's device, memory and weights (see "Threads"
 * above); checked as dg_backend_new's. The fork is freed with dg_backend_free before be. */
int  dg_backend_fork(dg_backend *be, dg_backend **out, char *err, size_t errlen);
void dg_backend_free(dg_backend *be);   /* accepts NULL */

/* 0 when every required member of the table is filled (all but the fused forms
 * matmul_parts, matmul_swiglu, add_rmsnorm and attention_batch, graph_run/graph_release,
 * memory_free, the sampling pair logits_adjust/topk and the screen's four
 * screen_new/screen_free/matmul_bounds/matmul_pick, each group together or not at all); else DG_EINTERNAL with err naming the missing members ("backend \"cpu\": no fork,
 * conv3d"). */
int  dg_backend_check(const dg_backend *be, char *err, size_t errlen);

/* The fused operations, or their composition where the backend has none. */
static inline void dg_matmul_parts(dg_backend *be, const float *x, const dg_matmul_part *parts, int n_parts,
                                   int m) {
    if (be->matmul_parts) {
        be->matmul_parts(be, x, parts, n_parts, m);
        return;
    }
    for (int i = 0; i < n_parts; i++) be->matmul(be, parts[i].y, x, parts[i].w, parts[i].bias, m);
}

static inline void dg_matmul_swiglu(dg_backend *be, float *y, float *tmp, const float *x, const dg_weight *gate,
                                    const dg_weight *up, int m) {
    if (be->matmul_swiglu) {
        be->matmul_swiglu(be, y, tmp, x, gate, up, m);
        return;
    }
    be->matmul(be, y, x, gate, NULL, m);
    be->matmul(be, tmp, x, up, NULL, m);
    be->silu_mul(be, y, y, tmp, (int64_t)m * gate->rows);
}

static inline void dg_attention_batch(dg_backend *be, float *out, const float *q, const float *k,
                                      const float *v, const dg_attn_seq *seqs, int n_seqs, int n_heads,
                                      int n_kv_heads, int head_dim, float scale) {
    if (be->attention_batch) {
        be->attention_batch(be, out, q, k, v, seqs, n_seqs, n_heads, n_kv_heads, head_dim, scale);
        return;
    }
    const int64_t QD = (int64_t)n_heads * head_dim, KD = (int64_t)n_kv_heads * head_dim;
    for (int i = 0, row = 0; i < n_seqs; row += seqs[i].m, i++) {
        be->kv_write(be, &seqs[i].kv, seqs[i].n_past, k + row * KD, v + row * KD, seqs[i].m, (int)KD);
        be->attention(be, out + row * QD, q + row * QD, &seqs[i].kv, seqs[i].n_past, seqs[i].m, n_heads,
                      n_kv_heads, head_dim, scale);
    }
}

static inline void dg_graph_run(dg_backend *be, void **slot, void (*ops)(void *ctx), void *ctx) {
    if (be->graph_run && slot) be->graph_run(be, slot, ops, ctx);
    else ops(ctx);
}

static inline void dg_add_rmsnorm(dg_backend *be, float *y, float *x, const float *r, const float *weight, int m,
                                  int n, float eps) {
    if (be->add_rmsnorm) {
        be->add_rmsnorm(be, y, x, r, weight, m, n, eps);
        return;
    }
    be->add(be, x, r, (int64_t)m * n);
    be->rmsnorm(be, y, x, weight, m, n, eps);
}

#endif
