/* stage_ring.h — where the CUDA backend's staging ring puts the next array (plain C, so
 * that tests/test_stage_ring.c checks the arithmetic without a GPU).
 *
 * The ring is two halves of `half` bytes. Arrays are placed one after another in the half in
 * use; one that does not fit in what is left of it goes to the start of the other half, once
 * that half's earlier copies are done (the caller records the old half's event and waits
 * for the new half's). The half in use is kept, not derived from the position: a half filled
 * to its last byte leaves the position on the boundary, where pos / half already names the
 * other half (or, after the second, one past the ring). */
#ifndef DG_STAGE_RING_H
#define DG_STAGE_RING_H

#include <stddef.h>

typedef struct {
    size_t pos;    /* the next free byte, inside half `half` */
    int    half;   /* 0 or 1 */
} dg_stage_ring;

/* Places n bytes (0 < n <= half): r->pos is then where they go, and the caller adds n once
 * they are written. Returns 1 when the ring moved to the other half (the caller must wait
 * for that half's earlier copies first), else 0. */
static inline int dg_stage_ring_place(dg_stage_ring *r, size_t n, size_t half) {
    if (r->pos + n <= (size_t)(r->half + 1) * half) return 0;
    r->half ^= 1;
    r->pos = (size_t)r->half * half;
    return 1;
}

#endif
