#include "latent_cache.h"

#include <stdlib.h>
#include <string.h>

#include "duogen.h"

typedef struct entry {
    struct entry *prev, *next;   /* LRU list, most recent first */
    dg_image_digest key;
    int      h, w;
    int64_t  n;
    float   *data;               /* owned [n] */
} entry;

struct dg_latent_cache {
    entry  *head, *tail;
    size_t  bytes, max_bytes;
    int64_t hits, misses;
};

int dg_latent_cache_new(size_t max_bytes, dg_latent_cache **out) {
    *out = calloc(1, sizeof **out);
    if (!*out) return DG_ENOMEM;
    (*out)->max_bytes = max_bytes;
    return 0;
}

static void unlink_entry(dg_latent_cache *c, entry *e) {
    if (e->prev) e->prev->next = e->next; else c->head = e->next;
    if (e->next) e->next->prev = e->prev; else c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void push_front(dg_latent_cache *c, entry *e) {
    e->next = c->head;
    e->prev = NULL;
    if (c->head) c->head->prev = e; else c->tail = e;
    c->head = e;
}

static void drop(dg_latent_cache *c, entry *e) {
    unlink_entry(c, e);
    c->bytes -= (size_t)e->n * sizeof(float);
    free(e->data);
    free(e);
}

void dg_latent_cache_free(dg_latent_cache *c) {
    if (!c) return;
    while (c->head) drop(c, c->head);
    free(c);
}

static entry *find(dg_latent_cache *c, const dg_image_digest *key, int h, int w, int64_t n) {
    for (entry *e = c->head; e; e = e->next)   /* a few dozen entries: a list is enough */
        if (e->h == h && e->w == w && e->n == n && !memcmp(&e->key, key, sizeof *key)) return e;
    return NULL;
}

const float *dg_latent_cache_get(dg_latent_cache *c, const dg_image_digest *key, int h, int w, int64_t n) {
    entry *e = find(c, key, h, w, n);
    if (!e) {
        c->misses++;
        return NULL;
    }
    c->hits++;
    unlink_entry(c, e);
    push_front(c, e);
    return e->data;
}

int dg_latent_cache_put(dg_latent_cache *c, const dg_image_digest *key, int h, int w, const float *latent, int64_t n) {
    size_t size = (size_t)n * sizeof(float);
    if (size > c->max_bytes) return 0;
    entry *e = find(c, key, h, w, n);
    if (e) {
        unlink_entry(c, e);
        push_front(c, e);
        return 0;
    }
    while (c->tail && c->bytes + size > c->max_bytes) drop(c, c->tail);
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
    push_front(c, e);
    c->bytes += size;
    return 0;
}

void dg_latent_cache_counters(const dg_latent_cache *c, int64_t *hits, int64_t *misses, size_t *bytes) {
    *hits = c->hits;
    *misses = c->misses;
    *bytes = c->bytes;
}
