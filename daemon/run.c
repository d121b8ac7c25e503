/* A run's life: the engine's callbacks become event entries, image keys and progress; the
 * end is recorded on the run for commit.c to write. */
#include "run.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.pb-c.h"
#include "log.h"
#include "outdir.h"

const char *dg_phase_name(dg_phase p) {
    static const char *const names[DG_PHASE_COUNT] = {"queued", "prefill", "decode", "diffusion", "writing"};
    return p >= 0 && p < DG_PHASE_COUNT ? names[p] : "?";
}

/* A new phase starts its clock; the same phase again keeps it (decode after each token),
 * and counts as progress. */
static void set_phase(dg_run *r, dg_phase p) {
    r->progress_ms = dg_mono_ms();
    if (r->phase == p && r->phase_ms) return;
    r->phase = p;
    r->phase_ms = dg_mono_ms();
}

dg_run *dg_run_new(const dg_daemon_config *cfg, const char *stream, const char *entry) {
    static uint64_t serial;
    dg_run *r = calloc(1, sizeof *r);
    if (!r) abort();
    r->serial = ++serial;
    r->cfg = cfg;
    snprintf(r->stream, sizeof r->stream, "%s", stream);
    snprintf(r->entry, sizeof r->entry, "%s", entry);
    r->max_attempts = cfg->max_attempts;
    r->ttl_s = cfg->result_ttl_s;
    r->taken_ms = dg_now_ms();
    r->started_mono_ms = dg_mono_ms();
    r->enqueued_ms = strtoll(entry, NULL, 10);   /* a stream id starts with its ms time */
    set_phase(r, DG_PHASE_QUEUED);
    return r;
}

void dg_run_free(dg_run *r) {
    if (!r) return;
    dg_job_free(&r->job);
    free(r->job_bytes);
    for (int i = 0; i < r->n_out; i++) dg_cmd_free(r->out[i]);
    free(r->out);
    for (int i = 0; i < r->n_segs; i++) free(r->segs[i].text);
    free(r->segs);
    for (int i = 0; i < r->n_imgs; i++) {
        free(r->imgs[i].png);
        free(r->imgs[i].path);
    }
    free(r->imgs);
    free(r->md);
    free(r);
}

static void out_push(dg_run *r, dg_cmd *c) {
    if (r->lease_lost) {   /* fenced: another attempt owns the job's keys now */
        dg_cmd_free(c);
        return;
    }
    if (r->n_out == r->cap_out) {
        r->cap_out = r->cap_out ? r->cap_out * 2 : 16;
        r->out = realloc(r->out, (size_t)r->cap_out * sizeof *r->out);
        if (!r->out) abort();
    }
    r->out[r->n_out++] = c;
}

void dg_run_out_written(dg_run *r, int n) {
    if (n <= 0) return;   /* nothing written: r->out may not be allocated yet */
    for (int i = 0; i < n; i++) dg_cmd_free(r->out[i]);
    memmove(r->out, r->out + n, (size_t)(r->n_out - n) * sizeof *r->out);
    r->n_out -= n;
}

static void buf_append(char **buf, size_t *len, size_t *cap, const char *s, size_t n) {
    if (*len + n + 1 > *cap) {
        *cap = (*len + n + 1) * 2;
        *buf = realloc(*buf, *cap);
        if (!*buf) abort();
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = 0;
}

/* ---- events --------------------------------------------------------------------------------- */

dg_cmd *dg_run_event_cmd(dg_run *r, Duogen__V1__Event *ev, const char *type, ...) {
    char key[DG_KEY_MAX];
    dg_key_events(key, r->cfg->prefix, r->id);
    ev->job_id = r->id;
    ev->seq = ++r->event_seq;
    ev->unix_ms = dg_now_ms();
    dg_cmd *c = dg_cmd_of("XADD", key, "MAXLEN", NULL);
    dg_cmd_addf(c, "%d", r->cfg->events_maxlen);
    dg_cmd_adds(c, "*");
    dg_cmd_adds(c, "type");
    dg_cmd_adds(c, type);
    dg_cmd_adds(c, "seq");
    dg_cmd_addf(c, "%llu", (unsigned long long)ev->seq);
    va_list ap;
    va_start(ap, type);
    for (const char *name = va_arg(ap, const char *); name; name = va_arg(ap, const char *)) {
        const char *value = va_arg(ap, const char *);
        dg_cmd_adds(c, name);
        dg_cmd_adds(c, value);
    }
    va_end(ap);
    size_t n = duogen__v1__event__get_packed_size(ev);
    uint8_t *pb = malloc(n ? n : 1);
    if (!pb) abort();
    duogen__v1__event__pack(ev, pb);
    dg_cmd_adds(c, "pb");
    dg_cmd_add(c, pb, n);
    free(pb);
    return c;
}

static void on_text(void *user, const char *delta, size_t len) {
    dg_run *r = user;
    if (!r->n_segs || r->segs[r->n_segs - 1].image >= 0) {
        if (r->n_segs == r->cap_segs) {
            r->cap_segs = r->cap_segs ? r->cap_segs * 2 : 4;
            r->segs = realloc(r->segs, (size_t)r->cap_segs * sizeof *r->segs);
            if (!r->segs) abort();
        }
        r->segs[r->n_segs++] = (dg_segment){.image = -1};
    }
    dg_segment *s = &r->segs[r->n_segs - 1];
    buf_append(&s->text, &s->len, &s->cap, delta, len);
    buf_append(&r->md, &r->md_len, &r->md_cap, delta, len);
    r->tokens++;
    set_phase(r, DG_PHASE_DECODE);
    r->dirty = 1;

    char *text = strndup(delta, len);
    if (!text) abort();
    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__TextDelta td = DUOGEN__V1__EVENT__TEXT_DELTA__INIT;
    td.text = text;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_TEXT;
    ev.text = &td;
    out_push(r, dg_run_event_cmd(r, &ev, "text", "text", text, NULL));
    free(text);
}

static void on_image_started(void *user, int index, int width, int height, int steps) {
    dg_run *r = user;
    char si[16], sw[16], sh[16], ss[16];
    snprintf(si, sizeof si, "%d", index);
    snprintf(sw, sizeof sw, "%d", width);
    snprintf(sh, sizeof sh, "%d", height);
    snprintf(ss, sizeof ss, "%d", steps);
    set_phase(r, DG_PHASE_DIFFUSION);
    r->step = 0;
    r->steps = steps;
    r->dirty = 1;
    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__ImageStarted is = DUOGEN__V1__EVENT__IMAGE_STARTED__INIT;
    is.index = (uint32_t)index;
    is.width = (uint32_t)width;
    is.height = (uint32_t)height;
    is.steps = (uint32_t)steps;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_IMAGE_STARTED;
    ev.image_started = &is;
    out_push(r, dg_run_event_cmd(r, &ev, "image_started", "index", si, "width", sw, "height", sh,
                                 "steps", ss, NULL));
}

static void on_step(void *user, int index, int step, int steps) {
    dg_run *r = user;
    char si[16], st[16], ss[16];
    snprintf(si, sizeof si, "%d", index);
    snprintf(st, sizeof st, "%d", step);
    snprintf(ss, sizeof ss, "%d", steps);
    r->step = step;
    r->steps = steps;
    r->steps_done++;
    r->progress_ms = dg_mono_ms();
    r->dirty = 1;
    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__DenoiseStep ds = DUOGEN__V1__EVENT__DENOISE_STEP__INIT;
    ds.index = (uint32_t)index;
    ds.step = (uint32_t)step;
    ds.steps = (uint32_t)steps;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_STEP;
    ev.step = &ds;
    out_push(r, dg_run_event_cmd(r, &ev, "step", "index", si, "step", st, "steps", ss, NULL));
}

/* Where image `index` goes: under its key (SET, before the event that names it), or to a
 * file under output_root. A file that cannot be written fails the run for now
 * (out_failed): the worker cancels it and it is tried again, here or elsewhere. */
static void store_image(dg_run *r, dg_out_image *im, const uint8_t *png, size_t len) {
    if (dg_job_images_to_files(r->job.pb, r->cfg)) {
        char path[4200];
        if (dg_outdir_write(r->cfg->output_root, r->id, im->index, png, len, path, sizeof path, r->out_failed,
                            sizeof r->out_failed) == 0 && !(im->path = strdup(path)))
            abort();
        return;
    }
    dg_key_image(im->key, r->cfg->prefix, r->id, im->index);
    dg_cmd *set = dg_cmd_of("SET", im->key, NULL);
    dg_cmd_add(set, png, len);
    dg_cmd_adds(set, "EX");
    dg_cmd_addf(set, "%d", r->ttl_s);
    out_push(r, set);
}

/* The answer's Markdown link to an image. */
static void md_link(dg_run *r, const dg_out_image *im) {
    const char *where = im->path ? im->path : im->key;
    size_t cap = strlen(where) + 64;
    char *link = malloc(cap);
    if (!link) abort();
    int n = snprintf(link, cap, "\n\n![image %d](%s)\n\n", im->index, where);
    buf_append(&r->md, &r->md_len, &r->md_cap, link, (size_t)n);
    free(link);
}

static void on_image_done(void *user, int index, int width, int height, const uint8_t *png, size_t len) {
    dg_run *r = user;
    if (r->out_failed[0] || r->lease_lost) return;   /* cancelled: nothing more is kept */
    if (r->n_imgs == r->cap_imgs) {
        r->cap_imgs = r->cap_imgs ? r->cap_imgs * 2 : 4;
        r->imgs = realloc(r->imgs, (size_t)r->cap_imgs * sizeof *r->imgs);
        if (!r->imgs) abort();
    }
    dg_out_image *im = &r->imgs[r->n_imgs];
    *im = (dg_out_image){.index = index, .width = width, .height = height};
    store_image(r, im, png, len);
    if (r->out_failed[0]) return;
    if (r->parsed && r->job.pb->inline_images) {
        im->png = malloc(len);
        if (!im->png) abort();
        memcpy(im->png, png, len);
        im->png_len = len;
    }
    if (r->n_segs == r->cap_segs) {
        r->cap_segs = r->cap_segs ? r->cap_segs * 2 : 4;
        r->segs = realloc(r->segs, (size_t)r->cap_segs * sizeof *r->segs);
        if (!r->segs) abort();
    }
    r->segs[r->n_segs++] = (dg_segment){.image = r->n_imgs};
    r->n_imgs++;
    r->images++;
    set_phase(r, DG_PHASE_DECODE);
    r->dirty = 1;

    md_link(r, im);
    const char *where = im->path ? im->path : im->key;

    char si[16], sw[16], sh[16];
    snprintf(si, sizeof si, "%d", index);
    snprintf(sw, sizeof sw, "%d", width);
    snprintf(sh, sizeof sh, "%d", height);
    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__ImageDone idn = DUOGEN__V1__EVENT__IMAGE_DONE__INIT;
    idn.index = (uint32_t)index;
    idn.key = im->key;
    idn.path = im->path ? im->path : (char *)"";
    idn.width = (uint32_t)width;
    idn.height = (uint32_t)height;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_IMAGE_DONE;
    ev.image_done = &idn;
    out_push(r, dg_run_event_cmd(r, &ev, "image", "index", si, im->path ? "path" : "key", where, "width", sw,
                                 "height", sh, NULL));
}

static void on_finished(void *user, dg_finish_reason reason, const dg_usage *usage, const dg_timings *t) {
    dg_run *r = user;
    r->usage = *usage;
    r->timings = *t;
    r->timed = 1;
    if (usage->nonfinite_images)   /* black there; the warm-up passed: this job's parameters? */
        log_warn("job \"%s\": %lld of its pictures came out NaN or infinite (black there): the model diverged",
                 r->id, (long long)usage->nonfinite_images);
    /* an image could not be written: another attempt may, whatever ended the answer (the
     * worker's cancel, or the answer's own end in the step that drew the picture) */
    if (r->out_failed[0]) {
        r->retry = !r->out_permanent;
        r->dead = r->out_permanent;
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED,
                   r->out_permanent ? DUOGEN__V1__ERROR__CODE__BAD_REQUEST : DUOGEN__V1__ERROR__CODE__UNAVAILABLE, "%s",
                   r->out_failed);
        return;
    }
    switch (reason) {
    case DG_FINISH_STOP:   dg_run_end(r, DUOGEN__V1__RESULT__STATUS__DONE, 0, "stop"); break;
    case DG_FINISH_LENGTH: dg_run_end(r, DUOGEN__V1__RESULT__STATUS__DONE, 0, "length"); break;
    case DG_FINISH_DEADLINE:
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__EXPIRED, 0, "deadline");
        break;
    case DG_FINISH_CANCELLED:
        if (r->expired) dg_run_end(r, DUOGEN__V1__RESULT__STATUS__EXPIRED, 0, "deadline");
        else dg_run_end(r, DUOGEN__V1__RESULT__STATUS__CANCELLED, 0, "cancelled");
        break;
    }
}

static void on_failed(void *user, int code, const char *message) {
    dg_run *r = user;
    r->retry = dg_error_class(code) == DG_ERROR_RETRYABLE;   /* e.g. no KV block free now */
    int pcode = code == DG_EIMAGE ? DUOGEN__V1__ERROR__CODE__BAD_IMAGE
              : dg_error_class(code) == DG_ERROR_BAD_INPUT ? DUOGEN__V1__ERROR__CODE__BAD_REQUEST
                                                          : DUOGEN__V1__ERROR__CODE__INTERNAL;
    r->dead = dg_error_class(code) == DG_ERROR_BAD_INPUT;
    dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED, pcode, "%s (%s)", message, dg_error_name(code));
}

void dg_run_sink(dg_run *r, dg_sink *sink) {
    *sink = (dg_sink){
        .user = r, .text = on_text, .image_started = on_image_started, .step = on_step,
        .image_done = on_image_done, .finished = on_finished, .failed = on_failed,
    };
}

/* ---- state ---------------------------------------------------------------------------------- */

void dg_run_started(dg_run *r) {
    const dg_daemon_config *cfg = r->cfg;
    char attempt[16];
    snprintf(attempt, sizeof attempt, "%d", r->deliveries);
    set_phase(r, DG_PHASE_PREFILL);

    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__Started st = DUOGEN__V1__EVENT__STARTED__INIT;
    st.worker_id = (char *)cfg->worker_id;
    st.attempt = (uint32_t)r->deliveries;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_STARTED;
    ev.started = &st;
    /* the event stream's TTL is set with the result, which every job gets in the end */
    out_push(r, dg_run_event_cmd(r, &ev, "started", "worker", cfg->worker_id, "attempt", attempt, NULL));
}

dg_cmd *dg_run_progress_cmd(dg_run *r) {
    if (!r->dirty) return NULL;
    r->dirty = 0;
    char key[DG_KEY_MAX];
    dg_key_job(key, r->cfg->prefix, r->id);
    double progress = r->max_tokens > 0 ? (double)r->tokens / r->max_tokens : 0;
    if (progress > 0.99) progress = 0.99;   /* 1 only when the result is written */
    dg_cmd *c = dg_cmd_of("HSET", key, "phase", dg_phase_name(r->phase), NULL);
    dg_cmd_adds(c, "progress");  dg_cmd_addf(c, "%.3f", progress);
    dg_cmd_adds(c, "tokens");    dg_cmd_addf(c, "%d", r->tokens);
    dg_cmd_adds(c, "images");    dg_cmd_addf(c, "%d", r->images);
    dg_cmd_adds(c, "step");      dg_cmd_addf(c, "%d", r->step);
    dg_cmd_adds(c, "updated_ms"); dg_cmd_addf(c, "%lld", (long long)dg_now_ms());
    return c;
}

void dg_run_end(dg_run *r, int status, int err_code, const char *fmt, ...) {
    if (r->ended) return;
    r->ended = 1;
    r->status = status;
    r->err_code = err_code;
    va_list ap;
    va_start(ap, fmt);
    if (status == DUOGEN__V1__RESULT__STATUS__FAILED) {
        vsnprintf(r->error, sizeof r->error, fmt, ap);
        dg_utf8_scrub(r->error);   /* cut by the bound, or quoting a producer's raw bytes */
        snprintf(r->finish, sizeof r->finish, "error");
    } else {
        vsnprintf(r->finish, sizeof r->finish, fmt, ap);
    }
    va_end(ap);
    if (!r->timings.total_ms) r->timings.total_ms = (double)(dg_mono_ms() - r->started_mono_ms);
    set_phase(r, DG_PHASE_WRITING);
}

/* The queued writes dropped, and the pictures whose SET was among them with them (their
 * segments out of the answer, the text around them joined); a key such a SET may have set
 * before the connection broke is deleted with the next writes. Inline data goes from all;
 * with drop_text, the text segments too. */
static void drop_unstored(dg_run *r, int drop_text) {
    int *to = malloc((size_t)(r->n_imgs + 1) * sizeof *to);   /* old picture -> new, or -1 */
    dg_cmd **del = malloc((size_t)(r->n_imgs + 1) * sizeof *del);
    if (!to || !del) abort();
    int kept = 0, n_del = 0;
    for (int i = 0; i < r->n_imgs; i++) {
        dg_out_image *im = &r->imgs[i];
        int queued = 0;
        for (int k = 0; k < r->n_out && !queued; k++)
            queued = im->key[0] && r->out[k]->argc > 1 && !strcmp(r->out[k]->argv[0], "SET") &&
                     !strcmp(r->out[k]->argv[1], im->key);
        free(im->png);
        im->png = NULL;
        im->png_len = 0;
        if (queued) {
            log_warn("job \"%s\": picture %d was not stored (%s)", r->id, im->index, im->key);
            del[n_del++] = dg_cmd_of("DEL", im->key, NULL);
            free(im->path);
            to[i] = -1;
            continue;
        }
        to[i] = kept;
        r->imgs[kept++] = *im;
    }
    int n = 0;
    for (int s = 0; s < r->n_segs; s++) {
        dg_segment seg = r->segs[s];
        if ((seg.image >= 0 && to[seg.image] < 0) || (seg.image < 0 && drop_text)) {
            free(seg.text);
            continue;
        }
        if (seg.image >= 0) {
            seg.image = to[seg.image];
        } else if (n && r->segs[n - 1].image < 0) {   /* text meets text: one segment */
            buf_append(&r->segs[n - 1].text, &r->segs[n - 1].len, &r->segs[n - 1].cap, seg.text, seg.len);
            free(seg.text);
            continue;
        }
        r->segs[n++] = seg;
    }
    r->n_segs = n;
    r->n_imgs = r->images = kept;
    r->md_len = 0;
    if (r->md) r->md[0] = 0;
    for (int s = 0; s < r->n_segs; s++)
        if (r->segs[s].image < 0) buf_append(&r->md, &r->md_len, &r->md_cap, r->segs[s].text, r->segs[s].len);
        else md_link(r, &r->imgs[r->segs[s].image]);
    dg_run_out_written(r, r->n_out);
    for (int i = 0; i < n_del; i++) out_push(r, del[i]);
    free(del);
    free(to);
    r->dirty = 1;
}

void dg_run_unstorable(dg_run *r, size_t largest, size_t total) {
    /* the first time: pictures not stored and inline data go, and the dead letter's copy of
     * the job when it is the largest value (it may be the one refused; a dead letter keeps
     * it otherwise, for a requeue); the second (cut down, still refused): the text and the
     * copy too */
    const int again = ++r->unstorable > 1;
    const int drop_copy = r->dead && r->job_bytes && (again || r->job_len >= largest);
    if (r->dead && r->job_len > largest) largest = r->job_len;
    char why[sizeof r->out_failed];
    snprintf(why, sizeof why,
             "Redis closed the connection each of the %d times this job's output was sent, on a connection that "
             "had just answered (its largest value %zu bytes, %zu in all: a server whose proto-max-bulk-len (a "
             "value) or client-query-buffer-limit (a send) is below that closes it); %s%s",
             DG_RUN_WRITES_LOST_MAX, largest, total,
             again ? "the answer's text and inline picture data are dropped"
                   : "what was stored is kept (the text, pictures already written), inline picture data is dropped",
             drop_copy ? ", and the dead letter's copy of the job" : "");
    log_error("job \"%s\": its output could not be stored: %s", r->id, why);
    drop_unstored(r, again);
    if (drop_copy) {
        free(r->job_bytes);
        r->job_bytes = NULL;
        r->job_len = 0;
    }
    r->lost_writes = 0;
    if (!r->ended) {   /* stopped by the worker (dg_runs_cancel_due); on_finished ends it so */
        snprintf(r->out_failed, sizeof r->out_failed, "%s", why);
        r->out_permanent = 1;
        return;
    }
    if (r->status == DUOGEN__V1__RESULT__STATUS__FAILED && !r->out_permanent) {
        /* it failed on its own: that error first, this after (in place of an earlier one) */
        static const char note[] = "; and its output could not be stored whole: ";
        char *had = strstr(r->error, note);
        if (had) *had = 0;
        const size_t n = strlen(r->error);
        if (n + sizeof note + 64 < sizeof r->error) snprintf(r->error + n, sizeof r->error - n, "%s%s", note, why);
        dg_utf8_scrub(r->error);   /* cut by the bound */
        return;
    }
    r->out_permanent = 1;   /* the failure is this one, said anew the second time */
    r->status = DUOGEN__V1__RESULT__STATUS__FAILED;
    r->err_code = DUOGEN__V1__ERROR__CODE__BAD_REQUEST;
    r->dead = 1;
    r->retry = 0;
    snprintf(r->error, sizeof r->error, "%s", why);
    snprintf(r->finish, sizeof r->finish, "error");
}

void dg_run_written(dg_run *r) {
    /* files of an earlier attempt beyond this one's images go, once this attempt's result is
     * the visible one (a stale attempt, whose job another worker finished, prunes nothing) */
    if (r->retry) return;
    /* a job not unpacked (given up past max_attempts, or failed by the taken index's sweep)
     * names no picture; an earlier attempt may have written some, whatever the job chose
     * (a job that chose Redis has no files there): they go (they stayed for ever beside a
     * dead-lettered result that named none) */
    if (r->job.pb ? dg_job_images_to_files(r->job.pb, r->cfg) : r->cfg->output_root[0] != 0)
        dg_outdir_prune(r->cfg->output_root, r->id, r->n_imgs);
}

/* ---- the list of held runs ------------------------------------------------------------------ */

dg_run *dg_runs_find(const dg_runs *l, const char *stream, const char *entry) {
    for (dg_run *r = l->first; r; r = r->next)
        if (!strcmp(r->entry, entry) && !strcmp(r->stream, stream)) return r;
    return NULL;
}

void dg_runs_add(dg_runs *l, dg_run *r) {
    r->next = l->first;
    l->first = r;
    l->n++;
}

void dg_runs_drop(dg_runs *l, dg_run *r) {
    for (dg_run **p = &l->first; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            l->n--;
            break;
        }
    dg_run_free(r);
}

void dg_runs_free(dg_runs *l) {
    dg_run *r = l->first;
    while (r) {
        dg_run *next = r->next;
        dg_run_free(r);
        r = next;
    }
    l->first = NULL;
    l->n = 0;
}

int dg_runs_stepping(const dg_runs *l) {
    for (const dg_run *r = l->first; r; r = r->next)
        if (r->submitted && !r->ended) return 1;
    return 0;
}

int dg_runs_fence(dg_runs *l, dg_sched *sched, const char *stream, const char *entry, uint64_t serial) {
    dg_run *r = dg_runs_find(l, stream, entry);
    /* an ended run keeps its result; one that ended to be retried gives back nothing (the
     * entry is another attempt's now) */
    if (!r || r->serial != serial || r->lease_lost || (r->ended && !r->retry)) return 0;
    log_warn("job \"%s\" (entry %s): its lease was lost to another attempt; this one is stopped "
             "and writes nothing more", r->id, r->entry);
    r->lease_lost = 1;
    dg_run_out_written(r, r->n_out);
    r->dirty = 0;
    if (!r->ended && r->submitted && !r->cancel_asked) {
        r->cancel_asked = 1;
        dg_sched_cancel(sched, r->seq);
    }
    return 1;
}

void dg_runs_cancel_due(dg_runs *l, dg_sched *sched, int64_t now_ms) {
    for (dg_run *r = l->first; r; r = r->next) {
        if (!r->submitted || r->ended || r->cancel_asked) continue;
        if (r->job.pb->deadline_unix_ms && r->job.pb->deadline_unix_ms <= now_ms) r->expired = 1;
        else if (r->out_failed[0])
            log_warn("job \"%s\": %s; stopped%s", r->id, r->out_failed, r->out_permanent ? "" : ", to be tried again");
        else continue;
        r->cancel_asked = 1;
        dg_sched_cancel(sched, r->seq);
    }
}
