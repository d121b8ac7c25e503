/* A small unit-test harness: each test program registers cases with TEST(name) and ends
 * with the line "N passed, N failed, N skipped" that tests/run-all sums up.
 *
 *   TEST(tokenizer_roundtrip) { CHECK(x == 1); CHECK_EQ_INT(a, b); CHECK_NEAR(x, y, 1e-5); }
 *   int main(void) { return test_main(); }
 *
 * A failed CHECK prints file:line and the values, marks the case failed and goes on with
 * the case (so that one run shows every broken check).
 *
 * SKIP("no CUDA device: %s", why) ends a case that cannot run on this machine (no GPU, a
 * missing optional tool): it prints "skip NAME: reason" and counts as skipped, never as
 * passed. A case that failed a CHECK before it skipped still counts as failed. */
#ifndef DG_TEST_HARNESS_H
#define DG_TEST_HARNESS_H

#include <math.h>
#include <stdio.h>
#include <string.h>

typedef void (*test_fn)(void);
void test_register(const char *name, test_fn fn);
int  test_main(void);
void test_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void test_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define SKIP(...) do { test_skip(__VA_ARGS__); return; } while (0)

#define TEST(name)                                                            \
    static void test_##name(void);                                            \
    __attribute__((constructor)) static void test_register_##name(void) {     \
        test_register(#name, test_##name);                                    \
    }                                                                         \
    static void test_##name(void)

#define CHECK(cond)                                                           \
    do { if (!(cond)) test_fail(__FILE__, __LINE__, "CHECK(%s)", #cond); } while (0)

#define CHECK_EQ_INT(a, b)                                                    \
    do { long long a_ = (long long)(a), b_ = (long long)(b);                  \
         if (a_ != b_) test_fail(__FILE__, __LINE__, "%s == %s: %lld != %lld", \
                                 #a, #b, a_, b_); } while (0)

#define CHECK_EQ_STR(a, b)                                                    \
    do { const char *a_ = (a), *b_ = (b);                                     \
         if (!a_ || !b_ || strcmp(a_, b_) != 0)                               \
             test_fail(__FILE__, __LINE__, "%s == %s: \"%s\" != \"%s\"",      \
                       #a, #b, a_ ? a_ : "(null)", b_ ? b_ : "(null)"); } while (0)

#define CHECK_NEAR(a, b, tol)                                                 \
    do { double a_ = (a), b_ = (b);                                           \
         if (!(fabs(a_ - b_) <= (tol)))                                       \
             test_fail(__FILE__, __LINE__, "%s ~ %s: %.9g vs %.9g (tol %g)",  \
                       #a, #b, a_, b_, (double)(tol)); } while (0)

#endif
