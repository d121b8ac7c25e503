/* mkmodel — writes a model package with random weights from a seed (docs/DESIGN.md §5).
 *
 *   mkmodel --preset tiny|small|full --seed N --out DIR [--vocab DIR|own] [--seeded]
 *
 * --seeded writes every file but the weights' data: the safetensors files are headers
 * marked with the seed, which the engine fills with random values at load when
 * DG_SEEDED_WEIGHTS=1 (safetensors.h). For benchmarks of the full preset (20 GB otherwise).
 *
 * DIR/mllm/ is a Qwen2.5-VL package in the Hugging Face layout with the real Qwen2 tokenizer
 * files (vocab.json, merges.txt, tokenizer_config.json) and an embedding sized for them:
 * by default the copy the project carries (tools/mkmodel/vocab/qwen2/, found from the
 * executable: build/mkmodel in a checkout, $PREFIX/bin/mkmodel installed), or --vocab DIR.
 * --vocab own writes a small byte-level vocabulary of its own instead (fast tests).
 * The same arguments give the same bytes on every machine. */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mkmodel.h"

/* The vocabulary the project carries, from the executable's place: build/mkmodel ->
 * tools/mkmodel/vocab/qwen2 of the checkout; $PREFIX/bin/mkmodel ->
 * $PREFIX/share/duogen/vocab/qwen2. 0, or -1 with the places tried in out. */
static int find_vocab(char *out, size_t len) {
    static const char *const where[] = {"%s/../tools/mkmodel/vocab/qwen2", "%s/../share/duogen/vocab/qwen2"};
    char exe[PATH_MAX], probe[PATH_MAX + 128];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        snprintf(out, len, "/proc/self/exe unreadable");
        return -1;
    }
    exe[n] = 0;
    *strrchr(exe, '/') = 0;
    for (size_t i = 0; i < sizeof where / sizeof where[0]; i++) {
        snprintf(out, len, where[i], exe);
        snprintf(probe, sizeof probe, "%s/vocab.json", out);
        if (access(probe, R_OK) == 0) return 0;
    }
    snprintf(out, len, "looked in %s/../tools/mkmodel/vocab/qwen2 and %s/../share/duogen/vocab/qwen2", exe, exe);
    return -1;
}

/* The usage: asked for (--help), on standard output and exit 0; else on standard error, 2. */
static int usage(int asked) {
    fprintf(asked ? stdout : stderr, "usage: mkmodel --preset tiny|small|full --seed N --out DIR [--vocab DIR|own] [--seeded]\n");
    return asked ? 0 : 2;
}

int main(int argc, char **argv) {
    const char *preset = NULL, *out = NULL, *vocab = NULL;
    uint64_t seed = 0;
    int have_seed = 0;
    char err[512];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return usage(1);
        if (!strcmp(argv[i], "--seeded")) { mk_seeded = 1; continue; }
        if (i + 1 >= argc) return usage(0);
        if (!strcmp(argv[i], "--preset")) preset = argv[++i];
        else if (!strcmp(argv[i], "--out")) out = argv[++i];
        else if (!strcmp(argv[i], "--vocab")) vocab = argv[++i];
        else if (!strcmp(argv[i], "--seed")) {
            const char *v = argv[++i];
            char *end;
            errno = 0;
            seed = v[0] >= '0' && v[0] <= '9' ? strtoull(v, &end, 10) : 0;
            if (v[0] < '0' || v[0] > '9' || *end || errno) {
                fprintf(stderr, "mkmodel: --seed \"%s\": not a decimal integer in 0..%llu\n", v, ULLONG_MAX);
                return 2;
            }
            have_seed = 1;
        }
        else return usage(0);
    }
    if (!preset || !out || !have_seed) return usage(0);
    /* a new package in a folder of its own: one that holds anything (another package, an
     * import's links into a published checkpoint) is not written over */
    DIR *d = opendir(out);
    if (d) {
        struct dirent *e;
        int used = 0;
        while (!used && (e = readdir(d))) used = strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
        closedir(d);
        if (used) {
            fprintf(stderr, "mkmodel: --out \"%s\" holds files already: name a new or empty folder\n", out);
            return 1;
        }
    } else if (errno != ENOENT) {
        fprintf(stderr, "mkmodel: --out \"%s\": %s\n", out, strerror(errno));
        return 1;
    }
    char vocab_dir[4096];
    if (!vocab) {
        if (find_vocab(vocab_dir, sizeof vocab_dir) < 0) {
            fprintf(stderr, "mkmodel: the Qwen2 vocabulary is not beside this executable (%s); "
                            "name it with --vocab DIR, or --vocab own\n", vocab_dir);
            return 1;
        }
        vocab = vocab_dir;
    } else if (!strcmp(vocab, "own")) {
        vocab = NULL;
    } else {
        snprintf(vocab_dir, sizeof vocab_dir, "%s/vocab.json", vocab);
        if (access(vocab_dir, R_OK) != 0) {
            fprintf(stderr, "mkmodel: --vocab \"%s\": no vocab.json there\n", vocab);
            return 1;
        }
    }
    mk_preset p;
    if (!strcmp(preset, "tiny")) p = MK_TINY;
    else if (!strcmp(preset, "small")) p = MK_SMALL;
    else if (!strcmp(preset, "full")) p = MK_FULL;
    else return usage(0);
    if (mk_write_mllm(out, p, seed, vocab, err, sizeof err) < 0 ||
        mk_write_vae(out, p, seed, err, sizeof err) < 0 ||
        mk_write_dit(out, p, seed, err, sizeof err) < 0 ||
        (!mk_dit_has_projection(p) && mk_write_connector(out, p, seed, err, sizeof err) < 0) ||
        mk_write_package(out, p, err, sizeof err) < 0) {
        fprintf(stderr, "mkmodel: %s\n", err);
        return 1;
    }
    printf("mkmodel: wrote %s (preset %s, seed %" PRIu64 ", %s vocabulary%s)\n", out, preset,
           seed, vocab ? "Qwen2" : "own", mk_seeded ? ", seeded: headers only" : "");
    return 0;
}
