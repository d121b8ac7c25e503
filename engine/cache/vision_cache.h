/* vision_cache.h — the vision cache (docs/DESIGN.md §6): an LRU map from an image's content hash
 * and patch grid to the vision tower's output for it, bounded in bytes, with hit, miss
 * and eviction counters; and dg_vision_encode, which takes a request's images through it.
 *
 *     dg_vision_cache *vc;
 *     dg_vision_cache_new(256 << 20, &vc);                       // 256 MiB of embeddings
 *     const dg_image *imgs[2] = {a, b};
 *     int computed;
 *     dg_vision_encode(&vm, vs, vc, &pp, imgs, 2, emb, &computed, err, sizeof err);
 *     // emb (backend memory) [tokens of a ; tokens of b, O]; computed: images the tower ran on
 *     dg_vision_cache_free(vc);
 *
 * Entries are host copies (the tower's rows downloaded once); a hit uploads them into the
 * caller's buffer. The key includes the patch grid, so one picture preprocessed to two
 * sizes (other min/max pixels) is two entries. Not thread-safe: one scheduler owns it. */
#ifndef DG_VISION_CACHE_H
#define DG_VISION_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "io/image.h"
#include "io/image_preprocess.h"
#include "mllm/vision.h"

typedef struct dg_vision_cache dg_vision_cache;

typedef struct {
    int64_t hits, misses, evictions;
    size_t  bytes;            /* embedding bytes held */
    size_t  max_bytes;
    int     n_entries;
} dg_vision_cache_counters;

/* A cache that holds at most max_bytes of embeddings. DG_ENOMEM. */
int  dg_vision_cache_new(size_t max_bytes, dg_vision_cache **out);
void dg_vision_cache_free(dg_vision_cache *c);   /* accepts NULL */

/* The cached rows [*n_tokens, *width] of (key, grid), most recently used from now on;
 * borrowed until the next put or free. NULL on a miss. Counts a hit or a miss. */
const float *dg_vision_cache_get(dg_vision_cache *c, const dg_image_digest *key,
                                 const int32_t grid[3], int *n_tokens, int *width);

/* Stores a copy of the backend rows src [n_tokens, width] under (key, grid), evicting the
 * least recently used entries until it fits. An entry larger than the whole budget is not
 * stored (returns 0: caching is best effort). A key already present is refreshed only.
 * DG_ENOMEM. */
int  dg_vision_cache_put(dg_vision_cache *c, const dg_image_digest *key, const int32_t grid[3],
                         dg_backend *be, const float *src, int n_tokens, int width);

void dg_vision_cache_stats(const dg_vision_cache *c, dg_vision_cache_counters *out);

/* The vision embeddings of a request's n images into out (memory of s's backend)
 * [Σ tokens, out_hidden], image after image: each image's rows come from the cache when
 * present; the others are preprocessed (pp) and run through the tower, as many at once as
 * the state holds, and then cached; a picture repeated within the call (same content and
 * grid) runs once, its later places get copies of its rows. cache may be NULL (no
 * caching). *n_computed (may be NULL) = images the tower ran on. Errors as dg_image_patches_new and dg_vision_forward
 * (DG_ELIMIT: one image has more patches than the state holds). */
int  dg_vision_encode(const dg_vision *m, dg_vision_state *s, dg_vision_cache *cache,
                      const dg_image_preprocess_config *pp, const dg_image *const *images, int n,
                      float *out, int *n_computed, char *err, size_t errlen);

#endif
