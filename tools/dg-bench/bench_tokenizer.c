/* bench_tokenizer — Qwen2 tokenizer encode and decode throughput, one thread.
 *
 * The corpus is 10 MB (1 MB with --quick) of mixed text made here from a fixed seed:
 * English-like prose with rare words, Chinese, code, other scripts (Cyrillic, Greek,
 * Arabic, Devanagari), numbers and dates, emoji with ZWJ sequences, whitespace runs and
 * CRLF, and chat turns with special tokens; documents are lines. It is written to
 * build/bench/tokenizer-corpus.txt so that tools/reference/bench_tokenizers.py times the
 * Hugging Face tokenizers library on the same bytes. Figures (MB = 1e6 bytes):
 *   encode_whole_mb_s   the corpus as one text
 *   encode_lines_mb_s   each line (document) as its own call
 *   decode_mb_s         the ids of the whole corpus back to text
 * The vocabulary is --vocab DIR, --model DIR (DIR/mllm), $DG_TOK_VOCAB or tools/mkmodel/vocab/qwen2.
 * The Hugging Face tokenizers baseline runs after this, on the corpus just written
 * (`make bench-tokenizer`: tools/reference/bench_tokenizers.py), and compares itself with
 * this run's report; nothing here reads an earlier run's figures. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bench.h"
#include "text/tokenizer.h"

#define CORPUS_PATH "build/bench/tokenizer-corpus.txt"

typedef struct {
    char    *s;
    size_t   n, cap;
    uint64_t rng;
} corpus;

static uint64_t next(corpus *c) {   /* splitmix64 */
    uint64_t z = (c->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static size_t pick(corpus *c, size_t n) { return (size_t)(next(c) % n); }

static void put(corpus *c, const char *s, size_t n) {
    if (c->n + n + 1 > c->cap) {
        c->cap = 2 * (c->n + n + 1);
        c->s = realloc(c->s, c->cap);
    }
    memcpy(c->s + c->n, s, n);
    c->n += n;
}

static void puts_(corpus *c, const char *s) { put(c, s, strlen(s)); }

static void put_cp(corpus *c, uint32_t cp) {
    char b[4];
    size_t n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    static const uint8_t lead[5] = {0, 0, 0xC0, 0xE0, 0xF0};
    for (size_t k = n - 1; k > 0; k--, cp >>= 6) b[k] = (char)(0x80 | (cp & 0x3F));
    b[0] = (char)(lead[n] | cp);
    put(c, b, n);
}

static const char *const english[] = {
    "the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as",
    "I", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "not", "word", "but", "what",
    "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an",
    "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write",
    "would", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more",
    "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water",
    "than", "call", "first", "who", "may", "down", "side", "been", "now", "find", "image", "model", "picture",
    "generate", "diffusion", "transformer", "language", "interleaved", "answer", "question", "however", "because",
    "between", "important", "different", "following", "something", "government", "information", "development",
    "don't", "it's", "we'll", "they're", "I've", "you'd", "isn't", "children", "example", "beautiful", "mountain",
};
static const char *const punct[] = {",", ",", ".", ";", ":", "!", "?", " -", " (", ")", "\"", "'"};
static const char *const emoji[] = {"😀", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵",
                                    "❤️", "✅", "🤷🏼‍♂️", "🦀", "🎉", "🙏"};
static const char *const code_kw[] = {"if", "for", "while", "return", "int", "const", "def", "self", "static", "void",
                                      "import", "from", "class", "struct", "None", "NULL", "true", "false"};

static void english_doc(corpus *c) {
    size_t words = 20 + pick(c, 200);
    for (size_t w = 0; w < words; w++) {
        if (w) puts_(c, " ");
        if (pick(c, 100) < 8) {          /* a rare word: random letters */
            size_t n = 4 + pick(c, 9);
            for (size_t k = 0; k < n; k++) put_cp(c, 'a' + (uint32_t)pick(c, 26));
        } else if (pick(c, 100) < 3) {
            char num[32];
            snprintf(num, sizeof num, "%zu", pick(c, 100000));
            puts_(c, num);
        } else {
            const char *s = english[pick(c, sizeof english / sizeof english[0])];
            if (w == 0 || pick(c, 100) < 5) {   /* capitalised */
                put_cp(c, (uint32_t)(s[0] >= 'a' ? s[0] - 32 : s[0]));
                puts_(c, s + 1);
            } else {
                puts_(c, s);
            }
        }
        if (pick(c, 100) < 12) puts_(c, punct[pick(c, sizeof punct / sizeof punct[0])]);
    }
    puts_(c, ".");
}

static void chinese_doc(corpus *c) {
    size_t runs = 3 + pick(c, 20);
    for (size_t r = 0; r < runs; r++) {
        size_t n = 3 + pick(c, 25);
        for (size_t k = 0; k < n; k++) {
            /* a skewed pick: most characters from the first 3000 of the block */
            uint32_t span = pick(c, 10) < 8 ? 3000 : 20900;
            put_cp(c, 0x4E00 + (uint32_t)pick(c, span));
        }
        if (pick(c, 10) == 0) { puts_(c, " Qwen2.5-VL "); }
        puts_(c, pick(c, 3) ? "，" : "。");
    }
}

static void code_doc(corpus *c) {
    size_t lines = 3 + pick(c, 30);
    for (size_t l = 0; l < lines; l++) {
        size_t indent = 4 * pick(c, 4);
        for (size_t k = 0; k < indent; k++) puts_(c, " ");
        char line[160];
        snprintf(line, sizeof line, "%s (%s_%zu %s %zu) { %s(%s_%zu, \"%s\"); }", code_kw[pick(c, 18)],
                 english[pick(c, 60)], pick(c, 100), pick(c, 2) ? ">=" : "==", pick(c, 4096), english[pick(c, 60)],
                 code_kw[pick(c, 18)], pick(c, 10), english[pick(c, 100)]);
        puts_(c, line);
        puts_(c, pick(c, 5) ? "\n" : "\r\n");
    }
}

static void script_doc(corpus *c) {
    static const uint32_t base[][2] = {{0x430, 32}, {0x3B1, 25}, {0x627, 26}, {0x915, 37}};
    size_t s = pick(c, 4), words = 10 + pick(c, 60);
    for (size_t w = 0; w < words; w++) {
        size_t n = 2 + pick(c, 9);
        for (size_t k = 0; k < n; k++) put_cp(c, base[s][0] + (uint32_t)pick(c, base[s][1]));
        puts_(c, pick(c, 10) ? " " : ", ");
    }
}

static void misc_doc(corpus *c) {
    char buf[96];
    switch (pick(c, 4)) {
    case 0:
        snprintf(buf, sizeof buf, "%04zu-%02zu-%02zu %02zu:%02zu:%02zu %zu.%03zu%% ", 1990 + pick(c, 40), 1 + pick(c, 12),
                 1 + pick(c, 28), pick(c, 24), pick(c, 60), pick(c, 60), pick(c, 1000), pick(c, 1000));
        puts_(c, buf);
        break;
    case 1:
        for (size_t k = 0, n = 1 + pick(c, 8); k < n; k++) {
            puts_(c, emoji[pick(c, sizeof emoji / sizeof emoji[0])]);
            puts_(c, pick(c, 2) ? " " : "");
        }
        break;
    case 2:
        for (size_t k = 0, n = 1 + pick(c, 40); k < n; k++) puts_(c, pick(c, 4) ? " " : "\t");
        puts_(c, "end\r\n\r\n");
        break;
    default:
        puts_(c, "<|im_start|>user\n");
        english_doc(c);
        puts_(c, "<|vision_start|><|image_pad|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n");
        chinese_doc(c);
        puts_(c, "<|im_end|>");
    }
}

static void corpus_build(corpus *c, size_t bytes) {
    *c = (corpus){.rng = 20260426};
    while (c->n < bytes) {
        size_t r = pick(c, 100);
        if (r < 45) english_doc(c);
        else if (r < 60) chinese_doc(c);
        else if (r < 75) code_doc(c);
        else if (r < 85) script_doc(c);
        else misc_doc(c);
        puts_(c, "\n");
    }
    c->s[c->n] = 0;
}

static int bench_tokenizer(bench_ctx *ctx, json_t *out) {
    char dir[4096], err[512];
    const char *env = getenv("DG_TOK_VOCAB");
    if (ctx->vocab_dir) snprintf(dir, sizeof dir, "%s", ctx->vocab_dir);
    else if (ctx->model_dir) snprintf(dir, sizeof dir, "%s/mllm", ctx->model_dir);
    else snprintf(dir, sizeof dir, "%s", env ? env : "tools/mkmodel/vocab/qwen2");
    double t0 = bench_now_ms();
    dg_tok *tok;
    if (dg_tok_open(dir, &tok, err, sizeof err) < 0) {
        fprintf(stderr, "bench_tokenizer: %s\n", err);
        return -1;
    }
    bench_record(out, "load_ms", bench_now_ms() - t0, "ms");

    corpus c;
    corpus_build(&c, ctx->quick ? 1000000 : 10000000);
    mkdir("build", 0755);
    mkdir("build/bench", 0755);
    FILE *f = fopen(CORPUS_PATH, "wb");
    if (f) {
        fwrite(c.s, 1, c.n, f);
        fclose(f);
    }
    printf("  corpus: %zu bytes in %s\n", c.n, CORPUS_PATH);
    json_object_set_new(out, "corpus_bytes", json_integer((json_int_t)c.n));

    dg_tok_ids ids = {0};
    double best = 1e30;
    int rc = 0;
    for (int rep = 0; rep < 3 && rc == 0; rep++) {   /* best of 3; the first also warms the memo */
        ids.n = 0;
        t0 = bench_now_ms();
        rc = dg_tok_encode(tok, c.s, c.n, &ids, err, sizeof err);
        double dt = bench_now_ms() - t0;
        best = dt < best ? dt : best;
    }
    if (rc == 0) {
        double whole = c.n / 1e3 / best;
        json_object_set_new(out, "tokens", json_integer((json_int_t)ids.n));
        bench_record(out, "encode_whole_mb_s", whole, "MB/s");

        dg_tok_ids line_ids = {0};
        t0 = bench_now_ms();
        for (char *p = c.s, *end = c.s + c.n; p < end && rc == 0;) {
            char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t n = nl ? (size_t)(nl - p + 1) : (size_t)(end - p);
            line_ids.n = 0;
            rc = dg_tok_encode(tok, p, n, &line_ids, err, sizeof err);
            p += n;
        }
        double lines = c.n / 1e3 / (bench_now_ms() - t0);
        bench_record(out, "encode_lines_mb_s", lines, "MB/s");
        dg_tok_ids_free(&line_ids);

        char *text;
        size_t len;
        t0 = bench_now_ms();
        if (dg_tok_decode(tok, ids.ids, ids.n, 0, &text, &len, err, sizeof err) == 0) {
            bench_record(out, "decode_mb_s", len / 1e3 / (bench_now_ms() - t0), "MB/s");
            free(text);
        }
    }
    if (rc) fprintf(stderr, "bench_tokenizer: %s\n", err);
    dg_tok_ids_free(&ids);
    free(c.s);
    dg_tok_close(tok);
    return rc;
}

DG_BENCH(tokenizer, "Qwen2 tokenizer encode/decode MB/s on a 10 MB mixed corpus, one thread", bench_tokenizer)
