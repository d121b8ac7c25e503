/* libFuzzer target for stop strings (engine/text/sampler.h dg_stop): a job's stop strings and
 * the model's text (any bytes, cut anywhere) against a plain model of what must happen. Over
 * the bytes fed since the last match, F: the first stop string to complete (the smallest
 * end; at one end, the first listed) is the match, and what was emitted is exactly F before
 * it; until then what was emitted is a prefix of F, and the rest (held back) is shorter than
 * the longest stop string and a proper prefix of one; the end of the text flushes all of F.
 * After a match the rest of that feed's text is fed again, as the scheduler does after its
 * draw marker (dg_stop_match_end).
 *
 * Input: a byte for the number of stop strings (0..4), each stop string as a length (0..6)
 * and its bytes (a NUL ends it early: they are C strings), then chunks of text, each a
 * length byte (0..15) and its bytes. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "text/sampler.h"

#define MAX_TEXT 4096

typedef struct {
    char   buf[MAX_TEXT];
    size_t n;
} text;

static void put(void *user, const char *s, size_t len) {
    text *t = user;
    if (t->n + len > MAX_TEXT) abort();   /* more emitted than fed */
    memcpy(t->buf + t->n, s, len);
    t->n += len;
}

/* The model: the end of the first match in f[0..n), or 0; *start its start. */
static size_t first_match(char stops[][8], const size_t *lens, int n_stop, const char *f, size_t n, size_t *start) {
    for (size_t e = 1; e <= n; e++)
        for (int k = 0; k < n_stop; k++)
            if (lens[k] && lens[k] <= e && !memcmp(f + e - lens[k], stops[k], lens[k])) {
                *start = e - lens[k];
                return e;
            }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t at = 0;
#define NEXT() (at < size ? data[at++] : 0)
    char stops[4][8] = {{0}};
    size_t lens[4] = {0}, max_len = 0;
    const char *list[4];
    const int n_stop = NEXT() % 5;
    for (int k = 0; k < n_stop; k++) {
        size_t l = NEXT() % 7, j = 0;
        for (; j < l; j++) {
            char c = (char)NEXT();
            if (!c) break;
            stops[k][j] = c;
        }
        lens[k] = j;
        max_len = j > max_len ? j : max_len;
        list[k] = stops[k];
    }
    dg_stop *s;
    char err[128];
    if (dg_stop_new(list, (size_t)n_stop, &s, err, sizeof err) < 0) abort();
    text f = {.n = 0}, e = {.n = 0};   /* fed since the last match; emitted since then */
    while (at < size) {
        size_t l = NEXT() % 16;
        if (l > size - at) l = size - at;
        const char *chunk = (const char *)data + at;
        at += l;
        for (;;) {
            if (f.n + l > MAX_TEXT) goto done;
            const size_t before = f.n;
            memcpy(f.buf + f.n, chunk, l);
            f.n += l;
            size_t start = 0, end = first_match(stops, lens, n_stop, f.buf, f.n, &start);
            int matched = dg_stop_feed(s, chunk, l, put, &e);
            if (matched != (end > 0)) abort();
            if (!matched) {
                /* emitted: a prefix of F; held: the rest, a proper prefix of a stop string */
                if (e.n > f.n || memcmp(e.buf, f.buf, e.n)) abort();
                size_t held = f.n - e.n;
                if (held && held >= max_len) abort();
                int prefix = !held;
                for (int k = 0; k < n_stop && !prefix; k++)
                    prefix = held < lens[k] && !memcmp(f.buf + e.n, stops[k], held);
                if (!prefix) abort();
                break;
            }
            if (e.n != start || memcmp(e.buf, f.buf, start)) abort();
            size_t used = dg_stop_match_end(s);
            if (used != end - before || used > l) abort();
            chunk += used;   /* the rest of this feed again, from a fresh start */
            l -= used;
            f.n = e.n = 0;
        }
    }
done:
    dg_stop_flush(s, put, &e);
    if (e.n != f.n || memcmp(e.buf, f.buf, f.n)) abort();
    dg_stop_free(s);
    return 0;
#undef NEXT
}
