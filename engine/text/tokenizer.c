/* tokenizer.c — dg_tok: open, encode, decode, streaming decode (tokenizer.h).
 *
 * Encoding follows the reference's order of work (tokenizers AddedVocabulary, then the
 * normalizer, pre-tokenizer and model):
 *   1. invalid UTF-8 becomes U+FFFD (what the reference sees after bytes.decode "replace");
 *   2. raw added tokens (normalized=false, all of Qwen's) split the text, leftmost-longest;
 *   3. each other segment is NFC-normalized, then split again on normalized added tokens;
 *   4. the Qwen2 regex cuts the rest into pre-tokens, and BPE turns each into ids. */
#include "text/tokenizer_internal.h"
#include "duogen.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* The pre-tokenizer regex for PCRE2: DG_TOK_QWEN2_REGEX with the character classes
 * spelled out so that PCRE2 classes every code point as the reference does. The reference
 * runs the regex through Oniguruma, which differs from PCRE2 10.42 in two ways:
 *   - its Unicode \s is the White_Space property (U+0009..U+000D, U+0020, U+0085 and the
 *     Zs, Zl, Zp characters); PCRE2's \s also matches U+180E;
 *   - its Unicode tables are version 16.0; PCRE2 10.42's are 14.0, so the letters and
 *     numbers added in 15.0..16.0 are listed here (a newer PCRE2 already has them).
 * tests/test_tokenizer.c checks every code point against the reference's classes
 * (tests/golden/tokenizer/unicode_classes.txt). */
#define WS "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
#define LETTER_EXTRA \
    "\\x{1C89}-\\x{1C8A}\\x{A7CB}-\\x{A7CD}\\x{A7DA}-\\x{A7DC}\\x{105C0}-\\x{105F3}" \
    "\\x{10D4A}-\\x{10D65}\\x{10D6F}-\\x{10D85}\\x{10EC2}-\\x{10EC4}\\x{1123F}-\\x{11240}" \
    "\\x{11380}-\\x{11389}\\x{1138B}\\x{1138E}\\x{11390}-\\x{113B5}\\x{113B7}\\x{113D1}\\x{113D3}" \
    "\\x{11BC0}-\\x{11BE0}\\x{11F02}\\x{11F04}-\\x{11F10}\\x{11F12}-\\x{11F33}\\x{1342F}" \
    "\\x{13441}-\\x{13446}\\x{13460}-\\x{143FA}\\x{16100}-\\x{1611D}\\x{16D40}-\\x{16D6C}\\x{18CFF}" \
    "\\x{1B132}\\x{1B155}\\x{1DF25}-\\x{1DF2A}\\x{1E030}-\\x{1E06D}\\x{1E4D0}-\\x{1E4EB}" \
    "\\x{1E5D0}-\\x{1E5ED}\\x{1E5F0}\\x{2B739}\\x{2EBF0}-\\x{2EE5D}\\x{31350}-\\x{323AF}"
#define NUMBER_EXTRA \
    "\\x{10D40}-\\x{10D49}\\x{116D0}-\\x{116E3}\\x{11BF0}-\\x{11BF9}\\x{11F50}-\\x{11F59}" \
    "\\x{16130}-\\x{16139}\\x{16D70}-\\x{16D79}\\x{1CCF0}-\\x{1CCF9}\\x{1D2C0}-\\x{1D2D3}" \
    "\\x{1E4F0}-\\x{1E4F9}\\x{1E5F1}-\\x{1E5FA}"
#define LETTER "\\p{L}" LETTER_EXTRA
#define NUMBER "\\p{N}" NUMBER_EXTRA
static const char pretokenize_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n" LETTER NUMBER "]?[" LETTER "]+|[" NUMBER "]"
    "| ?[^" WS LETTER NUMBER "]+[\\r\\n]*|[" WS "]*[\\r\\n]+|[" WS "]+(?![^" WS "])|[" WS "]+";

void dg_tok_close(dg_tok *t) {
    if (!t) return;
    free(t->bytes);
    free(t->offset);
    free(t->len);
    free(t->flags);
    free(t->merges);
    free(t->byte_pairs);
    for (size_t k = 0; k < t->n_added; k++) free(t->added[k].content);
    free(t->added);
    pcre2_code_free(t->regex);
    if (t->memo_lock) pthread_mutex_destroy(t->memo_lock);
    free(t->memo_lock);
    free(t->memo);
    free(t);
}

/* Token bytes and flags by id, and the single-byte tokens. */
static int tables_build(dg_tok *t, const dg_tok_files *f, const char *dir, char *err, size_t errlen) {
    int32_t max_id = -1;
    size_t total = f->arena_len;
    for (size_t k = 0; k < f->n_vocab; k++) max_id = f->vocab[k].id > max_id ? f->vocab[k].id : max_id;
    for (size_t k = 0; k < f->n_added; k++) {
        max_id = f->added[k].id > max_id ? f->added[k].id : max_id;
        total += f->added[k].len;
    }
    t->n_ids = max_id + 1;
    t->bytes = malloc(total ? total : 1);
    t->offset = calloc((size_t)t->n_ids, sizeof *t->offset);
    t->len = calloc((size_t)t->n_ids, sizeof *t->len);
    t->flags = calloc((size_t)t->n_ids, sizeof *t->flags);
    if (!t->bytes || !t->offset || !t->len || !t->flags) return DG_ENOMEM;
    memcpy(t->bytes, f->arena, f->arena_len);
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (size_t k = 0; k < f->n_vocab; k++) {
        const dg_tok_vocab_entry *e = &f->vocab[k];
        if (t->flags[e->id]) {
            snprintf(err, errlen, "%s: the vocabulary gives id %d to two tokens", dir, e->id);
            return DG_EMODEL;
        }
        t->flags[e->id] = DG_TOK_F_PRESENT;
        t->offset[e->id] = (uint32_t)e->offset;
        t->len[e->id] = (uint16_t)e->len;
        if (e->len == 1) t->byte_id[f->arena[e->offset]] = e->id;
    }
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0) {
            snprintf(err, errlen, "%s: the vocabulary has no token for byte 0x%02X (\"U+%04X\")", dir, b,
                     dg_tok_byte_char((uint8_t)b));
            return DG_EMODEL;
        }
    /* an added token overrides a vocab token of the same id, as in the reference's decode */
    size_t at = f->arena_len;
    for (size_t k = 0; k < f->n_added; k++) {
        const dg_tok_added_entry *e = &f->added[k];
        memcpy(t->bytes + at, e->bytes, e->len);
        t->offset[e->id] = (uint32_t)at;
        t->len[e->id] = (uint16_t)e->len;
        t->flags[e->id] = DG_TOK_F_PRESENT | (e->special ? DG_TOK_F_SPECIAL : 0);
        at += e->len;
    }
    return 0;
}

static int added_longest_first(const void *a, const void *b) {
    size_t la = ((const dg_tok_added *)a)->len, lb = ((const dg_tok_added *)b)->len;
    return la < lb ? 1 : la > lb ? -1 : 0;
}

static int added_build(dg_tok *t, const dg_tok_files *f) {
    t->added = calloc(f->n_added ? f->n_added : 1, sizeof *t->added);
    if (!t->added) return DG_ENOMEM;
    for (size_t k = 0; k < f->n_added; k++) {
        const dg_tok_added_entry *e = &f->added[k];
        uint8_t *content = malloc(e->content_len);
        if (!content) return DG_ENOMEM;
        memcpy(content, e->content, e->content_len);
        t->added[t->n_added++] = (dg_tok_added){content, e->content_len, e->id, e->normalized};
        t->added_first[content[0]] |= e->normalized ? DG_TOK_ADDED_NORMALIZED : DG_TOK_ADDED_RAW;
    }
    qsort(t->added, t->n_added, sizeof *t->added, added_longest_first);
    return 0;
}

static int regex_build(dg_tok *t, char *err, size_t errlen) {
    int code;
    PCRE2_SIZE at;
    t->regex = pcre2_compile((PCRE2_SPTR)pretokenize_regex, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                             &code, &at, NULL);
    if (!t->regex) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        snprintf(err, errlen, "tokenizer: the pre-tokenizer regex does not compile at %zu: %s", (size_t)at, msg);
        return DG_EINTERNAL;
    }
    /* without JIT (an unsupported CPU) pcre2_match interprets the same pattern, slower */
    pcre2_jit_compile(t->regex, PCRE2_JIT_COMPLETE);
    return 0;
}

int dg_tok_open(const char *dir, dg_tok **out, char *err, size_t errlen) {
    return dg_tok_open_with(dir, NULL, 0, out, err, errlen);
}

int dg_tok_open_with(const char *dir, const dg_tok_token *extra, size_t n_extra, dg_tok **out, char *err,
                     size_t errlen) {
    *out = NULL;
    dg_tok_files f;
    dg_tok *t = NULL;
    int rc = dg_tok_files_load(dir, &f, err, errlen);
    if (rc < 0) return rc;
    for (size_t i = 0; i < n_extra; i++)
        if ((rc = dg_tok_files_add_special(&f, extra[i].content, extra[i].id, err, errlen)) < 0) goto fail;
    t = calloc(1, sizeof *t);
    if (!t) { rc = DG_ENOMEM; goto fail; }
    if ((rc = tables_build(t, &f, dir, err, errlen)) < 0) goto fail;
    if ((rc = dg_tok_merges_build(t, &f, err, errlen)) < 0) goto fail;
    if ((rc = added_build(t, &f)) < 0) goto fail;
    if ((rc = regex_build(t, err, errlen)) < 0) goto fail;
    t->match_limit_base = 10000000;   /* PCRE2's default */
    t->match_limit_per_byte = 16;
    t->memo = calloc(DG_TOK_MEMO_SLOTS, sizeof *t->memo);
    if (!t->memo) { rc = DG_ENOMEM; goto fail; }
    if (!(t->memo_lock = malloc(sizeof *t->memo_lock))) { rc = DG_ENOMEM; goto fail; }
    pthread_mutex_init(t->memo_lock, NULL);
    dg_tok_files_free(&f);
    *out = t;
    return 0;
fail:
    if (rc == DG_ENOMEM) snprintf(err, errlen, "%s: out of memory while building the tokenizer", dir);
    dg_tok_files_free(&f);
    dg_tok_close(t);
    return rc;
}

int32_t dg_tok_n_ids(const dg_tok *t) { return t->n_ids; }

bool dg_tok_has(const dg_tok *t, int32_t id) { return id >= 0 && id < t->n_ids && (t->flags[id] & DG_TOK_F_PRESENT); }

int32_t dg_tok_added_id(const dg_tok *t, const char *content) {
    size_t n = strlen(content);
    for (size_t k = 0; k < t->n_added; k++)
        if (t->added[k].len == n && !memcmp(t->added[k].content, content, n)) return t->added[k].id;
    return DG_EINVAL;
}

/* ---- encode ------------------------------------------------------------------------- */

typedef struct {
    const dg_tok      *t;
    dg_tok_ids        *out;
    dg_tok_bpe_scratch bpe;
    pcre2_match_data  *match;
    pcre2_match_context *limits;   /* the match limit of the match at hand */
    char              *err;
    size_t             errlen;
} encoder;

/* The leftmost added token of the given kind (DG_TOK_ADDED_*) in s[from..n), the longest
 * one where several start there. Returns its index in t->added, or -1. */
static long added_find(const dg_tok *t, const uint8_t *s, size_t n, size_t from, int kind, size_t *at) {
    for (size_t i = from; i < n; i++) {
        if (!(t->added_first[s[i]] & kind)) continue;
        for (size_t k = 0; k < t->n_added; k++) {
            const dg_tok_added *a = &t->added[k];
            int a_kind = a->normalized ? DG_TOK_ADDED_NORMALIZED : DG_TOK_ADDED_RAW;
            if (a_kind == kind && a->len <= n - i && a->content[0] == s[i] && !memcmp(a->content, s + i, a->len)) {
                *at = i;
                return (long)k;
            }
        }
    }
    return -1;
}

/* Pre-tokens of NFC text s[0..n) by the regex, each through BPE. The reference's Split
 * with "Isolated" keeps text between matches as pre-tokens too (this regex leaves none). */
static int encode_pretokens(encoder *e, const uint8_t *s, size_t n) {
    size_t pos = 0;
    while (pos < n) {
        uint64_t limit = e->t->match_limit_base + e->t->match_limit_per_byte * (uint64_t)(n - pos);
        pcre2_set_match_limit(e->limits, limit < UINT32_MAX ? (uint32_t)limit : UINT32_MAX);
        int rc = pcre2_match(e->t->regex, s, n, pos, PCRE2_NO_UTF_CHECK, e->match, e->limits);
        size_t start = n, end = n;
        if (rc >= 0) {
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->match);
            start = ov[0];
            end = ov[1];
        } else if (rc != PCRE2_ERROR_NOMATCH) {
            /* a limit (match, depth, heap) is the text's size, not a broken engine: the job
             * fails, the worker goes on */
            if (rc == PCRE2_ERROR_NOMEMORY) return DG_ENOMEM;
            const int limited = rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT ||
                                rc == PCRE2_ERROR_HEAPLIMIT || rc == PCRE2_ERROR_JIT_STACKLIMIT;
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            snprintf(e->err, e->errlen, "%s: the pre-tokenizer's regex failed %zu bytes into a segment of %zu: %s",
                     limited ? "text" : "tokenizer", pos, n, msg);
            return limited ? DG_ELIMIT : DG_EINTERNAL;
        }
        if (start > pos && (rc = dg_tok_bpe_word(e->t, &e->bpe, s + pos, start - pos, e->out)) < 0) return rc;
        if (end == start && start < n) {
            snprintf(e->err, e->errlen, "tokenizer: pre-tokenizer regex matched nothing at byte %zu", start);
            return DG_EINTERNAL;
        }
        if (end > start && (rc = dg_tok_bpe_word(e->t, &e->bpe, s + start, end - start, e->out)) < 0) return rc;
        pos = end;
    }
    return 0;
}

typedef int (*segment_fn)(encoder *e, const uint8_t *s, size_t n);

/* Pushes the ids of the added tokens of one kind in s[0..n) and hands the text between
 * them to fn. */
static int split_on_added(encoder *e, const uint8_t *s, size_t n, int kind, segment_fn fn) {
    size_t pos = 0, at;
    long k;
    int rc;
    while (pos < n && (k = added_find(e->t, s, n, pos, kind, &at)) >= 0) {
        if ((rc = fn(e, s + pos, at - pos)) < 0 || (rc = dg_tok_ids_push(e->out, e->t->added[k].id)) < 0)
            return rc;
        pos = at + e->t->added[k].len;
    }
    return fn(e, s + pos, n - pos);
}

/* A segment between raw added tokens: NFC, then normalized added tokens, then BPE. */
static int encode_segment(encoder *e, const uint8_t *s, size_t n) {
    if (n == 0) return 0;
    uint8_t *nfc;
    size_t nfc_len;
    int rc = dg_tok_nfc(s, n, &nfc, &nfc_len);
    if (rc == DG_ELIMIT) {
        snprintf(e->err, e->errlen, "text: combining marks that NFC would reorder more than %llu times (from byte "
                 "%zu of a segment): no script stacks marks so", (unsigned long long)DG_TOK_NFC_SWAPS_MAX, nfc_len);
        return rc;
    }
    if (rc < 0) {
        snprintf(e->err, e->errlen, "tokenizer: NFC normalization failed");
        return rc;
    }
    rc = nfc ? split_on_added(e, nfc, nfc_len, DG_TOK_ADDED_NORMALIZED, encode_pretokens)
             : split_on_added(e, s, n, DG_TOK_ADDED_NORMALIZED, encode_pretokens);
    free(nfc);
    return rc;
}

int dg_tok_encode(const dg_tok *t, const char *text, size_t len, dg_tok_ids *out, char *err, size_t errlen) {
    encoder e = {.t = t, .out = out, .err = err, .errlen = errlen};
    const uint8_t *s = (const uint8_t *)text;
    uint8_t *valid = NULL;
    int rc = DG_ENOMEM;
    if (dg_tok_utf8_valid_prefix(s, len) != len) {
        if (len > SIZE_MAX / 3 || !(valid = malloc(3 * len))) goto done;
        size_t used;
        len = dg_tok_utf8_lossy(s, len, true, valid, &used);
        s = valid;
    }
    if (!(e.match = pcre2_match_data_create(1, NULL)) || !(e.limits = pcre2_match_context_create(NULL))) goto done;
    e.bpe.memo = pthread_mutex_trylock(t->memo_lock) == 0;   /* busy: go without the memo */
    rc = split_on_added(&e, s, len, DG_TOK_ADDED_RAW, encode_segment);
    if (e.bpe.memo) pthread_mutex_unlock(t->memo_lock);
done:
    if (rc == DG_ENOMEM) snprintf(err, errlen, "tokenizer: out of memory encoding %zu bytes", len);
    pcre2_match_data_free(e.match);
    pcre2_match_context_free(e.limits);
    dg_tok_bpe_scratch_free(&e.bpe);
    free(valid);
    return rc;
}

/* ---- decode ------------------------------------------------------------------------- */

static bool token_shown(const dg_tok *t, int32_t id, unsigned flags) {
    if (id < 0 || id >= t->n_ids || !(t->flags[id] & DG_TOK_F_PRESENT)) return false;
    return !((flags & DG_TOK_SKIP_SPECIAL) && (t->flags[id] & DG_TOK_F_SPECIAL));
}

int dg_tok_decode(const dg_tok *t, const int32_t *ids, size_t n, unsigned flags, char **text, size_t *len,
                  char *err, size_t errlen) {
    *text = NULL;
    *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        if (token_shown(t, ids[i], flags)) total += t->len[ids[i]];
    uint8_t *raw = malloc(total + 1), *lossy = NULL;
    if (!raw) goto nomem;
    size_t at = 0, used;
    for (size_t i = 0; i < n; i++)
        if (token_shown(t, ids[i], flags)) {
            memcpy(raw + at, t->bytes + t->offset[ids[i]], t->len[ids[i]]);
            at += t->len[ids[i]];
        }
    if (dg_tok_utf8_valid_prefix(raw, total) != total) {
        if (!(lossy = malloc(3 * total + 1))) goto nomem;
        total = dg_tok_utf8_lossy(raw, total, true, lossy, &used);
        free(raw);
        raw = lossy;
    }
    raw[total] = 0;
    *text = (char *)raw;
    *len = total;
    return 0;
nomem:
    free(raw);
    snprintf(err, errlen, "tokenizer: out of memory decoding %zu ids", n);
    return DG_ENOMEM;
}

void dg_tok_stream_init(dg_tok_stream *s, unsigned flags) {
    *s = (dg_tok_stream){.flags = flags};
}

size_t dg_tok_stream_push(const dg_tok *t, dg_tok_stream *s, int32_t id, char out[DG_TOK_STREAM_OUT_MAX]) {
    if (!token_shown(t, id, s->flags)) return 0;
    uint8_t buf[3 + DG_TOK_PIECE_MAX];
    size_t n = s->n_held + t->len[id], used;
    memcpy(buf, s->held, s->n_held);
    memcpy(buf + s->n_held, t->bytes + t->offset[id], t->len[id]);
    size_t o = dg_tok_utf8_lossy(buf, n, false, (uint8_t *)out, &used);
    s->n_held = (uint8_t)(n - used);   /* at most 3: only an unfinished character is left */
    memcpy(s->held, buf + used, s->n_held);
    return o;
}

size_t dg_tok_stream_finish(dg_tok_stream *s, char out[DG_TOK_STREAM_OUT_MAX]) {
    size_t used, o = dg_tok_utf8_lossy(s->held, s->n_held, true, (uint8_t *)out, &used);
    s->n_held = 0;
    return o;
}
