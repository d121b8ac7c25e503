/* ops.c — the CPU backend's element-wise, normalisation, rotary and attention kernels. */
#include <math.h>
#include <string.h>

#include "cpu_kernels.h"
#include "simd_math.h"

#define ATT_HEAD_MAX 512  /* head_dim bound (the config reader checks it): a widened bf16 row */
#define ATT_GROUP_MAX 64  /* n_heads / n_kv_heads bound (qwen2vl_config.c checks it) */

/* HF Qwen2RMSNorm in fp32: y = weight * (x * rsqrt(mean(x²) + eps)). */
void dg_cpu_rmsnorm(const dg_cpu *c, float *y, const float *x, const float *weight, int m, int n,
                    float eps) {
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (m > 1)
    for (int i = 0; i < m; i++) {
        const float *xi = x + (int64_t)i * n;
        float *yi = y + (int64_t)i * n;
        float r = 1.0f / sqrtf(dg_cpu_dot(c->simd, xi, xi, n) / (float)n + eps);
        for (int j = 0; j < n; j++) yi[j] = weight[j] * (xi[j] * r);
    }
}

/* Frequencies as transformers computes them in fp32: 1 / theta^(float(2j) / head_dim). */
static float inv_freq(float theta, int j, int head_dim) {
    return 1.0f / powf(theta, (float)(2 * j) / (float)head_dim);
}

void dg_cpu_rope(const dg_cpu *c, float *x, const int32_t *pos, int m, int n_heads, int head_dim,
                 const dg_rope_params *p) {
    const int half = head_dim / 2;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (m > 1)
    for (int i = 0; i < m; i++) {
        float cs[256], sn[256];          /* head_dim <= 512 (checked by the config reader) */
        for (int j = 0; j < half; j++) {
            int row = j < p->section[0] ? 0 : j < p->section[0] + p->section[1] ? 1 : 2;
            float a = (float)pos[row * m + i] * inv_freq(p->theta, j, head_dim);
            cs[j] = cosf(a);
            sn[j] = sinf(a);
        }
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((int64_t)i * n_heads + h) * head_dim;
            for (int j = 0; j < half; j++) {
                float a = v[j], b = v[j + half];
                v[j] = a * cs[j] - b * sn[j];
                v[j + half] = b * cs[j] + a * sn[j];
            }
        }
    }
}

static inline int64_t kv_row(const dg_kv_view *kv, int p) {
    return (int64_t)kv->block_table[p / kv->block_size] * kv->block_size + p % kv->block_size;
}

/* Position p's values of kv head kvh in base (kv->k or kv->v), in the cache's dtype. */
static inline const void *kv_head_row(const dg_kv_view *kv, const void *base, int p, int kv_dim, int kvh,
                                      int head_dim) {
    const int64_t at = kv_row(kv, p) * kv_dim + (int64_t)kvh * head_dim;
    return (const char *)base + at * (kv->dtype == DG_DTYPE_BF16 ? 2 : 4);
}

void dg_cpu_kv_write(const dg_cpu *c, const dg_kv_view *kv, int start, const float *k,
                     const float *v, int m, int kv_dim) {
    (void)c;
    for (int i = 0; i < m; i++) {
        const int64_t r = kv_row(kv, start + i) * kv_dim;
        const float *ki = k + (int64_t)i * kv_dim, *vi = v + (int64_t)i * kv_dim;
        if (kv->dtype == DG_DTYPE_BF16) {   /* rounded to nearest even, as torch's .to(bfloat16) */
            uint16_t *kd = (uint16_t *)kv->k + r, *vd = (uint16_t *)kv->v + r;
            for (int d = 0; d < kv_dim; d++) {
                kd[d] = dg_f32_to_bf16(ki[d]);
                vd[d] = dg_f32_to_bf16(vi[d]);
            }
        } else {
            memcpy((float *)kv->k + r, ki, sizeof(float) * (size_t)kv_dim);
            memcpy((float *)kv->v + r, vi, sizeof(float) * (size_t)kv_dim);
        }
    }
}

/* Rows p0 .. p0+nc-1, head `kvh` of K or V as pointers to fp32 rows, for the AVX2 and
 * portable paths: into the cache for F32, else widened into buf[nc, head_dim] (8 lanes at a
 * time where the CPU has AVX2: one value at a time, the widening cost a decode step with a
 * bf16 cache more than the half of the KV bytes it saves; 0.92-0.96x the fp32 cache's decode
 * at 512-576 tokens). The AVX-512 path reads bf16 rows where they lie (attention_zmm.c). */
static void kv_rows(int simd, const dg_kv_view *kv, const void *base, int p0, int nc, int kv_dim, int kvh,
                    int head_dim, float *buf, const float **rows) {
    for (int j = 0; j < nc; j++) {
        const void *h = kv_head_row(kv, base, p0 + j, kv_dim, kvh, head_dim);
        if (kv->dtype == DG_DTYPE_BF16) {
            float *r = buf + (int64_t)j * head_dim;
            dg_cpu_widen_bf16(simd, r, h, head_dim);
            rows[j] = r;
        } else {
            rows[j] = h;
        }
    }
}

/* The same rows as one array of stride `*ld`: in place for F32 when they are contiguous in
 * one block, else the F32 rows copied into buf[nc, head_dim] (BF16 rows are widened there
 * by kv_rows already). */
static const float *kv_chunk(int simd, const dg_kv_view *kv, const void *base, int p0, int nc, int kv_dim,
                             int kvh, int head_dim, float *buf, int *ld) {
    const float *rows[DG_ATT_CHUNK];
    kv_rows(simd, kv, base, p0, nc, kv_dim, kvh, head_dim, buf, rows);
    if (kv->dtype == DG_DTYPE_BF16) {
        *ld = head_dim;
        return buf;
    }
    if (p0 % kv->block_size + nc <= kv->block_size) {
        *ld = kv_dim;
        return rows[0];
    }
    for (int j = 0; j < nc; j++) memcpy(buf + (int64_t)j * head_dim, rows[j], sizeof(float) * (size_t)head_dim);
    *ld = head_dim;
    return buf;
}

/* One query head against one chunk of nc keys, the online softmax's step (AVX2): the
 * scores (dot_avx2's order, vector.c, four keys at a time), their maximum m' = max(*mx,
 * max s), exp(s - m') on 8 lanes (dg_exp256) summed lane-wise in key order, then
 * o = o·corr (corr = expf(*mx - m'), 0 on the first chunk) and o += e_j·v_j in key order,
 * 64 columns of o at a time in registers. */
DG_SIMD_AVX2 static void attend_chunk_avx2(float *o, const float *q, const float *kc, int ldk, const float *vc,
                                           int ldv, int nc, int hd, float scale, float *mx, float *l) {
    float s[DG_ATT_CHUNK + 8] __attribute__((aligned(32)));
    int j = 0;
    for (; j + 4 <= nc; j += 4) {
        const float *k[4] = {kc + (int64_t)j * ldk, kc + (int64_t)(j + 1) * ldk, kc + (int64_t)(j + 2) * ldk,
                             kc + (int64_t)(j + 3) * ldk};
        __m256 a0[4], a1[4];
        _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) a0[t] = a1[t] = _mm256_setzero_ps();
        int d = 0;
        for (; d + 16 <= hd; d += 16) {
            const __m256 q0 = _mm256_loadu_ps(q + d), q1 = _mm256_loadu_ps(q + d + 8);
            _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {
                a0[t] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k[t] + d), a0[t]);
                a1[t] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k[t] + d + 8), a1[t]);
            }
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {
            int e = d;
            if (e + 8 <= hd) {
                a0[t] = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(k[t] + e), a0[t]);
                e += 8;
            }
            float v = dg_hsum256(_mm256_add_ps(a0[t], a1[t]));
            for (; e < hd; e++) v += q[e] * k[t][e];
            s[j + t] = v * scale;
        }
    }
    for (; j < nc; j++) s[j] = dg_cpu_dot(DG_CPU_AVX2, q, kc + (int64_t)j * ldk, hd) * scale;

    float m = *mx;
    for (j = 0; j < nc; j++) m = s[j] > m ? s[j] : m;
    const float corr = expf(*mx - m);   /* 0 on the first chunk (mx = -inf) */
    const __m256 bm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (j = nc; j % 8; j++) s[j] = m;  /* lanes past nc: defined, then masked to 0 */
    for (j = 0; j < nc; j += 8) {
        const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nc), lane));
        const __m256 e = _mm256_and_ps(dg_exp256(_mm256_sub_ps(_mm256_load_ps(s + j), bm)), live);
        _mm256_store_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    *l = *l * corr + dg_hsum256(acc);
    *mx = m;

    const __m256 vcorr = _mm256_set1_ps(corr);
    int d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) {
        __m256 y[8];
        _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++) y[b] = _mm256_mul_ps(_mm256_loadu_ps(o + d0 + 8 * b), vcorr);
        for (j = 0; j < nc; j++) {
            const __m256 e = _mm256_set1_ps(s[j]);
            const float *v = vc + (int64_t)j * ldv + d0;
            _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++) y[b] = _mm256_fmadd_ps(e, _mm256_loadu_ps(v + 8 * b), y[b]);
        }
        _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++) _mm256_storeu_ps(o + d0 + 8 * b, y[b]);
    }
    for (; d0 + 8 <= hd; d0 += 8) {
        __m256 y = _mm256_mul_ps(_mm256_loadu_ps(o + d0), vcorr);
        for (j = 0; j < nc; j++)
            y = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(vc + (int64_t)j * ldv + d0), y);
        _mm256_storeu_ps(o + d0, y);
    }
    for (; d0 < hd; d0++) {
        float y = o[d0] * corr;
        for (j = 0; j < nc; j++) y = y + s[j] * vc[(int64_t)j * ldv + d0];
        o[d0] = y;
    }
}

/* The same step, portable: dot, scalar expf and scale_axpy in key order. */
static void attend_chunk_c(float *o, const float *q, const float *kc, int ldk, const float *vc, int ldv, int nc,
                           int hd, float scale, float *mx, float *l) {
    float s[DG_ATT_CHUNK], cm = -INFINITY;
    for (int j = 0; j < nc; j++) {
        s[j] = dg_cpu_dot(DG_CPU_PORTABLE, q, kc + (int64_t)j * ldk, hd) * scale;
        if (s[j] > cm) cm = s[j];
    }
    const float mnew = cm > *mx ? cm : *mx;
    const float corr = expf(*mx - mnew);   /* 0 on the first chunk (mx = -inf) */
    *l *= corr;
    for (int j = 0; j < nc; j++) {
        const float e = expf(s[j] - mnew);
        dg_cpu_scale_axpy(DG_CPU_PORTABLE, o, j == 0 ? corr : 1.0f, e, vc + (int64_t)j * ldv, hd);
        *l += e;
    }
    *mx = mnew;
}

/* One work item of the decoder's attention, a (query row, kv head) pair (q, out: that row;
 * n_ctx: its position + 1, the keys it sees): its `group` query heads share each chunk of K
 * and V rows, read (and widened from BF16) once; each query head runs the online softmax
 * over chunks of DG_ATT_CHUNK keys (attend_chunk_*; on AVX-512 with head_dim a multiple of
 * 16, all the group's heads a chunk at once in attention_zmm.c), chunks starting at
 * multiples of DG_ATT_CHUNK, so its bits depend only on its q, the keys/values and n_ctx,
 * never on m, its place in the batch or the thread. The value is softmax(q·Kᵀ·scale)·V up to fp32
 * rounding, without a [context]-sized buffer. */
static void attend_group(const dg_cpu *c, float *out, const float *q, const dg_kv_view *kv, int n_ctx,
                         int n_heads, int n_kv_heads, int kvh, int head_dim, float scale) {
    const int group = n_heads / n_kv_heads, kv_dim = n_kv_heads * head_dim;
    const int64_t h0 = (int64_t)kvh * group * head_dim;
    float mx[ATT_GROUP_MAX], l[ATT_GROUP_MAX];
    static _Thread_local float kb[DG_ATT_CHUNK * ATT_HEAD_MAX], vb[DG_ATT_CHUNK * ATT_HEAD_MAX];
    for (int g = 0; g < group; g++) {
        mx[g] = -INFINITY;
        l[g] = 0.0f;
        memset(out + h0 + (int64_t)g * head_dim, 0, sizeof(float) * (size_t)head_dim);
    }
    if (c->simd >= DG_CPU_AVX512 && head_dim % 16 == 0) {   /* attention_zmm.c: all the heads a chunk */
        const void *kr[DG_ATT_CHUNK], *vr[DG_ATT_CHUNK];   /* the rows where they lie, either dtype */
        for (int p0 = 0; p0 < n_ctx; p0 += DG_ATT_CHUNK) {
            const int nc = n_ctx - p0 < DG_ATT_CHUNK ? n_ctx - p0 : DG_ATT_CHUNK;
            for (int j = 0; j < nc; j++) {
                kr[j] = kv_head_row(kv, kv->k, p0 + j, kv_dim, kvh, head_dim);
                vr[j] = kv_head_row(kv, kv->v, p0 + j, kv_dim, kvh, head_dim);
            }
            dg_cpu_att_group_chunk_zmm(out + h0, q + h0, kr, vr, nc, group, head_dim, scale, mx, l,
                                       kv->dtype == DG_DTYPE_BF16);
        }
    } else {
        for (int p0 = 0; p0 < n_ctx; p0 += DG_ATT_CHUNK) {
            const int nc = n_ctx - p0 < DG_ATT_CHUNK ? n_ctx - p0 : DG_ATT_CHUNK;
            int ldk, ldv;
            const float *kc = kv_chunk(c->simd, kv, kv->k, p0, nc, kv_dim, kvh, head_dim, kb, &ldk);
            const float *vc = kv_chunk(c->simd, kv, kv->v, p0, nc, kv_dim, kvh, head_dim, vb, &ldv);
            for (int g = 0; g < group; g++) {
                float *o = out + h0 + (int64_t)g * head_dim;
                const float *qi = q + h0 + (int64_t)g * head_dim;
                if (c->simd) attend_chunk_avx2(o, qi, kc, ldk, vc, ldv, nc, head_dim, scale, &mx[g], &l[g]);
                else attend_chunk_c(o, qi, kc, ldk, vc, ldv, nc, head_dim, scale, &mx[g], &l[g]);
            }
        }
    }
    for (int g = 0; g < group; g++) {
        float *o = out + h0 + (int64_t)g * head_dim;
        const float inv = 1.0f / l[g];
        for (int d = 0; d < head_dim; d++) o[d] *= inv;
    }
}

void dg_cpu_attention(const dg_cpu *c, float *out, const float *q, const dg_kv_view *kv, int n_past,
                      int m, int n_heads, int n_kv_heads, int head_dim, float scale) {
    const int64_t QD = (int64_t)n_heads * head_dim, pairs = (int64_t)m * n_kv_heads;
#pragma omp parallel for num_threads(c->n_threads) schedule(dynamic, 1)
    for (int64_t ig = 0; ig < pairs; ig++) {
        const int i = (int)(ig / n_kv_heads), kvh = (int)(ig % n_kv_heads);
        attend_group(c, out + i * QD, q + i * QD, kv, n_past + i + 1, n_heads, n_kv_heads, kvh, head_dim, scale);
    }
}

/* Every sequence's K/V rows written, then one parallel loop over the (row, kv head) items
 * of all of them: a decode step of many sequences opens one parallel region a layer, and
 * two threads share the items of eight sequences rather than the two kv heads of each.
 * An item is the same work as in dg_cpu_attention, so the bits are its. */
void dg_cpu_attention_batch(const dg_cpu *c, float *out, const float *q, const float *k, const float *v,
                            const dg_attn_seq *seqs, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                            float scale) {
    const int64_t QD = (int64_t)n_heads * head_dim, KD = (int64_t)n_kv_heads * head_dim;
    int n = 0;
    for (int i = 0; i < n_seqs; n += seqs[i].m, i++)
        dg_cpu_kv_write(c, &seqs[i].kv, seqs[i].n_past, k + n * KD, v + n * KD, seqs[i].m, (int)KD);
    const int64_t items = (int64_t)n * n_kv_heads;
#pragma omp parallel num_threads(c->n_threads)
    {
        int si = 0, row0 = 0;   /* this thread's sequence cursor: items come in row order */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int row = (int)(it / n_kv_heads), kvh = (int)(it % n_kv_heads);
            if (row < row0) si = 0, row0 = 0;
            while (row >= row0 + seqs[si].m) row0 += seqs[si++].m;
            attend_group(c, out + row * QD, q + row * QD, &seqs[si].kv, seqs[si].n_past + row - row0 + 1, n_heads,
                         n_kv_heads, kvh, head_dim, scale);
        }
    }
}

/* y = g / (1 + exp(-g)) * up on 8 lanes, every element through dg_exp256 (the last, short
 * group by masked loads and stores): an element's bits do not depend on where it sits. */
DG_SIMD_AVX2 static void silu_mul_avx2(float *y, const float *gate, const float *up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = dg_exp256(_mm256_sub_ps(zero, g));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    if (i < n) {
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 g = _mm256_maskload_ps(gate + i, live);
        const __m256 e = dg_exp256(_mm256_sub_ps(zero, g));
        _mm256_maskstore_ps(y + i, live, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                                       _mm256_maskload_ps(up + i, live)));
    }
}

void dg_cpu_silu_mul(const dg_cpu *c, float *y, const float *gate, const float *up, int64_t n) {
    if (c->simd) {
        const int64_t per = 8192, parts = (n + per - 1) / per;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (n > 65536)
        for (int64_t p = 0; p < parts; p++)
            silu_mul_avx2(y + p * per, gate + p * per, up + p * per, p + 1 < parts ? per : n - p * per);
        return;
    }
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        y[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void dg_cpu_add(const dg_cpu *c, float *y, const float *x, int64_t n) {
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

void dg_cpu_embed(const dg_cpu *c, float *y, const dg_weight *table, const int32_t *ids, int m) {
    for (int i = 0; i < m; i++) dg_cpu_rows_f32(c->simd, y + (int64_t)i * table->cols, table, ids[i], 1);
}

void dg_cpu_softmax(const dg_cpu *c, float *x, int m, int n) {
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (m > 1)
    for (int i = 0; i < m; i++) {
        float *r = x + (int64_t)i * n, mx = -INFINITY;
        double sum = 0.0;   /* in fp32 a row of 2^18 lost 1.7e-4 (the plane may reach 2^20) */
        for (int j = 0; j < n; j++) if (r[j] > mx) mx = r[j];
        for (int j = 0; j < n; j++) sum += (r[j] = expf(r[j] - mx));
        const float inv = (float)(1.0 / sum);
        for (int j = 0; j < n; j++) r[j] *= inv;
    }
}
