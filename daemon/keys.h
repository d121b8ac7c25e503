/* Every Redis key and stream name of the protocol (README "Redis keys"), built in this one
 * place from the configured prefix:
 *
 *   prefix:jobs:high, prefix:jobs     the job streams, high priority first
 *   prefix:job:<id>                   the job hash: state, progress
 *   prefix:events:<id>                the job's event stream
 *   prefix:image:<id>:<n>             its n-th generated image, PNG
 *   prefix:result:<id>                its result hash
 *   prefix:cancel:<id>                set by a producer: stop the job
 *   prefix:done, prefix:dead          finished jobs, dead letters
 *   prefix:worker:<worker id>         a worker's heartbeat hash
 *
 * Every out buffer holds DG_KEY_MAX bytes. The longest name fits with room to spare: a
 * prefix is at most 127 bytes, a worker id 255 and a job id 159 ("entry-" and a stream
 * entry id when the job names none). */
#ifndef DG_KEYS_H
#define DG_KEYS_H

#define DG_KEY_MAX 400

/* The names that do not depend on a job, built once per worker. */
typedef struct {
    char streams[2][DG_KEY_MAX];   /* the job streams, high priority first */
    char done[DG_KEY_MAX];
    char dead[DG_KEY_MAX];
    char worker[DG_KEY_MAX];       /* this worker's heartbeat hash */
} dg_keys;

void dg_keys_init(dg_keys *k, const char *prefix, const char *worker_id);

/* The keys of job `id`. */
void dg_key_job(char *out, const char *prefix, const char *id);
void dg_key_events(char *out, const char *prefix, const char *id);
void dg_key_result(char *out, const char *prefix, const char *id);
void dg_key_cancel(char *out, const char *prefix, const char *id);
void dg_key_worker(char *out, const char *prefix, const char *worker_id);   /* its heartbeat hash */
void dg_key_image(char *out, const char *prefix, const char *id, int index);
/* "<stream>:taken": a job stream's entries taken and not yet acknowledged, entry id -> job
 * id, so that an entry deleted (MAXLEN, XDEL) before an attempt finished still gets its job
 * a result */
void dg_key_taken(char *out, const char *stream);

#endif
