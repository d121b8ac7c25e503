/* vision_ops.c — CPU kernels of the vision tower's and the DiT's operations (backend.h). */
#include "vision_ops.h"

#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "simd_math.h"

/* Segment attention tiles: QB queries of one head against KC keys at a time, with an
 * online softmax across key tiles. The two products of a tile:
 * - with bf16 compute on AVX-512 BF16, attention_bf16.h's (bf16 inputs, fp32 accumulation,
 *   as PyTorch's bf16 attention); the softmax between them is the same online softmax in
 *   fp32 (dg_att_bf16_softmax: 16 lanes, the probabilities rounded to the second product's
 *   pairs as they are written);
 * - else on AVX-512 F (head_dim a multiple of 16), attention_f32.h's: the DiT's 4096-token
 *   attention 0.68 -> 0.84 of the FMA's limit against OpenBLAS's sgemm, whose copies of
 *   both operands on every call were a fifth of its time;
 * - else an sgemm each, called from inside the OpenMP region. This relies on the OpenMP
 *   build of OpenBLAS (the one the Makefile links), which runs a call made inside a
 *   parallel region on the calling thread; a pthreads OpenBLAS starts its own threads from
 *   every one of ours (a run that picked up another libopenblas.so.0 than the Makefile's
 *   rpath names was slower at 16 threads than at 2). Larger tiles pack the query block
 *   fewer times: 128x256 ran the 2048-token full attention of the vision tower at 1.3x the
 *   speed of 32x128. OpenBLAS, unlike the matmul (matmul.h): a query row is not promised
 *   the same bits in a segment of another length (an image, or a DiT sequence, of the same
 *   shape gets the same bits). The kernels of the other two give a row its bits whatever
 *   the rows beside it.
 * The segments of more than one query block have their keys and values packed once for all
 * their blocks (pack_segments), the others in their task. Stack per thread: QB·KC +
 * QB·head_dim floats (256 KiB at head_dim 256) for the fp32 products. */
#define ATT_QB DG_ATT_QB
#define ATT_KC DG_ATT_KC
#define ATT_MAX_HEAD_DIM 256

static const dg_cpu *cpu(const dg_backend *be) { return be->impl; }

/* One row of a score tile: s[0..n-1] becomes exp(s - m') where m' = max(*mx, max s);
 * *mx = m', *corr = exp(old *mx - m') (0 on the first tile, *mx = -inf); returns Σ. */
static float softmax_row_c(float *s, int n, float *mx, float *corr) {
    float m = *mx, sum = 0.0f;
    for (int j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    for (int j = 0; j < n; j++) sum += (s[j] = expf(s[j] - m));
    *corr = expf(*mx - m);
    *mx = m;
    return sum;
}

#define SIMD __attribute__((target("avx2,fma")))

SIMD static float softmax_row_avx2(float *s, int n, float *mx, float *corr) {
    const int n8 = n & ~7;
    __m256 vm = _mm256_set1_ps(*mx);
    for (int j = 0; j < n8; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float m = _mm_cvtss_f32(h);
    for (int j = n8; j < n; j++) m = s[j] > m ? s[j] : m;
    const __m256 bm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < n8; j += 8) {
        const __m256 e = dg_exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), bm));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    float sum = _mm_cvtss_f32(a);
    for (int j = n8; j < n; j++) sum += (s[j] = expf(s[j] - m));
    *corr = expf(*mx - m);
    *mx = m;
    return sum;
}

/* A block's working rows: scores [qb, ATT_KC], outputs [qb, head_dim], running maxima and
 * sums [qb]; bf: the bf16 products' state, or NULL (fp32 products, OpenBLAS), and words its
 * scratch (DG_ATT_BF16_WORDS(DG_ATT_QB_BF16, ATT_KC)). */
typedef struct {
    float      *s, *o, *mx, *l;
    dg_att_bf16 *bf;
    uint32_t   *words;
    float      *ft;            /* own fp32 products (AVX-512): a tile packed by the task, or NULL */
} att_block;

/* One (segment, head, query block): out rows q0 .. q0+nq-1, head h. packed (bf16 or own
 * fp32 products): the segment's keys and values of the head's kv head as dg_att_bf16_pack or
 * dg_att_f32_pack left them, tile after tile, or NULL: each tile packed here. */
static void attend_block(int simd, const att_block *w, float *out, int out_stride, const float *q, int q_stride,
                         const float *k, const float *v, int kv_stride, int nq, int nk,
                         int head_dim, float scale, const uint32_t *packed) {
    float *s = w->s, *o = w->o, *mx = w->mx, *l = w->l;
    dg_att_bf16 *bf = w->bf;
    for (int i = 0; i < nq; i++) {
        mx[i] = -INFINITY;
        l[i] = 0.0f;
    }
    memset(o, 0, sizeof(float) * (size_t)nq * (size_t)head_dim);
    if (bf) dg_att_bf16_begin(bf, w->words, DG_ATT_QB_BF16, ATT_KC, q, q_stride, nq, head_dim);
    for (int j0 = 0; j0 < nk; j0 += ATT_KC) {
        const int nc = nk - j0 < ATT_KC ? nk - j0 : ATT_KC;
        const float *kj = k + (int64_t)j0 * kv_stride, *vj = v + (int64_t)j0 * kv_stride;
        float corr[ATT_QB > DG_ATT_QB_BF16 ? ATT_QB : DG_ATT_QB_BF16];
        if (bf) {   /* the correction of o folded into the second product's loads of it */
            if (packed) dg_att_bf16_use(bf, packed + j0 / ATT_KC * dg_att_bf16_tile_words(ATT_KC, head_dim), nc);
            else dg_att_bf16_tile(bf, kj, vj, kv_stride, nc);
            dg_att_bf16_scores(bf, s, ATT_KC, nc, scale);
            for (int i = 0; i < nq; i++) {
                const float sum = dg_att_bf16_softmax(bf, i, s + i * ATT_KC, nc, &mx[i], &corr[i]);
                l[i] = l[i] * corr[i] + sum;
            }
            dg_att_bf16_pv_rows(bf, o, nc, j0 ? corr : NULL);
        } else if (w->ft) {   /* the same, in fp32 */
            const float *tile = w->ft;
            if (packed) tile = (const float *)packed + j0 / ATT_KC * dg_att_f32_tile_floats(ATT_KC, head_dim);
            else dg_att_f32_pack(w->ft, kj, vj, kv_stride, nc, head_dim);
            dg_att_f32_scores(s, ATT_KC, q, q_stride, nq, tile, nc, head_dim, scale);
            for (int i = 0; i < nq; i++) {
                const float sum = softmax_row_avx2(s + i * ATT_KC, nc, &mx[i], &corr[i]);
                l[i] = l[i] * corr[i] + sum;
            }
            dg_att_f32_pv(o, head_dim, s, ATT_KC, nq, tile, nc, j0 ? corr : NULL);
        } else {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nc, head_dim, scale, q, q_stride, kj, kv_stride,
                        0.0f, s, ATT_KC);
            for (int i = 0; i < nq; i++) {
                const float sum = simd ? softmax_row_avx2(s + i * ATT_KC, nc, &mx[i], &corr[i])
                                       : softmax_row_c(s + i * ATT_KC, nc, &mx[i], &corr[i]);
                l[i] = l[i] * corr[i] + sum;
                if (corr[i] != 1.0f)
#pragma omp simd
                    for (int d = 0; d < head_dim; d++) o[i * head_dim + d] *= corr[i];
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, head_dim, nc, 1.0f, s, ATT_KC, vj, kv_stride,
                        1.0f, o, head_dim);
        }
    }
    for (int i = 0; i < nq; i++) {
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;   /* an empty kv segment gives 0 */
#pragma omp simd
        for (int d = 0; d < head_dim; d++) out[(int64_t)i * out_stride + d] = o[i * head_dim + d] * inv;
    }
}

#define TILES(nk) (((nk) + ATT_KC - 1) / ATT_KC)

/* The 4-byte words of a packed tile of nc keys: bf16 products' (f32 = 0) or fp32's. */
static int64_t tile_words(int f32, int nc, int head_dim) {
    return f32 ? dg_att_f32_tile_floats(nc, head_dim) : dg_att_bf16_tile_words(nc, head_dim);
}

/* The words of one kv head's nk keys and values packed: its tiles of ATT_KC, the last
 * perhaps shorter. */
static int64_t head_words(int f32, int nk, int head_dim) {
    return nk / ATT_KC * tile_words(f32, ATT_KC, head_dim) + (nk % ATT_KC ? tile_words(f32, nk % ATT_KC, head_dim) : 0);
}

/* The keys and values packed once for the segments of more than one query block, for the
 * bf16 products or (f32) the own fp32 ones, each (segment, kv head) its tiles in turn from
 * off[sg] + kv head · its words (off[sg] = -1: a segment of one block, whose tasks pack
 * their tiles). Packed a query block at a time, the 4096-token attention of the DiT at 512²
 * read and packed its keys and values 8 times, 9% of its time; once, 1.3%. Returns the
 * packed words, or NULL (none to pack, or no memory for them: the tasks pack their tiles). */
static const uint32_t *pack_segments(dg_backend *be, int f32, int64_t *off, const float *k, const float *v,
                                     int kv_stride, const int32_t *q_cu, const int32_t *kv_cu, int n_seg,
                                     int n_kv_heads, int head_dim, int QB) {
    dg_cpu *c = be->impl;
    const int64_t full = tile_words(f32, ATT_KC, head_dim);
    int64_t words = 0, n_tasks = 0;
    for (int sg = 0; sg < n_seg; sg++) {
        const int nk = kv_cu[sg + 1] - kv_cu[sg];
        off[sg] = -1;
        if (q_cu[sg + 1] - q_cu[sg] <= QB || nk <= 0) continue;
        off[sg] = words;
        words += n_kv_heads * head_words(f32, nk, head_dim);
        n_tasks += (int64_t)n_kv_heads * TILES(nk);
    }
    if (!n_tasks) return NULL;
    if (words > c->att_kv_words) {
        be->release(be, c->att_kv);
        c->att_kv_words = 0;
        if (!(c->att_kv = be->alloc(be, sizeof(uint32_t) * (size_t)words))) return NULL;
        c->att_kv_words = words;
    }
    uint32_t *kv = c->att_kv;
    /* tasks: (segment, kv head, tile), numbered segment by segment */
#pragma omp parallel num_threads(c->n_threads)
    {
        int sg = 0;
        int64_t first = 0;
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < n_tasks; t++) {
            int64_t per;   /* segment sg's tasks */
            if (t < first) sg = 0, first = 0;
            while (t >= first + (per = off[sg] < 0 ? 0 : (int64_t)n_kv_heads * TILES(kv_cu[sg + 1] - kv_cu[sg])))
                first += per, sg++;
            const int nk = kv_cu[sg + 1] - kv_cu[sg];
            const int h = (int)((t - first) / TILES(nk)), j0 = (int)((t - first) % TILES(nk)) * ATT_KC;
            const int64_t row = (int64_t)(kv_cu[sg] + j0) * kv_stride + (int64_t)h * head_dim;
            uint32_t *dst = kv + off[sg] + h * head_words(f32, nk, head_dim) + j0 / ATT_KC * full;
            const int nc = nk - j0 < ATT_KC ? nk - j0 : ATT_KC;
            if (f32) dg_att_f32_pack((float *)dst, k + row, v + row, kv_stride, nc, head_dim);
            else dg_att_bf16_pack(dst, k + row, v + row, kv_stride, nc, head_dim);
        }
    }
    return kv;
}

/* Where pack_segments left segment sg's kv head kvh, or NULL. */
static const uint32_t *seg_packed(const uint32_t *packed, int f32, const int64_t *off, int sg, int kvh,
                                  const int32_t *kv_cu, int head_dim) {
    return packed && off[sg] >= 0 ? packed + off[sg] + kvh * head_words(f32, kv_cu[sg + 1] - kv_cu[sg], head_dim)
                                   : NULL;
}

void dg_cpu_attention_segments(dg_backend *be, float *out, const float *q, int q_stride,
                               const float *k, const float *v, int kv_stride,
                               const int32_t *q_cu, const int32_t *kv_cu, int n_seg,
                               int n_heads, int n_kv_heads, int head_dim, float scale) {
    const dg_cpu *c = cpu(be);
    const int group = n_heads / n_kv_heads, out_stride = n_heads * head_dim;
    const int bf16 = c->att_bf16 && DG_ATT_BF16_OK(head_dim), QB = bf16 ? DG_ATT_QB_BF16 : ATT_QB;
    const int f32 = !bf16 && c->att_f32 && DG_ATT_F32_OK(head_dim);   /* own fp32 products */
    int64_t *off = bf16 || f32 ? malloc(sizeof(int64_t) * (size_t)(n_seg > 0 ? n_seg : 1)) : NULL;
    const uint32_t *packed =
        off ? pack_segments(be, f32, off, k, v, kv_stride, q_cu, kv_cu, n_seg, n_kv_heads, head_dim, QB) : NULL;
    /* tasks: (segment, query block, head), numbered segment by segment */
    int64_t n_tasks = 0;
    for (int sg = 0; sg < n_seg; sg++)
        n_tasks += (int64_t)(q_cu[sg + 1] - q_cu[sg] + QB - 1) / QB * n_heads;
#pragma omp parallel num_threads(c->n_threads)
    {
        int sg = 0;
        int64_t first = 0;   /* the first task of segment sg */
        /* the block's rows: on the stack for the fp32 products (128 queries), in the
         * thread's scratch for the bf16 ones (512) */
        float s_stack[bf16 ? 1 : ATT_QB * ATT_KC], o_stack[bf16 ? 1 : ATT_QB * ATT_MAX_HEAD_DIM];
        float mx_stack[ATT_QB], l_stack[ATT_QB];
        dg_att_bf16 ab;
        att_block w = {s_stack, o_stack, mx_stack, l_stack, NULL, NULL,
                       f32 ? c->att_f32 + (int64_t)omp_get_thread_num() * DG_ATT_F32_SCRATCH_FLOATS : NULL};
        if (bf16) {   /* vision_ops.h DG_ATT_SCRATCH_WORDS: the products' words, then the rows */
            uint32_t *words = c->att_bf16 + (int64_t)omp_get_thread_num() * DG_ATT_SCRATCH_WORDS;
            float *rows = (float *)(words + DG_ATT_BF16_WORDS(DG_ATT_QB_BF16, ATT_KC));
            w = (att_block){rows, rows + DG_ATT_QB_BF16 * ATT_KC, rows + DG_ATT_QB_BF16 * (ATT_KC + 256),
                            rows + DG_ATT_QB_BF16 * (ATT_KC + 257), &ab, words, NULL};
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tasks; t++) {
            int64_t per;
            if (t < first) {
                sg = 0;
                first = 0;
            }
            while (t >= first + (per = (int64_t)(q_cu[sg + 1] - q_cu[sg] + QB - 1) / QB * n_heads)) {
                first += per;
                sg++;
            }
            const int64_t r = t - first;
            const int h = (int)(r % n_heads), qb = (int)(r / n_heads), kvh = h / group;
            const int q0 = q_cu[sg] + qb * QB, q1 = q_cu[sg + 1];
            const int nq = q1 - q0 < QB ? q1 - q0 : QB;
            attend_block(c->simd, &w, out + (int64_t)q0 * out_stride + h * head_dim, out_stride,
                         q + (int64_t)q0 * q_stride + h * head_dim, q_stride,
                         k + (int64_t)kv_cu[sg] * kv_stride + kvh * head_dim,
                         v + (int64_t)kv_cu[sg] * kv_stride + kvh * head_dim, kv_stride, nq,
                         kv_cu[sg + 1] - kv_cu[sg], head_dim, scale,
                         seg_packed(packed, f32, off, sg, kvh, kv_cu, head_dim));
        }
    }
    free(off);
}

/* GELU (erf form): y = x/2 · (1 + erf(z)), z = x/√2, 8 lanes at a time. 1 + erf(z) is
 * computed as a whole, never as a sum that cancels:
 *     |z| < 1:  1 + z·P(z²)
 *     z >= 1:   2 - E,  z <= -1:  E,  where E = erfc(|z|) = exp(-z²)·Q(1/|z|)
 * P and Q are tools/reference/fit_erf.py's fits (relative error 1.2e-7 and 5.5e-7 in float32
 * Horner), exp is dg_exp256 (2 ulp). So 1 + erf(z) is within ~1e-6 relative everywhere,
 * the negative tail included (the portable path: 1 + erf(z) = erfc(-z), libm's erfcf).
 * Past |z| = 9.3 dg_exp256 stays at its floor 2^-126 (E < 1e-38 where the true value
 * underflows); past |z| = 10, the end of Q's fit, E is 0. libm's scalar erff, and the
 * expf it calls, were 15-18% of a bf16 DiT step. */
DG_SIMD_AVX2 static inline __m256 gelu8(__m256 x) {
    static const float P[6] = {1.12837911f, -0.376122802f, 0.112798952f, -0.0267045144f, 0.00491057709f,
                               -0.000560563814f};
    static const float Q[10] = {3.45271519e-06f, 0.564101696f, 0.00064759294f, -0.280455381f, -0.0534192994f,
                                0.781572223f, -1.20685756f, 0.952383697f, -0.403005242f, 0.0726123899f};
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
    const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z), z2 = _mm256_mul_ps(z, z);
    __m256 p = _mm256_set1_ps(P[5]);
    for (int k = 4; k >= 0; k--) p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(P[k]));
    const __m256 u = _mm256_div_ps(one, a);   /* inf at z = 0: that lane takes the |z| < 1 form */
    __m256 q = _mm256_set1_ps(Q[9]);
    for (int k = 8; k >= 0; k--) q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(Q[k]));
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(a, _mm256_set1_ps(10.0f), _CMP_GE_OQ),
                                      _mm256_mul_ps(dg_exp256(_mm256_sub_ps(zero, z2)), q));   /* 0 past 10 */
    const __m256 tail = _mm256_blendv_ps(e, _mm256_sub_ps(_mm256_set1_ps(2.0f), e), _mm256_cmp_ps(z, zero, _CMP_GT_OQ));
    const __m256 t = _mm256_blendv_ps(tail, _mm256_fmadd_ps(z, p, one), _mm256_cmp_ps(a, one, _CMP_LT_OQ));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), t);
}

/* gelu8 over n elements (the last, short group by masked loads and stores): an element's
 * bits do not depend on where it sits. */
DG_SIMD_AVX2 static void gelu_avx2(float *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_maskstore_ps(y + i, live, gelu8(_mm256_maskload_ps(x + i, live)));
    }
}

void dg_cpu_gelu(dg_backend *be, float *y, const float *x, int64_t n) {
    const dg_cpu *c = cpu(be);
    if (c->simd) {
        const int64_t per = 8192, parts = (n + per - 1) / per;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (n > 65536)
        for (int64_t p = 0; p < parts; p++) gelu_avx2(y + p * per, x + p * per, p + 1 < parts ? per : n - p * per);
        return;
    }
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * erfcf(x[i] * -0.70710678118654752f);
}

/* Pairs j0 .. half-1 of one head rotated: r[j], r[j + half] by cs[j], sn[j]. */
static inline void rope_pairs(float *r, const float *cs, const float *sn, int j0, int half) {
    for (int j = j0; j < half; j++) {
        const float a = r[j], b = r[j + half];
        r[j] = a * cs[j] - b * sn[j];
        r[j + half] = b * cs[j] + a * sn[j];
    }
}

/* One row's heads rotated by a row of the table: r[j], r[j + half] of each head. The same
 * roundings as the scalar loop (a product each, then the sum: no fused multiply-add), 8
 * pairs at a time; the scalar loop was 1.2% of the vision tower at 448². */
DG_SIMD_AVX2 static void rope_row_avx2(float *x, const float *cs, const float *sn, int n_heads, int head_dim) {
    const int half = head_dim / 2, h8 = half & ~7;
    for (int h = 0; h < n_heads; h++) {
        float *r = x + h * head_dim;
        int j = 0;
        for (; j < h8; j += 8) {
            const __m256 a = _mm256_loadu_ps(r + j), b = _mm256_loadu_ps(r + j + half);
            const __m256 c = _mm256_loadu_ps(cs + j), s = _mm256_loadu_ps(sn + j);
            _mm256_storeu_ps(r + j, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
            _mm256_storeu_ps(r + j + half, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
        }
        rope_pairs(r, cs, sn, j, half);
    }
}

void dg_cpu_rope_table(dg_backend *be, float *x, int stride, const float *cos, const float *sin,
                       int m, int n_heads, int head_dim) {
    const dg_cpu *c = cpu(be);
    const int half = head_dim / 2;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (m > 1)
    for (int i = 0; i < m; i++) {
        const float *cs = cos + (int64_t)i * half, *sn = sin + (int64_t)i * half;
        if (c->simd) {
            rope_row_avx2(x + (int64_t)i * stride, cs, sn, n_heads, head_dim);
            continue;
        }
        for (int h = 0; h < n_heads; h++) rope_pairs(x + (int64_t)i * stride + h * head_dim, cs, sn, 0, half);
    }
}

void dg_cpu_gather_rows(dg_backend *be, float *y, const float *x, const int32_t *idx, int m,
                        int64_t n) {
    const dg_cpu *c = cpu(be);
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if ((int64_t)m * n > 65536)
    for (int i = 0; i < m; i++)
        memcpy(y + (int64_t)i * n, x + (int64_t)idx[i] * n, sizeof(float) * (size_t)n);
}
