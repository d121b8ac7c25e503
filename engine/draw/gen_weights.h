/* gen_weights.h — weight binding and config reading shared by the image-generation
 * components (vae.c, dit.c, connector.c). Not a public interface.
 *
 * Every bind checks the tensor's exact shape; the error names the tensor, the expected
 * and the found shape. Weights are widened to fp32 copies in backend memory, so the
 * checkpoint can be closed after load (the DiT's matrices stay dg_weight views instead). */
#ifndef DG_GEN_WEIGHTS_H
#define DG_GEN_WEIGHTS_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "io/safetensors.h"

/* A list of backend buffers a component owns, released together. */
typedef struct {
    void **p;
    int    n, cap;
} dg_gw_owned;

/* Finds `name` and checks its shape [shape[0], ..]. DG_EMODEL with a message otherwise. */
int  dg_gw_find(const dg_st *st, const char *name, const int64_t *shape, int n_dims,
                const dg_st_tensor **out, char *err, size_t errlen);
/* A fp32 copy of the tensor in backend memory (owned by `own`). When kt_first is set the
 * tensor is a 5-D conv weight [o, i, kt, kh, kw] and is stored as [o, kt, i, kh, kw]. */
int  dg_gw_upload(dg_backend *be, dg_gw_owned *own, const dg_st_tensor *t, int kt_first,
                  float **out, char *err, size_t errlen);
void dg_gw_release(dg_backend *be, dg_gw_owned *own);   /* accepts an empty list */

/* config.json readers: DG_EMODEL naming the key when it is missing (required) or of the
 * wrong type. */
int  dg_gw_json_int(json_t *root, const char *key, int def, int required, int *out,
                    const char *label, char *err, size_t errlen);
int  dg_gw_json_float(json_t *root, const char *key, double def, float *out, const char *label,
                      char *err, size_t errlen);
/* An array of up to max numbers (as float) or booleans/ints (as int); n receives the count. */
int  dg_gw_json_floats(json_t *root, const char *key, float *out, int max, int *n,
                       const char *label, char *err, size_t errlen);
int  dg_gw_json_ints(json_t *root, const char *key, int *out, int max, int *n, const char *label,
                     char *err, size_t errlen);

#endif
