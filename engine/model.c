/* dg_model / dg_sched: the public engine entry points (duogen.h).
 *
 * The interleaved loop that joins the MLLM, the connector, the DiT and the VAE is issue 7.
 * Until it lands, opening a model package reports that plainly, so that a worker started
 * with --model fails at start-up (exit 78, a configuration error) instead of taking jobs
 * it cannot run. The daemon's queue semantics are tested over the deterministic engine in
 * tests/engine_fake/. */
#include "duogen.h"

#include <stdio.h>
#include <stdlib.h>

int dg_model_open(const char *dir, const dg_model_opts *o, dg_model **out, char *err, size_t errlen) {
    (void)o;
    *out = NULL;
    snprintf(err, errlen, "model \"%s\": this build has no interleaved model engine yet "
             "(the MLLM + DiT loop arrives with issue 7)", dir ? dir : "(null)");
    return DG_EMODEL;
}

void dg_model_close(dg_model *m) { (void)m; }

const char *dg_model_describe(const dg_model *m) { (void)m; return "none"; }

int dg_sched_new(dg_model *m, const dg_sched_opts *o, dg_sched **out, char *err, size_t errlen) {
    (void)m; (void)o;
    *out = NULL;
    snprintf(err, errlen, "no model engine in this build");
    return DG_EMODEL;
}

void dg_sched_free(dg_sched *s) { (void)s; }

int dg_sched_submit(dg_sched *s, const dg_request *r, const dg_sink *sink, uint64_t *seq,
                    char *err, size_t errlen) {
    (void)s; (void)r; (void)sink; (void)seq;
    snprintf(err, errlen, "no model engine in this build");
    return DG_EMODEL;
}

int dg_sched_step(dg_sched *s, char *err, size_t errlen) {
    (void)s;
    snprintf(err, errlen, "no model engine in this build");
    return DG_EMODEL;
}

int dg_sched_cancel(dg_sched *s, uint64_t seq) { (void)s; (void)seq; return DG_EINVAL; }

int dg_sched_active(const dg_sched *s) { (void)s; return 0; }

void dg_sched_cache_stats(const dg_sched *s, dg_cache_stats *out) {
    (void)s;
    *out = (dg_cache_stats){0};
}
