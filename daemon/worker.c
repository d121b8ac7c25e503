/* The worker's main loop (DESIGN §6b): take jobs while there is room, step the engine,
 * write progress between steps, write results with their acknowledgement. Redis being
 * away never loses work: the loop keeps stepping, keeps what it must write, and writes it
 * when the connection is back. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "notify.h"
#include "worker.h"

#define EX_TEMPFAIL 75   /* the engine failed: restart me */
#define EX_CONFIG   78   /* configuration or permissions: restarting will not help */

void dg_key(const dg_worker *w, char *out, const char *kind, const char *id) {
    if (id) snprintf(out, DG_KEY_MAX, "%s:%s:%s", w->cfg->prefix, kind, id);
    else snprintf(out, DG_KEY_MAX, "%s:%s", w->cfg->prefix, kind);
}

/* WATCHes of the main connection hold until an EXEC, an UNWATCH or a reconnect: the
 * epoch names the span in which a WATCH still stands (never 0). */
static uint64_t watch_epoch(const dg_worker *w) {
    return (w->redis.connects << 32 | (w->execs & 0xffffffffu)) + 1;
}

int dg_worker_init(dg_worker *w, dg_daemon_config *cfg, dg_model *model, volatile sig_atomic_t *stop,
                   char *err, size_t errlen) {
    memset(w, 0, sizeof *w);
    w->cfg = cfg;
    w->model = model;
    w->stop = stop;
    snprintf(w->streams[0], DG_KEY_MAX, "%s:jobs:high", cfg->prefix);
    snprintf(w->streams[1], DG_KEY_MAX, "%s:jobs", cfg->prefix);
    dg_key(w, w->k_done, "done", NULL);
    dg_key(w, w->k_dead, "dead", NULL);
    dg_key(w, w->k_worker, "worker", cfg->worker_id);
    pthread_mutex_init(&w->lock, NULL);
    w->stats.started_ms = dg_now_ms();
    snprintf(w->stats.state, sizeof w->stats.state, "idle");
    w->drain_own = 1;
    w->metrics_fd = -1;
    w->stats.queue_lag = w->stats.queue_pending = -1;
    /* the read timeout must outlast the longest BLOCK, or every idle poll is an I/O error */
    if (dg_redis_init(&w->redis, cfg, cfg->worker_id, cfg->block_ms + 5000, err, errlen)) return -1;
    dg_sched_opts so = {.max_inflight = cfg->max_inflight, .kv_cache_bytes = cfg->kv_cache_bytes,
                        .vision_cache_bytes = cfg->vision_cache_bytes, .latent_cache_bytes = cfg->latent_cache_bytes};
    int rc = dg_sched_new(model, &so, &w->sched, err, errlen);
    if (rc) return rc;
    return 0;
}

void dg_worker_free(dg_worker *w) {
    dg_run *r = w->runs;
    while (r) {
        dg_run *next = r->next;
        dg_run_free(r);
        r = next;
    }
    w->runs = NULL;
    dg_sched_free(w->sched);
    dg_redis_close(&w->redis);
    free(w->leases);
    pthread_mutex_destroy(&w->lock);
}

/* ---- bookkeeping shared with the keeper --------------------------------------------------------- */

static void publish(dg_worker *w) {
    pthread_mutex_lock(&w->lock);
    if (w->n_runs > w->cap_leases) {
        w->cap_leases = w->n_runs * 2;
        w->leases = realloc(w->leases, (size_t)w->cap_leases * sizeof *w->leases);
        if (!w->leases) abort();
    }
    w->n_leases = 0;
    w->stats.jobs[0] = 0;
    size_t used = 0;
    for (dg_run *r = w->runs; r; r = r->next) {
        dg_lease *l = &w->leases[w->n_leases++];
        snprintf(l->stream, sizeof l->stream, "%s", r->stream);
        snprintf(l->entry, sizeof l->entry, "%s", r->entry);
        int n = snprintf(w->stats.jobs + used, sizeof w->stats.jobs - used, "%s%s", used ? " " : "", r->id);
        if (n > 0 && used + (size_t)n < sizeof w->stats.jobs) used += (size_t)n;
    }
    dg_sched_cache_stats(w->sched, &w->stats.cache);
    w->stats.redis_up = w->redis.c != NULL;
    const char *state = *w->stop ? "draining" : w->n_runs ? "running" : "idle";
    snprintf(w->stats.state, sizeof w->stats.state, "%s", state);
    pthread_mutex_unlock(&w->lock);
}

static void count_end(dg_worker *w, const dg_run *r) {
    pthread_mutex_lock(&w->lock);
    switch (r->status) {
    case DUOGEN__V1__RESULT__STATUS__DONE:      w->stats.jobs_done++; break;
    case DUOGEN__V1__RESULT__STATUS__CANCELLED: w->stats.jobs_cancelled++; break;
    case DUOGEN__V1__RESULT__STATUS__EXPIRED:   w->stats.jobs_expired++; break;
    default:                                    w->stats.jobs_failed++; break;
    }
    if (r->dead) w->stats.jobs_dead++;
    w->stats.tokens += r->tokens;
    w->stats.images += r->n_imgs;
    w->stats.steps += r->steps_done;
    if (r->submitted) {
        w->stats.timed_jobs++;
        w->stats.queue_s += r->enqueued_ms > 0 ? (double)(r->taken_ms - r->enqueued_ms) / 1e3 : 0;
        w->stats.prefill_s += r->timings.prefill_ms / 1e3;
        w->stats.decode_s += r->timings.decode_ms / 1e3;
        w->stats.vision_s += r->timings.vision_ms / 1e3;
        w->stats.diffusion_s += r->timings.diffusion_ms / 1e3;
        w->stats.vae_s += r->timings.vae_ms / 1e3;
        w->stats.total_s += (double)(dg_mono_ms() - r->started_mono_ms) / 1e3;
    }
    pthread_mutex_unlock(&w->lock);
}

static void unlink_run(dg_worker *w, dg_run *r) {
    for (dg_run **p = &w->runs; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            w->n_runs--;
            return;
        }
}

static dg_run *find_run(dg_worker *w, const char *stream, const char *entry) {
    for (dg_run *r = w->runs; r; r = r->next)
        if (!strcmp(r->entry, entry) && !strcmp(r->stream, stream)) return r;
    return NULL;
}

/* ---- groups --------------------------------------------------------------------------------------- */

/* XGROUP CREATE ... 0 MKSTREAM on both streams; BUSYGROUP means it exists.
 * At 0, not `$`: producers may enqueue before the first worker ever starts, and `$` would
 * skip those jobs for good. The usual objection to 0 (a group re-created on a surviving
 * stream delivers its history again) does not bite here: acknowledged entries are trimmed
 * after jobs_retain_s, which is shorter than the result TTL, so any entry delivered again
 * still finds its result and is acknowledged without running. */
static int ensure_groups(dg_worker *w) {
    for (int i = 0; i < 2; i++) {
        redisReply *rep = dg_redis_cmdv(&w->redis, "XGROUP", "CREATE", w->streams[i], w->cfg->group,
                                        "0", "MKSTREAM", NULL);
        if (!rep) return -1;
        int ok = rep->type != REDIS_REPLY_ERROR || dg_reply_is_error(rep, "BUSYGROUP");
        if (!ok) {
            log_error("cannot create consumer group \"%s\" on \"%s\": %s", w->cfg->group,
                      w->streams[i], rep->str);
            if (dg_reply_is_error(rep, "NOPERM")) w->fatal = EX_CONFIG;
        }
        freeReplyObject(rep);
        if (!ok) return -1;
    }
    w->groups_ok = 1;
    w->drain_own = 1;
    return 0;
}

/* ---- taking entries --------------------------------------------------------------------------------- */

static const redisReply *field(const redisReply *fields, const char *name) {
    if (!fields || fields->type != REDIS_REPLY_ARRAY) return NULL;
    for (size_t i = 0; i + 1 < fields->elements; i += 2)
        if (fields->element[i]->type == REDIS_REPLY_STRING && !strcmp(fields->element[i]->str, name))
            return fields->element[i + 1];
    return NULL;
}

/* The last error of earlier attempts, for a job that is given up. */
static void last_error(const redisReply *hash, char *out, size_t outlen, int deliveries) {
    const redisReply *err = field(hash, "error"), *worker = field(hash, "worker"),
                     *state = field(hash, "state"), *attempt = field(hash, "attempt");
    if (err && err->type == REDIS_REPLY_STRING && err->len)
        snprintf(out, outlen, "gave up after %d deliveries; last error: %s", deliveries - 1, err->str);
    else if (state && state->type == REDIS_REPLY_STRING && !strcmp(state->str, "running"))
        snprintf(out, outlen, "gave up after %d deliveries; attempt %s on worker \"%s\" ended without "
                 "a result (the worker died or lost the job)", deliveries - 1,
                 attempt && attempt->type == REDIS_REPLY_STRING ? attempt->str : "?",
                 worker && worker->type == REDIS_REPLY_STRING ? worker->str : "?");
    else
        snprintf(out, outlen, "gave up after %d deliveries without a recorded error", deliveries - 1);
}

/* Records a retryable problem in the job hash, so that the attempt that gives up can say it. */
static void note_retry(dg_worker *w, dg_run *r, const char *why) {
    char key[DG_KEY_MAX], now[24];
    dg_key(w, key, "job", r->id);
    snprintf(now, sizeof now, "%lld", (long long)dg_now_ms());
    redisReply *rep = dg_redis_cmdv(&w->redis, "HSET", key, "state", "retrying", "error", why,
                                    "worker", w->cfg->worker_id, "updated_ms", now, NULL);
    if (rep) freeReplyObject(rep);
    log_warn("job \"%s\" (entry %s): %s; left pending for a later attempt", r->id, r->entry, why);
}

/* Takes one stream entry: decides whether it runs, and submits it. deliveries counts this
 * delivery. Returns -1 when Redis went away (the entry stays pending). */
static int take(dg_worker *w, const char *stream, const redisReply *entry, int deliveries) {
    const dg_daemon_config *cfg = w->cfg;
    const char *entry_id = entry->element[0]->str;
    const redisReply *fields = entry->elements > 1 ? entry->element[1] : NULL;
    char err[1024];

    if (find_run(w, stream, entry_id)) return 0;   /* already ours and running */
    if (!fields || fields->type != REDIS_REPLY_ARRAY) {
        /* trimmed while pending: nothing left to run; acknowledge so it leaves the PEL */
        log_warn("entry %s of \"%s\" was deleted while pending: job lost before it ran", entry_id, stream);
        redisReply *rep = dg_redis_cmdv(&w->redis, "XACK", stream, cfg->group, entry_id, NULL);
        if (rep) freeReplyObject(rep);
        pthread_mutex_lock(&w->lock);
        w->stats.entries_lost++;
        pthread_mutex_unlock(&w->lock);
        return rep ? 0 : -1;
    }

    dg_run *r = dg_run_new(w, stream, entry_id);
    r->deliveries = deliveries;
    const redisReply *fid = field(fields, "id"), *fjob = field(fields, "job");
    if (fjob && fjob->type == REDIS_REPLY_STRING) {
        r->job_len = fjob->len;
        r->job_bytes = malloc(fjob->len ? fjob->len : 1);
        if (!r->job_bytes) abort();
        memcpy(r->job_bytes, fjob->str, fjob->len);
    }
    dg_job_status st = DG_JOB_BAD_REQUEST;
    if (!fjob) snprintf(err, sizeof err, "stream entry has no `job` field");
    else st = dg_job_parse(&r->job, r->job_bytes, r->job_len, cfg, err, sizeof err);
    r->parsed = r->job.pb != NULL;

    /* the job id names every key: the protobuf's, else the entry's `id` field, else the entry id */
    if (r->parsed && dg_job_id_valid(r->job.pb->id, strlen(r->job.pb->id)))
        snprintf(r->id, sizeof r->id, "%s", r->job.pb->id);
    else if (fid && fid->type == REDIS_REPLY_STRING && dg_job_id_valid(fid->str, fid->len))
        snprintf(r->id, sizeof r->id, "%s", fid->str);
    else
        snprintf(r->id, sizeof r->id, "entry-%s", entry_id);
    if (r->parsed) {
        if (r->job.pb->max_attempts) r->max_attempts = (int)r->job.pb->max_attempts;
        if (r->job.pb->result_ttl_s) r->ttl_s = (int)r->job.pb->result_ttl_s;
        r->max_tokens = r->job.pb->text && r->job.pb->text->max_new_tokens
                            ? (int)r->job.pb->text->max_new_tokens : 0;
    }
    r->next = w->runs;
    w->runs = r;
    w->n_runs++;

    /* one round trip for everything that decides whether to run */
    char k_result[DG_KEY_MAX], k_cancel[DG_KEY_MAX], k_job[DG_KEY_MAX];
    dg_key(w, k_result, "result", r->id);
    dg_key(w, k_cancel, "cancel", r->id);
    dg_key(w, k_job, "job", r->id);
    /* the job hash says "running" (with worker and attempt) in the same round trip, before
     * the engine sees the job: if the process dies in a step, the next attempt can tell. The
     * earlier attempt's fields are read first (pipelines keep their order). */
    char attempt[16], now[24], ttl[16];
    snprintf(attempt, sizeof attempt, "%d", deliveries);
    snprintf(now, sizeof now, "%lld", (long long)dg_now_ms());
    snprintf(ttl, sizeof ttl, "%d", r->ttl_s);
    /* a first delivery has no earlier attempt to read about: its job hash is not fetched */
    int again = deliveries > 1, n_pre = 0;
    dg_cmd *pre[6];
    /* WATCH the result key now: if nothing else ends the watch before the job does, its
     * result needs no second look (see write_batch) */
    pre[n_pre++] = dg_cmd_of("WATCH", k_result, NULL);
    pre[n_pre++] = dg_cmd_of("EXISTS", k_result, NULL);
    pre[n_pre++] = dg_cmd_of("EXISTS", k_cancel, NULL);
    if (again) pre[n_pre++] = dg_cmd_of("HGETALL", k_job, NULL);
    pre[n_pre++] = dg_cmd_of("HSET", k_job, "state", "running", "worker", cfg->worker_id, "attempt", attempt,
                             "phase", "prefill", "progress", "0", "tokens", "0", "images", "0", "step", "0",
                             "error", "", "updated_ms", now, NULL);
    pre[n_pre++] = dg_cmd_of("EXPIRE", k_job, ttl, NULL);
    redisReply *rep[6];
    int rc = dg_redis_pipeline(&w->redis, pre, n_pre, rep);
    for (int i = 0; i < n_pre; i++) dg_cmd_free(pre[i]);
    if (rc) {
        unlink_run(w, r);
        dg_run_free(r);
        return -1;
    }
    int has_result = dg_reply_int(rep[1], 0) == 1, cancelled = dg_reply_int(rep[2], 0) == 1;
    if (!has_result) r->watched = watch_epoch(w);
    char why[1024] = "";
    if (deliveries > r->max_attempts) last_error(again ? rep[3] : NULL, why, sizeof why, deliveries);
    for (int i = 0; i < n_pre; i++) freeReplyObject(rep[i]);

    if (has_result) {
        /* delivered again after its result was written (the ack was lost, or the producer sent
         * the same id twice): give the job hash back the result's state, acknowledge only */
        redisReply *rs = dg_redis_cmdv(&w->redis, "HGET", k_result, "status", NULL);
        if (rs && rs->type == REDIS_REPLY_STRING) {
            redisReply *h = dg_redis_cmdv(&w->redis, "HSET", k_job, "state", rs->str, "phase", "finished", NULL);
            if (h) freeReplyObject(h);
        }
        if (rs) freeReplyObject(rs);
        redisReply *ack = dg_redis_cmdv(&w->redis, "XACK", stream, cfg->group, entry_id, NULL);
        if (ack) log_info("job \"%s\" (entry %s) already has a result: acknowledged without running",
                          r->id, entry_id);
        unlink_run(w, r);
        dg_run_free(r);
        if (!ack) return -1;
        freeReplyObject(ack);
        pthread_mutex_lock(&w->lock);
        w->stats.jobs_skipped++;
        pthread_mutex_unlock(&w->lock);
        return 0;
    }
    if (st != DG_JOB_OK) {
        r->dead = 1;
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED, st, "%s", err);
        log_warn("job \"%s\" (entry %s) refused: %s", r->id, entry_id, err);
        return 0;
    }
    if (deliveries > r->max_attempts) {
        r->dead = 1;
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED, DUOGEN__V1__ERROR__CODE__EXHAUSTED, "%s", why);
        log_warn("job \"%s\" (entry %s) delivered %d times (max_attempts %d): %s", r->id, entry_id,
                 deliveries, r->max_attempts, why);
        return 0;
    }
    if (cancelled) {
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__CANCELLED, 0, "cancelled");
        return 0;
    }
    if (r->job.pb->deadline_unix_ms && r->job.pb->deadline_unix_ms <= dg_now_ms()) {
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__EXPIRED, 0, "deadline");
        return 0;
    }
    st = dg_job_prepare(&r->job, &w->redis, cfg, err, sizeof err);
    if (st == DG_JOB_RETRY) {
        unlink_run(w, r);
        dg_run_free(r);
        return -1;
    }
    if (st != DG_JOB_OK) {
        r->dead = 1;
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED, st, "%s", err);
        log_warn("job \"%s\" (entry %s): %s", r->id, entry_id, err);
        return 0;
    }

    dg_sink sink;
    dg_run_sink(r, &sink);
    dg_run_started(r);
    rc = dg_sched_submit(w->sched, &r->job.req, &sink, &r->seq, err, sizeof err);
    if (rc == 0) {
        r->submitted = 1;
        log_info("job \"%s\" (entry %s, delivery %d) started", r->id, entry_id, deliveries);
        return 0;
    }
    switch (dg_error_class(rc)) {
    case DG_ERROR_BAD_INPUT:
        r->dead = 1;
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED,
                   rc == DG_EIMAGE ? DUOGEN__V1__ERROR__CODE__BAD_IMAGE : DUOGEN__V1__ERROR__CODE__BAD_REQUEST,
                   "%s", err);
        log_warn("job \"%s\" (entry %s) refused by the engine: %s", r->id, entry_id, err);
        return 0;
    case DG_ERROR_RETRYABLE:
        note_retry(w, r, err);
        break;
    case DG_ERROR_FATAL:
        log_error("job \"%s\": engine failure: %s", r->id, err);
        w->fatal = EX_TEMPFAIL;
        break;
    }
    unlink_run(w, r);
    dg_run_free(r);
    return 0;
}

/* Delivery counts of entries, from XPENDING <stream> <group> <id> <id> 1. */
static int delivery_counts(dg_worker *w, const char *stream, const redisReply *entries, int *counts) {
    int n = (int)entries->elements;
    if (!n) return 0;
    dg_cmd **cmds = calloc((size_t)n, sizeof *cmds);
    redisReply **rep = calloc((size_t)n, sizeof *rep);
    if (!cmds || !rep) abort();
    for (int i = 0; i < n; i++) {
        const char *id = entries->element[i]->element[0]->str;
        cmds[i] = dg_cmd_of("XPENDING", stream, w->cfg->group, id, id, "1", NULL);
    }
    int rc = dg_redis_pipeline(&w->redis, cmds, n, rep);
    for (int i = 0; i < n; i++) {
        counts[i] = 1;
        if (!rc && rep[i]->type == REDIS_REPLY_ARRAY && rep[i]->elements == 1 &&
            rep[i]->element[0]->elements == 4)
            counts[i] = (int)rep[i]->element[0]->element[3]->integer;
        dg_cmd_free(cmds[i]);
        if (rep[i]) freeReplyObject(rep[i]);
    }
    free(cmds);
    free(rep);
    return rc;
}

static int take_entries(dg_worker *w, const char *stream, const redisReply *entries, int first_delivery) {
    if (!entries || entries->type != REDIS_REPLY_ARRAY || !entries->elements) return 0;
    int *counts = calloc(entries->elements, sizeof *counts);
    if (!counts) abort();
    int rc = 0;
    if (first_delivery) for (size_t i = 0; i < entries->elements; i++) counts[i] = 1;
    else rc = delivery_counts(w, stream, entries, counts);
    for (size_t i = 0; !rc && i < entries->elements; i++) {
        const redisReply *e = entries->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 1 || e->element[0]->type != REDIS_REPLY_STRING) continue;
        rc = take(w, stream, e, counts[i]);
    }
    free(counts);
    return rc;
}

/* Our own pending entries (left by an earlier life of this consumer, or read before a
 * connection broke), claimed again so that their delivery count grows. */
static int drain_own(dg_worker *w, int room) {
    int more = 0;
    for (int s = 0; s < 2 && room > 0; s++) {
        char count[16];
        int want = room + w->n_runs + 1;   /* one more than we can take: tells whether more wait */
        snprintf(count, sizeof count, "%d", want);
        redisReply *pend = dg_redis_cmdv(&w->redis, "XPENDING", w->streams[s], w->cfg->group, "-", "+",
                                         count, w->cfg->worker_id, NULL);
        if (!pend) return -1;
        dg_cmd *claim = dg_cmd_of("XCLAIM", w->streams[s], w->cfg->group, w->cfg->worker_id, "0", NULL);
        int n = 0;
        for (size_t i = 0; pend->type == REDIS_REPLY_ARRAY && i < pend->elements && n < room; i++) {
            const char *id = pend->element[i]->element[0]->str;
            if (find_run(w, w->streams[s], id)) continue;
            dg_cmd_adds(claim, id);
            n++;
        }
        if (pend->type == REDIS_REPLY_ARRAY && (int)pend->elements == want) more = 1;
        freeReplyObject(pend);
        if (!n) {
            dg_cmd_free(claim);
            continue;
        }
        redisReply *got = dg_redis_cmd(&w->redis, claim);
        dg_cmd_free(claim);
        if (!got) return -1;
        if (got->elements) log_info("re-taking %zu of our own pending entries of \"%s\"", got->elements, w->streams[s]);
        int rc = take_entries(w, w->streams[s], got, 0);
        room -= (int)got->elements;
        freeReplyObject(got);
        if (rc) return -1;
    }
    w->drain_own = more;
    return 0;
}

/* XAUTOCLAIM: entries idle past claim_idle_ms, whose worker died or lost them. */
static int reap(dg_worker *w, int room) {
    char idle[16], count[16];
    snprintf(idle, sizeof idle, "%d", w->cfg->claim_idle_ms);
    for (int s = 0; s < 2 && room > 0; s++) {
        snprintf(count, sizeof count, "%d", room);
        redisReply *rep = dg_redis_cmdv(&w->redis, "XAUTOCLAIM", w->streams[s], w->cfg->group,
                                        w->cfg->worker_id, idle, "0-0", "COUNT", count, NULL);
        if (!rep) return -1;
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements >= 2) {
            const redisReply *entries = rep->element[1];
            if (entries->elements)
                log_info("took over %zu abandoned entries of \"%s\"", entries->elements, w->streams[s]);
            if (rep->elements >= 3 && rep->element[2]->elements) {
                log_warn("%zu pending entries of \"%s\" were deleted before they ran (trimmed): lost",
                         rep->element[2]->elements, w->streams[s]);
                pthread_mutex_lock(&w->lock);
                w->stats.entries_lost += (int64_t)rep->element[2]->elements;
                pthread_mutex_unlock(&w->lock);
            }
            int rc = take_entries(w, w->streams[s], entries, 0);
            room -= (int)entries->elements;
            if (rc) { freeReplyObject(rep); return -1; }
        } else if (rep->type == REDIS_REPLY_ERROR) {
            log_error("XAUTOCLAIM on \"%s\": %s", w->streams[s], rep->str);
            if (dg_reply_is_error(rep, "NOGROUP")) w->groups_ok = 0;
            if (dg_reply_is_error(rep, "NOPERM")) w->fatal = EX_CONFIG;
        }
        freeReplyObject(rep);
    }
    return 0;
}

/* Takes what an XREADGROUP of new entries returned. */
static int take_read(dg_worker *w, const redisReply *rep) {
    int rc = 0;
    if (rep->type == REDIS_REPLY_ERROR) {
        log_error("XREADGROUP: %s", rep->str);
        if (dg_reply_is_error(rep, "NOGROUP")) w->groups_ok = 0;
        else if (dg_reply_is_error(rep, "NOPERM")) w->fatal = EX_CONFIG;
    } else if (rep->type == REDIS_REPLY_ARRAY) {
        /* COUNT applies per stream: more than `room` may come back; all of it is ours now
         * and runs (max_inflight is exceeded by at most one read's worth) */
        for (size_t s = 0; s < rep->elements && !rc; s++) {
            const redisReply *sr = rep->element[s];
            rc = take_entries(w, sr->element[0]->str, sr->element[1], 1);
        }
    }
    return rc;
}

/* XREADGROUP of up to `room` new entries, high priority stream first; BLOCK when block. */
static dg_cmd *read_cmd(dg_worker *w, int room, int block) {
    char count[16], ms[16];
    snprintf(count, sizeof count, "%d", room);
    snprintf(ms, sizeof ms, "%d", w->cfg->block_ms);
    dg_cmd *c = dg_cmd_of("XREADGROUP", "GROUP", w->cfg->group, w->cfg->worker_id, "COUNT", count, NULL);
    if (block) {
        dg_cmd_adds(c, "BLOCK");
        dg_cmd_adds(c, ms);
    }
    dg_cmd_adds(c, "STREAMS");
    dg_cmd_adds(c, w->streams[0]);
    dg_cmd_adds(c, w->streams[1]);
    dg_cmd_adds(c, ">");
    dg_cmd_adds(c, ">");
    return c;
}

/* New entries; blocks only while idle. */
static int read_new(dg_worker *w, int room) {
    dg_cmd *c = read_cmd(w, room, w->n_runs == 0);
    redisReply *rep = dg_redis_cmd(&w->redis, c);
    dg_cmd_free(c);
    if (!rep) return -1;
    int rc = take_read(w, rep);
    freeReplyObject(rep);
    return rc;
}

/* ---- between steps ------------------------------------------------------------------------------------ */

/* Writes queued events and progress of every run, and asks whether any was cancelled. */
static void flush_progress(dg_worker *w) {
    int cap = 16, n = 0, first_extra;
    dg_cmd **cmds = malloc((size_t)cap * sizeof *cmds);
    if (!cmds) abort();
#define PUSH(c) do { if (n == cap) { cap *= 2; cmds = realloc(cmds, (size_t)cap * sizeof *cmds); if (!cmds) abort(); } cmds[n++] = (c); } while (0)
    for (dg_run *r = w->runs; r; r = r->next)   /* an ended run's go with its result */
        for (int i = 0; !r->ended && i < r->n_out; i++) PUSH(r->out[i]);
    first_extra = n;
    for (dg_run *r = w->runs; r; r = r->next) {
        dg_cmd *p = r->ended ? NULL : dg_run_progress_cmd(r);
        if (p) PUSH(p);
    }
    int first_cancel = n;
    for (dg_run *r = w->runs; r; r = r->next) {
        if (r->ended) continue;
        char key[DG_KEY_MAX];
        dg_key(w, key, "cancel", r->id);
        PUSH(dg_cmd_of("EXISTS", key, NULL));
    }
#undef PUSH
    if (n == 0) {
        free(cmds);
        return;
    }
    redisReply **rep = calloc((size_t)n, sizeof *rep);
    if (!rep) abort();
    int rc = dg_redis_pipeline(&w->redis, cmds, n, rep);
    if (rc == 0) {
        int k = first_cancel;
        for (dg_run *r = w->runs; r; r = r->next) {
            if (r->ended) continue;
            dg_run_out_written(r, r->n_out);
            if (dg_reply_int(rep[k++], 0) == 1 && r->submitted && !r->cancel_asked) {
                log_info("job \"%s\": cancelled by its producer", r->id);
                r->cancel_asked = 1;
                dg_sched_cancel(w->sched, r->seq);
            }
        }
        for (int i = 0; i < n; i++) if (rep[i] && rep[i]->type == REDIS_REPLY_ERROR && i < first_cancel)
            log_warn("progress write refused: %s", rep[i]->str);
    } else {
        for (dg_run *r = w->runs; r; r = r->next) r->dirty = 1;
    }
    for (int i = 0; i < n; i++) if (rep[i]) freeReplyObject(rep[i]);
    for (int i = first_extra; i < n; i++) dg_cmd_free(cmds[i]);
    free(rep);
    free(cmds);
}

/* Deadlines of running jobs: past it, a job stops at the next step as `expired`. */
static void check_deadlines(dg_worker *w) {
    int64_t now = dg_now_ms();
    for (dg_run *r = w->runs; r; r = r->next)
        if (r->submitted && !r->ended && !r->cancel_asked && r->job.pb->deadline_unix_ms &&
            r->job.pb->deadline_unix_ms <= now) {
            r->expired = 1;
            r->cancel_asked = 1;
            dg_sched_cancel(w->sched, r->seq);
        }
}

static void free_replies(redisReply **rep, int n) {
    for (int i = 0; i < n; i++)
        if (rep[i]) freeReplyObject(rep[i]);
}

static void log_end(const dg_run *r, int written) {
    static const char *names[] = {"?", "done", "failed", "cancelled", "expired"};
    if (!written) {
        log_info("job \"%s\" (entry %s) already has a result: acknowledged without writing", r->id, r->entry);
        return;
    }
    log_info("job \"%s\" %s%s%s (%d tokens, %d images, delivery %d)", r->id,
             names[r->status >= 1 && r->status <= 4 ? r->status : 0], r->error[0] ? ": " : "",
             r->error, r->tokens, r->n_imgs, r->deliveries);
}

/* Writes the results of n ended runs: first what they still have queued (events, images)
 * with WATCH on their result keys and EXISTS of each, then one MULTI/EXEC holding every
 * result, final event, done (and dead) entry and XACK. A result key that exists already
 * (the job was done by a worker that lost its lease, or the ack was lost) is only
 * acknowledged. If EXEC is aborted because a result appeared meanwhile, each run is tried
 * again alone. Returns 0, -1 when Redis went away, -2 when it refused a command. */
static int write_batch(dg_worker *w, dg_run **runs, int n, dg_cmd *then, redisReply **then_reply) {
    dg_redis *rd = &w->redis;
    int cap = 9 + n * (DG_RESULT_CMDS_MAX + 3), m = 0;
    for (int i = 0; i < n; i++) cap += runs[i]->n_out;
    dg_cmd **cmds = malloc((size_t)cap * sizeof *cmds);
    redisReply **rep = calloc((size_t)cap, sizeof *rep);
    int *exists = calloc((size_t)n, sizeof *exists);
    if (!cmds || !rep || !exists) abort();
    int rc = 0, borrowed = 0;

    /* the fast path: every result key is still WATCHed from when its job was taken, and was
     * absent then; if one has been written since, EXEC aborts and each run is tried alone */
    int fast = 1;
    for (int i = 0; i < n; i++) fast &= runs[i]->watched == watch_epoch(w);
    if (fast) {
        for (int i = 0; i < n; i++)
            for (int k = 0; k < runs[i]->n_out; k++) cmds[m++] = runs[i]->out[k];
        borrowed = m;
        goto transaction;
    }

    for (int i = 0; i < n; i++)
        for (int k = 0; k < runs[i]->n_out; k++) cmds[m++] = runs[i]->out[k];
    borrowed = m;
    dg_cmd *watch = dg_cmd_of("WATCH", NULL);
    for (int i = 0; i < n; i++) {
        char key[DG_KEY_MAX];
        dg_key(w, key, "result", runs[i]->id);
        dg_cmd_adds(watch, key);
        cmds[m + 1 + i] = dg_cmd_of("EXISTS", key, NULL);
    }
    cmds[m] = watch;
    m += 1 + n;
    if (dg_redis_pipeline(rd, cmds, m, rep)) {
        rc = -1;
    } else {
        for (int i = 0; i < n; i++) {
            exists[i] = dg_reply_int(rep[borrowed + 1 + i], 0) == 1;
            dg_run_out_written(runs[i], runs[i]->n_out);
        }
    }
    free_replies(rep, m);
    for (int i = borrowed; i < m; i++) dg_cmd_free(cmds[i]);
    if (rc) goto out;
    m = borrowed = 0;

transaction:;
    int writes = 0;
    for (int i = 0; i < n; i++)
        if (exists[i]) cmds[m++] = dg_cmd_of("XACK", runs[i]->stream, w->cfg->group, runs[i]->entry, NULL);
        else writes++;
    if (writes) {
        cmds[m++] = dg_cmd_of("MULTI", NULL);
        for (int i = 0; i < n; i++)
            if (!exists[i]) m += dg_run_result_cmds(runs[i], cmds + m);
        cmds[m++] = dg_cmd_of("EXEC", NULL);
    } else {
        cmds[m++] = dg_cmd_of("UNWATCH", NULL);
    }
    int n_then = 0;
    if (then) {   /* the next read rides in the same round trip; its reply goes back as it is */
        cmds[m++] = then;
        n_then = 1;
    }
    w->execs++;   /* EXEC or UNWATCH: every WATCH of the connection ends here */
    if (dg_redis_pipeline(rd, cmds, m, rep)) {
        rc = -1;
        m -= n_then;
    } else {
        if (n_then) {
            *then_reply = rep[--m];
            rep[m] = NULL;
        }
        for (int i = 0; i < n && borrowed; i++) dg_run_out_written(runs[i], runs[i]->n_out);
        for (int i = borrowed; i < m - 1; i++)
            if (rep[i]->type == REDIS_REPLY_ERROR) {
                log_error("Redis refused a result command: %s", rep[i]->str);
                rc = -2;
            }
        const redisReply *exec = rep[m - 1];
        if (writes && exec->type == REDIS_REPLY_NIL) {
            /* a result key changed between WATCH and EXEC: nothing was written; retry alone,
             * each with a fresh WATCH and look */
            for (int i = 0; i < n; i++) runs[i]->watched = 0;
            for (int i = 0; i < n && !rc; i++) rc = write_batch(w, &runs[i], 1, NULL, NULL);
            goto out_cmds;
        }
        if (writes && exec->type == REDIS_REPLY_ERROR) {
            log_error("result transaction failed: %s", exec->str);
            rc = -2;
        }
        for (size_t i = 0; writes && exec->type == REDIS_REPLY_ARRAY && i < exec->elements; i++)
            if (exec->element[i]->type == REDIS_REPLY_ERROR) {
                log_error("result transaction command %zu: %s", i, exec->element[i]->str);
                rc = -2;
            }
        if (!rc)
            for (int i = 0; i < n; i++) {
                dg_run *r = runs[i];
                log_end(r, !exists[i]);
                if (!exists[i]) count_end(w, r);
                unlink_run(w, r);
                dg_run_free(r);
            }
    }
out_cmds:
    free_replies(rep, m);
    for (int i = borrowed; i < m; i++) dg_cmd_free(cmds[i]);
out:
    free(cmds);
    free(rep);
    free(exists);
    return rc;
}

/* Writes the results of ended runs; when room will be free afterwards and the loop would
 * read new entries next, the XREADGROUP goes in the same round trip as the EXEC. */
static void write_results(dg_worker *w, int may_read) {
    dg_run *batch[64];
    int n = 0;
    /* a run that failed for a passing reason gets no result: it stays pending, its lease
     * lapses, and a reaper (this worker's or another's) delivers it again */
    for (dg_run *r = w->runs, *next; r; r = next) {
        next = r->next;
        if (!r->ended || !r->retry) continue;
        note_retry(w, r, r->error);
        unlink_run(w, r);
        dg_run_free(r);
    }
    for (dg_run *r = w->runs; r && n < 64; r = r->next)
        if (r->ended) batch[n++] = r;
    if (!n) return;
    int room = w->cfg->max_inflight - (w->n_runs - n);
    dg_cmd *then = may_read && room > 0 ? read_cmd(w, room, 0) : NULL;
    redisReply *got = NULL;
    int rc = write_batch(w, batch, n, then, &got);
    if (rc == -2) {
        log_error("Redis refused to store results: check the worker's ACL (it needs HSET, EXPIRE, "
                  "XADD, XACK, MULTI, EXEC, WATCH on its keys)");
        w->fatal = EX_CONFIG;
    }
    if (got) {
        if (!w->fatal) take_read(w, got);
        freeReplyObject(got);
    }
    dg_cmd_free(then);
}

/* ---- the loop -------------------------------------------------------------------------------------------- */

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);   /* a signal ends it early, which is what we want */
}

static void status_line(dg_worker *w) {
    if (!w->redis.c) {
        dg_notify_status("waiting for Redis: %s", w->redis.error);
        return;
    }
    if (*w->stop) {
        dg_notify_status("draining %d job(s)", w->n_runs);
        return;
    }
    if (!w->runs) {
        dg_notify_status("idle");
        return;
    }
    dg_run *r = w->runs;
    if (r->steps) dg_notify_status("job %s %s step %d/%d (%d running)", r->id, r->phase, r->step, r->steps, w->n_runs);
    else dg_notify_status("job %s %s %d tokens (%d running)", r->id, r->phase, r->tokens, w->n_runs);
}

int dg_worker_run(dg_worker *w) {
    const dg_daemon_config *cfg = w->cfg;
    char err[512];
    int64_t drain_deadline = 0, last_extend = 0, last_flush = 0;
    if (dg_keeper_start(w, err, sizeof err)) {
        log_error("%s", err);
        return EX_TEMPFAIL;
    }
    if (cfg->metrics_port && dg_metrics_start(w, err, sizeof err)) {
        log_error("%s", err);
        dg_keeper_stop(w);
        return EX_CONFIG;
    }
    w->next_reaper_ms = dg_mono_ms();

    for (;;) {
        dg_notify_watchdog();
        if (w->fatal) break;
        int64_t now = dg_mono_ms();
        if (*w->stop && !drain_deadline) {
            drain_deadline = now + cfg->drain_ms;
            dg_notify_stopping("draining");
            log_info("stopping: no new jobs; %d running get %d ms to finish", w->n_runs, cfg->drain_ms);
        }
        if (drain_deadline) {
            if (!w->runs) break;
            if (now - last_extend > 1000) {
                /* keep systemd's stop timeout ahead of the drain */
                int64_t left = drain_deadline - now;
                dg_notify_extend((uint64_t)((left > 0 ? left : 0) + 10000) * 1000u);
                last_extend = now;
            }
            if (now >= drain_deadline || *w->stop > 1) {
                for (dg_run *r = w->runs; r; r = r->next)
                    log_warn("job \"%s\" (entry %s) not finished in the drain time: left pending "
                             "for another worker", r->id, r->entry);
                break;
            }
        }

        int connected = dg_redis_ready(&w->redis);
        if (w->redis.fatal) {
            log_error("Redis refused this worker: %s", w->redis.error);
            w->fatal = EX_CONFIG;
            break;
        }
        if (connected && !w->groups_ok && ensure_groups(w) && w->fatal) break;
        publish(w);
        status_line(w);

        int stepping = 0;
        for (dg_run *r = w->runs; r; r = r->next) stepping |= r->submitted && !r->ended;
        int room = cfg->max_inflight - w->n_runs;
        if (connected && w->groups_ok && room > 0 && !drain_deadline) {
            int rc;
            if (w->drain_own) rc = drain_own(w, room);
            else if (dg_mono_ms() >= w->next_reaper_ms) {
                rc = reap(w, room);
                w->next_reaper_ms = dg_mono_ms() + cfg->reaper_ms;
            } else rc = read_new(w, room);
            if (rc) continue;   /* connection lost: the top of the loop reconnects */
            if (w->fatal) break;
            publish(w);
        }
        check_deadlines(w);
        stepping = 0;
        for (dg_run *r = w->runs; r; r = r->next) stepping |= r->submitted && !r->ended;
        if (stepping) {
            if (dg_sched_step(w->sched, err, sizeof err) < 0) {
                log_error("engine failure: %s", err);
                w->fatal = EX_TEMPFAIL;
                break;
            }
        }
        if (w->runs && dg_redis_ready(&w->redis)) {
            /* progress goes out at most every flush_ms (short steps are coalesced); an ended
             * run's events go with its result */
            int64_t t = dg_mono_ms();
            if (t - last_flush >= cfg->flush_ms) {
                flush_progress(w);
                last_flush = t;
            }
            int may_read = !drain_deadline && w->groups_ok && !w->drain_own && dg_mono_ms() < w->next_reaper_ms;
            write_results(w, may_read);
        }
        if (!stepping && !dg_redis_ready(&w->redis)) {
            int wait = dg_redis_wait_ms(&w->redis);
            sleep_ms(wait < 5 ? 5 : wait > 200 ? 200 : wait);
        } else if (!stepping && w->runs) {
            sleep_ms(5);   /* results waiting on a refusing Redis: do not spin */
        }
    }

    publish(w);
    dg_metrics_stop(w);
    dg_keeper_stop(w);
    if (w->fatal) return w->fatal;
    return 0;
}
