/* connector.c — writes DIR/connector.safetensors: the projection from the MLLM's condition
 * layers to the DiT's context (docs/DESIGN.md §6; docs/specs/duogen_paper.md §1.4: Cosmos-Predict2.5's
 * crossattn_proj = Linear(L·D → d_cond, bias) + GELU over all L decoder layers).
 *
 * Reads L (num_hidden_layers) and D (hidden_size) from DIR/mllm/config.json, so it follows
 * whatever mllm.c wrote; d_cond is the DiT's text_embed_dim. bf16 like the published
 * Cosmos weights. Init: the inputs are per-token standardized (unit variance per channel),
 * so N(0, 1/(L·D)) gives unit-scale outputs. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mkmodel.h"

int mk_write_connector(const char *dir, mk_preset preset, uint64_t seed, char *err, size_t errlen) {
    char path[4096];
    json_error_t je;
    snprintf(path, sizeof path, "%s/mllm/config.json", dir);
    json_t *j = json_load_file(path, 0, &je);
    if (!j) {
        snprintf(err, errlen, "%s: %s", path, je.text);
        return -1;
    }
    const int64_t L = json_integer_value(json_object_get(j, "num_hidden_layers"));
    const int64_t D = json_integer_value(json_object_get(j, "hidden_size"));
    json_decref(j);
    const int64_t d_cond = mk_dit_text_dim(preset), w[2] = {d_cond, L * D};
    mk_list l = {0};
    int rc = -1;
    if (L < 1 || D < 1) {
        snprintf(err, errlen, "%s: no num_hidden_layers/hidden_size", path);
        return -1;
    }
    if (mk_add(&l, DG_DTYPE_BF16, 0.0, 1.0 / sqrt((double)(L * D)), "crossattn_proj.0.weight", 2, w) ||
        mk_add(&l, DG_DTYPE_BF16, 0.0, 0.1, "crossattn_proj.0.bias", 1, &d_cond)) {
        snprintf(err, errlen, "connector: out of memory");
        goto out;
    }
    /* st_write names its single file model.safetensors: write into a scratch directory name
     * and move it to the package root as connector.safetensors */
    char sub[4096], from[4200], to[4096];
    snprintf(sub, sizeof sub, "%s/.connector", dir);
    if (mkdir(sub, 0755) < 0 && errno != EEXIST) {
        snprintf(err, errlen, "%s: %s", sub, strerror(errno));
        goto out;
    }
    if (st_write(sub, &l, seed, (size_t)1 << 40, err, errlen) < 0) goto out;
    snprintf(from, sizeof from, "%s/model.safetensors", sub);
    snprintf(to, sizeof to, "%s/connector.safetensors", dir);
    if (rename(from, to) < 0 || rmdir(sub) < 0) {
        snprintf(err, errlen, "%s: %s", to, strerror(errno));
        goto out;
    }
    rc = 0;
out:
    mk_list_free(&l);
    return rc;
}
