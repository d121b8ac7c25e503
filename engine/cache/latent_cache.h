/* latent_cache.h — the latent cache (docs/DESIGN.md §6): an LRU map from an image's content hash
 * and latent size to its VAE latent, bounded in bytes, with hit and miss counters. A
 * condition image seen before (an input image of an earlier job, or an image this engine
 * drew: its pixels, as the job received them, are VAE-encoded once and stored) is not
 * VAE-encoded again.
 * Entries are host copies. Not thread-safe: one scheduler owns it. */
#ifndef DG_LATENT_CACHE_H
#define DG_LATENT_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "io/image.h"

typedef struct dg_latent_cache dg_latent_cache;

int  dg_latent_cache_new(size_t max_bytes, dg_latent_cache **out);
void dg_latent_cache_free(dg_latent_cache *c);   /* accepts NULL */
/* The latent [n] of (key, h, w), or NULL; counts a hit or a miss. Borrowed until the next put. */
const float *dg_latent_cache_get(dg_latent_cache *c, const dg_image_digest *key, int h, int w, int64_t n);
/* Stores a copy, evicting least recently used entries to fit; an entry larger than the
 * budget is not stored. 0 or DG_ENOMEM. */
int  dg_latent_cache_put(dg_latent_cache *c, const dg_image_digest *key, int h, int w, const float *latent,
                         int64_t n);
void dg_latent_cache_counters(const dg_latent_cache *c, int64_t *hits, int64_t *misses, size_t *bytes);

#endif
