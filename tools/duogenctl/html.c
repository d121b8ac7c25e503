#include "html.h"

#include <cmark.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The page's look: the answer in a readable column, images no wider than it. */
static const char page_style[] =
    "body{font-family:system-ui,sans-serif;max-width:48em;margin:2em auto;padding:0 1em;line-height:1.5;"
    "color:#222}\n"
    "img{display:block;max-width:100%;height:auto;margin:1em 0}\n"
    "header p,footer{color:#555}\n"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}\n"
    "th,td{padding:.15em .8em;border-bottom:1px solid #ddd}\n"
    "td{text-align:right;font-variant-numeric:tabular-nums}\n"
    "th{text-align:left;font-weight:normal}\n";

static void put_escaped(FILE *f, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f);
        }
    }
}

/* "data:image/png;base64,..." for the bytes; malloc'd, NULL when out of memory. */
static char *data_uri(const uint8_t *p, size_t n) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    static const char head[] = "data:image/png;base64,";
    char *out = malloc(sizeof head + (n + 2) / 3 * 4), *o = out;
    if (!out) return NULL;
    memcpy(o, head, sizeof head - 1);
    o += sizeof head - 1;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
        *o++ = b64[v >> 18 & 63];
        *o++ = b64[v >> 12 & 63];
        *o++ = i + 1 < n ? b64[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? b64[v & 63] : '=';
    }
    *o = 0;
    return out;
}

/* The answer's HTML: the Markdown parsed, each image node's URL (a key or path) replaced by
 * its bytes as a data: URI, rendered in cmark's safe mode. malloc'd; NULL when out of memory. */
static char *render_answer(const char *markdown, const dg_html_image *images, int n_images) {
    const int opts = CMARK_OPT_DEFAULT | CMARK_OPT_VALIDATE_UTF8;
    cmark_node *doc = cmark_parse_document(markdown, strlen(markdown), opts);
    cmark_iter *it = doc ? cmark_iter_new(doc) : NULL;
    char *html = NULL;
    if (!it) goto fail;
    for (cmark_event_type ev; (ev = cmark_iter_next(it)) != CMARK_EVENT_DONE;) {
        cmark_node *node = cmark_iter_get_node(it);
        if (ev != CMARK_EVENT_ENTER || cmark_node_get_type(node) != CMARK_NODE_IMAGE) continue;
        const char *url = cmark_node_get_url(node);
        char *uri = NULL;
        for (int i = 0; i < n_images && !uri; i++)
            if (images[i].png && url && !strcmp(url, images[i].url) && !(uri = data_uri(images[i].png, images[i].len)))
                goto fail;
        cmark_node_set_url(node, uri ? uri : "");
        free(uri);
    }
    html = cmark_render_html(doc, opts);
fail:
    cmark_iter_free(it);
    cmark_node_free(doc);
    return html;
}

/* Status, timings and usage of the Result as two tables. */
static void write_figures(FILE *f, const Duogen__V1__Result *res) {
    const Duogen__V1__Timings *t = res->timings;
    const Duogen__V1__Usage *u = res->usage;
    if (t) {
        const struct { const char *name; double ms; } rows[] = {
            {"queue", t->queue_ms}, {"prefill", t->prefill_ms}, {"decode", t->decode_ms},
            {"vision", t->vision_ms}, {"diffusion", t->diffusion_ms}, {"vae", t->vae_ms}, {"total", t->total_ms}};
        fputs("<h2>Timings</h2>\n<table class=\"timings\">\n", f);
        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
            fprintf(f, "<tr><th>%s</th><td>%.1f ms</td></tr>\n", rows[i].name, rows[i].ms);
        fputs("</table>\n", f);
    }
    if (u) {
        const struct { const char *name; uint64_t n; } rows[] = {
            {"prompt tokens", u->prompt_tokens}, {"cached prompt tokens", u->cached_prompt_tokens},
            {"generated tokens", u->generated_tokens}, {"images", u->images}, {"cached latents", u->cached_latents},
            {"cached vision", u->cached_vision}, {"DiT forwards", u->dit_forwards}};
        fputs("<h2>Usage</h2>\n<table class=\"usage\">\n", f);
        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
            fprintf(f, "<tr><th>%s</th><td>%llu</td></tr>\n", rows[i].name, (unsigned long long)rows[i].n);
        fputs("</table>\n", f);
    }
}

/* "done", "failed", ... as the result hash and duogenctl result write it. */
static void put_status(FILE *f, const Duogen__V1__Result *res) {
    const ProtobufCEnumValue *v = res ? protobuf_c_enum_descriptor_get_value(&duogen__v1__result__status__descriptor,
                                                                              res->status) : NULL;
    for (const char *p = v ? v->name : "unknown"; *p; p++) fputc(*p >= 'A' && *p <= 'Z' ? *p + 32 : *p, f);
}

int dg_html_write_answer(const char *dir, const char *id, const char *markdown, const dg_html_image *images,
                         int n_images, const Duogen__V1__Result *res, char *err, size_t errlen) {
    char path[4096];
    FILE *f = NULL;
    char *answer = render_answer(markdown, images, n_images);
    snprintf(path, sizeof path, "%s/index.html", dir);
    if (!answer) {
        snprintf(err, errlen, "%s: out of memory rendering the answer", path);
        return -1;
    }
    if ((mkdir(dir, 0755) && errno != EEXIST) || !(f = fopen(path, "w"))) {
        snprintf(err, errlen, "cannot write \"%s\": %s", path, strerror(errno));
        free(answer);
        return -1;
    }
    fputs("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>duogen ", f);
    put_escaped(f, id);
    fprintf(f, "</title>\n<style>\n%s</style>\n</head>\n<body>\n<header>\n<h1>", page_style);
    put_escaped(f, id);
    fputs("</h1>\n<p class=\"status\">status: ", f);
    put_status(f, res);
    if (res && res->error && res->error->message[0]) {
        fputs(": ", f);
        put_escaped(f, res->error->message);
    }
    fprintf(f, "</p>\n</header>\n<main class=\"answer\">\n%s</main>\n<footer>\n", answer);
    if (res) write_figures(f, res);
    fputs("</footer>\n</body>\n</html>\n", f);
    free(answer);
    if (ferror(f) | fclose(f)) {
        snprintf(err, errlen, "cannot write \"%s\": %s", path, strerror(errno));
        return -1;
    }
    return 0;
}
