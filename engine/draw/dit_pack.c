/* dit_pack.c — packed frame layout, 3-D RoPE tables, patchify and unpatchify. */
#include "draw/dit_pack.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "duogen.h"

int dg_dit_layout_build(dg_dit_layout *L, const int *h, const int *w, const int *condition,
                        int n_frames, int channels, int patch_h, int patch_w, char *err,
                        size_t errlen) {
    memset(L, 0, sizeof *L);
    if (n_frames < 1 || n_frames > DG_DIT_MAX_FRAMES) {
        snprintf(err, errlen, "dit: %d frames (1 .. %d)", n_frames, DG_DIT_MAX_FRAMES);
        return DG_EINVAL;
    }
    L->n_frames = n_frames;
    L->patch_h = patch_h;
    L->patch_w = patch_w;
    for (int f = 0; f < n_frames; f++) {
        if (h[f] < patch_h || w[f] < patch_w || h[f] % patch_h || w[f] % patch_w) {
            snprintf(err, errlen, "dit: frame %d is %dx%d latents, not a multiple of the %dx%d patch",
                     f, h[f], w[f], patch_h, patch_w);
            return DG_EINVAL;
        }
        dg_dit_frame_meta *m = &L->frames[f];
        m->h = h[f];
        m->w = w[f];
        m->t_index = f;
        m->condition = condition[f] != 0;
        m->token0 = L->n_tokens;
        m->n_tokens = (int64_t)(h[f] / patch_h) * (w[f] / patch_w);
        L->n_tokens += m->n_tokens;
        L->n_latent += (int64_t)channels * h[f] * w[f];
    }
    return 0;
}

int dg_dit_layout_same(const dg_dit_layout *a, const dg_dit_layout *b) {
    return a->n_frames == b->n_frames && a->patch_h == b->patch_h && a->patch_w == b->patch_w &&
           memcmp(a->frames, b->frames, (size_t)a->n_frames * sizeof a->frames[0]) == 0;
}

void dg_dit_rope_table(const dg_dit_layout *L, int head_dim, const float rope_scale[3],
                       float *cos_t, float *sin_t) {
    const int dim_h = head_dim / 6 * 2, dim_w = dim_h, dim_t = head_dim - dim_h - dim_w;
    const int half = head_dim / 2;
    double freq[256];   /* head_dim <= 512 */
    const int dims[3] = {dim_t, dim_h, dim_w};
    int j = 0;
    for (int a = 0; a < 3; a++) {
        const double theta = 10000.0 * pow(rope_scale[a], (double)dims[a] / (dims[a] - 2));
        for (int k = 0; k < dims[a] / 2; k++) freq[j++] = 1.0 / pow(theta, (double)(2 * k) / dims[a]);
    }
    for (int f = 0; f < L->n_frames; f++) {
        const dg_dit_frame_meta *m = &L->frames[f];
        const int wp = m->w / L->patch_w;
        for (int64_t i = 0; i < m->n_tokens; i++) {
            const double pos[3] = {m->t_index, (double)(i / wp), (double)(i % wp)};
            float *c = cos_t + (m->token0 + i) * half, *s = sin_t + (m->token0 + i) * half;
            for (int k = 0; k < half; k++) {
                /* diffusers computes the angle in float32: position × float32 frequency */
                const int axis = k < dim_t / 2 ? 0 : k < dim_t / 2 + dim_h / 2 ? 1 : 2;
                const float ang = (float)pos[axis] * (float)freq[k];
                c[k] = cosf(ang);
                s[k] = sinf(ang);
            }
        }
    }
}

void dg_dit_patchify(const dg_dit_layout *L, int f, const float *latent, int channels,
                     float *tokens) {
    const dg_dit_frame_meta *m = &L->frames[f];
    const int ph = L->patch_h, pw = L->patch_w, wp = m->w / pw, pp = ph * pw;
    const int in_dim = (channels + 2) * pp;
    for (int64_t i = 0; i < m->n_tokens; i++) {
        const int y0 = (int)(i / wp) * ph, x0 = (int)(i % wp) * pw;
        float *row = tokens + (m->token0 + i) * in_dim;
        for (int c = 0; c < channels; c++)
            for (int a = 0; a < ph; a++)
                for (int b = 0; b < pw; b++)
                    row[c * pp + a * pw + b] = latent[((int64_t)c * m->h + y0 + a) * m->w + x0 + b];
        for (int k = 0; k < pp; k++) {
            row[channels * pp + k] = (float)m->condition;
            row[(channels + 1) * pp + k] = 0.0f;
        }
    }
}

void dg_dit_unpatchify(const dg_dit_layout *L, int f, const float *out, int channels,
                       float *latent) {
    const dg_dit_frame_meta *m = &L->frames[f];
    const int ph = L->patch_h, pw = L->patch_w, wp = m->w / pw;
    const int out_dim = channels * ph * pw;
    for (int64_t i = 0; i < m->n_tokens; i++) {
        const int y0 = (int)(i / wp) * ph, x0 = (int)(i % wp) * pw;
        const float *row = out + (m->token0 + i) * out_dim;
        for (int a = 0; a < ph; a++)
            for (int b = 0; b < pw; b++)
                for (int c = 0; c < channels; c++)
                    latent[((int64_t)c * m->h + y0 + a) * m->w + x0 + b] = row[(a * pw + b) * channels + c];
    }
}
