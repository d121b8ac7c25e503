/* chat_template.h — the Qwen2.5-VL chat template (docs/specs/qwen2_5_vl.md §5.6), rendered in C.
 *
 * The output is byte-identical to transformers' rendering of the model's Jinja template
 * followed by the Qwen2.5-VL processor's image expansion (each image's one <|image_pad|>
 * repeated as many times as it has merged vision tokens):
 *
 *     <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n     (only when the first
 *                                                                     message is not system)
 *     <|im_start|>{role}\n{parts}<|im_end|>\n                          (each message)
 *     <|im_start|>assistant\n                                          (add_generation_prompt)
 *
 * where a text part is its text, as it is, and an image part is
 * <|vision_start|> + n x <|image_pad|> + <|vision_end|>; parts have no separator. DuoGen's
 * one addition: an image part may carry the begin-of-vision token's text ("<BOV>"), put
 * before its <|vision_start|> the way the drawing model emits it before an image of its
 * own, so that a conversation's earlier answer renders as the tokens the model produced
 * (and a follow-up job meets the earlier job's KV blocks).
 *
 *     dg_chat_part parts[] = {{.kind = DG_CHAT_IMAGE, .image_tokens = 256},
 *                             {.kind = DG_CHAT_TEXT, .text = "Describe this image.", .text_len = 20}};
 *     dg_chat_message m = {DG_CHAT_USER, parts, 2};
 *     dg_tok_ids ids = {0};
 *     dg_chat_encode(tok, &m, 1, true, &ids, err, sizeof err);
 *
 * Text is inserted verbatim, so the tokenizer matches added tokens in it as the reference
 * does ("<|im_end|>" typed by a user becomes that token); unlike the reference processor,
 * a literal "<|image_pad|>" in text is not expanded for an image.
 */
#ifndef DG_CHAT_TEMPLATE_H
#define DG_CHAT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "text/tokenizer.h"

typedef enum { DG_CHAT_SYSTEM, DG_CHAT_USER, DG_CHAT_ASSISTANT } dg_chat_role;
typedef enum { DG_CHAT_TEXT, DG_CHAT_IMAGE } dg_chat_part_kind;

#define DG_CHAT_IMAGE_TOKENS_MAX (1 << 20)   /* a guard; the checkpoint allows 4..16384 */

typedef struct {
    dg_chat_part_kind kind;
    const char       *text;           /* DG_CHAT_TEXT: UTF-8, text_len bytes (borrowed) */
    size_t            text_len;
    int32_t           image_tokens;   /* DG_CHAT_IMAGE: merged vision tokens, 1..DG_CHAT_IMAGE_TOKENS_MAX */
    const char       *bov;            /* DG_CHAT_IMAGE: text put before <|vision_start|> (the
                                         model's "<BOV>" on an image of an assistant message),
                                         or NULL (borrowed) */
} dg_chat_part;

typedef struct {
    dg_chat_role        role;
    const dg_chat_part *parts;        /* borrowed, [n_parts] */
    size_t              n_parts;
} dg_chat_message;

/* Renders the conversation. *text is malloc'd, NUL-terminated, *len bytes without the
 * NUL; the caller frees it. Returns 0, DG_EINVAL (a bad role, part kind, image token
 * count or NULL text; err says which message and part) or DG_ENOMEM. */
int dg_chat_render(const dg_chat_message *messages, size_t n_messages, bool add_generation_prompt,
                   char **text, size_t *len, char *err, size_t errlen);

/* Renders and appends the ids of the rendered text to out (dg_tok_encode of it).
 * Returns 0 or what dg_chat_render() / dg_tok_encode() return. */
int dg_chat_encode(const dg_tok *tok, const dg_chat_message *messages, size_t n_messages,
                   bool add_generation_prompt, dg_tok_ids *out, char *err, size_t errlen);

#endif
