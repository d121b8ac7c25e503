/* Taking jobs: the start of a job's path. Which commands the worker sends to get stream
 * entries is decided by one pure function over plain facts (dg_take_decide: no I/O, no
 * clock), so the policy lives in one place and a test can read it; the effects run the
 * plan against Redis and turn each entry into a run, or into no run:
 *
 *   - an entry deleted while pending: acknowledged, counted lost;
 *   - a job whose result exists: acknowledged without running (dg_commit_skip);
 *   - a bad job (malformed, over a limit, an image that is not one), or one delivered more
 *     than max_attempts times: ended at once as failed, dead-lettered when committed;
 *   - a cancelled or expired job: ended at once;
 *   - else its images are fetched (job.h) and it is submitted to the engine.
 *
 *   dg_take_facts f = dg_take_facts_now(&taker, connected, draining, room);
 *   dg_take_plan p = dg_take_decide(&f);
 *   dg_take_report rep = {0};
 *   if (dg_take_run(&taker, &p, NULL, &rep)) ... Redis went away
 *
 * The effects use the main thread's connection and the worker's runs; not thread-safe. */
#ifndef DG_TAKE_H
#define DG_TAKE_H

#include <stdint.h>

#include "commit.h"
#include "daemon_config.h"
#include "duogen.h"
#include "keys.h"
#include "redis.h"
#include "run.h"

/* ---- the decision ------------------------------------------------------------------------ */

/* What the decision looks at. */
typedef struct {
    int connected;          /* the main connection is up */
    int groups_ok;          /* the consumer groups are known to exist */
    int own_pending;        /* our own pending list may hold entries (an earlier life of this
                               consumer, a broken connection): they go before new ones */
    int reaper_due;         /* reaper_ms has passed since the last XAUTOCLAIM */
    int draining;           /* stopping: no new jobs */
    int room;               /* free slots: max_inflight minus the runs held (may be < 0) */
    int held;               /* runs held; while one is, a read never blocks */
    int block_ms;           /* how long a read waits for new entries when idle */
    const char *high, *normal;   /* the job streams */
} dg_take_facts;

typedef enum {
    DG_TAKE_GROUPS,         /* XGROUP CREATE <stream> <group> 0 MKSTREAM on each stream */
    DG_TAKE_OWN,            /* XPENDING ... <consumer>, XCLAIM ... 0: our own pending entries */
    DG_TAKE_REAP,           /* XAUTOCLAIM ... claim_idle_ms: entries idle too long elsewhere */
    DG_TAKE_READ,           /* XREADGROUP ... STREAMS ... >: new entries */
} dg_take_source;

/* One command of a plan. OWN and REAP steps name one stream; a READ step reads its streams
 * in one XREADGROUP, in the order given, and COUNT applies to each of them (so more than
 * `count` may come back: all of it runs). */
typedef struct {
    dg_take_source source;
    const char *streams[2];  /* borrowed from the facts */
    int  n_streams;
    int  count;              /* COUNT: entries to take at most (none for GROUPS) */
    int  block_ms;           /* READ: BLOCK; 0: answer at once */
} dg_take_step;

#define DG_TAKE_STEPS_MAX 3

/* The steps run in order. A step's COUNT is lowered by the entries the earlier steps of the
 * plan took, and a step with no count left ends the plan; GROUPS steps take nothing, and a
 * failed GROUPS step ends the plan. */
typedef struct {
    int n_steps;             /* 0: take nothing now */
    dg_take_step steps[DG_TAKE_STEPS_MAX];
} dg_take_plan;

/* The policy. Nothing while disconnected. The consumer groups first when they are not known
 * to exist (our own pending list is looked at after making them). Then, with room and not
 * draining, exactly one source: our own pending entries (high stream, then normal), else
 * the reaper when due (high, then normal), else new entries of both streams in one read
 * that blocks only while nothing is held. */
dg_take_plan dg_take_decide(const dg_take_facts *f);

/* ---- the effects ------------------------------------------------------------------------- */

typedef struct {
    dg_redis *redis;                 /* borrowed: the worker's main connection */
    const dg_daemon_config *cfg;     /* borrowed */
    const dg_keys *keys;             /* borrowed */
    dg_sched *sched;                 /* borrowed: runs are submitted here */
    dg_committer *commit;            /* borrowed: acknowledges entries that need no run */
    dg_runs *held;                   /* borrowed: the worker's runs; taken ones join it */
    /* what taking remembers between plans: the facts it owns */
    int groups_ok;
    int own_pending;
    int64_t next_reaper_ms;          /* monotonic */
} dg_taker;

/* What a plan's effects tell the worker (added up over calls by the caller). */
typedef struct {
    int64_t lost;            /* pending entries found deleted before they ran */
    int64_t skipped;         /* entries whose job already had a result: acknowledged only */
    int refused;             /* Redis refused this worker (NOPERM): configuration */
    int engine_failed;       /* the engine failed for good: restart the process */
} dg_take_report;

void dg_take_init(dg_taker *t, dg_redis *redis, const dg_daemon_config *cfg, const dg_keys *keys,
                  dg_sched *sched, dg_committer *commit, dg_runs *held);

/* The facts now: the taker's own, the settings', the clock's, and the caller's. */
dg_take_facts dg_take_facts_now(const dg_taker *t, int connected, int draining, int room);

/* Runs the plan. `read` is the reply of the plan's first step, a READ, when the caller sent
 * dg_take_read_cmd() along another round trip; NULL: every step sends its own command.
 * Returns 0, or -1 when Redis went away (entries not yet taken stay pending). */
int dg_take_run(dg_taker *t, const dg_take_plan *p, const redisReply *read, dg_take_report *out);

/* The XREADGROUP of a READ step, to send along another round trip. The caller frees it. */
dg_cmd *dg_take_read_cmd(const dg_taker *t, const dg_take_step *s);

/* Gives back the held runs that ended with a passing failure (r->retry): no result is
 * written; the job hash says "retrying", and the entry stays pending, its lease lapses, and
 * a reaper (this worker's or another's) delivers it again. */
void dg_take_release(dg_taker *t);

#endif
