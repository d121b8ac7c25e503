/* The CUDA backend's staging ring arithmetic (kernels/cuda/stage_ring.h), without a GPU:
 * every array lies inside the ring and inside one half, the halves alternate, and a move to
 * the other half happens only when the array does not fit in what is left of this one. The
 * streams: arrays of exactly 256 bytes (the common staging, which fills a half to its last
 * byte: where deriving the half from the position overran the ring), and random multiples
 * of 256 up to a whole half. */
#include <stdint.h>
#include <stdlib.h>

#include "common/harness.h"
#include "cuda/stage_ring.h"

#define TEST_RNG_SEED 0x5eed5eedu
#include "common/rng.h"

enum { HALF = 8 << 20 };   /* DG_CUDA_STAGE_BYTES / 2 */

/* Places `count` arrays of sizes from next_size; returns the number of moves to the other
 * half, failing at the first array out of place. */
static long run(long count, size_t (*next_size)(void)) {
    dg_stage_ring r = {0};
    long moves = 0;
    for (long i = 0; i < count; i++) {
        const size_t n = next_size(), before = r.pos;
        const int half = r.half, moved = dg_stage_ring_place(&r, n, HALF);
        if (moved) {
            moves++;
            if (r.half != (half ^ 1) || r.pos != (size_t)r.half * HALF || before + n <= (size_t)(half + 1) * HALF) {
                test_fail(__FILE__, __LINE__, "array %ld (%zu bytes at %zu, half %d): a wrong move", i, n, before, half);
                return moves;
            }
        } else if (r.pos != before || r.half != half) {
            test_fail(__FILE__, __LINE__, "array %ld: moved without saying so", i);
            return moves;
        }
        if (r.half < 0 || r.half > 1 || r.pos < (size_t)r.half * HALF || r.pos + n > (size_t)(r.half + 1) * HALF) {
            test_fail(__FILE__, __LINE__, "array %ld: %zu bytes at %zu, outside half %d of the ring", i, n, r.pos, r.half);
            return moves;
        }
        r.pos += n;
    }
    return moves;
}

static size_t size_256(void) { return 256; }
static size_t size_random(void) { return (size_t)(1 + rnd32() % (HALF / 256)) * 256; }
static size_t size_small(void) { return (size_t)(1 + rnd32() % 8) * 256; }

TEST(arrays_of_256_bytes_fill_each_half_and_turn) {
    const long per_half = HALF / 256;
    /* three turns: the moves come exactly when a half is full, every half-full array */
    CHECK_EQ_INT(run(6 * per_half, size_256), 5);
    CHECK_EQ_INT(run(6 * per_half + 1, size_256), 6);
}

TEST(random_sizes_stay_in_their_half) {
    CHECK(run(200000, size_random) > 1000);
    CHECK(run(2000000, size_small) > 100);
}

int main(void) { return test_main(); }
