/* st_writer.c — a streaming safetensors writer with seeded random contents and sharding. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mkmodel.h"

int mk_seeded;

int mk_add(mk_list *l, dg_dtype dtype, double mean, double std, const char *name, int n_dims,
           const int64_t *shape) {
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 256;
        mk_tensor *nt = realloc(l->t, (size_t)cap * sizeof *nt);
        if (!nt) return -1;
        l->t = nt;
        l->cap = cap;
    }
    mk_tensor *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dtype = dtype;
    t->n_dims = n_dims;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)n_dims);
    t->init = MK_NORMAL;
    t->mean = mean;
    t->std = std;
    return 0;
}

void mk_list_free(mk_list *l) {
    free(l->t);
    memset(l, 0, sizeof *l);
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* FNV-1a of the name: the tensor's stream does not depend on the list order. */
static uint64_t name_key(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

static int64_t numel(const mk_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->n_dims; i++) n *= t->shape[i];
    return n;
}

static size_t nbytes(const mk_tensor *t) { return (size_t)numel(t) * dg_dtype_size(t->dtype); }

/* Generates and writes one tensor's bytes. z = (u1+u2+u3+u4 - 2·32767.5) / 65536 · √3 for
 * four 16-bit uniforms: mean 0, variance 1, range ±3.46; integer sum, one double
 * multiply-add, then RNE to the stored dtype: reproducible bit for bit. */
#define CHUNK (1 << 16)   /* values generated per fwrite */

static int write_tensor(FILE *f, const mk_tensor *t, uint64_t seed, uint8_t *buf /* [CHUNK * 4] */) {
    uint64_t state = seed ^ name_key(t->name);
    const double scale = t->std * sqrt(3.0) / 65536.0;
    const int64_t n = numel(t);
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        int64_t m = n - i0 < CHUNK ? n - i0 : CHUNK;
        for (int64_t i = 0; i < m; i++) {
            uint64_t r = splitmix64(&state);
            int64_t s = (int64_t)(r & 0xffff) + (int64_t)(r >> 16 & 0xffff) +
                        (int64_t)(r >> 32 & 0xffff) + (int64_t)(r >> 48) - 131070;
            float v = (float)(t->mean + (double)s * scale);
            if (t->dtype == DG_DTYPE_F32) {
                memcpy(buf + 4 * i, &v, 4);
            } else {
                uint16_t h = dg_f32_to_bf16(v);
                memcpy(buf + 2 * i, &h, 2);
            }
        }
        if (fwrite(buf, dg_dtype_size(t->dtype), (size_t)m, f) != (size_t)m) return -1;
    }
    return 0;
}

/* The JSON header of tensors [a, b), padded with spaces to a multiple of 8 bytes. */
static char *header(const mk_list *l, int a, int b, uint64_t seed, size_t *len) {
    size_t cap = 256 + (size_t)(b - a) * 256, o = 0;
    char *h = malloc(cap);
    uint64_t off = 0;
    if (!h) return NULL;
    if (mk_seeded)   /* no data follows: the loader fills the tensors from the seed */
        o += (size_t)snprintf(h + o, cap - o, "{\"__metadata__\":{\"format\":\"pt\",\"duogen.seeded\":\"%" PRIu64 "\"}",
                              seed);
    else
        o += (size_t)snprintf(h + o, cap - o, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = a; i < b; i++) {
        const mk_tensor *t = &l->t[i];
        o += (size_t)snprintf(h + o, cap - o, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", t->name,
                              dg_dtype_name(t->dtype));
        for (int d = 0; d < t->n_dims; d++)
            o += (size_t)snprintf(h + o, cap - o, "%s%" PRId64, d ? "," : "", t->shape[d]);
        o += (size_t)snprintf(h + o, cap - o, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off,
                              off + nbytes(t));
        off += nbytes(t);
    }
    o += (size_t)snprintf(h + o, cap - o, "}");
    while (o % 8) h[o++] = ' ';
    h[o] = 0;
    *len = o;
    return h;
}

static int write_file(const char *path, const mk_list *l, int a, int b, uint64_t seed, char *err,
                      size_t errlen) {
    size_t hlen;
    char *h = header(l, a, b, seed, &hlen);
    FILE *f = fopen(path, "wb");
    uint8_t *buf = malloc(CHUNK * 4);
    int rc = -1;
    if (!h || !f || !buf) {
        snprintf(err, errlen, "%s: %s", path, f ? "out of memory" : strerror(errno));
        goto out;
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    if (fwrite(len8, 1, 8, f) != 8 || fwrite(h, 1, hlen, f) != hlen) goto io;
    for (int i = a; i < b && !mk_seeded; i++)
        if (write_tensor(f, &l->t[i], seed, buf) < 0) goto io;
    if (fclose(f) != 0) { f = NULL; goto io; }
    f = NULL;
    rc = 0;
    goto out;
io:
    snprintf(err, errlen, "%s: write failed: %s", path, strerror(errno));
out:
    if (f) fclose(f);
    free(buf);
    free(h);
    return rc;
}

int st_write(const char *dir, const mk_list *l, uint64_t seed, size_t max_shard_bytes, char *err,
             size_t errlen) {
    int starts[1024], n_shards = 0;
    size_t acc = 0, total = 0;
    char path[4096];
    for (int i = 0; i < l->n; i++) {
        size_t b = nbytes(&l->t[i]);
        if (i == 0 || (acc + b > max_shard_bytes && acc > 0)) {
            if (n_shards == 1024) { snprintf(err, errlen, "too many shards"); return -1; }
            starts[n_shards++] = i;
            acc = 0;
        }
        acc += b;
        total += b;
    }
    starts[n_shards] = l->n;
    if (n_shards == 1) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        return write_file(path, l, 0, l->n, seed, err, errlen);
    }
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    FILE *idx = fopen(path, "w");
    if (!idx) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    fprintf(idx, "{\n  \"metadata\": {\"total_size\": %zu},\n  \"weight_map\": {", total);
    for (int s = 0; s < n_shards; s++)
        for (int i = starts[s]; i < starts[s + 1]; i++)
            fprintf(idx, "%s\n    \"%s\": \"model-%05d-of-%05d.safetensors\"", i ? "," : "",
                    l->t[i].name, s + 1, n_shards);
    fprintf(idx, "\n  }\n}\n");
    if (fclose(idx) != 0) { snprintf(err, errlen, "%s: write failed", path); return -1; }
    for (int s = 0; s < n_shards; s++) {
        snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", dir, s + 1, n_shards);
        if (write_file(path, l, starts[s], starts[s + 1], seed, err, errlen) < 0) return -1;
    }
    return 0;
}

int mk_write_text(const char *dir, const char *name, const char *text, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

int mk_copy_file(const char *src_dir, const char *dir, const char *name, char *err, size_t errlen) {
    char src[4096], dst[4096], buf[65536];
    snprintf(src, sizeof src, "%s/%s", src_dir, name);
    snprintf(dst, sizeof dst, "%s/%s", dir, name);
    FILE *in = fopen(src, "rb"), *out = in ? fopen(dst, "wb") : NULL;
    size_t r;
    int rc = 0;
    if (!in || !out) {
        snprintf(err, errlen, "%s: %s", in ? dst : src, strerror(errno));
        rc = -1;
    } else {
        while ((r = fread(buf, 1, sizeof buf, in)) > 0)
            if (fwrite(buf, 1, r, out) != r) { rc = -1; break; }
        if (fclose(out) != 0) rc = -1;
        out = NULL;
        if (rc < 0) snprintf(err, errlen, "%s: write failed", dst);
    }
    if (in) fclose(in);
    if (out) fclose(out);
    return rc;
}
