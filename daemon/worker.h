/* The worker: one thread owns the engine and a Redis connection; it takes jobs from the
 * job streams through the consumer group, steps the engine, writes events between steps,
 * and writes each result together with the acknowledgement in one MULTI/EXEC. A keeper
 * thread with its own connection refreshes the heartbeat hash and the leases (XCLAIM
 * JUSTID) of running jobs, and trims the job streams. See DESIGN.md §3 and §6b. */
#ifndef DG_WORKER_H
#define DG_WORKER_H

#include <pthread.h>
#include <signal.h>
#include <stdint.h>

#include "daemon_config.h"
#include "duogen.h"
#include "job.h"
#include "redis.h"

#define DG_KEY_MAX 400

typedef struct dg_worker dg_worker;

/* One output image of a run. */
typedef struct {
    int      index, width, height;
    char     key[DG_KEY_MAX];
    uint8_t *png;          /* owned; kept only for inline_images */
    size_t   png_len;
} dg_out_image;

/* One answer segment: text, or an image (index into images). */
typedef struct {
    int    image;          /* -1 for text */
    char  *text;           /* owned */
    size_t len, cap;
} dg_segment;

/* A job this worker holds: taken from a stream, maybe running in the engine, maybe ended
 * and waiting for its result to be written. */
typedef struct dg_run {
    struct dg_run *next;
    dg_worker *w;                    /* borrowed */
    char     stream[DG_KEY_MAX];     /* the job stream it came from */
    char     entry[64];              /* its stream entry id */
    char     id[160];                /* job id: names its keys */
    uint8_t *job_bytes;              /* owned: the `job` field as received */
    size_t   job_len;
    int      parsed;                 /* job.pb is valid */
    dg_job   job;
    int      deliveries;             /* delivery count of this entry, this one included */
    int      max_attempts, ttl_s;
    int64_t  enqueued_ms, taken_ms, started_mono_ms;

    uint64_t seq;                    /* engine sequence, when submitted */
    int      submitted;

    /* progress, mirrored into duogen:job:<id> when dirty */
    const char *phase;
    int      tokens, images, step, steps, max_tokens, dirty;
    int      steps_done;                 /* denoising steps over all images */
    uint64_t event_seq;
    dg_cmd **out;                    /* owned: commands not yet written (events, images) */
    int      n_out, cap_out;

    /* the answer */
    dg_segment   *segs;  int n_segs, cap_segs;
    dg_out_image *imgs;  int n_imgs, cap_imgs;
    char   *md;   size_t md_len, md_cap;      /* Markdown with image links */

    /* the end */
    int      ended;
    int      status;                 /* Duogen__V1__Result__Status */
    int      err_code;               /* Duogen__V1__Error__Code when failed */
    char     error[1024];
    char     finish[16];             /* stop, length, cancelled, deadline */
    int      dead;                   /* also copy the job to the dead-letter stream */
    int      retry;                  /* a passing failure: no result; left pending for later */
    uint64_t watched;                /* the watch epoch in which its result key was WATCHed
                                        and found absent; 0: not watched */
    int      cancel_asked;           /* dg_sched_cancel() sent */
    int      expired;                /* the deadline passed while running */
    dg_usage usage;
    dg_timings timings;
} dg_run;

/* Counters shared with the keeper thread (under w->lock). */
typedef struct {
    int64_t jobs_done, jobs_failed, jobs_cancelled, jobs_expired, jobs_dead, jobs_skipped;
    int64_t tokens, images, steps, entries_lost;
    int64_t started_ms;
    /* seconds spent per phase over all finished jobs, and how many jobs they cover */
    double  queue_s, prefill_s, decode_s, vision_s, diffusion_s, vae_s, total_s;
    int64_t timed_jobs;
    dg_cache_stats cache;            /* the scheduler's, copied by the main thread */
    int64_t queue_lag, queue_pending;    /* of the job stream, read by the keeper; -1 unknown */
    int     redis_up;
    char    state[32];               /* loading, idle, running, draining, stopped */
    char    jobs[512];               /* ids of running jobs, space-separated */
} dg_worker_stats;

/* A held entry whose lease the keeper renews. */
typedef struct {
    char stream[DG_KEY_MAX];
    char entry[64];
} dg_lease;

struct dg_worker {
    dg_daemon_config *cfg;                  /* borrowed */
    dg_model  *model;                /* borrowed */
    dg_sched  *sched;                /* owned */
    dg_redis   redis;                /* the main thread's connection */
    volatile sig_atomic_t *stop;     /* set by SIGTERM/SIGINT; 2 = stop now */

    char streams[2][DG_KEY_MAX];     /* high priority first */
    char k_done[DG_KEY_MAX], k_dead[DG_KEY_MAX], k_worker[DG_KEY_MAX];

    dg_run *runs;                    /* owned list */
    int     n_runs;
    int     drain_own;               /* read our own pending entries before new ones */
    int     groups_ok;               /* consumer groups exist on this connection */
    uint64_t execs;                  /* EXEC/UNWATCH sent on w->redis: each forgets every WATCH */
    int64_t next_reaper_ms;
    int     fatal;                   /* exit code to leave with, 0 while healthy */

    pthread_mutex_t lock;            /* guards stats and leases */
    dg_worker_stats stats;
    dg_lease *leases;  int n_leases, cap_leases;
    pthread_t keeper;
    int       keeper_running;
    volatile int keeper_stop;
    int       metrics_fd;            /* listening socket, -1 when off */
    pthread_t metrics;
};

/* Key helpers. */
void dg_key(const dg_worker *w, char *out, const char *kind, const char *id);   /* prefix:kind:id */

/* worker.c */
int  dg_worker_init(dg_worker *w, dg_daemon_config *cfg, dg_model *model, volatile sig_atomic_t *stop,
                    char *err, size_t errlen);
int  dg_worker_run(dg_worker *w);     /* returns the process exit code */
void dg_worker_free(dg_worker *w);

/* run.c: a run's life */
dg_run *dg_run_new(dg_worker *w, const char *stream, const char *entry);
void    dg_run_free(dg_run *r);
void    dg_run_sink(dg_run *r, dg_sink *sink);            /* callbacks into this run */
void    dg_run_started(dg_run *r);                        /* queues the started event */
void    dg_run_end(dg_run *r, int status, int err_code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* The job hash update for the progress since the last one, or NULL when nothing moved. */
dg_cmd *dg_run_progress_cmd(dg_run *r);
void    dg_run_out_written(dg_run *r, int n);            /* frees the first n of r->out */
/* The result transaction's commands for one run (without MULTI/EXEC); returns how many. */
#define DG_RESULT_CMDS_MAX 9
int     dg_run_result_cmds(dg_run *r, dg_cmd **cmds);

/* metrics.c: Prometheus text format on 127.0.0.1:metrics_port */
int  dg_metrics_start(dg_worker *w, char *err, size_t errlen);
void dg_metrics_stop(dg_worker *w);

/* keeper.c */
int  dg_keeper_start(dg_worker *w, char *err, size_t errlen);
void dg_keeper_stop(dg_worker *w);

#endif
