/* cpu_kernels.h — kernels shared by the CPU backend's files (not a public interface).
 *
 * Each hot kernel has a portable C version and an AVX2/FMA(/F16C) version compiled with
 * __attribute__((target)) and chosen at run time by `simd` (set once from
 * __builtin_cpu_supports when the backend is made); the matmul also has an AVX-512 one,
 * and its bf16 compute order an AVX-512 BF16 one (matmul.h). */
#ifndef DG_CPU_KERNELS_H
#define DG_CPU_KERNELS_H

#include <stdint.h>

#include "backend.h"
#include "cpu_backend.h"

typedef struct {
    int     n_threads;
    int     simd;            /* DG_CPU_*: the widest kernel set used (cpu_backend.h); the
                                kernels other than the matmul test simd != 0 for AVX2 */
    float  *conv;            /* owned scratch, one per backend (a fork has its own): conv3d's
                                im2col tiles, the VAE attention's score tiles */
    int64_t conv_floats;     /* its size */
    float  *gemm;            /* owned: the matmul's scratch, DG_MATMUL_SCRATCH_FLOATS for
                                each of n_threads (matmul.h) */
    int     bf16_compute;    /* 1: matmuls over BF16 weights in the bf16 compute order
                                (matmul.h) */
    uint16_t *gemm_bf16;     /* owned, with bf16_compute: its packed chunks of W,
                                DG_MATMUL_BF16_PANEL for each of n_threads */
    uint16_t *xbf16;         /* owned, with bf16_compute: a call's rounded x,
                                DG_MATMUL_BF16_XBUF (matmul.h) */
    uint32_t *att_bf16;      /* owned, with bf16_compute on AVX-512 BF16: the segment
                                attention's scratch, DG_ATT_SCRATCH_WORDS for each of
                                n_threads (vision_ops.h) */
    float    *att_f32;       /* owned, on AVX-512 without bf16 compute: the segment attention's
                                fp32 tiles, DG_ATT_F32_SCRATCH_FLOATS for each of n_threads */
    uint32_t *att_kv;        /* owned, grown on demand and kept: the keys and values of the
                                segments with several query blocks, packed once a call
                                (vision_ops.c; 4 bytes a key and dim for the bf16
                                products, 8 for the fp32 ones: 16 and 32 MiB at the DiT's
                                4096 tokens of 8 x 128) */
    int64_t   att_kv_words;  /* its size */
    int       status;        /* 0, or DG_EDEVICE once an operation refused its shape
                                (backend.h status: kept from then on) */
    char      status_msg[192];   /* that refusal */
} dg_cpu;

/* cpu_backend.c: records an operation's refusal of a shape it cannot run (the first one
 * is kept) as the backend's sticky status, as the CUDA backend records its faults: the
 * operations return nothing. */
void dg_cpu_fail(dg_cpu *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* vector.c */
/* dst[nr, cols] = rows r0 .. r0+nr-1 of w as fp32 (the caller parallelises). */
void  dg_cpu_rows_f32(int simd, float *dst, const dg_weight *w, int64_t r0, int64_t nr);
/* dst[n] = src[n] BF16 widened to fp32 (exact), 8 lanes at a time when simd. */
void  dg_cpu_widen_bf16(int simd, float *dst, const uint16_t *src, int64_t n);
float dg_cpu_dot(int simd, const float *a, const float *b, int n);
/* y[i] = y[i] * s + a * x[i] */
void  dg_cpu_scale_axpy(int simd, float *y, float s, float a, const float *x, int n);


/* ops.c: the backend operations of the same names (backend.h states their contracts). */
void dg_cpu_rmsnorm(const dg_cpu *c, float *y, const float *x, const float *weight, int m, int n,
                    float eps);
void dg_cpu_rope(const dg_cpu *c, float *x, const int32_t *pos, int m, int n_heads, int head_dim,
                 const dg_rope_params *p);
void dg_cpu_kv_write(const dg_cpu *c, const dg_kv_view *kv, int start, const float *k,
                     const float *v, int m, int kv_dim);
/* Keys scored at once by the decoder attention's online softmax (ops.c attend_group): chunks
 * start at multiples of it, so a query's bits do not depend on the batch around it. */
#define DG_ATT_CHUNK 64

/* One chunk of nc <= DG_ATT_CHUNK keys (rows krow[j], vrow[j], hd values each: fp32, or bf16
 * where bf16 is set) for the `group` query heads q[group, hd] that share a kv head, the
 * online softmax's step on their outputs o[group, hd], maxima mx[group] and sums l[group]
 * (attention_zmm.c; AVX-512 F, hd a multiple of 16). Bf16 rows give the bits of fp32 rows
 * holding their values. */
void dg_cpu_att_group_chunk_zmm(float *o, const float *q, const void *const *krow, const void *const *vrow,
                                int nc, int group, int hd, float scale, float *mx, float *l, int bf16);
void dg_cpu_attention(const dg_cpu *c, float *out, const float *q, const dg_kv_view *kv, int n_past,
                      int m, int n_heads, int n_kv_heads, int head_dim, float scale);
void dg_cpu_attention_batch(const dg_cpu *c, float *out, const float *q, const float *k, const float *v,
                            const dg_attn_seq *seqs, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                            float scale);
void dg_cpu_silu_mul(const dg_cpu *c, float *y, const float *gate, const float *up, int64_t n);
void dg_cpu_add(const dg_cpu *c, float *y, const float *x, int64_t n);
void dg_cpu_embed(const dg_cpu *c, float *y, const dg_weight *table, const int32_t *ids, int m);
/* In place, per row of x[m, n] (exact, two passes): the VAE attention's score tiles. */
void dg_cpu_softmax(const dg_cpu *c, float *x, int m, int n);

#endif
