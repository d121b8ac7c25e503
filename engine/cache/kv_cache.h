/* kv_cache.h — block-paged KV cache with prefix reuse (docs/DESIGN.md §6).
 *
 * The cache owns one pool of fixed-size blocks per layer (K and V, fp32, in backend
 * memory). A sequence holds a block table: position p lives in block table[p / block_size]
 * at row p % block_size. A block that fills up is keyed by a chained hash of every token
 * before and in it (image tokens may add a per-token key, e.g. the image's content hash),
 * so two sequences with the same prefix produce the same keys block by block.
 *
 * A block is keyed when it fills up (dg_kv_seq_commit), whatever forward filled it: a
 * prefill chunk, an image's tokens, or decode one token at a time; a sequence's partial
 * last block is never keyed and is freed at release.
 *
 * Blocks are reference counted. A released block whose key is known is not freed but put
 * on an LRU list: a later sequence with the same prefix takes it back
 * (dg_kv_seq_match_prefix). Allocation takes a free block, else evicts the least recently
 * used cached block, else fails with DG_EAGAIN (retryable: every block is in use).
 *
 *     dg_kv_seq s;  dg_kv_seq_init(&s, max_tokens, block_size);
 *     int reused = dg_kv_seq_match_prefix(c, &s, prompt, NULL, n);   // skip these tokens
 *     dg_kv_seq_reserve(c, &s, n - reused);  ...forward writes K/V... dg_kv_seq_commit(...)
 *     dg_kv_seq_release(c, &s);  dg_kv_seq_free(&s);
 *
 * Keys are 64-bit hashes keyed by a secret drawn once per process (getrandom): a collision
 * (≈ 2^-64 per pair of blocks) would share a wrong block, and cannot be searched for
 * outside the process; an image's key folds all 128 bits of its content digest in
 * (dg_kv_image_key). Not thread-safe: one scheduler owns a cache. */
#ifndef DG_KV_CACHE_H
#define DG_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"

typedef struct dg_kv_cache dg_kv_cache;

typedef struct {
    int32_t *blocks;       /* owned: block table [max_blocks] */
    int      n_blocks;     /* entries of the table in use */
    int      max_blocks;
    int      n_tokens;     /* positions holding K/V */
    uint64_t hash;         /* running chained hash over the tokens committed so far */
} dg_kv_seq;

typedef struct {
    int64_t hits, misses;  /* full prompt blocks found / not found by dg_kv_seq_match_prefix
                              (a lookup that stops at a miss counts every block after it) */
    int     n_blocks, n_free, n_cached;  /* total, never used or freed, released but keyed */
    int     n_keyed;       /* blocks a later prompt can match: in use or released, keyed */
    size_t  bytes;         /* the pool: K and V of all layers, all blocks */
    size_t  cached_bytes;  /* K and V of the n_keyed blocks */
} dg_kv_stats;

/* n_blocks blocks of block_size positions for n_layers layers of kv_dim elements of dtype (K
 * and V each), allocated from the backend. dtype: F32, or BF16 on a backend with kv_bf16
 * (DG_EINVAL naming the backend otherwise). */
int  dg_kv_cache_new(dg_backend *be, int n_layers, int kv_dim, int block_size, int n_blocks, dg_dtype dtype,
                     dg_kv_cache **out, char *err, size_t errlen);
void dg_kv_cache_free(dg_kv_cache *c);   /* accepts NULL */
int  dg_kv_cache_block_size(const dg_kv_cache *c);
void dg_kv_cache_stats(const dg_kv_cache *c, dg_kv_stats *out);

/* The view attention reads for one layer of one sequence (valid until the table changes). */
dg_kv_view dg_kv_cache_layer(const dg_kv_cache *c, const dg_kv_seq *s, int layer);

/* A sequence of at most max_tokens positions: DG_ENOMEM or 0. */
int  dg_kv_seq_init(dg_kv_seq *s, int max_tokens, int block_size);
void dg_kv_seq_free(dg_kv_seq *s);       /* the table only; release blocks first */

/* Takes blocks from the cache so that n_new more positions fit. DG_ELIMIT past max_tokens,
 * DG_EAGAIN when no block is free or evictable (what was taken stays with the sequence). */
int  dg_kv_seq_reserve(dg_kv_cache *c, dg_kv_seq *s, int n_new);

/* Records that positions n_tokens .. n_tokens+n-1 now hold the K/V of tokens[0..n-1]
 * (key: tokens[i], mixed with extra[i] when extra != NULL) and keys every block that
 * became full. The positions must have been reserved. */
void dg_kv_seq_commit(dg_kv_cache *c, dg_kv_seq *s, const int32_t *tokens, const uint64_t *extra,
                      int n);

/* For an empty sequence about to take tokens[0..n-1]: shares the longest run of cached
 * full blocks that match the prefix, leaving at least one token to compute (the logits
 * of the last token are needed). Returns the number of positions reused (a multiple of
 * the block size); the sequence then holds them as if committed. */
int  dg_kv_seq_match_prefix(dg_kv_cache *c, dg_kv_seq *s, const int32_t *tokens,
                            const uint64_t *extra, int n);

/* Drops the sequence's references; keyed blocks stay cached (LRU), others become free.
 * The sequence is empty afterwards and may be used again. */
void dg_kv_seq_release(dg_kv_cache *c, dg_kv_seq *s);

/* The per-token key (`extra`) of an image's tokens from its 128-bit content digest: keyed
 * by the process's secret, never 0 (a text token's). */
uint64_t dg_kv_image_key(const uint8_t digest[16]);

#endif
