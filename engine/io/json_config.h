/* json_config.h — typed readers of config.json keys (jansson), for the components whose
 * config is a flat object of numbers and arrays (the DiT's and the VAE's).
 *
 * Each returns 0 or DG_EMODEL with a message "LABEL: ..." naming the key (label is the
 * file, usually). */
#ifndef DG_JSON_CONFIG_H
#define DG_JSON_CONFIG_H

#include <jansson.h>
#include <stddef.h>

/* jansson's parses, through the engine's allocator (set once, before the first of them): a
 * failed allocation inside jansson is one like any other, told from text that is not JSON.
 * Return 0 (*out set), DG_ENOMEM, or DG_EMODEL (*je says where and why). */
int dg_json_load_file(const char *path, size_t flags, json_t **out, json_error_t *je);
int dg_json_loadb(const char *buf, size_t len, size_t flags, json_t **out, json_error_t *je);
/* A failed parse's reason: "line L column C: what", or what alone where the file could not
 * be read (dg_open_regular's reason: "Permission denied", "not a regular file (a FIFO)"). */
const char *dg_json_why(const json_error_t *je, char *buf, size_t n);

/* A non-negative integer (at most 2^30); absent or null: def, or an error when required. */
int dg_json_int(json_t *root, const char *key, int def, int required, int *out,
                const char *label, char *err, size_t errlen);
/* A number; absent or null: def. */
int dg_json_float(json_t *root, const char *key, double def, float *out, const char *label,
                  char *err, size_t errlen);
/* An array of up to max numbers (as float) or booleans/integers (as int); *n receives the
 * count. The array is required. */
int dg_json_floats(json_t *root, const char *key, float *out, int max, int *n,
                   const char *label, char *err, size_t errlen);
int dg_json_ints(json_t *root, const char *key, int *out, int max, int *n, const char *label,
                 char *err, size_t errlen);
/* The model a file says it is (transformers' model_type, diffusers' _class_name): absent, or
 * the string want; another name is another network, refused (its tensors could bind by
 * name and shape and compute something else). */
int dg_json_name(json_t *root, const char *key, const char *want, const char *label, char *err, size_t errlen);

#endif
