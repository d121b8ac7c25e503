/* dit_pack.h — DuoGen's multi-frame packing for the DiT (docs/specs/duogen_paper.md §1.2
 * "Visual conditions"; docs/specs/cosmos_dit_wan_vae.md §1.3, §3).
 *
 * Every earlier image is a clean condition frame at its own latent resolution; the noisy
 * target comes last. Their patches are flattened into one token sequence, frame after
 * frame, each frame's tokens in (row, column) order. Per-frame metadata says where a frame's
 * tokens are, its latent size and its temporal RoPE index (incremented per image); the
 * spatial RoPE of a frame comes from its own patch grid. For frames of equal size this is
 * exactly Cosmos' video token order (t, h, w), so the packed forward equals the video one.
 *
 *     dg_dit_layout L;
 *     int h[3] = {64, 48, 64}, w[3] = {64, 80, 64}, cond[3] = {1, 1, 0};
 *     dg_dit_layout_build(&L, h, w, cond, 3, 2, 2, err, sizeof err);   // patch 2x2
 *     // L.frames[i].token0 / n_tokens, L.n_tokens; rope tables from dg_dit_rope_table()
 */
#ifndef DG_DIT_PACK_H
#define DG_DIT_PACK_H

#include <stddef.h>
#include <stdint.h>

#define DG_DIT_MAX_FRAMES 64

typedef struct {
    int     h, w;          /* latent size; multiples of the patch */
    int     t_index;       /* temporal RoPE position: the frame's place in the sequence */
    int     condition;     /* 1: a clean condition frame (mask channel 1, its own timestep) */
    int64_t token0;        /* first token of the frame in the packed sequence */
    int64_t n_tokens;      /* (h / patch_h) · (w / patch_w) */
} dg_dit_frame_meta;

typedef struct {
    int               n_frames;
    int               patch_h, patch_w;
    int64_t           n_tokens;
    int64_t           n_latent;     /* Σ channels·h·w of the frames (host latent arrays) */
    dg_dit_frame_meta frames[DG_DIT_MAX_FRAMES];
} dg_dit_layout;

/* Frames in sequence order (t_index = i). DG_EINVAL for sizes that are not positive
 * multiples of the patch or more than DG_DIT_MAX_FRAMES frames. `channels` sizes n_latent. */
int  dg_dit_layout_build(dg_dit_layout *L, const int *h, const int *w, const int *condition,
                         int n_frames, int channels, int patch_h, int patch_w, char *err,
                         size_t errlen);

/* 1 when a and b pack the same frames (sizes, order, condition flags): one forward may
 * run inputs of both (dg_dit_forward_batch). */
int  dg_dit_layout_same(const dg_dit_layout *a, const dg_dit_layout *b);

/* Cosmos 3-D RoPE angles of every token (spec §1.3; diffusers CosmosRotaryPosEmbed):
 * head_dim splits into dim_t = hd − 2·(hd/6·2) temporal, dim_h = dim_w = hd/6·2 spatial
 * frequencies; θ_x = 10000 · scale_x^(dim_x / (dim_x − 2)); for a token at (t, y, x)
 * ang = [t·f_t, y·f_h, x·f_w] (hd/2 values), f_x[k] = θ_x^(−2k/dim_x). cos, sin: host
 * [n_tokens, head_dim/2], the rotate-half table of the rope_table op. */
void dg_dit_rope_table(const dg_dit_layout *L, int head_dim, const float rope_scale[3],
                       float *cos, float *sin);

/* Patch vectors of frame f (spec §3, "c r m n" order, c outermost): rows token0 .. of
 * tokens[., in_dim], in_dim = (channels + 2)·patch_h·patch_w: the latent's channels, then
 * the condition mask (1 on condition frames), then the padding mask (always 0).
 * latent: host [channels, h, w]. */
void dg_dit_patchify(const dg_dit_layout *L, int f, const float *latent, int channels,
                     float *tokens);
/* The inverse for the network output of frame f: out[token, (p1·pw + p2)·C + c] (C
 * innermost) to latent [channels, h, w]. */
void dg_dit_unpatchify(const dg_dit_layout *L, int f, const float *out, int channels,
                       float *latent);

#endif
