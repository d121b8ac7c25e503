/* dit_ops.c — CPU kernels of the image-generation operations: the VAE's causal 3-D
 * convolution (im2col tiles + OpenBLAS sgemm), channel RMS norm, nearest upsampling and
 * single-head spatial attention; the DiT's adaLN modulation and gated residual; the
 * connector's per-token standardization. Contracts in backend.h. */
#include "dit_ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "standardize_row.h"

/* ---- convolution -------------------------------------------------------------------------- */

/* Fills col[kv_rows, nc] (row-major, row = (tap - k0)·Cin·kh·kw + ci·kh·kw + dy·kw + dx) for
 * output pixels p0 .. p0+nc-1 of one output frame from the input frames of taps k0 .. k1-1.
 * Walks the tile output row by output row: the valid span of a row is one copy (stride 1)
 * with zeros around it, so no per-pixel division or bounds test. */
static void im2col(const dg_cpu *c, float *col, const float *x, const dg_conv3d_shape *s,
                   int t_out, int k0, int k1, int64_t p0, int64_t nc, int wo) {
    const int khw = s->kh * s->kw;
    const int64_t rows = (int64_t)(k1 - k0) * s->c_in * khw, plane = (int64_t)s->h * s->w;
#pragma omp parallel for num_threads(c->n_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int k = k0 + (int)(r / ((int64_t)s->c_in * khw));
        const int ci = (int)(r / khw % s->c_in), dy = (int)(r % khw) / s->kw, dx = (int)(r % khw) % s->kw;
        const int ti = t_out * s->st + k - s->pad_t;
        const float *src = x + ((int64_t)ti * s->c_in + ci) * plane;
        float *dst = col + r * nc;
        for (int64_t j = 0, p = p0; j < nc;) {
            const int oy = (int)(p / wo), ox0 = (int)(p % wo);
            const int cnt = (int)(wo - ox0 < nc - j ? wo - ox0 : nc - j);
            const int iy = oy * s->sh + dy - s->pad_top;
            float *d = dst + j;
            if (iy < 0 || iy >= s->h) {
                memset(d, 0, sizeof(float) * (size_t)cnt);
            } else if (s->sw == 1) {
                const int ix0 = ox0 + dx - s->pad_left;   /* input column of d[0] */
                int a = ix0 < 0 ? -ix0 : 0, b = s->w - ix0 < cnt ? s->w - ix0 : cnt;
                if (a > cnt) a = cnt;
                if (b < a) b = a;
                memset(d, 0, sizeof(float) * (size_t)a);
                memcpy(d + a, src + (int64_t)iy * s->w + ix0 + a, sizeof(float) * (size_t)(b - a));
                memset(d + b, 0, sizeof(float) * (size_t)(cnt - b));
            } else {
                const float *srow = src + (int64_t)iy * s->w;
                for (int q = 0; q < cnt; q++) {
                    const int ix = (ox0 + q) * s->sw + dx - s->pad_left;
                    d[q] = ix >= 0 && ix < s->w ? srow[ix] : 0.0f;
                }
            }
            j += cnt;
            p += cnt;
        }
    }
}

/* Per output frame, only the taps whose input frame lies inside the sequence contribute
 * (the causal front padding is zeros): they are a contiguous block of the [Cout, kt, ...]
 * weight, so a single image (T = 1) through a 3x3x3 conv costs a 2-D conv, not three.
 * OpenBLAS, unlike the matmul (matmul.h): an image's convolutions have the same shapes and
 * tiles every time it is encoded or decoded, so it gets the same bits without the matmul's
 * row invariance; nothing computes part of an image's rows in another batch. */
void dg_cpu_conv3d(dg_backend *be, float *y, const float *x, const float *w, const float *bias,
                   const dg_conv3d_shape *s) {
    dg_cpu *c = be->impl;
    const int to = dg_conv3d_out_t(s), ho = dg_conv3d_out_h(s), wo = dg_conv3d_out_w(s);
    const int64_t k_tap = (int64_t)s->c_in * s->kh * s->kw, k_all = k_tap * s->kt;
    const int64_t hw_out = (int64_t)ho * wo, plane_in = (int64_t)s->h * s->w;
    const int pointwise = s->kt == 1 && s->kh == 1 && s->kw == 1 && s->sh == 1 && s->sw == 1 &&
                          s->pad_top == 0 && s->pad_bottom == 0 && s->pad_left == 0 &&
                          s->pad_right == 0;
    /* an im2col column longer than the scratch would make tiles of 0 pixels, and the loop
     * below endless: refused (backend.h bounds c_in·kt·kh·kw); the pointwise form needs no
     * scratch */
    if (!pointwise && k_all > c->conv_floats) {
        dg_cpu_fail(c, "conv3d: an im2col column of c_in %d x %dx%dx%d = %lld values exceeds the %lld-float scratch",
                    s->c_in, s->kt, s->kh, s->kw, (long long)k_all, (long long)c->conv_floats);
        return;
    }
    int64_t tile = c->conv_floats / k_all;
    if (tile > hw_out) tile = hw_out;
    for (int t = 0; t < to; t++) {
        float *yt = y + (int64_t)t * s->c_out * hw_out;
        int k0 = 0, k1 = s->kt;
        while (t * s->st + k0 - s->pad_t < 0) k0++;
        while (t * s->st + k1 - 1 - s->pad_t >= s->t) k1--;
        const int64_t kv = (k1 - k0) * k_tap;
        if (kv <= 0) {   /* every tap in the padding (pad_t >= kt, or past the end): zeros */
            memset(yt, 0, sizeof(float) * (size_t)s->c_out * (size_t)hw_out);
        } else if (pointwise) {
            const float *xt = x + (int64_t)(t * s->st - s->pad_t) * s->c_in * plane_in;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s->c_out, (int)hw_out, s->c_in,
                        1.0f, w, s->c_in, xt, (int)plane_in, 0.0f, yt, (int)hw_out);
        } else {
            for (int64_t p0 = 0; p0 < hw_out; p0 += tile) {
                const int64_t nc = hw_out - p0 < tile ? hw_out - p0 : tile;
                im2col(c, c->conv, x, s, t, k0, k1, p0, nc, wo);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s->c_out, (int)nc, (int)kv,
                            1.0f, w + k0 * k_tap, (int)k_all, c->conv, (int)nc, 0.0f, yt + p0,
                            (int)hw_out);
            }
        }
        if (bias) {
#pragma omp parallel for num_threads(c->n_threads) schedule(static)
            for (int o = 0; o < s->c_out; o++)
                for (int64_t p = 0; p < hw_out; p++) yt[o * hw_out + p] += bias[o];
        }
    }
}

/* ---- VAE elementwise ---------------------------------------------------------------------- */

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* F.normalize over channels: x / max(‖x‖₂, 1e-12), times √C and gamma (Wan RMS_norm). */
void dg_cpu_channel_rmsnorm(dg_backend *be, float *y, const float *x, const float *gamma,
                            int n_frames, int channels, int64_t plane, int use_silu) {
    const dg_cpu *c = be->impl;
    const float root_c = sqrtf((float)channels);
    const int64_t blk = 256;   /* pixels per task: the channel loop strides by `plane` */
    const int64_t n_blk = (plane + blk - 1) / blk;
#pragma omp parallel for num_threads(c->n_threads) schedule(static)
    for (int64_t fb = 0; fb < (int64_t)n_frames * n_blk; fb++) {
        const int64_t f = fb / n_blk, p0 = fb % n_blk * blk, p1 = p0 + blk < plane ? p0 + blk : plane;
        const float *xf = x + f * channels * plane;
        float *yf = y + f * channels * plane;
        float ss[256];
        for (int64_t p = p0; p < p1; p++) ss[p - p0] = 0.0f;
        for (int ch = 0; ch < channels; ch++)
            for (int64_t p = p0; p < p1; p++) {
                const float v = xf[ch * plane + p];
                ss[p - p0] += v * v;
            }
        for (int64_t p = p0; p < p1; p++) {
            const float n = sqrtf(ss[p - p0]);
            ss[p - p0] = root_c / (n > 1e-12f ? n : 1e-12f);
        }
        for (int ch = 0; ch < channels; ch++)
            for (int64_t p = p0; p < p1; p++) {
                const float v = xf[ch * plane + p] * ss[p - p0] * gamma[ch];
                yf[ch * plane + p] = use_silu ? silu(v) : v;
            }
    }
}

void dg_cpu_upsample2x(dg_backend *be, float *y, const float *x, int64_t n_planes, int h, int w) {
    const dg_cpu *c = be->impl;
#pragma omp parallel for num_threads(c->n_threads) schedule(static)
    for (int64_t r = 0; r < n_planes * 2 * h; r++) {
        const int64_t pl = r / (2 * h);
        const int oy = (int)(r % (2 * h));
        const float *src = x + (pl * h + oy / 2) * w;
        float *dst = y + r * 2 * w;
        for (int ox = 0; ox < 2 * w; ox++) dst[ox] = src[ox / 2];
    }
}

void dg_cpu_silu(dg_backend *be, float *y, const float *x, int64_t n) {
    const dg_cpu *c = be->impl;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] = silu(x[i]);
}

/* Scores of a tile of queries at once ([tq, plane] in the conv scratch), exact softmax per
 * row, then out[:, tile] = V · Sᵀ: two sgemms per tile (OpenBLAS, as conv3d: the tiles of
 * a frame are the same every time). */
void dg_cpu_spatial_attention(dg_backend *be, float *out, const float *qkv, int channels,
                              int64_t plane) {
    dg_cpu *c = be->impl;
    /* a row of scores longer than the scratch would make tiles of 0 queries, and the loop
     * below endless: refused (backend.h bounds the plane) */
    if (plane > c->conv_floats) {
        dg_cpu_fail(c, "spatial_attention: a plane of %lld pixels exceeds the %lld-float scratch (one row of scores)",
                    (long long)plane, (long long)c->conv_floats);
        return;
    }
    const float *q = qkv, *k = qkv + channels * plane, *v = qkv + 2 * channels * plane;
    const float scale = 1.0f / sqrtf((float)channels);
    int64_t tq = c->conv_floats / plane;
    if (tq > plane) tq = plane;
    for (int64_t q0 = 0; q0 < plane; q0 += tq) {
        const int64_t n = plane - q0 < tq ? plane - q0 : tq;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)n, (int)plane, channels, scale,
                    q + q0, (int)plane, k, (int)plane, 0.0f, c->conv, (int)plane);
        dg_cpu_softmax(c, c->conv, (int)n, (int)plane);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, channels, (int)n, (int)plane, 1.0f, v,
                    (int)plane, c->conv, (int)plane, 0.0f, out + q0, (int)plane);
    }
}

/* ---- DiT ---------------------------------------------------------------------------------- */

/* LayerNorm without affine (biased variance, two-pass, the sums and the normalized value in
 * double: in fp32 a row whose mean is large against its spread lost 3e-4 at mean 100 and
 * 4e-3 at 1000, n 5120; now one rounding), then the adaLN modulation. */
void dg_cpu_modulate(dg_backend *be, float *y, const float *x, const float *shift,
                     const float *scale, int m, int n, float eps) {
    const dg_cpu *c = be->impl;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (m > 1)
    for (int i = 0; i < m; i++) {
        const float *xi = x + (int64_t)i * n;
        float *yi = y + (int64_t)i * n;
        double sum = 0.0, var = 0.0;
        for (int j = 0; j < n; j++) sum += xi[j];
        const double md = sum / n;
        for (int j = 0; j < n; j++) var += (xi[j] - md) * (xi[j] - md);
        const double r = 1.0 / sqrt(var / n + eps);
        for (int j = 0; j < n; j++) yi[j] = (float)((xi[j] - md) * r) * (1.0f + scale[j]) + shift[j];
    }
}

void dg_cpu_add_gated(dg_backend *be, float *y, const float *x, const float *gate, int m, int n) {
    const dg_cpu *c = be->impl;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (m > 1)
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) y[(int64_t)i * n + j] += gate[j] * x[(int64_t)i * n + j];
}

/* ---- connector ---------------------------------------------------------------------------- */

void dg_cpu_standardize(dg_backend *be, float *y, const float *x, int m, int n, float eps) {
    const dg_cpu *c = be->impl;
#pragma omp parallel for num_threads(c->n_threads) schedule(static) if (m > 1)
    for (int i = 0; i < m; i++) dg_standardize_row(y + (int64_t)i * n, x + (int64_t)i * n, n, eps);
}
