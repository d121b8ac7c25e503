/* prompt_cond.h — the semantic condition of a published Cosmos-Predict2.5 pipeline
 * (docs/PUBLISHED.md §4 "What the answer is"; docs/specs/cosmos_dit_wan_vae.md §1.1): the
 * image's prompt as the pipeline's text encoder sees it, instead of the conversation's own
 * positions (connector.h's accumulator over the context, DuoGen's way).
 *
 * The pipeline (diffusers Cosmos2_5_PredictBasePipeline._get_prompt_embeds) renders
 *     [system: recipe system prompt] [user: prompt]      (chat template, no generation prompt)
 * pads the ids with the pad token to max_tokens (512) on the recipe's side, or truncates
 * them there (on the right), runs the text encoder over all of them without an attention
 * mask, standardizes every layer's hidden states per token ((h − mean)/(std_unbiased +
 * 1e-8)), concatenates them and applies crossattn_proj: max_tokens rows, pad rows included.
 * Here the text encoder is the package's MLLM (qwen2.h) run on a KV sequence of its own, and
 * the rows go through the connector's accumulator as a prefill of the conversation does, so
 * the DiT sees the same max_tokens rows. The negative branch is the recipe's negative prompt
 * encoded the same way (cut on the right where it is over, as the pipeline cuts it), once
 * per dg_prompt_cond and kept.
 *
 * An image's prompt is two texts: the request (the last user message) and the answer's text
 * since the previous image, the words that lead to this one, joined by a newline. Where the
 * two are over max_tokens, the pipeline's cut on the right would drop the answer's words,
 * those nearest the picture; dg_prompt_fit shortens the request instead (its end first), and
 * only where the answer's text alone is over, that text's beginning: the prompt it gives the
 * encoder is a string that fits, padded as the pipeline pads it (the same rows as the
 * pipeline given that string).
 *
 *     dg_prompt_cond *pc;
 *     dg_prompt_cond_new(&m->llm, &m->conn, m->tok, &m->recipe, be, chunk, &pc, err, n);
 *     dg_cond_acc *pos, *neg;
 *     dg_prompt_cond_encode(pc, st, "Draw a kite.", 12, "A red kite:", 11, &pos, err, n);
 *     dg_prompt_cond_negative(pc, st, &neg, err, n);
 *     // painter job: .acc = pos, .acc_neg = neg, .n_pos = .n_neg = recipe.max_tokens
 *
 * The accumulators are the dg_prompt_cond's, valid until its next encode. Not thread-safe:
 * one scheduler owns one. */
#ifndef DG_PROMPT_COND_H
#define DG_PROMPT_COND_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "draw/connector.h"
#include "mllm/qwen2.h"
#include "text/tokenizer.h"

#define DG_PROMPT_MAX_TOKENS 4096

/* The pipeline's conditioning choices, as a package records them (duogen.json "condition"). */
typedef struct {
    char    system_prompt[512];    /* the system message the pipeline puts before the prompt */
    char    negative_prompt[2048]; /* the unconditional branch's prompt */
    int     max_tokens;            /* max_sequence_length: 512 */
    int32_t pad_id;                /* the tokenizer's pad token */
    int     pad_left;              /* padding_side "left" (1) or "right" (0) */
} dg_prompt_recipe;

/* A UTF-8 continuation byte: no cut falls before one. */
static inline int dg_utf8_is_cont(char c) { return ((unsigned char)c & 0xC0) == 0x80; }

/* The length of s[0, n) cut to at most cap bytes between UTF-8 sequences. */
size_t dg_utf8_head(const char *s, size_t n, size_t cap);
/* buf[0, n) (cap bytes) followed by text[0, len), kept to its last cap bytes, cut between
 * UTF-8 sequences where it is cut; returns its new length. */
size_t dg_utf8_keep_tail(char *buf, size_t n, size_t cap, const char *text, size_t len);

/* What of the two texts a fitted prompt holds: head[0, head) "\n" tail[tail_from, n_tail). */
typedef struct {
    size_t head, tail_from;
    int    tokens;      /* ids before the padding */
    int    truncated;   /* the system prompt alone is over max_tokens: cut on the right */
} dg_prompt_fitted;

/* The padded ids (ids[recipe.max_tokens]) of the prompt of head (the request) and tail (the
 * answer's text; either may be empty, with len 0 and a non-NULL pointer): the whole where it
 * fits, else head cut at its end to the most characters that fit with tail whole, else tail
 * alone cut at its beginning to the most that fit. Cuts fall between UTF-8 sequences (each
 * cut is the last, resp. first, boundary that fits when the next one does not). *out says
 * what was kept. DG_ENOMEM, or the tokenizer's error. */
int  dg_prompt_fit(const dg_tok *tok, const dg_prompt_recipe *recipe, const char *head, size_t n_head,
                   const char *tail, size_t n_tail, int32_t *ids, dg_prompt_fitted *out, char *err,
                   size_t errlen);

typedef struct dg_prompt_cond dg_prompt_cond;

/* Over the MLLM, connector and tokenizer (borrowed; they outlive it), on `be` (the
 * scheduler's fork); chunk: the most tokens a forward of the caller's qwen2 state takes.
 * DG_EINVAL for a bad recipe, DG_ENOMEM. */
int  dg_prompt_cond_new(const dg_qwen2 *llm, const dg_connector *conn, const dg_tok *tok,
                        const dg_prompt_recipe *recipe, dg_backend *be, int chunk,
                        dg_prompt_cond **out, char *err, size_t errlen);
void dg_prompt_cond_free(dg_prompt_cond *p);   /* accepts NULL */

/* The condition rows of the prompt of head and tail (UTF-8; dg_prompt_fit) as the user
 * message; *acc (the dg_prompt_cond's) then holds rows [0, recipe.max_tokens). st: the
 * caller's qwen2 state (its forwards run here, one chunk at a time). */
int  dg_prompt_cond_encode(dg_prompt_cond *p, dg_qwen2_state *st, const char *head, size_t n_head,
                           const char *tail, size_t n_tail, dg_cond_acc **acc, char *err, size_t errlen);
/* The same for the recipe's negative prompt, encoded at the first call and kept. */
int  dg_prompt_cond_negative(dg_prompt_cond *p, dg_qwen2_state *st, dg_cond_acc **acc, char *err,
                             size_t errlen);

#endif
