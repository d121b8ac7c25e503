/* Chat template tests: every conversation of tests/golden/tokenizer/chat.jsonl (rendered by
 * tools/reference/make_tokenizer_goldens.py with the spec's Jinja template as transformers
 * renders it, then the processor's image expansion) must render byte-identically and
 * encode to the same ids; bad conversations fail with DG_EINVAL. */
#include "common/harness.h"
#include "text/chat_template.h"
#include "duogen.h"

#include <jansson.h>
#include <stdlib.h>

static dg_tok *qwen(void) {
    static dg_tok *tok;
    char err[512];
    const char *dir = getenv("DG_TOK_VOCAB") ? getenv("DG_TOK_VOCAB") : "tools/mkmodel/vocab/qwen2";
    if (!tok && dg_tok_open(dir, &tok, err, sizeof err) < 0) {
        printf("  cannot load %s: %s\n", dir, err);
        exit(1);
    }
    return tok;
}

/* One golden row: builds the messages, renders, encodes, compares. Returns 1 when equal. */
static int chat_row(const json_t *row, int index) {
    const json_t *jm = json_object_get(row, "messages");
    size_t n = json_array_size(jm), n_parts = 0, i, k;
    json_t *m, *p;
    json_array_foreach(jm, i, m) n_parts += json_array_size(json_object_get(m, "parts"));
    dg_chat_message *msgs = calloc(n + 1, sizeof *msgs);
    dg_chat_part *parts = calloc(n_parts + 1, sizeof *parts), *at = parts;
    json_array_foreach(jm, i, m) {
        const char *role = json_string_value(json_object_get(m, "role"));
        msgs[i].role = !strcmp(role, "system") ? DG_CHAT_SYSTEM : !strcmp(role, "user") ? DG_CHAT_USER : DG_CHAT_ASSISTANT;
        msgs[i].parts = at;
        json_array_foreach(json_object_get(m, "parts"), k, p) {
            if (!strcmp(json_string_value(json_object_get(p, "type")), "image")) {
                *at = (dg_chat_part){.kind = DG_CHAT_IMAGE,
                                     .image_tokens = (int32_t)json_integer_value(json_object_get(p, "tokens"))};
            } else {
                const json_t *t = json_object_get(p, "text");
                *at = (dg_chat_part){.kind = DG_CHAT_TEXT, .text = json_string_value(t), .text_len = json_string_length(t)};
            }
            at++;
            msgs[i].n_parts++;
        }
    }
    bool gen = json_is_true(json_object_get(row, "add_generation_prompt"));
    char *text = NULL, err[256];
    size_t len = 0;
    dg_tok_ids ids = {0};
    int rc = dg_chat_render(msgs, n, gen, &text, &len, err, sizeof err);
    const json_t *jt = json_object_get(row, "text"), *ji = json_object_get(row, "ids");
    int same_text = rc == 0 && len == json_string_length(jt) && !memcmp(text, json_string_value(jt), len);
    rc = dg_chat_encode(qwen(), msgs, n, gen, &ids, err, sizeof err);
    int same_ids = rc == 0 && ids.n == json_array_size(ji);
    for (size_t j = 0; same_ids && j < ids.n; j++) same_ids = ids.ids[j] == json_integer_value(json_array_get(ji, j));
    if (!same_text || !same_ids)
        printf("  chat row %d: text %s, ids %s\n  got:  %.200s\n", index, same_text ? "same" : "DIFFERS",
               same_ids ? "same" : "DIFFER", text ? text : "(none)");
    free(text);
    dg_tok_ids_free(&ids);
    free(parts);
    free(msgs);
    return same_text && same_ids;
}

TEST(chat_template_goldens) {
    FILE *f = fopen("tests/golden/tokenizer/chat.jsonl", "r");
    CHECK(f != NULL);
    if (!f) return;
    char *line = NULL;
    size_t cap = 0;
    int n = 0, ok = 0;
    json_error_t je;
    while (getline(&line, &cap, f) > 0) {
        json_t *row = json_loads(line, 0, &je);
        CHECK(row != NULL);
        ok += row && chat_row(row, n);
        n++;
        json_decref(row);
    }
    free(line);
    fclose(f);
    printf("  chat: %d of %d conversations identical (text and ids)\n", ok, n);
    CHECK(n >= 15);
    CHECK_EQ_INT(ok, n);
}

/* docs/specs/qwen2_5_vl.md §8: the first 17 prompt ids of [image, "What kind of dog is this?"]. */
TEST(chat_template_spec_prompt_ids) {
    static const int32_t want[17] = {151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13,
                                     151645, 198, 151644, 872, 198, 151652, 151655, 151655};
    dg_chat_part parts[] = {{.kind = DG_CHAT_IMAGE, .image_tokens = 64},
                            {.kind = DG_CHAT_TEXT, .text = "What kind of dog is this?", .text_len = 25}};
    dg_chat_message m = {DG_CHAT_USER, parts, 2};
    dg_tok_ids ids = {0};
    char err[256];
    CHECK_EQ_INT(dg_chat_encode(qwen(), &m, 1, true, &ids, err, sizeof err), 0);
    CHECK(ids.n > 17 + 64);
    for (int i = 0; i < 17 && i < (int)ids.n; i++) CHECK_EQ_INT(ids.ids[i], want[i]);
    CHECK_EQ_INT(ids.ids[ids.n - 1], 198);   /* ...<|im_start|>assistant\n */
    dg_tok_ids_free(&ids);
}

/* DuoGen's addition: an image part with `bov` renders that text before <|vision_start|>,
 * as the drawing model emitted it; an image part without it is unchanged. */
TEST(chat_template_image_of_an_answer_keeps_its_bov) {
    dg_chat_part user = {.kind = DG_CHAT_TEXT, .text = "Draw.", .text_len = 5};
    dg_chat_part answer[] = {{.kind = DG_CHAT_TEXT, .text = "Here:", .text_len = 5},
                             {.kind = DG_CHAT_IMAGE, .image_tokens = 2, .bov = "<BOV>"},
                             {.kind = DG_CHAT_IMAGE, .image_tokens = 1}};
    dg_chat_message m[] = {{DG_CHAT_SYSTEM, NULL, 0}, {DG_CHAT_USER, &user, 1}, {DG_CHAT_ASSISTANT, answer, 3}};
    char *text = NULL, err[256];
    size_t len = 0;
    CHECK_EQ_INT(dg_chat_render(m, 3, false, &text, &len, err, sizeof err), 0);
    CHECK_EQ_STR(text, "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nDraw.<|im_end|>\n"
                       "<|im_start|>assistant\nHere:<BOV><|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
                       "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n");
    CHECK_EQ_INT(len, text ? strlen(text) : 0);
    free(text);
}

TEST(chat_template_rejects_bad_input) {
    char *text = (char *)1, err[256];
    size_t len;
    dg_chat_part zero = {.kind = DG_CHAT_IMAGE, .image_tokens = 0};
    dg_chat_part null_text = {.kind = DG_CHAT_TEXT, .text = NULL, .text_len = 3};
    dg_chat_part kind = {.kind = (dg_chat_part_kind)7};
    dg_chat_message cases[] = {{DG_CHAT_USER, &zero, 1}, {DG_CHAT_USER, &null_text, 1}, {DG_CHAT_USER, &kind, 1},
                               {(dg_chat_role)9, NULL, 0}, {DG_CHAT_USER, NULL, 2}};
    static const char *want[] = {"image token count", "text is NULL", "unknown part kind", "unknown role",
                                 "no part array"};
    for (int c = 0; c < 5; c++) {
        CHECK_EQ_INT(dg_chat_render(&cases[c], 1, true, &text, &len, err, sizeof err), DG_EINVAL);
        CHECK(text == NULL && strstr(err, want[c]));
    }
    dg_chat_part empty = {.kind = DG_CHAT_TEXT, .text = NULL, .text_len = 0};
    dg_chat_message ok = {DG_CHAT_SYSTEM, &empty, 1};
    CHECK_EQ_INT(dg_chat_render(&ok, 1, false, &text, &len, err, sizeof err), 0);
    CHECK_EQ_STR(text, "<|im_start|>system\n<|im_end|>\n");
    free(text);
}

int main(void) {
    int rc = test_main();
    dg_tok_close(qwen());
    return rc;
}
