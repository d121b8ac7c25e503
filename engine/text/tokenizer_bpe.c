/* tokenizer_bpe.c — BPE by merge rank over one pre-token, as the tokenizers library's
 * Word::merge_all does it: every adjacent pair that has a merge goes into a min-heap
 * keyed by (rank, position); the lowest rank merges first and, among equal ranks (the
 * same pair), the leftmost. Each position remembers the rank of the pair that starts
 * there now, so a heap entry whose rank differs is stale. O(n log n) in the word's
 * length, so a megabyte-long word is no attack.
 *
 * Short words are memoised in dg_tok.memo (the reference keeps a cache too): the memo
 * holds only what BPE would compute again, so a hit or a miss never changes a result. */
#include "text/tokenizer_internal.h"
#include "duogen.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t pair_hash(uint32_t a, uint32_t b) {
    uint64_t h = ((uint64_t)a << 32 | b) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
}

int dg_tok_merges_build(dg_tok *t, const dg_tok_files *f, char *err, size_t errlen) {
    size_t size = 1024;
    while (size < f->n_merges + f->n_merges / 3) size *= 2;   /* load factor <= 3/4 */
    t->merges = malloc(size * sizeof *t->merges);
    t->byte_pairs = malloc(256 * 256 * sizeof *t->byte_pairs);
    if (!t->merges || !t->byte_pairs) {
        snprintf(err, errlen, "tokenizer: out of memory for %zu merges", f->n_merges);
        return DG_ENOMEM;
    }
    memset(t->merges, 0xFF, size * sizeof *t->merges);
    memset(t->byte_pairs, 0xFF, 256 * 256 * sizeof *t->byte_pairs);
    t->merge_mask = (uint32_t)(size - 1);
    for (size_t r = 0; r < f->n_merges; r++) {
        uint32_t a = f->pairs[r][0], b = f->pairs[r][1];
        uint32_t i = (uint32_t)pair_hash(a, b) & t->merge_mask;
        while (t->merges[i].a != UINT32_MAX && (t->merges[i].a != a || t->merges[i].b != b))
            i = (i + 1) & t->merge_mask;
        /* a pair listed twice keeps its last rank, as the reference's hash map does */
        t->merges[i] = (dg_tok_merge){a, b, (uint32_t)r, f->merged[r]};
    }
    for (int b = 0; b < 256 * 256; b++) {
        dg_tok_merge *m = &t->byte_pairs[b];
        if (dg_tok_merge_find(t, t->byte_id[b >> 8], t->byte_id[b & 0xFF], &m->rank, &m->id)) {
            m->a = (uint32_t)t->byte_id[b >> 8];
            m->b = (uint32_t)t->byte_id[b & 0xFF];
        }
    }
    return 0;
}

bool dg_tok_merge_find(const dg_tok *t, int32_t a, int32_t b, uint32_t *rank, int32_t *id) {
    uint32_t i = (uint32_t)pair_hash((uint32_t)a, (uint32_t)b) & t->merge_mask;
    for (;;) {
        const dg_tok_merge *m = &t->merges[i];
        if (m->a == (uint32_t)a && m->b == (uint32_t)b) {
            *rank = m->rank;
            *id = m->id;
            return true;
        }
        if (m->a == UINT32_MAX) return false;
        i = (i + 1) & t->merge_mask;
    }
}

int dg_tok_ids_reserve(dg_tok_ids *ids, size_t more) {
    if (ids->n + more <= ids->cap) return 0;
    size_t cap = ids->cap ? ids->cap : 64;
    while (cap < ids->n + more) cap *= 2;
    int32_t *p = realloc(ids->ids, cap * sizeof *p);
    if (!p) return DG_ENOMEM;
    ids->ids = p;
    ids->cap = cap;
    return 0;
}

int dg_tok_ids_push(dg_tok_ids *ids, int32_t id) {
    if (dg_tok_ids_reserve(ids, 1) < 0) return DG_ENOMEM;
    ids->ids[ids->n++] = id;
    return 0;
}

void dg_tok_ids_free(dg_tok_ids *ids) {
    if (!ids) return;
    free(ids->ids);
    *ids = (dg_tok_ids){0};
}

static int scratch_reserve(dg_tok_bpe_scratch *s, size_t n) {
    if (n <= s->cap) return 0;
    size_t cap = s->cap ? s->cap : 256;
    while (cap < n) cap *= 2;
    int32_t *sym = realloc(s->sym, cap * sizeof *sym);
    if (!sym) return DG_ENOMEM;
    s->sym = sym;
    int32_t *prev = realloc(s->prev, cap * sizeof *prev);
    if (!prev) return DG_ENOMEM;
    s->prev = prev;
    int32_t *next = realloc(s->next, cap * sizeof *next);
    if (!next) return DG_ENOMEM;
    s->next = next;
    uint32_t *rank = realloc(s->rank, cap * sizeof *rank);
    if (!rank) return DG_ENOMEM;
    s->rank = rank;
    int32_t *merged = realloc(s->merged, cap * sizeof *merged);
    if (!merged) return DG_ENOMEM;
    s->merged = merged;
    uint64_t *heap = realloc(s->heap, 3 * cap * sizeof *heap);
    if (!heap) return DG_ENOMEM;
    s->heap = heap;
    s->cap = cap;
    return 0;
}

void dg_tok_bpe_scratch_free(dg_tok_bpe_scratch *s) {
    free(s->sym);
    free(s->prev);
    free(s->next);
    free(s->rank);
    free(s->merged);
    free(s->heap);
    *s = (dg_tok_bpe_scratch){0};
}

static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0 && h[(i - 1) / 2] > v) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
    return top;
}

/* Looks up the pair that now starts at position p, remembers it, and queues its merge. */
static void pair_update(const dg_tok *t, dg_tok_bpe_scratch *s, size_t *n_heap, int32_t p) {
    if (p < 0) return;
    s->rank[p] = UINT32_MAX;
    if (s->next[p] >= 0 && dg_tok_merge_find(t, s->sym[p], s->sym[s->next[p]], &s->rank[p], &s->merged[p]))
        heap_push(s->heap, n_heap, (uint64_t)s->rank[p] << 32 | (uint32_t)p);
}

static uint64_t memo_hash(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
        p += 8;
        n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, p, n);
    h = (h ^ v) * 0x94D049BB133111EBull;
    return h ^ (h >> 29);
}

int dg_tok_bpe_word(const dg_tok *t, dg_tok_bpe_scratch *s, const uint8_t *w, size_t n,
                    dg_tok_ids *out) {
    if (dg_tok_ids_reserve(out, n) < 0) return DG_ENOMEM;
    if (n == 1) {
        out->ids[out->n++] = t->byte_id[w[0]];
        return 0;
    }
    dg_tok_memo_slot *slot = NULL;
    uint64_t hash = 0;
    if (s->memo && n <= DG_TOK_MEMO_BYTES) {
        hash = memo_hash(w, n);
        slot = &t->memo[hash & (DG_TOK_MEMO_SLOTS - 1)];
        if (slot->hash == hash && slot->len == n && !memcmp(slot->bytes, w, n)) {
            memcpy(out->ids + out->n, slot->ids, slot->n_ids * sizeof(int32_t));
            out->n += slot->n_ids;
            return 0;
        }
    }
    if (n > INT32_MAX || scratch_reserve(s, n) < 0) return DG_ENOMEM;

    size_t n_heap = 0;
    for (size_t i = 0; i < n; i++) {
        s->sym[i] = t->byte_id[w[i]];
        s->prev[i] = (int32_t)i - 1;
        s->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        s->rank[i] = UINT32_MAX;
        if (i + 1 < n) {
            const dg_tok_merge *m = &t->byte_pairs[w[i] << 8 | w[i + 1]];
            s->rank[i] = m->rank;
            s->merged[i] = m->id;
            if (m->rank != UINT32_MAX) heap_push(s->heap, &n_heap, (uint64_t)m->rank << 32 | i);
        }
    }
    while (n_heap > 0) {
        uint64_t top = heap_pop(s->heap, &n_heap);
        int32_t p = (int32_t)(uint32_t)top;
        if (s->sym[p] < 0 || s->rank[p] != top >> 32) continue;   /* stale: a side merged since */
        int32_t q = s->next[p];
        s->sym[p] = s->merged[p];
        s->sym[q] = -1;
        s->next[p] = s->next[q];
        if (s->next[q] >= 0) s->prev[s->next[q]] = p;
        pair_update(t, s, &n_heap, s->prev[p]);
        pair_update(t, s, &n_heap, p);
    }

    size_t first = out->n;
    for (int32_t p = 0; p >= 0; p = s->next[p]) out->ids[out->n++] = s->sym[p];
    size_t n_ids = out->n - first;
    if (slot && n_ids <= DG_TOK_MEMO_IDS) {
        slot->hash = hash;
        slot->len = (uint8_t)n;
        slot->n_ids = (uint8_t)n_ids;
        memcpy(slot->bytes, w, n);
        memcpy(slot->ids, out->ids + first, n_ids * sizeof(int32_t));
    }
    return 0;
}
