/* vae.c — writes DIR/vae/: a Wan2.1 VAE in the diffusers AutoencoderKLWan layout (spec
 * docs/specs/cosmos_dit_wan_vae.md §6, Appendix B) with random fp32 weights.
 *
 * tiny: base width 8 (widths 8, 16, 32, 32), the real depth and resampling; small and full:
 * the real shapes (base 96, 126.9 M parameters).
 * Init: conv weights N(0, 1/fan_in) keep unit-RMS inputs (every conv follows an RMS norm)
 * at unit scale; conv_out is scaled down so that decoded pixels stay mostly inside the
 * [-1, 1] clamp, where a fidelity test can see them; gammas 1 ± 0.1, biases ± 0.05. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "mkmodel.h"

static const float LAT_MEAN[16] = {-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                   0.4134,  -0.0715, 0.5517,  -0.3632, -0.1922, -0.9497, 0.2503, -0.2921};
static const float LAT_STD[16] = {2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160};

typedef struct {
    mk_list *l;
    char     name[160];
} ctx;

static int add(ctx *c, double mean, double std, const char *fmt_prefix, const char *suffix,
               int nd, int64_t a, int64_t b, int64_t k0, int64_t k1, int64_t k2) {
    const int64_t sh[5] = {a, b, k0, k1, k2};
    snprintf(c->name, sizeof c->name, "%s%s", fmt_prefix, suffix);
    return mk_add(c->l, DG_DTYPE_F32, mean, std, c->name, nd, sh);
}

/* weight [o, i, k...] and bias [o]; kt 0 = a 2-D conv */
static int conv(ctx *c, const char *p, int o, int i, int kt, int kh, int kw, double gain) {
    const double fan = (double)i * (kt ? kt : 1) * kh * kw;
    if (kt ? add(c, 0, gain / sqrt(fan), p, ".weight", 5, o, i, kt, kh, kw)
           : add(c, 0, gain / sqrt(fan), p, ".weight", 4, o, i, kh, kw, 0))
        return -1;
    return add(c, 0, 0.05, p, ".bias", 1, o, 0, 0, 0, 0);
}

static int norm_gamma(ctx *c, const char *p, int ch, int nd) {
    return add(c, 1.0, 0.1, p, ".gamma", nd, ch, 1, 1, 1, 0);
}

static int res(ctx *c, const char *p, int in, int out) {
    char n[160];
    snprintf(n, sizeof n, "%s.norm1", p);
    if (norm_gamma(c, n, in, 4)) return -1;
    snprintf(n, sizeof n, "%s.conv1", p);
    if (conv(c, n, out, in, 3, 3, 3, 1.0)) return -1;
    snprintf(n, sizeof n, "%s.norm2", p);
    if (norm_gamma(c, n, out, 4)) return -1;
    snprintf(n, sizeof n, "%s.conv2", p);
    if (conv(c, n, out, out, 3, 3, 3, 1.0)) return -1;
    snprintf(n, sizeof n, "%s.conv_shortcut", p);
    return in != out ? conv(c, n, out, in, 1, 1, 1, 1.0) : 0;
}

static int mid(ctx *c, const char *stack, int ch) {
    char n[160];
    snprintf(n, sizeof n, "%s.mid_block.resnets.0", stack);
    if (res(c, n, ch, ch)) return -1;
    snprintf(n, sizeof n, "%s.mid_block.attentions.0.norm", stack);
    if (norm_gamma(c, n, ch, 3)) return -1;
    snprintf(n, sizeof n, "%s.mid_block.attentions.0.to_qkv", stack);
    if (conv(c, n, 3 * ch, ch, 0, 1, 1, 1.0)) return -1;
    snprintf(n, sizeof n, "%s.mid_block.attentions.0.proj", stack);
    if (conv(c, n, ch, ch, 0, 1, 1, 1.0)) return -1;
    snprintf(n, sizeof n, "%s.mid_block.resnets.1", stack);
    return res(c, n, ch, ch);
}

static int resample(ctx *c, const char *p, int ch, int up, int temporal) {
    char n[160];
    snprintf(n, sizeof n, "%s.resample.1", p);
    if (conv(c, n, up ? ch / 2 : ch, ch, 0, 3, 3, 1.0)) return -1;
    snprintf(n, sizeof n, "%s.time_conv", p);
    return temporal ? conv(c, n, up ? 2 * ch : ch, ch, 3, 1, 1, 1.0) : 0;
}

int mk_write_vae(const char *dir, mk_preset preset, uint64_t seed, char *err, size_t errlen) {
    const int base = preset == MK_TINY ? 8 : 96, z = 16, nrb = 2, L = 4;
    const int mult[4] = {1, 2, 4, 4}, tdown[3] = {0, 1, 1};
    char sub[4096], n[160], cfg[4096];
    mk_list l = {0};
    ctx c = {&l, ""};
    int dims[5], k = 0, rc = -1;

    snprintf(sub, sizeof sub, "%s/vae", dir);
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) goto io;
    if (mkdir(sub, 0755) < 0 && errno != EEXIST) goto io;
    /* encoder */
    dims[0] = base;
    for (int i = 0; i < L; i++) dims[i + 1] = base * mult[i];
    if (conv(&c, "encoder.conv_in", dims[0], 3, 3, 3, 3, 1.0)) goto mem;
    for (int i = 0; i < L; i++) {
        for (int r = 0; r < nrb; r++) {
            snprintf(n, sizeof n, "encoder.down_blocks.%d", k++);
            if (res(&c, n, r ? dims[i + 1] : dims[i], dims[i + 1])) goto mem;
        }
        if (i == L - 1) break;
        snprintf(n, sizeof n, "encoder.down_blocks.%d", k++);
        if (resample(&c, n, dims[i + 1], 0, tdown[i])) goto mem;
    }
    if (mid(&c, "encoder", dims[L]) || norm_gamma(&c, "encoder.norm_out", dims[L], 4) ||
        conv(&c, "encoder.conv_out", 2 * z, dims[L], 3, 3, 3, 1.0) ||
        conv(&c, "quant_conv", 2 * z, 2 * z, 1, 1, 1, 1.0) ||
        conv(&c, "post_quant_conv", z, z, 1, 1, 1, 1.0))
        goto mem;
    /* decoder */
    dims[0] = base * mult[L - 1];
    for (int i = 0; i < L; i++) dims[i + 1] = base * mult[L - 1 - i];
    if (conv(&c, "decoder.conv_in", dims[0], z, 3, 3, 3, 1.0) || mid(&c, "decoder", dims[0]))
        goto mem;
    for (int i = 0; i < L; i++) {
        int in = i > 0 ? dims[i] / 2 : dims[i];
        for (int r = 0; r <= nrb; r++) {
            snprintf(n, sizeof n, "decoder.up_blocks.%d.resnets.%d", i, r);
            if (res(&c, n, in, dims[i + 1])) goto mem;
            in = dims[i + 1];
        }
        if (i == L - 1) break;
        snprintf(n, sizeof n, "decoder.up_blocks.%d.upsamplers.0", i);
        if (resample(&c, n, dims[i + 1], 1, tdown[L - 2 - i])) goto mem;
    }
    if (norm_gamma(&c, "decoder.norm_out", dims[L], 4) ||
        conv(&c, "decoder.conv_out", 3, dims[L], 3, 3, 3, 0.25))
        goto mem;

    int o = snprintf(cfg, sizeof cfg,
                     "{\n  \"_class_name\": \"AutoencoderKLWan\",\n  \"attn_scales\": [],\n"
                     "  \"base_dim\": %d,\n  \"dim_mult\": [1, 2, 4, 4],\n  \"dropout\": 0.0,\n"
                     "  \"num_res_blocks\": %d,\n  \"temperal_downsample\": [false, true, true],\n"
                     "  \"z_dim\": %d,\n  \"latents_mean\": [", base, nrb, z);
    for (int i = 0; i < z; i++) o += snprintf(cfg + o, sizeof cfg - (size_t)o, "%s%.4f", i ? ", " : "", LAT_MEAN[i]);
    o += snprintf(cfg + o, sizeof cfg - (size_t)o, "],\n  \"latents_std\": [");
    for (int i = 0; i < z; i++) o += snprintf(cfg + o, sizeof cfg - (size_t)o, "%s%.4f", i ? ", " : "", LAT_STD[i]);
    snprintf(cfg + o, sizeof cfg - (size_t)o, "]\n}\n");
    if (mk_write_text(sub, "config.json", cfg, err, errlen) < 0) goto out;
    if (mk_write_diffusers(sub, &l, seed, err, errlen) < 0) goto out;
    rc = 0;
    goto out;
io:
    snprintf(err, errlen, "%s: %s", sub, strerror(errno));
    goto out;
mem:
    snprintf(err, errlen, "vae: out of memory");
out:
    mk_list_free(&l);
    return rc;
}
