/* Committing a run's end: the result, the final event, the done entry, dead letters and
 * the XACK, written exactly once (see commit.h and README "Guarantees"). */
#include "commit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.pb-c.h"
#include "log.h"

#define RESULT_CMDS_MAX 10     /* result_cmds() of one run */
#define ABORTED         1      /* write_batch(): EXEC aborted by a WATCHed key; nothing written */

/* The one acknowledgement of the daemon: the entry leaves the group's pending list. */
static dg_cmd *ack_cmd(const dg_committer *c, const char *stream, const char *entry) {
    return dg_cmd_of("XACK", stream, c->cfg->group, entry, NULL);
}

/* With every acknowledgement, the entry leaves the stream's taken index (keys.h). */
static dg_cmd *unindex_cmd(const char *stream, const char *entry) {
    char key[DG_KEY_MAX];
    dg_key_taken(key, stream);
    return dg_cmd_of("HDEL", key, entry, NULL);
}

void dg_commit_init(dg_committer *c, dg_redis *redis, const dg_daemon_config *cfg, const dg_keys *keys) {
    *c = (dg_committer){.redis = redis, .cfg = cfg, .keys = keys};
}

uint64_t dg_commit_watch_epoch(const dg_committer *c) {
    return (c->redis->connects << 32 | (c->execs & 0xffffffffu)) + 1;
}

/* XACK of an entry whose job has its result, and out of the taken index. */
static int ack_answered(dg_committer *c, const char *stream, const char *entry) {
    dg_cmd *cmds[2] = {ack_cmd(c, stream, entry), unindex_cmd(stream, entry)};
    return dg_redis_send(c->redis, cmds, 2);
}

int dg_commit_xack(dg_committer *c, const char *stream, const char *entry) {
    dg_cmd *ack = ack_cmd(c, stream, entry);
    redisReply *rep = dg_redis_cmd(c->redis, ack);
    dg_cmd_free(ack);
    if (!rep) return -1;
    freeReplyObject(rep);
    return 0;
}

int dg_commit_skip(dg_committer *c, const dg_run *r) {
    char k_result[DG_KEY_MAX], k_job[DG_KEY_MAX];
    dg_key_result(k_result, c->cfg->prefix, r->id);
    dg_key_job(k_job, c->cfg->prefix, r->id);
    redisReply *rs = dg_redis_cmdv(c->redis, "HGET", k_result, "status", NULL);
    if (rs && rs->type == REDIS_REPLY_STRING) {
        redisReply *h = dg_redis_cmdv(c->redis, "HSET", k_job, "state", rs->str, "phase", "finished", NULL);
        if (h) freeReplyObject(h);
    }
    if (rs) freeReplyObject(rs);
    return ack_answered(c, r->stream, r->entry);
}

/* ---- the result of one run ------------------------------------------------------------------ */

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
static size_t pack_result(const dg_committer *c, dg_run *r, uint8_t **out) {
    Duogen__V1__Result res = DUOGEN__V1__RESULT__INIT;
    Duogen__V1__Usage usage = DUOGEN__V1__USAGE__INIT;
    Duogen__V1__Timings tim = DUOGEN__V1__TIMINGS__INIT;
    Duogen__V1__Error error = DUOGEN__V1__ERROR__INIT;
    res.job_id = r->id;
    res.status = (Duogen__V1__Result__Status)r->status;
    res.worker_id = (char *)c->cfg->worker_id;
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
            if (im->path) images[i].file = im->path;
            if (im->png) {   /* Job.inline_images: the bytes, whether kept in Redis or a file */
                images[i].source_case = DUOGEN__V1__IMAGE__SOURCE_DATA;
                images[i].data.data = im->png;
                images[i].data.len = im->png_len;
            } else if (im->path) {
                images[i].source_case = DUOGEN__V1__IMAGE__SOURCE_PATH;
                images[i].path = im->path;
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
    usage.dit_forwards = (uint64_t)r->usage.dit_forwards;
    res.usage = &usage;
    tim.queue_ms = r->enqueued_ms > 0 && r->taken_ms > r->enqueued_ms ? (double)(r->taken_ms - r->enqueued_ms) : 0;   /* clock skew: 0 */
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

size_t dg_commit_result_size(const dg_committer *c, dg_run *r) {
    uint8_t *pb;
    const size_t n = pack_result(c, r, &pb);
    free(pb);
    return n;
}

static dg_cmd *final_event_of(dg_run *r);

/* The final event keeps one seq across tries: a commit cut before its EXEC is built again
 * (a cut-down result may say another status) and must not skip a number. */
static dg_cmd *final_event(dg_run *r) {
    const uint64_t next = r->event_seq;
    if (r->final_seq) r->event_seq = r->final_seq - 1;
    dg_cmd *c = final_event_of(r);
    r->final_seq = r->event_seq;
    if (next > r->event_seq) r->event_seq = next;
    return c;
}

static dg_cmd *final_event_of(dg_run *r) {
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
        return dg_run_event_cmd(r, &ev, "failed", "status", status, "code", code_name(r->err_code),
                         "error", r->error, NULL);
    }
    if (r->status == DUOGEN__V1__RESULT__STATUS__CANCELLED) {
        ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_CANCELLED;
        ev.cancelled = &cancelled;
        return dg_run_event_cmd(r, &ev, "cancelled", "status", status, NULL);
    }
    done.status = (Duogen__V1__Result__Status)r->status;
    ev.payload_case = DUOGEN__V1__EVENT__PAYLOAD_DONE;
    ev.done = &done;
    return dg_run_event_cmd(r, &ev, "done", "status", status, "finish_reason", r->finish, NULL);
}

/* The commands of one run's result transaction, without MULTI/EXEC: the result hash, the
 * job hash, the final event, the done entry, the dead entry when dead-lettered, and the
 * XACK with the entry's HDEL from the taken index. Appended to cmds (room for RESULT_CMDS_MAX); returns how many. */
static int result_cmds(const dg_committer *c, dg_run *r, dg_cmd **cmds) {
    const dg_daemon_config *cfg = c->cfg;
    char k_result[DG_KEY_MAX], k_job[DG_KEY_MAX], k_events[DG_KEY_MAX];
    dg_key_result(k_result, cfg->prefix, r->id);
    dg_key_job(k_job, cfg->prefix, r->id);
    dg_key_events(k_events, cfg->prefix, r->id);
    char ttl[16], now[24], images[16], attempt[16];
    snprintf(ttl, sizeof ttl, "%d", r->ttl_s);
    snprintf(now, sizeof now, "%lld", (long long)dg_now_ms());
    snprintf(images, sizeof images, "%d", r->n_imgs);
    snprintf(attempt, sizeof attempt, "%d", r->deliveries);
    const char *status = status_name(r->status);
    uint8_t *pb;
    size_t pb_len = pack_result(c, r, &pb);
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
    dg_cmd *done = dg_cmd_of("XADD", c->keys->done, "MAXLEN", NULL);
    dg_cmd_addf(done, "%d", cfg->done_maxlen);
    dg_cmd_adds(done, "*");
    dg_cmd_adds(done, "id"); dg_cmd_adds(done, r->id);
    dg_cmd_adds(done, "status"); dg_cmd_adds(done, status);
    cmds[n++] = done;
    if (r->dead) {
        dg_cmd *dead = dg_cmd_of("XADD", c->keys->dead, "MAXLEN", NULL);
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
    cmds[n++] = ack_cmd(c, r->stream, r->entry);
    cmds[n++] = unindex_cmd(r->stream, r->entry);
    return n;
}

/* ---- writing a batch -------------------------------------------------------------------------- */

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

/* The slow path's first round trip: what the runs still have queued, then WATCH on their
 * result keys and EXISTS of each. Returns 0 with exists[] filled, or -1 when Redis went
 * away. */
static int look(dg_committer *c, dg_run **runs, int n, int *exists) {
    int queued = 0, m = 0, rc = 0;
    for (int i = 0; i < n; i++) queued += runs[i]->n_out;
    dg_cmd **cmds = malloc((size_t)(queued + 1 + n) * sizeof *cmds);
    redisReply **rep = calloc((size_t)(queued + 1 + n), sizeof *rep);
    if (!cmds || !rep) abort();
    for (int i = 0; i < n; i++)
        for (int k = 0; k < runs[i]->n_out; k++) cmds[m++] = runs[i]->out[k];   /* borrowed */
    dg_cmd *watch = dg_cmd_of("WATCH", NULL);
    cmds[m++] = watch;
    for (int i = 0; i < n; i++) {
        char key[DG_KEY_MAX];
        dg_key_result(key, c->cfg->prefix, runs[i]->id);
        dg_cmd_adds(watch, key);
        cmds[m++] = dg_cmd_of("EXISTS", key, NULL);
    }
    if (dg_redis_pipeline(c->redis, cmds, m, rep)) {
        rc = -1;
    } else {
        for (int i = 0; i < n; i++) {
            exists[i] = dg_reply_int(rep[queued + 1 + i], 0) == 1;
            dg_run_out_written(runs[i], runs[i]->n_out);
        }
    }
    free_replies(rep, m);
    for (int i = queued; i < m; i++) dg_cmd_free(cmds[i]);
    free(cmds);
    free(rep);
    return rc;
}

/* The transaction's round trip: what the runs still have queued (nothing after a look), the
 * XACK of each run whose result exists, one MULTI/EXEC with the results of the others (an
 * UNWATCH when there are none), then `then`. Logs what Redis refused; fills outcome[] when
 * all went through. Returns 0, ABORTED, -1 when Redis went away, -2 when it refused. */
static int write_batch(dg_committer *c, dg_run **runs, int n, const int *exists, int *outcome,
                       dg_cmd *then, redisReply **then_reply) {
    int queued = 0, m = 0, writes = 0, n_then = then != NULL, rc = 0;
    for (int i = 0; i < n; i++) queued += runs[i]->n_out;
    int cap = queued + n * RESULT_CMDS_MAX + 3;
    dg_cmd **cmds = malloc((size_t)cap * sizeof *cmds);
    redisReply **rep = calloc((size_t)cap, sizeof *rep);
    int *n_cmds = calloc((size_t)n, sizeof *n_cmds);   /* each run's commands in the transaction */
    if (!cmds || !rep || !n_cmds) abort();
    for (int i = 0; i < n; i++)
        for (int k = 0; k < runs[i]->n_out; k++) cmds[m++] = runs[i]->out[k];   /* borrowed */
    for (int i = 0; i < n; i++)
        if (exists[i]) {
            cmds[m++] = ack_cmd(c, runs[i]->stream, runs[i]->entry);
            cmds[m++] = unindex_cmd(runs[i]->stream, runs[i]->entry);
        } else {
            writes++;
        }
    if (writes) {
        cmds[m++] = dg_cmd_of("MULTI", NULL);
        for (int i = 0; i < n; i++)
            if (!exists[i]) m += n_cmds[i] = result_cmds(c, runs[i], cmds + m);
        cmds[m++] = dg_cmd_of("EXEC", NULL);
    } else {
        cmds[m++] = dg_cmd_of("UNWATCH", NULL);
    }
    if (then) cmds[m++] = then;   /* the next read rides in the same round trip; its reply goes back as it is */
    c->execs++;   /* EXEC or UNWATCH: every WATCH of the connection ends here */
    if (dg_redis_pipeline(c->redis, cmds, m, rep)) {
        m -= n_then;
        rc = -1;
        goto out;
    }
    if (n_then) {
        *then_reply = rep[--m];
        rep[m] = NULL;
    }
    for (int i = 0; i < n && queued; i++) dg_run_out_written(runs[i], runs[i]->n_out);
    const int acks_end = queued + 2 * (n - writes);   /* the bare XACKs (and HDELs) of runs whose result exists */
    for (int i = queued; i < m - 1; i++)
        if (rep[i]->type == REDIS_REPLY_ERROR) {
            /* an XACK on a job stream key that is no stream now (a producer's LPUSH after a
             * DEL): the result stands and the entry is gone with the stream; the taker backs
             * off on the same reply. Not the ACL: the worker goes on */
            if (i < acks_end && (dg_reply_is_error(rep[i], "WRONGTYPE") || dg_reply_is_error(rep[i], "NOGROUP"))) {
                log_warn("could not acknowledge an entry whose result exists: %s", rep[i]->str);
                continue;
            }
            log_error("Redis refused a result command: %s", rep[i]->str);
            rc = -2;
        }
    const redisReply *exec = rep[m - 1];
    if (writes && exec->type == REDIS_REPLY_NIL) {
        if (!rc) rc = ABORTED;
        goto out;
    }
    if (writes && exec->type == REDIS_REPLY_ERROR) {
        log_error("result transaction failed: %s", exec->str);
        rc = -2;
    }
    /* a command that failed inside an applied EXEC (a key of the wrong type a producer made):
     * the others took effect, the acknowledgements too, so the runs are written; what
     * failed is logged, never a reason to stop the worker */
    for (size_t i = 0, run = 0, at = 0; writes && exec->type == REDIS_REPLY_ARRAY && i < exec->elements; i++) {
        while (run < (size_t)n && i >= at + (size_t)n_cmds[run]) at += (size_t)n_cmds[run++];
        if (exec->element[i]->type == REDIS_REPLY_ERROR)
            log_error("job \"%s\": a result command failed (the others were applied): %s",
                      run < (size_t)n ? runs[run]->id : "?", exec->element[i]->str);
    }
    for (int i = 0; i < n && !rc; i++) {
        log_end(runs[i], !exists[i]);
        outcome[i] = exists[i] ? DG_COMMIT_ACKED : DG_COMMIT_WRITTEN;
    }
out:
    free_replies(rep, m);
    for (int i = queued; i < m; i++) dg_cmd_free(cmds[i]);
    free(cmds);
    free(rep);
    free(n_cmds);
    return rc;
}

/* The fast path: every result key is still WATCHed from when its job was taken, and was
 * absent then; if one has been written since, EXEC aborts and each run is tried alone. The
 * slow path looks first (look()). A result key that exists already (the job was done by a
 * worker that lost its lease, or the ack was lost) is only acknowledged. */
int dg_commit_write(dg_committer *c, dg_run **runs, int n, int *outcome, dg_cmd *then,
                    redisReply **then_reply) {
    int *exists = calloc((size_t)n, sizeof *exists);
    if (!exists) abort();
    int rc = 0, fast = 1;
    for (int i = 0; i < n; i++) {
        outcome[i] = DG_COMMIT_PENDING;
        fast &= runs[i]->watched == dg_commit_watch_epoch(c);
    }
    if (!fast) rc = look(c, runs, n, exists);
    /* the same job id twice in the batch (a producer's XADD retried after a lost reply, both
     * entries taken in one read and ended together): the first's result is written, the
     * others are only acknowledged, as if they had found it */
    for (int i = 1; i < n && !rc; i++)
        for (int j = 0; j < i && !exists[i]; j++)
            if (!exists[j] && !strcmp(runs[i]->id, runs[j]->id)) exists[i] = 1;
    if (!rc) rc = write_batch(c, runs, n, exists, outcome, then, then_reply);
    if (rc == ABORTED) {
        /* a result key changed between WATCH and EXEC: nothing was written; each run again
         * alone, with a fresh WATCH and look */
        rc = 0;
        for (int i = 0; i < n; i++) runs[i]->watched = 0;
        for (int i = 0; i < n && !rc; i++) rc = dg_commit_write(c, &runs[i], 1, &outcome[i], NULL, NULL);
    }
    free(exists);
    return rc;
}
