/* The paged KV cache: block tables, chained keys, prefix reuse, reference counts, LRU
 * eviction and the limits. (That reused blocks give the same logits is checked with the
 * real decoder in test_qwen2.c.) */
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "backend.h"
#include "duogen.h"
#include "cache/kv_cache.h"

enum { BS = 16 };

static dg_backend *be;
static dg_kv_cache *make(int n_blocks) {
    dg_kv_cache *c;
    char err[128];
    if (!be) CHECK(dg_backend_new("cpu", 1, &be, err, sizeof err) == 0);
    CHECK(dg_kv_cache_new(be, 2, 8, BS, n_blocks, DG_DTYPE_F32, &c, err, sizeof err) == 0);
    return c;
}

static void fill(dg_kv_cache *c, dg_kv_seq *s, const int32_t *t, int n) {
    CHECK_EQ_INT(dg_kv_seq_reserve(c, s, n), 0);
    dg_kv_seq_commit(c, s, t, NULL, n);
}

TEST(table_and_views) {
    dg_kv_cache *c = make(8);
    dg_kv_seq s;
    int32_t t[40];
    for (int i = 0; i < 40; i++) t[i] = i;
    CHECK(dg_kv_seq_init(&s, 100, BS) == 0);
    fill(c, &s, t, 17);
    CHECK_EQ_INT(s.n_blocks, 2);
    CHECK_EQ_INT(s.n_tokens, 17);
    fill(c, &s, t + 17, 15);                 /* exactly two full blocks */
    CHECK_EQ_INT(s.n_blocks, 2);
    dg_kv_view v0 = dg_kv_cache_layer(c, &s, 0), v1 = dg_kv_cache_layer(c, &s, 1);
    CHECK(v0.block_table == s.blocks && v0.block_size == BS);
    CHECK((float *)v1.k - (float *)v0.k == 8 * BS * 8);   /* layers are separate pools */
    dg_kv_stats st;
    dg_kv_cache_stats(c, &st);
    CHECK_EQ_INT(st.n_free, 6);
    CHECK_EQ_INT((long long)st.bytes, 2LL * 2 * 8 * BS * 8 * 4);
    /* what a later prompt can reuse: the two keyed blocks, not the pool of eight */
    CHECK_EQ_INT(st.n_keyed, 2);
    CHECK_EQ_INT((long long)st.cached_bytes, 2LL * 2 * 2 * BS * 8 * 4);
    dg_kv_seq_release(c, &s);
    dg_kv_cache_stats(c, &st);
    CHECK_EQ_INT(st.n_cached, 2);            /* both blocks were full: kept, keyed */
    CHECK_EQ_INT(st.n_free, 6);
    CHECK_EQ_INT(st.n_keyed, 2);
    dg_kv_seq_free(&s);
    dg_kv_cache_free(c);
}

TEST(prefix_reuse_by_chained_keys) {
    dg_kv_cache *c = make(16);
    dg_kv_seq a, b;
    int32_t t[64];
    for (int i = 0; i < 64; i++) t[i] = 1000 + i;
    CHECK(dg_kv_seq_init(&a, 256, BS) == 0 && dg_kv_seq_init(&b, 256, BS) == 0);
    fill(c, &a, t, 40);                      /* blocks 0, 1 full; block 2 partial */
    int32_t a0 = a.blocks[0], a1 = a.blocks[1];
    /* shared while a is alive: refcounts */
    CHECK_EQ_INT(dg_kv_seq_match_prefix(c, &b, t, NULL, 35), 32);
    CHECK(b.blocks[0] == a0 && b.blocks[1] == a1 && b.n_tokens == 32);
    dg_kv_seq_release(c, &b);
    dg_kv_seq_release(c, &a);
    /* after release, from the LRU; at least one token is always left to compute */
    CHECK_EQ_INT(dg_kv_seq_match_prefix(c, &b, t, NULL, 32), 16);
    dg_kv_seq_release(c, &b);
    /* a different token in block 1 stops the match after block 0: keys are chained */
    int32_t u[64];
    memcpy(u, t, sizeof u);
    u[20] = 7;
    CHECK_EQ_INT(dg_kv_seq_match_prefix(c, &b, u, NULL, 40), 16);
    dg_kv_seq_release(c, &b);
    /* the same tokens in block 1 after a different block 0 do not match either */
    u[20] = t[20];
    u[3] = 7;
    CHECK_EQ_INT(dg_kv_seq_match_prefix(c, &b, u, NULL, 40), 0);
    /* extra keys (image content hashes) are part of the key */
    uint64_t extra[64] = {0};
    extra[5] = 0xabcdef;
    CHECK_EQ_INT(dg_kv_seq_match_prefix(c, &b, t, extra, 40), 0);
    dg_kv_stats st;
    dg_kv_cache_stats(c, &st);
    CHECK_EQ_INT(st.hits, 4);     /* 2 + 1 + 1 + 0 + 0 blocks */
    /* misses are blocks too, each full block from the first miss on (0 + 0 + 1 + 2 + 2): a
     * lookup that found nothing used to count one miss for any number of blocks, and the
     * hit ratio read high */
    CHECK_EQ_INT(st.misses, 5);
    dg_kv_seq_free(&a);
    dg_kv_seq_free(&b);
    dg_kv_cache_free(c);
}

TEST(lru_eviction_takes_the_tail_first) {
    dg_kv_cache *c = make(4);
    dg_kv_seq a, b;
    int32_t t[64];
    for (int i = 0; i < 64; i++) t[i] = i * 3;
    CHECK(dg_kv_seq_init(&a, 64, BS) == 0 && dg_kv_seq_init(&b, 64, BS) == 0);
    fill(c, &a, t, 64);                      /* all four blocks, all keyed */
    CHECK_EQ_INT(dg_kv_seq_reserve(c, &b, 1), DG_EAGAIN);   /* every block in use */
    dg_kv_seq_release(c, &a);
    fill(c, &b, t + 1, 20);                  /* two blocks: evicts a's blocks 3 and 2 */
    dg_kv_stats st;
    dg_kv_cache_stats(c, &st);
    CHECK_EQ_INT(st.n_keyed, 3);             /* a's first two, and b's one full block */
    dg_kv_seq_release(c, &b);
    dg_kv_seq_free(&b);
    CHECK(dg_kv_seq_init(&b, 64, BS) == 0);
    CHECK_EQ_INT(dg_kv_seq_match_prefix(c, &b, t, NULL, 64), 32);
    dg_kv_seq_release(c, &b);
    CHECK_EQ_INT(dg_kv_seq_reserve(c, &b, 65), DG_ELIMIT);   /* past the sequence's max */
    dg_kv_seq_release(c, &b);
    dg_kv_seq_free(&a);
    dg_kv_seq_free(&b);
    dg_kv_cache_free(c);
}

/* KV in bf16: half the bytes for the same blocks, views of that dtype, layers apart by
 * their bf16 size; a backend without kv_bf16 refuses it, naming itself and the dtype. */
TEST(bf16_pool_and_refusal) {
    char err[128];
    dg_kv_cache *f = make(8), *h = NULL;
    CHECK_EQ_INT(dg_kv_cache_new(be, 2, 8, BS, 8, DG_DTYPE_BF16, &h, err, sizeof err), 0);
    dg_kv_stats sf, sh;
    dg_kv_cache_stats(f, &sf);
    dg_kv_cache_stats(h, &sh);
    CHECK(sh.bytes * 2 == sf.bytes && sf.bytes == 2u * 4 * 2 * 8 * BS * 8);
    dg_kv_seq s;
    CHECK(dg_kv_seq_init(&s, 100, BS) == 0);
    dg_kv_view v0 = dg_kv_cache_layer(h, &s, 0), v1 = dg_kv_cache_layer(h, &s, 1);
    CHECK(v0.dtype == DG_DTYPE_BF16 && (uint16_t *)v1.k - (uint16_t *)v0.k == 8 * BS * 8);
    dg_kv_seq_free(&s);
    dg_backend *scalar;
    CHECK(dg_backend_new("cpu-scalar", 1, &scalar, err, sizeof err) == 0);
    scalar->kv_bf16 = 0;   /* as a backend without it (CUDA) */
    dg_kv_cache *no = NULL;
    CHECK_EQ_INT(dg_kv_cache_new(scalar, 2, 8, BS, 8, DG_DTYPE_BF16, &no, err, sizeof err), DG_EINVAL);
    CHECK(no == NULL && strstr(err, "cpu-scalar backend keeps KV in F32 only, not BF16"));
    dg_backend_free(scalar);
    dg_kv_cache_free(h);
    dg_kv_cache_free(f);
}

int main(void) {
    int rc = test_main();
    dg_backend_free(be);
    return rc;
}
