/* Taking jobs: the plan (dg_take_decide), and its effects, which turn stream entries into
 * runs (see take.h). */
#include "take.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.pb-c.h"
#include "log.h"

/* ---- the decision ------------------------------------------------------------------------------ */

static dg_take_step one(dg_take_source source, const char *stream, int count) {
    return (dg_take_step){.source = source, .streams = {stream}, .n_streams = 1, .count = count};
}

dg_take_plan dg_take_decide(const dg_take_facts *f) {
    dg_take_plan p = {0};
    if (!f->connected) return p;
    int own = f->own_pending;
    if (!f->groups_ok) {
        if (f->groups_wait) return p;   /* a refused creation: nothing can be taken until it is made */
        p.steps[p.n_steps++] = (dg_take_step){.source = DG_TAKE_GROUPS, .streams = {f->high, f->normal},
                                              .n_streams = 2};
        own = 1;   /* made again, a group may hold entries of an earlier life of this consumer */
    }
    if (f->room <= 0 || f->draining) return p;
    /* priority: every source of the high stream before any of the normal one */
    const char *streams[2] = {f->high, f->normal};
    for (int i = 0; i < 2; i++) {
        if (own) p.steps[p.n_steps++] = one(DG_TAKE_OWN, streams[i], f->room);
        if (f->reaper_due) p.steps[p.n_steps++] = one(DG_TAKE_REAP, streams[i], f->room);
        p.steps[p.n_steps++] = one(DG_TAKE_READ, streams[i], f->room);
    }
    if (!f->held && f->block_ms > 0)
        p.steps[p.n_steps++] = (dg_take_step){.source = DG_TAKE_READ, .streams = {f->high, f->normal},
                                              .n_streams = 2, .count = 1, .block_ms = f->block_ms};
    return p;
}

int dg_take_step_count(const dg_take_step *s, int taken) {
    if (s->source == DG_TAKE_READ && s->n_streams == 2) return taken ? 0 : s->count;   /* the idle wait */
    return s->count > taken ? s->count - taken : 0;
}

int dg_take_park_normal(const dg_take_step *s, int high_got) { return high_got >= s->count; }

/* ---- state ------------------------------------------------------------------------------------- */

void dg_take_init(dg_taker *t, dg_redis *redis, const dg_daemon_config *cfg, const dg_keys *keys,
                  dg_sched *sched, dg_committer *commit, dg_runs *held) {
    *t = (dg_taker){.redis = redis, .cfg = cfg, .keys = keys, .sched = sched, .commit = commit,
                    .held = held, .own_pending = 1, .next_reaper_ms = dg_mono_ms(), .life_start_ms = dg_mono_ms()};
}

void dg_take_free(dg_taker *t) {
    free(t->released);
    t->released = NULL;
    t->n_released = t->cap_released = 0;
}

/* ---- entries given back --------------------------------------------------------------------------- */

static int released_find(const dg_taker *t, const char *stream, const char *entry) {
    for (int i = 0; i < t->n_released; i++)
        if (!strcmp(t->released[i].entry, entry) && !strcmp(t->released[i].stream, stream)) return i;
    return -1;
}

static void released_forget(dg_taker *t, int i) {
    if (i >= 0) t->released[i] = t->released[--t->n_released];
}

/* When the reaper is next due, given `next`: no later than the first entry given back that
 * may be delivered again (it has been idle claim_idle_ms by then: its idle time counts
 * from its last delivery), not at the reaper's next turn up to reaper_ms later. A hold after
 * a reconnect still holds; an entry whose time has passed is not waited for (the reaper
 * looked, or another worker took it: its time would keep the reaper due for ever). */
static int64_t reaper_next(const dg_taker *t, int64_t next) {
    const int64_t now = dg_mono_ms();
    for (int i = 0; i < t->n_released; i++) {
        int64_t due = t->released[i].until_ms;
        if (due <= now) continue;
        if (due < t->reap_hold_until) due = t->reap_hold_until;
        if (due < next) next = due;
    }
    return next;
}

/* An entry left pending for a later attempt: not taken back before claim_idle_ms. The list
 * is bounded: past DG_TAKE_RELEASED_MAX the one given back longest ago goes (counted as never
 * run should it still be ours: a fleet of that many passing failures at once is broken). */
static void released_add(dg_taker *t, const char *stream, const char *entry, int deliveries) {
    int i = released_find(t, stream, entry);
    if (i < 0 && t->n_released == DG_TAKE_RELEASED_MAX) {
        int oldest = 0;
        for (int k = 1; k < t->n_released; k++)
            if (t->released[k].until_ms < t->released[oldest].until_ms) oldest = k;
        released_forget(t, oldest);
    }
    if (i < 0) {
        if (t->n_released == t->cap_released) {
            t->cap_released = t->cap_released ? t->cap_released * 2 : 8;
            t->released = realloc(t->released, (size_t)t->cap_released * sizeof *t->released);
            if (!t->released) abort();
        }
        i = t->n_released++;
        snprintf(t->released[i].stream, sizeof t->released[i].stream, "%s", stream);
        snprintf(t->released[i].entry, sizeof t->released[i].entry, "%s", entry);
    }
    t->released[i].until_ms = dg_mono_ms() + t->cfg->claim_idle_ms;
    t->released[i].deliveries = deliveries;
    t->next_reaper_ms = reaper_next(t, t->next_reaper_ms);
}

dg_take_facts dg_take_facts_now(dg_taker *t, int connected, int draining, int room) {
    /* a connection that broke may have taken entries whose reply never came (an XREADGROUP
     * or XCLAIM executed, its answer lost): they are in our pending list, held by no run,
     * and must be taken back now, not after claim_idle_ms by a reaper that counts another
     * delivery */
    if (t->redis->connects != t->connects_seen) {
        /* after an outage, or a Redis restarted from a snapshot, every lease's idle time ran
         * on: the reaper waits until each live worker's keeper has reconnected (at most the
         * longest backoff, jittered) and renewed (at once on a new connection), or it takes
         * running jobs over and counts them a delivery. The first connect too (a worker
         * started while Redis was away); a reconnect during a hold does not lengthen it, or
         * a connection that kept breaking would hold the reaper for ever */
        const int64_t now = dg_mono_ms();
        if (now >= t->reap_hold_until) {
            t->reap_hold_until = now + DG_REDIS_BACKOFF_MAX_MS * 6 / 5 + 1000;
            if (t->next_reaper_ms < t->reap_hold_until) t->next_reaper_ms = t->reap_hold_until;
        }
        t->connects_seen = t->redis->connects;
        t->own_pending = 1;
    }
    if (dg_mono_ms() < t->input_retry_ms) room = 0;   /* it could not read a job's inputs a moment ago */
    return (dg_take_facts){
        .connected = connected, .groups_ok = t->groups_ok,
        .groups_wait = !t->groups_ok && dg_mono_ms() < t->groups_retry_ms, .own_pending = t->own_pending,
        .reaper_due = dg_mono_ms() >= t->next_reaper_ms, .draining = draining, .room = room,
        .held = t->held->n, .block_ms = t->cfg->block_ms,
        .high = t->keys->streams[0], .normal = t->keys->streams[1],
    };
}

/* ---- one entry --------------------------------------------------------------------------------- */

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
    const size_t nc = sizeof DG_TAKE_NOT_COUNTED - 1;
    if (err && err->type == REDIS_REPLY_STRING && err->len > nc && !strcmp(err->str + err->len - nc, DG_TAKE_NOT_COUNTED))
        snprintf(out, outlen, "gave up after %d deliveries; last error: %s; a delivery after that note counted (the "
                 "give-back did not land, or the next worker died before it started the job)", deliveries - 1, err->str);
    else if (err && err->type == REDIS_REPLY_STRING && err->len)
        snprintf(out, outlen, "gave up after %d deliveries; last error: %s", deliveries - 1, err->str);
    else if (state && state->type == REDIS_REPLY_STRING && !strcmp(state->str, "running"))
        snprintf(out, outlen, "gave up after %d deliveries; attempt %s on worker \"%s\" ended without "
                 "a result (the worker died or lost the job)", deliveries - 1,
                 attempt && attempt->type == REDIS_REPLY_STRING ? attempt->str : "?",
                 worker && worker->type == REDIS_REPLY_STRING ? worker->str : "?");
    else if (!attempt)
        snprintf(out, outlen, "gave up after %d deliveries, none of which got to start the job (a "
                 "worker died while reading it?)", deliveries - 1);
    else
        snprintf(out, outlen, "gave up after %d deliveries without a recorded error", deliveries - 1);
}

/* Records a retryable problem in the job hash, so that the attempt that gives up can say it. */
static void note_retry(dg_taker *t, const dg_run *r, const char *message) {
    char key[DG_KEY_MAX], now[24], why[1024];
    snprintf(why, sizeof why, "%s", message);
    dg_utf8_scrub(why);
    dg_key_job(key, t->cfg->prefix, r->id);
    snprintf(now, sizeof now, "%lld", (long long)dg_now_ms());
    redisReply *rep = dg_redis_cmdv(t->redis, "HSET", key, "state", "retrying", "error", why,
                                    "worker", t->cfg->worker_id, "updated_ms", now, NULL);
    if (rep) freeReplyObject(rep);
    log_warn("job \"%s\" (entry %s): %s; left pending for a later attempt", r->id, r->entry, why);
}

/* Fills a new run from its entry's fields: the job as received and parsed, the id that
 * names its keys, and the job's own limits. Returns the parse status; err says why not.
 * A delivery past the job's max_attempts is not unpacked (r->parsed stays 0, the status is
 * DG_JOB_OK and r->max_attempts the limit): should reading the job be what kills the worker,
 * every delivery would die there before it could be given up, and the job would take down
 * worker after worker for ever. Its limit, id and TTL are read off the wire (dg_job_peek). */
static dg_job_status parse(const dg_taker *t, dg_run *r, const redisReply *fields, char *err, size_t errlen) {
    const redisReply *fid = field(fields, "id"), *fjob = field(fields, "job");
    if (fjob && fjob->type == REDIS_REPLY_STRING) {
        r->job_len = fjob->len;
        r->job_bytes = malloc(fjob->len ? fjob->len : 1);
        if (!r->job_bytes) abort();
        memcpy(r->job_bytes, fjob->str, fjob->len);
    }
    dg_job_wire wire = {0};
    if (r->job_bytes) dg_job_peek(r->job_bytes, r->job_len, &wire);
    /* values the unpacked job would be refused for: the worker's defaults */
    const int limit = wire.max_attempts >= 1 && wire.max_attempts <= DG_JOB_MAX_ATTEMPTS ? (int)wire.max_attempts
                                                                                      : t->cfg->max_attempts;
    const int unread = fjob && r->deliveries > limit;
    dg_job_status st = DG_JOB_BAD_REQUEST;
    if (!fjob) snprintf(err, errlen, "stream entry has no `job` field");
    else if (unread) {
        st = DG_JOB_OK;
        r->max_attempts = limit;
        if (wire.result_ttl_s >= 1 && wire.result_ttl_s <= DG_JOB_MAX_TTL_S) r->ttl_s = (int)wire.result_ttl_s;
    } else st = dg_job_parse(&r->job, r->job_bytes, r->job_len, t->cfg, err, errlen);
    r->parsed = r->job.pb != NULL;

    /* the job id names every key: the protobuf's (or its wire bytes', unread), else the
     * entry's `id` field, else the entry id; the two given and not the same, the job is
     * refused, under the entry's */
    const char *pb_id = r->parsed && dg_job_id_valid(r->job.pb->id, strlen(r->job.pb->id)) ? r->job.pb->id
                        : unread && dg_job_id_valid(wire.id, wire.id_len)                ? wire.id
                                                                                         : NULL;
    const size_t pb_id_len = !pb_id ? 0 : pb_id == wire.id ? wire.id_len : strlen(pb_id);
    const int field_ok = fid && fid->type == REDIS_REPLY_STRING && dg_job_id_valid(fid->str, fid->len);
    if (pb_id && field_ok && (fid->len != pb_id_len || memcmp(fid->str, pb_id, pb_id_len))) {
        snprintf(r->id, sizeof r->id, "%s", fid->str);
        if (st == DG_JOB_OK) {
            snprintf(err, errlen, "the stream entry's id \"%s\" is not the job's id \"%.*s\" (its `id` field and "
                     "Job.id must be the same)", fid->str, (int)pb_id_len, pb_id);
            st = DG_JOB_BAD_REQUEST;
        }
    } else if (pb_id)
        snprintf(r->id, sizeof r->id, "%.*s", (int)pb_id_len, pb_id);
    else if (field_ok)
        snprintf(r->id, sizeof r->id, "%s", fid->str);
    else
        snprintf(r->id, sizeof r->id, "entry-%s", r->entry);
    if (r->parsed && st == DG_JOB_OK) {   /* a refused job's values are not to be trusted (a TTL of -1) */
        if (r->job.pb->max_attempts) r->max_attempts = (int)r->job.pb->max_attempts;
        if (r->job.pb->result_ttl_s) r->ttl_s = (int)r->job.pb->result_ttl_s;
        /* progress counts words against the job's own bound, else the package's (a job that
         * left it to the package stayed at progress 0 to its end) */
        dg_text_params defaults;
        dg_sched_defaults(t->sched, &defaults, NULL);
        r->max_tokens = r->job.pb->text && r->job.pb->text->max_new_tokens
                            ? (int)r->job.pb->text->max_new_tokens : defaults.max_new_tokens;
    }
    return st;
}

/* What Redis says about a job before it runs. */
typedef struct {
    int  has_result;         /* its result key exists */
    int  cancelled;          /* its cancel key exists */
    char why[1024];          /* delivered over max_attempts: what the earlier attempts left */
} seen;

/* One round trip for everything that decides whether to run; then, for a delivery within
 * max_attempts of a job without a result, a second that makes the job hash say "running"
 * (with worker and attempt) before the engine sees the job: if the process dies in a step,
 * the next attempt can tell. (In one round trip with the first, a job whose result exists,
 * only acknowledged, lost the error, attempt and counts its hash had.) Returns 0, or -1
 * when Redis went away. */
static int look(dg_taker *t, dg_run *r, seen *s, int valid) {
    const dg_daemon_config *cfg = t->cfg;
    char k_result[DG_KEY_MAX], k_cancel[DG_KEY_MAX], k_job[DG_KEY_MAX];
    dg_key_result(k_result, cfg->prefix, r->id);
    dg_key_cancel(k_cancel, cfg->prefix, r->id);
    dg_key_job(k_job, cfg->prefix, r->id);
    char attempt[16], now[24], ttl[16];
    snprintf(attempt, sizeof attempt, "%d", r->deliveries);
    snprintf(now, sizeof now, "%lld", (long long)dg_now_ms());
    snprintf(ttl, sizeof ttl, "%d", r->ttl_s);
    /* a first delivery has no earlier attempt to read about: its job hash is not fetched */
    int again = r->deliveries > 1, n_pre = 0;
    dg_cmd *pre[6];
    /* WATCH the result key now: if nothing else ends the watch before the job does, its
     * result needs no second look (dg_commit_write) */
    pre[n_pre++] = dg_cmd_of("WATCH", k_result, NULL);
    pre[n_pre++] = dg_cmd_of("EXISTS", k_result, NULL);
    pre[n_pre++] = dg_cmd_of("EXISTS", k_cancel, NULL);
    if (again) pre[n_pre++] = dg_cmd_of("HGETALL", k_job, NULL);
    redisReply *rep[6];
    int rc = dg_redis_pipeline(t->redis, pre, n_pre, rep);
    for (int i = 0; i < n_pre; i++) dg_cmd_free(pre[i]);
    if (rc) return -1;
    s->has_result = dg_reply_int(rep[1], 0) == 1;
    s->cancelled = dg_reply_int(rep[2], 0) == 1;
    if (!s->has_result) r->watched = dg_commit_watch_epoch(t->commit);
    s->why[0] = 0;
    if (r->deliveries > r->max_attempts) last_error(again ? rep[3] : NULL, s->why, sizeof s->why, r->deliveries);
    for (int i = 0; i < n_pre; i++) freeReplyObject(rep[i]);
    /* a delivery past max_attempts does not run: it leaves the earlier attempt's fields as
     * they are, so that, if its give-up is lost (Redis dies before the commit), the next
     * delivery still reads the earlier attempt's error, not a run that never was */
    if (s->has_result || r->deliveries > r->max_attempts) return 0;
    char k_taken[DG_KEY_MAX], taker[DG_JOB_ID_MAX + 200];
    dg_key_taken(k_taken, r->stream);
    snprintf(taker, sizeof taker, "%s %s", r->id, cfg->worker_id);
    /* and the entry into the stream's taken index, "<job id> <worker id>": should the entry
     * be deleted (a producer's MAXLEN) while it waits for a later attempt, the job still gets
     * a result (the sweep) */
    dg_cmd *mark[3] = {dg_cmd_of("HSET", k_job, "state", "running", "worker", cfg->worker_id, "attempt", attempt,
                                 "phase", "prefill", "progress", "0", "tokens", "0", "images", "0", "step", "0",
                                 "error", "", "ttl_s", ttl, "updated_ms", now, NULL),
                       dg_cmd_of("EXPIRE", k_job, ttl, NULL), dg_cmd_of("HSET", k_taken, r->entry, taker, NULL)};
    /* the job's metadata, echoed as meta.<key> fields (proto/duogen.proto Job.metadata); a
     * refused job's is not (it may be what was refused: bytes that are not UTF-8) */
    for (size_t i = 0; valid && r->job.pb && i < r->job.pb->n_metadata; i++) {
        dg_cmd_addf(mark[0], "meta.%s", r->job.pb->metadata[i]->key);
        dg_cmd_adds(mark[0], r->job.pb->metadata[i]->value);
    }
    rc = dg_redis_pipeline(t->redis, mark, 3, rep);
    for (int i = 0; i < 3; i++) {
        dg_cmd_free(mark[i]);
        if (!rc && rep[i]->type == REDIS_REPLY_ERROR)   /* the job runs; what Redis refused is said */
            log_error("job \"%s\": Redis refused %s: %s", r->id, i == 2 ? "its taken index entry" : "its job hash",
                      rep[i]->str);
        if (!rc) freeReplyObject(rep[i]);
    }
    return rc ? -1 : 0;
}

/* ---- entries deleted while pending: the taken index's sweep ----------------------------------
 * An entry deleted from its stream (a producer's MAXLEN or XDEL) while pending leaves the
 * pending list without a word: XAUTOCLAIM lists it once, to whichever reaper comes first,
 * XCLAIM drops it silently. A job an attempt had taken (given back for a later one, or its
 * worker died) was left "retrying" or "running" with no result (found by review). Each
 * attempt files its entry in the stream's taken index (look(); keys.h), cleared with the
 * XACK of its result; the sweep looks at the index every few heartbeats and fails, with a
 * result that says so, each job whose entry is gone from the stream and from the pending
 * list, that has no result, and that no live run holds: no run of ours has the job, and
 * neither the worker that took this entry (the field's value names it) nor the one the job
 * hash names lists the job in its heartbeat (the same id may run from another entry: a
 * retried XADD), over claim_idle_ms at least (what a stalled worker keeps its lease for; and
 * a run's heartbeat lists its job within a beat of its start). Several workers may fail
 * the same job: the result's WATCH writes it once. A field whose entry is still in the
 * stream but not pending was acknowledged (or its group made again): it goes. */

/* A heartbeat's `job` list longer than this may have been cut (worker.h stats.jobs holds 511
 * bytes, and a job id is up to 128) */
#define JOBS_LISTED_WHOLE (511 - 129)

static int lost_seen_find(const dg_taker *t, const char *stream, const char *entry) {
    for (int i = 0; i < t->n_lost_seen; i++)
        if (!strcmp(t->lost_seen[i].entry, entry) && !strcmp(t->lost_seen[i].stream, stream)) return i;
    return -1;
}

static void lost_seen_forget(dg_taker *t, const char *stream, const char *entry) {
    const int i = lost_seen_find(t, stream, entry);
    if (i >= 0) t->lost_seen[i] = t->lost_seen[--t->n_lost_seen];
}

/* Whether a run we hold is of job `id` (from this entry or another: a retried XADD). */
static int runs_have_job(const dg_runs *held, const char *id) {
    for (const dg_run *r = held->first; r; r = r->next)
        if (!strcmp(r->id, id)) return 1;
    return 0;
}

/* The job's run, ended as failed; committed with the others (its XACK is a no-op, its HDEL
 * clears the field). Its result keeps the job's TTL, ttl_s of its hash (0 where the hash
 * expired or an older worker wrote it: the default). */
static void fail_lost(dg_taker *t, const char *stream, const char *entry, const char *id, int attempt, int ttl_s) {
    dg_run *r = dg_run_new(t->cfg, stream, entry);
    snprintf(r->id, sizeof r->id, "%s", id);
    r->deliveries = attempt;
    if (ttl_s >= 1 && ttl_s <= (int)DG_JOB_MAX_TTL_S) r->ttl_s = ttl_s;
    dg_runs_add(t->held, r);
    dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED, DUOGEN__V1__ERROR__CODE__UNAVAILABLE,
               "its stream entry %s of \"%s\" was deleted (MAXLEN or XDEL) before an attempt finished: "
               "nothing is left to run; send the job again", entry, stream);
    log_warn("job \"%s\": entry %s of \"%s\" was deleted before an attempt finished: failed", id, entry, stream);
}

/* Whether the worker `who` (its heartbeat hash live, not stopped) lists job `id` as running,
 * or lists so many that `id` may be among those cut off. -1 when Redis went away. */
static int listed_by(dg_taker *t, const char *who, const char *id) {
    char key[DG_KEY_MAX];
    dg_key_worker(key, t->cfg->prefix, who);
    dg_cmd *cmds[2] = {dg_cmd_of("HGET", key, "state", NULL), dg_cmd_of("HGET", key, "job", NULL)};
    redisReply *rep[2];
    int rc = dg_redis_pipeline(t->redis, cmds, 2, rep);
    dg_cmd_free(cmds[0]);
    dg_cmd_free(cmds[1]);
    if (rc) return -1;
    int listed = 0;
    if (rep[0]->type == REDIS_REPLY_STRING && strcmp(rep[0]->str, "stopped") && rep[1]->type == REDIS_REPLY_STRING) {
        const char *list = rep[1]->str;
        const size_t n = strlen(id);
        for (const char *p = strstr(list, id); p && !listed; p = strstr(p + 1, id))
            listed = (p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == 0);
        listed |= rep[1]->len > JOBS_LISTED_WHOLE;   /* the list may have been cut */
    }
    freeReplyObject(rep[0]);
    freeReplyObject(rep[1]);
    return listed;
}

/* One page of one stream's index. Returns 0, or -1 when Redis went away. */
static int sweep_stream(dg_taker *t, int s, dg_take_report *out) {
    const char *stream = t->keys->streams[s];
    char k_taken[DG_KEY_MAX];
    dg_key_taken(k_taken, stream);
    char *cursor = t->sweep_cursor[s];
    redisReply *page = dg_redis_cmdv(t->redis, "HSCAN", k_taken, cursor[0] ? cursor : "0", "COUNT", "64", NULL);
    if (!page) return -1;
    if (page->type != REDIS_REPLY_ARRAY || page->elements != 2 || page->element[1]->type != REDIS_REPLY_ARRAY) {
        if (page->type == REDIS_REPLY_ERROR) log_error("HSCAN %s: %s", k_taken, page->str);
        freeReplyObject(page);
        return 0;
    }
    snprintf(cursor, sizeof t->sweep_cursor[0], "%s", page->element[0]->str);
    const redisReply *kv = page->element[1];
    const int n = (int)(kv->elements / 2);
    enum { PER = 4 };   /* XPENDING, XRANGE, EXISTS result, HMGET worker attempt ttl_s */
    dg_cmd **cmds = calloc((size_t)n * PER + 1, sizeof *cmds);
    redisReply **rep = calloc((size_t)n * PER + 1, sizeof *rep);
    if (!cmds || !rep) abort();
    int m = 0;
    /* each field's value: "<job id> <worker id>" (the job id alone from the first version) */
    char (*ids)[DG_JOB_ID_MAX + 1] = calloc((size_t)n + 1, sizeof *ids);
    const char **takers = calloc((size_t)n + 1, sizeof *takers);
    if (!ids || !takers) abort();
    for (int i = 0; i < n; i++) {
        const char *v = kv->element[2 * i + 1]->str, *sp = strchr(v, ' ');
        const size_t len = sp ? (size_t)(sp - v) : strlen(v);
        snprintf(ids[i], sizeof ids[i], "%.*s", (int)(len < DG_JOB_ID_MAX ? len : DG_JOB_ID_MAX), v);
        takers[i] = sp ? sp + 1 : "";
    }
    for (int i = 0; i < n; i++) {
        const char *entry = kv->element[2 * i]->str, *id = ids[i];
        char k_result[DG_KEY_MAX], k_job[DG_KEY_MAX];
        dg_key_result(k_result, t->cfg->prefix, id);
        dg_key_job(k_job, t->cfg->prefix, id);
        cmds[m++] = dg_cmd_of("XPENDING", stream, t->cfg->group, entry, entry, "1", NULL);
        cmds[m++] = dg_cmd_of("XRANGE", stream, entry, entry, NULL);
        cmds[m++] = dg_cmd_of("EXISTS", k_result, NULL);
        cmds[m++] = dg_cmd_of("HMGET", k_job, "worker", "attempt", "ttl_s", NULL);
    }
    int rc = m ? dg_redis_pipeline(t->redis, cmds, m, rep) : 0;
    const int replied = m && !rc;
    const int64_t now = dg_mono_ms(), beats = 3 * (int64_t)t->cfg->heartbeat_ms + 1000,
                  grace = beats > t->cfg->claim_idle_ms ? beats : t->cfg->claim_idle_ms;
    for (int i = 0; !rc && i < n; i++) {
        redisReply **r = rep + i * PER;
        const char *entry = kv->element[2 * i]->str, *id = ids[i];
        const int pending = r[0]->type == REDIS_REPLY_ARRAY && r[0]->elements == 1;
        const int in_stream = r[1]->type == REDIS_REPLY_ARRAY && r[1]->elements == 1;
        const int has_result = dg_reply_int(r[2], 0) == 1;
        if (pending || dg_runs_find(t->held, stream, entry) ||
            r[0]->type == REDIS_REPLY_ERROR || r[1]->type == REDIS_REPLY_ERROR) {   /* held, or will be reaped */
            lost_seen_forget(t, stream, entry);
            continue;
        }
        if (in_stream || has_result) {   /* acknowledged (or its group made again), or answered */
            redisReply *d = dg_redis_cmdv(t->redis, "HDEL", k_taken, entry, NULL);
            if (!d) { rc = -1; break; }
            freeReplyObject(d);
            lost_seen_forget(t, stream, entry);
            continue;
        }
        /* gone from the stream and the pending list, no result: a live run of the job, here
         * or with the worker that took this entry or the one its job hash names? */
        /* the job hash's fields (look()), each nil where it expired */
        const redisReply *f = r[3];
        const int have = f->type == REDIS_REPLY_ARRAY && f->elements == 3;
        const char *who = have && f->element[0]->type == REDIS_REPLY_STRING ? f->element[0]->str : "";
        int live = runs_have_job(t->held, id);
        if (!live && takers[i][0] && strcmp(takers[i], t->cfg->worker_id)) live = listed_by(t, takers[i], id);
        if (!live && who[0] && strcmp(who, t->cfg->worker_id) && strcmp(who, takers[i])) live = listed_by(t, who, id);
        if (live < 0) { rc = -1; break; }
        if (live) {
            lost_seen_forget(t, stream, entry);
            continue;
        }
        const int k = lost_seen_find(t, stream, entry);
        if (k < 0) {   /* seen lost once: again after the grace, if still so */
            if (t->n_lost_seen < (int)(sizeof t->lost_seen / sizeof t->lost_seen[0])) {
                struct dg_lost_seen *l = &t->lost_seen[t->n_lost_seen++];
                snprintf(l->stream, sizeof l->stream, "%s", stream);
                snprintf(l->entry, sizeof l->entry, "%s", entry);
                l->since_ms = now;
            }
            continue;
        }
        if (now - t->lost_seen[k].since_ms < grace) continue;
        lost_seen_forget(t, stream, entry);
        if (!dg_job_id_valid(id, strlen(id))) continue;
        fail_lost(t, stream, entry, id, have && f->element[1]->type == REDIS_REPLY_STRING ? atoi(f->element[1]->str) : 0,
                  have && f->element[2]->type == REDIS_REPLY_STRING ? atoi(f->element[2]->str) : 0);
    }
    if (replied)
        for (int i = 0; i < m; i++) freeReplyObject(rep[i]);
    for (int i = 0; i < m; i++) dg_cmd_free(cmds[i]);
    free(cmds);
    free(rep);
    free(ids);
    free(takers);
    freeReplyObject(page);
    return rc;
}

/* Both streams' indexes, a page each, every three heartbeats at most. */
static int sweep(dg_taker *t, dg_take_report *out) {
    const int64_t now = dg_mono_ms();
    if (now < t->next_sweep_ms) return 0;
    t->next_sweep_ms = now + 3 * (int64_t)t->cfg->heartbeat_ms;
    for (int s = 0; s < 2; s++)
        if (sweep_stream(t, s, out)) return -1;
    return 0;
}

/* What becomes of a job that has no result yet, in this order of precedence. */
typedef enum { RUN, REFUSED, EXHAUSTED, CANCELLED, EXPIRED } verdict;

static verdict judge(const dg_run *r, dg_job_status parsed, const seen *s, int64_t now_ms) {
    if (parsed != DG_JOB_OK) return REFUSED;
    if (r->deliveries > r->max_attempts) return EXHAUSTED;   /* unparsed: parse() */
    if (s->cancelled) return CANCELLED;
    if (r->job.pb->deadline_unix_ms && r->job.pb->deadline_unix_ms <= now_ms) return EXPIRED;
    return RUN;
}

/* Takes one stream entry: decides whether it runs, and submits it. deliveries counts this
 * delivery. Returns -1 when Redis went away (the entry stays pending). */
static int take(dg_taker *t, const char *stream, const redisReply *entry, int deliveries, dg_take_report *out) {
    const char *entry_id = entry->element[0]->str;
    const redisReply *fields = entry->elements > 1 ? entry->element[1] : NULL;
    char err[1024] = "";   /* a path that fails without a message reports none, not stack bytes */
    seen s;

    const dg_run *h = dg_runs_find(t->held, stream, entry_id);
    if (h) {   /* already ours and running; or fenced and ending: taken when it has ended */
        if (h->lease_lost) {
            t->retake = 1;
        } else if (deliveries > h->deliveries) {
            /* our own reaper took our own live entry (the keeper late): its increment undone
             * (only its own: deliveries others made meanwhile still count) */
            char was[16];
            snprintf(was, sizeof was, "%d", deliveries - 1);
            redisReply *rep = dg_redis_cmdv(t->redis, "XCLAIM", stream, t->cfg->group, t->cfg->worker_id, "0",
                                            entry_id, "RETRYCOUNT", was, "JUSTID", NULL);
            if (!rep) return -1;
            freeReplyObject(rep);
        }
        return 0;
    }
    released_forget(t, released_find(t, stream, entry_id));   /* delivered again: this is the attempt */
    if (!fields || fields->type != REDIS_REPLY_ARRAY) {
        /* deleted while pending (Redis 6; 7 drops it from the pending list silently): out of
         * the pending list; its job, where an attempt took it, is failed by the sweep of the
         * taken index, whose field this XACK leaves */
        log_warn("entry %s of \"%s\" was deleted while pending", entry_id, stream);
        out->lost++;
        return dg_commit_xack(t->commit, stream, entry_id);
    }
    dg_run *r = dg_run_new(t->cfg, stream, entry_id);
    r->deliveries = deliveries;
    dg_job_status st = parse(t, r, fields, err, sizeof err);
    dg_runs_add(t->held, r);
    if (look(t, r, &s, st == DG_JOB_OK)) {
        dg_runs_drop(t->held, r);
        return -1;
    }
    if (s.has_result) {
        /* delivered again after its result was written (the ack was lost, or the producer sent
         * the same id twice): give the job hash back the result's state, acknowledge only */
        int rc = dg_commit_skip(t->commit, r);
        if (!rc) log_info("job \"%s\" (entry %s) already has a result: acknowledged without running", r->id, entry_id);
        dg_runs_drop(t->held, r);
        if (rc) return -1;
        out->skipped++;
        return 0;
    }
    switch (judge(r, st, &s, dg_now_ms())) {
    case REFUSED:
        r->dead = 1;
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED, st, "%s", err);
        log_warn("job \"%s\" (entry %s) refused: %s", r->id, entry_id, err);
        return 0;
    case EXHAUSTED:
        r->dead = 1;
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED, DUOGEN__V1__ERROR__CODE__EXHAUSTED, "%s", s.why);
        log_warn("job \"%s\" (entry %s) delivered %d times (max_attempts %d): %s", r->id, entry_id,
                 deliveries, r->max_attempts, s.why);
        return 0;
    case CANCELLED: dg_run_end(r, DUOGEN__V1__RESULT__STATUS__CANCELLED, 0, "cancelled"); return 0;
    case EXPIRED:   dg_run_end(r, DUOGEN__V1__RESULT__STATUS__EXPIRED, 0, "deadline"); return 0;
    case RUN:       break;
    }
    st = dg_job_prepare(&r->job, t->redis, t->cfg, err, sizeof err);
    if (st == DG_JOB_RETRY) {
        dg_runs_drop(t->held, r);
        return -1;
    }
    if (st == DG_JOB_WORKER) {   /* this worker cannot read its images now: a later attempt may */
        note_retry(t, r, err);
        released_add(t, stream, entry_id, deliveries);
        dg_runs_drop(t->held, r);
        /* and takes no job for a while (250 ms doubling to 16 s, then 30 s) */
        const int64_t wait = t->input_failures >= 7 ? 30000 : (int64_t)250 << t->input_failures;
        t->input_failures++;
        t->input_retry_ms = dg_mono_ms() + wait;
        log_error("this worker cannot read a job's input images (%s): no job is taken for %lld ms", err,
                  (long long)wait);
        return 0;
    }
    if (st != DG_JOB_OK) {
        r->dead = 1;
        dg_run_end(r, DUOGEN__V1__RESULT__STATUS__FAILED, st, "%s", err);
        log_warn("job \"%s\" (entry %s): %s", r->id, entry_id, err);
        return 0;
    }

    t->input_failures = 0;   /* it read this job's inputs */
    dg_sink sink;
    dg_run_sink(r, &sink);
    dg_run_started(r);
    int rc = dg_sched_submit(t->sched, &r->job.req, &sink, &r->seq, err, sizeof err);
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
        note_retry(t, r, err);
        released_add(t, stream, entry_id, deliveries);
        break;
    case DG_ERROR_FATAL: {
        log_error("job \"%s\": engine failure: %s", r->id, err);
        char why[1100];
        snprintf(why, sizeof why, "worker \"%s\": engine failure: %s", t->cfg->worker_id, err);
        note_retry(t, r, why);   /* what the attempt that gives up will say */
        out->engine_failed = 1;
        snprintf(out->engine_error, sizeof out->engine_error, "%s", err);   /* the worker's other runs too */
        break;
    }
    }
    dg_runs_drop(t->held, r);
    return 0;
}

/* ---- entries of a command ----------------------------------------------------------------------- */

/* Delivery counts of entries, from XPENDING <stream> <group> <id> <id> 1. */
static int delivery_counts(dg_taker *t, const char *stream, const redisReply *entries, int *counts) {
    int n = (int)entries->elements;
    if (!n) return 0;
    dg_cmd **cmds = calloc((size_t)n, sizeof *cmds);
    redisReply **rep = calloc((size_t)n, sizeof *rep);
    if (!cmds || !rep) abort();
    for (int i = 0; i < n; i++) {
        const char *id = entries->element[i]->element[0]->str;
        cmds[i] = dg_cmd_of("XPENDING", stream, t->cfg->group, id, id, "1", NULL);
    }
    int rc = dg_redis_pipeline(t->redis, cmds, n, rep);
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

static int take_entries(dg_taker *t, const char *stream, const redisReply *entries, int first_delivery,
                        dg_take_report *out) {
    if (!entries || entries->type != REDIS_REPLY_ARRAY || !entries->elements) return 0;
    int *counts = calloc(entries->elements, sizeof *counts);
    if (!counts) abort();
    int rc = 0;
    if (first_delivery) for (size_t i = 0; i < entries->elements; i++) counts[i] = 1;
    else rc = delivery_counts(t, stream, entries, counts);
    for (size_t i = 0; !rc && i < entries->elements; i++) {
        const redisReply *e = entries->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 1 || e->element[0]->type != REDIS_REPLY_STRING) continue;
        rc = take(t, stream, e, counts[i], out);
    }
    free(counts);
    return rc;
}

/* ---- the steps ---------------------------------------------------------------------------------- */

/* XGROUP CREATE ... 0 MKSTREAM on the step's streams; BUSYGROUP means it exists.
 * At 0, not `$`: producers may enqueue before the first worker ever starts, and `$` would
 * skip those jobs for good. The usual objection to 0 (a group re-created on a surviving
 * stream delivers its history again) does not bite here: acknowledged entries are trimmed
 * after jobs_retain_s, which is shorter than the result TTL, so any entry delivered again
 * still finds its result and is acknowledged without running. Returns 0, or -1 when the
 * groups were not made. */
static int ensure_groups(dg_taker *t, const dg_take_step *s, dg_take_report *out) {
    for (int i = 0; i < s->n_streams; i++) {
        redisReply *rep = dg_redis_cmdv(t->redis, "XGROUP", "CREATE", s->streams[i], t->cfg->group,
                                        "0", "MKSTREAM", NULL);
        if (!rep) return -1;
        int ok = rep->type != REDIS_REPLY_ERROR || dg_reply_is_error(rep, "BUSYGROUP");
        if (!ok) {
            /* NOPERM: the worker's ACL, fatal. Else (WRONGTYPE: a producer wrote another kind
             * of key there) it may be mended while we run: tried again after 100 ms, doubled
             * up to the reconnect's longest wait, and said the first time and every 20th */
            const int refused = dg_reply_is_error(rep, "NOPERM");
            if (refused) out->refused = 1;
            t->groups_failures++;
            int wait = DG_REDIS_BACKOFF_MAX_MS;
            if (t->groups_failures < 16 && (100 << (t->groups_failures - 1)) < wait) wait = 100 << (t->groups_failures - 1);
            t->groups_retry_ms = dg_mono_ms() + wait;
            if (refused || t->groups_failures == 1 || t->groups_failures % 20 == 0)
                log_error("cannot create consumer group \"%s\" on \"%s\" (attempt %d; again in %d ms): %s",
                          t->cfg->group, s->streams[i], t->groups_failures, wait, rep->str);
        }
        freeReplyObject(rep);
        if (!ok) return -1;
    }
    if (t->groups_failures)
        log_info("consumer group \"%s\" made after %d attempts", t->cfg->group, t->groups_failures + 1);
    t->groups_failures = 0;
    t->groups_ok = 1;
    t->own_pending = 1;
    return 0;
}

/* Sends an XCLAIM of our own entries and takes what it returns; first: their delivery is
 * the first (a parked entry's). */
static int claim_own(dg_taker *t, const char *stream, dg_cmd *claim, int first, int *taken, dg_take_report *out) {
    redisReply *got = dg_redis_cmd(t->redis, claim);
    if (!got) return -1;
    if (got->elements) log_info("re-taking %zu of our own pending entries of \"%s\"", got->elements, stream);
    int rc = take_entries(t, stream, got, first, out);
    *taken += (int)got->elements;
    freeReplyObject(got);
    return rc ? -1 : 0;
}

/* XCLAIM of one of our own entries, with min-idle-time the idle XPENDING gave; its delivery
 * count set to `retrycount` when >= 0, else counted as a new delivery. */
static dg_cmd *claim_own_cmd(const dg_taker *t, const char *stream, const char *id, long long idle,
                             long long retrycount) {
    dg_cmd *c = dg_cmd_of("XCLAIM", stream, t->cfg->group, t->cfg->worker_id, NULL);
    dg_cmd_addf(c, "%lld", idle);
    dg_cmd_adds(c, id);
    if (retrycount >= 0) {
        dg_cmd_adds(c, "RETRYCOUNT");
        dg_cmd_addf(c, "%lld", retrycount);
    }
    return c;
}

/* An error reply to a command on a job stream: NOGROUP (the group was deleted) and WRONGTYPE
 * (the key was replaced by another kind: a producer's LPUSH) send the taker back to making
 * the groups, which backs off while it is refused; NOPERM is the worker's ACL (fatal). */
static void stream_error(dg_taker *t, const redisReply *rep, dg_take_report *out) {
    if (dg_reply_is_error(rep, "NOGROUP") || dg_reply_is_error(rep, "WRONGTYPE")) t->groups_ok = 0;
    else if (dg_reply_is_error(rep, "NOPERM")) out->refused = 1;
}

/* Our own pending entries of a stream (left by an earlier life of this consumer, read before
 * a connection broke, given back, or parked by the idle wait), up to count, claimed again,
 * each with the idle time XPENDING just gave as its min-idle-time (a reaper that took it in
 * between keeps it). Their delivery counts when it may have run: an entry delivered before
 * this process started (its idle time is longer than our life), or one given back by a run
 * of this life (after its back-off; dg_taker.released) and not claimed since. Any other
 * never ran (its read's or claim's reply was lost, or Redis went away before it started):
 * it is claimed with RETRYCOUNT its count as it is, so that a lost reply does not use up
 * max_attempts; the parked entry (its count set to 0 when parked) with RETRYCOUNT 1. Sets
 * *more when more of them may wait. */
static int drain_own(dg_taker *t, const char *stream, int count, int *taken, int *more, dg_take_report *out) {
    int parking_stream = t->parked[0] && !strcmp(stream, t->keys->streams[1]);
    int64_t now = dg_mono_ms(), life = now - t->life_start_ms;
    char want_s[16];
    /* one more than we can take, or skip: tells whether more wait */
    int want = count + t->held->n + t->n_released + 1;
    snprintf(want_s, sizeof want_s, "%d", want);
    redisReply *pend = dg_redis_cmdv(t->redis, "XPENDING", stream, t->cfg->group, "-", "+", want_s,
                                     t->cfg->worker_id, NULL);
    if (!pend) return -1;
    if (pend->type != REDIS_REPLY_ARRAY) {
        if (pend->type == REDIS_REPLY_ERROR) {
            log_error("XPENDING on \"%s\": %s", stream, pend->str);
            stream_error(t, pend, out);
        }
        freeReplyObject(pend);
        return 0;
    }
    int whole = (int)pend->elements < want;   /* the whole list */
    dg_cmd **claims = calloc((size_t)count, sizeof *claims);
    if (!claims) abort();
    int n = 0, parked_listed = 0;
    long long parked_idle = 0;
    size_t at = 0;
    for (; at < pend->elements && n + parked_listed < count; at++) {   /* the parked entry takes a slot too */
        const redisReply *row = pend->element[at];
        if (row->type != REDIS_REPLY_ARRAY || row->elements < 4 || row->element[0]->type != REDIS_REPLY_STRING ||
            row->element[2]->type != REDIS_REPLY_INTEGER || row->element[3]->type != REDIS_REPLY_INTEGER)
            continue;
        const char *id = row->element[0]->str;
        const long long idle = row->element[2]->integer, deliveries = row->element[3]->integer;
        const dg_run *h = dg_runs_find(t->held, stream, id);
        if (h) {
            if (h->lease_lost) *more = 1;   /* back to us while a fenced run ends: after it */
            continue;
        }
        int k = released_find(t, stream, id);
        if (k >= 0 && t->released[k].until_ms > now) continue;   /* backing off */
        if (parking_stream && !strcmp(id, t->parked)) {
            parked_listed = 1;
            parked_idle = idle;
            continue;
        }
        /* delivered in this life and not given back: never run, not counted again; given back,
         * and counted past its run's count since: a claim (a reaper's) took it again and its
         * reply was lost, and that claim counted the delivery that comes now */
        const int uncounted = k < 0 ? idle < life : deliveries > t->released[k].deliveries;
        claims[n++] = claim_own_cmd(t, stream, id, idle, uncounted ? deliveries : -1);
    }
    if (!whole || at < pend->elements) *more = 1;
    const size_t n_rows = pend->elements;
    /* a given-back entry gone from our whole list was taken over elsewhere */
    for (int k = t->n_released - 1; whole && k >= 0; k--) {
        if (strcmp(t->released[k].stream, stream)) continue;
        size_t i = 0;
        while (i < pend->elements && strcmp(pend->element[i]->element[0]->str, t->released[k].entry)) i++;
        if (i == pend->elements) released_forget(t, k);
    }
    freeReplyObject(pend);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (!rc) rc = claim_own(t, stream, claims[i], 0, taken, out);
        dg_cmd_free(claims[i]);
    }
    free(claims);
    if (rc || !parking_stream) return rc;
    if (parked_listed) {
        dg_cmd *c = claim_own_cmd(t, stream, t->parked, parked_idle, 1);
        rc = claim_own(t, stream, c, 1, taken, out);
        dg_cmd_free(c);
    }
    /* taken now, or missing from the whole list (every row looked at): another worker took
     * it over */
    if (!rc && (parked_listed || (whole && at == n_rows))) t->parked[0] = 0;
    return rc;
}

/* Given-back entries of a stream whose back-off and a takeover period have passed, looked up
 * (64 at most a call): one no longer in our list was taken elsewhere, and is forgotten (it
 * would otherwise stay until our whole own list is looked at, which a busy worker seldom
 * does). Returns 0, or -1 when Redis went away. */
static int released_check(dg_taker *t, const char *stream) {
    const int64_t now = dg_mono_ms();
    int idx[64], n = 0;
    for (int k = 0; k < t->n_released && n < 64; k++)
        if (!strcmp(t->released[k].stream, stream) && t->released[k].until_ms + t->cfg->claim_idle_ms < now) idx[n++] = k;
    if (!n) return 0;
    dg_cmd *cmds[64];
    redisReply *rep[64];
    for (int i = 0; i < n; i++) {
        const char *id = t->released[idx[i]].entry;
        cmds[i] = dg_cmd_of("XPENDING", stream, t->cfg->group, id, id, "1", NULL);
    }
    int rc = dg_redis_pipeline(t->redis, cmds, n, rep);
    for (int i = n - 1; i >= 0; i--) {   /* from the last: forgetting moves the list's tail */
        if (!rc) {
            const redisReply *p = rep[i];
            int ours = p->type == REDIS_REPLY_ARRAY && p->elements == 1 && p->element[0]->elements == 4 &&
                       !strcmp(p->element[0]->element[1]->str, t->cfg->worker_id);
            if (p->type == REDIS_REPLY_ARRAY && !ours) released_forget(t, idx[i]);
            freeReplyObject(rep[i]);
        }
        dg_cmd_free(cmds[i]);
    }
    return rc;
}

/* Our entries given back whose time has come (released_add), claimed by id: a scan of a
 * pending list longer than ten times the room (XAUTOCLAIM looks at COUNT x 10 entries a
 * call) may not reach them for several turns. One another worker has taken since is not
 * idle, so not claimed (and stays in the list until released_check finds it gone). At
 * most count; *more set when count were claimed (the room filled), not merely due: a due
 * entry that cannot be claimed would keep the reaper due, a spin. */
static int reclaim_released(dg_taker *t, const char *stream, int count, int *taken, int *more, dg_take_report *out) {
    const int64_t now = dg_mono_ms();
    dg_cmd *c = NULL;
    int n = 0;
    for (int i = 0; i < t->n_released && n < count; i++) {
        if (t->released[i].until_ms > now || strcmp(t->released[i].stream, stream)) continue;
        if (!c) {
            c = dg_cmd_of("XCLAIM", stream, t->cfg->group, t->cfg->worker_id, NULL);
            dg_cmd_addf(c, "%d", t->cfg->claim_idle_ms);
        }
        dg_cmd_adds(c, t->released[i].entry);
        n++;
    }
    if (!c) return 0;
    redisReply *rep = dg_redis_cmd(t->redis, c);
    dg_cmd_free(c);
    if (!rep) return -1;
    int rc = 0;
    if (rep->type == REDIS_REPLY_ARRAY) {
        if (rep->elements) log_info("took back %zu entries of \"%s\" given back for a later attempt", rep->elements, stream);
        *more = (int)rep->elements >= count;
        rc = take_entries(t, stream, rep, 0, out);
        *taken += (int)rep->elements;
    } else if (rep->type == REDIS_REPLY_ERROR) {
        log_error("XCLAIM on \"%s\": %s", stream, rep->str);
        stream_error(t, rep, out);
    }
    freeReplyObject(rep);
    return rc ? -1 : 0;
}

/* XAUTOCLAIM on a stream: up to count entries idle past claim_idle_ms, whose worker died or
 * lost them. Redis looks at COUNT x 10 pending entries a call: each call goes on from where
 * the last one stopped (the cursor it returned), or an abandoned entry behind that many
 * running ones would never be reached. */
static int reap(dg_taker *t, const char *stream, int count, int *taken, dg_take_report *out) {
    char idle[16], count_s[16];
    char *cursor = t->reap_cursor[strcmp(stream, t->keys->streams[0]) != 0];
    int got = *taken, more = 0;
    if (reclaim_released(t, stream, count, taken, &more, out) < 0) return -1;
    t->reap_more |= more;
    if ((count -= *taken - got) <= 0) return released_check(t, stream) || sweep(t, out) ? -1 : 0;
    snprintf(idle, sizeof idle, "%d", t->cfg->claim_idle_ms);
    snprintf(count_s, sizeof count_s, "%d", count);
    redisReply *rep = dg_redis_cmdv(t->redis, "XAUTOCLAIM", stream, t->cfg->group, t->cfg->worker_id,
                                    idle, cursor[0] ? cursor : "0-0", "COUNT", count_s, NULL);
    if (!rep) return -1;
    int rc = 0;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements >= 2 && rep->element[0]->type == REDIS_REPLY_STRING)
        snprintf(cursor, sizeof t->reap_cursor[0], "%s", rep->element[0]->str);   /* "0-0": round again */
    /* the room filled: more may be idle, looked at in the next plan rather than reaper_ms
     * later (a cursor short of the end alone says nothing: XAUTOCLAIM also stops after
     * COUNT x 10 entries looked at, and a busy fleet's list is always longer) */
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements >= 2 && rep->element[1]->type == REDIS_REPLY_ARRAY &&
        (int)rep->element[1]->elements >= count)
        t->reap_more = 1;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements >= 2) {
        const redisReply *entries = rep->element[1];
        if (entries->elements) log_info("took over %zu abandoned entries of \"%s\"", entries->elements, stream);
        /* deleted while pending: Redis took them out of the PEL; the jobs an attempt took get
         * their results from the sweep of the taken index */
        if (rep->elements >= 3 && rep->element[2]->elements) {
            log_warn("%zu pending entries of \"%s\" were deleted from the stream", rep->element[2]->elements, stream);
            out->lost += (int64_t)rep->element[2]->elements;
        }
        rc = take_entries(t, stream, entries, 0, out);
        *taken += (int)entries->elements;
    } else if (rep->type == REDIS_REPLY_ERROR) {
        log_error("XAUTOCLAIM on \"%s\": %s", stream, rep->str);
        stream_error(t, rep, out);
        if (!t->groups_ok) cursor[0] = 0;
    }
    freeReplyObject(rep);
    if (!rc) rc = released_check(t, stream);
    if (!rc) rc = sweep(t, out);
    return rc ? -1 : 0;
}

/* The idle wait's normal entry, beside a high one: it stays pending in our list, not run,
 * and an OWN step of the normal stream takes it once no high job waits. Its delivery count
 * is set back to 0 at once: whoever runs it first (our OWN step, another worker's reaper
 * after claim_idle_ms, the next life of this consumer after a stop) counts delivery 1.
 * Returns 0, or -1 when Redis went away (the entry is parked; its count stays 1). */
static int park(dg_taker *t, const char *stream, const redisReply *entries) {
    const redisReply *e = entries->element[0];
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 1 || e->element[0]->type != REDIS_REPLY_STRING) return 0;
    snprintf(t->parked, sizeof t->parked, "%s", e->element[0]->str);
    log_info("entry %s of \"%s\" came with a high-priority job: left pending until no high job waits",
             t->parked, stream);
    redisReply *rep = dg_redis_cmdv(t->redis, "XCLAIM", stream, t->cfg->group, t->cfg->worker_id, "0", t->parked,
                                    "RETRYCOUNT", "0", "JUSTID", NULL);
    if (!rep) return -1;
    if (rep->type == REDIS_REPLY_ERROR) log_error("XCLAIM of parked entry %s: %s", t->parked, rep->str);
    freeReplyObject(rep);
    return 0;
}

/* Takes what an XREADGROUP of new entries returned: a read of one stream, all of it (its
 * COUNT was the room); the idle wait, its high entry, and its normal entry unless
 * dg_take_park_normal() says to park it. */
static int take_read(dg_taker *t, const dg_take_step *s, const redisReply *rep, int *taken, dg_take_report *out) {
    if (rep->type == REDIS_REPLY_ERROR) {
        log_error("XREADGROUP: %s", rep->str);
        stream_error(t, rep, out);
        return 0;
    }
    if (rep->type != REDIS_REPLY_ARRAY) return 0;
    const redisReply *got[2] = {NULL, NULL};   /* the entries of s->streams[0], [1] */
    for (size_t i = 0; i < rep->elements; i++)
        for (int k = 0; k < s->n_streams; k++)
            if (!strcmp(rep->element[i]->element[0]->str, s->streams[k])) got[k] = rep->element[i]->element[1];
    int rc = 0;
    for (int k = 0; k < s->n_streams && !rc; k++) {
        if (!got[k] || !got[k]->elements) continue;
        if (k == 1 && dg_take_park_normal(s, got[0] ? (int)got[0]->elements : 0)) {
            rc = park(t, s->streams[1], got[1]);
            continue;
        }
        rc = take_entries(t, s->streams[k], got[k], 1, out);
        *taken += (int)got[k]->elements;
    }
    return rc;
}

dg_cmd *dg_take_read_cmd(const dg_taker *t, const dg_take_step *s) {
    dg_cmd *c = dg_cmd_of("XREADGROUP", "GROUP", t->cfg->group, t->cfg->worker_id, "COUNT", NULL);
    dg_cmd_addf(c, "%d", s->count);
    if (s->block_ms) {
        dg_cmd_adds(c, "BLOCK");
        dg_cmd_addf(c, "%d", s->block_ms);
    }
    dg_cmd_adds(c, "STREAMS");
    for (int i = 0; i < s->n_streams; i++) dg_cmd_adds(c, s->streams[i]);
    for (int i = 0; i < s->n_streams; i++) dg_cmd_adds(c, ">");
    return c;
}

/* New entries: the step's XREADGROUP, or its reply when it came along another round trip. */
static int read_new(dg_taker *t, const dg_take_step *s, const redisReply *read, int *taken, dg_take_report *out) {
    if (read) return take_read(t, s, read, taken, out);
    dg_cmd *c = dg_take_read_cmd(t, s);
    redisReply *rep = dg_redis_cmd(t->redis, c);
    dg_cmd_free(c);
    if (!rep) return -1;
    int rc = take_read(t, s, rep, taken, out);
    freeReplyObject(rep);
    return rc;
}

int dg_take_run(dg_taker *t, const dg_take_plan *p, const redisReply *read, dg_take_report *out) {
    int taken = 0, more = 0, rc = 0;   /* rc 1: the plan ends here, no error */
    t->retake = 0;
    int own_steps = 0, own_ran = 0, reap_steps = 0, reap_ran = 0;
    t->reap_more = 0;
    for (int i = 0; i < p->n_steps; i++) {
        own_steps += p->steps[i].source == DG_TAKE_OWN;
        reap_steps += p->steps[i].source == DG_TAKE_REAP;
    }
    for (int i = 0; i < p->n_steps && !rc; i++) {
        dg_take_step s = p->steps[i];
        if (s.source != DG_TAKE_GROUPS && (s.count = dg_take_step_count(&p->steps[i], taken)) <= 0) break;
        switch (s.source) {
        case DG_TAKE_GROUPS:
            rc = ensure_groups(t, &s, out) ? 1 : 0;
            break;
        case DG_TAKE_OWN:
            own_ran++;
            rc = drain_own(t, s.streams[0], s.count, &taken, &more, out);
            break;
        case DG_TAKE_REAP:
            rc = reap(t, s.streams[0], s.count, &taken, out);
            /* A step that filled the room goes on at the next plan, not reaper_ms later
             * (one entry a reaper_ms was all a worker of max_inflight 1 took back), and an
             * entry given back is due at its claim_idle_ms (reaper_next): passing failures
             * waited minutes to run again */
            if (++reap_ran == reap_steps)
                t->next_reaper_ms = t->reap_more ? dg_mono_ms() : reaper_next(t, dg_mono_ms() + t->cfg->reaper_ms);
            break;
        case DG_TAKE_READ:
            if (s.block_ms) {
                /* the idle wait ends when the reaper is due, or it pushes the reaper back
                 * by block_ms; a reaper due now (an entry given back due, or a REAP step
                 * that filled the room with entries given up at once) has it skipped */
                const int64_t until_reaper = t->next_reaper_ms - dg_mono_ms();
                if (until_reaper <= 0) break;
                if (until_reaper < s.block_ms) s.block_ms = (int)until_reaper;
            }
            rc = read_new(t, &s, i == 0 ? read : NULL, &taken, out);
            break;
        }
    }
    /* an OWN step that did not run (the high stream filled the room) leaves the normal
     * stream's own entries to the next plan, as a REAP step that did not run leaves the
     * reaper due */
    if (own_steps && !rc) t->own_pending = more || own_ran < own_steps;
    if (t->parked[0] || t->retake) t->own_pending = 1;
    return rc < 0 ? -1 : 0;
}

void dg_take_release(dg_taker *t) {
    for (dg_run *r = t->held->first, *next; r; r = next) {
        next = r->next;
        if (!r->ended || !r->retry || r->lease_lost) continue;
        note_retry(t, r, r->error);
        released_add(t, r->stream, r->entry, r->deliveries);
        dg_runs_drop(t->held, r);
    }
}
