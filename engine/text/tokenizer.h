/* tokenizer.h — the Qwen2 byte-level BPE tokenizer (Qwen2 / Qwen2.5 / Qwen2.5-VL).
 *
 * Encodes exactly as the Hugging Face fast tokenizer does (tokenizers library, the
 * pipeline of docs/specs/qwen2_5_vl.md §6): added tokens matched on the raw text first
 * (leftmost, longest; any flagged "normalized" on the NFC text), NFC on the rest, the
 * Qwen2 pre-tokenizer regex (with the reference's Unicode 16 letter and number classes),
 * the GPT-2 byte-to-unicode alphabet and BPE by merge rank. No BOS/EOS is ever added.
 *
 *     dg_tok *tok; char err[256];
 *     if (dg_tok_open("models/x/mllm", &tok, err, sizeof err) < 0) die("%s", err);
 *     dg_tok_ids ids = {0};
 *     if (dg_tok_encode(tok, text, strlen(text), &ids, err, sizeof err) < 0) die("%s", err);
 *     char *back; size_t back_len;
 *     dg_tok_decode(tok, ids.ids, ids.n, 0, &back, &back_len, err, sizeof err);
 *     free(back); dg_tok_ids_free(&ids); dg_tok_close(tok);
 *
 * Text is UTF-8 with an explicit length (NUL bytes are ordinary characters). Invalid
 * UTF-8 is never an error: each maximal ill-formed subpart is replaced by U+FFFD, as
 * Python's bytes.decode("utf-8", "replace") and Rust's String::from_utf8_lossy do, so
 * encoding bytes gives the ids the reference gives for the text those bytes decode to.
 *
 * Thread safety: a dg_tok is read-only after dg_tok_open() except for a memo of encoded
 * words, guarded by a try-lock, that never changes a result; one handle may be shared by
 * any number of threads. A dg_tok_stream belongs to one sequence.
 */
#ifndef DG_TOKENIZER_H
#define DG_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct dg_tok dg_tok;

/* A growable id array owned by the caller: zero-initialise, pass to the encoders (which
 * append), release with dg_tok_ids_free(). */
typedef struct {
    int32_t *ids;   /* owned; n used of cap */
    size_t   n, cap;
} dg_tok_ids;

int  dg_tok_ids_push(dg_tok_ids *ids, int32_t id);   /* 0 or DG_ENOMEM */
void dg_tok_ids_free(dg_tok_ids *ids);

/* Loads the tokenizer files of a Hugging Face model folder (a package's mllm/):
 *   tokenizer.json when present (vocab, merges and added tokens; its normalizer,
 *   pre-tokenizer, decoder and BPE flags must be the Qwen2 ones), otherwise vocab.json +
 *   merges.txt; tokenizer_config.json (added_tokens_decoder) is required without a
 *   tokenizer.json and read when present with one.
 * Returns 0, or DG_EMODEL (a missing or malformed file: err names the file and what is
 * wrong) or DG_ENOMEM. *out is NULL on failure. */
int  dg_tok_open(const char *dir, dg_tok **out, char *err, size_t errlen);

/* A token a model package adds to the files' vocabulary (docs/DESIGN.md §5: <BOV> on a free
 * embedding row of a tokenizer that lacks it). */
typedef struct {
    const char *content;   /* borrowed: its text, matched on the raw text */
    int32_t     id;
} dg_tok_token;

/* dg_tok_open, then each of extra[0..n_extra) as a special added token (skipped by
 * DG_TOK_SKIP_SPECIAL like <|im_end|>); DG_EMODEL when its id or text is already another
 * token's. */
int  dg_tok_open_with(const char *dir, const dg_tok_token *extra, size_t n_extra, dg_tok **out,
                      char *err, size_t errlen);
void dg_tok_close(dg_tok *tok);   /* accepts NULL */

/* Number of token ids: the largest vocab or added id + 1 (ids in gaps have no token). */
int32_t dg_tok_n_ids(const dg_tok *tok);

/* Whether id is a token of the tokenizer (not past dg_tok_n_ids, nor in a gap): a model's
 * output rows past its ids (padding to a round size) decode to nothing. */
bool dg_tok_has(const dg_tok *tok, int32_t id);

/* The id of the added token whose content is exactly `content` ("<|im_end|>", "<BOV>"),
 * or DG_EINVAL when there is none. */
int32_t dg_tok_added_id(const dg_tok *tok, const char *content);

/* Appends the ids of text[0..len) to out. Returns 0 or DG_ENOMEM / DG_EINTERNAL. */
int dg_tok_encode(const dg_tok *tok, const char *text, size_t len, dg_tok_ids *out,
                  char *err, size_t errlen);

enum {
    DG_TOK_SKIP_SPECIAL = 1,   /* drop added tokens flagged special (151643..151656 for
                                  Qwen2.5-VL); non-special added tokens stay */
};

/* Decodes ids to text: the tokens' bytes concatenated, then UTF-8 with each ill-formed
 * subpart replaced by U+FFFD. Ids that name no token are skipped, as the reference does.
 * *text is malloc'd, NUL-terminated, *len bytes without the NUL; the caller frees it.
 * Returns 0 or DG_ENOMEM. */
int dg_tok_decode(const dg_tok *tok, const int32_t *ids, size_t n, unsigned flags,
                  char **text, size_t *len, char *err, size_t errlen);

/* Streaming decode for text deltas: push one id at a time; each push writes the text
 * that is now complete and never ends inside a UTF-8 character (bytes of a character
 * still being built are held back). The concatenation of every push and the final
 * dg_tok_stream_finish() is byte-identical to dg_tok_decode() of the same ids.
 * The state is small and plain: zero it with dg_tok_stream_init(); no allocation. */
#define DG_TOK_PIECE_MAX       1024                           /* bytes of one token, at most */
#define DG_TOK_STREAM_OUT_MAX  (3 * (DG_TOK_PIECE_MAX + 3))   /* each byte may become U+FFFD */

typedef struct {
    unsigned flags;      /* DG_TOK_SKIP_SPECIAL or 0 */
    uint8_t  held[3];    /* a valid but unfinished UTF-8 prefix */
    uint8_t  n_held;
} dg_tok_stream;

void   dg_tok_stream_init(dg_tok_stream *s, unsigned flags);
/* Writes at most DG_TOK_STREAM_OUT_MAX bytes (no NUL) and returns how many. */
size_t dg_tok_stream_push(const dg_tok *tok, dg_tok_stream *s, int32_t id,
                          char out[DG_TOK_STREAM_OUT_MAX]);
/* Ends the stream: an unfinished character becomes U+FFFD. Returns bytes written (<= 3). */
size_t dg_tok_stream_finish(dg_tok_stream *s, char out[DG_TOK_STREAM_OUT_MAX]);

#endif
