/* weights.c — find, check and bind checkpoint tensors (see weights.h). */
#include "io/weights.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"

#define NAME_MAX_LEN 512

void dg_buffer_list_release(dg_buffer_list *l) {
    for (int i = 0; i < l->n; i++) l->be->release(l->be, l->p[i]);
    free(l->p);
    memset(l, 0, sizeof *l);
}

/* Records the first error, after the checkpoint's path (a component's directory: which of
 * the package's networks lacks the tensor; its tail where it would crowd out the reason);
 * returns it. */
static int fail(dg_binder *b, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(dg_binder *b, int rc, const char *fmt, ...) {
    const char *path = b->st ? dg_st_path(b->st) : NULL;
    size_t at = 0;
    if (path && b->errlen > 16) {
        const size_t most = b->errlen / 2, n = strlen(path);
        at = (size_t)snprintf(b->err, b->errlen, "%s%s: ", n > most ? "..." : "", n > most ? path + n - most : path);
        if (at >= b->errlen) at = 0;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->err + at, b->errlen - at, fmt, ap);
    va_end(ap);
    return b->rc = rc;
}

/* name <- prefix + the formatted rest. */
static int format_name(dg_binder *b, char *name, const char *fmt, va_list ap) {
    const char *prefix = b->prefix ? b->prefix : "";
    const int np = snprintf(name, NAME_MAX_LEN, "%s", prefix);
    if (np >= NAME_MAX_LEN || vsnprintf(name + np, (size_t)(NAME_MAX_LEN - np), fmt, ap) >= NAME_MAX_LEN - np)
        return fail(b, DG_EMODEL, "tensor \"%.64s...\": name longer than %d bytes", name, NAME_MAX_LEN - 1);
    return 0;
}

static const char *dtypes_str(unsigned mask, char *buf, size_t len) {
    const dg_dtype all[] = {DG_DTYPE_BF16, DG_DTYPE_F16, DG_DTYPE_F32};
    size_t at = 0;
    buf[0] = 0;
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (mask & DG_DTYPE_BIT(all[i]))
            at += (size_t)snprintf(buf + at, len - at, "%s%s", at ? " or " : "", dg_dtype_name(all[i]));
    return buf;
}

/* The tensor `name`, its shape and dtype checked; NULL after recording the error. */
static const dg_st_tensor *find(dg_binder *b, const char *name, const dg_shape *shape) {
    const dg_st_tensor *t = dg_st_find(b->st, name);
    if (!t) {
        fail(b, DG_EMODEL, "tensor \"%s\": missing from the checkpoint", name);
        return NULL;
    }
    int ok = t->n_dims == shape->n_dims;
    for (int i = 0; ok && i < shape->n_dims; i++) ok = t->shape[i] == shape->dims[i];
    if (!ok) {
        char e[192], f[192];
        fail(b, DG_EMODEL, "tensor \"%s\": expected shape %s, found %s", name,
             dg_st_shape_str(shape->dims, shape->n_dims, e, sizeof e),
             dg_st_shape_str(t->shape, t->n_dims, f, sizeof f));
        return NULL;
    }
    if (b->dtypes && !(b->dtypes & DG_DTYPE_BIT(t->dtype))) {
        char e[32];
        fail(b, DG_EMODEL, "tensor \"%s\": expected dtype %s, found %s", name,
             dtypes_str(b->dtypes, e, sizeof e), dg_dtype_name(t->dtype));
        return NULL;
    }
    return t;
}

/* The common head of every bind: a sticky error returns at once, else the checked tensor
 * (and a tick of the backend's load progress: a long upload keeps reporting). */
static const dg_st_tensor *lookup(dg_binder *b, const dg_shape *shape, const char *fmt, va_list ap) {
    char name[NAME_MAX_LEN];
    if (b->rc < 0 || format_name(b, name, fmt, ap) < 0) return NULL;
    const dg_st_tensor *t = find(b, name, shape);
    if (t && b->be->load_tick) b->be->load_tick(b->be->load_tick_user);
    return t;
}

static size_t elements(const dg_st_tensor *t) {
    size_t n = 1;
    for (int i = 0; i < t->n_dims; i++) n *= (size_t)t->shape[i];
    return n;
}

/* Element i of t's row-major order as fp32, wherever the layout a bind as a matrix gave it
 * put it (dg_st_rewrite: t read as [shape[0], the rest]; backend.h dg_weight_at). */
static float element(const dg_st_tensor *t, size_t i) {
    if (!t->kb) return dg_load_f32(t->data, t->dtype, i);
    const int64_t rows = t->shape[0], cols = (int64_t)(elements(t) / (size_t)rows);
    const dg_weight v = {t->data, t->dtype, rows, cols, t->kb};
    return dg_load_f32(dg_weight_at(&v, (int64_t)i / cols, (int64_t)i % cols), t->dtype, 0);
}

/* dst <- t widened to fp32; a 5-D conv weight [o, i, kt, kh, kw] as [o, kt, i, kh, kw] when
 * kt_first is set. */
static void widen(const dg_st_tensor *t, int kt_first, float *dst) {
    if (!kt_first) {
        const size_t n = elements(t);
        for (size_t i = 0; i < n; i++) dst[i] = element(t, i);
        return;
    }
    const size_t o = (size_t)t->shape[0], ci = (size_t)t->shape[1], kt = (size_t)t->shape[2];
    const size_t khw = (size_t)t->shape[3] * (size_t)t->shape[4];
    for (size_t a = 0; a < o; a++)
        for (size_t c = 0; c < ci; c++)
            for (size_t k = 0; k < kt; k++)
                for (size_t p = 0; p < khw; p++)
                    dst[((a * kt + k) * ci + c) * khw + p] =
                        element(t, ((a * ci + c) * kt + k) * khw + p);
}

/* p recorded in b->owned (a backend buffer of b->be); DG_ENOMEM when the list cannot grow. */
static int own(dg_binder *b, void *p) {
    dg_buffer_list *l = b->owned;
    if (l->n == l->cap) {
        const int cap = l->cap * 2 + 64;
        void **q = realloc(l->p, sizeof *q * (size_t)cap);
        if (!q) return DG_ENOMEM;
        l->p = q;
        l->cap = cap;
    }
    l->be = b->be;
    l->p[l->n++] = p;
    return 0;
}

/* *out = a backend buffer holding t widened (see widen), recorded in b->owned. */
static int upload(dg_binder *b, const dg_st_tensor *t, int kt_first, float **out) {
    const size_t n = elements(t);
    float *host = malloc(n * sizeof(float)), *dev = NULL;
    if (!host) goto nomem;
    widen(t, kt_first, host);
    if (!(dev = b->be->alloc(b->be, n * sizeof(float)))) goto nomem;
    if (own(b, dev) < 0) {
        b->be->release(b->be, dev);
        goto nomem;
    }
    b->be->upload(b->be, dev, host, (int64_t)n);
    free(host);
    *out = dev;
    return 0;
nomem:
    free(host);
    return fail(b, DG_ENOMEM, "tensor \"%s\": out of memory", t->name);
}

int dg_bind_find(dg_binder *b, dg_shape shape, const dg_st_tensor **out, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    *out = lookup(b, &shape, fmt, ap);
    va_end(ap);
    if (*out && (*out)->kb) {   /* its bytes are a matrix's blocked layout now, not as stored */
        fail(b, DG_EMODEL, "tensor \"%s\": bound as a matrix already, not readable as stored", (*out)->name);
        *out = NULL;
    }
    return *out ? 0 : b->rc;
}

int dg_bind_has(dg_binder *b, const char *fmt, ...) {
    char name[NAME_MAX_LEN];
    va_list ap;
    va_start(ap, fmt);
    const int ok = b->rc == 0 && format_name(b, name, fmt, ap) == 0 && dg_st_find(b->st, name);
    va_end(ap);
    return ok;
}

/* The matrix of from into to's layout (the same rows, cols and dtype): a row's pieces of
 * DG_WEIGHT_KB columns are contiguous in the row-major and the blocked layout, its pairs
 * of columns in the panels. */
static void copy_layout(const dg_weight *to, const dg_weight *from) {
    const size_t es = dg_dtype_size(from->dtype);
    if (to->kb == DG_WEIGHT_PANELS && !from->kb) {   /* BF16, cols even: the load's case */
        const int64_t pr = DG_WEIGHT_PANEL_ROWS, half = from->cols / 2;
        uint32_t *dst = (uint32_t *)to->data;
        for (int64_t p0 = 0; p0 < from->rows; p0 += pr) {
            const int64_t np = from->rows - p0 < pr ? from->rows - p0 : pr;
            for (int64_t j = 0; j < np; j++) {
                const char *src = (const char *)from->data + (size_t)(p0 + j) * (size_t)from->cols * es;
                for (int64_t s2 = 0; s2 < half; s2++) memcpy(dst + p0 * half + s2 * np + j, src + s2 * 4, 4);
            }
        }
        return;
    }
    if (to->kb == DG_WEIGHT_PANELS || from->kb == DG_WEIGHT_PANELS) {
        for (int64_t r = 0; r < from->rows; r++)
            for (int64_t c = 0; c < from->cols; c += 2)
                memcpy((void *)dg_weight_at(to, r, c), dg_weight_at(from, r, c), 2 * es);
        return;
    }
    for (int64_t r = 0; r < from->rows; r++)
        for (int64_t c = 0; c < from->cols; c += DG_WEIGHT_KB)
            memcpy((void *)dg_weight_at(to, r, c), dg_weight_at(from, r, c),
                   (size_t)(from->cols - c < DG_WEIGHT_KB ? from->cols - c : DG_WEIGHT_KB) * es);
}

/* dg_st_rewrite's step: the row-major matrix *ctx (its data the tensor's) into the layout
 * ctx->kb where it lies, through a copy of it. */
static int to_layout(void *ctx, void *data) {
    const dg_weight *w = ctx;
    const size_t bytes = (size_t)w->rows * (size_t)w->cols * dg_dtype_size(w->dtype);
    void *tmp = malloc(bytes);
    if (!tmp) return DG_ENOMEM;
    memcpy(tmp, data, bytes);
    copy_layout(&(dg_weight){data, w->dtype, w->rows, w->cols, w->kb},
                &(dg_weight){tmp, w->dtype, w->rows, w->cols, 0});
    free(tmp);
    return 0;
}

int dg_bind_matrix(dg_binder *b, dg_weight *w, dg_shape shape, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const dg_st_tensor *t = lookup(b, &shape, fmt, ap);
    va_end(ap);
    if (!t) return b->rc;
    int64_t cols = 1;
    for (int i = 1; i < shape.n_dims; i++) cols *= shape.dims[i];
    const int64_t rows = shape.dims[0], kb = dg_weight_layout_for(b->be, t->dtype, cols, b->panels);
    const size_t bytes = (size_t)rows * (size_t)cols * dg_dtype_size(t->dtype);
    *w = (dg_weight){t->data, t->dtype, rows, cols, t->kb};
    void *copy = NULL, *temp = NULL;
    if (t->kb == DG_WEIGHT_PANELS && kb != DG_WEIGHT_PANELS && b->be->weights_blocked) {
        /* another bind gave it the panels, which only a backend that asks for them reads
         * (the matmul's order is theirs): a copy in this one's layout, kept by the network */
        if (!b->owned)
            return fail(b, DG_EINVAL, "tensor \"%s\": in another bind's panel layout, and no buffer list for "
                        "a copy out of it", t->name);
        if (!(copy = b->be->alloc(b->be, bytes)) || own(b, copy) < 0) {
            if (copy) b->be->release(b->be, copy);
            return fail(b, DG_ENOMEM, "tensor \"%s\": out of memory", t->name);
        }
        const dg_weight to = {copy, t->dtype, rows, cols, kb};
        copy_layout(&to, w);
        *w = to;
    } else if (kb && !t->kb) {
        /* rewritten where it lies; where the set borrows the buffer, a copy kept by the
         * network (no list: left row-major, which the kernels also read) */
        w->kb = kb;   /* to_layout's target */
        const int rc = dg_st_rewrite(b->st, t, kb, to_layout, w);
        w->kb = t->kb;
        if (rc < 0) return fail(b, rc, "tensor \"%s\": out of memory", t->name);
        if (rc == 0) {
            w->kb = kb;
        } else if (b->owned) {
            if (!(copy = b->be->alloc(b->be, bytes)) || own(b, copy) < 0) {
                if (copy) b->be->release(b->be, copy);
                return fail(b, DG_ENOMEM, "tensor \"%s\": out of memory", t->name);
            }
            const dg_weight to = {copy, t->dtype, rows, cols, kb};
            copy_layout(&to, w);
            *w = to;
        }
    } else if (t->kb && !b->be->weights_blocked) {
        /* another backend's bind rewrote it: row-major again for this one's weight_prepare,
         * which copies (a CPU backend reads it blocked as it is) */
        if (!(temp = malloc(bytes))) return fail(b, DG_ENOMEM, "tensor \"%s\": out of memory", t->name);
        const dg_weight to = {temp, t->dtype, rows, cols, 0};
        copy_layout(&to, w);
        *w = to;
    }
    const int rc = b->be->weight_prepare(b->be, w, b->err, b->errlen);
    free(temp);
    if (rc < 0 && temp) w->data = NULL;
    return rc < 0 ? (b->rc = rc) : 0;
}

int dg_bind_fp32_host(dg_binder *b, float *dst, dg_shape shape, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const dg_st_tensor *t = lookup(b, &shape, fmt, ap);
    va_end(ap);
    if (!t) return b->rc;
    widen(t, 0, dst);
    return 0;
}

int dg_bind_fp32(dg_binder *b, float **out, dg_shape shape, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const dg_st_tensor *t = lookup(b, &shape, fmt, ap);
    va_end(ap);
    return t ? upload(b, t, 0, out) : b->rc;
}

int dg_bind_conv(dg_binder *b, float **out, dg_shape shape, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const dg_st_tensor *t = lookup(b, &shape, fmt, ap);
    va_end(ap);
    return t ? upload(b, t, shape.n_dims == 5, out) : b->rc;
}
