/* vision_cache.c — LRU of vision-tower outputs, and the cached encoding of a request's images. */
#include "cache/vision_cache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"
#include "cache/lru.h"

typedef struct entry entry;
struct entry {
    dg_lru_node     lru;           /* first member: the node is the entry */
    dg_image_digest key;
    int32_t         grid[3];
    int             n_tokens, width;
    size_t          bytes;         /* of rows */
    float           rows[];        /* [n_tokens, width] */
};

struct dg_vision_cache {
    dg_lru  lru;                   /* owns the entries */
    size_t  max_bytes, bytes;
    int     n_entries;
    int64_t hits, misses, evictions;
};

int dg_vision_cache_new(size_t max_bytes, dg_vision_cache **out) {
    dg_vision_cache *c = calloc(1, sizeof *c);
    *out = c;
    if (!c) return DG_ENOMEM;
    c->max_bytes = max_bytes;
    return 0;
}

void dg_vision_cache_free(dg_vision_cache *c) {
    if (!c) return;
    for (dg_lru_node *n = c->lru.head, *nx; n; n = nx) {
        nx = n->next;
        free(n);
    }
    free(c);
}

/* A linear scan: entries are a few hundred at most (each is an image's worth of rows). */
static entry *lookup(const dg_vision_cache *c, const dg_image_digest *key, const int32_t grid[3]) {
    for (dg_lru_node *n = c->lru.head; n; n = n->next) {
        entry *e = (entry *)n;
        if (!memcmp(&e->key, key, sizeof *key) && e->grid[0] == grid[0] && e->grid[1] == grid[1] &&
            e->grid[2] == grid[2])
            return e;
    }
    return NULL;
}

const float *dg_vision_cache_get(dg_vision_cache *c, const dg_image_digest *key,
                                 const int32_t grid[3], int *n_tokens, int *width) {
    entry *e = lookup(c, key, grid);
    if (!e) {
        c->misses++;
        return NULL;
    }
    c->hits++;
    dg_lru_touch(&c->lru, &e->lru);
    *n_tokens = e->n_tokens;
    *width = e->width;
    return e->rows;
}

int dg_vision_cache_put(dg_vision_cache *c, const dg_image_digest *key, const int32_t grid[3],
                        dg_backend *be, const float *src, int n_tokens, int width) {
    const size_t bytes = sizeof(float) * (size_t)n_tokens * (size_t)width;
    entry *e = lookup(c, key, grid);
    if (e) {
        dg_lru_touch(&c->lru, &e->lru);
        return 0;
    }
    if (bytes > c->max_bytes) return 0;
    while (c->bytes + bytes > c->max_bytes) {
        entry *old = (entry *)c->lru.tail;
        dg_lru_unlink(&c->lru, &old->lru);
        c->bytes -= old->bytes;
        c->n_entries--;
        c->evictions++;
        free(old);
    }
    if (!(e = malloc(sizeof *e + bytes))) return DG_ENOMEM;
    e->key = *key;
    memcpy(e->grid, grid, sizeof e->grid);
    e->n_tokens = n_tokens;
    e->width = width;
    e->bytes = bytes;
    be->download(be, e->rows, src, (int64_t)n_tokens * width);
    dg_lru_push_front(&c->lru, &e->lru);
    c->bytes += bytes;
    c->n_entries++;
    return 0;
}

void dg_vision_cache_stats(const dg_vision_cache *c, dg_vision_cache_counters *out) {
    *out = (dg_vision_cache_counters){c->hits, c->misses, c->evictions, c->bytes, c->max_bytes,
                                   c->n_entries};
}

/* ---- a request's images ------------------------------------------------------------------- */

/* Images waiting for one tower call; their rows go to out from row `first` on. */
typedef struct {
    dg_image_patches **patches;    /* owned entries: [n] */
    dg_image_digest   *keys;       /* [n] */
    int                n, n_patches;
    int64_t            first;
} batch;

static int flush(const dg_vision *m, dg_vision_state *s, dg_vision_cache *cache, batch *b,
                 float *out, int *computed, char *err, size_t errlen) {
    const int O = m->cfg.out_hidden_size;
    int rc = 0;
    if (b->n == 0) return 0;
    rc = dg_vision_forward(m, s, (const dg_image_patches *const *)b->patches, b->n,
                           out + b->first * O, err, errlen);
    int64_t row = b->first;
    for (int i = 0; i < b->n; i++) {
        const dg_image_patches *p = b->patches[i];
        const int32_t grid[3] = {p->grid_t, p->grid_h, p->grid_w};
        const int n_tok = dg_vision_tokens(m, p->grid_t, p->grid_h, p->grid_w);
        if (rc == 0 && cache &&
            (rc = dg_vision_cache_put(cache, &b->keys[i], grid, s->be, out + row * O, n_tok, O)) < 0)
            snprintf(err, errlen, "vision cache: out of memory");
        row += n_tok;
        dg_image_patches_free(b->patches[i]);
        b->patches[i] = NULL;
    }
    if (rc == 0) *computed += b->n;
    b->n = b->n_patches = 0;
    return rc;
}

/* Copies the rows of an image seen earlier in the same call (its n_tok rows from row src)
 * to row dst of out, on the state's backend: idx is scratch for the row numbers. */
static void copy_rows(const dg_vision *m, const dg_vision_state *s, float *out, int64_t src, int64_t dst, int n_tok,
                      int32_t *idx) {
    const int O = m->cfg.out_hidden_size;
    for (int i0 = 0; i0 < n_tok; i0 += 4096) {
        const int k = n_tok - i0 < 4096 ? n_tok - i0 : 4096;
        for (int i = 0; i < k; i++) idx[i] = i0 + i;
        s->be->gather_rows(s->be, out + (dst + i0) * O, out + src * O, idx, k, O);
    }
}

int dg_vision_encode(const dg_vision *m, dg_vision_state *s, dg_vision_cache *cache,
                     const dg_image_preprocess_config *pp, const dg_image *const *images, int n,
                     float *out, int *n_computed, char *err, size_t errlen) {
    const int O = m->cfg.out_hidden_size;
    batch b = {0};
    int64_t row = 0;
    int computed = 0, rc = 0, n_dup = 0;
    /* per image: its key, grid and first row, so that a repeat within the call (the same
     * picture twice in one request) copies the first one's rows instead of running the
     * tower again; the copies wait until every batch has run */
    dg_image_digest *keys = calloc((size_t)n, sizeof *keys);
    int32_t (*grids)[3] = calloc((size_t)n, sizeof *grids), *idx = malloc(sizeof(int32_t) * 4096);
    int64_t *rows_at = calloc((size_t)n, sizeof *rows_at), (*dups)[3] = calloc((size_t)n, sizeof *dups);
    b.patches = calloc((size_t)n, sizeof *b.patches);
    b.keys = calloc((size_t)n, sizeof *b.keys);
    if (!b.patches || !b.keys || !keys || !grids || !idx || !rows_at || !dups) {
        rc = DG_ENOMEM;
        snprintf(err, errlen, "vision: out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        int32_t *grid = grids[i];
        dg_image_digest *key = &keys[i];
        int n_tok, width;
        if ((rc = dg_image_grid(images[i]->height, images[i]->width, pp, grid, err, errlen)) < 0)
            goto out;
        dg_image_hash(images[i], key);
        rows_at[i] = row;
        int j = 0;
        while (j < i && (memcmp(&keys[j], key, sizeof *key) || memcmp(grids[j], grid, sizeof grids[j]))) j++;
        if (j < i) {   /* a batch's rows are contiguous: it runs before this gap */
            if ((rc = flush(m, s, cache, &b, out, &computed, err, errlen)) < 0) goto out;
            const int nt = dg_vision_tokens(m, grid[0], grid[1], grid[2]);
            dups[n_dup][0] = rows_at[j];
            dups[n_dup][1] = row;
            dups[n_dup++][2] = nt;
            row += nt;
            continue;
        }
        const float *rows = cache ? dg_vision_cache_get(cache, key, grid, &n_tok, &width) : NULL;
        if (rows && width == O) {
            /* the hit's rows first: the flush stores the waiting batch, which may evict this
             * very entry (its rows lie after the batch's, so the order does not matter to out) */
            s->be->upload(s->be, out + row * O, rows, (int64_t)n_tok * O);
            if ((rc = flush(m, s, cache, &b, out, &computed, err, errlen)) < 0) goto out;
            row += n_tok;
            continue;
        }
        dg_image_patches *p;
        if ((rc = dg_image_patches_new(images[i], pp, &p, err, errlen)) < 0) goto out;
        const int np = p->grid_t * p->grid_h * p->grid_w;
        if (np > s->max_patches) {
            dg_image_patches_free(p);
            snprintf(err, errlen, "vision: image %d has %d patches, the state holds %d", i, np,
                     s->max_patches);
            rc = DG_ELIMIT;
            goto out;
        }
        if (b.n_patches + np > s->max_patches &&
            (rc = flush(m, s, cache, &b, out, &computed, err, errlen)) < 0) {
            dg_image_patches_free(p);
            goto out;
        }
        if (b.n == 0) b.first = row;
        b.patches[b.n] = p;
        b.keys[b.n++] = *key;
        b.n_patches += np;
        row += dg_vision_tokens(m, p->grid_t, p->grid_h, p->grid_w);
    }
    rc = flush(m, s, cache, &b, out, &computed, err, errlen);
    for (int d = 0; rc == 0 && d < n_dup; d++) copy_rows(m, s, out, dups[d][0], dups[d][1], (int)dups[d][2], idx);
out:
    for (int i = 0; b.patches && i < b.n; i++) dg_image_patches_free(b.patches[i]);
    free(b.patches);
    free(b.keys);
    free(keys);
    free(grids);
    free(idx);
    free(rows_at);
    free(dups);
    if (n_computed) *n_computed = computed;
    return rc;
}
