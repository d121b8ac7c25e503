/* prompt_cond.h — the semantic condition of a published Cosmos-Predict2.5 pipeline
 * (docs/PUBLISHED.md "Conditioning"; docs/specs/cosmos_dit_wan_vae.md §1.1): the image's prompt
 * as the pipeline's text encoder sees it, instead of the conversation's own positions
 * (connector.h's accumulator over the context, DuoGen's way).
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
 * encoded the same way, once per dg_prompt_cond and kept.
 *
 *     dg_prompt_cond *pc;
 *     dg_prompt_cond_new(&m->llm, &m->conn, m->tok, &m->recipe, be, chunk, &pc, err, n);
 *     dg_cond_acc *pos, *neg;
 *     dg_prompt_cond_encode(pc, st, "A red kite.", 11, &pos, err, n);   // rows [0, max_tokens)
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

typedef struct dg_prompt_cond dg_prompt_cond;

/* Over the MLLM, connector and tokenizer (borrowed; they outlive it), on `be` (the
 * scheduler's fork); chunk: the most tokens a forward of the caller's qwen2 state takes.
 * DG_EINVAL for a bad recipe, DG_ENOMEM. */
int  dg_prompt_cond_new(const dg_qwen2 *llm, const dg_connector *conn, const dg_tok *tok,
                        const dg_prompt_recipe *recipe, dg_backend *be, int chunk,
                        dg_prompt_cond **out, char *err, size_t errlen);
void dg_prompt_cond_free(dg_prompt_cond *p);   /* accepts NULL */

/* The condition rows of `text` (UTF-8, len bytes) as the user message; *acc (the
 * dg_prompt_cond's) then holds rows [0, recipe.max_tokens). st: the caller's qwen2 state
 * (its forwards run here, one chunk at a time). */
int  dg_prompt_cond_encode(dg_prompt_cond *p, dg_qwen2_state *st, const char *text, size_t len,
                           dg_cond_acc **acc, char *err, size_t errlen);
/* The same for the recipe's negative prompt, encoded at the first call and kept. */
int  dg_prompt_cond_negative(dg_prompt_cond *p, dg_qwen2_state *st, dg_cond_acc **acc, char *err,
                             size_t errlen);

#endif
