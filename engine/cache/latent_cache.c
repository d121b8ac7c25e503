#include "cache/latent_cache.h"

#include <stdlib.h>
#include <string.h>

#include "duogen.h"
#include "cache/lru.h"

typedef struct entry {
    dg_lru_node lru;             /* first member: the node is the entry */
    dg_image_digest key;
    int      h, w;
    int64_t  n;
    float   *data;               /* owned [n] */
} entry;

struct dg_latent_cache {
    dg_lru  lru;                 /* owns the entries, most recent first */
    size_t  bytes, max_bytes;
    int64_t hits, misses;
};

int dg_latent_cache_new(size_t max_bytes, dg_latent_cache **out) {
    *out = calloc(1, sizeof **out);
    if (!*out) return DG_ENOMEM;
    (*out)->max_bytes = max_bytes;
    return 0;
}

static void drop(dg_latent_cache *c, entry *e) {
    dg_lru_unlink(&c->lru, &e->lru);
    c->bytes -= (size_t)e->n * sizeof(float);
    free(e->data);
    free(e);
}

void dg_latent_cache_free(dg_latent_cache *c) {
    if (!c) return;
    while (c->lru.head) drop(c, (entry *)c->lru.head);
    free(c);
}

static entry *find(dg_latent_cache *c, const dg_image_digest *key, int h, int w, int64_t n) {
    for (dg_lru_node *node = c->lru.head; node; node = node->next) {   /* a few dozen entries */
        entry *e = (entry *)node;
        if (e->h == h && e->w == w && e->n == n && !memcmp(&e->key, key, sizeof *key)) return e;
    }
    return NULL;
}

const float *dg_latent_cache_get(dg_latent_cache *c, const dg_image_digest *key, int h, int w, int64_t n) {
    entry *e = find(c, key, h, w, n);
    if (!e) {
        c->misses++;
        return NULL;
    }
    c->hits++;
    dg_lru_touch(&c->lru, &e->lru);
    return e->data;
}

int dg_latent_cache_put(dg_latent_cache *c, const dg_image_digest *key, int h, int w, const float *latent, int64_t n) {
    size_t size = (size_t)n * sizeof(float);
    if (size > c->max_bytes) return 0;
    entry *e = find(c, key, h, w, n);
    if (e) {
        dg_lru_touch(&c->lru, &e->lru);
        return 0;
    }
    while (c->lru.tail && c->bytes + size > c->max_bytes) drop(c, (entry *)c->lru.tail);
    e = calloc(1, sizeof *e);
    if (!e || !(e->data = malloc(size))) {
        free(e);
        return DG_ENOMEM;
    }
    e->key = *key;
    e->h = h;
    e->w = w;
    e->n = n;
    memcpy(e->data, latent, size);
    dg_lru_push_front(&c->lru, &e->lru);
    c->bytes += size;
    return 0;
}

void dg_latent_cache_counters(const dg_latent_cache *c, int64_t *hits, int64_t *misses, size_t *bytes) {
    *hits = c->hits;
    *misses = c->misses;
    *bytes = c->bytes;
}
