/* The worker: one thread owns the engine and a Redis connection and runs the main loop
 * (worker.c: take -> engine step -> progress -> commit). A keeper thread with its own
 * connection refreshes the heartbeat hash and the leases (XCLAIM JUSTID) of running jobs,
 * and trims the job streams; a metrics thread serves Prometheus text. Both read what the
 * main thread publishes in `stats` and `leases` under `lock`, and the worker calls them only
 * to start and stop them. See docs/DESIGN.md §3 and §6b. */
#ifndef DG_WORKER_H
#define DG_WORKER_H

#include <pthread.h>
#include <signal.h>
#include <stdint.h>

#include "commit.h"
#include "daemon_config.h"
#include "duogen.h"
#include "keys.h"
#include "redis.h"
#include "run.h"
#include "take.h"

/* Counters shared with the keeper thread (under w->lock). */
typedef struct {
    int64_t jobs_done, jobs_failed, jobs_cancelled, jobs_expired, jobs_dead, jobs_skipped;
    int64_t tokens, images, steps, entries_lost;
    int64_t timed_tokens, timed_steps;   /* of the runs whose engine timings are known
                                            (dg_run.timed): over decode_s and diffusion_s
                                            they are the rates */
    int64_t leases_lost;             /* runs stopped because another attempt took their entry */
    int64_t started_ms;
    /* seconds spent per phase over ended jobs, and how many jobs they cover: queue and total
     * over every job that ran (timed_jobs), the engine's phases over those it finished and
     * timed (engine_timed_jobs: a failed run's engine times are not known) */
    double  queue_s, prefill_s, decode_s, vision_s, diffusion_s, vae_s, total_s;
    int64_t timed_jobs, engine_timed_jobs;
    dg_cache_stats cache;            /* the scheduler's, copied by the main thread */
    int64_t draft_tokens, draft_kept;    /* drafted tokens fed and kept (dg_sched_draft_stats) */
    int64_t screened, unscreened;        /* greedy tokens from the logit screen's bounds, and
                                            not (dg_sched_screen_stats) */
    int64_t queue_lag[2], queue_pending[2];  /* of the high [0] and normal [1] job stream, read
                                                by the keeper; -1 unknown */
    int     redis_up;
    int     redis_evicts;            /* 1: Redis's maxmemory-policy is not noeviction; 0: it is;
                                        -1: not known (not connected yet, or INFO refused) */
    char    state[32];               /* loading, idle, running, draining, stopped */
    char    jobs[512];               /* ids of running jobs, space-separated */
    /* per phase, when the held job longest in that phase entered it (dg_mono_ms; 0: none):
     * the metrics thread turns it into an age at each scrape, so a main loop that hangs
     * shows as a phase that never ends */
    int64_t phase_since_ms[DG_PHASE_COUNT];
    int64_t progress_since_ms[DG_PHASE_COUNT];   /* the held job in the phase longest without
                                                    progress: its last progress (0: none) */
} dg_worker_stats;

/* A held entry whose lease the keeper renews, and the run holding it. */
typedef struct {
    char stream[DG_KEY_MAX];
    char entry[64];
    uint64_t serial;                 /* dg_run.serial */
} dg_lease;

/* exit codes (sysexits.h's, which systemd's units name) */
#define EX_TEMPFAIL 75   /* the engine failed: restart me */
#define EX_CONFIG   78   /* configuration or permissions: restarting will not help */

typedef struct dg_worker {
    dg_daemon_config *cfg;           /* borrowed */
    dg_model  *model;                /* borrowed */
    dg_sched  *sched;                /* owned */
    dg_redis   redis;                /* the main thread's connection */
    volatile sig_atomic_t *stop;     /* set by SIGTERM/SIGINT; 2 = stop now */
    dg_keys    keys;

    dg_runs      runs;               /* owned: the jobs held */
    dg_taker     taker;              /* takes entries into runs */
    dg_committer committer;          /* writes their results */
    int     fatal;                   /* exit code to leave with, 0 while healthy */
    uint64_t evict_checked;          /* redis.connects when the eviction policy was read */
    int     redis_evicts;            /* as stats.redis_evicts, the main thread's */
    char    evict_policy[64];        /* the policy last said, so a reconnect repeats nothing */
    char    instance[24];            /* this process's own: random at start, in the heartbeat hash */
    char    host[64];
    _Atomic int id_clash;            /* set by the keeper: another process holds this worker id's lease */
    _Atomic int unchecked;           /* Redis was away at start: its rights and this worker id's
                                        lease are checked once it answers, before any job (the
                                        keeper does not beat meanwhile: the lease is not ours yet) */

    pthread_mutex_t lock;            /* guards stats, leases and lost */
    dg_worker_stats stats;
    dg_lease *leases;  int n_leases, cap_leases;
    dg_lease *lost;    int n_lost, cap_lost;     /* leases the keeper found lost, for the main
                                                    thread to fence (dg_runs_fence) */
    pthread_t keeper;
    int       keeper_running;
    int       reads_lost;            /* reads of jobs that lost the connection in a row */
    int       renewals_refused;      /* the keeper's: rounds of renewals Redis refused in a row */
    _Atomic int keeper_stop;     /* set by the main thread, read by the keeper and metrics threads */
    int       metrics_fd;            /* listening socket, -1 when off */
    pthread_t metrics;
} dg_worker;

/* worker.c. dg_worker_prepare() first, before the model loads: enough for the metrics
 * thread (state "loading"), and the Redis URL parsed and the password file read (-1 with
 * err when they are wrong); dg_worker_init() with the model. The worker must not move
 * after prepare (its parts point into it); dg_worker_free() after either. */
int  dg_worker_prepare(dg_worker *w, dg_daemon_config *cfg, volatile sig_atomic_t *stop, char *err, size_t errlen);
int  dg_worker_init(dg_worker *w, dg_model *model, char *err, size_t errlen);
void dg_worker_state(dg_worker *w, const char *state);   /* the heartbeat's and metrics' state */
int  dg_worker_run(dg_worker *w);     /* returns the process exit code */
void dg_worker_free(dg_worker *w);

/* metrics.c: Prometheus text format on metrics_address:metrics_port, from dg_worker_prepare() on
 * (a loading worker answers, duogen_worker_ready 0; a port that cannot be bound fails the
 * start, not a ready worker). dg_metrics_stop() accepts a worker whose metrics are off. */
int  dg_metrics_start(dg_worker *w, char *err, size_t errlen);
void dg_metrics_stop(dg_worker *w);

/* keeper.c */
int  dg_keeper_start(dg_worker *w, char *err, size_t errlen);
void dg_keeper_stop(dg_worker *w);
/* Before the first job: takes this worker id's lease (keeper.c), waiting for another
 * process's to lapse; 0 to go on, EX_CONFIG (78) when that one keeps renewing it or Redis
 * refuses the lease's commands, said in the log. With Redis away, 0 and w->unchecked set:
 * the caller takes no job until a later call, Redis answering, finds the lease ours. */
int  dg_worker_id_check(dg_worker *w);

#endif
