/* mkmodel.h — pieces shared by the model package writers of build/mkmodel.
 *
 * A writer (mllm.c today; dit/vae/connector writers later, each in its own file) lists
 * its tensors with an initialiser each, then st_write() generates and writes them. Every
 * value comes from a counter-based RNG keyed by (seed, tensor name) and is computed with
 * integer arithmetic and one correctly rounded multiply-add, so the bytes are the same on
 * every machine and do not depend on the order in which tensors are listed. */
#ifndef DG_MKMODEL_H
#define DG_MKMODEL_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

typedef enum {
    MK_NORMAL,       /* mean + std * z, z ~ approximately N(0, 1) (Irwin-Hall of 4 uniforms) */
} mk_init;

typedef struct {
    char     name[128];
    dg_dtype dtype;
    int      n_dims;
    int64_t  shape[5];
    mk_init  init;
    double   mean, std;
} mk_tensor;

typedef struct {
    mk_tensor *t;   /* owned */
    int        n, cap;
} mk_list;

/* The Qwen2.5-VL chat template (chat_template.jinja, NUL-terminated; chat_template.c). */
extern const char mk_chat_template[];

int  mk_add(mk_list *l, dg_dtype dtype, double mean, double std, const char *name, int n_dims,
            const int64_t *shape);
void mk_list_free(mk_list *l);

/* --seeded: every safetensors file is its header alone, marked "duogen.seeded" with the
 * seed; the engine fills such tensors from the seed at load, and only with
 * DG_SEEDED_WEIGHTS=1 (benchmarks of the full preset without 20 GB of files). */
extern int mk_seeded;

/* Writes the tensors as DIR/model.safetensors, or as model-0000k-of-0000n.safetensors
 * shards of at most max_shard_bytes plus model.safetensors.index.json when they do not
 * fit in one. 0 or -1 with a message in err. */
int  st_write(const char *dir, const mk_list *l, uint64_t seed, size_t max_shard_bytes,
              char *err, size_t errlen);

/* Writes `text` to DIR/name. */
int  mk_write_text(const char *dir, const char *name, const char *text, char *err, size_t errlen);
/* Copies SRC_DIR/name to DIR/name. */
int  mk_copy_file(const char *src_dir, const char *dir, const char *name, char *err, size_t errlen);

typedef enum { MK_TINY, MK_SMALL, MK_FULL } mk_preset;

/* DIR/mllm: config.json, weights, tokenizer, preprocessor and generation configs. */
int  mk_write_mllm(const char *dir, mk_preset preset, uint64_t seed, const char *vocab_dir,
                   char *err, size_t errlen);

/* Writes the tensors as DIR/diffusion_pytorch_model.safetensors (diffusers' name). */
int  mk_write_diffusers(const char *dir, const mk_list *l, uint64_t seed, char *err, size_t errlen);
/* DIR/vae (AutoencoderKLWan), DIR/dit (CosmosTransformer3DModel), DIR/connector.safetensors
 * (presets whose DiT has no crossattn_proj of its own). */
int  mk_write_vae(const char *dir, mk_preset preset, uint64_t seed, char *err, size_t errlen);
int  mk_write_dit(const char *dir, mk_preset preset, uint64_t seed, char *err, size_t errlen);
int  mk_dit_text_dim(mk_preset preset);   /* the DiT's context width: the connector's output */
int  mk_dit_has_projection(mk_preset preset);   /* the DiT carries crossattn_proj (full) */
int  mk_write_connector(const char *dir, mk_preset preset, uint64_t seed, char *err, size_t errlen);
/* DIR/duogen.json for the components present, and <BOV> in mllm/tokenizer_config.json. */
int  mk_write_package(const char *dir, mk_preset preset, char *err, size_t errlen);

#endif
