/* dtype.h — element types of stored weights and the scalar conversions between them.
 *
 * Weights keep the dtype they were stored with (safetensors BF16, F16 or F32); compute is
 * fp32. The conversions here are the exact ones: bf16 -> f32 is a shift, f32 -> bf16
 * rounds to nearest even (as torch does), f16 <-> f32 follows IEEE 754 binary16. */
#ifndef DG_DTYPE_H
#define DG_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum { DG_DTYPE_F32, DG_DTYPE_F16, DG_DTYPE_BF16 } dg_dtype;

static inline size_t dg_dtype_size(dg_dtype t) { return t == DG_DTYPE_F32 ? 4 : 2; }

static inline const char *dg_dtype_name(dg_dtype t) {
    return t == DG_DTYPE_F32 ? "F32" : t == DG_DTYPE_F16 ? "F16" : "BF16";
}

static inline float dg_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t dg_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float dg_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {                      /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Element i of a stored vector, as f32. By memcpy: safetensors does not promise that a
 * tensor's data is aligned to its element size (the compiler emits plain loads). */
static inline float dg_load_f32(const void *p, dg_dtype t, size_t i) {
    const unsigned char *b = (const unsigned char *)p;   /* a cast: also compiled as C++ (CUDA) */
    if (t == DG_DTYPE_F32) {
        float f;
        memcpy(&f, b + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, b + 2 * i, 2);
    return t == DG_DTYPE_BF16 ? dg_bf16_to_f32(h) : dg_f16_to_f32(h);
}

#endif
