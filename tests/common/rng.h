/* rng.h — the tests' small random numbers: a xorshift64 stream of the including file's own,
 * seeded by TEST_RNG_SEED (defined before the include, so that each test keeps the rows its
 * bounds and counts were stated on), with uniform (0, 1), Gaussian (Box-Muller) and [-1, 1)
 * draws from it. */
#ifndef TEST_COMMON_RNG_H
#define TEST_COMMON_RNG_H

#include <math.h>
#include <stdint.h>

#ifndef TEST_RNG_SEED
#error "define TEST_RNG_SEED before including common/rng.h"
#endif

static uint64_t rs = TEST_RNG_SEED;

static inline uint32_t rnd32(void) {
    rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17;
    return (uint32_t)(rs >> 32);
}
static inline double urand(void) { return (rnd32() + 0.5) / 4294967296.0; }
static inline float gauss(void) { return (float)(sqrt(-2.0 * log(urand())) * cos(6.283185307179586 * urand())); }
static inline float frand(void) { return (float)(2.0 * urand() - 1.0); }

#endif
