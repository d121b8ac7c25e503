/* io/sha256.c against the FIPS 180-4 / NIST example digests, whole and in pieces. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "io/sha256.h"

static void hex(const uint8_t *d, char *out) {
    for (int i = 0; i < DG_SHA256_BYTES; i++) sprintf(out + 2 * i, "%02x", d[i]);
}

static void check_one(const char *msg, size_t n, const char *want) {
    uint8_t d[DG_SHA256_BYTES];
    char got[2 * DG_SHA256_BYTES + 1];
    dg_sha256_of(msg, n, d);
    hex(d, got);
    CHECK_EQ_STR(got, want);
    /* the same bytes fed in uneven pieces (1, 2, 3, ... bytes) give the same digest */
    dg_sha256 s;
    dg_sha256_init(&s);
    for (size_t at = 0, k = 1; at < n; at += k, k++) dg_sha256_update(&s, msg + at, k < n - at ? k : n - at);
    dg_sha256_final(&s, d);
    hex(d, got);
    CHECK_EQ_STR(got, want);
}

TEST(sha256_nist_vectors) {
    check_one("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    check_one("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    check_one(m448, strlen(m448), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    const char *m896 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
                       "mnopqrstnopqrstu";
    check_one(m896, strlen(m896), "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

TEST(sha256_million_a) {
    size_t n = 1000000;
    char *m = malloc(n);
    memset(m, 'a', n);
    check_one(m, n, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(m);
}

int main(void) { return test_main(); }
