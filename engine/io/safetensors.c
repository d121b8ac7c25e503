/* safetensors.c — safetensors parsing, mmap of single and sharded checkpoints. */
#include "io/safetensors.h"
#include "io/file.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "duogen.h"
#include "io/json_config.h"

#define ST_MAX_HEADER (100u << 20)   /* the format's own limit on the JSON header */

typedef struct {
    void  *base;                      /* owned mapping */
    size_t size;
} st_map;

struct dg_st {
    dg_st_tensor *tensors;            /* owned, sorted by name once parsing is done */
    size_t        n, cap;
    st_map       *maps;               /* owned */
    size_t        n_maps, cap_maps;
    int           seeded;             /* some file was a seeded one (see safetensors.h) */
    int           flags;              /* DG_ST_* of dg_st_open_flags */
    dg_st_tick    tick;               /* and its tick, with tick_user */
    void         *tick_user;
    char         *path;               /* owned: dg_st_open's path; NULL for buffers */
};

int dg_st_seeded(const dg_st *st) { return st->seeded; }
const char *dg_st_path(const dg_st *st) { return st->path; }

int dg_st_rewrite(const dg_st *st, const dg_st_tensor *t, int64_t kb, int (*rewrite)(void *ctx, void *data),
                  void *ctx) {
    dg_st_tensor *mt = (dg_st_tensor *)t;   /* the set's own array: the one change load allows */
    if (t->kb == kb) return 0;
    if (t->kb) return 1;
    if (st->seeded) {
        mt->kb = kb;
        return 0;
    }
    const st_map *map = NULL;
    for (size_t i = 0; i < st->n_maps && !map; i++)
        if ((const uint8_t *)t->data >= (const uint8_t *)st->maps[i].base &&
            (const uint8_t *)t->data + t->nbytes <= (const uint8_t *)st->maps[i].base + st->maps[i].size)
            map = &st->maps[i];
    /* the whole map at once: a part of it would split its huge pages */
    if (!map || mprotect(map->base, map->size, PROT_READ | PROT_WRITE) < 0) return 1;
    const int rc = rewrite(ctx, (void *)t->data);
    mprotect(map->base, map->size, PROT_READ);
    if (rc < 0) return rc;
    mt->kb = kb;
    return 0;
}

const char *dg_st_shape_str(const int64_t *shape, int n_dims, char *buf, size_t len) {
    size_t o = 0;
    o += (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < n_dims && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%" PRId64, i ? ", " : "", shape[i]);
    if (o < len) snprintf(buf + o, len - o, "]");
    return buf;
}

int dg_st_new(dg_st **out) {
    *out = calloc(1, sizeof **out);
    return *out ? 0 : DG_ENOMEM;
}

void dg_st_close(dg_st *st) {
    if (!st) return;
    for (size_t i = 0; i < st->n; i++) free(st->tensors[i].name);
    free(st->tensors);
    for (size_t i = 0; i < st->n_maps; i++) munmap(st->maps[i].base, st->maps[i].size);
    free(st->maps);
    free(st->path);
    free(st);
}

static int parse_dtype(const char *s, dg_dtype *t) {
    if (!strcmp(s, "BF16")) *t = DG_DTYPE_BF16;
    else if (!strcmp(s, "F16")) *t = DG_DTYPE_F16;
    else if (!strcmp(s, "F32")) *t = DG_DTYPE_F32;
    else return -1;
    return 0;
}

/* The published name of a tensor stored under a newer transformers prefix. */
static char *normalise_name(const char *name) {
    static const char *from[] = {"model.language_model.", "model.visual."};
    static const char *to[] = {"model.", "visual."};
    for (int i = 0; i < 2; i++) {
        size_t lf = strlen(from[i]);
        if (!strncmp(name, from[i], lf)) {
            size_t lt = strlen(to[i]), rest = strlen(name + lf);
            char *s = malloc(lt + rest + 1);
            if (!s) return NULL;
            memcpy(s, to[i], lt);
            memcpy(s + lt, name + lf, rest + 1);
            return s;
        }
    }
    return strdup(name);
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const dg_st_tensor *)a)->name, ((const dg_st_tensor *)b)->name);
}

/* Parses one entry {"dtype":..,"shape":[..],"data_offsets":[b,e]} into *t. */
static int parse_entry(const char *label, const char *name, json_t *v, const uint8_t *data,
                       size_t data_len, dg_st_tensor *t, char *err, size_t errlen) {
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!json_is_object(v) || !json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
        json_array_size(jo) != 2) {
        snprintf(err, errlen, "%s: tensor \"%s\": header entry lacks dtype, shape or data_offsets",
                 label, name);
        return DG_EMODEL;
    }
    if (parse_dtype(json_string_value(jd), &t->dtype) < 0) {
        snprintf(err, errlen, "%s: tensor \"%s\": dtype \"%s\" is not BF16, F16 or F32", label,
                 name, json_string_value(jd));
        return DG_EMODEL;
    }
    size_t nd = json_array_size(js);
    if (nd > DG_ST_MAX_DIMS) {
        snprintf(err, errlen, "%s: tensor \"%s\": %zu dimensions (at most %d)", label, name, nd,
                 DG_ST_MAX_DIMS);
        return DG_EMODEL;
    }
    uint64_t numel = 1;
    t->n_dims = (int)nd;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0 ||
            (uint64_t)json_integer_value(d) > (1ull << 40)) {
            snprintf(err, errlen, "%s: tensor \"%s\": bad shape entry %zu", label, name, i);
            return DG_EMODEL;
        }
        t->shape[i] = json_integer_value(d);
        if (t->shape[i] && numel > (1ull << 40) / (uint64_t)t->shape[i]) {   /* before the product wraps */
            snprintf(err, errlen, "%s: tensor \"%s\": shape too large", label, name);
            return DG_EMODEL;
        }
        numel *= (uint64_t)t->shape[i];
    }
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_integer(jb) || !json_is_integer(je) || json_integer_value(jb) < 0 ||
        json_integer_value(je) < json_integer_value(jb) ||
        (uint64_t)json_integer_value(je) > data_len) {
        snprintf(err, errlen, "%s: tensor \"%s\": data_offsets outside the file's %zu data bytes "
                 "(truncated file?)", label, name, data_len);
        return DG_EMODEL;
    }
    uint64_t b = (uint64_t)json_integer_value(jb), e = (uint64_t)json_integer_value(je);
    if (e - b != numel * dg_dtype_size(t->dtype)) {
        char s[128];
        snprintf(err, errlen, "%s: tensor \"%s\": %s %s needs %" PRIu64 " bytes, data_offsets give %" PRIu64,
                 label, name, dg_dtype_name(t->dtype), dg_st_shape_str(t->shape, t->n_dims, s, sizeof s),
                 numel * dg_dtype_size(t->dtype), e - b);
        return DG_EMODEL;
    }
    t->data = data ? data + b : NULL;   /* NULL: a seeded file, filled by seed_payload */
    t->nbytes = (size_t)(e - b);
    return 0;
}

static int add_map(dg_st *st, void *p, size_t size) {
    if (st->n_maps == st->cap_maps) {
        size_t cap = st->cap_maps ? st->cap_maps * 2 : 8;
        st_map *nm = realloc(st->maps, cap * sizeof *nm);
        if (!nm) return DG_ENOMEM;
        st->maps = nm;
        st->cap_maps = cap;
    }
    st->maps[st->n_maps++] = (st_map){p, size};
    return 0;
}

/* ---- seeded files (mkmodel --seeded): the header of a real checkpoint, no data ----------
 * Benchmarks of the full-size package would otherwise read 20 GB from disk for weights
 * whose values do not matter to a timing. Every tensor of such a file points into one of
 * a few read-only blocks of random values made here from the file's seed: per dtype, one
 * for matrices (uniform, std 0.02) and one for vectors (1 ± 0.17, so that norm weights keep
 * activations at their scale), each as long as the largest tensor of its kind plus 2048
 * values; a tensor starts at one of 64 offsets chosen by its name. Tensors share memory,
 * which only a benchmark can accept: the loader refuses such files unless
 * DG_SEEDED_WEIGHTS=1. */
#define SEED_SLACK 2048   /* values past the largest tensor: room for the 64 offsets */

static uint64_t seed_fnv(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

static int seed_payload(dg_st *st, const char *seed_str, dg_st_tensor *t, size_t n, const char *label,
                        char *err, size_t errlen) {
    uint64_t seed = strtoull(seed_str, NULL, 0);
    for (int dt = 0; dt < 2; dt++)        /* BF16, F32 */
        for (int vec = 0; vec < 2; vec++) {
            const dg_dtype want = dt ? DG_DTYPE_F32 : DG_DTYPE_BF16;
            size_t most = 0;
            for (size_t i = 0; i < n; i++)
                if (t[i].dtype == want && (t[i].n_dims <= 1) == vec && t[i].nbytes > most) most = t[i].nbytes;
            if (!most) continue;
            const size_t esz = dg_dtype_size(want), count = most / esz + SEED_SLACK;
            void *blk = mmap(NULL, count * esz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (blk == MAP_FAILED) {
                snprintf(err, errlen, "%s: seeded weights: %zu MiB: %s", label, count * esz >> 20, strerror(errno));
                return DG_ENOMEM;
            }
            if (add_map(st, blk, count * esz) < 0) { munmap(blk, count * esz); return DG_ENOMEM; }
            if (st->flags & DG_ST_HUGEPAGES) madvise(blk, count * esz, MADV_HUGEPAGE);
            uint64_t x = seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(1 + 2 * dt + vec));
            const float mean = vec ? 1.0f : 0.0f, width = vec ? 0.35f : 0.0693f;   /* std = width/√12 */
            for (size_t i = 0; i < count; i++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                const float v = mean + ((float)(x >> 40) / 16777216.0f - 0.5f) * width;
                if (dt) ((float *)blk)[i] = v;
                else ((uint16_t *)blk)[i] = dg_f32_to_bf16(v);
            }
            mprotect(blk, count * esz, PROT_READ);
            for (size_t i = 0; i < n; i++)
                if (t[i].dtype == want && (t[i].n_dims <= 1) == vec)
                    t[i].data = (const uint8_t *)blk + (seed_fnv(t[i].name) % 64) * 32 * esz;
        }
    for (size_t i = 0; i < n; i++)
        if (!t[i].data && t[i].nbytes) {
            snprintf(err, errlen, "%s: tensor \"%s\": a seeded file holds BF16 and F32 tensors only, "
                     "not %s", label, t[i].name, dg_dtype_name(t[i].dtype));
            return DG_EMODEL;
        }
    st->seeded = 1;
    return 0;
}

static int by_data(const void *a, const void *b) {
    const uint8_t *x = (*(const dg_st_tensor *const *)a)->data, *y = (*(const dg_st_tensor *const *)b)->data;
    return (x > y) - (x < y);
}

/* No two tensors of a file share data bytes (as the reference safetensors library
 * requires): the layout rewrite (dg_st_rewrite) changes a tensor's bytes in place, and a
 * second tensor over them would be read re-blocked twice. 0, or DG_EMODEL naming both. */
static int check_disjoint(const dg_st_tensor *t, size_t n, const char *label, char *err, size_t errlen) {
    const dg_st_tensor **by = malloc((n ? n : 1) * sizeof *by);
    if (!by) {
        snprintf(err, errlen, "%s: out of memory", label);
        return DG_ENOMEM;
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (t[i].nbytes) by[m++] = &t[i];
    qsort(by, m, sizeof *by, by_data);
    int rc = 0;
    const dg_st_tensor *last = NULL;   /* of those before, the one that ends last */
    for (size_t i = 0; i < m && !rc; i++) {
        if (last && last->data + last->nbytes > by[i]->data) {
            snprintf(err, errlen, "%s: tensors \"%s\" and \"%s\" share data bytes (their data_offsets overlap)", label,
                     last->name, by[i]->name);
            rc = DG_EMODEL;
        }
        if (!last || by[i]->data + by[i]->nbytes > last->data + last->nbytes) last = by[i];
    }
    free(by);
    return rc;
}

int dg_st_add_buffer(dg_st *st, const uint8_t *data, size_t size, const char *label, char *err,
                     size_t errlen) {
    json_t *root = NULL;
    dg_st_tensor *tmp = NULL;                 /* owned until appended to st */
    size_t n = 0;
    int rc = DG_EMODEL;
    if (size < 8) {
        snprintf(err, errlen, "%s: %zu bytes, shorter than the 8-byte header length", label, size);
        return DG_EMODEL;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | data[i];
    if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > size - 8) {
        snprintf(err, errlen, "%s: header length %" PRIu64 " does not fit the file's %zu bytes",
                 label, hlen, size);
        return DG_EMODEL;
    }
    json_error_t je;
    if (dg_json_loadb((const char *)data + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &root, &je) == DG_ENOMEM) {
        snprintf(err, errlen, "%s: out of memory reading its header", label);
        rc = DG_ENOMEM;
        goto fail;
    }
    if (!json_is_object(root)) {
        snprintf(err, errlen, "%s: header is not a JSON object (%s)", label, root ? "" : je.text);
        goto fail;
    }
    const uint8_t *payload = data + 8 + hlen;
    size_t payload_len = size - 8 - (size_t)hlen;
    const char *seeded = json_string_value(json_object_get(json_object_get(root, "__metadata__"),
                                                          "duogen.seeded"));
    if (seeded) {
        const char *allow = getenv("DG_SEEDED_WEIGHTS");
        if (!allow || strcmp(allow, "1") != 0) {
            snprintf(err, errlen, "%s: a seeded benchmark file (mkmodel --seeded): its weights are "
                     "not on disk; only benchmarks run it, with DG_SEEDED_WEIGHTS=1", label);
            goto fail;
        }
        payload = NULL;
        payload_len = (size_t)1 << 62;   /* data_offsets are checked against the shape alone */
    }
    tmp = calloc(json_object_size(root) + 1, sizeof *tmp);
    if (!tmp) { rc = DG_ENOMEM; goto fail; }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) continue;
        if ((rc = parse_entry(label, key, v, payload, payload_len, &tmp[n], err, errlen)) < 0) goto fail;
        if (!(tmp[n].name = normalise_name(key))) { rc = DG_ENOMEM; goto fail; }
        n++;
        rc = DG_EMODEL;
        if (dg_st_find(st, tmp[n - 1].name)) {
            snprintf(err, errlen, "%s: tensor \"%s\" appears twice", label, tmp[n - 1].name);
            goto fail;
        }
    }
    if (!seeded && (rc = check_disjoint(tmp, n, label, err, errlen)) < 0) goto fail;
    if (!seeded) {
        /* the data ends with the last tensor's, as the reference library requires
         * (MetadataIncompleteBuffer): bytes beyond it were copied into memory with the rest (a
         * file grown by 3 GB loaded, its resident size 70 times the weights') */
        size_t end = 0;
        for (size_t i = 0; i < n; i++)
            if (tmp[i].nbytes && (size_t)((const uint8_t *)tmp[i].data - payload) + tmp[i].nbytes > end)
                end = (size_t)((const uint8_t *)tmp[i].data - payload) + tmp[i].nbytes;
        if (end != payload_len) {
            snprintf(err, errlen, "%s: %zu bytes after the last tensor's data (the file is %zu bytes; its tensors end at "
                     "%zu)", label, payload_len - end, size, (size_t)8 + (size_t)hlen + end);
            rc = DG_EMODEL;
            goto fail;
        }
    }
    if (seeded && (rc = seed_payload(st, seeded, tmp, n, label, err, errlen)) < 0) goto fail;
    rc = DG_EMODEL;
    qsort(tmp, n, sizeof *tmp, by_name);
    for (size_t i = 1; i < n; i++)
        if (!strcmp(tmp[i - 1].name, tmp[i].name)) {   /* two prefixes normalised to one name */
            snprintf(err, errlen, "%s: tensor \"%s\" appears twice", label, tmp[i].name);
            goto fail;
        }
    if (st->n + n > st->cap) {
        size_t cap = st->n + n + 64;
        dg_st_tensor *nt = realloc(st->tensors, cap * sizeof *nt);
        if (!nt) { rc = DG_ENOMEM; goto fail; }
        st->tensors = nt;
        st->cap = cap;
    }
    if (n) {   /* a header without tensors adds nothing (and tensors may still be NULL) */
        memcpy(st->tensors + st->n, tmp, n * sizeof *tmp);
        st->n += n;
        qsort(st->tensors, st->n, sizeof *st->tensors, by_name);
    }
    free(tmp);
    json_decref(root);
    return 0;
fail:
    for (size_t i = 0; i < n; i++) free(tmp[i].name);
    free(tmp);
    json_decref(root);
    return rc;
}

#define HUGE_PAGE ((size_t)2 << 20)

/* Whether the kernel gives transparent huge pages to a madvise'd region. */
static int thp_offered(void) {
    static int offered = -1;
    if (offered < 0) {
        char line[128] = "";
        FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
        if (f) {
            if (!fgets(line, sizeof line, f)) line[0] = 0;
            fclose(f);
        }
        offered = line[0] && !strstr(line, "[never]");
    }
    return offered;
}

/* The file of fd (size bytes) read into anonymous memory advised as huge pages, read-only
 * afterwards; the mapping goes to st's maps. The file starts 0-63 bytes past a 2 MiB
 * boundary, so that its data section (after the 8-byte length and the header) starts on a
 * 64-byte line: the format aligns it to 8 only, and a matrix of rows of whole lines (any
 * bf16 row of a multiple of 32 values) then has every row on a line. */
static int read_huge(dg_st *st, int fd, const char *path, size_t size, const uint8_t **data, char *err,
                     size_t errlen) {
    uint8_t h8[8];
    uint64_t hlen = 0;
    if (pread(fd, h8, 8, 0) == 8)
        for (int i = 0; i < 8; i++) hlen |= (uint64_t)h8[i] << (8 * i);
    const size_t shift = hlen < size ? (64 - (size_t)((8 + hlen) % 64)) % 64 : 0;
    const size_t len = (size + shift + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    uint8_t *raw = mmap(NULL, len + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        snprintf(err, errlen, "%s: %zu MiB for its weights: %s", path, size >> 20, strerror(errno));
        return DG_ENOMEM;
    }
    uint8_t *p = (uint8_t *)(((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (p > raw) munmap(raw, (size_t)(p - raw));                        /* the unaligned head */
    if (raw + len + HUGE_PAGE > p + len) munmap(p + len, (size_t)(raw + len + HUGE_PAGE - (p + len)));
    madvise(p, len, MADV_HUGEPAGE);   /* advice: without it the copy is still right */
    for (size_t got = 0; got < size;) {
        if (got && st->tick) st->tick(st->tick_user, (double)got / (double)size);
        const ssize_t r = pread(fd, p + shift + got, size - got > ((size_t)256 << 20) ? (size_t)256 << 20 : size - got,
                                (off_t)got);
        if (r <= 0) {
            snprintf(err, errlen, "%s: read at byte %zu: %s", path, got, r < 0 ? strerror(errno) : "unexpected end of file");
            munmap(p, len);
            return DG_EMODEL;
        }
        got += (size_t)r;
    }
    if (st->tick) st->tick(st->tick_user, 1.0);
    mprotect(p, len, PROT_READ);
    if (add_map(st, p, len) < 0) { munmap(p, len); return DG_ENOMEM; }
    *data = p + shift;
    return 0;
}

static int map_file(dg_st *st, const char *path, const uint8_t **data, size_t *size, char *err,
                    size_t errlen) {
    char why[128];
    int fd = dg_open_regular(path, why, sizeof why);
    if (fd < 0) {
        snprintf(err, errlen, "%s: %s", path, why);
        return DG_EMODEL;
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        close(fd);
        return DG_EMODEL;
    }
    if (sb.st_size < 8) {
        snprintf(err, errlen, "%s: file shorter than 8 bytes", path);
        close(fd);
        return DG_EMODEL;
    }
    if ((st->flags & DG_ST_HUGEPAGES) && thp_offered()) {
        const int rc = read_huge(st, fd, path, (size_t)sb.st_size, data, err, errlen);
        close(fd);
        if (rc < 0) return rc;
        *size = (size_t)sb.st_size;
        return 0;
    }
    void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        snprintf(err, errlen, "%s: mmap: %s", path, strerror(errno));
        return DG_EMODEL;
    }
    if (add_map(st, p, (size_t)sb.st_size) < 0) { munmap(p, (size_t)sb.st_size); return DG_ENOMEM; }
    *data = p;
    *size = (size_t)sb.st_size;
    return 0;
}

static int add_file(dg_st *st, const char *path, char *err, size_t errlen) {
    const uint8_t *data;
    size_t size;
    int rc = map_file(st, path, &data, &size, err, errlen);
    if (rc < 0) return rc;
    return dg_st_add_buffer(st, data, size, path, err, errlen);
}

/* Every distinct shard named by the index's weight_map, each mapped once. */
static int add_index(dg_st *st, const char *index_path, char *err, size_t errlen) {
    json_error_t je;
    json_t *root, *map;
    int rc = dg_json_load_file(index_path, 0, &root, &je);
    if (rc == DG_ENOMEM) {
        snprintf(err, errlen, "%s: out of memory reading it", index_path);
        return rc;
    }
    rc = DG_EMODEL;
    char dir[4096], path[4096 + 256];
    snprintf(dir, sizeof dir, "%s", index_path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0; else snprintf(dir, sizeof dir, ".");
    if (!root && je.line < 1) {   /* not read at all: its reason */
        snprintf(err, errlen, "%s: %s", index_path, je.text);
        goto out;
    }
    if (!root || !json_is_object(map = json_object_get(root, "weight_map"))) {
        snprintf(err, errlen, "%s: not an index with a weight_map (%s)", index_path, root ? "" : je.text);
        goto out;
    }
    const char **seen = calloc(json_object_size(map) + 1, sizeof *seen);
    size_t n_seen = 0;
    const char *key;
    json_t *v;
    if (!seen) {
        snprintf(err, errlen, "%s: out of memory", index_path);
        rc = DG_ENOMEM;
        goto out;
    }
    json_object_foreach(map, key, v) {
        const char *file = json_string_value(v);
        if (!file || strchr(file, '/')) {
            snprintf(err, errlen, "%s: weight_map entry \"%s\" is not a file name", index_path, key);
            free(seen);
            goto out;
        }
        size_t i = 0;
        while (i < n_seen && strcmp(seen[i], file)) i++;
        if (i < n_seen) continue;
        seen[n_seen++] = file;
        snprintf(path, sizeof path, "%s/%s", dir, file);
        if ((rc = add_file(st, path, err, errlen)) < 0) { free(seen); goto out; }
    }
    free(seen);
    /* every name of the index must have been found in its shard */
    json_object_foreach(map, key, v) {
        char *n = normalise_name(key);
        const dg_st_tensor *t = n ? dg_st_find(st, n) : NULL;
        free(n);
        if (!t) {
            snprintf(err, errlen, "%s: tensor \"%s\" listed in the index is missing from \"%s\"",
                     index_path, key, json_string_value(v));
            rc = DG_EMODEL;
            goto out;
        }
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int dg_st_open(const char *path, dg_st **out, char *err, size_t errlen) {
    return dg_st_open_flags(path, 0, NULL, NULL, out, err, errlen);
}

int dg_st_open_flags(const char *path, int flags, dg_st_tick tick, void *user, dg_st **out, char *err,
                     size_t errlen) {
    dg_st *st;
    struct stat sb;
    char buf[4096];
    int rc;
    *out = NULL;
    if ((rc = dg_st_new(&st)) < 0) return rc;
    st->flags = flags;
    st->tick = tick;
    st->tick_user = user;
    if (!(st->path = strdup(path))) { dg_st_close(st); return DG_ENOMEM; }
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        /* Hugging Face's names (transformers), then diffusers' */
        static const char *stems[] = {"model", "diffusion_pytorch_model"};
        rc = 1;
        /* a name present (lstat: a link to nowhere, a file we may not read) is opened, and
         * what is wrong with it said: it was "no model.safetensors" */
        struct stat lb;
        for (int i = 0; i < 2 && rc > 0; i++) {
            snprintf(buf, sizeof buf, "%s/%s.safetensors.index.json", path, stems[i]);
            if (lstat(buf, &lb) == 0) {
                rc = add_index(st, buf, err, errlen);
                break;
            }
            snprintf(buf, sizeof buf, "%s/%s.safetensors", path, stems[i]);
            if (lstat(buf, &lb) == 0) rc = add_file(st, buf, err, errlen);
        }
        if (rc > 0) {
            snprintf(err, errlen, "%s: no model.safetensors or diffusion_pytorch_model.safetensors "
                     "(nor their .index.json)", path);
            rc = DG_EMODEL;
        }
    } else {
        size_t l = strlen(path);
        rc = l > 5 && !strcmp(path + l - 5, ".json") ? add_index(st, path, err, errlen)
                                                    : add_file(st, path, err, errlen);
    }
    if (rc < 0) { dg_st_close(st); return rc; }
    *out = st;
    return 0;
}

const dg_st_tensor *dg_st_find(const dg_st *st, const char *name) {
    size_t lo = 0, hi = st->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(st->tensors[mid].name, name);
        if (c == 0) return &st->tensors[mid];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

size_t dg_st_count(const dg_st *st) { return st->n; }
const dg_st_tensor *dg_st_at(const dg_st *st, size_t i) { return i < st->n ? &st->tensors[i] : NULL; }
