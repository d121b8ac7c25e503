/* safetensors.h — read-only access to safetensors checkpoints by memory map.
 *
 * A dg_st is a set of tensors gathered from one file, from the shards listed by a
 * `*.safetensors.index.json`, or from memory buffers (tests, fuzzing). Tensor data stays
 * in the mapping: nothing is copied (dg_st_open_flags can read files into huge pages). Names are normalised once, at parse time, to the
 * published layout (docs/specs/qwen2_5_vl.md §2.2): a leading `model.language_model.` becomes
 * `model.`, a leading `model.visual.` becomes `visual.`.
 *
 *     dg_st *st; char err[256];
 *     if (dg_st_open("pkg/mllm", &st, err, sizeof err) < 0) ...;
 *     const dg_st_tensor *t = dg_st_find(st, "model.norm.weight");
 *     dg_st_close(st);
 *
 * Every header is validated before use (JSON shape, dtype, offsets inside the file, byte
 * size = product of the shape times the element size, no overlap with the header), so a
 * truncated or hostile file gives DG_EMODEL and a message, never a read out of bounds. */
#ifndef DG_SAFETENSORS_H
#define DG_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

#define DG_ST_MAX_DIMS 8

typedef struct {
    char       *name;                     /* owned by the dg_st; normalised */
    dg_dtype    dtype;
    int         n_dims;
    int64_t     shape[DG_ST_MAX_DIMS];
    const void *data;                     /* borrowed from the mapping or buffer */
    size_t      nbytes;
    int64_t     kb;                       /* 0: as stored; else its layout since dg_st_rewrite */
} dg_st_tensor;

typedef struct dg_st dg_st;

/* Opens `path`: a directory (the first present of model.safetensors.index.json,
 * model.safetensors, diffusion_pytorch_model.safetensors.index.json and
 * diffusion_pytorch_model.safetensors: the transformers and diffusers names, unsharded or
 * sharded), an index file, or a single .safetensors file. */
int  dg_st_open(const char *path, dg_st **out, char *err, size_t errlen);

/* The same with flags: DG_ST_HUGEPAGES reads each file into anonymous memory in 2 MiB
 * transparent huge pages (madvise) instead of mapping it, where the kernel offers them
 * (/sys/kernel/mm/transparent_hugepage/enabled not "never"; else the file is mapped). For a
 * CPU backend, which reads weights in place: a decode streams them without a TLB miss and a
 * restart of the hardware prefetcher every 4 KiB (engine/MODELS.md). The data are copied
 * once at open; the page cache keeps the file, the process's resident size is the same. */
#define DG_ST_HUGEPAGES 1
/* tick (may be NULL) is called with user after every 256 MiB read into huge pages and at
 * the end of each file, with the share of the file read so far (1 at its end): a long read
 * from a cold disk can keep a supervisor told that the process is alive
 * (dg_model_opts.progress). */
typedef void (*dg_st_tick)(void *user, double done);
int  dg_st_open_flags(const char *path, int flags, dg_st_tick tick, void *user, dg_st **out, char *err,
                      size_t errlen);
void dg_st_close(dg_st *st);   /* accepts NULL */

/* An empty set, and the parser behind dg_st_open: adds the tensors of one safetensors
 * image held in [data, data+size) (borrowed: it must outlive the set). `label` names the
 * file in messages. On error the set is unchanged. */
int  dg_st_new(dg_st **out);
int  dg_st_add_buffer(dg_st *st, const uint8_t *data, size_t size, const char *label,
                      char *err, size_t errlen);

/* Lookup by (normalised) name; NULL when absent. Load-time only: O(log n). */
const dg_st_tensor *dg_st_find(const dg_st *st, const char *name);
size_t              dg_st_count(const dg_st *st);
const dg_st_tensor *dg_st_at(const dg_st *st, size_t i);

/* Whether some file of the set was a seeded one: a checkpoint header without data, written
 * by `mkmodel --seeded` for benchmarks of the full-size package, whose tensors point into
 * shared blocks of random values made at load (see safetensors.c). Such files are refused
 * with DG_EMODEL unless the environment has DG_SEEDED_WEIGHTS=1: a worker never runs
 * seeded weights by accident. */
int dg_st_seeded(const dg_st *st);

/* The path dg_st_open was given (the component's directory, an index or a file), which
 * load errors name; NULL for a set of buffers (dg_st_new). */
const char *dg_st_path(const dg_st *st);

/* Lets rewrite(ctx, data) change t's bytes where they lie (data: t->data, writable during
 * the call), for a backend that reads a matrix in place in another layout (the blocked one
 * of kb columns, backend.h): the file's memory is the set's own (read into huge pages, or a
 * private map: the pages written become the process's), made writable for the call and
 * read-only again. Returns 0 with t->kb = kb (also when it already was), 1 when the set
 * cannot (the tensor lies in a buffer the set borrows, dg_st_add_buffer, or is in another
 * layout already: the caller copies it), or rewrite's negative return (t unchanged in its
 * record). A seeded file's tensors are only marked: their values are random, and read in
 * another order they are as random. Load time only (it writes *t). */
int dg_st_rewrite(const dg_st *st, const dg_st_tensor *t, int64_t kb, int (*rewrite)(void *ctx, void *data),
                  void *ctx);

/* "[896, 151936]" into buf. */
const char *dg_st_shape_str(const int64_t *shape, int n_dims, char *buf, size_t len);

#endif
