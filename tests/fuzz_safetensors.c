/* libFuzzer target: the safetensors header parser and config.json reader on arbitrary
 * bytes. Every input must give 0 or a DG_E* error, never a crash or an out-of-bounds read
 * (ASan); a parsed tensor must lie inside the input, hold exactly its shape's elements
 * (the product taken in 128 bits: a count that wrapped 64 was once taken as empty), and
 * share no byte with another tensor of the file. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mllm/qwen2vl_config.h"
#include "io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256];
    dg_st *st;
    if (dg_st_new(&st) < 0) return 0;
    if (dg_st_add_buffer(st, data, size, "fuzz", err, sizeof err) == 0) {
        for (size_t i = 0; i < dg_st_count(st); i++) {
            const dg_st_tensor *t = dg_st_at(st, i);
            const uint8_t *p = t->data;
            if (p < data || p + t->nbytes > data + size) abort();
            if (t->nbytes) (void)*(volatile const uint8_t *)(p + t->nbytes - 1);
            unsigned __int128 numel = 1;
            for (int d = 0; d < t->n_dims; d++) numel *= (unsigned __int128)(uint64_t)t->shape[d];
            if (numel * dg_dtype_size(t->dtype) != (unsigned __int128)t->nbytes) abort();
            for (size_t k = 0; k < i; k++) {
                const dg_st_tensor *o = dg_st_at(st, k);
                const uint8_t *q = o->data;
                if (t->nbytes && o->nbytes && p < q + o->nbytes && q < p + t->nbytes) abort();
            }
        }
    }
    dg_st_close(st);
    dg_qwen2vl_config c;
    dg_config_parse((const char *)data, size, "fuzz", &c, err, sizeof err);
    return 0;
}
