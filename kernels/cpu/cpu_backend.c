/* cpu_backend.c — the CPU backend's operation table, GEMM dispatch and memory. */
#include "cpu_backend.h"

#include <cblas.h>
#include <cpuid.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "vision_ops.h"
#include "dit_ops.h"
#include "sample_ops.h"
#include "duogen.h"

/* GEMM over bf16/f16 weights converts a slab of weight rows to fp32 and hands it to
 * OpenBLAS. 4M floats (16 MiB) hold >= 200 rows of the widest Qwen2.5-VL-7B matrix
 * (down_proj, 18944 columns): large enough for sgemm to run at full speed. */
#define CONV_FLOATS (4 << 20)

static dg_cpu *cpu(dg_backend *be) { return be->impl; }
static int cpu_fork(dg_backend *be, dg_backend **out, char *err, size_t errlen);

/* AVX2 + FMA (the compiler's check includes OS support for the ymm state) and F16C
 * (CPUID.1:ECX bit 29; not every compiler's __builtin_cpu_supports knows "f16c"). */
static int has_simd(void) {
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}

static void cpu_free(dg_backend *be) {
    if (!be) return;
    if (be->impl) free(cpu(be)->conv);
    free(be->impl);
    free(be);
}

static void *cpu_alloc(dg_backend *be, size_t bytes) {
    (void)be;
    void *p = NULL;
    size_t n = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, n ? n : 64)) return NULL;
    return p;
}

static void cpu_release(dg_backend *be, void *p) { (void)be; free(p); }

static int cpu_weight_prepare(dg_backend *be, dg_weight *w, char *err, size_t errlen) {
    (void)be; (void)w; (void)err; (void)errlen;
    return 0;   /* the ops read the mapped tensor in place */
}

static void add_bias(dg_cpu *c, float *y, const float *bias, int m, int64_t n) {
#pragma omp parallel for num_threads(c->n_threads) schedule(static)
    for (int i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) y[(int64_t)i * n + j] += bias[j];
}

static void cpu_matmul(dg_backend *be, float *y, const float *x, const dg_weight *w,
                       const float *bias, int m) {
    dg_cpu *c = cpu(be);
    const int64_t n = w->rows, k = w->cols;
    if (m == 1) {
        dg_cpu_gemv(c, y, x, w, bias);
        return;
    }
    if (w->dtype == DG_DTYPE_F32) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, (int)n, (int)k, 1.0f, x, (int)k,
                    w->data, (int)k, 0.0f, y, (int)n);
    } else {
        const int64_t slab = c->conv_floats / k;          /* rows converted at once */
        for (int64_t r0 = 0; r0 < n; r0 += slab) {
            const int64_t nr = n - r0 < slab ? n - r0 : slab;
            const int64_t per = (nr + c->n_threads - 1) / c->n_threads;
#pragma omp parallel for num_threads(c->n_threads) schedule(static)
            for (int t = 0; t < c->n_threads; t++) {
                int64_t a = t * per, b = a + per < nr ? a + per : nr;
                if (a < b) dg_cpu_rows_f32(c->simd, c->conv + a * k, w, r0 + a, b - a);
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, (int)nr, (int)k, 1.0f, x,
                        (int)k, c->conv, (int)k, 0.0f, y + r0, (int)n);
        }
    }
    if (bias) add_bias(c, y, bias, m, n);
}

static void cpu_rmsnorm(dg_backend *be, float *y, const float *x, const float *weight, int m,
                        int n, float eps) {
    dg_cpu_rmsnorm(cpu(be), y, x, weight, m, n, eps);
}

static void cpu_rope(dg_backend *be, float *x, const int32_t *pos, int m, int n_heads,
                     int head_dim, const dg_rope_params *p) {
    dg_cpu_rope(cpu(be), x, pos, m, n_heads, head_dim, p);
}

static void cpu_kv_write(dg_backend *be, const dg_kv_view *kv, int start, const float *k,
                         const float *v, int m, int kv_dim) {
    dg_cpu_kv_write(cpu(be), kv, start, k, v, m, kv_dim);
}

static void cpu_attention(dg_backend *be, float *out, const float *q, const dg_kv_view *kv,
                          int n_past, int m, int n_heads, int n_kv_heads, int head_dim,
                          float scale) {
    dg_cpu_attention(cpu(be), out, q, kv, n_past, m, n_heads, n_kv_heads, head_dim, scale);
}

static void cpu_silu_mul(dg_backend *be, float *y, const float *gate, const float *up, int64_t n) {
    dg_cpu_silu_mul(cpu(be), y, gate, up, n);
}

static void cpu_add(dg_backend *be, float *y, const float *x, int64_t n) {
    dg_cpu_add(cpu(be), y, x, n);
}

static void cpu_embed(dg_backend *be, float *y, const dg_weight *table, const int32_t *ids, int m) {
    dg_cpu_embed(cpu(be), y, table, ids, m);
}

static int cpu_status(dg_backend *be, char *err, size_t errlen) {
    (void)be;
    (void)err;
    (void)errlen;
    return 0;
}

static void cpu_download(dg_backend *be, float *host, const float *src, int64_t n) {
    (void)be;
    memcpy(host, src, sizeof(float) * (size_t)n);
}

static void cpu_upload(dg_backend *be, float *dst, const float *host, int64_t n) {
    (void)be;
    memcpy(dst, host, sizeof(float) * (size_t)n);
}

/* A backend with these settings and its own scratch: the table is set here once, for new and
 * fork alike. */
static int cpu_make(const dg_cpu *settings, dg_backend **out, char *err, size_t errlen) {
    dg_backend *be = calloc(1, sizeof *be);
    dg_cpu *c = calloc(1, sizeof *c);
    *out = NULL;
    if (!be || !c) goto nomem;
    be->impl = c;
    *c = *settings;
    if (!(c->conv = cpu_alloc(be, sizeof(float) * (size_t)c->conv_floats))) goto nomem;
    be->name = c->simd ? "cpu" : "cpu-scalar";
    be->n_threads = c->n_threads;
    be->free = cpu_free;
    be->fork = cpu_fork;
    be->alloc = cpu_alloc;
    be->release = cpu_release;
    be->weight_prepare = cpu_weight_prepare;
    be->matmul = cpu_matmul;
    be->rmsnorm = cpu_rmsnorm;
    be->rope = cpu_rope;
    be->kv_write = cpu_kv_write;
    be->attention = cpu_attention;
    be->silu_mul = cpu_silu_mul;
    be->add = cpu_add;
    be->embed = cpu_embed;
    be->download = cpu_download;
    be->upload = cpu_upload;
    be->attention_segments = dg_cpu_attention_segments;
    be->gelu = dg_cpu_gelu;
    be->rope_table = dg_cpu_rope_table;
    be->gather_rows = dg_cpu_gather_rows;
    be->conv3d = dg_cpu_conv3d;
    be->channel_rmsnorm = dg_cpu_channel_rmsnorm;
    be->upsample2x = dg_cpu_upsample2x;
    be->spatial_attention = dg_cpu_spatial_attention;
    be->silu = dg_cpu_silu;
    be->modulate = dg_cpu_modulate;
    be->add_gated = dg_cpu_add_gated;
    be->standardize = dg_cpu_standardize;
    be->logits_adjust = dg_cpu_logits_adjust;
    be->topk = dg_cpu_topk;
    be->status = cpu_status;
    *out = be;
    return 0;
nomem:
    if (be) be->impl = c; else free(c);
    cpu_free(be);
    snprintf(err, errlen, "cpu backend: out of memory");
    return DG_ENOMEM;
}

/* The conv scratch is the one thing an operation writes besides its outputs (the rest keep
 * their temporaries on the stack of the calling thread): a fork gets its own, and shares
 * nothing else, since host memory and the mapped weights need no sharing arrangement. Each
 * thread's OpenMP regions get a team of their own; OpenBLAS's OpenMP build (0.3.21, one
 * set of thread buffers) lets a threaded GEMM wait while another thread's runs, so two
 * forks' sgemm calls are correct but take turns. */
static int cpu_fork(dg_backend *be, dg_backend **out, char *err, size_t errlen) {
    dg_cpu settings = *cpu(be);
    settings.conv = NULL;
    return cpu_make(&settings, out, err, errlen);
}

int dg_cpu_backend_new(int n_threads, int force_scalar, dg_backend **out, char *err, size_t errlen) {
    dg_cpu settings = {.n_threads = n_threads > 0 ? n_threads : omp_get_num_procs(),
                       .simd = !force_scalar && has_simd(), .conv_floats = CONV_FLOATS};
    openblas_set_num_threads(settings.n_threads);
    return cpu_make(&settings, out, err, errlen);
}
