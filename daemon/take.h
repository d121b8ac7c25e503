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
    int groups_wait;        /* their creation failed a moment ago: not tried again yet */
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

/* One command of a plan. OWN, REAP and READ steps name one stream and take at most COUNT
 * entries of it. The one step over both streams is the idle wait: a READ of the high and
 * the normal stream with COUNT 1 and BLOCK, which wakes the worker for a job on either;
 * should it return one of each (both arrived at once), the high one runs and the normal one
 * is parked (dg_take_park_normal): left pending, not run, until an OWN step of the normal
 * stream takes it. */
typedef struct {
    dg_take_source source;
    const char *streams[2];  /* borrowed from the facts */
    int  n_streams;
    int  count;              /* COUNT: entries to take at most (none for GROUPS) */
    int  block_ms;           /* READ: BLOCK; 0: answer at once */
} dg_take_step;

#define DG_TAKE_STEPS_MAX 8
#define DG_TAKE_RELEASED_MAX 4096   /* entries given back remembered at once (dg_taker) */
/* How the job hash's note of a run given back at a stop ends (worker.c give_back_at_stop).
 * It is written before the give-back, uncounted: a delivery given up later that reads it
 * as the last error knows a delivery after it counted (the give-back never came: the
 * worker died between the two, or Redis did not take it; or the next delivery's worker
 * died before it marked the job), and says so (its dead letter said "not counted" alone). */
#define DG_TAKE_NOT_COUNTED ", this attempt not counted"

/* The steps run in order; dg_take_step_count() says with which COUNT, and a step with no
 * count left ends the plan. GROUPS steps take nothing, and a failed GROUPS step ends the
 * plan. */
typedef struct {
    int n_steps;             /* 0: take nothing now */
    dg_take_step steps[DG_TAKE_STEPS_MAX];
} dg_take_plan;

/* The policy. Nothing while disconnected. The consumer groups first when they are not known
 * to exist (our own pending list is looked at after making them). Then, with room and not
 * draining, every source of the high stream before any of the normal stream, each with
 * COUNT room: our own pending entries (when they may exist), the reaper's XAUTOCLAIM (when
 * due), new entries; then the same three of the normal stream. Since each step's COUNT is
 * the room the steps before it left, a normal entry is taken only when the high stream's
 * sources left room, that is when they held no more entries than they returned. Last, while
 * nothing is held, the idle wait (see dg_take_step). */
dg_take_plan dg_take_decide(const dg_take_facts *f);

/* The COUNT of step `s` of a plan whose earlier steps took `taken` entries: its count less
 * what was taken; the idle wait only when nothing was. 0: the plan ends before this step. */
int dg_take_step_count(const dg_take_step *s, int taken);

/* In the idle wait's reply, whether the normal stream's entry must be parked: when the high
 * stream returned `high_got` entries, as many as the COUNT, it may hold more. */
int dg_take_park_normal(const dg_take_step *s, int high_got);

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
    int groups_failures;             /* XGROUP CREATE refused in a row (WRONGTYPE: a key that
                                        is not a stream), tried again after a doubling wait */
    int64_t groups_retry_ms;         /* monotonic: not before then */
    int input_failures;              /* jobs in a row whose input images this worker could not
                                        read (DG_JOB_WORKER: its image_root, its ACL, I/O) */
    int64_t input_retry_ms;          /* monotonic: no job is taken before then (a doubling wait
                                        from 250 ms to 30 s): a worker that cannot read inputs
                                        does not pull the backlog through its pending list */
    int own_pending;                 /* kept set while an OWN step of a plan did not run, or
                                        an entry is parked; set by a new connection (a read
                                        whose reply was lost left its entries pending) */
    uint64_t connects_seen;          /* redis->connects when own_pending last looked */
    int64_t next_reaper_ms;          /* monotonic; moves on once every REAP step of a plan ran:
                                        by reaper_ms (sooner when an entry given back is due),
                                        or not at all when a step filled the room (reap_more) */
    int reap_more;                   /* a REAP step of this plan filled its COUNT (the room):
                                        more may be idle, looked at in the next plan */
    int64_t reap_hold_until;         /* monotonic: the reaper waits after a (re)connect */
    char reap_cursor[2][64];         /* where the reaper's next XAUTOCLAIM of the high [0] /
                                        normal [1] stream starts ("" = 0-0) */
    /* entries given back for a later attempt (dg_take_release, a retryable refusal at
     * submit): they stay in our pending list, and our own-pending step leaves them alone
     * until claim_idle_ms has passed (a reaper's XAUTOCLAIM, ours or another worker's, then
     * delivers them again: the back-off). Kept until a run takes the entry or our whole
     * pending list no longer holds it (DG_TAKE_RELEASED_MAX at most): an own entry
     * delivered in this life and not in this list was never run (its read's reply was
     * lost) and is claimed without counting a delivery. */
    struct dg_released {
        char stream[DG_KEY_MAX], entry[64];
        int64_t until_ms;
        int deliveries;   /* the count the run that gave it back had */
    } *released;
    int n_released, cap_released;
    int64_t life_start_ms;           /* dg_mono_ms() at init: an own pending entry idle for
                                        longer was delivered to an earlier life of this
                                        consumer (which ran it, and maybe crashed): it counts */
    int retake;                      /* an entry came back to us while its fenced run was
                                        still ending: our own list is to be looked at again */
    /* the sweep of the streams' taken indexes (keys.h dg_key_taken): where the next HSCAN
     * of each starts, when the next sweep is due, and the entries found lost once, failed
     * only when still lost a while later (a run's heartbeat lists its job within a beat) */
    char sweep_cursor[2][32];
    int64_t next_sweep_ms;
    struct dg_lost_seen { char stream[DG_KEY_MAX]; char entry[64]; int64_t since_ms; } lost_seen[64];
    int n_lost_seen;
    char parked[64];                 /* the entry of the normal stream the idle wait parked
                                        (pending, not run; its delivery count set back to 0),
                                        "" when none: the idle wait's COUNT 1 parks at most
                                        one, and runs only when the plan before it, whose
                                        OWN step of the normal stream takes a parked entry,
                                        took nothing */
} dg_taker;

/* What a plan's effects tell the worker (added up over calls by the caller). */
typedef struct {
    int64_t lost;            /* pending entries found deleted before they ran */
    int64_t skipped;         /* entries whose job already had a result: acknowledged only */
    int refused;             /* Redis refused this worker (NOPERM): configuration */
    int engine_failed;       /* the engine failed for good: restart the process */
    char engine_error[1024]; /* with engine_failed: its message */
} dg_take_report;

void dg_take_init(dg_taker *t, dg_redis *redis, const dg_daemon_config *cfg, const dg_keys *keys,
                  dg_sched *sched, dg_committer *commit, dg_runs *held);
void dg_take_free(dg_taker *t);

/* The facts now: the taker's own, the settings', the clock's, and the caller's. */
dg_take_facts dg_take_facts_now(dg_taker *t, int connected, int draining, int room);

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
