#include "package.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "duogen.h"

/* The packages this process made, removed when it exits (a package is 2-28 MB, the small
 * preset's 1.7 GB: left behind, every run of the suite filled /tmp by another ~100 MB).
 * Only by the process that made them: a child that forks from a test and exits leaves
 * them to it. */
#define MADE_MAX 96
static char  made[MADE_MAX][32];
static int   n_made;
static pid_t made_by;

static void remove_made(void) {
    char cmd[64];
    if (getpid() != made_by) return;
    for (int i = 0; i < n_made; i++) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", made[i]);
        if (system(cmd) != 0) fprintf(stderr, "test package %s: could not be removed\n", made[i]);
    }
    n_made = 0;
}

const char *test_build_dir(void) {
    const char *b = getenv("DG_BUILD");
    return b && *b ? b : "build";
}

int test_make_package(const char *preset, long long seed, const char *vocab, char *dir, size_t dirlen) {
    char tmpl[] = "/tmp/dg_test_pkg_XXXXXX", cmd[1024];
    if (n_made == MADE_MAX) {
        fprintf(stderr, "test_make_package: more than %d packages in one process\n", MADE_MAX);
        return -1;
    }
    if (!mkdtemp(tmpl)) {
        perror("mkdtemp");
        return -1;
    }
    if (!made_by) {
        made_by = getpid();
        atexit(remove_made);
    }
    snprintf(made[n_made++], sizeof made[0], "%s", tmpl);
    snprintf(cmd, sizeof cmd, "%s/mkmodel --preset %s --seed %lld --out %s%s%s >/dev/null", test_build_dir(),
             preset, seed, tmpl, " --vocab ", vocab ? vocab : "own");
    if (system(cmd) != 0) {
        fprintf(stderr, "failed: %s\n", cmd);
        return -1;
    }
    snprintf(dir, dirlen, "%s", tmpl);
    return 0;
}

const char *test_package_once(const char *preset, long long seed, const char *vocab) {
    static int state;   /* 0 not made, 1 made, -1 failed */
    static char dir[256], made_with[512];
    char args[512];
    snprintf(args, sizeof args, "%s %lld %s", preset, seed, vocab ? vocab : "own");
    if (state && strcmp(args, made_with)) {
        fprintf(stderr, "test_package_once: asked for %s after %s\n", args, made_with);
        return NULL;
    }
    if (!state) {
        snprintf(made_with, sizeof made_with, "%s", args);
        state = test_make_package(preset, seed, vocab, dir, sizeof dir) < 0 ? -1 : 1;
    }
    return state > 0 ? dir : NULL;
}

int32_t test_bov_id(const char *pkg) {
    char path[4200];
    snprintf(path, sizeof path, "%s/mllm/tokenizer_config.json", pkg);
    json_t *tc = json_load_file(path, 0, NULL), *v;
    const char *key;
    int32_t id = -1;
    json_object_foreach(json_object_get(tc, "added_tokens_decoder"), key, v) {
        const char *content = json_string_value(json_object_get(v, "content"));
        if (content && !strcmp(content, "<BOV>")) id = (int32_t)atol(key);
    }
    json_decref(tc);
    return id;
}

uint64_t test_file_fnv1a64(const char *path) {
    FILE *f = fopen(path, "rb");
    uint64_t h = 0xcbf29ce484222325ull;
    unsigned char buf[1 << 16];
    size_t r;
    if (!f) return 0;
    while ((r = fread(buf, 1, sizeof buf, f)) > 0)
        for (size_t i = 0; i < r; i++) h = (h ^ buf[i]) * 0x100000001b3ull;
    fclose(f);
    return h;
}

void *test_read_file(const char *dir, const char *name, size_t *len) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) buf[n] = 0;
    *len = n > 0 ? (size_t)n : 0;
    return buf;
}

json_t *test_golden_package(const char *golden_dir, char *mllm, size_t len) {
    char path[512], dir[200];
    json_error_t je;
    snprintf(path, sizeof path, "%s/goldens.json", golden_dir);
    json_t *g = json_load_file(path, 0, &je);
    if (!g) {
        fprintf(stderr, "cannot read %s: %s\n", path, je.text);
        return NULL;
    }
    json_t *p = json_object_get(g, "package");
    if (test_make_package(json_string_value(json_object_get(p, "preset")),
                          (long long)json_integer_value(json_object_get(p, "seed")),
                          json_string_value(json_object_get(p, "vocab")), dir, sizeof dir) < 0) {
        json_decref(g);
        return NULL;
    }
    snprintf(mllm, len, "%s/mllm", dir);
    return g;
}

dg_model *test_model_once(const char *preset, long long seed, const char *vocab, const char **pkg) {
    static dg_model *model;
    static int failed;
    char err[512];
    const char *dir = test_package_once(preset, seed, vocab);
    if (pkg) *pkg = dir;
    if (model || failed) return model;
    if (!dir || dg_model_open(dir, NULL, &model, err, sizeof err) < 0) {
        if (dir) printf("  %s\n", err);
        failed = 1;
        model = NULL;
    }
    return model;
}
