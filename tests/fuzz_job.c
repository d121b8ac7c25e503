/* libFuzzer target: the worker's Job decoder and validator (daemon/job.c) on arbitrary
 * bytes, as a producer may send them. It must never crash, and every refusal must come
 * with a message. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../daemon/job.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static dg_daemon_config cfg;
    static int ready;
    if (!ready) {
        dg_daemon_config_defaults(&cfg);
        cfg.max_job_bytes = 1 << 20;
        ready = 1;
    }
    char err[1024] = "";
    dg_job job;
    dg_job_status st = dg_job_parse(&job, data, size, &cfg, err, sizeof err);
    if (st != DG_JOB_OK && !err[0]) abort();   /* a refusal without a reason is a bug */
    /* the wire walk that guards against jobs killing the parser reads what protobuf-c read */
    dg_job_wire wire;
    dg_job_peek(data, size, &wire);
    if (job.pb) {
        if (wire.max_attempts != job.pb->max_attempts || wire.result_ttl_s != job.pb->result_ttl_s) abort();
        const size_t id_len = strlen(job.pb->id);   /* protobuf-c's C string ends at a NUL */
        if (!memchr(wire.id ? wire.id : "", 0, wire.id_len) &&
            (id_len != wire.id_len || (id_len && memcmp(wire.id, job.pb->id, id_len))))
            abort();
    }
    dg_job_free(&job);
    return 0;
}
