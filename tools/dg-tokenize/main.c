/* dg-tokenize — the tokenizer on the command line.
 *
 *   dg-tokenize (--model DIR | --vocab DIR) [--raw] [--decode [--skip-special]]
 *
 * --model takes a model package (its tokenizer is in DIR/mllm), --vocab a folder that
 * holds the tokenizer files themselves. Without --raw each line of standard input (its
 * "\n" or "\r\n" removed) is one text, and one line of space-separated ids is printed per
 * line; with --raw all of standard input is one text. --decode goes back: each line of ids
 * becomes one line of text (with --raw, all the ids become one text, printed as it is).
 */
#include "duogen.h"
#include "text/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The usage: asked for (--help), on standard output and exit 0; else on standard error, 2. */
static int usage(int asked) {
    fprintf(asked ? stdout : stderr, "usage: dg-tokenize (--model DIR | --vocab DIR) [--raw] [--decode [--skip-special]] < input\n");
    return asked ? 0 : 2;
}

static char *read_all(FILE *f, size_t *len) {
    size_t cap = 1 << 16, n = 0, got;
    char *buf = malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *p = realloc(buf, cap *= 2);
            if (!p) free(buf);
            buf = p;
        }
    }
    *len = n;
    return buf;
}

static int encode_one(const dg_tok *tok, const char *text, size_t len) {
    dg_tok_ids ids = {0};
    char err[512];
    int rc = dg_tok_encode(tok, text, len, &ids, err, sizeof err);
    if (rc < 0) fprintf(stderr, "dg-tokenize: %s\n", err);
    for (size_t i = 0; rc == 0 && i < ids.n; i++) printf(i ? " %d" : "%d", ids.ids[i]);
    if (rc == 0) putchar('\n');
    dg_tok_ids_free(&ids);
    return rc;
}

/* Parses space-separated ids of s[0..len) and writes their text. */
static int decode_one(const dg_tok *tok, const char *s, size_t len, unsigned flags, int newline) {
    dg_tok_ids ids = {0};
    char err[512], *text = NULL, *end;
    size_t text_len;
    int rc = 0;
    for (size_t i = 0; i < len && rc == 0;) {
        if (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') { i++; continue; }
        long v = strtol(s + i, &end, 10);
        if (end == s + i || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "dg-tokenize: not a token id: \"%.20s\"\n", s + i);
            rc = DG_EINVAL;
        } else {
            rc = dg_tok_ids_push(&ids, (int32_t)v);
            i = (size_t)(end - s);
        }
    }
    if (rc == 0 && (rc = dg_tok_decode(tok, ids.ids, ids.n, flags, &text, &text_len, err, sizeof err)) < 0)
        fprintf(stderr, "dg-tokenize: %s\n", err);
    if (rc == 0) {
        fwrite(text, 1, text_len, stdout);
        if (newline) putchar('\n');
    }
    free(text);
    dg_tok_ids_free(&ids);
    return rc;
}

int main(int argc, char **argv) {
    const char *model = NULL, *vocab = NULL;
    int raw = 0, decode = 0;
    unsigned flags = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return usage(1);
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--vocab") && i + 1 < argc) vocab = argv[++i];
        else if (!strcmp(argv[i], "--raw")) raw = 1;
        else if (!strcmp(argv[i], "--decode")) decode = 1;
        else if (!strcmp(argv[i], "--skip-special")) flags |= DG_TOK_SKIP_SPECIAL;
        else return usage(0);
    }
    if (!model == !vocab) return usage(0);
    char dir[4096], err[512];
    if (model) snprintf(dir, sizeof dir, "%s/mllm", model);
    else snprintf(dir, sizeof dir, "%s", vocab);
    dg_tok *tok;
    if (dg_tok_open(dir, &tok, err, sizeof err) < 0) {
        fprintf(stderr, "dg-tokenize: %s\n", err);
        return 1;
    }
    int rc = 0;
    if (raw) {
        size_t len;
        char *all = read_all(stdin, &len);
        if (!all) rc = DG_ENOMEM;
        else rc = decode ? decode_one(tok, all, len, flags, 0) : encode_one(tok, all, len);
        free(all);
    } else {
        char *line = NULL;
        size_t cap = 0;
        ssize_t n;
        while (rc == 0 && (n = getline(&line, &cap, stdin)) >= 0) {
            if (n > 0 && line[n - 1] == '\n') n--;
            if (n > 0 && line[n - 1] == '\r') n--;
            rc = decode ? decode_one(tok, line, (size_t)n, flags, 1) : encode_one(tok, line, (size_t)n);
        }
        free(line);
    }
    dg_tok_close(tok);
    if (fflush(stdout) != 0) rc = DG_EINVAL;
    return rc == 0 ? 0 : 1;
}
