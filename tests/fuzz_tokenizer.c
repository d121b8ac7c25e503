/* libFuzzer target for the tokenizer: any bytes are text to encode, and also token ids to
 * decode. Checks, besides the sanitizers:
 *   - encode succeeds and gives ids of real tokens;
 *   - decode gives valid UTF-8, and the streaming decoder gives the same bytes, never
 *     ending a push inside a character;
 *   - encode(decode(encode(x))) == encode(x) (decode undoes the byte-level mapping and
 *     the rest is normalized text, which encodes the same way again);
 *   - NFC span by span (dg_tok_nfc) equals utf8proc's NFC of the whole text (when no
 *     code point in it is one the reference's older tables treat differently).
 * The vocabulary comes from $DG_TOK_VOCAB or tools/mkmodel/vocab/qwen2 (make fuzz runs from the
 * repository root). */
#include "text/tokenizer.h"
#include "text/tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

static dg_tok *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *dir = getenv("DG_TOK_VOCAB") ? getenv("DG_TOK_VOCAB") : "tools/mkmodel/vocab/qwen2";
    char err[512];
    if (dg_tok_open(dir, &tok, err, sizeof err) < 0) {
        fprintf(stderr, "fuzz_tokenizer: %s (set DG_TOK_VOCAB)\n", err);
        exit(1);
    }
    return 0;
}

#define REQUIRE(c) do { if (!(c)) { fprintf(stderr, "fuzz_tokenizer: %s failed\n", #c); __builtin_trap(); } } while (0)

static void check_decode(const int32_t *ids, size_t n) {
    char *text, err[256], out[DG_TOK_STREAM_OUT_MAX];
    size_t len;
    REQUIRE(dg_tok_decode(tok, ids, n, 0, &text, &len, err, sizeof err) == 0);
    REQUIRE(dg_tok_utf8_valid_prefix((const uint8_t *)text, len) == len);
    dg_tok_stream s;
    dg_tok_stream_init(&s, 0);
    size_t at = 0;
    for (size_t i = 0; i <= n; i++) {
        size_t k = i < n ? dg_tok_stream_push(tok, &s, ids[i], out) : dg_tok_stream_finish(&s, out);
        REQUIRE(k <= DG_TOK_STREAM_OUT_MAX && dg_tok_utf8_valid_prefix((const uint8_t *)out, k) == k);
        REQUIRE(at + k <= len && !memcmp(text + at, out, k));
        at += k;
    }
    REQUIRE(at == len);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dg_tok_ids ids = {0}, again = {0};
    char err[256], *text;
    size_t len;
    REQUIRE(dg_tok_encode(tok, (const char *)data, size, &ids, err, sizeof err) == 0);
    for (size_t i = 0; i < ids.n; i++) REQUIRE(ids.ids[i] >= 0 && ids.ids[i] < dg_tok_n_ids(tok));
    check_decode(ids.ids, ids.n);
    REQUIRE(dg_tok_decode(tok, ids.ids, ids.n, 0, &text, &len, err, sizeof err) == 0);
    REQUIRE(dg_tok_encode(tok, text, len, &again, err, sizeof err) == 0);
    REQUIRE(again.n == ids.n && (ids.n == 0 || !memcmp(again.ids, ids.ids, ids.n * sizeof *ids.ids)));
    free(text);
    dg_tok_ids_free(&ids);
    dg_tok_ids_free(&again);

    /* span-wise NFC equals utf8proc's on the whole (valid) text, when that has no code
     * point that the reference's NFC does not know as combining */
    size_t used;
    uint8_t *valid = malloc(3 * size + 1), *nfc, *whole;
    size_t n_valid = dg_tok_utf8_lossy(data, size, true, valid, &used), nfc_len;
    REQUIRE(dg_tok_nfc(valid, n_valid, &nfc, &nfc_len) == 0);
    bool opaque = false;
    for (ptrdiff_t i = 0; i < (ptrdiff_t)n_valid && !opaque;) {
        utf8proc_int32_t cp;
        i += utf8proc_iterate(valid + i, (ptrdiff_t)n_valid - i, &cp);
        opaque = dg_tok_nfc_opaque((uint32_t)cp);
    }
    ptrdiff_t m = utf8proc_map(valid, (ptrdiff_t)n_valid, &whole, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    REQUIRE(opaque || (m == (ptrdiff_t)(nfc ? nfc_len : n_valid) &&
                       (m == 0 || !memcmp(whole, nfc ? nfc : valid, (size_t)m))));
    free(whole);
    free(nfc);
    free(valid);

    /* the same bytes as ids: mostly unknown ids, which decode skips */
    size_t n = size / 4;
    int32_t *raw = malloc(n * sizeof *raw + 1);
    memcpy(raw, data, n * sizeof *raw);
    for (size_t i = 0; i < n; i++) raw[i] = (int32_t)((uint32_t)raw[i] % (uint32_t)(dg_tok_n_ids(tok) + 16)) - 8;
    check_decode(raw, n);
    free(raw);
    return 0;
}
