/* Committing: the end of a job's path. An ended run's result hash, job hash, final event,
 * done entry (and dead letter) and the XACK of its stream entry are written together in
 * one MULTI/EXEC, with the result key WATCHed: the visible result is exactly once (README
 * "Guarantees"). This file is the one place in the daemon that acknowledges an entry.
 *
 *   dg_committer c;
 *   dg_commit_init(&c, &redis, cfg, &keys);
 *   ... take: WATCH result key, EXISTS -> absent: r->watched = dg_commit_watch_epoch(&c) ...
 *   int outcome[n];
 *   if (dg_commit_write(&c, ended, n, outcome, NULL, NULL) == -2) ... refused: exit 78
 *   ... each run with outcome[i] != DG_COMMIT_PENDING is done with: free it ...
 *
 * Every call uses the main thread's connection; not thread-safe. */
#ifndef DG_COMMIT_H
#define DG_COMMIT_H

#include <stdint.h>

#include "daemon_config.h"
#include "keys.h"
#include "redis.h"
#include "run.h"

typedef struct {
    dg_redis *redis;                 /* borrowed: the worker's main connection */
    const dg_daemon_config *cfg;     /* borrowed */
    const dg_keys *keys;             /* borrowed */
    uint64_t execs;                  /* EXEC/UNWATCH sent on redis: each forgets every WATCH */
} dg_committer;

/* What became of one run of a dg_commit_write() batch. */
enum {
    DG_COMMIT_PENDING = 0,           /* nothing yet: try again later */
    DG_COMMIT_WRITTEN,               /* its result is written and its entry acknowledged */
    DG_COMMIT_ACKED,                 /* a result existed already: only acknowledged */
};

void dg_commit_init(dg_committer *c, dg_redis *redis, const dg_daemon_config *cfg, const dg_keys *keys);

/* WATCHes of the connection hold until an EXEC, an UNWATCH or a reconnect: the epoch names
 * the span in which a WATCH sent now still stands (never 0). A run whose result key was
 * WATCHed and found absent records it in r->watched; dg_commit_write() then needs no second
 * look while the span lasts. */
uint64_t dg_commit_watch_epoch(const dg_committer *c);

/* The XACK alone of an entry deleted while pending, its field left in the stream's taken
 * index (keys.h) for the sweep that answers its job (take.c). Returns 0, or -1 when Redis
 * went away. */
int dg_commit_xack(dg_committer *c, const char *stream, const char *entry);

/* An entry whose job already has a result (its ack was lost, or a producer sent the same id
 * twice): the job hash gets back the result's state and the entry is acknowledged; nothing
 * else is written. Returns 0, or -1 when Redis went away (the entry stays pending). */
int dg_commit_skip(dg_committer *c, const dg_run *r);

/* The size of the ended run's Result message as it would be written now (the largest value
 * of its transaction: it holds the text and the inline pictures). */
size_t dg_commit_result_size(const dg_committer *c, dg_run *r);

/* Writes the results of n ended runs (none of them `retry`), each exactly once: what they
 * still have queued (events, images) goes first; a run whose result key exists already is
 * only acknowledged. outcome[i] tells what became of runs[i]. When `then` is given it is
 * sent in the same round trip after the EXEC, and its reply (the caller frees it) comes
 * back in *then_reply unless Redis went away. Returns 0, -1 when Redis went away, -2 when
 * it refused a command (the worker's ACL: fatal). */
int dg_commit_write(dg_committer *c, dg_run **runs, int n, int *outcome, dg_cmd *then,
                    redisReply **then_reply);

#endif
