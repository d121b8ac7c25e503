/* cpu_backend.c — the CPU backend's operation table, kernel-set detection and memory. */
#include "cpu_backend.h"

#include <cblas.h>
#include <errno.h>
#include <cpuid.h>
#include <omp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cpu_kernels.h"
#include "matmul.h"
#include "vision_ops.h"
#include "dit_ops.h"
#include "sample_ops.h"
#include "screen.h"
#include "duogen.h"

/* The convolution's scratch: 4M floats (16 MiB) of im2col tiles (backend.h bounds conv3d's
 * c_in·kt·kh·kw by it) and the VAE attention's score tiles. */
#define CONV_FLOATS (4 << 20)

static dg_cpu *cpu(dg_backend *be) { return be->impl; }
static int cpu_fork(dg_backend *be, dg_backend **out, char *err, size_t errlen);

/* The widest kernel set of the machine (cpu_backend.h). AVX2 + FMA (the compiler's check
 * includes OS support for the ymm state) and F16C (CPUID.1:ECX bit 29; not every compiler's
 * __builtin_cpu_supports knows "f16c"); AVX-512 F (the check includes OS support for the
 * zmm state); then AVX-512 BW and BF16 (CPUID.(EAX=7,ECX=1):EAX bit 5, which GCC 12's
 * __builtin_cpu_supports does not know either). */
int dg_cpu_simd_level(void) {
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") ||
        !__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 29)))
        return DG_CPU_PORTABLE;
    if (!__builtin_cpu_supports("avx512f")) return DG_CPU_AVX2;
    if (__builtin_cpu_supports("avx512bw") && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)))
        return DG_CPU_AVX512_BF16;
    return DG_CPU_AVX512;
}

static void cpu_free(dg_backend *be) {
    if (!be) return;
    if (be->impl) {
        free(cpu(be)->conv);
        free(cpu(be)->gemm);
        free(cpu(be)->gemm_bf16);
        free(cpu(be)->xbf16);
        free(cpu(be)->att_bf16);
        free(cpu(be)->att_kv);
        free(cpu(be)->att_f32);
    }
    free(be->impl);
    free(be);
}

/* Buffers of 2 MiB and more (the KV pool, the decoder's activations) aligned to and rounded
 * up to 2 MiB and advised into transparent huge pages (where THP is "madvise", as here, the
 * kernel gives none without the advice), as the weights are (safetensors.c read_huge): the
 * decoder's attention walks the pool a block of rows at a time across pages. Measured at
 * one thread after a 512-token prompt, alternated three times: a decode step's matrix
 * products 33.5-35.7 -> 31.4-32.5 ms, its attention over 4096 tokens 13.2-13.4 -> 12.4-13.0
 * ms. Smaller buffers stay on the heap. */
#define HUGE_ALLOC ((size_t)2 << 20)
static void *cpu_alloc(dg_backend *be, size_t bytes) {
    (void)be;
    void *p = NULL;
    size_t n = (bytes + 63) & ~(size_t)63;
    if (n >= HUGE_ALLOC) {
        n = (n + HUGE_ALLOC - 1) & ~(HUGE_ALLOC - 1);
        if (posix_memalign(&p, HUGE_ALLOC, n)) return NULL;
        madvise(p, n, MADV_HUGEPAGE);
        return p;
    }
    if (posix_memalign(&p, 64, n ? n : 64)) return NULL;
    return p;
}

static void cpu_release(dg_backend *be, void *p) { (void)be; free(p); }

static int cpu_weight_prepare(dg_backend *be, dg_weight *w, char *err, size_t errlen) {
    (void)be; (void)w; (void)err; (void)errlen;
    return 0;   /* the ops read the mapped tensor in place, in either layout (backend.h) */
}

static void cpu_matmul(dg_backend *be, float *y, const float *x, const dg_weight *w,
                       const float *bias, int m) {
    dg_cpu_matmul(cpu(be), y, x, w, bias, m);
}

static int cpu_screen_new(dg_backend *be, const dg_weight *w, dg_screen **out, char *err, size_t errlen) {
    return dg_cpu_screen_new(cpu(be), w, out, err, errlen);
}

static void cpu_screen_free(dg_backend *be, dg_screen *sc) {
    (void)be;
    dg_cpu_screen_free(sc);
}

static void cpu_matmul_bounds(dg_backend *be, float *lo, float *hi, const float *x, const dg_screen *sc, int m) {
    dg_cpu_matmul_bounds(cpu(be), lo, hi, x, sc, m);
}

static void cpu_matmul_pick(dg_backend *be, float *out, const float *x, const dg_weight *w, const int32_t *ids,
                            int n) {
    dg_cpu_matmul_pick(cpu(be), out, x, w, ids, n);
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

static void cpu_attention_batch(dg_backend *be, float *out, const float *q, const float *k, const float *v,
                                const dg_attn_seq *seqs, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                                float scale) {
    dg_cpu_attention_batch(cpu(be), out, q, k, v, seqs, n_seqs, n_heads, n_kv_heads, head_dim, scale);
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

/* The first value of a cgroup file (a number, or "max"): 0 and *v set, -1 when the file
 * cannot be read or holds neither. "max", and v1's "no limit" (the page-rounded
 * LLONG_MAX), are UINT64_MAX. */
static int cgroup_value(const char *dir, const char *name, uint64_t *v) {
    char path[4096], text[64] = "";
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    const int ok = fgets(text, sizeof text, f) != NULL;
    fclose(f);
    char *end;
    if (!ok) return -1;
    if (!strncmp(text, "max", 3)) {
        *v = UINT64_MAX;
        return 0;
    }
    errno = 0;
    unsigned long long x = strtoull(text, &end, 10);
    if (errno || end == text) return -1;
    *v = x >= (1ull << 62) ? UINT64_MAX : (uint64_t)x;
    return 0;
}

/* A key's value in a cgroup's memory.stat ("inactive_file 123"); 0 when absent. */
static uint64_t cgroup_stat(const char *dir, const char *key) {
    char path[4096], name[64];
    unsigned long long v;
    uint64_t out = 0;
    snprintf(path, sizeof path, "%s/memory.stat", dir);
    FILE *f = fopen(path, "r");
    while (f && fscanf(f, "%63s %llu", name, &v) == 2)
        if (!strcmp(name, key)) {
            out = v;
            break;
        }
    if (f) fclose(f);
    return out;
}

size_t dg_cgroup_memory_room(const char *proc_cgroup, const char *cgroup_root) {
    FILE *f = fopen(proc_cgroup, "r");
    if (!f) return SIZE_MAX;
    char *line = NULL, v1[2048] = "", v2[2048] = "", *has_v2 = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) >= 0) {   /* "id:controllers:path" */
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL, *save = NULL;
        if (!c2) continue;
        *c1 = *c2 = 0;
        char *path = c2 + 1;
        path[strcspn(path, "\n")] = 0;
        if (!strcmp(line, "0") && !c1[1]) {   /* v2: "0::/path" */
            snprintf(v2, sizeof v2, "%s", path);
            has_v2 = v2;
        }
        for (char *tok = strtok_r(c1 + 1, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
            if (!strcmp(tok, "memory")) snprintf(v1, sizeof v1, "%s", path);
    }
    free(line);
    fclose(f);

    /* v1 where the memory controller is there (a hybrid host's v2 tree has none), else v2 */
    const int is_v1 = v1[0] != 0;
    if (!is_v1 && !has_v2) return SIZE_MAX;
    const char *limit_file = is_v1 ? "memory.limit_in_bytes" : "memory.max";
    const char *usage_file = is_v1 ? "memory.usage_in_bytes" : "memory.current";
    const char *inactive = is_v1 ? "total_inactive_file" : "inactive_file";
    char base[4096], dir[4096];
    snprintf(base, sizeof base, "%s%s", cgroup_root, is_v1 ? "/memory" : "");
    /* the group's path is from the hierarchy's root; inside a container without a cgroup
     * namespace the mount shows only a subtree: drop leading parts until the folder is there
     * (a folder that is there but lacks the files is the group's own: its levels without the
     * memory controller set no limit) */
    const char *rel = is_v1 ? v1 : v2;
    for (;;) {
        snprintf(dir, sizeof dir, "%s%s", base, rel);
        if (access(dir, F_OK) == 0 || !*rel) break;
        const char *next = strchr(rel + 1, '/');
        rel = next ? next : "";
    }
    size_t room = SIZE_MAX;
    for (;;) {   /* this group, then each parent up to the mount */
        uint64_t limit, usage;
        if (cgroup_value(dir, limit_file, &limit) == 0 && limit != UINT64_MAX &&
            cgroup_value(dir, usage_file, &usage) == 0) {
            uint64_t reclaim = cgroup_stat(dir, inactive);
            uint64_t used = usage > reclaim ? usage - reclaim : 0;
            uint64_t r = limit > used ? limit - used : 0;
            if (r < room) room = (size_t)r;
        }
        if (strlen(dir) <= strlen(base)) break;
        char *slash = strrchr(dir, '/');
        if (!slash || slash < dir + strlen(base)) break;
        *slash = 0;
    }
    return room;
}

/* The host's MemAvailable (/proc/meminfo), else its free pages, and no more than the
 * process's control groups leave it (dg_cgroup_memory_room); 0 when nothing is known. */
static size_t cpu_memory_free(dg_backend *be) {
    (void)be;
    FILE *f = fopen("/proc/meminfo", "r");
    char line[128];
    unsigned long long kib = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1) break;
    if (f) fclose(f);
    size_t host = (size_t)kib * 1024;
    if (!kib) {
        long pages = sysconf(_SC_AVPHYS_PAGES), size = sysconf(_SC_PAGESIZE);
        host = pages > 0 && size > 0 ? (size_t)pages * (size_t)size : 0;
    }
    const size_t room = dg_cgroup_memory_room("/proc/self/cgroup", "/sys/fs/cgroup");
    return room < host ? room : host;
}

void dg_cpu_fail(dg_cpu *c, const char *fmt, ...) {
    if (c->status) return;
    c->status = DG_EDEVICE;
    int n = snprintf(c->status_msg, sizeof c->status_msg, "cpu: ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->status_msg + n, sizeof c->status_msg - (size_t)n, fmt, ap);
    va_end(ap);
}

static int cpu_status(dg_backend *be, char *err, size_t errlen) {
    const dg_cpu *c = cpu(be);
    if (c->status && err && errlen) snprintf(err, errlen, "%s", c->status_msg);
    return c->status;
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
    if (!(c->conv = cpu_alloc(be, sizeof(float) * (size_t)c->conv_floats)) ||
        !(c->gemm = cpu_alloc(be, sizeof(float) * DG_MATMUL_SCRATCH_FLOATS * (size_t)c->n_threads)) ||
        (c->bf16_compute &&
         (!(c->gemm_bf16 = cpu_alloc(be, sizeof(uint16_t) * DG_MATMUL_BF16_PANEL * (size_t)c->n_threads)) ||
          !(c->xbf16 = cpu_alloc(be, sizeof(uint16_t) * DG_MATMUL_BF16_XBUF)))) ||
        (c->bf16_compute && c->simd >= DG_CPU_AVX512_BF16 &&
         !(c->att_bf16 = cpu_alloc(be, sizeof(uint32_t) * DG_ATT_SCRATCH_WORDS * (size_t)c->n_threads))) ||
        (c->simd >= DG_CPU_AVX512 && !(c->bf16_compute && c->simd >= DG_CPU_AVX512_BF16) &&
         !(c->att_f32 = cpu_alloc(be, sizeof(float) * DG_ATT_F32_SCRATCH_FLOATS * (size_t)c->n_threads))))
        goto nomem;
    be->name = c->simd ? "cpu" : "cpu-scalar";
    be->n_threads = c->n_threads;
    be->kv_bf16 = 1;
    be->rows_exact = 1;
    be->weights_blocked = 1;
    be->bf16_compute = c->bf16_compute;
    be->weights_panels = 1;
    be->screen_rows = c->simd >= DG_CPU_AVX512 && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vnni")
                          ? (c->n_threads > 1 ? 4 : 2)
                          : 0;
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
    be->attention_batch = cpu_attention_batch;
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
    be->screen_new = cpu_screen_new;
    be->screen_free = cpu_screen_free;
    be->matmul_bounds = cpu_matmul_bounds;
    be->matmul_pick = cpu_matmul_pick;
    be->status = cpu_status;
    be->memory_free = cpu_memory_free;
    *out = be;
    return 0;
nomem:
    if (be) be->impl = c; else free(c);
    cpu_free(be);
    snprintf(err, errlen, "cpu backend: out of memory");
    return DG_ENOMEM;
}

/* The conv and matmul scratch are the only things an operation writes besides its outputs
 * (the rest keep their temporaries on the stack of the calling thread): a fork gets its
 * own, and shares nothing else, since host memory and the mapped weights need no sharing
 * arrangement. Each thread's OpenMP regions get a team of their own; OpenBLAS's OpenMP
 * build (0.3.21, one set of thread buffers) lets a threaded sgemm wait while another
 * thread's runs, so two forks' convolutions are correct but take turns. */
static int cpu_fork(dg_backend *be, dg_backend **out, char *err, size_t errlen) {
    dg_cpu settings = *cpu(be);
    settings.conv = settings.gemm = NULL;
    settings.gemm_bf16 = settings.xbf16 = NULL;
    settings.att_bf16 = settings.att_kv = NULL;
    settings.att_f32 = NULL;
    settings.att_kv_words = 0;
    settings.status = 0;   /* each backend of a family keeps its own (backend.h status) */
    const int rc = cpu_make(&settings, out, err, errlen);
    if (rc == 0) (*out)->weights_hugepages = be->weights_hugepages;
    return rc;
}

int dg_cpu_backend_new(int n_threads, int max_simd, int bf16_compute, dg_backend **out, char *err,
                       size_t errlen) {
    const int level = dg_cpu_simd_level();
    dg_cpu settings = {.n_threads = n_threads > 0 ? n_threads : omp_get_num_procs(),
                       .simd = level < max_simd ? level : max_simd, .conv_floats = CONV_FLOATS,
                       .bf16_compute = bf16_compute != 0};
    openblas_set_num_threads(settings.n_threads);
    return cpu_make(&settings, out, err, errlen);
}
