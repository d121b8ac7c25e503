/* cuda_backend.cu — the CUDA backend's table, its memory (one arena per device,
 * sub-allocated, shared with the forks), staging of host arrays, weight upload, host <->
 * device copies, and the forks: a backend per thread with its own stream and scratch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.h"
#include "cuda_common.cuh"

extern "C" {
#include "dtype.h"
}

#define ARENA_ALIGN 256   /* cudaMalloc's own alignment; 16-byte vector loads need far less */

struct dg_cuda_seg {
    size_t off, size;
    int    used;
};

void dg_cuda_use_device(dg_cuda *c) {
    const cudaError_t e = cudaSetDevice(c->dev->device);
    if (e != cudaSuccess) dg_cuda_fail(c, cudaGetErrorString(e), "cudaSetDevice", __FILE__, __LINE__);
}

int dg_cuda_fail(dg_cuda *c, const char *what, const char *expr, const char *file, int line) {
    if (!c->status) {
        c->status = DG_EDEVICE;
        snprintf(c->err, sizeof c->err, "cuda: %s (%s at %s:%d)", what, expr, file, line);
    }
    return DG_EDEVICE;
}

/* The kernel paths' counts (backend.h: paths), in the order of the enum. */
static const char *const path_names[] = {
    "gemv", "gemv_fused", "gemm", "gemm_lt_bias", "bias_kernel", "attn_decode", "attn_decode_rows",
    "attn_fp32", "attn_wmma", "attn_mma", "graph_record", "graph_replay"};
static_assert(sizeof path_names / sizeof path_names[0] == DG_CUDA_N_PATHS, "a name for every path");

static size_t cuda_paths(dg_backend *be, char *buf, size_t len) {
    const dg_cuda *c = (const dg_cuda *)be->impl;
    size_t n = 0;
    for (int i = 0; i < DG_CUDA_N_PATHS; i++) {
        const int w = snprintf(buf + (n < len ? n : len), n < len ? len - n : 0, "%s%s %llu", i ? " " : "",
                               path_names[i], (unsigned long long)c->paths[i]);
        if (w > 0) n += (size_t)w;
    }
    if (len && n >= len) buf[len - 1] = 0;
    return n;
}

/* The sticky error of the first failed operation (backend.h: status). */
static int cuda_status(dg_backend *be, char *err, size_t errlen) {
    dg_cuda *c = dg_cuda_of(be);
    if (c->status && err && errlen) snprintf(err, errlen, "%s", c->err);
    return c->status;
}

/* ---- recorded runs (backend.h graph_run): CUDA graphs -------------------------------------
 * The decode step's fixed runs (engine/mllm/qwen2.c: a layer's norm and q/k/v; everything after
 * its attention) are recorded by stream capture the first time and replayed with one
 * cudaGraphLaunch from then on: 196 kernel launches of a 7B step become 56 graph launches.
 * Off unless DG_CUDA_GRAPHS=1 (read when a slot is first used, so that dg-bench can time
 * both in one process) until a device run shows they pay (NOTES.md). Where a
 * capture fails, the run goes on uncaptured from then on: the operations inside did not
 * execute during the failed capture, so they are issued again directly, and a failure the
 * capture alone caused is not kept as the backend's sticky error. An op that stages a host
 * array fails the capture (dg_cuda_stage refuses while capturing): a replay would copy the
 * ring slot's later contents, not the array of its own call. */
typedef struct {
    cudaGraphExec_t exec;
    int             off;   /* cannot be recorded: run directly */
} cuda_graph;

static void cuda_graph_run(dg_backend *be, void **slot, void (*ops)(void *ctx), void *ctx) {
    dg_cuda *c = dg_cuda_of(be);
    cuda_graph *g = (cuda_graph *)*slot;
    if (g && g->exec) {
        DG_CUDA_COUNT(c, DG_PATH_GRAPH_REPLAY);
        const cudaError_t e = cudaGraphLaunch(g->exec, c->stream);
        if (e != cudaSuccess) dg_cuda_fail(c, cudaGetErrorString(e), "cudaGraphLaunch", __FILE__, __LINE__);
        return;
    }
    const char *on = g ? "1" : getenv("DG_CUDA_GRAPHS");   /* asked when a slot is first used */
    if (!on || strcmp(on, "1") || c->status || (g && g->off) || (!g && !(g = (cuda_graph *)calloc(1, sizeof *g)))) {
        ops(ctx);
        return;
    }
    *slot = g;
    cudaGraph_t graph = NULL;
    if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
        c->capturing = 1;
        ops(ctx);
        c->capturing = 0;
        const cudaError_t e = cudaStreamEndCapture(c->stream, &graph);
        if (e == cudaSuccess && !c->status && cudaGraphInstantiate(&g->exec, graph, 0) == cudaSuccess) {
            DG_CUDA_COUNT(c, DG_PATH_GRAPH_RECORD);
            cudaGraphDestroy(graph);
            const cudaError_t l = cudaGraphLaunch(g->exec, c->stream);
            if (l != cudaSuccess) dg_cuda_fail(c, cudaGetErrorString(l), "cudaGraphLaunch", __FILE__, __LINE__);
            return;
        }
    }
    if (graph) cudaGraphDestroy(graph);
    if (g->exec) cudaGraphExecDestroy(g->exec);
    g->exec = NULL;
    g->off = 1;
    (void)cudaGetLastError();           /* the capture's error, not the device's */
    c->status = 0;                      /* healthy before (checked above): the capture failed */
    c->err[0] = 0;
    ops(ctx);
}

static void cuda_graph_release(dg_backend *be, void *slot) {
    cuda_graph *g = (cuda_graph *)slot;
    (void)be;
    if (!g) return;
    if (g->exec) cudaGraphExecDestroy(g->exec);
    free(g);
}

/* ---- the arena: one per device, shared by a backend and its forks ------------------------ */

static int seg_insert(dg_cuda_device *d, int at, dg_cuda_seg s) {
    if (d->n_segs == d->cap_segs) {
        int cap = d->cap_segs ? 2 * d->cap_segs : 256;
        dg_cuda_seg *p = (dg_cuda_seg *)realloc(d->segs, sizeof *p * (size_t)cap);
        if (!p) return -1;
        d->segs = p;
        d->cap_segs = cap;
    }
    memmove(d->segs + at + 1, d->segs + at, sizeof *d->segs * (size_t)(d->n_segs - at));
    d->segs[at] = s;
    d->n_segs++;
    return 0;
}

static void seg_remove(dg_cuda_device *d, int at) {
    memmove(d->segs + at, d->segs + at + 1, sizeof *d->segs * (size_t)(d->n_segs - at - 1));
    d->n_segs--;
}

/* First fit over the free segments: host bookkeeping only, no CUDA call; under the lock,
 * since the backends of the device allocate from their own threads. */
static void *arena_alloc(dg_cuda_device *d, size_t bytes) {
    if (bytes > SIZE_MAX - ARENA_ALIGN) return NULL;   /* rounding up would wrap */
    size_t n = (bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
    void *p = NULL;
    if (!n) n = ARENA_ALIGN;
    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->n_segs; i++) {
        dg_cuda_seg *s = &d->segs[i];
        if (s->used || s->size < n) continue;
        if (s->size > n) {
            dg_cuda_seg rest = {s->off + n, s->size - n, 0};
            if (seg_insert(d, i + 1, rest) < 0) break;
            s = &d->segs[i];
            s->size = n;
        }
        s->used = 1;
        d->in_use += n;
        p = d->base + s->off;
        break;
    }
    pthread_mutex_unlock(&d->lock);
    return p;
}

static void arena_release(dg_cuda_device *d, void *p) {
    if (!p) return;
    size_t off = (size_t)((char *)p - d->base);
    pthread_mutex_lock(&d->lock);
    int lo = 0, hi = d->n_segs - 1, i = -1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (d->segs[mid].off == off) { i = mid; break; }
        if (d->segs[mid].off < off) lo = mid + 1; else hi = mid - 1;
    }
    if (i >= 0 && d->segs[i].used) {   /* else not ours: ignored, as free() would not be */
        d->segs[i].used = 0;
        d->in_use -= d->segs[i].size;
        if (i + 1 < d->n_segs && !d->segs[i + 1].used) {
            d->segs[i].size += d->segs[i + 1].size;
            seg_remove(d, i + 1);
        }
        if (i > 0 && !d->segs[i - 1].used) {
            d->segs[i - 1].size += d->segs[i].size;
            seg_remove(d, i);
        }
    }
    pthread_mutex_unlock(&d->lock);
}

/* MiB in use, for messages. */
static size_t arena_in_use_mib(dg_cuda_device *d) {
    pthread_mutex_lock(&d->lock);
    const size_t n = d->in_use >> 20;
    pthread_mutex_unlock(&d->lock);
    return n;
}

/* What the arena has left (in one piece or not). */
static size_t cuda_memory_free(dg_backend *be) {
    dg_cuda_device *d = dg_cuda_of(be)->dev;
    pthread_mutex_lock(&d->lock);
    const size_t n = d->size - d->in_use;
    pthread_mutex_unlock(&d->lock);
    return n;
}

static void *cuda_alloc(dg_backend *be, size_t bytes) { return arena_alloc(dg_cuda_of(be)->dev, bytes); }

/* The memory goes back to the shared arena once this backend's queued work is done: the
 * next alloc may be another fork's, whose stream is not ordered with this one's. A release
 * comes at set-up or an image's start, never per operation, so the wait costs nothing. */
static void cuda_release(dg_backend *be, void *p) {
    dg_cuda *c = dg_cuda_of(be);
    if (!p) return;
    const cudaError_t e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) dg_cuda_fail(c, cudaGetErrorString(e), "cudaStreamSynchronize", __FILE__, __LINE__);
    arena_release(c->dev, p);
}

/* ---- staging --------------------------------------------------------------------------- */

void *dg_cuda_stage(dg_cuda *c, const void *host, size_t bytes) {
    const size_t half = DG_CUDA_STAGE_BYTES / 2;
    size_t n = (bytes + 255) & ~(size_t)255;
    if (c->capturing) {   /* graph_run then runs the ops directly */
        dg_cuda_fail(c, "host array staged inside a recorded run", "dg_cuda_stage", __FILE__, __LINE__);
        return NULL;
    }
    if (bytes > half || n > half) {
        dg_cuda_fail(c, "staged array larger than half the ring", "dg_cuda_stage", __FILE__, __LINE__);
        return NULL;
    }
    if (bytes <= DG_CUDA_MEMO_BYTES)
        for (int i = 0; i < DG_CUDA_MEMO; i++)
            if (c->memo[i].dev && c->memo[i].bytes == bytes && !memcmp(c->memo[i].data, host, bytes))
                return (void *)c->memo[i].dev;
    const int old = c->stage.half;
    if (dg_stage_ring_place(&c->stage, n, half)) {   /* the other half: its old copies done first */
        if (cudaEventRecord(c->stage_done[old], c->stream) != cudaSuccess ||
            cudaEventSynchronize(c->stage_done[c->stage.half]) != cudaSuccess)
            goto fail;
        for (int i = 0; i < DG_CUDA_MEMO; i++) c->memo[i].dev = NULL;   /* may be overwritten */
    }
    {
        char *hp = c->stage_host + c->stage.pos, *dp = c->stage_dev + c->stage.pos;
        memcpy(hp, host, bytes);
        if (cudaMemcpyAsync(dp, hp, bytes, cudaMemcpyHostToDevice, c->stream) != cudaSuccess) goto fail;
        c->stage.pos += n;
        if (bytes <= DG_CUDA_MEMO_BYTES) {
            int i = c->memo_next;
            c->memo_next = (i + 1) % DG_CUDA_MEMO;
            c->memo[i].dev = dp;
            c->memo[i].bytes = bytes;
            memcpy(c->memo[i].data, host, bytes);
        }
        return dp;
    }
fail:
    dg_cuda_fail(c, cudaGetErrorString(cudaGetLastError()), "staging copy", __FILE__, __LINE__);
    return NULL;
}

/* ---- copies and weights ---------------------------------------------------------------- */

static int download(dg_cuda *c, float *host, const float *src, int64_t n) {
    CUDA_CHECK(c, cudaMemcpyAsync(host, src, sizeof(float) * (size_t)n, cudaMemcpyDeviceToHost, c->stream));
    CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
    return 0;
}

/* From pageable memory the call returns once `host` has been read, so the caller may
 * reuse it at once; the copy stays ordered with the work on the stream. */
static int upload(dg_cuda *c, float *dst, const float *host, int64_t n) {
    CUDA_CHECK(c, cudaMemcpyAsync(dst, host, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice, c->stream));
    return 0;
}

static void cuda_download(dg_backend *be, float *host, const float *src, int64_t n) {
    download(dg_cuda_of(be), host, src, n);
}

static void cuda_upload(dg_backend *be, float *dst, const float *host, int64_t n) {
    upload(dg_cuda_of(be), dst, host, n);
}

/* Weights live on the device as bf16 whatever their stored dtype: BF16 is copied as it
 * is (bit-identical to what the CPU backend reads), F16 and F32 are rounded to nearest
 * even on the host in chunks. w->data becomes the device copy; the host tensor is no
 * longer read. */
static int cuda_weight_prepare(dg_backend *be, dg_weight *w, char *err, size_t errlen) {
    dg_cuda *c = dg_cuda_of(be);
    if (w->kb) {   /* dg_bind_matrix gives this backend (weights_blocked 0) row-major ones */
        snprintf(err, errlen, "cuda: weight [%lld, %lld] is in the CPU's blocked layout, not row-major",
                 (long long)w->rows, (long long)w->cols);
        return DG_EINVAL;
    }
    const size_t n = (size_t)w->rows * (size_t)w->cols;
    uint16_t *dev = (uint16_t *)arena_alloc(c->dev, n * 2), *tmp = NULL;
    if (c->status) goto dev_fail;
    if (!dev) {
        snprintf(err, errlen, "cuda: weight [%lld, %lld] does not fit the GPU memory budget "
                 "(%zu of %zu MiB in use; set DG_GPU_MEMORY)", (long long)w->rows, (long long)w->cols,
                 arena_in_use_mib(c->dev), c->dev->size >> 20);
        return DG_ENOMEM;
    }
    if (w->dtype == DG_DTYPE_BF16) {
        if (cudaMemcpyAsync(dev, w->data, n * 2, cudaMemcpyHostToDevice, c->stream) != cudaSuccess) goto cuda_fail;
    } else {
        const size_t chunk = (size_t)1 << 22;
        if (!(tmp = (uint16_t *)malloc(chunk * 2))) {
            arena_release(c->dev, dev);
            snprintf(err, errlen, "cuda: out of host memory converting a weight");
            return DG_ENOMEM;
        }
        for (size_t i0 = 0; i0 < n; i0 += chunk) {
            size_t nc = n - i0 < chunk ? n - i0 : chunk;
            for (size_t i = 0; i < nc; i++) tmp[i] = dg_f32_to_bf16(dg_load_f32(w->data, w->dtype, i0 + i));
            if (cudaMemcpyAsync(dev + i0, tmp, nc * 2, cudaMemcpyHostToDevice, c->stream) != cudaSuccess) goto cuda_fail;
        }
        free(tmp);
    }
    /* on the backend's stream (the legacy default stream would not order with it), and
     * complete before the call returns: the caller may unmap the tensor */
    if (cudaStreamSynchronize(c->stream) != cudaSuccess) goto cuda_fail;
    w->data = dev;
    w->dtype = DG_DTYPE_BF16;
    return 0;
cuda_fail:
    dg_cuda_fail(c, cudaGetErrorString(cudaGetLastError()), "weight upload", __FILE__, __LINE__);
    /* earlier chunks may still be copying into dev: the memory goes back to the shared
     * arena only once they are done (another fork could take it at once), else never */
    if (cudaStreamSynchronize(c->stream) != cudaSuccess) dev = NULL;
dev_fail:
    free(tmp);
    if (dev) arena_release(c->dev, dev);
    snprintf(err, errlen, "%s", c->err);
    return DG_EDEVICE;
}

/* ---- creation: the device, then each backend's own state ---------------------------------- */

/* What one backend alone uses: its stream and handles, the pinned staging and readback
 * memory, and its scratch from the arena. Freed by exec_free (a half-made one too). */
static int exec_new(dg_cuda *c, char *err, size_t errlen) {
    const int device = c->dev->device;
    cudaError_t e;
    const char *what = "cudaStreamCreate";
    if ((e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess) goto cuda_fail;
    what = "cudaHostAlloc";
    if ((e = cudaHostAlloc((void **)&c->stage_host, DG_CUDA_STAGE_BYTES, cudaHostAllocDefault)) != cudaSuccess ||
        (e = cudaHostAlloc((void **)&c->readback, DG_CUDA_READBACK_BYTES, cudaHostAllocDefault)) != cudaSuccess)
        goto cuda_fail;
    what = "cudaEventCreate";
    for (int i = 0; i < 2; i++)
        if ((e = cudaEventCreateWithFlags(&c->stage_done[i], cudaEventDisableTiming)) != cudaSuccess) goto cuda_fail;
    c->scratch_bytes = DG_CUDA_SCRATCH_BYTES;
    if (!(c->stage_dev = (char *)arena_alloc(c->dev, DG_CUDA_STAGE_BYTES)) ||
        !(c->scratch = arena_alloc(c->dev, c->scratch_bytes)) ||
        !(c->blas_ws = arena_alloc(c->dev, DG_CUDA_BLAS_WS_BYTES))) {
        snprintf(err, errlen, "cuda:%d: a backend's %zu MiB of scratch do not fit the memory budget "
                 "(%zu of %zu MiB in use; set DG_GPU_MEMORY)", device,
                 (DG_CUDA_STAGE_BYTES + DG_CUDA_SCRATCH_BYTES + DG_CUDA_BLAS_WS_BYTES) >> 20,
                 arena_in_use_mib(c->dev), c->dev->size >> 20);
        return DG_ENOMEM;
    }
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS ||
        cublasSetStream(c->blas, c->stream) != CUBLAS_STATUS_SUCCESS ||
        cublasSetWorkspace(c->blas, c->blas_ws, DG_CUDA_BLAS_WS_BYTES) != CUBLAS_STATUS_SUCCESS) {
        snprintf(err, errlen, "cuda:%d: cuBLAS could not be set up", device);
        return DG_EDEVICE;
    }
    if (cublasLtCreate(&c->lt) != CUBLAS_STATUS_SUCCESS ||
        !(c->lt_plans = (dg_cuda_lt_plan *)calloc(DG_CUDA_LT_PLANS, sizeof *c->lt_plans))) {
        snprintf(err, errlen, "cuda:%d: cuBLASLt could not be set up", device);
        return DG_EDEVICE;
    }
    if (!(c->att_tiles = (int32_t *)malloc(sizeof(int32_t) * 4 * DG_CUDA_ATT_TILES))) {
        snprintf(err, errlen, "cuda: out of host memory");
        return DG_ENOMEM;
    }
    return 0;
cuda_fail:
    snprintf(err, errlen, "cuda:%d: %s: %s", device, what, cudaGetErrorString(e));
    return DG_EDEVICE;
}

static void exec_free(dg_cuda *c) {
    if (c->stream) cudaStreamSynchronize(c->stream);
    if (c->blas) cublasDestroy(c->blas);
    dg_cuda_lt_free(c);
    for (int i = 0; i < 2; i++) if (c->stage_done[i]) cudaEventDestroy(c->stage_done[i]);
    if (c->stream) cudaStreamDestroy(c->stream);
    if (c->stage_host) cudaFreeHost(c->stage_host);
    if (c->readback) cudaFreeHost(c->readback);
    arena_release(c->dev, c->stage_dev);
    arena_release(c->dev, c->scratch);
    arena_release(c->dev, c->blas_ws);
    free(c->att_tiles);
    free(c->std_host);
}

static void device_free(dg_cuda_device *d) {
    if (!d) return;
    if (d->base) cudaFree(d->base);
    pthread_mutex_destroy(&d->lock);
    free(d->segs);
    free(d);
}

/* A fork's own state is freed, the device only with the backend that made it (its forks
 * are gone by then: backend.h). */
static void cuda_free(dg_backend *be) {
    if (!be) return;
    dg_cuda *c = (dg_cuda *)be->impl;
    if (c) {
        if (c->dev && c->dev->base) cudaSetDevice(c->dev->device);   /* set up: this thread's too */
        if (c->dev) exec_free(c);
        if (c->own_dev) device_free(c->dev);
        free(c);
    }
    free(be);
}

/* "24G", "24000M", "512K" or plain bytes; 0 when unset or unreadable. */
static size_t parse_size(const char *s) {
    if (!s || !*s) return 0;
    char *end;
    double v = strtod(s, &end);
    if (v <= 0) return 0;
    switch (*end) {
    case 'G': case 'g': v *= 1024.0 * 1024 * 1024; break;
    case 'M': case 'm': v *= 1024.0 * 1024; break;
    case 'K': case 'k': v *= 1024.0; break;
    default: break;
    }
    return (size_t)v;
}

#define SETUP(expr, what)                                                                   \
    do {                                                                                    \
        cudaError_t e_ = (expr);                                                            \
        if (e_ != cudaSuccess) {                                                            \
            snprintf(err, errlen, "cuda:%d: %s: %s", device, what, cudaGetErrorString(e_)); \
            return DG_EDEVICE;                                                              \
        }                                                                                   \
    } while (0)

/* The device's side: its properties, the arena of `budget` bytes (see cuda_backend.h), the
 * kernels' shared-memory limits (per device, for every backend of it). c->dev is set
 * first, so that cuda_free frees a half-made one. */
static int device_new(dg_cuda *c, int device, size_t budget, char *err, size_t errlen) {
    dg_cuda_device *d = (dg_cuda_device *)calloc(1, sizeof *d);
    size_t free_b = 0, total_b = 0;
    int n_dev = 0;
    if (!d) {
        snprintf(err, errlen, "cuda: out of host memory");
        return DG_ENOMEM;
    }
    pthread_mutex_init(&d->lock, NULL);
    d->device = device;
    c->dev = d;
    c->own_dev = 1;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        snprintf(err, errlen, "cuda:%d: no CUDA device", device);
        return DG_EINVAL;   /* a configuration problem: restarting will not make a GPU appear */
    }
    if (device < 0 || device >= n_dev) {
        snprintf(err, errlen, "cuda:%d: no such device (%d present)", device, n_dev);
        return DG_EINVAL;
    }
    SETUP(cudaSetDevice(device), "cudaSetDevice");
    SETUP(cudaGetDeviceProperties(&d->prop, device), "cudaGetDeviceProperties");
    SETUP(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    if (!budget) budget = parse_size(getenv("DG_GPU_MEMORY"));
    if (!budget) budget = free_b / 10 * 9;
    if (budget > free_b) budget = free_b;
    budget &= ~(size_t)(ARENA_ALIGN - 1);
    const size_t own = DG_CUDA_SCRATCH_BYTES + DG_CUDA_STAGE_BYTES + DG_CUDA_BLAS_WS_BYTES + ((size_t)32 << 20);
    if (budget < own) {
        snprintf(err, errlen, "cuda:%d: a budget of %zu MiB is below the backend's own %zu MiB",
                 device, budget >> 20, own >> 20);
        return DG_EINVAL;
    }
    SETUP(cudaMalloc((void **)&d->base, budget), "cudaMalloc of the memory budget");
    d->size = budget;
    if (seg_insert(d, 0, dg_cuda_seg{0, budget, 0}) < 0) {
        snprintf(err, errlen, "cuda: out of host memory");
        return DG_ENOMEM;
    }
    if (dg_cuda_attention_init(c) < 0) {
        snprintf(err, errlen, "%s", c->err);
        return DG_EDEVICE;
    }
    return 0;
}

static int cuda_fork(dg_backend *parent, dg_backend **out, char *err, size_t errlen);

/* A backend over c (its device set, its own state not yet made): the table, then the
 * state. Frees everything on failure. */
static int cuda_make(dg_backend *be, dg_cuda *c, dg_backend **out, char *err, size_t errlen) {
    int rc = exec_new(c, err, errlen);
    if (rc < 0) {
        cuda_free(be);
        return rc;
    }
    be->name = "cuda";
    be->kv_bf16 = be->kv_bf16_default = c->unverified;   /* bf16 KV: kv_write and the attention
                                                            kernels' bf16 reads, not yet run on a device */
    be->n_threads = 1;
    be->free = cuda_free;
    be->fork = cuda_fork;
    be->alloc = cuda_alloc;
    be->release = cuda_release;
    be->weight_prepare = cuda_weight_prepare;
    be->matmul = dg_cuda_matmul;
    be->matmul_parts = c->unverified ? dg_cuda_matmul_parts : NULL;
    be->matmul_swiglu = c->unverified ? dg_cuda_matmul_swiglu : NULL;
    be->add_rmsnorm = c->unverified ? dg_cuda_add_rmsnorm : NULL;
    be->attention_batch = c->unverified ? dg_cuda_attention_batch : NULL;
    be->rmsnorm = dg_cuda_rmsnorm;
    be->rope = dg_cuda_rope;
    be->kv_write = dg_cuda_kv_write;
    be->attention = dg_cuda_attention;
    be->silu_mul = dg_cuda_silu_mul;
    be->add = dg_cuda_add;
    be->embed = dg_cuda_embed;
    be->download = cuda_download;
    be->upload = cuda_upload;
    be->attention_segments = dg_cuda_attention_segments;
    be->gelu = dg_cuda_gelu;
    be->rope_table = dg_cuda_rope_table;
    be->gather_rows = dg_cuda_gather_rows;
    be->conv3d = dg_cuda_conv3d;
    be->channel_rmsnorm = dg_cuda_channel_rmsnorm;
    be->upsample2x = dg_cuda_upsample2x;
    be->spatial_attention = dg_cuda_spatial_attention;
    be->silu = dg_cuda_silu;
    be->modulate = dg_cuda_modulate;
    be->add_gated = dg_cuda_add_gated;
    be->standardize = dg_cuda_standardize;
    be->logits_adjust = c->unverified ? dg_cuda_logits_adjust : NULL;
    be->topk = c->unverified ? dg_cuda_topk : NULL;
    be->status = cuda_status;
    be->paths = cuda_paths;
    be->memory_free = cuda_memory_free;
    be->graph_run = cuda_graph_run;
    be->graph_release = cuda_graph_release;
    *out = be;
    return 0;
}

/* An empty table and its state, joined (host memory only). DG_ENOMEM. */
static int cuda_shell(dg_backend **be, dg_cuda **c, char *err, size_t errlen) {
    *be = (dg_backend *)calloc(1, sizeof **be);
    *c = (dg_cuda *)calloc(1, sizeof **c);
    if (!*be || !*c) {
        free(*be);
        free(*c);
        snprintf(err, errlen, "cuda: out of host memory");
        return DG_ENOMEM;
    }
    (*be)->impl = *c;
    return 0;
}

/* The parent's device and settings, a stream and scratch of its own. The parent's queued
 * work (the weights' uploads) is complete first: the fork's stream is not ordered with
 * the parent's. A parent that has failed makes no forks. */
static int cuda_fork(dg_backend *parent, dg_backend **out, char *err, size_t errlen) {
    dg_cuda *p = dg_cuda_of(parent);
    dg_backend *be;
    dg_cuda *c;
    *out = NULL;
    if (cuda_shell(&be, &c, err, errlen) < 0) return DG_ENOMEM;
    c->dev = p->dev;
    c->gemm_split = p->gemm_split;
    c->attn_wmma = p->attn_wmma;
    c->unverified = p->unverified;
    /* the parent's sticky status is its own thread's to set (backend.h): a failure seen
     * here is this call's */
    const cudaError_t e = cudaStreamSynchronize(p->stream);
    if (e != cudaSuccess || p->status) {
        if (e != cudaSuccess) snprintf(err, errlen, "cuda: the parent backend's stream: %s", cudaGetErrorString(e));
        else snprintf(err, errlen, "%s", p->err);
        cuda_free(be);
        return DG_EDEVICE;
    }
    return cuda_make(be, c, out, err, errlen);
}

#ifndef DG_BACKEND_ABI
#error "DG_BACKEND_ABI: the Makefile's hash of the backend interface headers (engine/backend.c checks it)"
#endif
/* the interface this module was built against: engine/backend.c loads it only when its own
 * is the same */
extern "C" const char dg_cuda_abi[] = DG_BACKEND_ABI;

extern "C" int dg_cuda_backend_new(int device, size_t budget, dg_backend **out, char *err,
                                   size_t errlen) {
    dg_backend *be;
    dg_cuda *c;
    *out = NULL;
    if (cuda_shell(&be, &c, err, errlen) < 0) return DG_ENOMEM;
    const char *g = getenv("DG_CUDA_GEMM"), *at = getenv("DG_CUDA_ATTN"), *u = getenv("DG_CUDA_UNVERIFIED");
    c->gemm_split = g && !strcmp(g, "precise");
    c->unverified = u && !strcmp(u, "1");
    c->attn_wmma = !c->unverified || (at && !strcmp(at, "wmma"));
    int rc = device_new(c, device, budget, err, errlen);
    if (rc < 0) {
        cuda_free(be);
        return rc;
    }
    return cuda_make(be, c, out, err, errlen);
}
