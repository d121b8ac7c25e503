/* prompt_cond.c — the pipeline's prompt conditioning (prompt_cond.h). */
#include "draw/prompt_cond.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/kv_cache.h"
#include "duogen.h"
#include "text/chat_template.h"

#define BLOCK 16   /* KV positions per block of the private cache */

struct dg_prompt_cond {
    const dg_qwen2     *llm;    /* borrowed */
    const dg_connector *conn;   /* borrowed */
    const dg_tok       *tok;    /* borrowed */
    dg_prompt_recipe    recipe;
    dg_backend         *be;     /* borrowed */
    int                 chunk;
    dg_kv_cache        *kv;     /* owned: room for one sequence of max_tokens */
    dg_kv_seq           seq;
    dg_cond_acc        *pos, *neg;   /* owned: [max_tokens] rows each */
    int                 has_neg;     /* neg holds the negative prompt's rows */
    float              *normed;      /* backend [chunk, D]: the last layer after model.norm */
    int32_t            *ids;         /* [max_tokens] the padded prompt */
    dg_cond_acc        *hook_acc;    /* the accumulator of the forward in progress */
    int                 hook_rc;
};

int dg_prompt_cond_new(const dg_qwen2 *llm, const dg_connector *conn, const dg_tok *tok,
                       const dg_prompt_recipe *recipe, dg_backend *be, int chunk, dg_prompt_cond **out,
                       char *err, size_t errlen) {
    const dg_text_config *c = &llm->cfg;
    *out = NULL;
    if (recipe->max_tokens < 1 || recipe->max_tokens > DG_PROMPT_MAX_TOKENS || recipe->pad_id < 0 ||
        recipe->pad_id >= c->vocab_size || chunk < 1) {
        snprintf(err, errlen, "condition: max_tokens %d (1..%d), pad id %d (0..%d)", recipe->max_tokens,
                 DG_PROMPT_MAX_TOKENS, recipe->pad_id, c->vocab_size - 1);
        return DG_EINVAL;
    }
    dg_prompt_cond *p = calloc(1, sizeof *p);
    int rc = DG_ENOMEM;
    if (!p) goto nomem;
    *p = (dg_prompt_cond){.llm = llm, .conn = conn, .tok = tok, .recipe = *recipe, .be = be, .chunk = chunk};
    const int n_blocks = (recipe->max_tokens + BLOCK - 1) / BLOCK;
    if ((rc = dg_kv_cache_new(be, c->n_layers, c->n_kv_heads * c->head_dim, BLOCK, n_blocks, DG_DTYPE_F32, &p->kv, err,
                              errlen)) < 0 ||
        (rc = dg_cond_acc_new(conn, be, recipe->max_tokens, chunk, &p->pos, err, errlen)) < 0 ||
        (rc = dg_cond_acc_new(conn, be, recipe->max_tokens, chunk, &p->neg, err, errlen)) < 0)
        goto fail;
    rc = DG_ENOMEM;
    if (dg_kv_seq_init(&p->seq, recipe->max_tokens, BLOCK) < 0 ||
        !(p->normed = be->alloc(be, (size_t)chunk * c->hidden_size * sizeof(float))) ||
        !(p->ids = malloc((size_t)recipe->max_tokens * sizeof *p->ids)))
        goto nomem;
    *out = p;
    return 0;
nomem:
    snprintf(err, errlen, "condition: out of memory for a prompt of %d tokens", recipe->max_tokens);
fail:
    dg_prompt_cond_free(p);
    return rc;
}

void dg_prompt_cond_free(dg_prompt_cond *p) {
    if (!p) return;
    dg_kv_seq_free(&p->seq);
    dg_kv_cache_free(p->kv);
    dg_cond_acc_free(p->conn, p->pos);
    dg_cond_acc_free(p->conn, p->neg);
    if (p->normed) p->be->release(p->be, p->normed);
    free(p->ids);
    free(p);
}

/* The decoder hook: each condition layer's share; the last decoder layer after the final
 * RMSNorm (HF hidden_states[L], as connector.h says). */
static void hook(void *user, int layer, const float *hidden, int n, int pos0) {
    dg_prompt_cond *p = user;
    const dg_text_config *c = &p->llm->cfg;
    if (p->hook_rc) return;
    if (layer == c->n_layers - 1) {
        p->be->rmsnorm(p->be, p->normed, hidden, p->llm->norm, n, c->hidden_size, c->rms_norm_eps);
        hidden = p->normed;
    }
    p->hook_rc = dg_cond_acc_add(p->conn, p->hook_acc, layer, hidden, n, pos0);
}

/* ids = the rendered [system, user: text] conversation, truncated on the right to max_tokens
 * and padded on the recipe's side (the tokenizer's apply_chat_template(..., padding=
 * "max_length", truncation=True)). */
static int render(dg_prompt_cond *p, const char *text, size_t len, char *err, size_t errlen) {
    const dg_prompt_recipe *r = &p->recipe;
    dg_chat_part sys = {.kind = DG_CHAT_TEXT, .text = r->system_prompt, .text_len = strlen(r->system_prompt)};
    dg_chat_part user = {.kind = DG_CHAT_TEXT, .text = text, .text_len = len};
    dg_chat_message msgs[2] = {{DG_CHAT_SYSTEM, &sys, 1}, {DG_CHAT_USER, &user, 1}};
    dg_tok_ids ids = {0};
    int rc = dg_chat_encode(p->tok, msgs, 2, false, &ids, err, errlen);
    if (rc < 0) return rc;
    const int n = ids.n < (size_t)r->max_tokens ? (int)ids.n : r->max_tokens, pad = r->max_tokens - n;
    for (int i = 0; i < r->max_tokens; i++) p->ids[i] = r->pad_id;
    memcpy(p->ids + (r->pad_left ? pad : 0), ids.ids, (size_t)n * sizeof *p->ids);
    dg_tok_ids_free(&ids);
    return 0;
}

/* The rows of `text` into acc: the decoder over the padded ids from position 0, on the
 * private KV sequence, released after. */
static int run(dg_prompt_cond *p, dg_qwen2_state *st, const char *text, size_t len, dg_cond_acc *acc,
               char *err, size_t errlen) {
    const int total = p->recipe.max_tokens;
    int rc = render(p, text, len, err, errlen);
    if (rc < 0) return rc;
    dg_cond_acc_reset(p->conn, acc);
    p->hook_acc = acc;
    dg_qwen2_hook h = {hook, p};
    for (int done = 0; done < total && rc == 0; done += p->chunk) {
        const int c = total - done < p->chunk ? total - done : p->chunk;
        dg_qwen2_input in = {.ids = p->ids + done, .n = c};
        p->hook_rc = 0;
        rc = dg_qwen2_forward(p->llm, st, p->kv, &p->seq, &in, &h, err, errlen);
        if (rc == 0 && p->hook_rc < 0) {
            snprintf(err, errlen, "condition: accumulator rejected positions %d..%d", done, done + c - 1);
            rc = p->hook_rc;
        }
    }
    dg_kv_seq_release(p->kv, &p->seq);
    return rc;
}

int dg_prompt_cond_encode(dg_prompt_cond *p, dg_qwen2_state *st, const char *text, size_t len, dg_cond_acc **acc,
                          char *err, size_t errlen) {
    *acc = p->pos;
    return run(p, st, text, len, p->pos, err, errlen);
}

int dg_prompt_cond_negative(dg_prompt_cond *p, dg_qwen2_state *st, dg_cond_acc **acc, char *err, size_t errlen) {
    *acc = p->neg;
    if (p->has_neg) return 0;
    int rc = run(p, st, p->recipe.negative_prompt, strlen(p->recipe.negative_prompt), p->neg, err, errlen);
    p->has_neg = rc == 0;
    return rc;
}
