/* chat_template.c — the Qwen2.5-VL chat template (chat_template.h). */
#include "text/chat_template.h"
#include "duogen.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IM_START     "<|im_start|>"
#define IM_END_NL    "<|im_end|>\n"
#define DEFAULT_SYSTEM IM_START "system\nYou are a helpful assistant." IM_END_NL
#define VISION_START "<|vision_start|>"
#define IMAGE_PAD    "<|image_pad|>"
#define VISION_END   "<|vision_end|>"
#define GENERATION   IM_START "assistant\n"
#define LIT(s)       s, sizeof(s) - 1

static const char *role_name(dg_chat_role r) {
    switch (r) {
    case DG_CHAT_SYSTEM:    return "system";
    case DG_CHAT_USER:      return "user";
    case DG_CHAT_ASSISTANT: return "assistant";
    }
    return NULL;
}

/* Checks every message and part; returns the rendered length, or a negative DG_E*. */
static long long rendered_length(const dg_chat_message *m, size_t n, bool gen, char *err, size_t errlen) {
    long long total = gen ? (long long)strlen(GENERATION) : 0;
    for (size_t i = 0; i < n; i++) {
        const char *role = role_name(m[i].role);
        if (!role) {
            snprintf(err, errlen, "chat message %zu: unknown role %d", i, (int)m[i].role);
            return DG_EINVAL;
        }
        if (i == 0 && m[i].role != DG_CHAT_SYSTEM) total += (long long)strlen(DEFAULT_SYSTEM);
        total += (long long)(strlen(IM_START) + strlen(role) + 1 + strlen(IM_END_NL));
        if (m[i].n_parts && !m[i].parts) {
            snprintf(err, errlen, "chat message %zu: %zu parts but no part array", i, m[i].n_parts);
            return DG_EINVAL;
        }
        for (size_t k = 0; k < m[i].n_parts; k++) {
            const dg_chat_part *p = &m[i].parts[k];
            if (p->kind == DG_CHAT_TEXT && (p->text || p->text_len == 0)) {
                total += (long long)p->text_len;
            } else if (p->kind == DG_CHAT_IMAGE && p->image_tokens >= 1 &&
                       p->image_tokens <= DG_CHAT_IMAGE_TOKENS_MAX) {
                total += (long long)(strlen(VISION_START) + strlen(VISION_END)) +
                         (long long)p->image_tokens * (long long)strlen(IMAGE_PAD) +
                         (long long)(p->bov ? strlen(p->bov) : 0);
            } else {
                snprintf(err, errlen, "chat message %zu part %zu: %s", i, k,
                         p->kind == DG_CHAT_TEXT  ? "text is NULL"
                         : p->kind == DG_CHAT_IMAGE ? "image token count out of 1..1048576"
                                                    : "unknown part kind");
                return DG_EINVAL;
            }
        }
    }
    return total;
}

static char *put(char *at, const char *s, size_t n) {
    memcpy(at, s, n);
    return at + n;
}

int dg_chat_render(const dg_chat_message *m, size_t n, bool gen, char **text, size_t *len, char *err, size_t errlen) {
    *text = NULL;
    *len = 0;
    long long total = rendered_length(m, n, gen, err, errlen);
    if (total < 0) return (int)total;
    char *buf = malloc((size_t)total + 1), *at = buf;
    if (!buf) {
        snprintf(err, errlen, "chat: out of memory for %lld bytes", total);
        return DG_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        if (i == 0 && m[i].role != DG_CHAT_SYSTEM) at = put(at, LIT(DEFAULT_SYSTEM));
        const char *role = role_name(m[i].role);
        at = put(at, LIT(IM_START));
        at = put(at, role, strlen(role));
        *at++ = '\n';
        for (size_t k = 0; k < m[i].n_parts; k++) {
            const dg_chat_part *p = &m[i].parts[k];
            if (p->kind == DG_CHAT_TEXT) {
                if (p->text_len) at = put(at, p->text, p->text_len);
                continue;
            }
            if (p->bov) at = put(at, p->bov, strlen(p->bov));
            at = put(at, LIT(VISION_START));
            for (int32_t t = 0; t < p->image_tokens; t++) at = put(at, LIT(IMAGE_PAD));
            at = put(at, LIT(VISION_END));
        }
        at = put(at, LIT(IM_END_NL));
    }
    if (gen) at = put(at, LIT(GENERATION));
    *at = 0;
    *text = buf;
    *len = (size_t)(at - buf);
    return 0;
}

int dg_chat_encode(const dg_tok *tok, const dg_chat_message *m, size_t n, bool gen, dg_tok_ids *out,
                   char *err, size_t errlen) {
    char *text;
    size_t len;
    int rc = dg_chat_render(m, n, gen, &text, &len, err, errlen);
    if (rc < 0) return rc;
    rc = dg_tok_encode(tok, text, len, out, err, errlen);
    free(text);
    return rc;
}
