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

/* Renewals Redis refused (an ACL without XCLAIM given at runtime, a command renamed, a
 * job stream key of another type): the lease lapses and another worker takes the running
 * job over after claim_idle_ms. One word per round of renewals (its first refusal, or none
 * when all went through): said at the first refused round of a run and every 20th, and
 * when a round goes through again. */
static void renewal_said(dg_worker *w, const char *error, const char *stream) {
    if (!error) {
        if (w->renewals_refused) log_info("lease renewals go through again (%d rounds refused)", w->renewals_refused);
        w->renewals_refused = 0;
        return;
    }
    const int rights = !strncmp(error, "NOPERM", 6) || !strncmp(error, "ERR unknown command", 19);
    if (w->renewals_refused++ % 20 == 0)
        log_error("Redis refuses to renew the lease of a running job on \"%s\" (%s; %d rounds refused so far): "
                  "another worker takes the job over after claim_idle_ms and both run it%s", stream, error,
                  w->renewals_refused,
                  rights ? "; the worker's ACL needs XCLAIM and XPENDING (deploy/redis/users.acl.example)" : "");
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
    char refused[256] = "", refused_on[DG_KEY_MAX] = "";   /* the round's first refusal */
    if (dg_redis_pipeline(rd, cmds, n, rep) == 0) {
        int m = 0;
        for (int i = 0; i < n; i++) {
            dg_cmd_free(cmds[i]);
            cmds[i] = NULL;
        }
        for (int i = 0; i < n; i++) {
            const redisReply *p = rep[i];
            if (p->type == REDIS_REPLY_ERROR && !dg_reply_is_error(p, "NOGROUP") && !refused[0]) {
                snprintf(refused, sizeof refused, "%s", p->str);
                snprintf(refused_on, sizeof refused_on, "%s", l[i].stream);
            }
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
        const int sent = m && dg_redis_pipeline(rd, cmds, m, rep) == 0;
        for (int i = 0; sent && i < m; i++) {
            if (rep[i]->type == REDIS_REPLY_ERROR && !refused[0]) {
                snprintf(refused, sizeof refused, "%s", rep[i]->str);
                snprintf(refused_on, sizeof refused_on, "%s", cmds[i]->argv[1]);
            }
            freeReplyObject(rep[i]);
        }
        if (refused[0] || sent) renewal_said(w, refused[0] ? refused : NULL, refused_on);
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
 * id is made of). The id is a lease: the heartbeat hash's field `owner` holds the owning
 * process's instance (random at each start), set with HSETNX, and lives as long as the hash
 * (the heartbeat's time to live, renewed by each beat while the field still names us). A
 * process starting under an id another holds waits for the lease to lapse (a process that
 * died: at most the time to live, usually over already while the model loaded) and stops
 * with exit 78 if it is still renewed; of two started together, HSETNX lets one in. A keeper that finds the lease
 * another's (it lapsed in a Redis outage and a newcomer took it) stops its worker (78). A
 * clean stop lets the lease go at once. */
typedef struct {
    char      host[64];
    long long pid, started_ms;
} id_holder;

/* The heartbeat hash's word on its process, for the messages (HGET each: the worker's ACL
 * grants HGET and HSET on its hash, not HMGET). */
static void read_holder(dg_worker *w, dg_redis *rd, id_holder *h) {
    static const char *const fields[] = {"host", "pid", "started_ms"};
    enum { N = sizeof fields / sizeof fields[0] };
    dg_cmd *cmds[N];
    redisReply *rep[N];
    memset(h, 0, sizeof *h);
    for (int i = 0; i < N; i++) cmds[i] = dg_cmd_of("HGET", w->keys.worker, fields[i], NULL);
    const int rc = dg_redis_pipeline(rd, cmds, N, rep);
    for (int i = 0; i < N; i++) dg_cmd_free(cmds[i]);
    if (rc) return;
    const char *v[N];
    for (int i = 0; i < N; i++) v[i] = rep[i]->type == REDIS_REPLY_STRING ? rep[i]->str : "";
    snprintf(h->host, sizeof h->host, "%s", v[0][0] ? v[0] : "?");
    h->pid = atoll(v[1]);
    h->started_ms = atoll(v[2]);
    for (int i = 0; i < N; i++) freeReplyObject(rep[i]);
}

static void say_clash(dg_worker *w, dg_redis *rd) {
    id_holder h;
    read_holder(w, rd, &h);
    log_error("worker id \"%s\" is in use by another live process (host \"%s\", pid %lld, started at %lld ms): "
              "two workers of one id are one consumer and would run each other's jobs twice; this one "
              "stops (exit 78): give each worker its own worker_id", w->cfg->worker_id, h.host, h.pid,
              h.started_ms);
}

/* The heartbeat hash's time to live, and the id's lease's: three beats, and one command of
 * the keeper's timed out between two of them (a slow trim): a live worker's hash does not
 * lapse. */
static int heartbeat_ttl_ms(const dg_worker *w) {
    return (w->cfg->heartbeat_ms * 3 < 5000 ? 5000 : w->cfg->heartbeat_ms * 3) + KEEPER_TIMEOUT_MS;
}

/* The lease's message when Redis refused one of its commands (the ACL): said once here. */
static int lease_refused(const dg_worker *w, const redisReply *rep) {
    log_error("the worker id's lease (%s owner): %s", w->keys.worker,
              rep->type == REDIS_REPLY_ERROR ? rep->str : rep->type == REDIS_REPLY_NIL ? "transaction aborted" : "?");
    return -2;
}

/* HSETNX <heartbeat hash> owner <instance> with the hash's time to live in one transaction
 * (PEXPIRE NX: a hash made by HSETNX has none; one another process owns keeps its own, or a
 * dead owner's would never lapse while we wait; one left without any gets one). Apart, a
 * worker killed between the two left a lease that never lapsed (every restart waited, then
 * refused), and a reader between them saw a live worker's hash with no time to live.
 * Taken from a hash that kept its time to live (a clean stop deletes only the owner), NX
 * leaves that one: it is renewed then. Redis 6 has no PEXPIRE NX: there the two go one
 * after the other. 1 taken, 0 held by another, -1 Redis away, -2 refused (said). */
static int lease_take(dg_worker *w, dg_redis *rd) {
    char ttl[16];
    snprintf(ttl, sizeof ttl, "%d", heartbeat_ttl_ms(w));
    dg_cmd *cmds[4] = {dg_cmd_of("MULTI", NULL), dg_cmd_of("HSETNX", w->keys.worker, "owner", w->instance, NULL),
                       dg_cmd_of("PEXPIRE", w->keys.worker, ttl, "NX", NULL), dg_cmd_of("EXEC", NULL)};
    redisReply *rep[4];
    int rc = -1, apart = 0;
    if (dg_redis_pipeline(rd, cmds, 4, rep) == 0) {
        const redisReply *exec = rep[3];
        if (rep[0]->type == REDIS_REPLY_ERROR) rc = lease_refused(w, rep[0]);          /* MULTI */
        else if (rep[1]->type == REDIS_REPLY_ERROR) rc = lease_refused(w, rep[1]);     /* HSETNX */
        else if (rep[2]->type == REDIS_REPLY_ERROR && dg_reply_is_error(rep[2], "NOPERM")) rc = lease_refused(w, rep[2]);
        else if (rep[2]->type == REDIS_REPLY_ERROR) apart = 1;   /* Redis 6: no NX (the EXEC aborted) */
        else if (exec->type == REDIS_REPLY_ARRAY && exec->elements == 2 &&
                 exec->element[0]->type == REDIS_REPLY_INTEGER) {
            rc = (int)exec->element[0]->integer;
            /* taken from a hash left with its time to live (a clean stop deletes only the
             * owner): NX kept that shrinking one; the lease is ours, renewed now */
            if (rc == 1 && exec->element[1]->type == REDIS_REPLY_INTEGER && exec->element[1]->integer == 0) apart = 2;
        } else if (exec->type == REDIS_REPLY_ARRAY && exec->elements >= 1) {   /* refused at EXEC: its words */
            rc = lease_refused(w, exec->element[0]);
        } else rc = lease_refused(w, exec);
        for (int i = 0; i < 4; i++) freeReplyObject(rep[i]);
    }
    for (int i = 0; i < 4; i++) dg_cmd_free(cmds[i]);
    if (apart == 1) {   /* Redis 6 */
        redisReply *r = dg_redis_cmdv(rd, "HSETNX", w->keys.worker, "owner", w->instance, NULL);
        if (!r) return -1;
        rc = r->type == REDIS_REPLY_INTEGER ? (int)r->integer : lease_refused(w, r);
        freeReplyObject(r);
    }
    if (apart && rc == 1) {   /* the lease ours, its time to live set whole */
        redisReply *x = dg_redis_cmdv(rd, "PEXPIRE", w->keys.worker, ttl, NULL);
        if (!x) return -1;
        freeReplyObject(x);
    }
    return rc;
}

/* The lease taken, or found ours already (the keeper's first beat may take it while the
 * main thread waited for Redis): lease_take's answers. */
static int lease_claim(dg_worker *w, dg_redis *rd) {
    int got = lease_take(w, rd);
    if (got != 0) return got;
    redisReply *rep = dg_redis_cmdv(rd, "HGET", w->keys.worker, "owner", NULL);
    if (!rep) return -1;
    got = rep->type == REDIS_REPLY_STRING && !strcmp(rep->str, w->instance);
    freeReplyObject(rep);
    return got;
}

/* At a beat, before the hash is written (its PEXPIRE renews the lease): 1 while the lease is
 * ours (or ours again after it lapsed in an outage, or Redis restarted empty), 0 when
 * another process holds it, -1 when Redis did not answer. */
static int lease_renew(dg_worker *w, dg_redis *rd) {
    redisReply *rep = dg_redis_cmdv(rd, "HGET", w->keys.worker, "owner", NULL);
    if (!rep) return -1;
    int rc;
    if (rep->type == REDIS_REPLY_STRING) rc = !strcmp(rep->str, w->instance);
    else if (rep->type == REDIS_REPLY_NIL) rc = lease_take(w, rd) == 0 ? 0 : 1;   /* refused: said; goes on */
    else rc = -1;
    freeReplyObject(rep);
    return rc;
}

/* At a clean stop: the lease goes at once where it is still ours (a restart goes on at
 * once); the hash stays, saying "stopped", until its time to live. */
static void lease_release(dg_worker *w, dg_redis *rd) {
    redisReply *rep = dg_redis_cmdv(rd, "HGET", w->keys.worker, "owner", NULL);
    if (rep && rep->type == REDIS_REPLY_STRING && !strcmp(rep->str, w->instance)) {
        redisReply *x = dg_redis_cmdv(rd, "HDEL", w->keys.worker, "owner", NULL);
        if (x) freeReplyObject(x);
    }
    if (rep) freeReplyObject(rep);
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
    w->unchecked = 1;
    if (!dg_redis_ready(&w->redis)) return 0;   /* asked again once Redis answers */
    const int64_t until = dg_mono_ms() + heartbeat_ttl_ms(w) + 500;
    int said = 0;
    for (;;) {
        const int got = lease_claim(w, &w->redis);
        if (got == -2) return EX_CONFIG;   /* refused: the ACL */
        if (got == -1) return 0;           /* Redis away: asked again once it answers */
        if (got == 1 && said) log_info("worker id \"%s\": the lease of the process that held it lapsed: taken over",
                                       w->cfg->worker_id);
        if (got == 1) {
            w->unchecked = 0;
            return 0;
        }
        if (dg_mono_ms() >= until) {
            say_clash(w, &w->redis);
            return EX_CONFIG;
        }
        if (!said++)
            log_info("worker id \"%s\" is held by another process: waiting up to %d ms for its lease to lapse",
                     w->cfg->worker_id, heartbeat_ttl_ms(w) + 500);
        if (id_wait(w, 250)) return 0;   /* stopping: no job is taken */
    }
}

static void heartbeat(dg_worker *w, dg_redis *rd) {
    if (w->unchecked) return;   /* the main thread takes the lease first (dg_worker_id_check) */
    dg_worker_stats st;
    pthread_mutex_lock(&w->lock);
    st = w->stats;
    pthread_mutex_unlock(&w->lock);
    if (w->id_clash) return;   /* another process's hash now */
    const int lease = lease_renew(w, rd);
    if (lease == 0) {
        say_clash(w, rd);
        w->id_clash = 1;
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
    NUM("updated_ms", dg_now_ms());
    NUM("pid", getpid());
    NUM("max_inflight", w->cfg->max_inflight);   /* set before the keeper starts, read-only after */
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
    NUM("redis_evicts", st.redis_evicts);   /* 1: its Redis deletes keys when full (duogenctl stats warns) */
    if (st.decode_s > 0) {
        dg_cmd_adds(c, "tokens_per_s");
        dg_cmd_addf(c, "%.2f", (double)st.timed_tokens / st.decode_s);
    }
#undef NUM
    char ttl[16];
    snprintf(ttl, sizeof ttl, "%d", heartbeat_ttl_ms(w));
    dg_cmd *cmds[2] = {c, dg_cmd_of("PEXPIRE", w->keys.worker, ttl, NULL)};
    redisReply *rep[2];
    if (dg_redis_pipeline(rd, cmds, 2, rep) == 0) {
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
    uint64_t connects = 0;
    int64_t renewed = dg_mono_ms();   /* the last renewal sent */
    int unrenewed_said = 0;
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
                if (rd.c) {
                    if (unrenewed_said) log_info("the keeper renews the running jobs' leases again");
                    renewed = now;
                    unrenewed_said = 0;
                }
            }
            /* the first beat as soon as the main thread holds the lease (a beat skipped
             * before it put the first off by heartbeat_ms: the lease's time to live ran on) */
            if (now >= next_beat && !w->unchecked) {
                heartbeat(w, &rd);
                if (w->cfg->metrics_port) queue_figures(w, &rd);
                next_beat = now + w->cfg->heartbeat_ms;
            }
            if (now >= next_trim) {
                trim(w, &rd);
                next_trim = now + w->cfg->trim_ms;
            }
        } else {
            /* its own connection refused (maxclients reached, say) while the main one works:
             * the leases lapse and other workers take the running jobs over */
            pthread_mutex_lock(&w->lock);
            const int held = w->n_leases;
            pthread_mutex_unlock(&w->lock);
            if (held && !unrenewed_said && now - renewed > 2 * (int64_t)w->cfg->renew_ms) {
                log_warn("the keeper cannot reach Redis (%s): the leases of %d running job(s) are not renewed, and "
                         "past claim_idle_ms (%d ms) another worker may take them over", rd.error, held,
                         w->cfg->claim_idle_ms);
                unrenewed_said = 1;
            }
            if (w->cfg->metrics_port) queue_unknown(w);
        }
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    /* the last word: this worker is gone (the hash would expire anyway) */
    if (rd.c) {
        pthread_mutex_lock(&w->lock);
        snprintf(w->stats.state, sizeof w->stats.state, "stopped");
        pthread_mutex_unlock(&w->lock);
        heartbeat(w, &rd);
        if (!w->id_clash) lease_release(w, &rd);
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
