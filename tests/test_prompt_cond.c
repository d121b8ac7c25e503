/* The prompt of an image under prompt conditioning (draw/prompt_cond.h): the request and the
 * answer's text joined and fitted to the recipe's max_tokens, the answer's words (nearest
 * the picture) kept before the request's; the texts a sequence keeps for it (the request's
 * beginning, the answer's end) cut between UTF-8 sequences. Exact: every fitted prompt is
 * compared with the chat template's encoding of the string it says it holds. */
#include "common/harness.h"
#include "common/package.h"
#include "draw/prompt_cond.h"
#include "text/chat_template.h"
#include "duogen.h"

#include <stdlib.h>

static dg_tok *qwen(void) {
    static dg_tok *tok;
    char err[512];
    if (!tok && dg_tok_open(TEST_QWEN2_VOCAB, &tok, err, sizeof err) < 0) {
        printf("  cannot load %s: %s\n", TEST_QWEN2_VOCAB, err);
        exit(1);
    }
    return tok;
}

/* The published pipeline's recipe (tools/dg-import), with a small max_tokens. */
static dg_prompt_recipe recipe(int max_tokens, int pad_left) {
    dg_prompt_recipe r = {.max_tokens = max_tokens, .pad_left = pad_left};
    snprintf(r.system_prompt, sizeof r.system_prompt,
             "You are a helpful assistant who will provide prompts to an image generator.");
    r.pad_id = dg_tok_added_id(qwen(), "<|endoftext|>");
    return r;
}

/* The chat encoding of [system, user: text]; its length. */
static size_t encoded(const dg_prompt_recipe *r, const char *text, size_t len, dg_tok_ids *ids) {
    dg_chat_part sys = {.kind = DG_CHAT_TEXT, .text = r->system_prompt, .text_len = strlen(r->system_prompt)};
    dg_chat_part user = {.kind = DG_CHAT_TEXT, .text = text, .text_len = len};
    dg_chat_message msgs[2] = {{DG_CHAT_SYSTEM, &sys, 1}, {DG_CHAT_USER, &user, 1}};
    char err[256];
    *ids = (dg_tok_ids){0};
    if (dg_chat_encode(qwen(), msgs, 2, false, ids, err, sizeof err) < 0) test_fail(__FILE__, __LINE__, "%s", err);
    return ids->n;
}

/* head[0, hk) "\n" tail[tf, nt) as the fitting joins them, into buf. */
static size_t joined(char *buf, const char *head, size_t hk, const char *tail, size_t tf, size_t nt) {
    size_t n = 0;
    memcpy(buf, head, hk);
    n += hk;
    if (hk && tf < nt) buf[n++] = '\n';
    memcpy(buf + n, tail + tf, nt - tf);
    return n + nt - tf;
}

static size_t tokens_of(const dg_prompt_recipe *r, const char *head, size_t hk, const char *tail, size_t tf,
                        size_t nt) {
    char *buf = malloc(hk + nt + 2);
    dg_tok_ids ids;
    size_t n = encoded(r, buf, joined(buf, head, hk, tail, tf, nt), &ids);
    dg_tok_ids_free(&ids);
    free(buf);
    return n;
}

/* Fits head and tail and checks everything the fit says of itself: the ids are the padded
 * encoding of the string it names, within max_tokens; a cut is at a UTF-8 boundary and the
 * next boundary (one character more) would not fit. Returns what was kept. */
static dg_prompt_fitted check_fit(const dg_prompt_recipe *r, const char *head, const char *tail) {
    const size_t nh = strlen(head), nt = strlen(tail);
    int32_t *got = malloc((size_t)r->max_tokens * sizeof *got);
    dg_prompt_fitted f = {0};
    char err[256] = "";
    int rc = dg_prompt_fit(qwen(), r, head, nh, tail, nt, got, &f, err, sizeof err);
    CHECK_EQ_INT(rc, 0);
    if (rc < 0) printf("  %s\n", err);
    CHECK(f.head <= nh && f.tail_from <= nt);
    char *buf = malloc(nh + nt + 2);
    dg_tok_ids want;
    size_t n = encoded(r, buf, joined(buf, head, f.head, tail, f.tail_from, nt), &want);
    const size_t kept = n < (size_t)r->max_tokens ? n : (size_t)r->max_tokens, pad = r->max_tokens - kept;
    CHECK_EQ_INT(f.tokens, kept);
    CHECK_EQ_INT(f.truncated, n > (size_t)r->max_tokens);
    for (int i = 0; i < r->max_tokens; i++) {
        int j = r->pad_left ? i - (int)pad : i;
        int32_t w = j >= 0 && (size_t)j < kept ? want.ids[j] : r->pad_id;
        if (got[i] != w) {
            test_fail(__FILE__, __LINE__, "id %d: %d, the encoding of the kept string gives %d", i, got[i], w);
            break;
        }
    }
    if (!f.truncated && f.tail_from == 0 && f.head < nh) {   /* the request cut: one character more is over */
        CHECK(!dg_utf8_is_cont(head[f.head]));
        size_t next = f.head + 1;
        while (next < nh && dg_utf8_is_cont(head[next])) next++;
        CHECK(tokens_of(r, head, next, tail, 0, nt) > (size_t)r->max_tokens);
    }
    if (!f.truncated && f.tail_from > 0) {   /* the answer cut: no request, one character more is over */
        CHECK_EQ_INT(f.head, 0);
        CHECK(f.tail_from == nt || !dg_utf8_is_cont(tail[f.tail_from]));
        size_t prev = f.tail_from - 1;
        while (prev > 0 && dg_utf8_is_cont(tail[prev])) prev--;
        CHECK(tokens_of(r, head, 0, tail, prev, nt) > (size_t)r->max_tokens);
    }
    dg_tok_ids_free(&want);
    free(buf);
    free(got);
    return f;
}

/* Words (ASCII, and with two- and three-byte characters) until len bytes. */
static char *words(size_t len, int wide, unsigned seed) {
    static const char *ascii[] = {"red ", "kite ", "over ", "the ", "hill, ", "a ", "small ", "river. "};
    static const char *utf8[] = {"café ", "über ", "字 ", "風景 ", "naïve ", "smörgås ", "водa ", "→ "};
    char *s = malloc(len + 16);
    size_t n = 0;
    while (n < len) {
        seed = seed * 1103515245u + 12345u;
        const char *w = (wide ? utf8 : ascii)[(seed >> 16) % 8];
        memcpy(s + n, w, strlen(w));
        n += strlen(w);
    }
    s[n] = 0;
    return s;
}

TEST(a_prompt_that_fits_is_whole) {
    dg_prompt_recipe r = recipe(96, 0);
    dg_prompt_fitted f = check_fit(&r, "Draw a kite over a hill.", "Here it is, a red kite:");
    CHECK_EQ_INT(f.head, strlen("Draw a kite over a hill."));
    CHECK_EQ_INT(f.tail_from, 0);
    CHECK(f.tokens < 96 && !f.truncated);
    /* one text alone: no newline joins it (the negative prompt; an image before any answer) */
    f = check_fit(&r, "", "A red kite.");
    CHECK_EQ_INT(f.tail_from, 0);
    f = check_fit(&r, "Draw a kite.", "");
    CHECK_EQ_INT(f.head, strlen("Draw a kite."));
    r.pad_left = 1;
    check_fit(&r, "Draw a kite over a hill.", "Here it is, a red kite:");
}

TEST(a_long_request_gives_way_to_the_answer) {
    for (int wide = 0; wide < 2; wide++)
        for (int max = 40; max <= 200; max += 53) {
            dg_prompt_recipe r = recipe(max, wide);
            char *head = words(900, wide, 7u + (unsigned)max);
            dg_prompt_fitted f = check_fit(&r, head, "And here is the kite:");
            CHECK(f.head > 0 && f.head < strlen(head));
            CHECK_EQ_INT(f.tail_from, 0);
            free(head);
        }
}

TEST(a_long_answer_keeps_its_end) {
    for (int wide = 0; wide < 2; wide++)
        for (int max = 40; max <= 200; max += 53) {
            dg_prompt_recipe r = recipe(max, 0);
            char *tail = words(1500, wide, 11u + (unsigned)max);
            dg_prompt_fitted f = check_fit(&r, "Draw the story.", tail);
            CHECK_EQ_INT(f.head, 0);
            CHECK(f.tail_from > 0 && f.tail_from < strlen(tail));
            free(tail);
        }
}

TEST(a_system_prompt_over_the_limit_is_cut_on_the_right) {
    dg_prompt_recipe r = recipe(8, 0);   /* the system message alone is ~25 tokens */
    dg_prompt_fitted f = check_fit(&r, "Draw a kite.", "A kite:");
    CHECK(f.truncated);
    CHECK_EQ_INT(f.tokens, 8);
}

TEST(the_sequence_keeps_the_requests_beginning_and_the_answers_end) {
    /* the request: at most cap bytes, never half a character */
    CHECK_EQ_INT(dg_utf8_head("abc", 3, 8), 3);
    CHECK_EQ_INT(dg_utf8_head("ab\xC3\xA9", 4, 3), 2);        /* é would be split */
    CHECK_EQ_INT(dg_utf8_head("a\xE5\xAD\x97z", 5, 3), 1);    /* 字 likewise */
    CHECK_EQ_INT(dg_utf8_head("a\xE5\xAD\x97z", 5, 4), 4);
    /* the answer, streamed piece by piece: always the last cap bytes' whole characters */
    char *all = words(3000, 1, 5), buf[64];
    const size_t n_all = strlen(all), cap = sizeof buf;
    size_t n = 0, at = 0;
    for (unsigned step = 1; at < n_all; step = step * 7 % 23 + 1) {   /* pieces of 1..23 bytes, and more */
        size_t len = step == 5 ? 100 : step;
        if (len > n_all - at) len = n_all - at;
        n = dg_utf8_keep_tail(buf, n, cap, all + at, len);
        at += len;
        CHECK(n <= cap && n + 3 >= (at < cap ? at : cap));   /* at most a character's 3 bytes lost at the cut */
        CHECK(n == 0 || !dg_utf8_is_cont(buf[0]));
        CHECK(!memcmp(buf, all + at - n, n));
    }
    free(all);
}

int main(void) {
    int rc = test_main();
    dg_tok_close(qwen());
    return rc;
}
