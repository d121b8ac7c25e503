/* Model packages and golden files for tests: the build's mkmodel writes one into a fresh temporary directory
 * (tests run from the repository root; the real Qwen2 vocabulary is tools/mkmodel/vocab/qwen2). */
#ifndef DG_TEST_PACKAGE_H
#define DG_TEST_PACKAGE_H

#include <stddef.h>
#include <stdint.h>

#define TEST_QWEN2_VOCAB "tools/mkmodel/vocab/qwen2"

/* The build the tests run against: $DG_BUILD (a sanitized build of the same tree: `make
 * sanitize`, `make tsan`), else "build". Its mkmodel writes the packages. */
const char *test_build_dir(void);
/* mkmodel --preset PRESET --seed SEED [--vocab VOCAB] into a new /tmp directory, whose
 * path goes to dir, removed when the process exits. 0, or -1 after printing the command
 * that failed. */
int      test_make_package(const char *preset, long long seed, const char *vocab, char *dir, size_t dirlen);
/* The same, made once per process and kept: the package's directory, or NULL after the
 * first failure (printed). For a test program whose cases share one package; a second
 * call with other arguments is a bug in the test and returns NULL. */
const char *test_package_once(const char *preset, long long seed, const char *vocab);
/* test_package_once's package opened once on the default device (cpu) and kept: the model,
 * or NULL after printing why; *pkg (when not NULL) gets the package's directory. */
struct dg_model;
struct dg_model *test_model_once(const char *preset, long long seed, const char *vocab, const char **pkg);
/* FNV-1a 64 of a file's bytes (0 when it cannot be read): checks that mkmodel wrote the
 * package the goldens were made from. */
uint64_t test_file_fnv1a64(const char *path);
/* The bytes of dir/name, NUL-terminated (so that a text file is a string); *len without
 * the NUL. NULL when it cannot be read. The caller frees. */
void    *test_read_file(const char *dir, const char *name, size_t *len);
/* Loads golden_dir/goldens.json and writes the package its "package" object names
 * (preset, seed, vocab); mllm gets that package's mllm/ folder. The goldens, or NULL after
 * printing why. The caller keeps them (json_decref). */
/* The id of <BOV> in the package's mllm/tokenizer_config.json (mkmodel adds it after the
 * last added token: 151665 with the Qwen2 vocabulary); -1 when absent. */
int32_t  test_bov_id(const char *pkg);
struct json_t;
struct json_t *test_golden_package(const char *golden_dir, char *mllm, size_t len);

#endif
