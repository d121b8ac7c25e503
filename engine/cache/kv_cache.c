/* kv_cache.c — block pool, chained block keys, reference counts and the LRU of cached blocks. */
#include "cache/kv_cache.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "duogen.h"

#define NONE (-1)

typedef struct {
    int      refs;         /* sequences holding the block */
    int      keyed;        /* 1: `key` is valid and the block is in the map */
    uint64_t key;          /* chained hash of all tokens up to the end of this block */
    int32_t  next_in_bucket;
    int32_t  prev, next;   /* free list (keyed == 0) or LRU (keyed, refs == 0) links */
} kv_block;

struct dg_kv_cache {
    dg_backend *be;            /* borrowed */
    int         n_layers, kv_dim, block_size, n_blocks;
    dg_dtype    dtype;         /* of k and v: F32, or BF16 (half the bytes) */
    void       *k, *v;         /* owned (backend memory): [n_layers, n_blocks * block_size, kv_dim] */
    kv_block   *blocks;        /* owned: [n_blocks] */
    int32_t    *buckets;       /* owned: [n_buckets] heads of key chains */
    int         n_buckets;     /* power of two */
    int32_t     free_head;     /* singly used as a stack through `next` */
    int         n_free;
    int32_t     lru_head, lru_tail;   /* least recently used first */
    int         n_cached;
    int         n_keyed;       /* blocks in the map: in use or in the LRU */
    int64_t     hits, misses;
};

/* splitmix64's finaliser: a strong 64-bit mix, identical on every machine. */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27; x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* The process's secret, mixed into every block key and image key: keys cannot be computed
 * outside the process, so two prompts or pictures whose keys collide cannot be searched
 * for offline (a 64-bit key of a known function falls to a birthday search of 2^32: a
 * picture made to collide with another user's was answered from that user's KV). */
static uint64_t secret[2];
static pthread_once_t secret_once = PTHREAD_ONCE_INIT;

static void secret_init(void) {
    ssize_t got;
    do got = getrandom(secret, sizeof secret, GRND_NONBLOCK);   /* no wait for entropy at early boot */
    while (got < 0 && errno == EINTR);
    if (got == (ssize_t)sizeof secret) return;
    struct timespec ts;   /* no entropy source: still unknown outside, if weaker */
    clock_gettime(CLOCK_REALTIME, &ts);
    secret[0] = mix64((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)getpid() ^ (uint64_t)(uintptr_t)&ts);
    secret[1] = mix64(secret[0] ^ 0x9e3779b97f4a7c15ull);
}

static uint64_t the_secret(int i) {
    pthread_once(&secret_once, secret_init);
    return secret[i];
}

uint64_t dg_kv_image_key(const uint8_t digest[16]) {
    uint64_t lo, hi;
    memcpy(&lo, digest, 8);
    memcpy(&hi, digest + 8, 8);
    return mix64(mix64(lo ^ the_secret(1)) ^ hi) | 1;   /* all 128 bits; never 0, a text token's */
}

static uint64_t key_step(uint64_t h, int32_t token, uint64_t extra) {
    return mix64(h ^ the_secret(0) ^
                 mix64((uint64_t)(uint32_t)token + 0x9e3779b97f4a7c15ull + extra * 0x2545f4914f6cdd1dull));
}

static int32_t *bucket_of(dg_kv_cache *c, uint64_t key) {
    return &c->buckets[key & (uint64_t)(c->n_buckets - 1)];
}

static int32_t map_find(dg_kv_cache *c, uint64_t key) {
    for (int32_t b = *bucket_of(c, key); b != NONE; b = c->blocks[b].next_in_bucket)
        if (c->blocks[b].key == key) return b;
    return NONE;
}

static void map_remove(dg_kv_cache *c, int32_t id) {
    int32_t *p = bucket_of(c, c->blocks[id].key);
    while (*p != id) p = &c->blocks[*p].next_in_bucket;
    *p = c->blocks[id].next_in_bucket;
    c->blocks[id].keyed = 0;
    c->n_keyed--;
}

static void lru_unlink(dg_kv_cache *c, int32_t id) {
    kv_block *b = &c->blocks[id];
    if (b->prev != NONE) c->blocks[b->prev].next = b->next; else c->lru_head = b->next;
    if (b->next != NONE) c->blocks[b->next].prev = b->prev; else c->lru_tail = b->prev;
    b->prev = b->next = NONE;
    c->n_cached--;
}

static void lru_push(dg_kv_cache *c, int32_t id) {
    kv_block *b = &c->blocks[id];
    b->prev = c->lru_tail;
    b->next = NONE;
    if (c->lru_tail != NONE) c->blocks[c->lru_tail].next = id; else c->lru_head = id;
    c->lru_tail = id;
    c->n_cached++;
}

static void free_push(dg_kv_cache *c, int32_t id) {
    c->blocks[id].next = c->free_head;
    c->free_head = id;
    c->n_free++;
}

/* A block for a sequence: a free one, else the least recently used cached one. */
static int32_t block_take(dg_kv_cache *c) {
    int32_t id = c->free_head;
    if (id != NONE) {
        c->free_head = c->blocks[id].next;
        c->n_free--;
    } else if ((id = c->lru_head) != NONE) {
        lru_unlink(c, id);
        map_remove(c, id);
    } else {
        return NONE;
    }
    c->blocks[id].refs = 1;
    c->blocks[id].keyed = 0;
    c->blocks[id].next = c->blocks[id].prev = NONE;
    return id;
}

int dg_kv_cache_new(dg_backend *be, int n_layers, int kv_dim, int block_size, int n_blocks, dg_dtype dtype,
                    dg_kv_cache **out, char *err, size_t errlen) {
    dg_kv_cache *c = calloc(1, sizeof *c);
    *out = NULL;
    if (n_layers <= 0 || kv_dim <= 0 || block_size <= 0 || n_blocks <= 0) {
        free(c);
        snprintf(err, errlen, "kv cache: layers %d, kv_dim %d, block_size %d, blocks %d must be positive",
                 n_layers, kv_dim, block_size, n_blocks);
        return DG_EINVAL;
    }
    if (dtype != DG_DTYPE_F32 && !(dtype == DG_DTYPE_BF16 && be->kv_bf16)) {
        free(c);
        snprintf(err, errlen, "kv cache: the %s backend keeps KV in F32 only, not %s", be->name, dg_dtype_name(dtype));
        return DG_EINVAL;
    }
    if (!c) goto nomem;
    c->be = be;
    c->dtype = dtype;
    c->n_layers = n_layers;
    c->kv_dim = kv_dim;
    c->block_size = block_size;
    c->n_blocks = n_blocks;
    size_t elems = (size_t)n_layers * (size_t)n_blocks * (size_t)block_size * (size_t)kv_dim;
    for (c->n_buckets = 16; c->n_buckets < 2 * n_blocks; c->n_buckets *= 2) {}
    c->k = be->alloc(be, elems * dg_dtype_size(dtype));
    c->v = be->alloc(be, elems * dg_dtype_size(dtype));
    c->blocks = calloc((size_t)n_blocks, sizeof *c->blocks);
    c->buckets = malloc((size_t)c->n_buckets * sizeof *c->buckets);
    if (!c->k || !c->v || !c->blocks || !c->buckets) goto nomem;
    for (int i = 0; i < c->n_buckets; i++) c->buckets[i] = NONE;
    c->free_head = c->lru_head = c->lru_tail = NONE;
    for (int i = n_blocks - 1; i >= 0; i--) free_push(c, i);   /* block 0 handed out first */
    *out = c;
    return 0;
nomem:
    dg_kv_cache_free(c);
    snprintf(err, errlen, "kv cache: out of memory for %d blocks of %d positions", n_blocks, block_size);
    return DG_ENOMEM;
}

void dg_kv_cache_free(dg_kv_cache *c) {
    if (!c) return;
    if (c->be) {
        c->be->release(c->be, c->k);
        c->be->release(c->be, c->v);
    }
    free(c->blocks);
    free(c->buckets);
    free(c);
}

int dg_kv_cache_block_size(const dg_kv_cache *c) { return c->block_size; }

void dg_kv_cache_stats(const dg_kv_cache *c, dg_kv_stats *out) {
    const size_t block_bytes = 2 * dg_dtype_size(c->dtype) * (size_t)c->n_layers * (size_t)c->block_size *
                               (size_t)c->kv_dim;
    *out = (dg_kv_stats){
        .hits = c->hits, .misses = c->misses, .n_blocks = c->n_blocks, .n_free = c->n_free,
        .n_cached = c->n_cached, .n_keyed = c->n_keyed,
        .bytes = block_bytes * (size_t)c->n_blocks, .cached_bytes = block_bytes * (size_t)c->n_keyed,
    };
}

dg_kv_view dg_kv_cache_layer(const dg_kv_cache *c, const dg_kv_seq *s, int layer) {
    size_t off = (size_t)layer * (size_t)c->n_blocks * (size_t)c->block_size * (size_t)c->kv_dim *
                 dg_dtype_size(c->dtype);
    return (dg_kv_view){(char *)c->k + off, (char *)c->v + off, s->blocks, c->block_size, c->dtype};
}

int dg_kv_seq_init(dg_kv_seq *s, int max_tokens, int block_size) {
    memset(s, 0, sizeof *s);
    s->max_blocks = (max_tokens + block_size - 1) / block_size;
    s->blocks = malloc(sizeof(int32_t) * (size_t)(s->max_blocks ? s->max_blocks : 1));
    return s->blocks ? 0 : DG_ENOMEM;
}

void dg_kv_seq_free(dg_kv_seq *s) {
    free(s->blocks);
    s->blocks = NULL;
}

int dg_kv_seq_reserve(dg_kv_cache *c, dg_kv_seq *s, int n_new) {
    int need = (s->n_tokens + n_new + c->block_size - 1) / c->block_size;
    if (need > s->max_blocks) return DG_ELIMIT;
    while (s->n_blocks < need) {
        int32_t id = block_take(c);
        if (id == NONE) return DG_EAGAIN;
        s->blocks[s->n_blocks++] = id;
    }
    return 0;
}

void dg_kv_seq_commit(dg_kv_cache *c, dg_kv_seq *s, const int32_t *tokens, const uint64_t *extra,
                      int n) {
    for (int i = 0; i < n; i++) {
        s->hash = key_step(s->hash, tokens[i], extra ? extra[i] : 0);
        if (++s->n_tokens % c->block_size) continue;
        int32_t id = s->blocks[s->n_tokens / c->block_size - 1];
        /* the same prefix may already be keyed by a block of another sequence: keep one */
        if (c->blocks[id].keyed || map_find(c, s->hash) != NONE) continue;
        c->blocks[id].key = s->hash;
        c->blocks[id].keyed = 1;
        c->n_keyed++;
        int32_t *head = bucket_of(c, s->hash);
        c->blocks[id].next_in_bucket = *head;
        *head = id;
    }
}

int dg_kv_seq_match_prefix(dg_kv_cache *c, dg_kv_seq *s, const int32_t *tokens,
                           const uint64_t *extra, int n) {
    int reused = 0;
    if (s->n_tokens) return 0;
    while (reused + c->block_size <= n - 1 && s->n_blocks < s->max_blocks) {
        uint64_t h = s->hash;
        for (int i = reused; i < reused + c->block_size; i++)
            h = key_step(h, tokens[i], extra ? extra[i] : 0);
        int32_t id = map_find(c, h);
        if (id == NONE) {   /* this block and every full one after it: hits and misses are blocks */
            int left = (n - 1 - reused) / c->block_size, room = s->max_blocks - s->n_blocks;
            c->misses += left < room ? left : room;
            break;
        }
        c->hits++;
        if (c->blocks[id].refs++ == 0) lru_unlink(c, id);
        s->blocks[s->n_blocks++] = id;
        s->hash = h;
        reused += c->block_size;
        s->n_tokens = reused;
    }
    return reused;
}

void dg_kv_seq_release(dg_kv_cache *c, dg_kv_seq *s) {
    /* last block first: the LRU then evicts a sequence's tail before its prefix, which
     * is the part other sequences are likely to share */
    for (int i = s->n_blocks - 1; i >= 0; i--) {
        int32_t id = s->blocks[i];
        if (--c->blocks[id].refs > 0) continue;
        if (c->blocks[id].keyed) lru_push(c, id); else free_push(c, id);
    }
    s->n_blocks = s->n_tokens = 0;
    s->hash = 0;
}
