/* html.h — one job's answer as a self-contained HTML page (duogenctl result ID --html DIR):
 * the Markdown text rendered by cmark (in its safe mode: raw HTML in the answer is dropped,
 * never run), each image in place as a data: URI, then the status, timings and usage of the
 * Result. The page loads nothing from anywhere. */
#ifndef DG_CTL_HTML_H
#define DG_CTL_HTML_H

#include <stddef.h>
#include <stdint.h>

#include "duogen.pb-c.h"

/* One image of the answer. */
typedef struct {
    const char    *url;   /* what the Markdown links it by: its key duogen:image:<id>:<n>, or
                             its path when the worker wrote it to a file; borrowed */
    const uint8_t *png;   /* its bytes, borrowed; NULL when they are gone */
    size_t         len;
} dg_html_image;

/* Writes DIR/index.html (DIR is created when missing) for job `id` from its result text
 * `markdown` (the result hash's `text`), its images, and `res` (the Result protobuf; NULL
 * leaves out the status, timings and usage). An image link whose URL is not in `images`, or whose bytes
 * are gone, keeps its alt text and loses its URL. Returns 0, or -1 with a message
 * naming the file in err. */
int dg_html_write_answer(const char *dir, const char *id, const char *markdown, const dg_html_image *images,
                         int n_images, const Duogen__V1__Result *res, char *err, size_t errlen);

#endif
