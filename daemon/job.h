/* A job as the engine sees it: the protobuf Job decoded, validated against the worker's
 * limits, its images fetched, and turned into a dg_request that points into it. */
#ifndef DG_JOB_H
#define DG_JOB_H

#include <stddef.h>
#include <stdint.h>

#include "daemon_config.h"
#include "duogen.h"
#include "duogen.pb-c.h"
#include "redis.h"

/* What went wrong with a job, as the Error.Code of the protocol. */
typedef enum {
    DG_JOB_OK = 0,
    DG_JOB_BAD_REQUEST = DUOGEN__V1__ERROR__CODE__BAD_REQUEST,
    DG_JOB_BAD_IMAGE = DUOGEN__V1__ERROR__CODE__BAD_IMAGE,
    DG_JOB_UNAVAILABLE = DUOGEN__V1__ERROR__CODE__UNAVAILABLE,
    DG_JOB_RETRY = -1,    /* Redis went away while fetching: try again later */
    DG_JOB_WORKER = -2,   /* this worker cannot read the job's images now (its image_root, its
                             ACL, an I/O error): not the job's fault; left pending for a later
                             attempt, here or on another worker, the error noted */
} dg_job_status;

typedef struct {
    Duogen__V1__Job *pb;          /* owned: protobuf_c unpacked */
    dg_request       req;         /* points into pb and the arrays below */
    dg_message      *messages;    /* owned, req.n_messages */
    dg_part         *parts;       /* owned, all parts of all messages */
    const char     **stop;        /* owned array, strings borrowed from pb */
    dg_logit_bias   *bias;        /* owned */
    dg_kv           *meta;        /* owned array, strings borrowed from pb */
    uint8_t        **fetched;     /* owned image bytes read from redis_key / path */
    int              n_fetched;
} dg_job;

/* 1 if id is a usable job id: 1..DG_JOB_ID_MAX bytes of [A-Za-z0-9._:-]. */
#define DG_JOB_ID_MAX 128
int dg_job_id_valid(const char *id, size_t len);
/* s rewritten in place as valid UTF-8: each byte that is not part of a valid sequence (a
 * character cut by a bound, bytes a producer sent raw) becomes '?'. Every message that
 * reaches a result is, so that protobuf and JSON readers can read it. */
void dg_utf8_scrub(char *s);

/* The offset of the first byte of s[0..n) that is not part of valid UTF-8, or -1. */
long dg_utf8_invalid_at(const char *s, size_t n);
/* s quoted into out (cap bytes): at most cap - 1 bytes, cut at a character's start with
 * "..." when longer, scrubbed; returns out. For names a message quotes (keys, paths, ids)
 * that must not crowd out the reason after them. */
const char *dg_clip(const char *s, char *out, size_t cap);
/* 1 if the job's drawn images go to files under cfg->output_root (Job.image_output FILES, or
 * the default on a worker that has an output_root), 0 for Redis keys. pb may be NULL. */
int dg_job_images_to_files(const Duogen__V1__Job *pb, const dg_daemon_config *cfg);

/* Decodes and validates. On failure returns the error code and a message naming the
 * field at fault ("messages[0].parts[2].image: 31457280 bytes, over max_image_bytes"). */
dg_job_status dg_job_parse(dg_job *j, const uint8_t *data, size_t len, const dg_daemon_config *cfg,
                           char *err, size_t errlen);

/* A job's own limits and id read off its wire bytes without unpacking them (a walk of the
 * top-level fields, the last occurrence winning as in protobuf): a job that kills the worker
 * while dg_job_parse() reads it is given up by these, under its own id and TTL. Fields
 * absent, or all of them when the bytes do not walk to their end: 0 and NULL. Values are
 * as sent, not validated. */
#define DG_JOB_MAX_ATTEMPTS 100
/* metadata: echoed into the job hash as meta.<key> fields (its readers decode UTF-8) */
#define DG_JOB_MAX_METADATA       64
#define DG_JOB_MAX_META_KEY_BYTES 128
#define DG_JOB_MAX_META_VAL_BYTES 4096
#define DG_JOB_MAX_TTL_S    (365u * 86400u)
typedef struct {
    uint32_t    max_attempts, result_ttl_s;
    const char *id;            /* into the bytes, id_len long, not NUL-terminated */
    size_t      id_len;
} dg_job_wire;
void dg_job_peek(const uint8_t *data, size_t len, dg_job_wire *out);

/* Reads the images given by redis_key or path and builds j->req. */
dg_job_status dg_job_prepare(dg_job *j, dg_redis *r, const dg_daemon_config *cfg, char *err, size_t errlen);

void dg_job_free(dg_job *j);   /* accepts a zeroed or half-built job */

#endif
