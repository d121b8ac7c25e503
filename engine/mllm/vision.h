/* vision.h — the Qwen2.5-VL vision tower (docs/specs/qwen2_5_vl.md §4) over the backend interface.
 *
 * The model (dg_vision) is the bound visual.* weights: read-only after dg_vision_load,
 * shareable. The state (dg_vision_state) is one caller's scratch, sized once for the most
 * patches one forward call may take (all its images together), and the backend its forwards
 * run on (the load's, or a fork of it: backend.h); nothing is allocated per call.
 *
 *     dg_vision vm; dg_vision_state *vs;
 *     dg_vision_load(&vm, &cfg.vision, st, be, err, sizeof err);
 *     dg_vision_state_new(&vm, be, 16384, &vs, err, sizeof err);  // up to 16384 patches a call
 *     const dg_image_patches *imgs[2] = {p0, p1};                 // engine/image_preprocess.h
 *     int n_tok = dg_vision_tokens(&vm, p0->grid_t, p0->grid_h, p0->grid_w) + ...;
 *     float *emb = be->alloc(be, sizeof(float) * n_tok * cfg.vision.out_hidden_size);
 *     dg_vision_forward(&vm, vs, imgs, 2, emb, err, sizeof err);
 *     // emb: [tokens of image 0 ; tokens of image 1], each in raster order of the merged grid
 *     // (t, row, col), the rows that replace the <|image_pad|> tokens in order (spec §3.5)
 *
 * Images of different sizes go through one call: window attention and full attention never
 * cross an image boundary (cu_seqlens), so an image's rows do not depend on the other images
 * of the call (up to fp32 rounding in the GEMMs).
 *
 * Numerics: fp32 everywhere (weights widened from their stored dtype as they are read), as
 * transformers run in float32 on the same bf16 checkpoint. */
#ifndef DG_VISION_H
#define DG_VISION_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "mllm/qwen2vl_config.h"
#include "io/image_preprocess.h"
#include "io/safetensors.h"

/* C = hidden_size, I = intermediate_size, O = out_hidden_size, P = 3·T·p² = 1176 */
typedef struct {
    float    *norm1;      /* [C]      norm1.weight (RMSNorm) */
    float    *norm2;      /* [C]      norm2.weight (RMSNorm) */
    dg_weight qkv;        /* [3C, C]  attn.qkv.weight: rows q, then k, then v; heads of hd inside */
    float    *b_qkv;      /* [3C]     attn.qkv.bias */
    dg_weight proj;       /* [C, C]   attn.proj.weight */
    float    *b_proj;     /* [C] */
    dg_weight gate;       /* [I, C]   mlp.gate_proj.weight */
    float    *b_gate;     /* [I] */
    dg_weight up;         /* [I, C]   mlp.up_proj.weight */
    float    *b_up;       /* [I] */
    dg_weight down;       /* [C, I]   mlp.down_proj.weight */
    float    *b_down;     /* [C] */
    int       full;       /* 1: full attention over each image (fullatt_block_indexes), 0: windows */
} dg_vision_block;

typedef struct {
    dg_vision_config cfg;
    dg_backend      *be;          /* borrowed: the load's (weights); forwards use the state's */
    dg_weight        patch;       /* [C, P]   patch_embed.proj.weight, the Conv3d [C,3,T,p,p] as rows */
    dg_vision_block *blocks;      /* owned: [depth] */
    float           *ln_q;        /* [C]      merger.ln_q.weight (RMSNorm) */
    dg_weight        mlp0;        /* [4C, 4C] merger.mlp.0.weight */
    float           *b_mlp0;      /* [4C] */
    dg_weight        mlp2;        /* [O, 4C]  merger.mlp.2.weight */
    float           *b_mlp2;      /* [O] */
    float           *vectors;     /* owned (backend memory): every fp32 norm weight and bias */
    int              head_dim;    /* C / num_heads */
    int              merge;       /* spatial_merge_size m; m² patches make one token */
    int              window;      /* window side in merged tokens: window_size / m / patch_size */
} dg_vision;

/* N = max_patches (all images of one call), G = N / m² merged tokens, hd = head_dim */
typedef struct {
    dg_backend *be;        /* borrowed: the buffers' and the forwards' backend */
    int      max_patches;
    float   *pix;          /* [N, P]      pixel_values of the call's images, concatenated */
    float   *x;            /* [N, C]      residual stream, in window order */
    float   *h;            /* [N, C]      normed input / block output; [G, m²C] in the merger */
    float   *qkv;          /* [N, 3C]     fused q, k, v */
    float   *att;          /* [N, C]      attention output; [G, m²C] merger hidden */
    float   *gate;         /* [N, I] */
    float   *up;           /* [N, I] */
    float   *merged;       /* [G, O]      merger output, in window order */
    float   *cos, *sin;    /* [N, hd/2]   rotary table, window order (backend memory) */
    float   *host_cos;     /* [N, hd/2]   the same, built on the host */
    float   *host_sin;     /* [N, hd/2] */
    int32_t *window_index; /* [G]         window order -> merged token (spec §4.4) */
    int32_t *reverse;      /* [G]         merged token -> window order (argsort of window_index) */
    int32_t *cu_window;    /* [G + 1]     window segments in patches, empty ones dropped */
    int32_t *cu_full;      /* [G + 1]     one segment per image frame, in patches */
} dg_vision_state;

/* Binds every visual.* tensor of `st` to its field, checking dtype and shape; the error
 * names the tensor with the expected and found shapes. DG_EMODEL, DG_ENOMEM. */
int  dg_vision_load(dg_vision *m, const dg_vision_config *cfg, const dg_st *st, dg_backend *be,
                    char *err, size_t errlen);
void dg_vision_unload(dg_vision *m);   /* accepts a zeroed or half-loaded model */

/* be: m's backend or a fork of it (backend.h), which must outlive the state. */
int  dg_vision_state_new(const dg_vision *m, dg_backend *be, int max_patches, dg_vision_state **out,
                         char *err, size_t errlen);
void dg_vision_state_free(const dg_vision *m, dg_vision_state *s);   /* accepts NULL */

/* Output rows (LLM tokens) of an image of this patch grid: t·h·w / m². */
int  dg_vision_tokens(const dg_vision *m, int32_t grid_t, int32_t grid_h, int32_t grid_w);

/* Runs the tower over n images at once and writes their merged embeddings to out
 * (backend memory) [Σ tokens, O], image after image. DG_EINVAL: an image whose patch
 * layout does not fit the model (patch_dim, grid not a multiple of the merge size);
 * DG_ELIMIT: more patches than the state holds. */
int  dg_vision_forward(const dg_vision *m, dg_vision_state *s, const dg_image_patches *const *images,
                       int n, float *out, char *err, size_t errlen);

#endif
