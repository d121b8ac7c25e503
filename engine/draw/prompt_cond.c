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

/* The rendered [system, user: text] conversation's ids into *ids (the caller frees). */
static int encode_user(const dg_tok *tok, const dg_prompt_recipe *r, const char *text, size_t len, dg_tok_ids *ids,
                       char *err, size_t errlen) {
    dg_chat_part sys = {.kind = DG_CHAT_TEXT, .text = r->system_prompt, .text_len = strlen(r->system_prompt)};
    dg_chat_part user = {.kind = DG_CHAT_TEXT, .text = text, .text_len = len};
    dg_chat_message msgs[2] = {{DG_CHAT_SYSTEM, &sys, 1}, {DG_CHAT_USER, &user, 1}};
    *ids = (dg_tok_ids){0};
    return dg_chat_encode(tok, msgs, 2, false, ids, err, errlen);
}

/* src cut on the right to max_tokens and padded on the recipe's side into ids[max_tokens], as
 * the pipeline's tokenizer call does; the ids kept. */
static int pad_into(const dg_prompt_recipe *r, const dg_tok_ids *src, int32_t *ids) {
    const int n = src->n < (size_t)r->max_tokens ? (int)src->n : r->max_tokens, pad = r->max_tokens - n;
    for (int i = 0; i < r->max_tokens; i++) ids[i] = r->pad_id;
    memcpy(ids + (r->pad_left ? pad : 0), src->ids, (size_t)n * sizeof *ids);
    return n;
}

size_t dg_utf8_head(const char *s, size_t n, size_t cap) {
    if (n <= cap) return n;
    while (cap && dg_utf8_is_cont(s[cap])) cap--;
    return cap;
}

size_t dg_utf8_keep_tail(char *buf, size_t n, size_t cap, const char *text, size_t len) {
    if (n + len <= cap) {
        memcpy(buf + n, text, len);
        return n + len;
    }
    size_t drop = n + len - cap;
    if (drop >= n) {
        text += drop - n, len -= drop - n, n = 0;
    } else {
        memmove(buf, buf + drop, n - drop);
        n -= drop;
    }
    memcpy(buf + n, text, len);
    n += len;
    size_t skip = 0;   /* the cut: from the next UTF-8 sequence on */
    while (skip < n && dg_utf8_is_cont(buf[skip])) skip++;
    memmove(buf, buf + skip, n - skip);
    return n - skip;
}

/* The fitting's state: the two texts, the joined prompt of the probe and its tokens. */
typedef struct {
    const dg_tok           *tok;
    const dg_prompt_recipe *r;
    const char             *head, *tail;
    size_t                  n_head, n_tail;
    char                   *buf;   /* [n_head + 1 + n_tail] */
    dg_tok_ids              ids;   /* the last probe's */
} fit;

/* Whether head[0, hk) "\n" tail[tf, n_tail) (the newline only between two texts) fits in
 * max_tokens; 1 yes, 0 no, < 0 an error. fit.ids holds its tokens. */
static int probe(fit *f, size_t hk, size_t tf, char *err, size_t errlen) {
    size_t n = 0;
    memcpy(f->buf, f->head, hk);
    n += hk;
    if (hk && tf < f->n_tail) f->buf[n++] = '\n';
    memcpy(f->buf + n, f->tail + tf, f->n_tail - tf);
    n += f->n_tail - tf;
    dg_tok_ids_free(&f->ids);
    int rc = encode_user(f->tok, f->r, f->buf, n, &f->ids, err, errlen);
    return rc < 0 ? rc : f->ids.n <= (size_t)f->r->max_tokens;
}

/* A cut of s strictly between a and b (either order) at a UTF-8 boundary, near their middle;
 * SIZE_MAX when there is none. */
static size_t midpoint(const char *s, size_t a, size_t b) {
    const size_t x = a < b ? a : b, y = a < b ? b : a;
    size_t mid = x + (y - x) / 2;
    while (mid > x && dg_utf8_is_cont(s[mid])) mid--;
    if (mid > x) return mid;
    for (mid = x + 1; mid < y && dg_utf8_is_cont(s[mid]); mid++) {}
    return mid < y ? mid : SIZE_MAX;
}

/* The cut that fits next to one that does not: `good` fits, `bad` does not, both boundaries
 * of the text cut (the request's end when cut_head, else the answer's start). */
static int bisect(fit *f, int cut_head, size_t good, size_t bad, size_t *at, char *err, size_t errlen) {
    for (size_t mid; (mid = midpoint(cut_head ? f->head : f->tail, good, bad)) != SIZE_MAX;) {
        int rc = probe(f, cut_head ? mid : 0, cut_head ? 0 : mid, err, errlen);
        if (rc < 0) return rc;
        if (rc) good = mid;
        else bad = mid;
    }
    *at = good;
    return 0;
}

int dg_prompt_fit(const dg_tok *tok, const dg_prompt_recipe *r, const char *head, size_t n_head, const char *tail,
                  size_t n_tail, int32_t *ids, dg_prompt_fitted *out, char *err, size_t errlen) {
    fit f = {tok, r, head, tail, n_head, n_tail, malloc(n_head + n_tail + 1), {0}};
    size_t hk = n_head, tf = 0;
    int rc = DG_ENOMEM;
    if (!f.buf) {
        snprintf(err, errlen, "condition: out of memory for a prompt of %zu bytes", n_head + n_tail + 1);
        goto out;
    }
    if ((rc = probe(&f, hk, tf, err, errlen)) == 0) {   /* over: something is cut */
        if ((rc = probe(&f, 0, 0, err, errlen)) == 1)   /* the answer's text whole, the request's beginning */
            rc = bisect(&f, 1, 0, n_head, &hk, err, errlen);
        else if (rc == 0 && (rc = probe(&f, 0, n_tail, err, errlen)) == 1)   /* the answer's end alone */
            hk = 0, rc = bisect(&f, 0, n_tail, 0, &tf, err, errlen);
        /* else the recipe's system prompt alone is over max_tokens: cut on the right, whole */
        if (rc >= 0) rc = probe(&f, hk, tf, err, errlen);
    }
    if (rc < 0) goto out;
    const int n = pad_into(r, &f.ids, ids);
    *out = (dg_prompt_fitted){.head = hk, .tail_from = tf, .tokens = n, .truncated = f.ids.n > (size_t)n};
    rc = 0;
out:
    dg_tok_ids_free(&f.ids);
    free(f.buf);
    return rc;
}

/* The rows of the padded prompt (p->ids) into acc: the decoder over them from position 0, on
 * the private KV sequence, released after. */
static int run(dg_prompt_cond *p, dg_qwen2_state *st, dg_cond_acc *acc, char *err, size_t errlen) {
    const int total = p->recipe.max_tokens;
    int rc = 0;
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

int dg_prompt_cond_encode(dg_prompt_cond *p, dg_qwen2_state *st, const char *head, size_t n_head, const char *tail,
                          size_t n_tail, dg_cond_acc **acc, char *err, size_t errlen) {
    *acc = p->pos;
    dg_prompt_fitted fitted;
    int rc = dg_prompt_fit(p->tok, &p->recipe, head, n_head, tail, n_tail, p->ids, &fitted, err, errlen);
    return rc < 0 ? rc : run(p, st, p->pos, err, errlen);
}

int dg_prompt_cond_negative(dg_prompt_cond *p, dg_qwen2_state *st, dg_cond_acc **acc, char *err, size_t errlen) {
    *acc = p->neg;
    if (p->has_neg) return 0;
    /* the recipe's text as the pipeline takes it: cut on the right where it is over */
    const dg_prompt_recipe *r = &p->recipe;
    dg_tok_ids ids;
    int rc = encode_user(p->tok, r, r->negative_prompt, strlen(r->negative_prompt), &ids, err, errlen);
    if (rc < 0) return rc;
    pad_into(r, &ids, p->ids);
    dg_tok_ids_free(&ids);
    rc = run(p, st, p->neg, err, errlen);
    p->has_neg = rc == 0;
    return rc;
}
