/* tokenizer_utf8.c — byte-level alphabet, lossy UTF-8 and the NFC fast check. */
#include "text/tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "duogen.h"

/* GPT-2 bytes_to_unicode (docs/specs/qwen2_5_vl.md §6.2): the printable bytes '!'..'~',
 * 0xA1..0xAC and 0xAE..0xFF stand for themselves; the other 68 bytes, in byte order,
 * become U+0100, U+0101, ... */
static bool byte_printable(unsigned b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t dg_tok_byte_char(uint8_t b) {
    if (byte_printable(b)) return b;
    uint32_t n = 0;
    for (unsigned x = 0; x < b; x++) n += !byte_printable(x);
    return 0x100 + n;
}

int dg_tok_char_byte(uint32_t cp) {
    if (cp < 0x100) return byte_printable(cp) ? (int)cp : -1;
    uint32_t n = 0;
    for (unsigned x = 0; x < 256; x++)
        if (!byte_printable(x) && n++ == cp - 0x100) return (int)x;
    return -1;
}

/* Reads 8 bytes at once while they are all ASCII; returns the new position. */
static size_t skip_ascii(const uint8_t *in, size_t i, size_t n) {
    while (i + 8 <= n) {
        uint64_t v;
        memcpy(&v, in + i, 8);
        if (v & 0x8080808080808080ull) break;
        i += 8;
    }
    return i;
}

/* The well-formed sequences of Unicode Table 3-7: for lead byte c, the number of
 * continuation bytes (0 for an invalid lead) and the range of the first one. */
static size_t utf8_lead(uint8_t c, uint8_t *lo, uint8_t *hi) {
    *lo = 0x80;
    *hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) return 1;
    if (c >= 0xE0 && c <= 0xEF) {
        if (c == 0xE0) *lo = 0xA0;
        if (c == 0xED) *hi = 0x9F;   /* no surrogates */
        return 2;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (c == 0xF0) *lo = 0x90;
        if (c == 0xF4) *hi = 0x8F;   /* nothing above U+10FFFF */
        return 3;
    }
    return 0;
}

/* How many bytes from in[i] are a valid prefix of the sequence led by in[i] (>= 1),
 * stopping at the first byte that cannot follow or at the end of input. */
static size_t utf8_run(const uint8_t *in, size_t i, size_t n, size_t need, uint8_t lo, uint8_t hi) {
    size_t k = 1;
    while (k <= need && i + k < n) {
        uint8_t d = in[i + k];
        if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) break;
        k++;
    }
    return k;
}

size_t dg_tok_utf8_lossy(const uint8_t *in, size_t n, bool final, uint8_t *out, size_t *consumed) {
    size_t i = 0, o = 0;
    while (i < n) {
        size_t a = skip_ascii(in, i, n);
        memcpy(out + o, in + i, a - i);
        o += a - i;
        i = a;
        if (i == n) break;
        uint8_t c = in[i];
        if (c < 0x80) {
            out[o++] = c;
            i++;
            continue;
        }
        uint8_t lo, hi;
        size_t need = utf8_lead(c, &lo, &hi);
        size_t k = need ? utf8_run(in, i, n, need, lo, hi) : 1;
        if (need && k == need + 1) {
            memcpy(out + o, in + i, k);
            o += k;
        } else if (need && i + k == n && !final) {
            break;   /* a character still being built: wait for its other bytes */
        } else {
            out[o++] = 0xEF;   /* U+FFFD for the maximal subpart in[i..i+k) */
            out[o++] = 0xBF;
            out[o++] = 0xBD;
        }
        i += k;
    }
    *consumed = i;
    return o;
}

size_t dg_utf8_valid_prefix(const char *s, size_t n) { return dg_tok_utf8_valid_prefix((const uint8_t *)s, n); }

size_t dg_tok_utf8_valid_prefix(const uint8_t *in, size_t n) {
    size_t i = 0;
    while (i < n) {
        i = skip_ascii(in, i, n);
        if (i == n) break;
        if (in[i] < 0x80) {
            i++;
            continue;
        }
        uint8_t lo, hi;
        size_t need = utf8_lead(in[i], &lo, &hi);
        if (!need || utf8_run(in, i, n, need, lo, hi) != need + 1) break;
        i += need + 1;
    }
    return i;
}

/* Code points c for which a string made only of them is already NFC: c is its own NFC,
 * the first code point of its canonical decomposition is a starter, and neither c nor
 * that first code point appears after the first place in any canonical decomposition
 * (so nothing composes with what stands before it). tests/test_tokenizer.c checks every
 * one of them against utf8proc's tables. The ranges cover the common scripts; anything
 * else goes through utf8proc. */
bool dg_tok_nfc_stable(uint32_t cp) {
    static const uint32_t ranges[][2] = {
        {0x0000, 0x02FF},   /* Basic Latin .. Spacing Modifier Letters */
        {0x0388, 0x03FF},   /* Greek */
        {0x0400, 0x0482},   /* Cyrillic */
        {0x048A, 0x052F},
        {0x05D0, 0x05EA},   /* Hebrew letters */
        {0x0621, 0x064A},   /* Arabic letters */
        {0x0904, 0x0939},   /* Devanagari letters */
        {0x093D, 0x0940},
        {0x0966, 0x096F},   /* Devanagari digits */
        {0x0E01, 0x0E30},   /* Thai consonants */
        {0x200B, 0x2027},   /* zero-width characters (ZWJ), general punctuation */
        {0x2030, 0x205E},
        {0x20A0, 0x20C0},   /* currency */
        {0x3000, 0x3029},   /* CJK symbols and punctuation */
        {0x3041, 0x3096},   /* Hiragana */
        {0x30A1, 0x30FA},   /* Katakana */
        {0x4E00, 0x9FFF},   /* CJK Unified Ideographs */
        {0xAC00, 0xD7A3},   /* Hangul syllables */
        {0xFE00, 0xFE0F},   /* variation selectors */
        {0xFF01, 0xFF5E},   /* fullwidth ASCII */
        {0x1F000, 0x1FAFF}, /* emoji and pictographs */
    };
    for (size_t r = 0; r < sizeof ranges / sizeof ranges[0]; r++)
        if (cp >= ranges[r][0] && cp <= ranges[r][1]) return true;
    return false;
}

/* Code points that the reference's normalizer (the tokenizers library's NFC, on Unicode
 * tables older than utf8proc's 15.0) sees as plain starters that combine with nothing,
 * while utf8proc gives them a combining class or (U+11930) a composition: the marks of
 * Unicode 11..15 and U+11930 of U+11938. dg_tok_nfc() passes them through untouched and
 * normalizes the text on either side apart, which is what the reference does. Found and
 * checked with tests/golden/tokenizer/nfc.json. */
bool dg_tok_nfc_opaque(uint32_t cp) {
    static const uint32_t ranges[][2] = {
        {0x7FD, 0x7FD}, {0x898, 0x89F}, {0x8CA, 0x8D3}, {0x9FE, 0x9FE}, {0xC3C, 0xC3C},
        {0xD3B, 0xD3C}, {0xEBA, 0xEBA}, {0x1715, 0x1715}, {0x1ABF, 0x1ACE}, {0x1DF6, 0x1DFA},
        {0xA82C, 0xA82C}, {0x10D24, 0x10D27}, {0x10EAB, 0x10EAC}, {0x10EFD, 0x10EFF},
        {0x10F46, 0x10F50}, {0x10F82, 0x10F85}, {0x11070, 0x11070}, {0x1133B, 0x1133B},
        {0x1145E, 0x1145E}, {0x11839, 0x1183A}, {0x11930, 0x11930}, {0x1193D, 0x1193E},
        {0x11943, 0x11943}, {0x119E0, 0x119E0}, {0x11A34, 0x11A34}, {0x11A47, 0x11A47},
        {0x11A99, 0x11A99}, {0x11D42, 0x11D42}, {0x11D44, 0x11D45}, {0x11D97, 0x11D97},
        {0x11F41, 0x11F42}, {0x16FF0, 0x16FF1}, {0x1E08F, 0x1E08F}, {0x1E130, 0x1E136},
        {0x1E2AE, 0x1E2AE}, {0x1E2EC, 0x1E2EF}, {0x1E4EC, 0x1E4EF},
    };
    if (cp < ranges[0][0]) return false;
    for (size_t r = 0; r < sizeof ranges / sizeof ranges[0]; r++)
        if (cp >= ranges[r][0] && cp <= ranges[r][1]) return true;
    return false;
}

/* Decodes the code point at s[*i] of valid UTF-8 and moves *i past it. */
static uint32_t utf8_next(const uint8_t *s, size_t *i) {
    uint8_t c = s[*i];
    if (c < 0x80) { *i += 1; return c; }
    if (c < 0xE0) { *i += 2; return (uint32_t)(c & 0x1F) << 6 | (s[*i - 1] & 0x3F); }
    if (c < 0xF0) {
        *i += 3;
        return (uint32_t)(c & 0x0F) << 12 | (uint32_t)(s[*i - 2] & 0x3F) << 6 | (s[*i - 1] & 0x3F);
    }
    *i += 4;
    return (uint32_t)(c & 0x07) << 18 | (uint32_t)(s[*i - 3] & 0x3F) << 12 | (uint32_t)(s[*i - 2] & 0x3F) << 6 |
           (s[*i - 1] & 0x3F);
}

static int out_put(uint8_t **out, size_t *len, size_t *cap, const uint8_t *s, size_t n) {
    if (n == 0) return 0;
    if (*len + n > *cap) {
        size_t c = *cap ? *cap : 256;
        while (c < *len + n) c *= 2;
        uint8_t *p = realloc(*out, c);
        if (!p) return DG_ENOMEM;
        *out = p;
        *cap = c;
    }
    memcpy(*out + *len, s, n);
    *len += n;
    return 0;
}

/* The canonical reordering a span needs: how many pairs of combining marks (class > 0, no
 * starter between them) stand in the wrong order, counted per class seen so far. */
typedef struct {
    uint32_t count[256];   /* marks of each class since the last starter */
    int      lo, hi;       /* the classes counted: [lo, hi] */
    uint64_t inversions;
} reorder;

static void reorder_starter(reorder *r) {
    if (r->lo <= r->hi) memset(r->count + r->lo, 0, sizeof r->count[0] * (size_t)(r->hi - r->lo + 1));
    r->lo = 256;
    r->hi = -1;
}

static void reorder_reset(reorder *r) {
    reorder_starter(r);
    r->inversions = 0;
}

static void reorder_add(reorder *r, uint32_t cp) {
    const int c = utf8proc_get_property((utf8proc_int32_t)cp)->combining_class;
    if (!c) {
        reorder_starter(r);
        return;
    }
    for (int k = c + 1; k <= r->hi; k++) r->inversions += r->count[k];
    r->count[c]++;
    if (c < r->lo) r->lo = c;
    if (c > r->hi) r->hi = c;
}

/* Only the spans that can change go through utf8proc: a run of code points that are not
 * NFC-stable (nor opaque), with the stable code point before it (which such a run may
 * compose with). Nothing outside the span interacts with it: a stable or opaque code
 * point is a starter that nothing composes onto and that composes onto nothing before it. */
int dg_tok_nfc(const uint8_t *s, size_t n, uint8_t **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    size_t cap = 0, done = 0, i = 0, stable_at = SIZE_MAX;
    uint64_t swaps = 0;
    reorder ro = {.lo = 256};
    while (i < n) {
        size_t ascii = skip_ascii(s, i, n);
        if (ascii > i) stable_at = ascii - 1;
        if ((i = ascii) == n) break;
        size_t at = i;
        uint32_t cp = utf8_next(s, &i);
        if (dg_tok_nfc_stable(cp)) {
            stable_at = at;
            continue;
        }
        if (dg_tok_nfc_opaque(cp)) {   /* kept as it is, and no span starts before it */
            stable_at = SIZE_MAX;
            continue;
        }
        size_t start = stable_at != SIZE_MAX && stable_at >= done ? stable_at : at, end = i;
        reorder_reset(&ro);
        reorder_add(&ro, cp);
        while (end < n) {
            size_t next = end;
            uint32_t c = utf8_next(s, &next);
            if (dg_tok_nfc_stable(c) || dg_tok_nfc_opaque(c)) break;
            reorder_add(&ro, c);
            end = next;
        }
        /* utf8proc puts combining marks in canonical order by swapping neighbours, one swap
         * an inversion: 32 KB of marks of two classes, alternating, took a second, 256 KB a
         * minute, on the thread that steps every job. Text of any script needs a few swaps a
         * character; past DG_TOK_NFC_SWAPS_MAX in one text it is refused. */
        if ((swaps += ro.inversions) > DG_TOK_NFC_SWAPS_MAX) {
            free(*out);
            *out = NULL;
            *out_len = start;   /* where the span begins, for the message */
            return DG_ELIMIT;
        }
        uint8_t *nfc = NULL;
        utf8proc_ssize_t m = utf8proc_map(s + start, (utf8proc_ssize_t)(end - start), &nfc,
                                          UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        int rc = m < 0 ? (m == UTF8PROC_ERROR_NOMEM ? DG_ENOMEM : DG_EINTERNAL) : 0;
        if (!rc) rc = out_put(out, out_len, &cap, s + done, start - done);
        if (!rc) rc = out_put(out, out_len, &cap, nfc, (size_t)m);
        free(nfc);
        if (rc) {
            free(*out);
            *out = NULL;
            return rc;
        }
        done = i = end;
        stable_at = SIZE_MAX;
    }
    if (done == 0) return 0;   /* all stable: the text is its own NFC */
    return out_put(out, out_len, &cap, s + done, n - done);
}
