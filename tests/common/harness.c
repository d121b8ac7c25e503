#include "harness.h"

#include <stdarg.h>
#include <stdlib.h>

#define TEST_MAX 1024

struct test_case { const char *name; test_fn fn; };
static struct test_case tests[TEST_MAX];
static int n_tests;
static int current_failed;
static char current_skip[512];   /* the reason, when the case skipped */

void test_register(const char *name, test_fn fn) {
    if (n_tests == TEST_MAX) {
        fprintf(stderr, "harness: more than %d tests in one program\n", TEST_MAX);
        exit(2);
    }
    tests[n_tests].name = name;
    tests[n_tests].fn = fn;
    n_tests++;
}

void test_fail(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    fprintf(stdout, "  %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    current_failed = 1;
}

void test_skip(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(current_skip, sizeof current_skip, fmt, ap);
    va_end(ap);
    if (!current_skip[0]) snprintf(current_skip, sizeof current_skip, "(no reason given)");
}

/* Runs the cases sorted by name (constructor order is the compiler's choice), or only
 * those whose name contains DG_TEST. */
static int by_name(const void *a, const void *b) {
    return strcmp(((const struct test_case *)a)->name, ((const struct test_case *)b)->name);
}

int test_main(void) {
    const char *only = getenv("DG_TEST");
    int passed = 0, failed = 0, skipped = 0;
    qsort(tests, (size_t)n_tests, sizeof tests[0], by_name);
    for (int i = 0; i < n_tests; i++) {
        if (only && !strstr(tests[i].name, only)) continue;
        current_failed = 0;
        current_skip[0] = 0;
        tests[i].fn();
        fflush(stdout);
        if (current_failed) { printf("FAIL %s\n", tests[i].name); failed++; }
        else if (current_skip[0]) { printf("skip %s: %s\n", tests[i].name, current_skip); skipped++; }
        else { printf("ok %s\n", tests[i].name); passed++; }
    }
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
