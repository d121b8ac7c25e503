/* elementwise.cu — activations, residual adds, nearest upsampling and row gathers.
 * Memory-bound one-pass kernels: a grid-stride loop over n elements, 256 threads, at most
 * 65535 blocks (enough to fill the chip many times over); expf/erff in full fp32
 * precision (no --use_fast_math), so results match the CPU to a few ulps. */
#include "cuda_common.cuh"

#define EW_THREADS 256

static unsigned ew_blocks(int64_t n) {
    const unsigned b = dg_cuda_blocks(n, EW_THREADS);
    return b < 65535u ? b : 65535u;
}

#define GRID_STRIDE(i, n)                                                                   \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n);               \
         i += (int64_t)gridDim.x * blockDim.x)

enum { EW_SILU_MUL, EW_ADD, EW_GELU, EW_SILU };

template <int OP>
__global__ void ew_kernel(float *y, const float *a, const float *b, int64_t n) {
    GRID_STRIDE(i, n) {
        const float t = a[i];
        float r;
        if (OP == EW_SILU_MUL) r = t / (1.0f + expf(-t)) * b[i];
        else if (OP == EW_ADD) r = y[i] + t;
        else if (OP == EW_GELU) r = 0.5f * t * (1.0f + erff(t * 0.70710678118654752f));
        else r = t / (1.0f + expf(-t));
        y[i] = r;
    }
}

template <int OP>
static int ew(dg_cuda *c, float *y, const float *a, const float *b, int64_t n) {
    if (n <= 0) return 0;
    ew_kernel<OP><<<ew_blocks(n), EW_THREADS, 0, c->stream>>>(y, a, b, n);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

int dg_cuda_silu_mul_launch(dg_cuda *c, float *y, const float *gate, const float *up, int64_t n) {
    return ew<EW_SILU_MUL>(c, y, gate, up, n);
}

__global__ void add_gated_kernel(float *y, const float *x, const float *gate, int n, int64_t total) {
    GRID_STRIDE(i, total) y[i] += gate[i % n] * x[i];
}

static int add_gated(dg_cuda *c, float *y, const float *x, const float *gate, int m, int n) {
    const int64_t total = (int64_t)m * n;
    if (total <= 0) return 0;
    add_gated_kernel<<<ew_blocks(total), EW_THREADS, 0, c->stream>>>(y, x, gate, n, total);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

/* One thread per output pixel: y[p, oy, ox] = x[p, oy/2, ox/2]; writes coalesced. */
__global__ void upsample2x_kernel(float *y, const float *x, int h, int w, int64_t total) {
    const int64_t w2 = 2 * (int64_t)w, h2 = 2 * (int64_t)h;
    GRID_STRIDE(i, total) {
        const int64_t ox = i % w2, oy = i / w2 % h2, p = i / (w2 * h2);
        y[i] = x[(p * h + oy / 2) * w + ox / 2];
    }
}

static int upsample2x(dg_cuda *c, float *y, const float *x, int64_t n_planes, int h, int w) {
    const int64_t total = n_planes * 4 * h * w;
    if (total <= 0) return 0;
    upsample2x_kernel<<<ew_blocks(total), EW_THREADS, 0, c->stream>>>(y, x, h, w, total);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

/* Block per output row; the row index comes from the staged host array. */
__global__ void gather_rows_kernel(float *y, const float *x, const int32_t *idx, int64_t n) {
    const float *src = x + (int64_t)idx[blockIdx.x] * n;
    float *dst = y + (int64_t)blockIdx.x * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dst[j] = src[j];
}

static int gather_rows(dg_cuda *c, float *y, const float *x, const int32_t *idx, int m, int64_t n) {
    if (m <= 0) return 0;
    const int32_t *d_idx = (const int32_t *)dg_cuda_stage(c, idx, sizeof(int32_t) * (size_t)m);
    if (!d_idx) return DG_EDEVICE;
    gather_rows_kernel<<<m, EW_THREADS, 0, c->stream>>>(y, x, d_idx, n);
    CUDA_CHECK_LAUNCH(c);
    return 0;
}

/* ---- entries --------------------------------------------------------------------------- */

void dg_cuda_silu_mul(dg_backend *be, float *y, const float *gate, const float *up, int64_t n) {
    ew<EW_SILU_MUL>(dg_cuda_of(be), y, gate, up, n);
}
void dg_cuda_add(dg_backend *be, float *y, const float *x, int64_t n) {
    ew<EW_ADD>(dg_cuda_of(be), y, x, NULL, n);
}
void dg_cuda_gelu(dg_backend *be, float *y, const float *x, int64_t n) {
    ew<EW_GELU>(dg_cuda_of(be), y, x, NULL, n);
}
void dg_cuda_silu(dg_backend *be, float *y, const float *x, int64_t n) {
    ew<EW_SILU>(dg_cuda_of(be), y, x, NULL, n);
}
void dg_cuda_add_gated(dg_backend *be, float *y, const float *x, const float *gate, int m, int n) {
    add_gated(dg_cuda_of(be), y, x, gate, m, n);
}
void dg_cuda_upsample2x(dg_backend *be, float *y, const float *x, int64_t n_planes, int h, int w) {
    upsample2x(dg_cuda_of(be), y, x, n_planes, h, w);
}
void dg_cuda_gather_rows(dg_backend *be, float *y, const float *x, const int32_t *idx, int m,
                         int64_t n) {
    gather_rows(dg_cuda_of(be), y, x, idx, m, n);
}
