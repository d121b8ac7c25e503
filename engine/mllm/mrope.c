/* mrope.c — get_rope_index for text and images (docs/specs/qwen2_5_vl.md §3.4). */
#include "mllm/mrope.h"

#include <stdio.h>

#include "duogen.h"

int dg_mrope_index(const int32_t *ids, int n, int first, const dg_mrope_params *p,
                   const int32_t (*grids)[3], int n_images, int32_t *pos, int *next, char *err,
                   size_t errlen) {
    int32_t *pt = pos, *ph = pos + n, *pw = pos + 2 * n;
    int cur = first, img = 0, i = 0;
    while (i < n) {
        if (ids[i] != p->image_token_id) {
            pt[i] = ph[i] = pw[i] = cur++;
            i++;
            continue;
        }
        if (img >= n_images) {
            snprintf(err, errlen, "mrope: image tokens at %d but only %d images", i, n_images);
            return DG_EINVAL;
        }
        const int32_t *g = grids[img];
        if (g[0] < 1 || g[1] < p->merge_size || g[2] < p->merge_size || g[1] % p->merge_size ||
            g[2] % p->merge_size) {
            snprintf(err, errlen, "mrope: image %d has grid %dx%dx%d", img, g[0], g[1], g[2]);
            return DG_EINVAL;
        }
        const int H = g[1] / p->merge_size, W = g[2] / p->merge_size;
        const int64_t count = (int64_t)g[0] * H * W;
        int run = 0;
        while (i + run < n && ids[i + run] == p->image_token_id) run++;
        if (run != count) {
            snprintf(err, errlen, "mrope: image %d (grid %dx%dx%d) needs %lld tokens, the run at %d has %d",
                     img, g[0], g[1], g[2], (long long)count, i, run);
            return DG_EINVAL;
        }
        for (int k = 0; k < run; k++) {
            pt[i + k] = cur + k / (H * W);
            ph[i + k] = cur + k % (H * W) / W;
            pw[i + k] = cur + k % W;
        }
        cur += H > W ? H : W;   /* transformers 5.24: max(h, w) / m, whatever t is */
        i += run;
        img++;
    }
    if (img != n_images) {
        snprintf(err, errlen, "mrope: %d images given, %d found in the tokens", n_images, img);
        return DG_EINVAL;
    }
    *next = cur;
    return 0;
}
