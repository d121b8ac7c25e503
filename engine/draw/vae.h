/* vae.h — the Wan2.1 VAE (diffusers AutoencoderKLWan layout; docs/specs/cosmos_dit_wan_vae.md §6)
 * over the backend interface: causal 3-D convolutions, channel RMS norm, residual blocks,
 * the middle attention, spatial/temporal resampling with the first-frame rules, and the
 * per-channel latent normalization.
 *
 * The model (dg_vae) is immutable after load and shareable; a dg_vae_state is one caller's
 * scratch, sized for the largest clip it will see, and the backend it runs on (the load's,
 * or a fork of it: backend.h). Whole sequences are processed at once
 * (no chunking): the reference's 1+4+4... chunks with feature caches compute the same
 * causal convolution over the whole sequence (spec §6.4).
 *
 *     dg_vae vae; dg_vae_state *s;
 *     dg_vae_load(&vae, "pkg/vae", be, err, sizeof err);
 *     dg_vae_state_new(&vae, be, 1, 512, 512, &s, err, sizeof err);
 *     dg_vae_encode(&vae, s, rgb, 1, 512, 512, latent, err, sizeof err);   // [1,16,64,64]
 *     dg_vae_decode(&vae, s, latent, 1, 64, 64, rgb, err, sizeof err);
 *
 * Layouts are frame-major: pixels [T, 3, H, W] in [-1, 1], latents [T_lat, z, H/8, W/8]
 * with T_lat = 1 + (T - 1)/4 (Wan2.1). Latents are normalized: (mu - mean[c]) / std[c]. */
#ifndef DG_VAE_H
#define DG_VAE_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "io/weights.h"

#define DG_VAE_MAX_LEVELS 5
#define DG_VAE_MAX_Z 64

typedef struct {
    int   base_dim;                         /* 96 in Wan2.1 */
    int   z_dim;                            /* 16 */
    int   n_levels;                         /* len(dim_mult): 4 */
    int   dim_mult[DG_VAE_MAX_LEVELS];      /* 1, 2, 4, 4 */
    int   num_res_blocks;                   /* 2 */
    int   temporal_down[DG_VAE_MAX_LEVELS]; /* n_levels - 1 flags: 0, 1, 1 */
    float latents_mean[DG_VAE_MAX_Z];
    float latents_std[DG_VAE_MAX_Z];
} dg_vae_config;

/* One convolution: fp32 weights in backend memory, reordered to [c_out, kt, c_in, kh, kw]. */
typedef struct {
    float          *w;      /* [c_out, kt, c_in, kh, kw] */
    float          *b;      /* [c_out] */
    dg_conv3d_shape shape;  /* everything but t, h, w */
} dg_vae_conv;

typedef enum {
    DG_VAE_RES,          /* residual block */
    DG_VAE_ATTN,         /* middle attention */
    DG_VAE_DOWN2D,
    DG_VAE_DOWN3D,
    DG_VAE_UP2D,
    DG_VAE_UP3D,
} dg_vae_layer_kind;

typedef struct {
    dg_vae_layer_kind kind;
    int               c_in, c_out;
    float            *gamma1;     /* [c_in]  norm1 (RES), norm (ATTN) */
    float            *gamma2;     /* [c_out] norm2 (RES) */
    dg_vae_conv       conv1;      /* RES: 3x3x3 c_in->c_out; ATTN: to_qkv 1x1 c->3c;
                                     resample: the 3x3 2-D conv */
    dg_vae_conv       conv2;      /* RES: 3x3x3 c_out->c_out; ATTN: proj 1x1 c->c */
    dg_vae_conv       shortcut;   /* RES with c_in != c_out: 1x1x1; else w == NULL */
    dg_vae_conv       time_conv;  /* DOWN3D: (3,1,1) stride 2, c->c; UP3D: (3,1,1) c->2c */
} dg_vae_layer;

/* A stack: conv_in, layers in order, norm_out + SiLU, conv_out. */
typedef struct {
    dg_vae_conv   conv_in;
    dg_vae_layer *layers;      /* owned: [n_layers] */
    int           n_layers;
    float        *norm_out;    /* [c] */
    dg_vae_conv   conv_out;
} dg_vae_stack;

typedef struct {
    dg_vae_config cfg;
    dg_backend   *be;               /* borrowed: the load's (weights); forwards use the state's */
    dg_vae_stack  enc, dec;
    dg_vae_conv   quant_conv;       /* 1x1x1, 2z -> 2z */
    dg_vae_conv   post_quant_conv;  /* 1x1x1, z -> z */
    dg_buffer_list owned;           /* every backend buffer of the weights */
} dg_vae;

typedef struct {
    dg_backend *be;                     /* borrowed: the buffers' and the forwards' backend */
    int     max_frames, max_h, max_w;   /* pixel limits */
    int64_t buf_floats;                 /* size of each of buf[] */
    float  *buf[4];                     /* [buf_floats] activations, ping-pong */
    float  *qkv;                        /* [3 · c_mid · plane_mid] one frame's attention input */
    float  *io;                         /* [max(3·T·H·W, z·T_lat·h·w)] input/output staging */
} dg_vae_state;

/* Reads DIR/config.json (every key of the published Wan2.1 AutoencoderKLWan config:
 * docs/PUBLISHED.md lists what each must be) and DIR's weights (diffusion_pytorch_model.safetensors
 * or its index and shards; fp32, bf16 or fp16), binds and checks every tensor (the error
 * names tensor, expected and found shape), converts weights to fp32. */
int  dg_vae_load(dg_vae *v, const char *dir, dg_backend *be, char *err, size_t errlen);
void dg_vae_unload(dg_vae *v);   /* accepts a zeroed or half-loaded model */

/* Spatial and temporal factors: 2^(n_levels-1) and 2^(number of temporal downsamples). */
int  dg_vae_spatial_factor(const dg_vae *v);
int  dg_vae_temporal_factor(const dg_vae *v);

/* be: v's backend or a fork of it (backend.h), which must outlive the state. */
int  dg_vae_state_new(const dg_vae *v, dg_backend *be, int max_frames, int max_h, int max_w,
                      dg_vae_state **out, char *err, size_t errlen);
void dg_vae_state_free(const dg_vae *v, dg_vae_state *s);   /* accepts NULL */

/* pixels: host [T, 3, H, W] in [-1, 1]; latent: host [T_lat, z, H/f, W/f], normalized by
 * the config's latents_mean/std (the posterior mean: no sampling). DG_EINVAL when T is not
 * 1 + k·temporal_factor, H or W is not a multiple of the spatial factor, or the clip
 * exceeds the state's limits. */
int  dg_vae_encode(const dg_vae *v, dg_vae_state *s, const float *pixels, int T, int H, int W,
                   float *latent, char *err, size_t errlen);
/* latent: host [T_lat, z, h, w] normalized; pixels: host [T, 3, h·f, w·f], clamped to [-1, 1]
 * as diffusers does, T = 1 + (T_lat - 1)·temporal_factor. */
int  dg_vae_decode(const dg_vae *v, dg_vae_state *s, const float *latent, int T_lat, int h,
                   int w, float *pixels, char *err, size_t errlen);

#endif
