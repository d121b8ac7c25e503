/* The keeper thread: with its own connection, so that a long engine step never delays it,
 * it refreshes the worker's heartbeat hash, renews the leases of held entries (XCLAIM ...
 * JUSTID from our own consumer resets their idle time, so no reaper takes a live job), and
 * trims the job streams below what every consumer has acknowledged. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "notify.h"
#include "worker.h"

#define KEEPER_TIMEOUT_MS 5000   /* the keeper connection's command timeout */

/* Hands a lease the keeper found lost to the main thread, which stops its run. */
static void report_lost(dg_worker *w, const dg_lease *l) {
    pthread_mutex_lock(&w->lock);
    if (w->n_lost == w->cap_lost) {
        w->cap_lost = w->cap_lost ? w->cap_lost * 2 : 8;
        w->lost = realloc(w->lost, (size_t)w->cap_lost * sizeof *w->lost);
        if (!w->lost) abort();
    }
    w->lost[w->n_lost++] = *l;
    pthread_mutex_unlock(&w->lock);
}

static int id_less(const char *a, const char *b) {
    unsigned long long ams = 0, aseq = 0, bms = 0, bseq = 0;
    sscanf(a, "%llu-%llu", &ams, &aseq);
    sscanf(b, "%llu-%llu", &bms, &bseq);
    return ams < bms || (ams == bms && aseq < bseq);
}

/* The group's last-delivered-id on a stream, from XINFO GROUPS: 0, or -1 when not known. */
static int group_last_delivered(dg_worker *w, dg_redis *rd, const char *stream, char *out, size_t outlen) {
    redisReply *groups = dg_redis_cmdv(rd, "XINFO", "GROUPS", stream, NULL);
    int rc = -1;
    for (size_t g = 0; groups && groups->type == REDIS_REPLY_ARRAY && g < groups->elements && rc; g++) {
        const redisReply *info = groups->element[g];
        const char *name = NULL, *last = NULL;
        for (size_t k = 0; k + 1 < info->elements; k += 2) {
            if (!strcmp(info->element[k]->str, "name")) name = info->element[k + 1]->str;
            if (!strcmp(info->element[k]->str, "last-delivered-id")) last = info->element[k + 1]->str;
        }
        if (name && last && !strcmp(name, w->cfg->group)) {
            snprintf(out, outlen, "%s", last);
            rc = 0;
        }
    }
    if (groups) freeReplyObject(groups);
    return rc;
}

/* Renews the lease of each held entry that still belongs to us: XPENDING says whose it is
 * and how long it has been idle; XCLAIM with that idle time as its min-idle-time takes it
 * only if nobody claimed it in between. (With 0 there, an entry another worker's reaper
 * took in that instant was taken back, and both ran the job.) An entry in another
 * consumer's list is reported lost; so is one no longer pending that is still in the stream
 * and not past the group's last-delivered-id: another attempt acknowledged it, with its
 * result, which may have expired since. Otherwise (gone from the stream, or past that id)
 * Redis forgot our read (a restart from an older snapshot, a failover) or the entry was
 * deleted: the run goes on, and an entry delivered again comes back to it or to another
 * worker, whose claim then shows here. */
static void renew(dg_worker *w, dg_redis *rd) {
    pthread_mutex_lock(&w->lock);
    int n = w->n_leases;
    dg_lease *l = n ? malloc((size_t)n * sizeof *l) : NULL;
    if (n && !l) abort();
    if (n) memcpy(l, w->leases, (size_t)n * sizeof *l);
    pthread_mutex_unlock(&w->lock);
    if (!n) return;

    dg_cmd **cmds = calloc((size_t)n, sizeof *cmds);
    redisReply **rep = calloc((size_t)n, sizeof *rep);
    int *gone = calloc((size_t)n, sizeof *gone);   /* leases whose entry is not pending */
    if (!cmds || !rep || !gone) abort();
    for (int i = 0; i < n; i++)
        cmds[i] = dg_cmd_of("XPENDING", l[i].stream, w->cfg->group, l[i].entry, l[i].entry, "1", NULL);
    int n_gone = 0;
    if (dg_redis_pipeline(rd, cmds, n, rep) == 0) {
        int m = 0;
        for (int i = 0; i < n; i++) {
            dg_cmd_free(cmds[i]);
            cmds[i] = NULL;
        }
        for (int i = 0; i < n; i++) {
            const redisReply *p = rep[i];
            if (p->type != REDIS_REPLY_ARRAY) continue;   /* NOGROUP: the taker makes it again */
            const redisReply *e = p->elements == 1 ? p->element[0] : NULL;
            if (!e) {
                gone[n_gone++] = i;
                continue;
            }
            if (e->type != REDIS_REPLY_ARRAY || e->elements != 4 || e->element[1]->type != REDIS_REPLY_STRING ||
                e->element[2]->type != REDIS_REPLY_INTEGER)
                continue;
            if (!strcmp(e->element[1]->str, w->cfg->worker_id)) {
                cmds[m] = dg_cmd_of("XCLAIM", l[i].stream, w->cfg->group, w->cfg->worker_id, NULL);
                dg_cmd_addf(cmds[m], "%lld", e->element[2]->integer);
                dg_cmd_adds(cmds[m], l[i].entry);
                dg_cmd_adds(cmds[m++], "JUSTID");
            } else {
                log_warn("entry %s of \"%s\" now belongs to \"%s\": its lease was lost (result stays "
                         "exactly-once)", l[i].entry, l[i].stream, e->element[1]->str);
                report_lost(w, &l[i]);
            }
        }
        for (int i = 0; i < n; i++) if (rep[i]) freeReplyObject(rep[i]);
        if (m && dg_redis_pipeline(rd, cmds, m, rep) == 0)
            for (int i = 0; i < m; i++) freeReplyObject(rep[i]);
        for (int i = 0; i < m; i++) dg_cmd_free(cmds[i]);
    } else {
        for (int i = 0; i < n; i++) dg_cmd_free(cmds[i]);
    }
    /* acknowledged, or forgotten? An acknowledged entry is still in the stream (trimmed
     * only after jobs_retain_s) and not past the group's last-delivered-id; one that Redis
     * forgot (an older snapshot), or that was deleted under the run (XDEL, a producer's
     * MAXLEN), is either gone from the stream or past it: the run goes on */
    for (int g = 0; n_gone && g < n_gone; g++)
        cmds[g] = dg_cmd_of("XRANGE", l[gone[g]].stream, l[gone[g]].entry, l[gone[g]].entry, "COUNT", "1", NULL);
    int listed = n_gone && dg_redis_pipeline(rd, cmds, n_gone, rep) == 0;
    for (int g = 0; g < n_gone; g++) {
        if (listed && rep[g]->type == REDIS_REPLY_ERROR)   /* NOPERM (an ACL without XRANGE): not known */
            log_warn("cannot tell whether entry %s of \"%s\" was acknowledged by another attempt: %s",
                     l[gone[g]].entry, l[gone[g]].stream, rep[g]->str);
        if (listed && !(rep[g]->type == REDIS_REPLY_ARRAY && rep[g]->elements == 1)) gone[g] = -1;
        if (listed) freeReplyObject(rep[g]);
        dg_cmd_free(cmds[g]);
    }
    for (int s = 0; listed && s < 2; s++) {
        char last[64];
        if (group_last_delivered(w, rd, w->keys.streams[s], last, sizeof last)) continue;
        for (int g = 0; g < n_gone; g++)
            if (gone[g] >= 0 && !strcmp(l[gone[g]].stream, w->keys.streams[s]) && !id_less(last, l[gone[g]].entry))
                report_lost(w, &l[gone[g]]);
    }
    free(gone);
    free(cmds);
    free(rep);
    free(l);
}

/* XTRIM MINID ~ floor, where floor is the oldest entry some group still needs (its oldest
 * pending entry, or the first entry after its last delivered one), and no later than the
 * retention time: acknowledged entries stay jobs_retain_s for inspection. */
static void trim(dg_worker *w, dg_redis *rd) {
    for (int s = 0; s < 2; s++) {
        redisReply *groups = dg_redis_cmdv(rd, "XINFO", "GROUPS", w->keys.streams[s], NULL);
        if (!groups) return;
        char floor[64];
        snprintf(floor, sizeof floor, "%lld-0", (long long)(dg_now_ms() - (int64_t)w->cfg->jobs_retain_s * 1000));
        int ok = groups->type == REDIS_REPLY_ARRAY;
        for (size_t g = 0; ok && g < groups->elements; g++) {
            const redisReply *info = groups->element[g];
            const char *name = NULL, *last = NULL;
            for (size_t k = 0; k + 1 < info->elements; k += 2) {
                if (!strcmp(info->element[k]->str, "name")) name = info->element[k + 1]->str;
                if (!strcmp(info->element[k]->str, "last-delivered-id")) last = info->element[k + 1]->str;
            }
            if (!name || !last) { ok = 0; break; }
            /* first entry after the last delivered one */
            unsigned long long ms = 0, seq = 0;
            sscanf(last, "%llu-%llu", &ms, &seq);
            char next[64];
            snprintf(next, sizeof next, "%llu-%llu", ms, seq + 1);
            if (id_less(next, floor)) snprintf(floor, sizeof floor, "%s", next);
            redisReply *pend = dg_redis_cmdv(rd, "XPENDING", w->keys.streams[s], name, NULL);
            if (!pend) { ok = 0; break; }
            if (pend->type == REDIS_REPLY_ARRAY && pend->elements >= 2 &&
                pend->element[1]->type == REDIS_REPLY_STRING && id_less(pend->element[1]->str, floor))
                snprintf(floor, sizeof floor, "%s", pend->element[1]->str);
            freeReplyObject(pend);
        }
        freeReplyObject(groups);
        if (!ok) continue;
        redisReply *rep = dg_redis_cmdv(rd, "XTRIM", w->keys.streams[s], "MINID", "~", floor, NULL);
        if (!rep) return;
        if (rep->type == REDIS_REPLY_INTEGER && rep->integer > 0)
            log_debug("trimmed %lld acknowledged entries of \"%s\"", rep->integer, w->keys.streams[s]);
        freeReplyObject(rep);
    }
}

/* ---- one process per worker id ----------------------------------------------------------------
 * Two processes under one worker id are one consumer of the group: each takes the other's
 * pending entries for replies it lost and runs them again, uncounted, and both write one
 * heartbeat hash (found by review: cloned hosts with one hostname, which the unit's default
 * id is made of). The heartbeat hash names its process (instance: random at each start;
 * host, pid, started_ms). A worker starting finds another live process there (its hash
 * beats) and stops with exit 78 before taking a job; two that started together find each
 * other at their first beats, and the younger stops. A hash left by a process that died
 * (its beats stopped) is taken over after two heartbeats. */
typedef struct {
    int       present;               /* the hash names a process */
    char      instance[24], host[64], state[32];
    long long pid, started_ms, updated_ms;
} id_holder;

/* The process the heartbeat hash names: 0, or -1 when Redis did not answer. HGET each (the
 * worker's ACL grants HGET and HSET on its hash, not HMGET). */
static int read_holder(dg_worker *w, dg_redis *rd, id_holder *h) {
    static const char *const fields[] = {"instance", "host", "state", "pid", "started_ms", "updated_ms"};
    enum { N = sizeof fields / sizeof fields[0] };
    dg_cmd *cmds[N];
    redisReply *rep[N];
    for (int i = 0; i < N; i++) cmds[i] = dg_cmd_of("HGET", w->keys.worker, fields[i], NULL);
    int rc = dg_redis_pipeline(rd, cmds, N, rep);
    for (int i = 0; i < N; i++) dg_cmd_free(cmds[i]);
    if (rc) return -1;
    memset(h, 0, sizeof *h);
    const char *v[N];
    for (int i = 0; i < N; i++) v[i] = rep[i]->type == REDIS_REPLY_STRING ? rep[i]->str : "";
    h->present = v[0][0] != 0;
    snprintf(h->instance, sizeof h->instance, "%s", v[0]);
    snprintf(h->host, sizeof h->host, "%s", v[1]);
    snprintf(h->state, sizeof h->state, "%s", v[2]);
    h->pid = atoll(v[3]);
    h->started_ms = atoll(v[4]);
    h->updated_ms = atoll(v[5]);
    for (int i = 0; i < N; i++) freeReplyObject(rep[i]);
    return 0;
}

/* Another process's, and not stopped (a stopped one's last beat says "stopped"). */
static int held_by_other(const dg_worker *w, const id_holder *h) {
    return h->present && strcmp(h->instance, w->instance) && strcmp(h->state, "stopped");
}

static void say_clash(const dg_worker *w, const id_holder *h) {
    log_error("worker id \"%s\" is in use by another live process (host \"%s\", pid %lld, started at %lld ms): "
              "two workers of one id are one consumer and would run each other's jobs twice; this one "
              "stops (exit 78): give each worker its own worker_id", w->cfg->worker_id, h->host, h->pid,
              h->started_ms);
}

/* The tie-break between two live processes under one id: the later start, then the greater
 * instance, is the younger, which stops. */
static int younger_than(const dg_worker *w, long long started_ms, const id_holder *h) {
    return started_ms > h->started_ms || (started_ms == h->started_ms && strcmp(w->instance, h->instance) > 0);
}

/* The heartbeat hash's time to live: three beats, and one command of the keeper's timed out
 * between two of them (a slow trim): a live worker's hash does not lapse. */
static int heartbeat_ttl_ms(const dg_worker *w) {
    return (w->cfg->heartbeat_ms * 3 < 5000 ? 5000 : w->cfg->heartbeat_ms * 3) + KEEPER_TIMEOUT_MS;
}

/* Our claim on the id: the fields that name this process (the keeper's beats write them
 * too), with the heartbeat's time to live (a process that dies in its claim leaves nothing
 * for good). */
static int write_claim(dg_worker *w) {
    char started[24], now_ms[24], pid[16], ttl[16];
    snprintf(started, sizeof started, "%lld", (long long)w->stats.started_ms);
    snprintf(now_ms, sizeof now_ms, "%lld", (long long)dg_now_ms());
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    snprintf(ttl, sizeof ttl, "%d", heartbeat_ttl_ms(w));
    dg_cmd *cmds[2] = {dg_cmd_of("HSET", w->keys.worker, "instance", w->instance, "host", w->host, "pid", pid,
                                 "started_ms", started, "updated_ms", now_ms, "state", "starting", NULL),
                       dg_cmd_of("PEXPIRE", w->keys.worker, ttl, NULL)};
    return dg_redis_send(&w->redis, cmds, 2);
}

/* Waits ms, pinging the watchdog; 1 when a stop was asked meanwhile. */
static int id_wait(dg_worker *w, int64_t ms) {
    const int64_t until = dg_mono_ms() + ms;
    while (dg_mono_ms() < until) {
        if (*w->stop) return 1;
        dg_notify_watchdog();
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    return 0;
}

int dg_worker_id_check(dg_worker *w) {
    id_holder h, now;
    if (!dg_redis_ready(&w->redis) || read_holder(w, &w->redis, &h)) return 0;   /* the keeper's beats check */
    const int64_t beat = w->cfg->heartbeat_ms;
    if (held_by_other(w, &h)) {
        /* a live process beats every heartbeat_ms: two of them, and a little, tell */
        const int64_t until = dg_mono_ms() + 2 * beat + 250;
        int live = 0;
        while (!live && dg_mono_ms() < until) {
            if (id_wait(w, 100)) return 0;
            if (read_holder(w, &w->redis, &now)) return 0;
            if (!held_by_other(w, &now) || strcmp(now.instance, h.instance)) break;
            live = now.updated_ms != h.updated_ms;
        }
        if (live) {
            say_clash(w, &now);
            return EX_CONFIG;
        }
        if (held_by_other(w, &now) && !strcmp(now.instance, h.instance))
            log_info("worker id \"%s\": the process that last held it (host \"%s\", pid %lld) no longer beats: "
                     "taken over", w->cfg->worker_id, h.host, h.pid);
    }
    /* claimed, then looked at again a beat later: a process that started with us (cloned
     * hosts booting together) has written its own claim over ours by then, or reads ours;
     * the younger of the two stops here, before either takes a job */
    if (write_claim(w) || id_wait(w, (beat < 5000 ? beat : 5000) + 250) || read_holder(w, &w->redis, &now)) return 0;
    if (held_by_other(w, &now) && younger_than(w, (long long)w->stats.started_ms, &now)) {
        say_clash(w, &now);
        return EX_CONFIG;
    }
    if (held_by_other(w, &now)) write_claim(w);   /* the older: ours again; the other reads it at its look */
    return 0;
}

/* What the keeper's beats saw of the hash. */
typedef struct {
    int       wrote;                 /* our last beat wrote the hash */
    long long wrote_ms;              /* the updated_ms it wrote */
    id_holder other;                 /* another process's, seen at the last beat (not written over) */
} beat_seen;

/* At each beat, where the hash names another process not stopped: it is live if it wrote
 * over our last beat, or if its own beats moved on since the last one we saw (a hash left by
 * a process that died does neither: written over at the next beat). Two live ones: the
 * younger (the later start; then the greater instance) stops and writes nothing more there.
 * Returns 1 when this beat writes nothing: that is us, or we wait a beat to tell. */
static int clash_at_beat(dg_worker *w, dg_redis *rd, long long started_ms, beat_seen *bs) {
    id_holder h;
    if (read_holder(w, rd, &h) || !held_by_other(w, &h)) {
        bs->other.present = 0;
        return 0;
    }
    /* live: it wrote over our last beat, later than that beat (a hash brought back by a Redis
     * restored from an older snapshot, or a failover to a replica behind, is older), or its
     * own beats moved on since we last saw it */
    const int live = (bs->wrote && h.updated_ms >= bs->wrote_ms) ||
                     (bs->other.present && !strcmp(bs->other.instance, h.instance) && bs->other.updated_ms != h.updated_ms);
    if (!live) {
        const int first_look = !bs->other.present || strcmp(bs->other.instance, h.instance);
        bs->other = h;
        if (first_look) return 1;   /* a beat later: did it move on? */
        log_info("worker id \"%s\": the process that last held it (host \"%s\", pid %lld) no longer beats: "
                 "taken over", w->cfg->worker_id, h.host, h.pid);
        bs->other.present = 0;
        return 0;
    }
    if (younger_than(w, started_ms, &h)) {
        say_clash(w, &h);
        w->id_clash = 1;
        return 1;
    }
    log_warn("worker id \"%s\": another process (host \"%s\", pid %lld) started later under it and wrote its "
             "heartbeat: it stops", w->cfg->worker_id, h.host, h.pid);
    bs->other.present = 0;
    return 0;
}

static void heartbeat(dg_worker *w, dg_redis *rd, beat_seen *bs) {
    dg_worker_stats st;
    pthread_mutex_lock(&w->lock);
    st = w->stats;
    pthread_mutex_unlock(&w->lock);
    bs->wrote = bs->wrote && !w->id_clash;
    if (w->id_clash || clash_at_beat(w, rd, (long long)st.started_ms, bs)) {   /* not ours to write now */
        bs->wrote = 0;
        return;
    }
    dg_cmd *c = dg_cmd_of("HSET", w->keys.worker, "state", st.state, "job", st.jobs,
                          "device", w->cfg->device, "model", dg_model_describe(w->model), "instance", w->instance,
                          "host", w->host, NULL);
#define NUM(name, v) do { dg_cmd_adds(c, name); dg_cmd_addf(c, "%lld", (long long)(v)); } while (0)
    NUM("jobs_done", st.jobs_done);
    NUM("jobs_failed", st.jobs_failed);
    NUM("jobs_cancelled", st.jobs_cancelled);
    NUM("jobs_expired", st.jobs_expired);
    NUM("jobs_dead", st.jobs_dead);
    NUM("jobs_skipped", st.jobs_skipped);
    NUM("entries_lost", st.entries_lost);
    NUM("leases_lost", st.leases_lost);
    NUM("tokens", st.tokens);
    NUM("images", st.images);
    NUM("started_ms", st.started_ms);
    const long long beat_ms = (long long)dg_now_ms();
    NUM("updated_ms", beat_ms);
    NUM("pid", getpid());
    NUM("kv_cache_hits", st.cache.kv_hits);
    NUM("kv_cache_misses", st.cache.kv_misses);
    NUM("vision_cache_hits", st.cache.vision_hits);
    NUM("vision_cache_misses", st.cache.vision_misses);
    NUM("latent_cache_hits", st.cache.latent_hits);
    NUM("latent_cache_misses", st.cache.latent_misses);
    NUM("steps", st.steps);
    NUM("draft_tokens", st.draft_tokens);
    NUM("draft_kept", st.draft_kept);
    NUM("screened_tokens", st.screened);
    NUM("unscreened_tokens", st.unscreened);
    if (st.decode_s > 0) {
        dg_cmd_adds(c, "tokens_per_s");
        dg_cmd_addf(c, "%.2f", (double)st.timed_tokens / st.decode_s);
    }
#undef NUM
    char ttl[16];
    snprintf(ttl, sizeof ttl, "%d", heartbeat_ttl_ms(w));
    dg_cmd *cmds[2] = {c, dg_cmd_of("PEXPIRE", w->keys.worker, ttl, NULL)};
    redisReply *rep[2];
    bs->wrote = 0;
    if (dg_redis_pipeline(rd, cmds, 2, rep) == 0) {
        bs->wrote = rep[0]->type != REDIS_REPLY_ERROR;
        bs->wrote_ms = beat_ms;
        if (rep[0]->type == REDIS_REPLY_ERROR) log_warn("heartbeat refused: %s", rep[0]->str);
        freeReplyObject(rep[0]);
        freeReplyObject(rep[1]);
    }
    dg_cmd_free(cmds[0]);
    dg_cmd_free(cmds[1]);
}

/* The queue figures are not known (the keeper cannot reach Redis): -1, not the last ones
 * read, which would show a queue standing still through an outage. */
static void queue_unknown(dg_worker *w) {
    pthread_mutex_lock(&w->lock);
    for (int s = 0; s < 2; s++) w->stats.queue_lag[s] = w->stats.queue_pending[s] = -1;
    pthread_mutex_unlock(&w->lock);
}

/* Pending entries and lag (entries not yet delivered) of the group on each job stream, for
 * the metrics. Lag is nil in XINFO when Redis cannot tell (after deletions): -1. */
static void queue_figures(dg_worker *w, dg_redis *rd) {
    for (int s = 0; s < 2; s++) {
        redisReply *rep = dg_redis_cmdv(rd, "XINFO", "GROUPS", w->keys.streams[s], NULL);
        if (!rep) {
            queue_unknown(w);
            return;
        }
        int64_t lag = -1, pending = -1;
        for (size_t g = 0; rep->type == REDIS_REPLY_ARRAY && g < rep->elements; g++) {
            const redisReply *info = rep->element[g];
            int ours = 0;
            int64_t gl = -1, gp = -1;
            for (size_t k = 0; k + 1 < info->elements; k += 2) {
                const char *name = info->element[k]->str;
                const redisReply *v = info->element[k + 1];
                if (!strcmp(name, "name")) ours = !strcmp(v->str, w->cfg->group);
                else if (!strcmp(name, "lag") && v->type == REDIS_REPLY_INTEGER) gl = v->integer;
                else if (!strcmp(name, "pending") && v->type == REDIS_REPLY_INTEGER) gp = v->integer;
            }
            if (ours) { lag = gl; pending = gp; }
        }
        freeReplyObject(rep);
        pthread_mutex_lock(&w->lock);
        w->stats.queue_lag[s] = lag;
        w->stats.queue_pending[s] = pending;
        pthread_mutex_unlock(&w->lock);
    }
}

static void *keeper_main(void *arg) {
    dg_worker *w = arg;
    dg_redis rd;
    char err[256];
    if (dg_redis_init(&rd, w->cfg, "keeper", KEEPER_TIMEOUT_MS, err, sizeof err)) return NULL;
    snprintf(rd.client_name, sizeof rd.client_name, "%s:keeper", w->cfg->worker_id);
    int64_t next_beat = 0, next_renew = 0, next_trim = dg_mono_ms() + w->cfg->trim_ms;
    beat_seen bs = {0};
    uint64_t connects = 0;
    while (!w->keeper_stop) {
        int64_t now = dg_mono_ms();
        if (dg_redis_ready(&rd)) {
            /* a new connection renews at once: after an outage or a restart from a snapshot
             * the leases' idle times ran on, and the reapers hold off only so long
             * (dg_take_facts_now) */
            if (now >= next_renew || rd.connects != connects) {
                connects = rd.connects;
                renew(w, &rd);
                next_renew = now + w->cfg->renew_ms;
            }
            if (now >= next_beat) {
                heartbeat(w, &rd, &bs);
                if (w->cfg->metrics_port) queue_figures(w, &rd);
                next_beat = now + w->cfg->heartbeat_ms;
            }
            if (now >= next_trim) {
                trim(w, &rd);
                next_trim = now + w->cfg->trim_ms;
            }
        } else if (w->cfg->metrics_port) {
            queue_unknown(w);
        }
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    /* the last word: this worker is gone (the hash would expire anyway) */
    if (rd.c) {
        pthread_mutex_lock(&w->lock);
        snprintf(w->stats.state, sizeof w->stats.state, "stopped");
        pthread_mutex_unlock(&w->lock);
        heartbeat(w, &rd, &bs);
    }
    dg_redis_close(&rd);
    return NULL;
}

int dg_keeper_start(dg_worker *w, char *err, size_t errlen) {
    const dg_daemon_config *cfg = w->cfg;
    /* a renewal comes every renew_ms, later by a keeper command that timed out (a trim, a
     * heartbeat) and its own: below that margin a slow Redis lets running jobs be taken */
    if (cfg->claim_idle_ms < cfg->renew_ms + 2 * KEEPER_TIMEOUT_MS)
        log_warn("claim_idle_ms %d leaves less than %d ms beyond renew_ms %d for a Redis that answers slowly: "
                 "running jobs may be taken over by other workers", cfg->claim_idle_ms, 2 * KEEPER_TIMEOUT_MS,
                 cfg->renew_ms);
    w->keeper_stop = 0;
    if (pthread_create(&w->keeper, NULL, keeper_main, w)) {
        snprintf(err, errlen, "cannot start the keeper thread");
        return -1;
    }
    w->keeper_running = 1;
    return 0;
}

void dg_keeper_stop(dg_worker *w) {
    if (!w->keeper_running) return;
    w->keeper_stop = 1;
    pthread_join(w->keeper, NULL);
    w->keeper_running = 0;
}
