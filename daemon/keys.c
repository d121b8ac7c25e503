/* The protocol's key names; see keys.h for the list. */
#include "keys.h"

#include <stdio.h>

static void key(char *out, const char *prefix, const char *kind, const char *id) {
    if (id) snprintf(out, DG_KEY_MAX, "%s:%s:%s", prefix, kind, id);
    else snprintf(out, DG_KEY_MAX, "%s:%s", prefix, kind);
}

void dg_keys_init(dg_keys *k, const char *prefix, const char *worker_id) {
    key(k->streams[0], prefix, "jobs:high", NULL);
    key(k->streams[1], prefix, "jobs", NULL);
    key(k->done, prefix, "done", NULL);
    key(k->dead, prefix, "dead", NULL);
    dg_key_worker(k->worker, prefix, worker_id);
}

void dg_key_worker(char *out, const char *prefix, const char *worker_id) {
    key(out, prefix, "worker", worker_id);
}

void dg_key_job(char *out, const char *prefix, const char *id) {
    key(out, prefix, "job", id);
}

void dg_key_events(char *out, const char *prefix, const char *id) {
    key(out, prefix, "events", id);
}

void dg_key_result(char *out, const char *prefix, const char *id) {
    key(out, prefix, "result", id);
}

void dg_key_cancel(char *out, const char *prefix, const char *id) {
    key(out, prefix, "cancel", id);
}

void dg_key_taken(char *out, const char *stream) {
    snprintf(out, DG_KEY_MAX, "%s:taken", stream);
}

void dg_key_image(char *out, const char *prefix, const char *id, int index) {
    char sub[200];
    snprintf(sub, sizeof sub, "%s:%d", id, index);
    key(out, prefix, "image", sub);
}
