/* conv.cu — the VAE's causal 3-D convolution (and 2-D, kt = 1) as im2col tiles + cuBLAS.
 *
 * Per output frame only the taps whose input frame exists contribute (the causal front
 * padding is zeros), a contiguous block of the [c_out, kt, c_in, kh, kw] weight, exactly as
 * the CPU reference does. The tile of output pixels is sized so that its im2col matrix
 * [taps·c_in·kh·kw, tile] fills the backend scratch (256 MiB). The GEMM runs on the tensor
 * cores in TF32 with fp32 accumulation (CUBLAS_COMPUTE_32F_FAST_TF32): inputs keep 10
 * mantissa bits, about 5e-4 relative per product, which the comparison test allows for.
 * A 1x1x1 convolution without padding or spatial stride is one GEMM on x itself. */
#include "cuda_common.cuh"

/* col[r, j], r = (tap - k0)·c_in·kh·kw + ci·kh·kw + dy·kw + dx, j < nc: one thread per
 * element, consecutive threads along j (writes coalesced; reads along a row of x). */
__global__ void im2col_kernel(float *col, const float *x, dg_conv3d_shape s, int t_out, int k0,
                              int64_t rows, int64_t p0, int64_t nc, int wo) {
    const int khw = s.kh * s.kw;
    const int64_t plane = (int64_t)s.h * s.w, total = rows * nc;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / nc, j = e % nc;
        const int k = k0 + (int)(r / ((int64_t)s.c_in * khw));
        const int ci = (int)(r / khw % s.c_in), dy = (int)(r % khw) / s.kw, dx = (int)(r % khw) % s.kw;
        const int ti = t_out * s.st + k - s.pad_t;
        const int64_t p = p0 + j;
        const int iy = (int)(p / wo) * s.sh + dy - s.pad_top, ix = (int)(p % wo) * s.sw + dx - s.pad_left;
        col[e] = iy >= 0 && iy < s.h && ix >= 0 && ix < s.w
                     ? x[((int64_t)ti * s.c_in + ci) * plane + (int64_t)iy * s.w + ix] : 0.0f;
    }
}

__global__ void channel_bias_kernel(float *y, const float *bias, int64_t hw, int64_t total) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x)
        y[e] += bias[e / hw];
}

static unsigned grid_of(int64_t n) {
    const unsigned b = dg_cuda_blocks(n, 256);
    return b < 65535u ? b : 65535u;
}

/* Row-major Y[c_out, n] = W[c_out, kv] · X[kv, n] is, column-major, Y[n, c_out] =
 * X[n, kv] · W[kv, c_out]. */
static int sgemm_tf32(dg_cuda *c, float *y, int64_t ldy, const float *xcol, int64_t ldx,
                      const float *w, int64_t ldw, int n, int c_out, int kv) {
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(c, cublasGemmEx(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, c_out, kv, &one, xcol, CUDA_R_32F,
                                 (int)ldx, w, CUDA_R_32F, (int)ldw, &zero, y, CUDA_R_32F, (int)ldy,
                                 CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
    return 0;
}

static int conv3d(dg_cuda *c, float *y, const float *x, const float *w, const float *bias,
                  const dg_conv3d_shape *s) {
    const int to = dg_conv3d_out_t(s), ho = dg_conv3d_out_h(s), wo = dg_conv3d_out_w(s);
    const int64_t k_tap = (int64_t)s->c_in * s->kh * s->kw, k_all = k_tap * s->kt;
    const int64_t hw_out = (int64_t)ho * wo, plane_in = (int64_t)s->h * s->w;
    const int pointwise = s->kt == 1 && s->kh == 1 && s->kw == 1 && s->sh == 1 && s->sw == 1 &&
                          s->pad_top == 0 && s->pad_bottom == 0 && s->pad_left == 0 && s->pad_right == 0;
    int64_t tile = (int64_t)(c->scratch_bytes / sizeof(float)) / k_all;
    if (tile > hw_out) tile = hw_out;
    if (tile < 1) return dg_cuda_fail(c, "conv3d: one im2col column exceeds the scratch", "conv3d", __FILE__, __LINE__);
    float *col = (float *)c->scratch;
    int rc;
    for (int t = 0; t < to; t++) {
        float *yt = y + (int64_t)t * s->c_out * hw_out;
        int k0 = 0, k1 = s->kt;
        while (t * s->st + k0 - s->pad_t < 0) k0++;
        while (t * s->st + k1 - 1 - s->pad_t >= s->t) k1--;
        const int64_t kv = (k1 - k0) * k_tap;
        if (kv <= 0) {   /* every tap in the padding (pad_t >= kt, or past the end): zeros */
            CUDA_CHECK(c, cudaMemsetAsync(yt, 0, sizeof(float) * (size_t)s->c_out * (size_t)hw_out, c->stream));
        } else if (pointwise) {
            const float *xt = x + (int64_t)(t * s->st - s->pad_t) * s->c_in * plane_in;
            if ((rc = sgemm_tf32(c, yt, hw_out, xt, plane_in, w, s->c_in, (int)hw_out, s->c_out, s->c_in)) < 0)
                return rc;
        } else {
            for (int64_t p0 = 0; p0 < hw_out; p0 += tile) {
                const int64_t nc = hw_out - p0 < tile ? hw_out - p0 : tile;
                im2col_kernel<<<grid_of(kv * nc), 256, 0, c->stream>>>(col, x, *s, t, k0, kv, p0, nc, wo);
                CUDA_CHECK_LAUNCH(c);
                if ((rc = sgemm_tf32(c, yt + p0, hw_out, col, nc, w + k0 * k_tap, k_all, (int)nc,
                                     s->c_out, (int)kv)) < 0)
                    return rc;
            }
        }
        if (bias) {
            channel_bias_kernel<<<grid_of(s->c_out * hw_out), 256, 0, c->stream>>>(yt, bias, hw_out, s->c_out * hw_out);
            CUDA_CHECK_LAUNCH(c);
        }
    }
    return 0;
}

void dg_cuda_conv3d(dg_backend *be, float *y, const float *x, const float *w, const float *bias,
                    const dg_conv3d_shape *s) {
    conv3d(dg_cuda_of(be), y, x, w, bias, s);
}
