/* A run's life: the engine's callbacks become event entries and image keys; the end
 * becomes the result hash, the final event, the done (and dead) entry and the XACK, all
 * in one MULTI/EXEC. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.pb-c.h"
#include "log.h"
#include "worker.h"

dg_run *dg_run_new(dg_worker *w, const char *stream, const char *entry) {
    dg_run *r = calloc(1, sizeof *r);
    if (!r) abort();
    r->w = w;
    snprintf(r->stream, sizeof r->stream, "%s", stream);
    snprintf(r->entry, sizeof r->entry, "%s", entry);
    r->max_attempts = w->cfg->max_attempts;
    r->ttl_s = w->cfg->result_ttl_s;
    r->taken_ms = dg_now_ms();
    r->started_mono_ms = dg_mono_ms();
    r->enqueued_ms = strtoll(entry, NULL, 10);   /* a stream id starts with its ms time */
    r->phase = "queued";
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
    for (int i = 0; i < r->n_imgs; i++) free(r->imgs[i].png);
    free(r->imgs);
    free(r->md);
    free(r);
}

static void out_push(dg_run *r, dg_cmd *c) {
    if (r->n_out == r->cap_out) {
        r->cap_out = r->cap_out ? r->cap_out * 2 : 16;
        r->out = realloc(r->out, (size_t)r->cap_out * sizeof *r->out);
        if (!r->out) abort();
    }
    r->out[r->n_out++] = c;
}

void dg_run_out_written(dg_run *r, int n) {
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

/* XADD prefix:events:<id> MAXLEN ~ N * type <type> <fields...> pb <Event>. The readable
 * fields come as NULL-terminated name/value pairs. */
static dg_cmd *event_cmd(dg_run *r, Duogen__V1__Event *ev, const char *type, ...) {
    char key[DG_KEY_MAX];
    dg_key(r->w, key, "events", r->id);
    ev->job_id = r->id;
    ev->seq = ++r->event_seq;
    ev->unix_ms = dg_now_ms();
    dg_cmd *c = dg_cmd_of("XADD", key, "MAXLEN", "~", NULL);
    dg_cmd_addf(c, "%d", r->w->cfg->events_maxlen);
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
    r->phase = "decode";
    r->dirty = 1;

    char *text = strndup(delta, len);
    if (!text) abort();
    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__TextDelta td = DUOGEN__V1__EVENT__TEXT_DELTA__INIT;
    td.text = text;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_TEXT;
    ev.text = &td;
    out_push(r, event_cmd(r, &ev, "text", "text", text, NULL));
    free(text);
}

static void on_image_started(void *user, int index, int width, int height, int steps) {
    dg_run *r = user;
    char si[16], sw[16], sh[16], ss[16];
    snprintf(si, sizeof si, "%d", index);
    snprintf(sw, sizeof sw, "%d", width);
    snprintf(sh, sizeof sh, "%d", height);
    snprintf(ss, sizeof ss, "%d", steps);
    r->phase = "diffusion";
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
    out_push(r, event_cmd(r, &ev, "image_started", "index", si, "width", sw, "height", sh,
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
    r->dirty = 1;
    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__DenoiseStep ds = DUOGEN__V1__EVENT__DENOISE_STEP__INIT;
    ds.index = (uint32_t)index;
    ds.step = (uint32_t)step;
    ds.steps = (uint32_t)steps;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_STEP;
    ev.step = &ds;
    out_push(r, event_cmd(r, &ev, "step", "index", si, "step", st, "steps", ss, NULL));
}

static void on_image_done(void *user, int index, int width, int height, const uint8_t *png, size_t len) {
    dg_run *r = user;
    dg_worker *w = r->w;
    if (r->n_imgs == r->cap_imgs) {
        r->cap_imgs = r->cap_imgs ? r->cap_imgs * 2 : 4;
        r->imgs = realloc(r->imgs, (size_t)r->cap_imgs * sizeof *r->imgs);
        if (!r->imgs) abort();
    }
    dg_out_image *im = &r->imgs[r->n_imgs];
    *im = (dg_out_image){.index = index, .width = width, .height = height};
    char sub[200];
    snprintf(sub, sizeof sub, "%s:%d", r->id, index);
    dg_key(w, im->key, "image", sub);
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
    r->phase = "decode";
    r->dirty = 1;

    char link[DG_KEY_MAX + 64];
    int n = snprintf(link, sizeof link, "\n\n![image %d](%s)\n\n", index, im->key);
    buf_append(&r->md, &r->md_len, &r->md_cap, link, (size_t)n);

    /* the PNG under its own key, before the event that names it */
    dg_cmd *set = dg_cmd_of("SET", im->key, NULL);
    dg_cmd_add(set, png, len);
    dg_cmd_adds(set, "EX");
    dg_cmd_addf(set, "%d", r->ttl_s);
    out_push(r, set);

    char si[16], sw[16], sh[16];
    snprintf(si, sizeof si, "%d", index);
    snprintf(sw, sizeof sw, "%d", width);
    snprintf(sh, sizeof sh, "%d", height);
    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__ImageDone idn = DUOGEN__V1__EVENT__IMAGE_DONE__INIT;
    idn.index = (uint32_t)index;
    idn.key = im->key;
    idn.width = (uint32_t)width;
    idn.height = (uint32_t)height;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_IMAGE_DONE;
    ev.image_done = &idn;
    out_push(r, event_cmd(r, &ev, "image", "index", si, "key", im->key, "width", sw, "height", sh, NULL));
}

static void on_finished(void *user, dg_finish_reason reason, const dg_usage *usage, const dg_timings *t) {
    dg_run *r = user;
    r->usage = *usage;
    r->timings = *t;
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
    dg_worker *w = r->w;
    char attempt[16];
    snprintf(attempt, sizeof attempt, "%d", r->deliveries);
    r->phase = "prefill";

    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__Started st = DUOGEN__V1__EVENT__STARTED__INIT;
    st.worker_id = w->cfg->worker_id;
    st.attempt = (uint32_t)r->deliveries;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_STARTED;
    ev.started = &st;
    /* the event stream's TTL is set with the result, which every job gets in the end */
    out_push(r, event_cmd(r, &ev, "started", "worker", w->cfg->worker_id, "attempt", attempt, NULL));
}

dg_cmd *dg_run_progress_cmd(dg_run *r) {
    if (!r->dirty) return NULL;
    r->dirty = 0;
    char key[DG_KEY_MAX];
    dg_key(r->w, key, "job", r->id);
    double progress = r->max_tokens > 0 ? (double)r->tokens / r->max_tokens : 0;
    if (progress > 0.99) progress = 0.99;   /* 1 only when the result is written */
    dg_cmd *c = dg_cmd_of("HSET", key, "phase", r->phase, NULL);
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
        snprintf(r->finish, sizeof r->finish, "error");
    } else {
        vsnprintf(r->finish, sizeof r->finish, fmt, ap);
    }
    va_end(ap);
    if (!r->timings.total_ms) r->timings.total_ms = (double)(dg_mono_ms() - r->started_mono_ms);
}

/* ---- the result ------------------------------------------------------------------------------ */

static const char *status_name(int status) {
    switch (status) {
    case DUOGEN__V1__RESULT__STATUS__DONE:      return "done";
    case DUOGEN__V1__RESULT__STATUS__FAILED:    return "failed";
    case DUOGEN__V1__RESULT__STATUS__CANCELLED: return "cancelled";
    case DUOGEN__V1__RESULT__STATUS__EXPIRED:   return "expired";
    default:                                    return "unknown";
    }
}

static const char *code_name(int code) {
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(&duogen__v1__error__code__descriptor, code);
    return v ? v->name : "CODE_UNSPECIFIED";
}

/* Packs the Result message; the caller frees *out. */
static size_t pack_result(dg_run *r, uint8_t **out) {
    Duogen__V1__Result res = DUOGEN__V1__RESULT__INIT;
    Duogen__V1__Usage usage = DUOGEN__V1__USAGE__INIT;
    Duogen__V1__Timings tim = DUOGEN__V1__TIMINGS__INIT;
    Duogen__V1__Error error = DUOGEN__V1__ERROR__INIT;
    res.job_id = r->id;
    res.status = (Duogen__V1__Result__Status)r->status;
    res.worker_id = r->w->cfg->worker_id;
    res.attempt = (uint32_t)r->deliveries;
    res.finish_reason = r->finish;

    Duogen__V1__Part *parts = calloc((size_t)r->n_segs + 1, sizeof *parts);
    Duogen__V1__Part **pparts = calloc((size_t)r->n_segs + 1, sizeof *pparts);
    Duogen__V1__Image *images = calloc((size_t)r->n_segs + 1, sizeof *images);
    if (!parts || !pparts || !images) abort();
    for (int i = 0; i < r->n_segs; i++) {
        duogen__v1__part__init(&parts[i]);
        const dg_segment *s = &r->segs[i];
        if (s->image < 0) {
            parts[i].kind_case = DUOGEN__V1__PART__KIND_TEXT;
            parts[i].text = s->text;
        } else {
            const dg_out_image *im = &r->imgs[s->image];
            duogen__v1__image__init(&images[i]);
            images[i].key = (char *)im->key;
            images[i].width = (uint32_t)im->width;
            images[i].height = (uint32_t)im->height;
            if (im->png) {
                images[i].source_case = DUOGEN__V1__IMAGE__SOURCE_DATA;
                images[i].data.data = im->png;
                images[i].data.len = im->png_len;
            }
            parts[i].kind_case = DUOGEN__V1__PART__KIND_IMAGE;
            parts[i].image = &images[i];
        }
        pparts[i] = &parts[i];
    }
    res.n_output = (size_t)r->n_segs;
    res.output = pparts;

    usage.prompt_tokens = (uint64_t)r->usage.prompt_tokens;
    usage.cached_prompt_tokens = (uint64_t)r->usage.cached_prompt_tokens;
    usage.generated_tokens = (uint64_t)r->usage.generated_tokens;
    usage.images = (uint64_t)r->usage.images;
    usage.cached_latents = (uint64_t)r->usage.cached_latents;
    usage.cached_vision = (uint64_t)r->usage.cached_vision;
    res.usage = &usage;
    tim.queue_ms = r->enqueued_ms > 0 ? (double)(r->taken_ms - r->enqueued_ms) : 0;
    tim.prefill_ms = r->timings.prefill_ms;
    tim.decode_ms = r->timings.decode_ms;
    tim.vision_ms = r->timings.vision_ms;
    tim.diffusion_ms = r->timings.diffusion_ms;
    tim.vae_ms = r->timings.vae_ms;
    tim.total_ms = (double)(dg_mono_ms() - r->started_mono_ms);
    res.timings = &tim;
    if (r->status == DUOGEN__V1__RESULT__STATUS__FAILED) {
        error.code = (Duogen__V1__Error__Code)r->err_code;
        error.message = r->error;
        res.error = &error;
    }
    size_t n = duogen__v1__result__get_packed_size(&res);
    *out = malloc(n ? n : 1);
    if (!*out) abort();
    duogen__v1__result__pack(&res, *out);
    free(parts);
    free(pparts);
    free(images);
    return n;
}

static dg_cmd *final_event(dg_run *r) {
    Duogen__V1__Event ev = DUOGEN__V1__EVENT__INIT;
    Duogen__V1__Event__Done done = DUOGEN__V1__EVENT__DONE__INIT;
    Duogen__V1__Event__Failed failed = DUOGEN__V1__EVENT__FAILED__INIT;
    Duogen__V1__Event__Cancelled cancelled = DUOGEN__V1__EVENT__CANCELLED__INIT;
    Duogen__V1__Error error = DUOGEN__V1__ERROR__INIT;
    const char *status = status_name(r->status);
    if (r->status == DUOGEN__V1__RESULT__STATUS__FAILED) {
        error.code = (Duogen__V1__Error__Code)r->err_code;
        error.message = r->error;
        failed.error = &error;
        ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_FAILED;
        ev.failed = &failed;
        return event_cmd(r, &ev, "failed", "status", status, "code", code_name(r->err_code),
                         "error", r->error, NULL);
    }
    if (r->status == DUOGEN__V1__RESULT__STATUS__CANCELLED) {
        ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_CANCELLED;
        ev.cancelled = &cancelled;
        return event_cmd(r, &ev, "cancelled", "status", status, NULL);
    }
    done.status = (Duogen__V1__Result__Status)r->status;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_DONE;
    ev.done = &done;
    return event_cmd(r, &ev, "done", "status", status, "finish_reason", r->finish, NULL);
}

/* The commands of one run's result transaction, without MULTI/EXEC: the result hash, the
 * job hash, the final event, the done entry, the dead entry when dead-lettered, and the
 * XACK. Appended to cmds (room for DG_RESULT_CMDS_MAX). */
int dg_run_result_cmds(dg_run *r, dg_cmd **cmds) {
    dg_worker *w = r->w;
    const dg_daemon_config *cfg = w->cfg;
    char k_result[DG_KEY_MAX], k_job[DG_KEY_MAX], k_events[DG_KEY_MAX];
    dg_key(w, k_result, "result", r->id);
    dg_key(w, k_job, "job", r->id);
    dg_key(w, k_events, "events", r->id);
    char ttl[16], now[24], images[16], attempt[16];
    snprintf(ttl, sizeof ttl, "%d", r->ttl_s);
    snprintf(now, sizeof now, "%lld", (long long)dg_now_ms());
    snprintf(images, sizeof images, "%d", r->n_imgs);
    snprintf(attempt, sizeof attempt, "%d", r->deliveries);
    const char *status = status_name(r->status);
    uint8_t *pb;
    size_t pb_len = pack_result(r, &pb);
    int n = 0;

    dg_cmd *hset = dg_cmd_of("HSET", k_result, "status", status, "text", r->md ? r->md : "",
                             "images", images, "error", r->error, "error_code",
                             r->status == DUOGEN__V1__RESULT__STATUS__FAILED ? code_name(r->err_code) : "",
                             "finish_reason", r->finish, "worker", cfg->worker_id,
                             "attempt", attempt, "pb", NULL);
    dg_cmd_add(hset, pb, pb_len);
    free(pb);
    cmds[n++] = hset;
    cmds[n++] = dg_cmd_of("EXPIRE", k_result, ttl, NULL);
    dg_cmd *job = dg_cmd_of("HSET", k_job, "state", status, "worker", cfg->worker_id,
                            "phase", "finished", "progress", "1", "images", images,
                            "error", r->error, "updated_ms", now, "attempt", attempt, NULL);
    dg_cmd_adds(job, "tokens");
    dg_cmd_addf(job, "%d", r->tokens);
    cmds[n++] = job;
    cmds[n++] = dg_cmd_of("EXPIRE", k_job, ttl, NULL);
    cmds[n++] = final_event(r);
    cmds[n++] = dg_cmd_of("EXPIRE", k_events, ttl, NULL);
    dg_cmd *done = dg_cmd_of("XADD", w->k_done, "MAXLEN", "~", NULL);
    dg_cmd_addf(done, "%d", cfg->done_maxlen);
    dg_cmd_adds(done, "*");
    dg_cmd_adds(done, "id"); dg_cmd_adds(done, r->id);
    dg_cmd_adds(done, "status"); dg_cmd_adds(done, status);
    cmds[n++] = done;
    if (r->dead) {
        dg_cmd *dead = dg_cmd_of("XADD", w->k_dead, "MAXLEN", "~", NULL);
        dg_cmd_addf(dead, "%d", cfg->dead_maxlen);
        dg_cmd_adds(dead, "*");
        dg_cmd_adds(dead, "id"); dg_cmd_adds(dead, r->id);
        dg_cmd_adds(dead, "job"); dg_cmd_add(dead, r->job_bytes ? r->job_bytes : (const uint8_t *)"", r->job_len);
        dg_cmd_adds(dead, "error"); dg_cmd_adds(dead, r->error);
        dg_cmd_adds(dead, "code"); dg_cmd_adds(dead, code_name(r->err_code));
        dg_cmd_adds(dead, "deliveries"); dg_cmd_addf(dead, "%d", r->deliveries);
        dg_cmd_adds(dead, "worker"); dg_cmd_adds(dead, cfg->worker_id);
        dg_cmd_adds(dead, "stream"); dg_cmd_adds(dead, r->stream);
        dg_cmd_adds(dead, "entry"); dg_cmd_adds(dead, r->entry);
        dg_cmd_adds(dead, "unix_ms"); dg_cmd_adds(dead, now);
        cmds[n++] = dead;
    }
    cmds[n++] = dg_cmd_of("XACK", r->stream, cfg->group, r->entry, NULL);
    return n;
}
