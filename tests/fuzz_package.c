/* libFuzzer target: a model package's JSON files on arbitrary bytes. The first byte picks
 * one of the package's JSON files (duogen.json, the decoder's config, generation,
 * preprocessor and tokenizer configs and vocabulary, the DiT's and the VAE's configs), the
 * rest replaces it in a tiny package (build/mkmodel --preset tiny --vocab own, written once
 * under /tmp); dg_model_open must open it or refuse it with a DG_E* code and a message,
 * never crash, leak or read out of bounds (ASan, UBSan), and a package it opens must
 * describe itself. Seeds: tests/fuzz-seeds/fuzz_package (each file as mkmodel writes it,
 * and duogen.json with a published pipeline's "condition"). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "duogen.h"

#ifndef FUZZ_MKMODEL
#define FUZZ_MKMODEL "build/mkmodel"
#endif

static const char *files[] = {"duogen.json",
                              "mllm/config.json",
                              "mllm/generation_config.json",
                              "mllm/preprocessor_config.json",
                              "mllm/tokenizer_config.json",
                              "mllm/vocab.json",
                              "dit/config.json",
                              "vae/config.json"};
enum { N_FILES = sizeof files / sizeof files[0] };

static char root[] = "/tmp/dg-fuzz-package-XXXXXX", pkg[64];
static char *orig[N_FILES];
static size_t orig_len[N_FILES];

static void cleanup(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    if (system(cmd)) fprintf(stderr, "fuzz_package: cannot remove %s\n", root);
}

static int put(int k, const uint8_t *data, size_t len) {
    char path[160];
    snprintf(path, sizeof path, "%s/%s", pkg, files[k]);
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t n = fwrite(data, 1, len, f);
    return fclose(f) == 0 && n == len ? 0 : -1;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    char cmd[256];
    if (!mkdtemp(root)) {
        perror("fuzz_package: mkdtemp");
        exit(1);
    }
    atexit(cleanup);
    snprintf(pkg, sizeof pkg, "%s/p", root);
    snprintf(cmd, sizeof cmd, "%s --preset tiny --seed 1 --vocab own --out %s >/dev/null", FUZZ_MKMODEL, pkg);
    if (system(cmd)) {
        fprintf(stderr, "fuzz_package: %s failed (build it first: make build/mkmodel)\n", cmd);
        exit(1);
    }
    for (int k = 0; k < N_FILES; k++) {
        char path[160];
        snprintf(path, sizeof path, "%s/%s", pkg, files[k]);
        FILE *f = fopen(path, "rb");
        if (!f || fseek(f, 0, SEEK_END) || (long)(orig_len[k] = (size_t)ftell(f)) < 0 || fseek(f, 0, SEEK_SET) ||
            !(orig[k] = malloc(orig_len[k] + 1)) || fread(orig[k], 1, orig_len[k], f) != orig_len[k]) {
            fprintf(stderr, "fuzz_package: cannot read %s\n", path);
            exit(1);
        }
        fclose(f);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!size) return 0;
    const int k = data[0] % N_FILES;
    if (put(k, data + 1, size - 1) < 0) abort();
    dg_model *m = NULL;
    char err[512] = "";
    int rc = dg_model_open(pkg, &(dg_model_opts){.device = "cpu", .threads = 1, .cpu_mapped_weights = 1}, &m, err,
                           sizeof err);
    if (rc == 0) {
        if (!dg_model_describe(m)[0]) abort();
        dg_model_close(m);
    } else if (rc > 0 || !err[0]) {
        abort();   /* a refusal is a DG_E* code that says why */
    }
    if (put(k, (const uint8_t *)orig[k], orig_len[k]) < 0) abort();
    return 0;
}
