/* sha256.h — SHA-256 (FIPS 180-4): one call over a buffer, or init / update / final over
 * pieces. No allocation; a dg_sha256 is plain state the caller owns. */
#ifndef DG_SHA256_H
#define DG_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define DG_SHA256_BYTES 32

typedef struct {
    uint32_t h[8];
    uint64_t total;      /* bytes hashed */
    uint8_t  block[64];
    size_t   used;       /* bytes in block */
} dg_sha256;

void dg_sha256_init(dg_sha256 *s);
void dg_sha256_update(dg_sha256 *s, const void *data, size_t n);
void dg_sha256_final(dg_sha256 *s, uint8_t out[DG_SHA256_BYTES]);   /* s is spent afterwards */
void dg_sha256_of(const void *data, size_t n, uint8_t out[DG_SHA256_BYTES]);

#endif
