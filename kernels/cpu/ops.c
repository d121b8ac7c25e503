/* ops.c — the CPU backend's element-wise, normalisation, rotary and attention kernels. */
#include <math.h>
#include <string.h>

#include "cpu_kernels.h"

#define ATT_CHUNK 64      /* keys scored at once by the online softmax (stack buffer) */
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

/* Rows p0 .. p0+nc-1, head `kvh` of K or V as fp32 rows of stride `*ld`: in place for F32
 * (when the rows are contiguous in one block), else copied/widened into buf[nc, head_dim]. */
static const float *kv_chunk(const dg_kv_view *kv, const void *base, int p0, int nc, int kv_dim,
                             int kvh, int head_dim, float *buf, int *ld) {
    const int64_t at0 = kv_row(kv, p0) * kv_dim + (int64_t)kvh * head_dim;
    if (kv->dtype != DG_DTYPE_BF16 && p0 % kv->block_size + nc <= kv->block_size) {
        *ld = kv_dim;
        return (const float *)base + at0;
    }
    for (int j = 0; j < nc; j++) {
        const int64_t at = kv_row(kv, p0 + j) * kv_dim + (int64_t)kvh * head_dim;
        float *r = buf + (int64_t)j * head_dim;
        if (kv->dtype == DG_DTYPE_BF16) {
            const uint16_t *h = (const uint16_t *)base + at;
            for (int d = 0; d < head_dim; d++) r[d] = dg_bf16_to_f32(h[d]);
        } else {
            memcpy(r, (const float *)base + at, sizeof(float) * (size_t)head_dim);
        }
    }
    *ld = head_dim;
    return buf;
}

/* One (query, kv head) pair at a time: its `group` query heads share each chunk of K and V
 * rows, read (and widened from BF16) once. Each query head still runs the same fixed
 * sequence as alone — an online softmax over chunks of ATT_CHUNK keys, dot, scalar expf,
 * scale_axpy in key order — so its bits depend only on its q, the keys/values and n_ctx,
 * never on m, its place in the batch or the thread. The value is softmax(q·Kᵀ·scale)·V up
 * to fp32 rounding, without a [context]-sized buffer. */
void dg_cpu_attention(const dg_cpu *c, float *out, const float *q, const dg_kv_view *kv, int n_past,
                      int m, int n_heads, int n_kv_heads, int head_dim, float scale) {
    const int group = n_heads / n_kv_heads, kv_dim = n_kv_heads * head_dim;
    const int64_t pairs = (int64_t)m * n_kv_heads;
#pragma omp parallel for num_threads(c->n_threads) schedule(dynamic, 1)
    for (int64_t ig = 0; ig < pairs; ig++) {
        const int i = (int)(ig / n_kv_heads), kvh = (int)(ig % n_kv_heads);
        const int64_t ih0 = (int64_t)i * n_heads + (int64_t)kvh * group;
        const int n_ctx = n_past + i + 1;
        float s[ATT_CHUNK], mx[ATT_GROUP_MAX], l[ATT_GROUP_MAX];
        static _Thread_local float kb[ATT_CHUNK * ATT_HEAD_MAX], vb[ATT_CHUNK * ATT_HEAD_MAX];
        for (int g = 0; g < group; g++) {
            mx[g] = -INFINITY;
            l[g] = 0.0f;
            memset(out + (ih0 + g) * head_dim, 0, sizeof(float) * (size_t)head_dim);
        }
        for (int p0 = 0; p0 < n_ctx; p0 += ATT_CHUNK) {
            const int nc = n_ctx - p0 < ATT_CHUNK ? n_ctx - p0 : ATT_CHUNK;
            int ldk, ldv;
            const float *kc = kv_chunk(kv, kv->k, p0, nc, kv_dim, kvh, head_dim, kb, &ldk);
            const float *vc = kv_chunk(kv, kv->v, p0, nc, kv_dim, kvh, head_dim, vb, &ldv);
            for (int g = 0; g < group; g++) {
                const float *qi = q + (ih0 + g) * head_dim;
                float *o = out + (ih0 + g) * head_dim, cm = -INFINITY;
                for (int j = 0; j < nc; j++) {
                    s[j] = dg_cpu_dot(c->simd, qi, kc + (int64_t)j * ldk, head_dim) * scale;
                    if (s[j] > cm) cm = s[j];
                }
                const float mnew = cm > mx[g] ? cm : mx[g];
                const float corr = expf(mx[g] - mnew);   /* 0 on the first chunk (mx = -inf) */
                l[g] *= corr;
                for (int j = 0; j < nc; j++) {
                    const float e = expf(s[j] - mnew);
                    dg_cpu_scale_axpy(c->simd, o, j == 0 ? corr : 1.0f, e, vc + (int64_t)j * ldv,
                                      head_dim);
                    l[g] += e;
                }
                mx[g] = mnew;
            }
        }
        for (int g = 0; g < group; g++) {
            float *o = out + (ih0 + g) * head_dim;
            const float inv = 1.0f / l[g];
            for (int d = 0; d < head_dim; d++) o[d] *= inv;
        }
    }
}

void dg_cpu_silu_mul(const dg_cpu *c, float *y, const float *gate, const float *up, int64_t n) {
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
        float *r = x + (int64_t)i * n, mx = -INFINITY, sum = 0.0f;
        for (int j = 0; j < n; j++) if (r[j] > mx) mx = r[j];
        for (int j = 0; j < n; j++) sum += (r[j] = expf(r[j] - mx));
        const float inv = 1.0f / sum;
        for (int j = 0; j < n; j++) r[j] *= inv;
    }
}
