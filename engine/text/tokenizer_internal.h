/* tokenizer_internal.h — what the tokenizer_*.c files share; not part of the engine API.
 *
 *   tokenizer.c        dg_tok_open/close, encode (added tokens, NFC, regex split), decode
 *   tokenizer_load.c   reading vocab.json, merges.txt, tokenizer_config.json, tokenizer.json
 *   tokenizer_bpe.c    the merge table, BPE by rank and the memo of encoded words
 *   tokenizer_utf8.c   the byte-level alphabet, lossy UTF-8, NFC span by span
 */
#ifndef DG_TOKENIZER_INTERNAL_H
#define DG_TOKENIZER_INTERNAL_H

#include "text/tokenizer.h"

#include <pthread.h>
#include <stdbool.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

/* The Qwen2 pre-tokenizer regex as tokenizer.json spells it (docs/specs/qwen2_5_vl.md §6.1). */
#define DG_TOK_QWEN2_REGEX                                                              \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+" \
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

enum {
    DG_TOK_F_PRESENT = 1,   /* the id names a token */
    DG_TOK_F_SPECIAL = 2,   /* an added token flagged special */
};

typedef struct {
    uint32_t a, b;      /* left and right token ids; a == UINT32_MAX marks an empty slot */
    uint32_t rank;      /* line index in merges: lower merges first */
    int32_t  id;        /* the id of the merged token */
} dg_tok_merge;

enum { DG_TOK_ADDED_RAW = 1, DG_TOK_ADDED_NORMALIZED = 2 };   /* where a token is matched */

typedef struct {
    uint8_t *content;   /* owned: the text matched, len bytes (not the decoded bytes) */
    size_t   len;
    int32_t  id;
    bool     normalized; /* matched on NFC text (content is NFC), else on raw text */
} dg_tok_added;

/* A memo slot: the ids of one short pre-token. Direct-mapped by hash; a collision
 * overwrites. 128 bytes. */
#define DG_TOK_MEMO_SLOTS 16384
#define DG_TOK_MEMO_BYTES 70
#define DG_TOK_MEMO_IDS   12
typedef struct {
    uint64_t hash;
    uint8_t  len, n_ids;                 /* len 0: empty */
    uint8_t  bytes[DG_TOK_MEMO_BYTES];
    int32_t  ids[DG_TOK_MEMO_IDS];
} dg_tok_memo_slot;

struct dg_tok {
    int32_t   n_ids;
    uint8_t  *bytes;        /* owned: the bytes every token decodes to, back to back */
    uint32_t *offset;       /* owned, [n_ids]: a token's first byte in bytes */
    uint16_t *len;          /* owned, [n_ids]: its byte count (<= DG_TOK_PIECE_MAX) */
    uint8_t  *flags;        /* owned, [n_ids]: DG_TOK_F_* */
    int32_t   byte_id[256]; /* the token of each single byte */

    dg_tok_merge *merges;   /* owned, [merge_mask + 1]: open addressing, linear probing */
    uint32_t      merge_mask;
    dg_tok_merge *byte_pairs;  /* owned, [256 * 256]: the merge of two single-byte tokens by
                                  (first byte << 8 | second byte), rank UINT32_MAX if none:
                                  every word starts with these lookups */

    dg_tok_added *added;    /* owned, [n_added]: longest content first */
    size_t        n_added;
    uint8_t       added_first[256];  /* DG_TOK_ADDED_* bits: an added token of that kind
                                        starts with this byte */

    pcre2_code   *regex;    /* owned: the pre-tokenizer, JIT-compiled when possible */
    /* PCRE2's match limit for one match from byte pos of a segment of n: base + per_byte *
     * (n - pos). The regex backtracks once a byte over a whitespace run (\s*[\r\n]+ tries
     * every split), so PCRE2's fixed default (10^7) failed on a run of 10 MB; the limit
     * grows with the text and still bounds a match. Fields, so tests can lower them. */
    uint64_t      match_limit_base, match_limit_per_byte;

    pthread_mutex_t  *memo_lock;   /* owned: try-locked for a whole encode call */
    dg_tok_memo_slot *memo;        /* owned, [DG_TOK_MEMO_SLOTS] */
};

/* What the loader hands to dg_tok_open(): tokens as the bytes they decode to (the
 * byte-level alphabet already undone) and merges as id pairs in rank order. */
typedef struct {
    int32_t id;
    size_t  offset, len;     /* bytes at arena + offset */
} dg_tok_vocab_entry;

typedef struct {
    int32_t  id;
    uint8_t *content;        /* owned: the text it matches (NFC when normalized), content_len bytes */
    size_t   content_len;
    uint8_t *bytes;          /* owned: what it decodes to (the reference's ByteLevel decoder
                                maps each character back to a byte when all of them are in
                                the alphabet, and keeps the UTF-8 text otherwise) */
    size_t   len;
    bool     special;
    bool     normalized;     /* matched on the NFC text rather than the raw text */
} dg_tok_added_entry;

typedef struct {
    uint8_t            *arena;    /* owned: vocab token bytes */
    size_t              arena_len, arena_cap;
    dg_tok_vocab_entry *vocab;    /* owned, [n_vocab] */
    size_t              n_vocab;
    dg_tok_added_entry *added;    /* owned, [n_added] */
    size_t              n_added;
    uint32_t          (*pairs)[2];/* owned, [n_merges]: (left id, right id) in rank order */
    int32_t            *merged;   /* owned, [n_merges]: the id of each merge's result */
    size_t              n_merges;
} dg_tok_files;

int  dg_tok_files_load(const char *dir, dg_tok_files *f, char *err, size_t errlen);
/* Adds a special added token (matched on the raw text) that the files lack; DG_EMODEL when
 * its id or text is another token's. */
int  dg_tok_files_add_special(dg_tok_files *f, const char *content, int32_t id, char *err, size_t errlen);
void dg_tok_files_free(dg_tok_files *f);

/* ---- tokenizer_bpe.c ---- */
int  dg_tok_merges_build(dg_tok *t, const dg_tok_files *f, char *err, size_t errlen);
bool dg_tok_merge_find(const dg_tok *t, int32_t a, int32_t b, uint32_t *rank, int32_t *id);

typedef struct {            /* per encode call: grows to the longest word seen */
    int32_t  *sym, *prev, *next;   /* [cap]: symbols as a linked list; sym -1 once merged away */
    uint32_t *rank;                /* [cap]: rank of the pair that starts here (UINT32_MAX: none) */
    int32_t  *merged;              /* [cap]: the id that pair merges into */
    uint64_t *heap;                /* [3 * cap]: (rank << 32 | position) */
    size_t    cap;
    bool      memo;                /* this call holds memo_lock */
} dg_tok_bpe_scratch;

int  dg_tok_bpe_word(const dg_tok *t, dg_tok_bpe_scratch *s, const uint8_t *w, size_t n,
                     dg_tok_ids *out);
void dg_tok_bpe_scratch_free(dg_tok_bpe_scratch *s);
int  dg_tok_ids_reserve(dg_tok_ids *ids, size_t more);

/* ---- tokenizer_utf8.c ---- */
/* The GPT-2 byte-level alphabet: byte -> code point, and back (-1: not in the alphabet). */
uint32_t dg_tok_byte_char(uint8_t b);
int      dg_tok_char_byte(uint32_t cp);

/* Turns in[0..n) into valid UTF-8 in out, each maximal ill-formed subpart becoming
 * U+FFFD (EF BF BD). With final false, a trailing valid-but-unfinished prefix is left
 * unconsumed. out needs room for 3 * n bytes. Returns bytes written; *consumed = input
 * bytes used. */
size_t dg_tok_utf8_lossy(const uint8_t *in, size_t n, bool final, uint8_t *out, size_t *consumed);
/* Length of the longest valid UTF-8 prefix of in[0..n). */
size_t dg_tok_utf8_valid_prefix(const uint8_t *in, size_t n);
/* NFC of valid UTF-8 s[0..n). When it changes nothing, *out is NULL (use s as it is);
 * otherwise *out is malloc'd, *out_len bytes. Returns 0, DG_ENOMEM or DG_EINTERNAL. */
/* The most swaps of neighbouring combining marks NFC's canonical ordering may need in one
 * text (utf8proc's sort costs one a swap: 16M is about a quarter of a second); more fail
 * dg_tok_nfc with DG_ELIMIT, *out_len the offset of the span where the limit was passed. */
#define DG_TOK_NFC_SWAPS_MAX ((uint64_t)16 << 20)
int      dg_tok_nfc(const uint8_t *s, size_t n, uint8_t **out, size_t *out_len);
/* Code points that dg_tok_nfc() passes without asking utf8proc (tests check each). */
bool     dg_tok_nfc_stable(uint32_t cp);
/* Code points the reference's NFC does not know as combining: kept apart (see there). */
bool     dg_tok_nfc_opaque(uint32_t cp);

#endif
