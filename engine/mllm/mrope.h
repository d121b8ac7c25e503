/* mrope.h — Qwen2.5-VL multimodal rotary positions (docs/specs/qwen2_5_vl.md §3.4): transformers'
 * get_rope_index for text and images, and the decode-time delta.
 *
 *     int32_t pos[3 * n]; int next;
 *     dg_mrope_index(ids, n, 0, &(dg_mrope_params){cfg.text.image_token_id, 2},
 *                    grids, n_images, pos, &next, err, sizeof err);
 *     // prefill with dg_qwen2_input.pos = pos; then every decode step with pos = NULL and
 *     // rope_delta = dg_mrope_delta(next, n): position of cache index p = p + rope_delta
 *
 * Text tokens take consecutive positions in all three rows. An image of patch grid
 * (t, h, w) takes its t·(h/m)·(w/m) <|image_pad|> tokens: token (ti, r, c) gets
 * (start + ti, start + r, start + c), where start is the position the first image token
 * would have had as text; the token after the image gets start + max(h/m, w/m) (the
 * largest position so far + 1; still images have t = 1). Each image must be one run of
 * exactly its token count of image_token_id.
 *
 * A continuation (tokens appended after n_past cached ones, e.g. a generated image)
 * starts at `first` = n_past + rope_delta: the same positions transformers computes for
 * the whole sequence at once. */
#ifndef DG_MROPE_H
#define DG_MROPE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int32_t image_token_id;      /* <|image_pad|> */
    int32_t merge_size;          /* vision spatial_merge_size */
} dg_mrope_params;

/* pos [3, n] (rows t, h, w) for ids[0..n-1]; the first token's text position is `first`;
 * grids[i] = the patch grid (t, h, w) of the i-th image, in order of appearance.
 * *next = the largest position + 1. DG_EINVAL with a message when the image tokens do
 * not match the grids (count, run length, grid not a multiple of the merge size). */
int dg_mrope_index(const int32_t *ids, int n, int first, const dg_mrope_params *p,
                   const int32_t (*grids)[3], int n_images, int32_t *pos, int *next, char *err,
                   size_t errlen);

/* The delta of later positions: position of the token at cache index p is p + delta, for
 * a sequence of n_tokens whose positions end at next - 1. */
static inline int dg_mrope_delta(int next, int n_tokens) { return next - n_tokens; }

#endif
