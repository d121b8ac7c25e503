/* Tokenizer tests: the llama.cpp Qwen2 vectors, the corpus goldens of the Hugging Face
 * tokenizers library (tools/reference/make_tokenizer_goldens.py), decode and streaming
 * decode, invalid UTF-8, the loaders' errors, tokenizer.json, and the NFC fast path.
 *
 * Data: tools/mkmodel/vocab/qwen2 (or $DG_TOK_VOCAB) and tests/golden/tokenizer/. */
#include "common/harness.h"
#include "duogen.h"
#include "text/tokenizer.h"
#include "text/tokenizer_internal.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <utf8proc.h>

static const char *vocab_dir(void) {
    const char *d = getenv("DG_TOK_VOCAB");
    return d ? d : "tools/mkmodel/vocab/qwen2";
}

static dg_tok *qwen(void) {
    static dg_tok *tok;
    char err[512];
    if (!tok && dg_tok_open(vocab_dir(), &tok, err, sizeof err) < 0) {
        printf("  cannot load %s: %s\n", vocab_dir(), err);
        exit(1);
    }
    return tok;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    *len = fread(buf, 1, (size_t)n, f);
    buf[*len] = 0;
    fclose(f);
    return buf;
}

/* Encodes and compares with expected ids; prints the first difference. */
static int encode_matches(dg_tok *tok, const char *text, size_t len, const int32_t *want, size_t n_want,
                          const char *label) {
    dg_tok_ids ids = {0};
    char err[256];
    int rc = dg_tok_encode(tok, text, len, &ids, err, sizeof err);
    int same = rc == 0 && ids.n == n_want && (n_want == 0 || !memcmp(ids.ids, want, n_want * sizeof *want));
    if (!same) {
        printf("  %s: encode differs (rc %d, %zu ids, want %zu):", label, rc, ids.n, n_want);
        for (size_t i = 0; i < ids.n && i < 16; i++) printf(" %d", ids.ids[i]);
        printf(" | want");
        for (size_t i = 0; i < n_want && i < 16; i++) printf(" %d", want[i]);
        printf("\n");
    }
    dg_tok_ids_free(&ids);
    return same;
}

static char *decode_all(dg_tok *tok, const int32_t *ids, size_t n, unsigned flags, size_t *len) {
    char *text, err[256];
    if (dg_tok_decode(tok, ids, n, flags, &text, len, err, sizeof err) < 0) return NULL;
    return text;
}

/* The streaming decoder's output, concatenated; checks that no push ends mid-character. */
static char *decode_stream(dg_tok *tok, const int32_t *ids, size_t n, unsigned flags, size_t *len, int *broken) {
    char *all = malloc(n * DG_TOK_STREAM_OUT_MAX + DG_TOK_STREAM_OUT_MAX + 1), out[DG_TOK_STREAM_OUT_MAX];
    size_t at = 0;
    dg_tok_stream s;
    dg_tok_stream_init(&s, flags);
    *broken = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = dg_tok_stream_push(tok, &s, ids[i], out);
        *broken |= dg_tok_utf8_valid_prefix((const uint8_t *)out, k) != k;
        memcpy(all + at, out, k);
        at += k;
    }
    size_t k = dg_tok_stream_finish(&s, out);
    memcpy(all + at, out, k);
    at += k;
    all[at] = 0;
    *len = at;
    return all;
}

static size_t json_ids(const json_t *a, int32_t **ids) {
    size_t n = json_array_size(a), i;
    json_t *v;
    *ids = malloc((n ? n : 1) * sizeof **ids);
    json_array_foreach(a, i, v) (*ids)[i] = (int32_t)json_integer_value(v);
    return n;
}

/* ---- reference vectors ------------------------------------------------------------------ */

TEST(tokenizer_ggml_qwen2_vectors) {
    char path[512];
    size_t in_len, out_len;
    snprintf(path, sizeof path, "%s/ggml-vocab-qwen2.gguf.inp", vocab_dir());
    char *inp = slurp(path, &in_len);
    snprintf(path, sizeof path, "%s/ggml-vocab-qwen2.gguf.out", vocab_dir());
    char *out = slurp(path, &out_len);
    CHECK(inp && out);
    if (!inp || !out) return;
    const char *sep = "\n__ggml_vocab_test__\n";
    char *t = inp, *o = out;
    int n = 0, ok = 0;
    for (char *end; (end = strstr(t, sep)); t = end + strlen(sep), n++) {
        char *eol = strchr(o, '\n');
        int32_t want[512];
        size_t n_want = 0;
        for (char *p = o; p < eol;) want[n_want++] = (int32_t)strtol(p, &p, 10);
        char label[32];
        snprintf(label, sizeof label, "vector %d", n);
        ok += encode_matches(qwen(), t, (size_t)(end - t), want, n_want, label);
        o = eol + 1;
    }
    CHECK_EQ_INT(n, 46);
    CHECK_EQ_INT(ok, 46);
    free(inp);
    free(out);
}

TEST(tokenizer_spec_examples) {
    dg_tok *tok = qwen();
    CHECK(encode_matches(tok, "Hello world", 11, (int32_t[]){9707, 1879}, 2, "Hello world"));
    CHECK(encode_matches(tok, " Hello world", 12, (int32_t[]){21927, 1879}, 2, " Hello world"));
    CHECK(encode_matches(tok, "", 0, NULL, 0, "empty"));
    CHECK_EQ_INT(dg_tok_added_id(tok, "<|endoftext|>"), 151643);
    CHECK_EQ_INT(dg_tok_added_id(tok, "<|im_end|>"), 151645);
    CHECK_EQ_INT(dg_tok_added_id(tok, "<|vision_start|>"), 151652);
    CHECK_EQ_INT(dg_tok_added_id(tok, "<|image_pad|>"), 151655);
    CHECK_EQ_INT(dg_tok_added_id(tok, "<tool_call>"), 151657);
    CHECK_EQ_INT(dg_tok_added_id(tok, "<BOV>"), DG_EINVAL);
    CHECK_EQ_INT(dg_tok_added_id(tok, "Hello"), DG_EINVAL);   /* a vocab token, not an added one */
    CHECK_EQ_INT(dg_tok_n_ids(tok), 151665);
}

/* ---- the corpus goldens ----------------------------------------------------------------- */

typedef struct {
    int n, encode_ok, decode_ok, skip_ok, stream_ok, nfc_ok, nfc_skipped, invalid;
} corpus_stats;

static void corpus_row(dg_tok *tok, json_t *row, corpus_stats *st) {
    const json_t *jt = json_object_get(row, "text"), *jh = json_object_get(row, "hex");
    char *text;
    size_t len;
    if (jt) {
        len = json_string_length(jt);
        text = malloc(len + 1);
        memcpy(text, json_string_value(jt), len);
    } else {
        const char *hex = json_string_value(jh);
        len = strlen(hex) / 2;
        text = malloc(len + 1);
        for (size_t i = 0; i < len; i++) sscanf(hex + 2 * i, "%2hhx", (unsigned char *)&text[i]);
        st->invalid++;
    }
    int32_t *want;
    size_t n_want = json_ids(json_object_get(row, "ids"), &want);
    char label[64];
    snprintf(label, sizeof label, "corpus row %d", st->n);
    st->encode_ok += encode_matches(tok, text, len, want, n_want, label);

    const json_t *jd = json_object_get(row, "decoded"), *js = json_object_get(row, "decoded_skip");
    size_t dl, sl, stl;
    int broken;
    char *dec = decode_all(tok, want, n_want, 0, &dl);
    char *skip = decode_all(tok, want, n_want, DG_TOK_SKIP_SPECIAL, &sl);
    char *stream = decode_stream(tok, want, n_want, 0, &stl, &broken);
    st->decode_ok += dec && dl == json_string_length(jd) && !memcmp(dec, json_string_value(jd), dl);
    if (!js) js = jd;
    st->skip_ok += skip && sl == json_string_length(js) && !memcmp(skip, json_string_value(js), sl);
    st->stream_ok += !broken && dec && stl == dl && !memcmp(stream, dec, dl);
    /* decode(encode(x)) == NFC(x) for valid x, except where the reference itself differs:
     * an added token followed by a mark that NFC would fuse with its last character */
    if (jt && json_is_true(json_object_get(row, "nfc_roundtrip"))) {
        uint8_t *nfc = NULL;
        utf8proc_ssize_t m = len ? utf8proc_map((const uint8_t *)text, (utf8proc_ssize_t)len, &nfc,
                                                 UTF8PROC_STABLE | UTF8PROC_COMPOSE) : 0;
        st->nfc_ok += dec && m == (utf8proc_ssize_t)dl && (dl == 0 || !memcmp(nfc, dec, dl));
        free(nfc);
    } else if (jt) {
        st->nfc_skipped++;
    }
    free(dec);
    free(skip);
    free(stream);
    free(want);
    free(text);
}

TEST(tokenizer_corpus_goldens) {
    json_error_t je;
    FILE *f = fopen("tests/golden/tokenizer/corpus.jsonl", "r");
    CHECK(f != NULL);
    if (!f) return;
    corpus_stats st = {0};
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *row = json_loads(line, JSON_ALLOW_NUL, &je);
        CHECK(row != NULL);
        if (!row) continue;
        corpus_row(qwen(), row, &st);
        json_decref(row);
        st.n++;
    }
    free(line);
    fclose(f);
    printf("  corpus: %d strings (%d invalid UTF-8): encode %d, decode %d, skip-special %d, stream %d, "
           "NFC round trip %d (+%d where the reference differs too)\n",
           st.n, st.invalid, st.encode_ok, st.decode_ok, st.skip_ok, st.stream_ok, st.nfc_ok, st.nfc_skipped);
    CHECK(st.n >= 2000);
    CHECK_EQ_INT(st.encode_ok, st.n);
    CHECK_EQ_INT(st.decode_ok, st.n);
    CHECK_EQ_INT(st.skip_ok, st.n);
    CHECK_EQ_INT(st.stream_ok, st.n);
    CHECK_EQ_INT(st.nfc_ok + st.nfc_skipped + st.invalid, st.n);
}

/* ---- invalid UTF-8 and streaming -------------------------------------------------------- */

/* Invalid UTF-8 is encoded as the reference encodes bytes.decode("utf-8", "replace"):
 * each maximal ill-formed subpart (Unicode §3.9) becomes one U+FFFD. */
TEST(tokenizer_invalid_utf8_is_replaced) {
    static const struct { const char *bytes, *replaced; } cases[] = {
        {"abc\xff" "def", "abc\xEF\xBF\xBD" "def"},
        {"\xe2\x82", "\xEF\xBF\xBD"},                            /* truncated: one subpart */
        {"\xe2\x82x", "\xEF\xBF\xBDx"},
        {"\xed\xa0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},   /* surrogate: three */
        {"\xc0\xaf", "\xEF\xBF\xBD\xEF\xBF\xBD"},                  /* overlong */
        {"\xf4\x90\x80\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
        {"\xf0\x9f\x98", "\xEF\xBF\xBD"},
        {"\xf0\x9f\x98\x80\x80", "\xF0\x9F\x98\x80\xEF\xBF\xBD"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        dg_tok_ids a = {0}, b = {0};
        char err[256];
        CHECK_EQ_INT(dg_tok_encode(qwen(), cases[c].bytes, strlen(cases[c].bytes), &a, err, sizeof err), 0);
        CHECK_EQ_INT(dg_tok_encode(qwen(), cases[c].replaced, strlen(cases[c].replaced), &b, err, sizeof err), 0);
        CHECK(a.n == b.n && !memcmp(a.ids, b.ids, a.n * sizeof *a.ids));
        dg_tok_ids_free(&a);
        dg_tok_ids_free(&b);
    }
}

TEST(tokenizer_stream_holds_partial_characters) {
    dg_tok *tok = qwen();
    /* the bytes of U+1F680 as four single-byte tokens, then 'x' */
    int32_t ids[] = {tok->byte_id[0xF0], tok->byte_id[0x9F], tok->byte_id[0x9A], tok->byte_id[0x80],
                     tok->byte_id['x'], tok->byte_id[0xE4], tok->byte_id[0xB8]};
    char out[DG_TOK_STREAM_OUT_MAX];
    dg_tok_stream s;
    dg_tok_stream_init(&s, 0);
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, ids[0], out), 0);
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, ids[1], out), 0);
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, ids[2], out), 0);
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, ids[3], out), 4);
    CHECK(!memcmp(out, "\xF0\x9F\x9A\x80", 4));
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, ids[4], out), 1);
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, ids[5], out), 0);
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, ids[6], out), 0);
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, 151645, out), 3 + 10);   /* broken char, then <|im_end|> */
    CHECK(!memcmp(out, "\xEF\xBF\xBD<|im_end|>", 13));
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, ids[0], out), 0);
    CHECK_EQ_INT(dg_tok_stream_finish(&s, out), 3);                    /* unfinished at the end */
    CHECK(!memcmp(out, "\xEF\xBF\xBD", 3));
    CHECK_EQ_INT(dg_tok_stream_push(tok, &s, 999999, out), 0);         /* no such token: nothing */
    size_t len;
    char *text = decode_all(tok, ids, 7, 0, &len);
    CHECK(text && len == 4 + 1 + 3 && !memcmp(text, "\xF0\x9F\x9A\x80x\xEF\xBF\xBD", len));
    free(text);
}

/* Long runs (1 MiB of one character class) encode and decode back exactly: the regex's
 * backtracking and BPE's heap on their worst inputs. Their speed is a benchmark's to
 * measure (dg-bench tokenizer), not a test's: the time is printed, never asserted. */
TEST(tokenizer_long_runs) {
    static const char *fill[] = {" ", "a", "\n \n", "1", "\xe4\xb8\xad", "!?", "\xcc\x81"};
    size_t n = 1 << 20;
    char *text = malloc(n + 2);
    for (size_t k = 0; k < sizeof fill / sizeof fill[0]; k++) {
        size_t fl = strlen(fill[k]), len = 0;
        while (len + fl <= n) { memcpy(text + len, fill[k], fl); len += fl; }
        text[len++] = 'z';
        dg_tok_ids ids = {0};
        char err[256], *back;
        size_t back_len;
        double t0 = (double)clock() / CLOCKS_PER_SEC;
        int rc = dg_tok_encode(qwen(), text, len, &ids, err, sizeof err);
        double dt = (double)clock() / CLOCKS_PER_SEC - t0;
        CHECK_EQ_INT(rc, 0);
        if (rc) printf("  fill %zu: %s\n", k, err);
        printf("  fill %zu: %zu bytes in %.2f s of CPU\n", k, len, dt);
        CHECK_EQ_INT(dg_tok_decode(qwen(), ids.ids, ids.n, 0, &back, &back_len, err, sizeof err), 0);
        if (k != 6) CHECK(back_len == len && !memcmp(back, text, len));   /* lone marks stay as they are */
        free(back);
        dg_tok_ids_free(&ids);
    }
    free(text);
}

/* PCRE2's match limit grows with the text: the regex backtracks once a byte over a run of
 * whitespace before a non-space, so a fixed limit (PCRE2's default 10^7) failed on 10 MB of
 * spaces, as DG_EINTERNAL: a broken engine, and the worker exited on it. Here the base is
 * lowered to 1000 so that a 200 KB run shows it: with the per-byte part the run encodes and
 * decodes back; without it the text is refused as over a limit (DG_ELIMIT), the message
 * naming PCRE2's. */
TEST(tokenizer_regex_match_limit_grows_with_the_text) {
    char err[512], *back = NULL;
    dg_tok *tok = NULL;
    CHECK_EQ_INT(dg_tok_open(vocab_dir(), &tok, err, sizeof err), 0);
    if (!tok) return;
    size_t n = 200000, back_len = 0;
    char *text = malloc(n + 1);
    memset(text, ' ', n);
    text[n] = 'z';
    tok->match_limit_base = 1000;
    dg_tok_ids ids = {0};
    int rc = dg_tok_encode(tok, text, n + 1, &ids, err, sizeof err);
    CHECK_EQ_INT(rc, 0);
    if (rc) printf("  %s\n", err);
    CHECK_EQ_INT(dg_tok_decode(tok, ids.ids, ids.n, 0, &back, &back_len, err, sizeof err), 0);
    CHECK(back && back_len == n + 1 && !memcmp(back, text, n + 1));
    free(back);
    dg_tok_ids_free(&ids);

    tok->match_limit_per_byte = 0;
    rc = dg_tok_encode(tok, text, n + 1, &ids, err, sizeof err);
    CHECK_EQ_INT(rc, DG_ELIMIT);
    CHECK(strstr(err, "text: the pre-tokenizer's regex failed 0 bytes into a segment of 200001: match limit") == err);
    if (rc != DG_ELIMIT || strstr(err, "match limit") == NULL) printf("  %s\n", err);
    dg_tok_ids_free(&ids);
    free(text);
    dg_tok_close(tok);
}

/* Combining marks of two classes, alternating in the wrong order: NFC's canonical ordering
 * (utf8proc swaps neighbours) costs their inversions, k*k for "a" + k acute (230) + k grave
 * below (220). Up to DG_TOK_NFC_SWAPS_MAX they are put in order, as NFC puts them (every
 * 220 before every 230, the first 230 composed with the base: Python's unicodedata gives
 * U+00E1, k U+0316, k - 1 U+0301); past it the text is refused at once instead of holding the worker
 * for minutes (256 KB of them took a minute). */
TEST(tokenizer_nfc_reordering_is_bounded) {
    for (int k = 1000; k <= 8192; k += 7192) {
        size_t n = 1 + 4 * (size_t)k, len = 0;
        char *text = malloc(n), err[256] = "";
        text[len++] = 'a';
        for (int i = 0; i < k; i++) text[len++] = (char)0xcc, text[len++] = (char)0x81;   /* U+0301 */
        for (int i = 0; i < k; i++) text[len++] = (char)0xcc, text[len++] = (char)0x96;   /* U+0316 */
        dg_tok_ids ids = {0};
        int rc = dg_tok_encode(qwen(), text, len, &ids, err, sizeof err);
        if (k > 4096) {   /* 67M swaps */
            CHECK_EQ_INT(rc, DG_ELIMIT);
            CHECK(strstr(err, "combining marks that NFC would reorder more than"));
        } else {          /* 1M swaps */
            CHECK_EQ_INT(rc, 0);
            char *back = NULL;
            size_t back_len = 0;
            CHECK_EQ_INT(dg_tok_decode(qwen(), ids.ids, ids.n, 0, &back, &back_len, err, sizeof err), 0);
            /* NFC: the 220s first, and the first 230 composes with the base (U+00E1) */
            int ordered = back_len == len - 1 && (unsigned char)back[0] == 0xc3 && (unsigned char)back[1] == 0xa1;
            for (int i = 0; ordered && i < k; i++) ordered = (unsigned char)back[2 + 2 * i + 1] == 0x96;
            for (int i = 0; ordered && i < k - 1; i++) ordered = (unsigned char)back[2 + 2 * (k + i) + 1] == 0x81;
            CHECK(ordered);
            free(back);
        }
        dg_tok_ids_free(&ids);
        free(text);
    }
}

/* ---- extra added tokens, tokenizer.json, load errors -------------------------------------- */

static char tmp_root[] = "/tmp/dg-tok-test-XXXXXX";
static int  tmp_made;   /* tmp_root was made (its last character says nothing: mkdtemp's
                           random one is an 'X' once in 62 runs, which made the next call
                           make it again, with EINVAL, and the cases fail) */

/* A fresh folder under tmp_root holding links to the shared vocab.json and merges.txt. */
static void make_dir(const char *name, char *dir, size_t cap, int links) {
    if (!tmp_made && mkdtemp(tmp_root)) tmp_made = 1;
    else if (!tmp_made) test_fail(__FILE__, __LINE__, "mkdtemp %s: %s", tmp_root, strerror(errno));
    snprintf(dir, cap, "%s/%s", tmp_root, name);
    if (!tmp_made) return;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        test_fail(__FILE__, __LINE__, "mkdir %s: %s", dir, strerror(errno));
    char src[1024], dst[1024], cwd[512];
    if (!getcwd(cwd, sizeof cwd)) return;
    static const char *files[] = {"vocab.json", "merges.txt", "tokenizer_config.json"};
    for (int k = 0; k < links; k++) {
        if (vocab_dir()[0] == '/') snprintf(src, sizeof src, "%s/%s", vocab_dir(), files[k]);
        else snprintf(src, sizeof src, "%s/%s/%s", cwd, vocab_dir(), files[k]);
        snprintf(dst, sizeof dst, "%s/%s", dir, files[k]);
        if (symlink(src, dst) != 0) printf("  symlink %s: failed\n", dst);
    }
}

static void write_text(const char *dir, const char *file, const char *text) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    unlink(path);
    FILE *f = fopen(path, "w");
    if (!f) {
        test_fail(__FILE__, __LINE__, "cannot write %s: %s", path, strerror(errno));
        return;
    }
    fputs(text, f);
    fclose(f);
}

static void rm_tree(void) {
    char cmd[256];
    if (!tmp_made) return;
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_root);
    if (system(cmd) != 0) printf("  could not remove %s\n", tmp_root);
}

static void golden_file_check(dg_tok *tok, const char *path, int *n, int *ok) {
    FILE *f = fopen(path, "r");
    char *line = NULL;
    size_t cap = 0;
    json_error_t je;
    while (f && getline(&line, &cap, f) > 0) {
        json_t *row = json_loads(line, JSON_ALLOW_NUL, &je);
        const json_t *jt = json_object_get(row, "text"), *jd = json_object_get(row, "decoded");
        const json_t *js = json_object_get(row, "decoded_skip");
        int32_t *want;
        size_t n_want = json_ids(json_object_get(row, "ids"), &want), dl, sl;
        int good = encode_matches(tok, json_string_value(jt), json_string_length(jt), want, n_want, "extra");
        char *dec = decode_all(tok, want, n_want, 0, &dl), *skip = decode_all(tok, want, n_want, DG_TOK_SKIP_SPECIAL, &sl);
        good &= dl == json_string_length(jd) && !memcmp(dec, json_string_value(jd), dl);
        good &= sl == json_string_length(js) && !memcmp(skip, json_string_value(js), sl);
        *ok += good;
        (*n)++;
        free(dec);
        free(skip);
        free(want);
        json_decref(row);
    }
    free(line);
    if (f) fclose(f);
}

TEST(tokenizer_extra_added_tokens) {
    char dir[1024], path[1024], err[512];
    make_dir("extra", dir, sizeof dir, 2);
    size_t len;
    char *cfg = slurp("tests/golden/tokenizer/extra_tokenizer_config.json", &len);
    CHECK(cfg != NULL);
    if (!cfg) return;
    write_text(dir, "tokenizer_config.json", cfg);
    free(cfg);
    dg_tok *tok;
    CHECK_EQ_INT(dg_tok_open(dir, &tok, err, sizeof err), 0);
    if (!tok) { printf("  %s\n", err); return; }
    CHECK_EQ_INT(dg_tok_added_id(tok, "<BOV>"), 151665);
    CHECK_EQ_INT(dg_tok_n_ids(tok), 151668);
    int n = 0, ok = 0;
    snprintf(path, sizeof path, "tests/golden/tokenizer/extra.jsonl");
    golden_file_check(tok, path, &n, &ok);
    CHECK(n >= 10);
    CHECK_EQ_INT(ok, n);
    dg_tok_close(tok);
}

/* Writes a tokenizer.json equivalent to the shared files (merges as strings or pairs). */
static int write_tokenizer_json(const char *dir, int pairs, const char *regex) {
    char path[1024];
    json_error_t je;
    snprintf(path, sizeof path, "%s/vocab.json", vocab_dir());
    json_t *vocab = json_load_file(path, 0, &je);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", vocab_dir());
    json_t *cfg = json_load_file(path, 0, &je);
    snprintf(path, sizeof path, "%s/merges.txt", vocab_dir());
    FILE *f = fopen(path, "r");
    if (!vocab || !cfg || !f) return -1;
    json_t *merges = json_array();
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    for (int line_no = 1; (n = getline(&line, &cap, f)) > 0; line_no++) {
        if (line_no == 1 && !strncmp(line, "#version", 8)) continue;
        line[n - 1] = 0;
        char *sp = strchr(line, ' ');
        *sp = 0;
        json_array_append_new(merges, pairs ? json_pack("[ss]", line, sp + 1)
                                            : json_sprintf("%s %s", line, sp + 1));
    }
    free(line);
    fclose(f);
    json_t *added = json_array();
    const char *key;
    json_t *v;
    json_object_foreach(json_object_get(cfg, "added_tokens_decoder"), key, v) {
        json_t *a = json_deep_copy(v);
        json_object_set_new(a, "id", json_integer(atoi(key)));
        json_array_append_new(added, a);
    }
    json_t *bl = json_pack("{ss sb sb sb}", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 0, "use_regex", 0);
    json_t *j = json_pack(
        "{s:s, s:o, s:{s:s}, s:{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, O]}, s:O, s:O,"
        " s:{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:b, s:o, s:o}}",
        "version", "1.0", "added_tokens", added, "normalizer", "type", "NFC", "pre_tokenizer", "type", "Sequence",
        "pretokenizers", "type", "Split", "pattern", "Regex", regex, "behavior", "Isolated", "invert", 0, bl,
        "post_processor", bl, "decoder", bl, "model", "type", "BPE", "dropout", "unk_token",
        "continuing_subword_prefix", "", "end_of_word_suffix", "", "fuse_unk", 0, "byte_fallback", 0,
        "ignore_merges", 0, "vocab", vocab, "merges", merges);
    json_decref(bl);
    json_decref(cfg);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    int rc = j ? json_dump_file(j, path, 0) : -1;
    json_decref(j);
    return rc;
}

TEST(tokenizer_json_layout) {
    for (int pairs = 0; pairs < 2; pairs++) {
        char dir[1024], err[512];
        /* with pairs, the folder also holds vocab.json, merges.txt (unused: tokenizer.json
         * wins) and tokenizer_config.json (whose added tokens repeat tokenizer.json's) */
        make_dir(pairs ? "json-pairs" : "json-strings", dir, sizeof dir, pairs ? 3 : 0);
        CHECK_EQ_INT(write_tokenizer_json(dir, pairs, DG_TOK_QWEN2_REGEX), 0);
        dg_tok *tok;
        CHECK_EQ_INT(dg_tok_open(dir, &tok, err, sizeof err), 0);
        if (!tok) { printf("  %s\n", err); continue; }
        CHECK_EQ_INT(dg_tok_n_ids(tok), 151665);
        CHECK_EQ_INT(dg_tok_added_id(tok, "<|im_end|>"), 151645);
        /* the same ids as the vocab.json + merges.txt tokenizer on the corpus */
        FILE *f = fopen("tests/golden/tokenizer/corpus.jsonl", "r");
        char *line = NULL;
        size_t cap = 0;
        int n = 0, ok = 0;
        json_error_t je;
        while (f && getline(&line, &cap, f) > 0 && n < 400) {
            json_t *row = json_loads(line, JSON_ALLOW_NUL, &je);
            const json_t *jt = json_object_get(row, "text");
            if (jt) {
                int32_t *want;
                size_t n_want = json_ids(json_object_get(row, "ids"), &want);
                ok += encode_matches(tok, json_string_value(jt), json_string_length(jt), want, n_want, "json");
                n++;
                free(want);
            }
            json_decref(row);
        }
        free(line);
        if (f) fclose(f);
        CHECK_EQ_INT(ok, n);
        dg_tok_close(tok);
    }
    char dir[1024], err[512];
    dg_tok *tok;
    make_dir("json-other-regex", dir, sizeof dir, 0);
    CHECK_EQ_INT(write_tokenizer_json(dir, 0, "\\p{N}{1,3}|\\s+"), 0);
    CHECK_EQ_INT(dg_tok_open(dir, &tok, err, sizeof err), DG_EMODEL);
    CHECK(tok == NULL && strstr(err, "tokenizer.json") && strstr(err, "pre_tokenizer"));
}

/* Each broken layout fails with DG_EMODEL and a message naming the file and the fault. */
TEST(tokenizer_load_errors) {
    static const struct {
        const char *name, *file, *text, *want1, *want2;
        int links;   /* how many of vocab.json, merges.txt, tokenizer_config.json to link */
    } cases[] = {
        {"empty", NULL, NULL, "vocab.json", "cannot read", 0},
        {"no-merges", NULL, NULL, "merges.txt", "cannot read", 1},
        {"no-config", NULL, NULL, "tokenizer_config.json", "cannot read", 2},
        {"bad-vocab", "vocab.json", "{\"a\": 0, \"b\": ", "vocab.json", "not valid JSON: line 1", 0},
        {"vocab-array", "vocab.json", "[1, 2]", "vocab.json", "not a JSON object", 0},
        {"vocab-id", "vocab.json", "{\"a\": \"x\"}", "vocab.json", "token \"a\"", 0},
        {"vocab-alphabet", "vocab.json", "{\"a b\": 1}", "vocab.json", "byte-level alphabet", 0},
        {"merge-3", "merges.txt", "#version: 0.2\n\xc4\xa0 t x\n", "merges.txt: line 2", "two tokens", 1},
        {"merge-unknown", "merges.txt", "zz\xc3\xbf q\n", "merges.txt: line 1", "\"zz\xc3\xbf\" is not in the vocabulary", 1},
        {"merge-result", "merges.txt", "#version: 0.2\n! \xc4\xa0\n", "merges.txt: line 2", "merge \"!\xc4\xa0\" is not in", 1},
        {"config-json", "tokenizer_config.json", "{\"added_tokens_decoder\": {\"5\": }}", "tokenizer_config.json",
         "not valid JSON", 2},
        {"config-lstrip", "tokenizer_config.json",
         "{\"added_tokens_decoder\": {\"151700\": {\"content\": \"<x>\", \"lstrip\": true}}}",
         "tokenizer_config.json", "lstrip true is not supported", 2},
        {"config-clash", "tokenizer_config.json",
         "{\"added_tokens_decoder\": {\"151700\": {\"content\": \"<x>\"}, \"151701\": {\"content\": \"<x>\"}}}",
         "tokenizer_config.json", "conflicts", 2},
        {"config-key", "tokenizer_config.json", "{\"added_tokens_decoder\": {\"x1\": {\"content\": \"<x>\"}}}",
         "tokenizer_config.json", "not an id", 2},
        {"tokenizer-json", "tokenizer.json", "{\"model\": {\"type\": \"WordPiece\"}}", "tokenizer.json",
         "not a BPE model", 0},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char dir[1024], err[512] = "";
        make_dir(cases[c].name, dir, sizeof dir, cases[c].links);
        if (cases[c].file) write_text(dir, cases[c].file, cases[c].text);
        dg_tok *tok = (dg_tok *)1;
        int rc = dg_tok_open(dir, &tok, err, sizeof err);
        CHECK_EQ_INT(rc, DG_EMODEL);
        CHECK(tok == NULL);
        if (!strstr(err, cases[c].want1) || !strstr(err, cases[c].want2) || !strstr(err, dir)) {
            printf("  %s: unexpected message: %s\n", cases[c].name, err);
            CHECK(0);
        }
    }
}

/* ---- internals ------------------------------------------------------------------------ */

static size_t first_piece(const dg_tok *t, pcre2_match_data *md, const uint8_t *s, size_t n) {
    return pcre2_match(t->regex, s, n, 0, PCRE2_NO_UTF_CHECK, md, NULL) < 0 ? 0 : pcre2_get_ovector_pointer(md)[1];
}

/* The regex classes every code point as the reference's does (letter, number, space,
 * other), found with the probes of make_tokenizer_goldens.py unicode_classes(). */
TEST(tokenizer_regex_unicode_classes) {
    static char want[0x110000];
    FILE *f = fopen("tests/golden/tokenizer/unicode_classes.txt", "r");
    CHECK(f != NULL);
    if (!f) return;
    unsigned a, b;
    char c;
    while (fscanf(f, "%x %x %c", &a, &b, &c) == 3)
        for (unsigned x = a; x <= b && x < 0x110000; x++) want[x] = c;
    fclose(f);
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    int bad = 0, checked = 0;
    for (int32_t cp = 0; cp < 0x110000; cp++) {
        if (cp >= 0xD800 && cp <= 0xDFFF) continue;
        uint8_t p1[8], p2[8];
        size_t lx = (size_t)utf8proc_encode_char(cp, p1);
        p1[lx] = '!';
        p2[0] = ' ';
        utf8proc_encode_char(cp, p2 + 1);
        p2[lx + 1] = '\n';
        size_t l1 = first_piece(qwen(), md, p1, lx + 1), l2 = first_piece(qwen(), md, p2, lx + 2);
        char got = l1 == lx + 1 ? 'O' : l2 == lx + 1 ? 'L' : l2 == 1 ? 'N' : 'W';
        checked++;
        if (got != want[cp] && bad++ < 5) printf("  U+%04X: regex class %c, reference %c\n", cp, got, want[cp]);
    }
    pcre2_match_data_free(md);
    CHECK_EQ_INT(bad, 0);
    CHECK_EQ_INT(checked, 0x110000 - 0x800);
}

/* Every code point the NFC fast path lets through must really be NFC-stable in any
 * string of such code points (see dg_tok_nfc_stable), by utf8proc's own tables. */
TEST(tokenizer_nfc_fast_path_is_sound) {
    static uint8_t second[0x110000 / 8];   /* appears after the first place of a decomposition */
    for (int32_t cp = 0; cp < 0x110000; cp++) {
        utf8proc_int32_t d[32];
        int last;
        utf8proc_ssize_t n = utf8proc_decompose_char(cp, d, 32, UTF8PROC_DECOMPOSE, &last);
        for (utf8proc_ssize_t k = 1; k < n; k++) second[d[k] / 8] |= (uint8_t)(1 << (d[k] % 8));
    }
    int bad = 0, checked = 0;
    for (int32_t cp = 0; cp < 0x110000; cp++) {
        if (!dg_tok_nfc_stable((uint32_t)cp) || (cp >= 0xD800 && cp <= 0xDFFF)) continue;
        checked++;
        utf8proc_int32_t d[32];
        int last;
        utf8proc_ssize_t n = utf8proc_decompose_char(cp, d, 32, UTF8PROC_DECOMPOSE, &last);
        uint8_t s[8], *nfc = NULL;
        utf8proc_ssize_t len = utf8proc_encode_char(cp, s);
        utf8proc_ssize_t m = utf8proc_map(s, len, &nfc, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        int ok = n >= 1 && m == len && !memcmp(nfc, s, (size_t)len) && !(second[cp / 8] & (1 << (cp % 8))) &&
                 !(second[d[0] / 8] & (1 << (d[0] % 8))) && utf8proc_get_property(d[0])->combining_class == 0;
        if (!ok && bad++ < 5) printf("  U+%04X is not NFC-stable\n", cp);
        free(nfc);
    }
    CHECK_EQ_INT(bad, 0);
    CHECK(checked > 30000);
}

/* The reference's NFC as a model: utf8proc on the text between opaque code points (which
 * stay as they are). Returns a malloc'd string. */
static uint8_t *nfc_model(const uint8_t *s, size_t n, size_t *len) {
    uint8_t *out = malloc(4 * n + 16);
    size_t o = 0, part = 0, i = 0;
    while (i <= n) {
        utf8proc_int32_t cp = -1;
        size_t at = i;
        if (i < n) i += (size_t)utf8proc_iterate(s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (at < n && !dg_tok_nfc_opaque((uint32_t)cp)) continue;
        uint8_t *nfc = NULL;
        utf8proc_ssize_t m = at > part ? utf8proc_map(s + part, (utf8proc_ssize_t)(at - part), &nfc,
                                                       UTF8PROC_STABLE | UTF8PROC_COMPOSE) : 0;
        if (m > 0) memcpy(out + o, nfc, (size_t)m);
        o += (size_t)m;
        free(nfc);
        memcpy(out + o, s + at, i - at);   /* the opaque code point */
        o += i - at;
        part = i;
        if (at == n) break;
    }
    *len = o;
    return out;
}

/* dg_tok_nfc (utf8proc only on the spans that can change) equals the model on random
 * mixes of stable, unstable and opaque code points. */
TEST(tokenizer_nfc_spans_equal_whole_text) {
    static const uint32_t pool[] = {'a', 'e', 'A', ' ', '>', '=', 0xC5, 0xE9, 0x300, 0x301, 0x308, 0x316, 0x323, 0x338,
                                    0x344, 0x3B1, 0x386, 0x387, 0x391, 0x1F71, 0x915, 0x93C, 0x94D, 0x958, 0x1100,
                                    0x1161, 0x11A8, 0xAC00, 0x304B, 0x3099, 0x4E00, 0xF900, 0x212B, 0x2126, 0x1E9B,
                                    0x0E4D, 0x0E32, 0x0627, 0x0653, 0x05E9, 0x05C1, 0x1F600, 0x200D, 0xFE0F,
                                    0x07FD, 0x10EFD, 0x11935, 0x11930, 0x1ABF, 0x0321};
    uint64_t rng = 12345;
    int bad = 0;
    for (int r = 0; r < 20000; r++) {
        uint8_t s[256];
        size_t n = 0;
        for (int k = 0, len = 1 + r % 24; k < len; k++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            n += (size_t)utf8proc_encode_char((utf8proc_int32_t)pool[(rng >> 33) % (sizeof pool / sizeof pool[0])], s + n);
        }
        uint8_t *ours, *whole;
        size_t ours_len;
        CHECK_EQ_INT(dg_tok_nfc(s, n, &ours, &ours_len), 0);
        size_t m;
        whole = nfc_model(s, n, &m);
        const uint8_t *got = ours ? ours : s;
        size_t got_len = ours ? ours_len : n;
        if (m != got_len || memcmp(got, whole, got_len)) bad++;
        free(ours);
        free(whole);
    }
    CHECK_EQ_INT(bad, 0);
}

static int nfc_equals(const char *in, size_t n, const char *want, size_t want_len) {
    uint8_t *out;
    size_t len;
    if (dg_tok_nfc((const uint8_t *)in, n, &out, &len) < 0) return 0;
    int same = out ? len == want_len && !memcmp(out, want, len) : n == want_len && !memcmp(in, want, n);
    free(out);
    return same;
}

/* NFC as the reference does it, whose Unicode tables are older than utf8proc's: every
 * canonical decomposition, and which code points it treats as combining. */
TEST(tokenizer_nfc_matches_reference) {
    json_error_t je;
    json_t *j = json_load_file("tests/golden/tokenizer/nfc.json", 0, &je);
    CHECK(j != NULL);
    if (!j) return;
    size_t i;
    json_t *c;
    int bad = 0, n = 0;
    json_array_foreach(json_object_get(j, "cases"), i, c) {
        const json_t *t = json_object_get(c, "text"), *w = json_object_get(c, "nfc");
        n++;
        if (!nfc_equals(json_string_value(t), json_string_length(t), json_string_value(w), json_string_length(w)) &&
            bad++ < 5)
            printf("  NFC of case %zu differs\n", i);
    }
    CHECK(n > 4000);
    CHECK_EQ_INT(bad, 0);

    static char ref[0x110000];
    const char *run;
    json_t *v;
    json_array_foreach(json_object_get(j, "combining"), i, v) {
        unsigned a, b;
        run = json_string_value(v);
        if (sscanf(run, "%x-%x", &a, &b) == 2)
            for (unsigned x = a; x <= b && x < 0x110000; x++) ref[x] = 1;
    }
    json_decref(j);
    bad = 0;
    for (int32_t cp = 0; cp < 0x110000; cp++) {
        if (cp >= 0xD800 && cp <= 0xDFFF) continue;
        uint8_t x[4], in[8], *out;
        size_t lx = (size_t)utf8proc_encode_char(cp, x), len;
        /* the generator's probes: "\u0345" + X reordered, or X + "\u0300" reordered */
        memcpy(in, "\xCD\x85", 2);
        memcpy(in + 2, x, lx);
        dg_tok_nfc(in, lx + 2, &out, &len);
        int combining = out && (len != lx + 2 || memcmp(out, in, len)) && len >= 2 && !memcmp(out + len - 2, "\xCD\x85", 2);
        free(out);
        memcpy(in, x, lx);
        memcpy(in + lx, "\xCC\x80", 2);
        dg_tok_nfc(in, lx + 2, &out, &len);
        combining |= cp != 0x300 && out && len >= 2 && !memcmp(out, "\xCC\x80", 2);
        free(out);
        if (combining != ref[cp] && bad++ < 5) printf("  U+%04X: combining %d, reference %d\n", cp, combining, ref[cp]);
    }
    CHECK_EQ_INT(bad, 0);
}

/* The memo is shared: threads that encode at once get the same ids as one thread. */
static const char *thread_texts[] = {"Hello world, this is a test of the memo.", "\xe4\xbd\xa0\xe5\xa5\xbd, tokens",
                                     "  spaces   and\ttabs\r\n", "don't you WE'LL 12345"};
static dg_tok_ids thread_want[4];

static void *encode_in_thread(void *arg) {
    size_t *bad = arg;
    for (int r = 0; r < 300; r++)
        for (size_t k = 0; k < 4; k++) {
            dg_tok_ids a = {0};
            char err[256];
            dg_tok_encode(qwen(), thread_texts[k], strlen(thread_texts[k]), &a, err, sizeof err);
            *bad += a.n != thread_want[k].n || memcmp(a.ids, thread_want[k].ids, a.n * sizeof *a.ids);
            dg_tok_ids_free(&a);
        }
    return NULL;
}

TEST(tokenizer_shared_by_threads) {
    char err[256];
    for (size_t k = 0; k < 4; k++)
        CHECK_EQ_INT(dg_tok_encode(qwen(), thread_texts[k], strlen(thread_texts[k]), &thread_want[k], err, sizeof err), 0);
    pthread_t th[4];
    size_t bad[4] = {0};
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, encode_in_thread, &bad[i]);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 4; i++) CHECK_EQ_INT(bad[i], 0);
    for (size_t k = 0; k < 4; k++) dg_tok_ids_free(&thread_want[k]);
}

int main(void) {
    int rc = test_main();
    rm_tree();
    dg_tok_close(qwen());
    return rc;
}
