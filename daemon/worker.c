/* The worker's main loop (docs/DESIGN.md §6b). A job's path through the files, in order:
 *
 *   take.c    dg_take_decide() chooses the commands that get entries: XGROUP CREATE while
 *             the groups are not known to exist, then, for the high stream and after it the
 *             normal one, our own pending list (XPENDING, XCLAIM), XAUTOCLAIM when the reaper
 *             is due, and XREADGROUP. dg_take_run() sends them
 *             and, for each entry, one round trip (WATCH and EXISTS of the result key, EXISTS
 *             of the cancel key, the job hash set to running) decides what it becomes:
 *             acknowledged at once (deleted while pending, or its result exists), ended at
 *             once (a bad job, over max_attempts, cancelled, expired), or a run whose images
 *             are fetched (job.c) and which is submitted to the engine.
 *   run.c     the engine steps (dg_sched_step, here); its callbacks queue event entries and
 *             image keys on the run and mark its progress; its end is recorded on the run.
 *   worker.c  flush_progress(): between steps, what the runs queued, their progress in the
 *             job hash, and a look at their cancel keys.
 *   take.c    dg_take_release(): a run ended by a passing failure goes back, still pending.
 *   commit.c  dg_commit_write(): the result hash, job hash, final event, done entry, dead
 *             letter and the XACK, in one MULTI/EXEC with the result key WATCHed; the next
 *             plan's first XREADGROUP rides in the same round trip.
 *
 * keys.c names every key on the way and redis.c carries every command; keeper.c and
 * metrics.c only read what publish() leaves under the lock. Redis being away never loses
 * work: the loop keeps stepping, keeps what it must write, and writes it when the
 * connection is back. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "notify.h"
#include "worker.h"


int dg_worker_prepare(dg_worker *w, dg_daemon_config *cfg, volatile sig_atomic_t *stop, char *err, size_t errlen) {
    memset(w, 0, sizeof *w);
    w->cfg = cfg;
    w->stop = stop;
    dg_keys_init(&w->keys, cfg->prefix, cfg->worker_id);
    pthread_mutex_init(&w->lock, NULL);
    w->stats.started_ms = dg_now_ms();
    snprintf(w->stats.state, sizeof w->stats.state, "loading");
    /* this process, told from another under the same worker id (dg_worker_id_check) */
    unsigned char rnd[8] = {0};
    FILE *ur = fopen("/dev/urandom", "rb");
    if (!ur || fread(rnd, 1, sizeof rnd, ur) != sizeof rnd) {
        const unsigned long long x = (unsigned long long)dg_now_ms() * 6364136223846793005ULL ^ (unsigned long long)getpid();
        memcpy(rnd, &x, sizeof rnd);
    }
    if (ur) fclose(ur);
    for (int i = 0; i < 8; i++) snprintf(w->instance + 2 * i, 3, "%02x", rnd[i]);
    if (gethostname(w->host, sizeof w->host)) snprintf(w->host, sizeof w->host, "?");
    w->host[sizeof w->host - 1] = 0;
    w->metrics_fd = -1;
    for (int i = 0; i < 2; i++) w->stats.queue_lag[i] = w->stats.queue_pending[i] = -1;
    w->stats.redis_evicts = w->redis_evicts = -1;
    /* the URL and the password file now (nothing connects yet): a typo there is said before
     * a load of minutes, not after it. The read timeout must outlast the longest BLOCK, or
     * every idle poll is an I/O error */
    return dg_redis_init(&w->redis, cfg, cfg->worker_id, cfg->block_ms + 5000, err, errlen);
}

void dg_worker_state(dg_worker *w, const char *state) {
    pthread_mutex_lock(&w->lock);
    snprintf(w->stats.state, sizeof w->stats.state, "%s", state);
    pthread_mutex_unlock(&w->lock);
}

int dg_worker_init(dg_worker *w, dg_model *model, char *err, size_t errlen) {
    dg_daemon_config *cfg = w->cfg;
    w->model = model;
    dg_sched_opts so = {.max_inflight = cfg->max_inflight, .kv_cache_bytes = cfg->kv_cache_bytes,
                        .kv_bf16 = cfg->kv_bf16, .draft_tokens = cfg->draft_tokens,
                        .vision_cache_bytes = cfg->vision_cache_bytes, .latent_cache_bytes = cfg->latent_cache_bytes,
                        .max_condition_pixels = cfg->max_condition_pixels,
                        .max_condition_frames = cfg->max_condition_frames,
                        .max_image_pixels = cfg->max_image_pixels};
    int rc = dg_sched_new(model, &so, &w->sched, err, errlen);
    if (rc) return rc;
    if (!cfg->max_inflight) {   /* sized by the engine from the memory (docs/DESIGN.md §6 "Batching") */
        cfg->max_inflight = dg_sched_max_inflight(w->sched);
        const size_t free_now = dg_sched_sized_from(w->sched);
        if (cfg->kv_cache_bytes) log_info("max_inflight %d (what kv_cache_bytes holds)", cfg->max_inflight);
        else if (!free_now) log_info("max_inflight %d (the device does not say what memory it has free)",
                                     cfg->max_inflight);
        else
            log_info("max_inflight %d (from the memory: %.2f GiB free to this worker on %s%s; half of it for the KV)",
                     cfg->max_inflight, free_now / 1073741824.0, cfg->device,
                     strncmp(cfg->device, "cpu", 3) ? "" : ", its cgroup's limit counted");
    }
    const int holds = dg_sched_kv_holds(w->sched);
    if (holds < cfg->max_inflight)
        log_warn("kv_cache_bytes holds %d sequence%s at the model's full context, max_inflight is %d: "
                 "a prompt waits for room, and jobs whose answers grow long beside each other can fill it, "
                 "the youngest then failed for a later attempt (a smaller max_inflight, or a larger "
                 "kv_cache_bytes, avoids it)",
                 holds, holds == 1 ? "" : "s", cfg->max_inflight);
    dg_commit_init(&w->committer, &w->redis, cfg, &w->keys);
    dg_take_init(&w->taker, &w->redis, cfg, &w->keys, w->sched, &w->committer, &w->runs);
    return 0;
}

void dg_worker_free(dg_worker *w) {
    dg_metrics_stop(w);
    dg_runs_free(&w->runs);
    dg_take_free(&w->taker);
    dg_sched_free(w->sched);
    dg_redis_close(&w->redis);
    free(w->leases);
    free(w->lost);
    pthread_mutex_destroy(&w->lock);
}

/* ---- bookkeeping shared with the keeper --------------------------------------------------------- */

static void publish(dg_worker *w) {
    pthread_mutex_lock(&w->lock);
    if (w->runs.n > w->cap_leases) {
        w->cap_leases = w->runs.n * 2;
        w->leases = realloc(w->leases, (size_t)w->cap_leases * sizeof *w->leases);
        if (!w->leases) abort();
    }
    w->n_leases = 0;
    w->stats.jobs[0] = 0;
    memset(w->stats.phase_since_ms, 0, sizeof w->stats.phase_since_ms);
    memset(w->stats.progress_since_ms, 0, sizeof w->stats.progress_since_ms);
    size_t used = 0;
    for (dg_run *r = w->runs.first; r; r = r->next) {
        int64_t *since = &w->stats.phase_since_ms[r->phase];
        if (!*since || r->phase_ms < *since) *since = r->phase_ms;
        int64_t *moved = &w->stats.progress_since_ms[r->phase];
        if (!*moved || r->progress_ms < *moved) *moved = r->progress_ms;
        dg_lease *l = &w->leases[w->n_leases++];
        snprintf(l->stream, sizeof l->stream, "%s", r->stream);
        snprintf(l->entry, sizeof l->entry, "%s", r->entry);
        l->serial = r->serial;
        int n = snprintf(w->stats.jobs + used, sizeof w->stats.jobs - used, "%s%s", used ? " " : "", r->id);
        if (n > 0 && used + (size_t)n < sizeof w->stats.jobs) used += (size_t)n;
        else w->stats.jobs[used] = 0;   /* no room for this id: none of it, not a cut one */
    }
    dg_sched_cache_stats(w->sched, &w->stats.cache);
    dg_sched_draft_stats(w->sched, &w->stats.draft_tokens, &w->stats.draft_kept);
    dg_sched_screen_stats(w->sched, &w->stats.screened, &w->stats.unscreened);
    w->stats.redis_up = w->redis.c != NULL;
    w->stats.redis_evicts = w->redis_evicts;
    const char *state = *w->stop ? "draining" : w->runs.n ? "running" : "idle";
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
        /* the entry id's time is the Redis host's clock: skew could make it negative, and
         * the summary's sum must not go down */
        w->stats.queue_s += r->enqueued_ms > 0 && r->taken_ms > r->enqueued_ms ? (double)(r->taken_ms - r->enqueued_ms) / 1e3 : 0;
        w->stats.total_s += (double)(dg_mono_ms() - r->started_mono_ms) / 1e3;
    }
    if (r->submitted && r->timed) {   /* a failed run's tokens without its time inflated the rates */
        w->stats.engine_timed_jobs++;
        w->stats.timed_tokens += r->tokens;
        w->stats.timed_steps += r->steps_done;
        w->stats.prefill_s += r->timings.prefill_ms / 1e3;
        w->stats.decode_s += r->timings.decode_ms / 1e3;
        w->stats.vision_s += r->timings.vision_ms / 1e3;
        w->stats.diffusion_s += r->timings.diffusion_ms / 1e3;
        w->stats.vae_s += r->timings.vae_ms / 1e3;
    }
    pthread_mutex_unlock(&w->lock);
}

/* Runs whose lease the keeper found lost stop (dg_runs_fence); those fenced that have
 * ended are dropped without a word: the attempt holding the entry now writes the job's
 * events, progress and result. */
static void fence_lost(dg_worker *w) {
    pthread_mutex_lock(&w->lock);
    int n = w->n_lost;
    dg_lease *lost = w->lost;
    w->lost = NULL;
    w->n_lost = w->cap_lost = 0;
    pthread_mutex_unlock(&w->lock);
    int fenced = 0;
    for (int i = 0; i < n; i++) fenced += dg_runs_fence(&w->runs, w->sched, lost[i].stream, lost[i].entry, lost[i].serial);
    free(lost);
    if (fenced) {
        pthread_mutex_lock(&w->lock);
        w->stats.leases_lost += fenced;
        pthread_mutex_unlock(&w->lock);
    }
    for (dg_run *r = w->runs.first, *next; r; r = next) {
        next = r->next;
        if (r->lease_lost && r->ended) dg_runs_drop(&w->runs, r);
    }
}

/* An engine failure ends the process (exit 75) with its runs' entries pending for a later
 * attempt: each of their job hashes says what ended this one, so that the attempt that
 * gives up can tell (it said "ended without a result"). A run another attempt holds now
 * writes nothing, as always: the leases the keeper found lost are fenced first, and a hash
 * that names another worker or attempt is left alone. */
static void note_engine_failure(dg_worker *w, const char *what) {
    char key[DG_KEY_MAX], why[1024], now[24], attempt[16];
    fence_lost(w);
    snprintf(why, sizeof why, "worker \"%s\": engine failure: %s", w->cfg->worker_id, what);
    dg_utf8_scrub(why);
    snprintf(now, sizeof now, "%lld", (long long)dg_now_ms());
    for (dg_run *r = w->runs.first; r && dg_redis_ready(&w->redis); r = r->next) {
        if (!r->submitted || r->ended || r->lease_lost) continue;
        dg_key_job(key, w->cfg->prefix, r->id);
        snprintf(attempt, sizeof attempt, "%d", r->deliveries);
        /* HGET, which the worker's ACL grants (deploy/redis/users.acl.example), not HMGET */
        redisReply *who = dg_redis_cmdv(&w->redis, "HGET", key, "worker", NULL);
        redisReply *nth = dg_redis_cmdv(&w->redis, "HGET", key, "attempt", NULL);
        const int ours = who && nth && who->type == REDIS_REPLY_STRING && nth->type == REDIS_REPLY_STRING &&
                         !strcmp(who->str, w->cfg->worker_id) && !strcmp(nth->str, attempt);
        if (!ours && ((who && who->type == REDIS_REPLY_ERROR) || (nth && nth->type == REDIS_REPLY_ERROR)))
            log_warn("job \"%s\": the engine failure is not noted: %s", r->id,
                     who && who->type == REDIS_REPLY_ERROR ? who->str : nth->str);
        if (who) freeReplyObject(who);
        if (nth) freeReplyObject(nth);
        if (!ours) continue;
        redisReply *rep = dg_redis_cmdv(&w->redis, "HSET", key, "state", "retrying", "error", why, "updated_ms", now,
                                        NULL);
        if (rep) freeReplyObject(rep);
    }
}

/* At the drain deadline (or a second signal): a run that has not ended is given back with
 * its delivery uncounted (XCLAIM ... RETRYCOUNT deliveries - 1) and its entry idle past
 * claim_idle_ms, so that the next worker's reaper takes it at once as the same attempt, and
 * its job hash says so. A stop is the operator's doing, not the job's: a long job that meets
 * a rolling restart again and again must not use up max_attempts, nor be dead-lettered as
 * "the worker died". Called after the keeper stopped (a renewal would make the entry idle 0
 * again). A run that ended but whose result is not yet written (Redis away) is said so: it
 * stays pending, counted, and runs again. */
static void give_back_at_stop(dg_worker *w, int second_signal) {
    const dg_daemon_config *cfg = w->cfg;
    char key[DG_KEY_MAX], why[512], now[24], attempt[16], was[16], idle[16], in[64];
    snprintf(now, sizeof now, "%lld", (long long)dg_now_ms());
    snprintf(idle, sizeof idle, "%d", cfg->claim_idle_ms);
    if (second_signal) snprintf(in, sizeof in, "before a second stop signal cut the drain short");
    else snprintf(in, sizeof in, "in the drain time (%d ms)", cfg->drain_ms);
    snprintf(why, sizeof why, "worker \"%s\" stopped: the job not finished %s; left for another worker"
             DG_TAKE_NOT_COUNTED, cfg->worker_id, in);
    dg_utf8_scrub(why);
    fence_lost(w);   /* leases the keeper found lost on its last turns: not ours to give */
    for (dg_run *r = w->runs.first; r; r = r->next) {
        if (r->lease_lost) continue;   /* another attempt's now */
        if (r->ended) {
            if (!r->retry)
                log_warn("job \"%s\" (entry %s) finished, but its result was not written %s (Redis %s): left "
                         "pending, it will run again", r->id, r->entry, in,
                         dg_redis_ready(&w->redis) ? "slow" : "unreachable");
            continue;
        }
        /* still ours, at this delivery's count (XPENDING): another worker's reaper may have
         * taken it while our keeper was slow, and a give-back would take it from that run */
        long long idle_ms = -1;
        const char *gone = "Redis unreachable";
        if (dg_redis_ready(&w->redis)) {
            redisReply *p = dg_redis_cmdv(&w->redis, "XPENDING", r->stream, cfg->group, r->entry, r->entry, "1", NULL);
            gone = "its entry is no longer pending: deleted from the stream, or acknowledged";
            if (p && p->type == REDIS_REPLY_ARRAY && p->elements == 1 && p->element[0]->elements == 4) {
                const redisReply *row = p->element[0];
                if (strcmp(row->element[1]->str, cfg->worker_id)) gone = "another worker holds its entry now";
                else if (row->element[3]->integer != r->deliveries) gone = "delivered again meanwhile";
                else idle_ms = row->element[2]->integer;
            }
            if (p) freeReplyObject(p);
        }
        if (idle_ms < 0) {
            log_warn("job \"%s\" (entry %s) not finished %s, not given back: %s", r->id, r->entry, in, gone);
            continue;
        }
        /* the job hash first, where it still names this attempt (HGET: the worker's ACL): a
         * worker taking the entry after the give-back writes "running" over it, not under */
        dg_key_job(key, cfg->prefix, r->id);
        snprintf(attempt, sizeof attempt, "%d", r->deliveries);
        redisReply *who = dg_redis_cmdv(&w->redis, "HGET", key, "worker", NULL);
        redisReply *nth = dg_redis_cmdv(&w->redis, "HGET", key, "attempt", NULL);
        if (who && nth && who->type == REDIS_REPLY_STRING && nth->type == REDIS_REPLY_STRING &&
            !strcmp(who->str, cfg->worker_id) && !strcmp(nth->str, attempt)) {
            redisReply *rep = dg_redis_cmdv(&w->redis, "HSET", key, "state", "retrying", "error", why,
                                            "updated_ms", now, NULL);
            if (rep) freeReplyObject(rep);
        }
        if (who) freeReplyObject(who);
        if (nth) freeReplyObject(nth);
        /* min-idle-time the idle just seen: a reaper that took it in between keeps it */
        char seen_idle[24];
        snprintf(seen_idle, sizeof seen_idle, "%lld", idle_ms);
        snprintf(was, sizeof was, "%d", r->deliveries > 0 ? r->deliveries - 1 : 0);
        redisReply *rep = dg_redis_cmdv(&w->redis, "XCLAIM", r->stream, cfg->group, cfg->worker_id, seen_idle,
                                        r->entry, "IDLE", idle, "RETRYCOUNT", was, "JUSTID", NULL);
        const int given = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 1;
        if (rep) freeReplyObject(rep);
        if (!given) {
            log_warn("job \"%s\" (entry %s) not finished %s: left pending for another worker (its delivery "
                     "counted: the give-back was not taken)", r->id, r->entry, in);
            continue;
        }
        log_warn("job \"%s\" (entry %s) not finished %s: left pending for another worker, this delivery not "
                 "counted", r->id, r->entry, in);
    }
}

/* What taking reports goes into the shared counters and the exit code. */
static void absorb(dg_worker *w, const dg_take_report *rep) {
    if (rep->lost || rep->skipped) {
        pthread_mutex_lock(&w->lock);
        w->stats.entries_lost += rep->lost;
        w->stats.jobs_skipped += rep->skipped;
        pthread_mutex_unlock(&w->lock);
    }
    if (rep->refused) w->fatal = EX_CONFIG;
    if (rep->engine_failed) {
        note_engine_failure(w, rep->engine_error);
        w->fatal = EX_TEMPFAIL;
    }
}

/* ---- the steps of the loop ------------------------------------------------------------------------ */

/* Takes entries while there is room, as take.c decides. Returns -1 when Redis went away. */
static int take_jobs(dg_worker *w, int connected, int draining) {
    dg_take_facts f = dg_take_facts_now(&w->taker, connected, draining, w->cfg->max_inflight - w->runs.n);
    dg_take_plan plan = dg_take_decide(&f);
    if (!plan.n_steps) return 0;
    dg_take_report rep = {0};
    int rc = dg_take_run(&w->taker, &plan, NULL, &rep);
    absorb(w, &rep);
    return rc;
}

/* A read of jobs that loses the connection each time, right after it answered (INFO on
 * every new connection, check_eviction): most likely an entry whose reply is over the
 * server's client-output-buffer-limit for normal clients, which closes the connection. The
 * entry cannot be read at all (its job id with it): said, first at the third time running
 * and every 20th, naming the setting; the queue waits until the limit or the entry goes. */
static void reads_lost(dg_worker *w) {
    if (!w->redis.cut_last) return;
    if (++w->reads_lost < 3 || (w->reads_lost - 3) % 20) return;
    log_error("reading jobs lost the connection %d times running, each time on a connection that had just "
              "answered (%s): an entry too large for the server's client-output-buffer-limit for normal clients? "
              "(a reply over it closes the connection; stock Redis leaves that class unlimited, "
              "client-output-buffer-limit normal 0 0 0, as deploy/redis/redis.conf does)", w->reads_lost,
              w->redis.error);
}

/* ---- writes Redis never takes ------------------------------------------------------------------ */

/* A value over the server's proto-max-bulk-len (1mb at the least; 512mb stock) makes Redis
 * close the connection, each time it is sent: a job whose picture or result is such a value
 * stayed "running" for ever, the worker reconnecting and sending it again. A send carrying
 * a run's writes that lost the connection counts against the run (lost_writes; a refusal,
 * or a send never made for want of a connection, does not); from then its writes go alone, each time after a PING answered on the
 * connection, and when they lose it DG_RUN_WRITES_LOST_MAX times in a row they are taken
 * as writes Redis never takes (dg_run_unstorable): the job fails, naming the size, and the
 * worker goes on. An outage cuts one send, then the connect waits: it cannot cut the same
 * run's writes three times running, each right after the connection answered. */

/* A PING: 0 when the connection answered it, -1 when it is lost. */
static int probe(dg_worker *w) {
    redisReply *rep = dg_redis_cmdv(&w->redis, "PING", NULL);
    if (!rep) return -1;
    freeReplyObject(rep);
    return 0;
}

/* After a send carrying the run's writes failed: counted when the connection was lost. */
static void writes_lost(dg_worker *w, dg_run *r) {
    if (!w->redis.cut_last) return;
    if (++r->lost_writes < DG_RUN_WRITES_LOST_MAX) return;
    size_t largest = r->ended ? dg_commit_result_size(&w->committer, r) : 0, total = largest;
    for (int i = 0; i < r->n_out; i++) {
        size_t all = 0;
        const size_t m = dg_cmd_largest(r->out[i], &all);
        if (m > largest) largest = m;
        total += all;
    }
    if (r->ended && r->dead) total += r->job_len;
    dg_run_unstorable(r, largest, total);   /* a running one is stopped by dg_runs_cancel_due */
}

/* The queued writes of the first running run whose writes lost the connection, alone. */
static void flush_alone(dg_worker *w) {
    dg_run *r = w->runs.first;
    while (r && (r->ended || r->lease_lost || !r->lost_writes || !r->n_out)) r = r->next;
    if (!r || probe(w)) return;
    redisReply **rep = calloc((size_t)r->n_out, sizeof *rep);
    if (!rep) abort();
    const int n = r->n_out;
    if (dg_redis_pipeline(&w->redis, r->out, n, rep) == 0) {
        for (int i = 0; i < n; i++)
            if (rep[i]->type == REDIS_REPLY_ERROR) log_warn("job \"%s\": a write refused: %s", r->id, rep[i]->str);
        dg_run_out_written(r, n);
        r->lost_writes = 0;
    } else {
        writes_lost(w, r);
    }
    for (int i = 0; i < n; i++)
        if (rep[i]) freeReplyObject(rep[i]);
    free(rep);
}

/* Writes queued events and progress of every run, and asks whether any was cancelled. */
static void flush_progress(dg_worker *w) {
    int cap = 16, n = 0, first_extra;
    dg_cmd **cmds = malloc((size_t)cap * sizeof *cmds);
    if (!cmds) abort();
#define PUSH(c) do { if (n == cap) { cap *= 2; cmds = realloc(cmds, (size_t)cap * sizeof *cmds); if (!cmds) abort(); } cmds[n++] = (c); } while (0)
    /* an ended run's go with its result; those of a run whose writes lost the connection, alone */
    for (dg_run *r = w->runs.first; r; r = r->next)
        for (int i = 0; !r->ended && !r->lost_writes && i < r->n_out; i++) PUSH(r->out[i]);
    first_extra = n;
    for (dg_run *r = w->runs.first; r; r = r->next) {
        dg_cmd *p = r->ended ? NULL : dg_run_progress_cmd(r);
        if (p) PUSH(p);
    }
    int first_cancel = n;
    for (dg_run *r = w->runs.first; r; r = r->next) {
        if (r->ended || r->lease_lost) continue;
        char key[DG_KEY_MAX];
        dg_key_cancel(key, w->cfg->prefix, r->id);
        PUSH(dg_cmd_of("EXISTS", key, NULL));
    }
#undef PUSH
    if (n == 0) {
        free(cmds);
        flush_alone(w);
        return;
    }
    redisReply **rep = calloc((size_t)n, sizeof *rep);
    if (!rep) abort();
    int rc = dg_redis_pipeline(&w->redis, cmds, n, rep);
    if (rc == 0) {
        int k = first_cancel;
        for (dg_run *r = w->runs.first; r; r = r->next) {
            if (r->ended || r->lease_lost) continue;
            if (!r->lost_writes) dg_run_out_written(r, r->n_out);
            if (dg_reply_int(rep[k++], 0) == 1 && r->submitted && !r->cancel_asked) {
                log_info("job \"%s\": cancelled by its producer", r->id);
                r->cancel_asked = 1;
                dg_sched_cancel(w->sched, r->seq);
            }
        }
        for (int i = 0; i < n; i++) if (rep[i] && rep[i]->type == REDIS_REPLY_ERROR && i < first_cancel)
            log_warn("progress write refused: %s", rep[i]->str);
    } else {
        for (dg_run *r = w->runs.first; r; r = r->next) {
            r->dirty = 1;
            if (!r->ended && !r->lost_writes && r->n_out) writes_lost(w, r);
        }
    }
    for (int i = 0; i < n; i++) if (rep[i]) freeReplyObject(rep[i]);
    for (int i = first_extra; i < n; i++) dg_cmd_free(cmds[i]);
    free(rep);
    free(cmds);
    if (rc == 0) flush_alone(w);
}


/* Writes the results of ended runs (after giving back those that failed for a passing
 * reason); when there will be room afterwards and the next plan starts with a read (of the
 * high stream: dg_take_decide), that XREADGROUP goes in the same round trip as the EXEC and
 * the plan's other steps follow it. It never blocks: the runs being committed count as
 * held. */
static void write_results(dg_worker *w, int draining) {
    dg_run *batch[64];
    int outcome[64], n = 0;
    dg_take_release(&w->taker);
    /* a run whose writes lost the connection goes alone, after a PING answered */
    for (dg_run *r = w->runs.first; r && !n; r = r->next)
        if (r->ended && !r->lease_lost && r->lost_writes) batch[n++] = r;
    if (n && probe(w)) return;
    for (dg_run *r = n ? NULL : w->runs.first; r && n < 64; r = r->next)
        if (r->ended && !r->lease_lost) batch[n++] = r;   /* fenced: dropped by fence_lost() */
    if (!n) return;
    dg_take_facts f = dg_take_facts_now(&w->taker, 1, draining, w->cfg->max_inflight - (w->runs.n - n));
    dg_take_plan next = dg_take_decide(&f);
    int ride = next.n_steps > 0 && next.steps[0].source == DG_TAKE_READ && !next.steps[0].block_ms;
    dg_cmd *then = ride ? dg_take_read_cmd(&w->taker, &next.steps[0]) : NULL;
    redisReply *got = NULL;
    int rc = dg_commit_write(&w->committer, batch, n, outcome, then, &got);
    for (int i = 0; i < n && rc == -1; i++)
        if (outcome[i] == DG_COMMIT_PENDING) writes_lost(w, batch[i]);
    for (int i = 0; i < n; i++) {
        if (outcome[i] == DG_COMMIT_WRITTEN) {
            dg_run_written(batch[i]);
            count_end(w, batch[i]);
        }
        if (outcome[i] != DG_COMMIT_PENDING) dg_runs_drop(&w->runs, batch[i]);
    }
    if (rc == -2) {
        log_error("Redis refused to store results: check the worker's ACL (it needs HSET, EXPIRE, "
                  "XADD, XACK, MULTI, EXEC, WATCH on its keys, and HSET, HGET, HDEL, HSCAN on the job "
                  "streams' :taken indexes: deploy/redis/users.acl.example)");
        w->fatal = EX_CONFIG;
    }
    if (got) {
        if (!w->fatal) {
            dg_take_report rep = {0};
            dg_take_run(&w->taker, &next, got, &rep);
            absorb(w, &rep);
        }
        freeReplyObject(got);
    }
    dg_cmd_free(then);
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);   /* a signal ends it early, which is what we want */
}

/* Nothing to step: wait for Redis to come back, or a little for a refusing one. */
static void idle_wait(dg_worker *w) {
    if (!dg_redis_ready(&w->redis)) {
        int wait = dg_redis_wait_ms(&w->redis);
        sleep_ms(wait < 5 ? 5 : wait > 200 ? 200 : wait);
    } else if (w->runs.first) {
        sleep_ms(5);   /* results waiting on a refusing Redis: do not spin */
    } else if (!w->taker.groups_ok) {   /* their creation refused: its wait, 200 ms at most */
        const int64_t left = w->taker.groups_retry_ms - dg_mono_ms();
        sleep_ms(left < 5 ? 5 : left > 200 ? 200 : (int)left);
    } else if (dg_mono_ms() < w->taker.input_retry_ms) {   /* inputs it could not read: its wait */
        const int64_t left = w->taker.input_retry_ms - dg_mono_ms();
        sleep_ms(left < 5 ? 5 : left > 200 ? 200 : (int)left);
    }
}

/* Keeps systemd's stop timeout ahead of the drain, once a second. */
static void extend_stop(int64_t drain_deadline, int64_t now, int64_t *last_extend) {
    if (now - *last_extend <= 1000) return;
    int64_t left = drain_deadline - now;
    dg_notify_extend((uint64_t)((left > 0 ? left : 0) + 10000) * 1000u);
    *last_extend = now;
}

static void status_line(dg_worker *w) {
    if (!w->redis.c) {
        dg_notify_status("waiting for Redis: %s", w->redis.error);
        return;
    }
    if (*w->stop) {
        dg_notify_status("draining %d job(s)", w->runs.n);
        return;
    }
    if (!w->runs.first) {
        dg_notify_status("idle");
        return;
    }
    dg_run *r = w->runs.first;
    /* the step while it draws; words otherwise (the last picture's step stayed in the line
     * through the text after it) */
    if (r->phase == DG_PHASE_WRITING) dg_notify_status("job %s writing its result (%d running)", r->id, w->runs.n);
    else if (r->phase == DG_PHASE_DIFFUSION) dg_notify_status("job %s %s step %d/%d (%d running)", r->id, dg_phase_name(r->phase), r->step, r->steps, w->runs.n);
    else dg_notify_status("job %s %s %d tokens (%d running)", r->id, dg_phase_name(r->phase), r->tokens, w->runs.n);
}

/* Redis's eviction policy, read on every new connection (a failover or a restart may bring
 * another configuration): under any policy but noeviction a Redis at maxmemory deletes
 * keys, and a job's stream entry, its pending list or its result is a job lost without a
 * word. Said as a warning when first seen and whenever it changes, and in the metrics
 * (duogen_redis_evicts); INFO refused (an ACL without it) is said once, and the policy
 * counts as unknown. The worker goes on either way: the store is the operator's to set. */
static void check_eviction(dg_worker *w) {
    if (w->evict_checked == w->redis.connects) return;
    w->evict_checked = w->redis.connects;
    redisReply *rep = dg_redis_cmdv(&w->redis, "INFO", "memory", NULL);
    if (!rep) return;   /* the connection dropped: the next one asks again */
    char policy[64] = "";
    long long maxmemory = -1;
    if (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_STATUS) {
        for (const char *line = rep->str; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
            if (!strncmp(line, "maxmemory_policy:", 17))
                snprintf(policy, sizeof policy, "%.*s", (int)strcspn(line + 17, "\r\n"), line + 17);
            else if (!strncmp(line, "maxmemory:", 10))
                maxmemory = strtoll(line + 10, NULL, 10);
        }
    }
    if (!policy[0]) {
        if (strcmp(w->evict_policy, "?"))
            log_info("Redis's eviction policy is not known (INFO memory: %s): it must be maxmemory-policy "
                     "noeviction, or a full Redis deletes jobs and results (deploy/redis/redis.conf)",
                     rep->type == REDIS_REPLY_ERROR ? rep->str : "no maxmemory_policy in the reply");
        snprintf(w->evict_policy, sizeof w->evict_policy, "?");
        w->redis_evicts = -1;
    } else {
        w->redis_evicts = strcmp(policy, "noeviction") != 0;
        if (w->redis_evicts && strcmp(w->evict_policy, policy)) {
            char limit[64];
            if (maxmemory > 0) snprintf(limit, sizeof limit, "maxmemory %lld bytes", maxmemory);
            else snprintf(limit, sizeof limit, "no maxmemory yet: it evicts once one is set");
            log_warn("Redis evicts keys when full (maxmemory-policy %s, %s): a job's stream entry, pending list "
                     "or result can be deleted, and the job lost without a word; set maxmemory-policy "
                     "noeviction (deploy/redis/redis.conf): a full Redis then refuses writes, which workers "
                     "and producers see and retry", policy, limit);
        } else if (!w->redis_evicts && w->evict_policy[0] && strcmp(w->evict_policy, "?") &&
                   strcmp(w->evict_policy, policy)) {
            log_info("Redis's maxmemory-policy is noeviction now (was %s)", w->evict_policy);
        }
        snprintf(w->evict_policy, sizeof w->evict_policy, "%s", policy);
    }
    freeReplyObject(rep);
}

/* ---- the loop -------------------------------------------------------------------------------------- */

/* Before the first job, once Redis answers (at start, or when it first does): the rights
 * this version needs beyond the last one's ACL (an ACL not brought up to date would refuse
 * them only in a result's transaction, after a job ran), then this worker id's lease
 * (dg_worker_id_check). 0 to go on (w->unchecked still set when Redis went away
 * meanwhile: asked again), or the exit code. */
static int check_first(dg_worker *w) {
    w->unchecked = 1;
    if (!dg_redis_ready(&w->redis)) return 0;
    enum { N = 9 };
    char k_taken[2][DG_KEY_MAX];
    dg_key_taken(k_taken[0], w->keys.streams[0]);
    dg_key_taken(k_taken[1], w->keys.streams[1]);
    /* the keeper's renewal and the reaper's take-over, refused, were silent: the running
     * jobs' leases lapsed and live workers took them from each other until dead-lettered.
     * A min-idle-time no entry reaches claims nothing (NOGROUP before the groups exist is
     * an answer too: the command is allowed) */
    static const char never[] = "9223372036854775807";
    dg_cmd *ask[N] = {dg_cmd_of("HGET", w->keys.worker, "owner", NULL),   /* "0-0": a field no entry has */
                      dg_cmd_of("HSET", k_taken[0], "0-0", "", NULL), dg_cmd_of("HSCAN", k_taken[0], "0", "COUNT", "1", NULL),
                      dg_cmd_of("HDEL", k_taken[0], "0-0", NULL),
                      dg_cmd_of("HSET", k_taken[1], "0-0", "", NULL), dg_cmd_of("HSCAN", k_taken[1], "0", "COUNT", "1", NULL),
                      dg_cmd_of("HDEL", k_taken[1], "0-0", NULL),
                      dg_cmd_of("XCLAIM", w->keys.streams[0], w->cfg->group, w->cfg->worker_id, never, "0-0", NULL),
                      dg_cmd_of("XAUTOCLAIM", w->keys.streams[0], w->cfg->group, w->cfg->worker_id, never, "0-0",
                                "COUNT", "1", NULL)};
    redisReply *rep[N];
    int refused = 0;
    const int away = dg_redis_pipeline(&w->redis, ask, N, rep) != 0;
    if (!away) {
        for (int i = 0; i < N; i++) {
            if ((dg_reply_is_error(rep[i], "NOPERM") || dg_reply_is_error(rep[i], "ERR unknown command")) && !refused++)
                log_error("Redis refuses this worker a command it needs (%s): update the worker's ACL, or the "
                          "server's rename-command (deploy/redis/users.acl.example: HGET, HSETNX, HDEL on its "
                          "heartbeat hash, whose owner field is the worker id's lease; HSET, HGET, HDEL, HSCAN on "
                          "the job streams' :taken indexes; XCLAIM, which renews a running job's lease, and "
                          "XAUTOCLAIM, which takes over a dead worker's jobs)", rep[i]->str);
            freeReplyObject(rep[i]);
        }
    }
    for (int i = 0; i < N; i++) dg_cmd_free(ask[i]);
    if (refused) return EX_CONFIG;
    if (away) return 0;
    return dg_worker_id_check(w);
}

int dg_worker_run(dg_worker *w) {
    const dg_daemon_config *cfg = w->cfg;
    char err[512];
    int64_t drain_deadline = 0, last_extend = 0, last_flush = 0;
    int give_back = 0;   /* the drain time ran out with runs unfinished: 1; a second signal: 2 */
    const int clash = check_first(w);
    if (clash) return clash;
    if (w->unchecked) log_info("Redis is away: this worker id's lease is taken when it answers, before any job");
    if (dg_keeper_start(w, err, sizeof err)) {
        log_error("%s", err);
        return EX_TEMPFAIL;
    }

    for (;;) {
        dg_notify_watchdog();
        if (w->id_clash) w->fatal = EX_CONFIG;   /* the keeper said it (an older process has our id) */
        if (w->fatal) break;
        int64_t now = dg_mono_ms();
        if (*w->stop && !drain_deadline) {
            drain_deadline = now + cfg->drain_ms;
            dg_notify_stopping("draining");
            log_info("stopping: no new jobs; %d running get %d ms to finish", w->runs.n, cfg->drain_ms);
        }
        if (drain_deadline) {
            if (!w->runs.first) break;
            extend_stop(drain_deadline, now, &last_extend);
            if (now >= drain_deadline || *w->stop > 1) {
                give_back = now >= drain_deadline ? 1 : 2;
                break;
            }
        }

        int connected = dg_redis_ready(&w->redis);
        if (w->redis.fatal) {
            log_error("Redis refused this worker: %s", w->redis.error);
            w->fatal = EX_CONFIG;
            break;
        }
        if (connected && w->unchecked && !drain_deadline) {   /* away at start: now, before any job */
            const int code = check_first(w);
            if (code) {
                w->fatal = code;
                break;
            }
            connected = dg_redis_ready(&w->redis);
        }
        if (connected) check_eviction(w);
        fence_lost(w);   /* first: a fenced run that has ended leaves before its entry is taken again */
        publish(w);
        status_line(w);
        if (take_jobs(w, connected && !w->unchecked, drain_deadline != 0)) {
            reads_lost(w);
            continue;   /* Redis went away: the top of the loop reconnects */
        }
        if (connected) w->reads_lost = 0;
        if (w->fatal) break;
        publish(w);

        fence_lost(w);
        dg_runs_cancel_due(&w->runs, w->sched, dg_now_ms());
        int stepping = dg_runs_stepping(&w->runs);
        if (stepping && dg_sched_step(w->sched, err, sizeof err) < 0) {
            log_error("engine failure: %s", err);
            note_engine_failure(w, err);
            w->fatal = EX_TEMPFAIL;
            break;
        }
        if (w->runs.first && dg_redis_ready(&w->redis)) {
            /* progress goes out at most every flush_ms (short steps are coalesced); an ended
             * run's events go with its result */
            int64_t t = dg_mono_ms();
            if (t - last_flush >= cfg->flush_ms) {
                flush_progress(w);
                last_flush = t;
            }
            write_results(w, drain_deadline != 0);
        }
        if (!stepping) idle_wait(w);
    }

    publish(w);
    dg_metrics_stop(w);
    dg_keeper_stop(w);
    if (give_back) give_back_at_stop(w, give_back == 2);
    return w->fatal;
}
