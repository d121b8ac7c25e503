/* libFuzzer target: the safetensors header parser and config.json reader on arbitrary
 * bytes. Every input must give 0 or a DG_E* error, never a crash or an out-of-bounds read
 * (ASan), and a parsed tensor must lie inside the input. */
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
        }
    }
    dg_st_close(st);
    dg_qwen2vl_config c;
    dg_config_parse((const char *)data, size, "fuzz", &c, err, sizeof err);
    return 0;
}
