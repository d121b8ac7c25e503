/* json_config.c — typed readers of config.json keys (see json_config.h). */
#include "io/json_config.h"

#include <pthread.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"
#include "io/file.h"

/* ---- parsing ---------------------------------------------------------------------------- */

/* A failed allocation in this thread's parse: jansson may report one as a syntax error (a
 * string it could not copy), or not at all (a hashtable that could not grow: the parse
 * goes on, and comes back without a key; found by test_alloc_fail), so the flag tells,
 * and a parse it saw fail is no parse. */
static _Thread_local int json_oom;

static void *json_alloc(size_t n) {
    void *p = malloc(n);
    if (!p) json_oom = 1;
    return p;
}

static void json_alloc_set(void) { json_set_alloc_funcs(json_alloc, free); }
static pthread_once_t json_alloc_once = PTHREAD_ONCE_INIT;

static int parsed(json_t *j, json_t **out, const json_error_t *je) {
    if (json_oom) {
        json_decref(j);
        j = NULL;
    }
    *out = j;
    if (j) return 0;
    return json_oom || json_error_code(je) == json_error_out_of_memory ? DG_ENOMEM : DG_EMODEL;
}

int dg_json_load_file(const char *path, size_t flags, json_t **out, json_error_t *je) {
    pthread_once(&json_alloc_once, json_alloc_set);
    json_oom = 0;
    char why[sizeof je->text];
    const int fd = dg_open_regular(path, why, sizeof why);
    if (fd < 0) {
        memset(je, 0, sizeof *je);
        je->line = je->column = -1;
        snprintf(je->text, sizeof je->text, "%s", why);
        snprintf(je->source, sizeof je->source, "%s", "<file>");
        *out = NULL;
        return DG_EMODEL;
    }
    json_t *j = json_loadfd(fd, flags, je);
    close(fd);
    return parsed(j, out, je);
}

const char *dg_json_why(const json_error_t *je, char *buf, size_t n) {
    if (je->line > 0) snprintf(buf, n, "line %d column %d: %s", je->line, je->column, je->text);
    else snprintf(buf, n, "%s", je->text);
    return buf;
}

int dg_json_loadb(const char *buf, size_t len, size_t flags, json_t **out, json_error_t *je) {
    pthread_once(&json_alloc_once, json_alloc_set);
    json_oom = 0;
    return parsed(json_loadb(buf, len, flags, je), out, je);
}

/* ---- typed readers ------------------------------------------------------------------------ */

int dg_json_int(json_t *root, const char *key, int def, int required, int *out,
                const char *label, char *err, size_t errlen) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (required) {
            snprintf(err, errlen, "%s: missing \"%s\"", label, key);
            return DG_EMODEL;
        }
        *out = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 30)) {
        snprintf(err, errlen, "%s: \"%s\" must be a non-negative integer", label, key);
        return DG_EMODEL;
    }
    *out = (int)json_integer_value(v);
    return 0;
}

int dg_json_float(json_t *root, const char *key, double def, float *out, const char *label,
                  char *err, size_t errlen) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = (float)def;
        return 0;
    }
    if (!json_is_number(v)) {
        snprintf(err, errlen, "%s: \"%s\" must be a number", label, key);
        return DG_EMODEL;
    }
    *out = (float)json_number_value(v);
    return 0;
}

static json_t *array(json_t *root, const char *key, int max, const char *label, char *err,
                     size_t errlen) {
    json_t *v = json_object_get(root, key);
    if (!json_is_array(v) || json_array_size(v) > (size_t)max) {
        snprintf(err, errlen, "%s: \"%s\" must be an array of at most %d values", label, key, max);
        return NULL;
    }
    return v;
}

int dg_json_floats(json_t *root, const char *key, float *out, int max, int *n,
                   const char *label, char *err, size_t errlen) {
    json_t *a = array(root, key, max, label, err, errlen), *e;
    size_t i;
    if (!a) return DG_EMODEL;
    json_array_foreach(a, i, e) {
        if (!json_is_number(e)) {
            snprintf(err, errlen, "%s: \"%s\"[%zu] must be a number", label, key, i);
            return DG_EMODEL;
        }
        out[i] = (float)json_number_value(e);
    }
    *n = (int)json_array_size(a);
    return 0;
}

int dg_json_ints(json_t *root, const char *key, int *out, int max, int *n, const char *label,
                 char *err, size_t errlen) {
    json_t *a = array(root, key, max, label, err, errlen), *e;
    size_t i;
    if (!a) return DG_EMODEL;
    json_array_foreach(a, i, e) {
        if (json_is_boolean(e)) out[i] = json_is_true(e);
        else if (json_is_integer(e)) out[i] = (int)json_integer_value(e);
        else {
            snprintf(err, errlen, "%s: \"%s\"[%zu] must be an integer or a boolean", label, key, i);
            return DG_EMODEL;
        }
    }
    *n = (int)json_array_size(a);
    return 0;
}

int dg_json_name(json_t *root, const char *key, const char *want, const char *label, char *err, size_t errlen) {
    json_t *v = json_object_get(root, key);
    if (!v || (json_is_string(v) && !strcmp(json_string_value(v), want))) return 0;
    if (json_is_string(v))
        snprintf(err, errlen, "%s: %s \"%s\" is not the model this reads (\"%s\")", label, key, json_string_value(v),
                 want);
    else
        snprintf(err, errlen, "%s: %s must be a string (\"%s\")", label, key, want);
    return DG_EMODEL;
}
