/* mkmodel — writes a model package with random weights from a seed (DESIGN §5).
 *
 *   mkmodel --preset tiny|small|full --seed N --out DIR [--vocab DIR] [--seeded]
 *
 * --seeded writes every file but the weights' data: the safetensors files are headers
 * marked with the seed, which the engine fills with random values at load when
 * DG_SEEDED_WEIGHTS=1 (safetensors.h). For benchmarks of the full preset (20 GB otherwise).
 *
 * DIR/mllm/ is a Qwen2.5-VL package in the Hugging Face layout. --vocab DIR copies the real
 * Qwen2 tokenizer files (vocab.json, merges.txt, tokenizer_config.json) and sizes the
 * embedding for it; without it a small byte-level vocabulary of its own is written.
 * The same arguments give the same bytes on every machine. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mkmodel.h"

static int usage(void) {
    fprintf(stderr, "usage: mkmodel --preset tiny|small|full --seed N --out DIR [--vocab DIR] [--seeded]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *preset = NULL, *out = NULL, *vocab = NULL;
    uint64_t seed = 0;
    int have_seed = 0;
    char err[512];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seeded")) { mk_seeded = 1; continue; }
        if (i + 1 >= argc) return usage();
        if (!strcmp(argv[i], "--preset")) preset = argv[++i];
        else if (!strcmp(argv[i], "--out")) out = argv[++i];
        else if (!strcmp(argv[i], "--vocab")) vocab = argv[++i];
        else if (!strcmp(argv[i], "--seed")) { seed = strtoull(argv[++i], NULL, 0); have_seed = 1; }
        else return usage();
    }
    if (!preset || !out || !have_seed) return usage();
    /* --vocab ../shared/vocab (the folder of vocabularies) means its qwen2/ */
    char vocab_dir[4096];
    if (vocab) {
        snprintf(vocab_dir, sizeof vocab_dir, "%s/vocab.json", vocab);
        if (access(vocab_dir, R_OK) == 0) {
            snprintf(vocab_dir, sizeof vocab_dir, "%s", vocab);
        } else {
            snprintf(vocab_dir, sizeof vocab_dir, "%s/qwen2", vocab);
            char probe[4200];
            snprintf(probe, sizeof probe, "%s/vocab.json", vocab_dir);
            if (access(probe, R_OK) != 0) {
                fprintf(stderr, "mkmodel: --vocab \"%s\": no vocab.json there or in qwen2/\n", vocab);
                return 1;
            }
        }
        vocab = vocab_dir;
    }
    mk_preset p;
    if (!strcmp(preset, "tiny")) p = MK_TINY;
    else if (!strcmp(preset, "small")) p = MK_SMALL;
    else if (!strcmp(preset, "full")) p = MK_FULL;
    else return usage();
    if (mk_write_mllm(out, p, seed, vocab, err, sizeof err) < 0 ||
        mk_write_vae(out, p, seed, err, sizeof err) < 0 ||
        mk_write_dit(out, p, seed, err, sizeof err) < 0 ||
        mk_write_connector(out, p, seed, err, sizeof err) < 0 ||
        mk_write_package(out, p, err, sizeof err) < 0) {
        fprintf(stderr, "mkmodel: %s\n", err);
        return 1;
    }
    printf("mkmodel: wrote %s (preset %s, seed %" PRIu64 ", %s vocabulary%s)\n", out, preset,
           seed, vocab ? "Qwen2" : "own", mk_seeded ? ", seeded: headers only" : "");
    return 0;
}
