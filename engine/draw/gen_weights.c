/* gen_weights.c — weight binding and config reading for the image-generation components. */
#include "draw/gen_weights.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"

int dg_gw_find(const dg_st *st, const char *name, const int64_t *shape, int n_dims,
               const dg_st_tensor **out, char *err, size_t errlen) {
    const dg_st_tensor *t = dg_st_find(st, name);
    *out = NULL;
    if (!t) {
        snprintf(err, errlen, "tensor \"%s\": missing from the checkpoint", name);
        return DG_EMODEL;
    }
    int ok = t->n_dims == n_dims;
    for (int i = 0; ok && i < n_dims; i++) ok = t->shape[i] == shape[i];
    if (!ok) {
        char e[128], f[128];
        snprintf(err, errlen, "tensor \"%s\": expected shape %s, found %s", name,
                 dg_st_shape_str(shape, n_dims, e, sizeof e),
                 dg_st_shape_str(t->shape, t->n_dims, f, sizeof f));
        return DG_EMODEL;
    }
    *out = t;
    return 0;
}

int dg_gw_upload(dg_backend *be, dg_gw_owned *own, const dg_st_tensor *t, int kt_first,
                 float **out, char *err, size_t errlen) {
    size_t n = 1;
    for (int i = 0; i < t->n_dims; i++) n *= (size_t)t->shape[i];
    float *host = malloc(n * sizeof(float)), *dev = NULL;
    if (!host || (own->n == own->cap &&
                  !(own->p = realloc(own->p, sizeof(void *) * (size_t)(own->cap = own->cap * 2 + 64)))))
        goto nomem;
    if (kt_first) {   /* [o, i, kt, kh, kw] -> [o, kt, i, kh, kw] */
        const size_t o = (size_t)t->shape[0], ci = (size_t)t->shape[1], kt = (size_t)t->shape[2];
        const size_t khw = (size_t)t->shape[3] * (size_t)t->shape[4];
        for (size_t a = 0; a < o; a++)
            for (size_t b = 0; b < ci; b++)
                for (size_t k = 0; k < kt; k++)
                    for (size_t p = 0; p < khw; p++)
                        host[((a * kt + k) * ci + b) * khw + p] =
                            dg_load_f32(t->data, t->dtype, ((a * ci + b) * kt + k) * khw + p);
    } else {
        for (size_t i = 0; i < n; i++) host[i] = dg_load_f32(t->data, t->dtype, i);
    }
    if (!(dev = be->alloc(be, n * sizeof(float)))) goto nomem;
    be->upload(be, dev, host, (int64_t)n);
    own->p[own->n++] = dev;
    free(host);
    *out = dev;
    return 0;
nomem:
    free(host);
    snprintf(err, errlen, "tensor \"%s\": out of memory", t->name);
    return DG_ENOMEM;
}

void dg_gw_release(dg_backend *be, dg_gw_owned *own) {
    for (int i = 0; i < own->n; i++) be->release(be, own->p[i]);
    free(own->p);
    memset(own, 0, sizeof *own);
}

int dg_gw_json_int(json_t *root, const char *key, int def, int required, int *out,
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

int dg_gw_json_float(json_t *root, const char *key, double def, float *out, const char *label,
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

int dg_gw_json_floats(json_t *root, const char *key, float *out, int max, int *n,
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

int dg_gw_json_ints(json_t *root, const char *key, int *out, int max, int *n, const char *label,
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
