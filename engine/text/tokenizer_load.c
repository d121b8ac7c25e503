/* tokenizer_load.c — reads a Hugging Face tokenizer folder into dg_tok_files.
 *
 * Two published layouts: tokenizer.json (the fast tokenizer's one file), or vocab.json +
 * merges.txt (+ tokenizer_config.json for the added tokens), which is what the reference
 * converts into the same tokenizer. Every error names the file and what is wrong in it. */
#include "text/tokenizer_internal.h"
#include "duogen.h"
#include "io/file.h"
#include "io/json_config.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <utf8proc.h>

#define DG_TOK_MAX_ID (1 << 21)   /* far above any real vocabulary (152k); bounds the id tables */

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return DG_EMODEL;
}

/* path's JSON object into *out: 0, DG_ENOMEM, or DG_EMODEL with the reason. */
static int load_json(const char *path, json_t **out, char *err, size_t errlen) {
    *out = NULL;
    if (access(path, R_OK) != 0) return fail(err, errlen, "%s: cannot read: %s", path, strerror(errno));
    json_error_t je;
    json_t *j;
    const int rc = dg_json_load_file(path, JSON_ALLOW_NUL, &j, &je);
    if (rc == DG_ENOMEM) return DG_ENOMEM;   /* dg_tok_files_load says it */
    char why[256];
    if (rc && je.line < 1) return fail(err, errlen, "%s: cannot read: %s", path, je.text);
    if (rc) return fail(err, errlen, "%s: not valid JSON: %s", path, dg_json_why(&je, why, sizeof why));
    if (!json_is_object(j)) {
        json_decref(j);
        return fail(err, errlen, "%s: the top level is not a JSON object", path);
    }
    *out = j;
    return 0;
}

/* The inverse of the byte-level alphabet over the code points it uses (< U+0144). */
typedef struct { int16_t byte[0x144]; } alphabet;

static void alphabet_init(alphabet *a) {
    for (uint32_t cp = 0; cp < 0x144; cp++) a->byte[cp] = (int16_t)dg_tok_char_byte(cp);
}

/* Decodes UTF-8 s[0..n) whose characters are all in the alphabet into bytes (at most n
 * of them) at out. Returns the byte count, or -1 when a character is outside it. */
static long alphabet_decode(const alphabet *a, const uint8_t *s, size_t n, uint8_t *out) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        if (s[i] < 0x80) cp = s[i++];
        else if ((s[i] & 0xE0) == 0xC0 && i + 1 < n) {
            cp = (uint32_t)(s[i] & 0x1F) << 6 | (s[i + 1] & 0x3F);
            i += 2;
        } else {
            return -1;
        }
        if (cp >= 0x144 || a->byte[cp] < 0) return -1;
        out[o++] = (uint8_t)a->byte[cp];
    }
    return (long)o;
}

static int arena_push(dg_tok_files *f, const uint8_t *b, size_t n, size_t *offset) {
    if (f->arena_len + n > f->arena_cap) {
        size_t cap = f->arena_cap ? f->arena_cap : 1 << 20;
        while (cap < f->arena_len + n) cap *= 2;
        uint8_t *p = realloc(f->arena, cap);
        if (!p) return DG_ENOMEM;
        f->arena = p;
        f->arena_cap = cap;
    }
    memcpy(f->arena + f->arena_len, b, n);
    *offset = f->arena_len;
    f->arena_len += n;
    return 0;
}

static int vocab_load(const json_t *vocab, const char *what, dg_tok_files *f, char *err, size_t errlen) {
    alphabet a;
    alphabet_init(&a);
    if (!json_is_object(vocab) || json_object_size(vocab) == 0)
        return fail(err, errlen, "%s: the vocabulary is not a non-empty object of token -> id", what);
    f->vocab = calloc(json_object_size(vocab), sizeof *f->vocab);
    if (!f->vocab) return DG_ENOMEM;
    const char *key;
    size_t key_len;
    json_t *value;
    uint8_t buf[2 * DG_TOK_PIECE_MAX];
    json_object_keylen_foreach((json_t *)vocab, key, key_len, value) {
        if (!json_is_integer(value) || json_integer_value(value) < 0 ||
            json_integer_value(value) >= DG_TOK_MAX_ID)
            return fail(err, errlen, "%s: token \"%s\": the id is not an integer in 0..%d", what, key,
                        DG_TOK_MAX_ID - 1);
        if (key_len == 0 || key_len > 2 * DG_TOK_PIECE_MAX)
            return fail(err, errlen, "%s: token \"%.40s\": empty or longer than %d bytes", what, key,
                        DG_TOK_PIECE_MAX);
        long n = alphabet_decode(&a, (const uint8_t *)key, key_len, buf);
        if (n < 0)
            return fail(err, errlen, "%s: token \"%s\" (id %lld) has a character outside the byte-level alphabet",
                        what, key, (long long)json_integer_value(value));
        if (n > DG_TOK_PIECE_MAX)
            return fail(err, errlen, "%s: token \"%.40s...\" is longer than %d bytes", what, key, DG_TOK_PIECE_MAX);
        dg_tok_vocab_entry *e = &f->vocab[f->n_vocab++];
        e->id = (int32_t)json_integer_value(value);
        e->len = (size_t)n;
        if (arena_push(f, buf, (size_t)n, &e->offset) < 0) return DG_ENOMEM;
    }
    return 0;
}

/* Appends the merge (left, right), both in the alphabet, as it appears at `where`. */
static int merge_add(const json_t *vocab, const char *l, size_t ll, const char *r, size_t rl,
                     const char *where, dg_tok_files *f, size_t *cap, char *err, size_t errlen) {
    json_t *jl = json_object_getn(vocab, l, ll), *jr = json_object_getn(vocab, r, rl);
    if (!jl) return fail(err, errlen, "%s: \"%.*s\" is not in the vocabulary", where, (int)ll, l);
    if (!jr) return fail(err, errlen, "%s: \"%.*s\" is not in the vocabulary", where, (int)rl, r);
    char both[4 * DG_TOK_PIECE_MAX];
    if (ll + rl > sizeof both) return fail(err, errlen, "%s: the merged token is too long", where);
    memcpy(both, l, ll);
    memcpy(both + ll, r, rl);
    json_t *jm = json_object_getn(vocab, both, ll + rl);
    if (!jm) return fail(err, errlen, "%s: the merge \"%.*s\" is not in the vocabulary", where, (int)(ll + rl), both);
    if (f->n_merges == *cap) {
        *cap = *cap ? 2 * *cap : 1 << 16;
        uint32_t(*p)[2] = realloc(f->pairs, *cap * sizeof *p);
        if (!p) return DG_ENOMEM;
        f->pairs = p;
        int32_t *m = realloc(f->merged, *cap * sizeof *m);
        if (!m) return DG_ENOMEM;
        f->merged = m;
    }
    f->pairs[f->n_merges][0] = (uint32_t)json_integer_value(jl);
    f->pairs[f->n_merges][1] = (uint32_t)json_integer_value(jr);
    f->merged[f->n_merges++] = (int32_t)json_integer_value(jm);
    return 0;
}

/* merges.txt: an optional "#version" first line, then "left right" per line (LF or CRLF). */
static int merges_txt_load(const char *path, const json_t *vocab, dg_tok_files *f, char *err, size_t errlen) {
    char why[128];
    FILE *fp;
    const int opened = dg_fopen_regular(path, &fp, why, sizeof why);
    if (opened == DG_ENOMEM) return DG_ENOMEM;   /* dg_tok_files_load says it */
    if (opened) return fail(err, errlen, "%s: cannot read: %s", path, why);
    char *line = NULL;
    size_t line_cap = 0, cap = 0;
    ssize_t n;
    int rc = 0;
    for (long line_no = 1; (n = getline(&line, &line_cap, fp)) >= 0; line_no++) {
        if (n > 0 && line[n - 1] == '\n') line[--n] = 0;
        if (n > 0 && line[n - 1] == '\r') line[--n] = 0;
        if (line_no == 1 && !strncmp(line, "#version", 8)) continue;
        char *sp = memchr(line, ' ', (size_t)n);
        if (!sp || sp == line || sp + 1 == line + n || memchr(sp + 1, ' ', (size_t)(line + n - sp - 1))) {
            rc = fail(err, errlen, "%s: line %ld: not two tokens separated by one space: \"%.60s\"", path,
                      line_no, line);
            break;
        }
        char where[4200];
        snprintf(where, sizeof where, "%s: line %ld", path, line_no);
        rc = merge_add(vocab, line, (size_t)(sp - line), sp + 1, (size_t)(line + n - sp - 1), where, f, &cap,
                       err, errlen);
        if (rc < 0) break;
    }
    if (!rc && ferror(fp)) rc = fail(err, errlen, "%s: read error", path);
    if (!rc && f->n_merges == 0) rc = fail(err, errlen, "%s: no merges", path);
    free(line);
    fclose(fp);
    return rc;
}

/* tokenizer.json "model.merges": "left right" strings (older files) or [left, right]. */
static int merges_json_load(const json_t *merges, const char *path, const json_t *vocab, dg_tok_files *f,
                            char *err, size_t errlen) {
    if (!json_is_array(merges) || json_array_size(merges) == 0)
        return fail(err, errlen, "%s: model.merges is not a non-empty array", path);
    size_t cap = 0, i;
    json_t *m;
    json_array_foreach(merges, i, m) {
        char where[4200];
        snprintf(where, sizeof where, "%s: model.merges[%zu]", path, i);
        const char *l, *r;
        size_t ll, rl;
        if (json_is_string(m)) {
            l = json_string_value(m);
            const char *sp = strchr(l, ' ');
            if (!sp || sp == l || !sp[1] || strchr(sp + 1, ' '))
                return fail(err, errlen, "%s: not two tokens separated by one space", where);
            ll = (size_t)(sp - l);
            r = sp + 1;
            rl = strlen(r);
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            l = json_string_value(json_array_get(m, 0));
            ll = json_string_length(json_array_get(m, 0));
            r = json_string_value(json_array_get(m, 1));
            rl = json_string_length(json_array_get(m, 1));
        } else {
            return fail(err, errlen, "%s: neither \"left right\" nor [\"left\", \"right\"]", where);
        }
        int rc = merge_add(vocab, l, ll, r, rl, where, f, &cap, err, errlen);
        if (rc < 0) return rc;
    }
    return 0;
}

static bool json_flag(const json_t *o, const char *key) {
    return json_is_true(json_object_get(o, key));
}

static int added_insert(dg_tok_files *f, const char *content, size_t len, json_int_t id, bool special,
                        bool normalized, const json_t *o, const char *where, char *err, size_t errlen);

/* One added token, from tokenizer.json "added_tokens" or tokenizer_config.json
 * "added_tokens_decoder". The same token listed again takes the new flags; another token
 * with the same id or content is an error. */
static int added_add(const json_t *o, json_int_t id, const char *where, dg_tok_files *f, char *err, size_t errlen) {
    const json_t *c = json_object_get(o, "content");
    if (!json_is_object(o) || !json_is_string(c) || json_string_length(c) == 0)
        return fail(err, errlen, "%s: no non-empty \"content\"", where);
    if (id < 0 || id >= DG_TOK_MAX_ID) return fail(err, errlen, "%s: id %lld out of range", where, (long long)id);
    const char *content = json_string_value(c);
    size_t len = json_string_length(c);
    if (len > DG_TOK_PIECE_MAX) return fail(err, errlen, "%s: content longer than %d bytes", where, DG_TOK_PIECE_MAX);
    if (dg_tok_utf8_valid_prefix((const uint8_t *)content, len) != len)
        return fail(err, errlen, "%s: content is not valid UTF-8", where);
    bool special = json_flag(o, "special"), normalized = json_flag(o, "normalized");
    uint8_t *nfc = NULL;   /* the reference keeps a normalized token's content in NFC */
    if (normalized) {
        utf8proc_ssize_t m = utf8proc_map((const uint8_t *)content, (utf8proc_ssize_t)len, &nfc,
                                          UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        if (m < 0) return DG_ENOMEM;
        content = (const char *)nfc;
        len = (size_t)m;
    }
    int rc = added_insert(f, content, len, id, special, normalized, o, where, err, errlen);
    free(nfc);
    return rc;
}

static int added_insert(dg_tok_files *f, const char *content, size_t len, json_int_t id, bool special,
                        bool normalized, const json_t *o, const char *where, char *err, size_t errlen) {
    if (len > DG_TOK_PIECE_MAX) return fail(err, errlen, "%s: content longer than %d bytes", where, DG_TOK_PIECE_MAX);
    static const char *const unsupported[] = {"lstrip", "rstrip", "single_word"};
    for (size_t k = 0; k < 3; k++)
        if (json_flag(o, unsupported[k]))
            return fail(err, errlen, "%s: \"%s\": %s true is not supported", where, content, unsupported[k]);
    for (size_t k = 0; k < f->n_added; k++) {
        dg_tok_added_entry *e = &f->added[k];
        bool same_text = e->content_len == len && !memcmp(e->content, content, len);
        if (e->id == id && same_text) {   /* listed again (tokenizer_config.json after
                                             tokenizer.json): the later flags win, as in transformers */
            e->special = special;
            e->normalized = normalized;
            return 0;
        }
        if (e->id == id || same_text)
            return fail(err, errlen, "%s: \"%s\" (id %lld) conflicts with added token \"%s\" (id %d)",
                        where, content, (long long)id, (const char *)e->content, e->id);
    }
    dg_tok_added_entry *p = realloc(f->added, (f->n_added + 1) * sizeof *p);
    if (!p) return DG_ENOMEM;
    f->added = p;
    dg_tok_added_entry *e = &f->added[f->n_added];
    *e = (dg_tok_added_entry){.id = (int32_t)id, .special = special, .normalized = normalized};
    e->content = malloc(len + 1);
    e->bytes = malloc(len);
    if (!e->content || !e->bytes) {
        free(e->content);
        free(e->bytes);
        return DG_ENOMEM;
    }
    f->n_added++;
    memcpy(e->content, content, len);
    e->content[len] = 0;
    e->content_len = len;
    alphabet a;
    alphabet_init(&a);
    long n = alphabet_decode(&a, e->content, len, e->bytes);
    if (n < 0) memcpy(e->bytes, content, len);
    e->len = n < 0 ? len : (size_t)n;
    return 0;
}

int dg_tok_files_add_special(dg_tok_files *f, const char *content, int32_t id, char *err, size_t errlen) {
    size_t len = strlen(content);
    if (len == 0 || id < 0 || id >= DG_TOK_MAX_ID || dg_tok_utf8_valid_prefix((const uint8_t *)content, len) != len)
        return fail(err, errlen, "added token \"%s\" (id %d): empty, not UTF-8 or id out of range", content, id);
    for (size_t i = 0; i < f->n_vocab; i++)
        if (f->vocab[i].id == id)
            return fail(err, errlen, "added token \"%s\": id %d is a token of the vocabulary", content, id);
    return added_insert(f, content, len, id, true, false, NULL, "the package's added token", err, errlen);
}

static int config_load(const char *path, dg_tok_files *f, char *err, size_t errlen) {
    json_t *j;
    int rc = load_json(path, &j, err, errlen);
    if (rc) return rc;
    const json_t *dec = json_object_get(j, "added_tokens_decoder");
    if (dec && !json_is_object(dec)) rc = fail(err, errlen, "%s: added_tokens_decoder is not an object", path);
    const char *key;
    json_t *o;
    if (!rc && dec) json_object_foreach((json_t *)dec, key, o) {
        char where[4200], *end;
        snprintf(where, sizeof where, "%s: added_tokens_decoder \"%s\"", path, key);
        long long id = strtoll(key, &end, 10);
        if (*key == 0 || *end) { rc = fail(err, errlen, "%s: the key is not an id", where); break; }
        if ((rc = added_add(o, id, where, f, err, errlen)) < 0) break;
    }
    json_decref(j);
    return rc;
}

/* A TemplateProcessing whose "single" is the sequence alone and that names no special
 * token: what transformers 5 saves for Qwen2 tokenizers (it adds nothing, like null). */
static bool template_plain(const json_t *post) {
    const char *type = json_string_value(json_object_get(post, "type"));
    const json_t *single = json_object_get(post, "single"), *special = json_object_get(post, "special_tokens");
    if (!type || strcmp(type, "TemplateProcessing") || !json_is_array(single) || json_array_size(single) != 1 ||
        !json_object_get(json_array_get(single, 0), "Sequence"))
        return false;
    return !special || (json_is_object(special) && json_object_size(special) == 0);
}

/* Checks that a tokenizer.json describes the Qwen2 pipeline that dg_tok implements. */
static int pipeline_check(const json_t *j, const char *path, char *err, size_t errlen) {
    const json_t *model = json_object_get(j, "model");
    const char *type = json_string_value(json_object_get(model, "type"));
    if (!json_is_object(model) || (type && strcmp(type, "BPE")))
        return fail(err, errlen, "%s: model is not a BPE model", path);
    static const char *const off[] = {"byte_fallback", "ignore_merges", "fuse_unk"};
    for (size_t k = 0; k < 3; k++)
        if (json_flag(model, off[k])) return fail(err, errlen, "%s: model.%s true is not supported", path, off[k]);
    static const char *const empty[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t k = 0; k < 2; k++) {
        const json_t *v = json_object_get(model, empty[k]);
        if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0))
            return fail(err, errlen, "%s: model.%s must be empty", path, empty[k]);
    }
    const json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout)) return fail(err, errlen, "%s: model.dropout is not supported", path);

    const char *norm = json_string_value(json_object_get(json_object_get(j, "normalizer"), "type"));
    if (!norm || strcmp(norm, "NFC")) return fail(err, errlen, "%s: normalizer must be NFC", path);
    const json_t *pre = json_object_get(j, "pre_tokenizer");
    const json_t *seq = json_object_get(pre, "pretokenizers");
    const json_t *split = json_array_get(seq, 0), *bl = json_array_get(seq, 1);
    const char *regex = json_string_value(json_object_get(json_object_get(split, "pattern"), "Regex"));
    const char *behavior = json_string_value(json_object_get(split, "behavior"));
    if (json_array_size(seq) != 2 || !regex || strcmp(regex, DG_TOK_QWEN2_REGEX) || !behavior ||
        strcmp(behavior, "Isolated") || json_flag(split, "invert") ||
        strcmp(json_string_value(json_object_get(bl, "type")) ?: "", "ByteLevel") ||
        json_flag(bl, "add_prefix_space") || json_flag(bl, "use_regex"))
        return fail(err, errlen, "%s: pre_tokenizer is not the Qwen2 sequence (Split on the Qwen2 regex, "
                    "Isolated; ByteLevel without prefix space or regex)", path);
    const char *dec = json_string_value(json_object_get(json_object_get(j, "decoder"), "type"));
    if (!dec || strcmp(dec, "ByteLevel")) return fail(err, errlen, "%s: decoder must be ByteLevel", path);
    const json_t *post = json_object_get(j, "post_processor");
    const char *post_type = json_string_value(json_object_get(post, "type"));
    if (post && !json_is_null(post) && (!post_type || (strcmp(post_type, "ByteLevel") && !template_plain(post))))
        return fail(err, errlen, "%s: post_processor must be ByteLevel, null, or a TemplateProcessing that "
                    "adds no token (no BOS/EOS)", path);
    return 0;
}

static int tokenizer_json_load(const char *path, dg_tok_files *f, char *err, size_t errlen) {
    json_t *j;
    int rc = load_json(path, &j, err, errlen);
    if (rc) return rc;
    rc = pipeline_check(j, path, err, errlen);
    const json_t *model = json_object_get(j, "model");
    char what[4200];
    snprintf(what, sizeof what, "%s: model.vocab", path);
    if (!rc) rc = vocab_load(json_object_get(model, "vocab"), what, f, err, errlen);
    if (!rc)
        rc = merges_json_load(json_object_get(model, "merges"), path, json_object_get(model, "vocab"), f, err,
                              errlen);
    const json_t *added = json_object_get(j, "added_tokens");
    if (!rc && added && !json_is_array(added)) rc = fail(err, errlen, "%s: added_tokens is not an array", path);
    size_t i;
    json_t *o;
    if (!rc && added) json_array_foreach(added, i, o) {
        snprintf(what, sizeof what, "%s: added_tokens[%zu]", path, i);
        const json_t *id = json_object_get(o, "id");
        if (!json_is_integer(id)) { rc = fail(err, errlen, "%s: no integer \"id\"", what); break; }
        if ((rc = added_add(o, json_integer_value(id), what, f, err, errlen)) < 0) break;
    }
    json_decref(j);
    return rc;
}

/* Whether a tokenizer file is there: 1, 0 when it is not (nor a link of that name), or
 * DG_EMODEL with err set for a link whose target is gone (an import's link into a checkpoint
 * moved since: said as such, not as the other file missing that the loader falls back to). */
static int present(const char *path, char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) == 0) return 1;
    if (lstat(path, &st) < 0 || !S_ISLNK(st.st_mode)) return 0;
    char to[4096];
    const ssize_t n = readlink(path, to, sizeof to - 1);
    to[n > 0 ? n : 0] = 0;
    return fail(err, errlen, "%s: a link to \"%s\", which is not there (moved or deleted?)", path, to);
}

int dg_tok_files_load(const char *dir, dg_tok_files *f, char *err, size_t errlen) {
    *f = (dg_tok_files){0};
    char path[4096];
    int rc;
    struct stat st;
    if (stat(dir, &st) < 0) {
        const int e = errno;
        return present(dir, err, errlen) < 0 ? DG_EMODEL : fail(err, errlen, "%s: %s", dir, strerror(e));
    }
    if (!S_ISDIR(st.st_mode)) return fail(err, errlen, "%s: not a folder", dir);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    const int have_json = present(path, err, errlen);
    if (have_json < 0) return have_json;
    if (have_json) {
        rc = tokenizer_json_load(path, f, err, errlen);
    } else {
        snprintf(path, sizeof path, "%s/vocab.json", dir);
        json_t *vocab;
        rc = load_json(path, &vocab, err, errlen);
        if (!rc) rc = vocab_load(vocab, path, f, err, errlen);
        snprintf(path, sizeof path, "%s/merges.txt", dir);
        if (!rc) rc = merges_txt_load(path, vocab, f, err, errlen);
        json_decref(vocab);
    }
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    const int have_config = rc ? 0 : present(path, err, errlen);
    if (!rc && have_config < 0) rc = have_config;
    if (!rc && (!have_json || have_config)) rc = config_load(path, f, err, errlen);
    if (rc == DG_ENOMEM) snprintf(err, errlen, "%s: out of memory while loading the tokenizer", dir);
    if (rc < 0) dg_tok_files_free(f);
    return rc;
}

void dg_tok_files_free(dg_tok_files *f) {
    for (size_t k = 0; k < f->n_added; k++) {
        free(f->added[k].content);
        free(f->added[k].bytes);
    }
    free(f->added);
    free(f->arena);
    free(f->vocab);
    free(f->pairs);
    free(f->merged);
    *f = (dg_tok_files){0};
}
