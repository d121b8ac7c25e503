/* A run: one job this worker holds, from the moment its stream entry is taken until its
 * result is written (commit.h) or it is given back (take.h). The engine's callbacks land
 * here and become commands queued on the run (events, image keys) and the progress of its
 * job hash; the worker writes them between steps. A run knows its job and the settings,
 * nothing of the worker's loop.
 *
 *   dg_run *r = dg_run_new(cfg, stream, entry);     // then fill id, job, deliveries
 *   dg_sink sink;
 *   dg_run_sink(r, &sink);
 *   dg_run_started(r);
 *   dg_sched_submit(sched, &r->job.req, &sink, &r->seq, ...);
 *   ... steps: r->out fills, dg_run_progress_cmd(r), dg_run_out_written(r, n) ...
 *   ... the engine ends it: r->ended, r->status ...
 *
 * Not thread-safe: runs belong to the worker's main thread. */
#ifndef DG_RUN_H
#define DG_RUN_H

#include <stdint.h>

#include "daemon_config.h"
#include "duogen.h"
#include "job.h"
#include "keys.h"
#include "redis.h"

/* One output image of a run. */
typedef struct {
    int      index, width, height;
    char     key[DG_KEY_MAX];  /* its Redis key, or "" when it went to a file */
    char    *path;         /* owned: the file it was written to (Job.image_output), or NULL */
    uint8_t *png;          /* owned; kept only for inline_images */
    size_t   png_len;
} dg_out_image;

/* One answer segment: text, or an image (index into images). */
typedef struct {
    int    image;          /* -1 for text */
    char  *text;           /* owned */
    size_t len, cap;
} dg_segment;

/* Where a held job is: the job hash's "phase" field, the STATUS= line, and the metrics'
 * label (dg_phase_name). WRITING: the engine is done with it and its result waits to be
 * written (through a Redis outage, as long as that lasts); the job hash never shows it. */
typedef enum {
    DG_PHASE_QUEUED, DG_PHASE_PREFILL, DG_PHASE_DECODE, DG_PHASE_DIFFUSION, DG_PHASE_WRITING, DG_PHASE_COUNT
} dg_phase;
const char *dg_phase_name(dg_phase p);

/* A job this worker holds: taken from a stream, maybe running in the engine, maybe ended
 * and waiting for its result to be written. */
typedef struct dg_run {
    struct dg_run *next;
    uint64_t serial;                 /* this process's number for the run: tells a lease
                                        reported lost from a later run of the same entry */
    const dg_daemon_config *cfg;     /* borrowed */
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

    /* progress, mirrored into prefix:job:<id> when dirty */
    dg_phase phase;
    int64_t  phase_ms;               /* dg_mono_ms() when the phase began */
    int64_t  progress_ms;            /* dg_mono_ms() of its last progress: a phase begun, a
                                        token, a denoising step */
    int      tokens, images, step, steps, max_tokens, dirty;
    int      steps_done;             /* denoising steps over all images */
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
    char     out_failed[1024];        /* an image could not be written (output_root): the run is
                                      * cancelled and ends as a passing failure with this */
    int      out_permanent;          /* out_failed names writes Redis will never take
                                        (dg_run_unstorable): the failure is for good
                                        (BAD_REQUEST, dead-lettered), not retried */
    int      unstorable;             /* times dg_run_unstorable() cut its output down */
    uint64_t final_seq;              /* the seq of its final event, kept across tries */
    int      lost_writes;            /* sends carrying its writes (events, images, its result)
                                        that lost the connection, in a row (refusals aside):
                                        from the first on they go alone, after a PING answered */
    uint64_t watched;                /* the watch epoch in which its result key was WATCHed
                                        and found absent (dg_commit_watch_epoch); 0: not */
    int      cancel_asked;           /* dg_sched_cancel() sent */
    int      lease_lost;             /* the entry went to another consumer, or was acknowledged
                                        by another attempt, before this run ended: it is
                                        cancelled and writes nothing more, no result either
                                        (dg_runs_fence) */
    int      expired;                /* the deadline passed while running */
    dg_usage usage;
    dg_timings timings;
    int      timed;                  /* the engine finished it and said its timings (a failed
                                        run's are not known: the rates leave it out) */
} dg_run;

/* A run of the entry `entry` of `stream`, taken now; the caller fills id, job and
 * deliveries. max_attempts and ttl_s start at the settings' defaults. Never NULL. */
dg_run *dg_run_new(const dg_daemon_config *cfg, const char *stream, const char *entry);
void    dg_run_free(dg_run *r);                           /* accepts NULL */
void    dg_run_sink(dg_run *r, dg_sink *sink);            /* callbacks into this run */
void    dg_run_started(dg_run *r);                        /* queues the started event */
/* Ends the run once (later calls do nothing): status is a Result status, err_code the
 * Error code when failed; fmt gives the error when failed, else the finish reason. */
void    dg_run_end(dg_run *r, int status, int err_code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* After its result was written (DG_COMMIT_WRITTEN): image files an earlier attempt left
 * beyond this one's are removed. */
void    dg_run_written(dg_run *r);
/* Sends that lost the connection each time they carried a run's writes: at this count, each
 * of the last ones sent alone on a connection that had just answered, they are writes Redis
 * never takes (a value over its proto-max-bulk-len closes the connection). */
#define DG_RUN_WRITES_LOST_MAX 3
/* The run's queued writes are ones Redis never takes (DG_RUN_WRITES_LOST_MAX): they are
 * dropped, and with them its pictures not yet stored (keys an earlier send may have set
 * are deleted), every picture's inline data and the dead letter's copy of the job when it
 * is the largest value; the text and the pictures stored stay (the second time, the text
 * and the copy go too). A running run is stopped (out_failed, for good); an ended one's
 * result becomes this failure (BAD_REQUEST, dead-lettered), or one that failed already
 * keeps its error, this said after it. `largest` and `total`: the largest value of its
 * writes and their sum, for the message. */
void    dg_run_unstorable(dg_run *r, size_t largest, size_t total);
/* The job hash update for the progress since the last one, or NULL when nothing moved.
 * The caller frees it. */
dg_cmd *dg_run_progress_cmd(dg_run *r);
void    dg_run_out_written(dg_run *r, int n);             /* frees the first n of r->out */
/* XADD prefix:events:<id> MAXLEN ~ events_maxlen * type <type> seq <n> <fields...> pb <ev>:
 * the next event of the run, numbered and stamped here; the readable fields come as
 * NULL-terminated name/value pairs. The caller frees it. */
dg_cmd *dg_run_event_cmd(dg_run *r, Duogen__V1__Event *ev, const char *type, ...)
    __attribute__((sentinel));

/* The runs a worker holds: a list, newest first. */
typedef struct {
    dg_run *first;                   /* owned */
    int     n;
} dg_runs;

dg_run *dg_runs_find(const dg_runs *l, const char *stream, const char *entry);
void    dg_runs_add(dg_runs *l, dg_run *r);               /* the list owns r from now on */
void    dg_runs_drop(dg_runs *l, dg_run *r);              /* unlinks r and frees it */
void    dg_runs_free(dg_runs *l);                         /* every run; the list is empty after */
int     dg_runs_stepping(const dg_runs *l);               /* 1 if the engine runs one of them */
/* The runs named by (entry, serial) whose lease the keeper found lost: each that has not
 * ended is cancelled in the engine, its queued writes are dropped, and from now on it
 * writes nothing (no event, image, progress or result): the attempt that holds the entry
 * now owns the job's keys. One that ended to be retried is not given back (dg_take_release
 * would write "retrying" into the job hash). A run that has ended otherwise keeps its
 * result: committed under the result key's WATCH, it is still the job's one result if it
 * comes first. Returns how many runs were fenced. */
int dg_runs_fence(dg_runs *l, dg_sched *sched, const char *stream, const char *entry, uint64_t serial);

/* Running jobs that must stop are cancelled in the engine and end at their next step: past
 * its deadline (unix ms) as `expired`; with an image that could not be written (out_failed)
 * as a passing failure, left pending for another attempt. */
void    dg_runs_cancel_due(dg_runs *l, dg_sched *sched, int64_t now_ms);

#endif
