/* vision.c — Qwen2.5-VL vision tower: weight binding, window layout and the forward pass. */
#include "mllm/vision.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"
#include "io/weights.h"

#define VISION_NORM_EPS   1e-6f

/* ---- binding ------------------------------------------------------------------------------ */

static int check_config(const dg_vision_config *c, char *err, size_t errlen) {
    const int m = c->spatial_merge_size;
    /* each size bounded first, so that no product below wraps (merge x patch wrapped to 0 and
     * the modulo divided by it) */
    const struct { const char *key; int v, lo, hi; } sizes[] = {
        {"depth", c->depth, 1, 1024},          {"hidden_size", c->hidden_size, 1, 1 << 16},
        {"num_heads", c->num_heads, 1, 1024},   {"intermediate_size", c->intermediate_size, 1, 1 << 18},
        {"out_hidden_size", c->out_hidden_size, 1, 1 << 16}, {"in_chans", c->in_chans, 3, 3},
        {"patch_size", c->patch_size, 1, 1024}, {"temporal_patch_size", c->temporal_patch_size, 1, 16},
        {"spatial_merge_size", m, 1, 16},       {"window_size", c->window_size, 1, 1 << 16}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i].v < sizes[i].lo || sizes[i].v > sizes[i].hi) {
            snprintf(err, errlen, "vision_config: \"%s\" %d must be %d .. %d", sizes[i].key, sizes[i].v, sizes[i].lo,
                     sizes[i].hi);
            return DG_EMODEL;
        }
    if (c->hidden_size % c->num_heads || (c->hidden_size / c->num_heads) % 4 || c->hidden_size / c->num_heads > 256) {
        snprintf(err, errlen, "vision_config: hidden_size %d / num_heads %d: a head must be a multiple of 4, at most 256",
                 c->hidden_size, c->num_heads);
        return DG_EMODEL;
    }
    if (c->window_size < m * c->patch_size || c->window_size % (m * c->patch_size)) {
        snprintf(err, errlen, "vision_config: window_size %d must be a multiple of spatial_merge_size %d x patch_size %d",
                 c->window_size, m, c->patch_size);
        return DG_EMODEL;
    }
    return 0;
}

int dg_vision_load(dg_vision *m, const dg_vision_config *cfg, const dg_st *st, dg_backend *be,
                   char *err, size_t errlen) {
    const int64_t C = cfg->hidden_size, I = cfg->intermediate_size, O = cfg->out_hidden_size;
    const int64_t mm = (int64_t)cfg->spatial_merge_size * cfg->spatial_merge_size, M = mm * C;
    const int64_t per_block = 2 * C + 3 * C + C + 2 * I + C, n_vec = cfg->depth * per_block + C + M + O;
    const int64_t T = cfg->temporal_patch_size, p = cfg->patch_size;
    float *host = NULL;   /* owned: the vectors before upload */
    /* the panel layout where the backend reads it: only the matmul reads these matrices */
    dg_binder b = {.st = st, .be = be, .panels = 1, .err = err, .errlen = errlen};
    char prefix[64];
    int rc;

    memset(m, 0, sizeof *m);
    if ((rc = check_config(cfg, err, errlen)) < 0) return rc;
    m->cfg = *cfg;
    m->be = be;
    m->head_dim = cfg->hidden_size / cfg->num_heads;
    m->merge = cfg->spatial_merge_size;
    m->window = cfg->window_size / cfg->spatial_merge_size / cfg->patch_size;
    rc = DG_ENOMEM;
    m->blocks = calloc((size_t)cfg->depth, sizeof *m->blocks);
    host = malloc(sizeof(float) * (size_t)n_vec);
    m->vectors = be->alloc(be, sizeof(float) * (size_t)n_vec);
    if (!m->blocks || !host || !m->vectors) {
        snprintf(err, errlen, "vision: out of memory");
        goto fail;
    }
    /* norm weights and biases: widened to fp32 once (host copy, uploaded at the end) */
#define VEC(field, off, n, name)                                         \
    do {                                                                 \
        dg_bind_fp32_host(&b, host + (off), DG_SHAPE(n), name);          \
        field = m->vectors + (off);                                      \
    } while (0)
    /* the Conv3d [C, 3, T, p, p] as the matrix [C, 3·T·p²] */
    dg_bind_matrix(&b, &m->patch, DG_SHAPE(C, cfg->in_chans, T, p, p), "visual.patch_embed.proj.weight");
    for (int j = 0; j < cfg->depth; j++) {
        dg_vision_block *B = &m->blocks[j];
        const int64_t o = j * per_block;
        snprintf(prefix, sizeof prefix, "visual.blocks.%d.", j);
        b.prefix = prefix;
        VEC(B->norm1, o, C, "norm1.weight");
        VEC(B->norm2, o + C, C, "norm2.weight");
        VEC(B->b_qkv, o + 2 * C, 3 * C, "attn.qkv.bias");
        VEC(B->b_proj, o + 5 * C, C, "attn.proj.bias");
        VEC(B->b_gate, o + 6 * C, I, "mlp.gate_proj.bias");
        VEC(B->b_up, o + 6 * C + I, I, "mlp.up_proj.bias");
        VEC(B->b_down, o + 6 * C + 2 * I, C, "mlp.down_proj.bias");
        dg_bind_matrix(&b, &B->qkv, DG_SHAPE(3 * C, C), "attn.qkv.weight");
        dg_bind_matrix(&b, &B->proj, DG_SHAPE(C, C), "attn.proj.weight");
        dg_bind_matrix(&b, &B->gate, DG_SHAPE(I, C), "mlp.gate_proj.weight");
        dg_bind_matrix(&b, &B->up, DG_SHAPE(I, C), "mlp.up_proj.weight");
        dg_bind_matrix(&b, &B->down, DG_SHAPE(C, I), "mlp.down_proj.weight");
        for (int f = 0; f < cfg->n_fullatt; f++) B->full |= cfg->fullatt_block_indexes[f] == j;
    }
    b.prefix = "visual.merger.";
    const int64_t o = cfg->depth * per_block;
    VEC(m->ln_q, o, C, "ln_q.weight");
    VEC(m->b_mlp0, o + C, M, "mlp.0.bias");
    VEC(m->b_mlp2, o + C + M, O, "mlp.2.bias");
    dg_bind_matrix(&b, &m->mlp0, DG_SHAPE(M, M), "mlp.0.weight");
    dg_bind_matrix(&b, &m->mlp2, DG_SHAPE(O, M), "mlp.2.weight");
#undef VEC
    if ((rc = b.rc) < 0) goto fail;
    be->upload(be, m->vectors, host, n_vec);
    free(host);
    return 0;
fail:
    free(host);
    dg_vision_unload(m);
    return rc;
}

void dg_vision_unload(dg_vision *m) {
    if (m->be) m->be->release(m->be, m->vectors);
    free(m->blocks);
    memset(m, 0, sizeof *m);
}

/* ---- state -------------------------------------------------------------------------------- */

int dg_vision_state_new(const dg_vision *m, dg_backend *be, int max_patches, dg_vision_state **out,
                        char *err, size_t errlen) {
    const dg_vision_config *c = &m->cfg;
    const int mm = m->merge * m->merge;
    const size_t N = (size_t)max_patches, G = N / (size_t)mm, C = (size_t)c->hidden_size;
    const size_t I = (size_t)c->intermediate_size, O = (size_t)c->out_hidden_size;
    const size_t P = (size_t)m->patch.cols, half = (size_t)m->head_dim / 2;
    dg_vision_state *s;
    *out = NULL;
    if (max_patches < mm || max_patches % mm) {
        snprintf(err, errlen, "vision state: max_patches %d is not a positive multiple of %d",
                 max_patches, mm);
        return DG_EINVAL;
    }
    if (!(s = calloc(1, sizeof *s))) goto nomem;
    s->be = be;
    s->max_patches = max_patches;
    s->pix = be->alloc(be, N * P * sizeof(float));
    s->x = be->alloc(be, N * C * sizeof(float));
    s->h = be->alloc(be, N * C * sizeof(float));
    s->qkv = be->alloc(be, N * 3 * C * sizeof(float));
    s->att = be->alloc(be, N * C * sizeof(float));
    s->gate = be->alloc(be, N * I * sizeof(float));
    s->up = be->alloc(be, N * I * sizeof(float));
    s->merged = be->alloc(be, G * O * sizeof(float));
    s->cos = be->alloc(be, N * half * sizeof(float));
    s->sin = be->alloc(be, N * half * sizeof(float));
    s->host_cos = malloc(N * half * sizeof(float));
    s->host_sin = malloc(N * half * sizeof(float));
    s->window_index = malloc(G * sizeof(int32_t));
    s->reverse = malloc(G * sizeof(int32_t));
    s->cu_window = malloc((G + 1) * sizeof(int32_t));
    s->cu_full = malloc((G + 1) * sizeof(int32_t));
    if (!s->pix || !s->x || !s->h || !s->qkv || !s->att || !s->gate || !s->up || !s->merged ||
        !s->cos || !s->sin || !s->host_cos || !s->host_sin || !s->window_index || !s->reverse ||
        !s->cu_window || !s->cu_full)
        goto nomem;
    *out = s;
    return 0;
nomem:
    dg_vision_state_free(m, s);
    snprintf(err, errlen, "vision state: out of memory for %d patches", max_patches);
    return DG_ENOMEM;
}

void dg_vision_state_free(const dg_vision *m, dg_vision_state *s) {
    if (!s) return;
    dg_backend *be = s->be;
    float *bufs[] = {s->pix, s->x, s->h, s->qkv, s->att, s->gate, s->up, s->merged, s->cos, s->sin};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->release(be, bufs[i]);
    free(s->host_cos);
    free(s->host_sin);
    free(s->window_index);
    free(s->reverse);
    free(s->cu_window);
    free(s->cu_full);
    free(s);
}

/* ---- layout: window order, segments, rotary table (spec §4.3-4.4) -------------------------- */

int dg_vision_tokens(const dg_vision *m, int32_t grid_t, int32_t grid_h, int32_t grid_w) {
    return (int)((int64_t)grid_t * grid_h * grid_w / (m->merge * m->merge));
}

/* For each image frame (t) in turn, the merged tokens of each window of w×w tokens in
 * raster order of windows, raster order inside a window; the last row and column of
 * windows may be partial. cu_window counts patches per window (m² per token); windows
 * are never empty here, so nothing needs dropping (transformers' padding with a whole
 * empty window when the side is a multiple of w adds zero-length windows that
 * unique_consecutive removes). cu_full has one segment per frame. Returns the number of
 * windows; *n_full the number of frames. */
static int build_windows(const dg_vision *m, dg_vision_state *s, const dg_image_patches *const *images,
                         int n, int *n_full) {
    const int mm = m->merge * m->merge, w = m->window;
    int nw = 0, nf = 0, g = 0, off = 0;
    s->cu_window[0] = 0;
    s->cu_full[0] = 0;
    for (int i = 0; i < n; i++) {
        const int H = images[i]->grid_h / m->merge, W = images[i]->grid_w / m->merge;
        for (int t = 0; t < images[i]->grid_t; t++) {
            for (int wy = 0; wy < H; wy += w)
                for (int wx = 0; wx < W; wx += w) {
                    int cnt = 0;
                    for (int r = wy; r < wy + w && r < H; r++)
                        for (int c = wx; c < wx + w && c < W; c++, cnt++)
                            s->window_index[g++] = off + (t * H + r) * W + c;
                    s->cu_window[nw + 1] = s->cu_window[nw] + cnt * mm;
                    nw++;
                }
            s->cu_full[nf + 1] = s->cu_full[nf] + H * W * mm;
            nf++;
        }
        off += images[i]->grid_t * H * W;
    }
    for (int k = 0; k < g; k++) s->reverse[s->window_index[k]] = k;
    *n_full = nf;
    return nw;
}

/* cos/sin of patch row k·m² + u (window order k, sub-patch u = mh·m + mw): frequency j of
 * the first hd/4 rotates by the patch's row hp, the next hd/4 by its column wp, with
 * inv[j] = 1 / theta^(2j / (hd/2)) in fp32 (transformers' axial vision rope). */
static void build_rope(const dg_vision *m, dg_vision_state *s, const dg_image_patches *const *images,
                       int n) {
    const int half = m->head_dim / 2, quarter = half / 2, mg = m->merge, mm = mg * mg;
    float inv[64];   /* head_dim <= 256 (check_config) */
    for (int j = 0; j < quarter; j++)
        inv[j] = 1.0f / powf(DG_VISION_ROPE_THETA, (float)(2 * j) / (float)half);
    for (int i = 0, off = 0; i < n; i++) {
        const int H = images[i]->grid_h / mg, W = images[i]->grid_w / mg;
        const int n_tok = images[i]->grid_t * H * W;
        for (int tok = off; tok < off + n_tok; tok++) {
            const int local = (tok - off) % (H * W), r = local / W, c = local % W;
            const int64_t row0 = (int64_t)s->reverse[tok] * mm;
            for (int u = 0; u < mm; u++) {
                const float hp = (float)(r * mg + u / mg), wp = (float)(c * mg + u % mg);
                float *cs = s->host_cos + (row0 + u) * half, *sn = s->host_sin + (row0 + u) * half;
                for (int j = 0; j < quarter; j++) {
                    cs[j] = cosf(hp * inv[j]);
                    sn[j] = sinf(hp * inv[j]);
                    cs[quarter + j] = cosf(wp * inv[j]);
                    sn[quarter + j] = sinf(wp * inv[j]);
                }
            }
        }
        off += n_tok;
    }
}

/* ---- forward ------------------------------------------------------------------------------ */

/* One block over n patches in window order, in place on s->x [n, C] (spec §4.5). */
static void block_forward(const dg_vision *m, const dg_vision_block *B, dg_vision_state *s,
                          const int32_t *cu, int n_seg, int n) {
    const dg_vision_config *c = &m->cfg;
    dg_backend *be = s->be;
    const int C = c->hidden_size, hd = m->head_dim, H = c->num_heads;

    be->rmsnorm(be, s->h, s->x, B->norm1, n, C, VISION_NORM_EPS);
    be->matmul(be, s->qkv, s->h, &B->qkv, B->b_qkv, n);
    be->rope_table(be, s->qkv, 3 * C, s->cos, s->sin, n, H, hd);
    be->rope_table(be, s->qkv + C, 3 * C, s->cos, s->sin, n, H, hd);
    be->attention_segments(be, s->att, s->qkv, 3 * C, s->qkv + C, s->qkv + 2 * C, 3 * C, cu, cu,
                           n_seg, H, H, hd, 1.0f / sqrtf((float)hd));
    be->matmul(be, s->h, s->att, &B->proj, B->b_proj, n);
    be->add(be, s->x, s->h, (int64_t)n * C);

    be->rmsnorm(be, s->h, s->x, B->norm2, n, C, VISION_NORM_EPS);
    be->matmul(be, s->gate, s->h, &B->gate, B->b_gate, n);
    be->matmul(be, s->up, s->h, &B->up, B->b_up, n);
    be->silu_mul(be, s->gate, s->gate, s->up, (int64_t)n * c->intermediate_size);
    be->matmul(be, s->h, s->gate, &B->down, B->b_down, n);
    be->add(be, s->x, s->h, (int64_t)n * C);
}

int dg_vision_forward(const dg_vision *m, dg_vision_state *s, const dg_image_patches *const *images,
                      int n, float *out, char *err, size_t errlen) {
    const dg_vision_config *c = &m->cfg;
    dg_backend *be = s->be;
    const int C = c->hidden_size, mm = m->merge * m->merge, P = (int)m->patch.cols;
    int64_t n_patch = 0;

    if (n < 1) {
        snprintf(err, errlen, "vision: no images");
        return DG_EINVAL;
    }
    for (int i = 0; i < n; i++) {
        const dg_image_patches *p = images[i];
        if (p->patch_dim != P || p->grid_t < 1 || p->grid_h < m->merge || p->grid_w < m->merge ||
            p->grid_h % m->merge || p->grid_w % m->merge) {
            snprintf(err, errlen, "vision: image %d has patch grid %dx%dx%d of %d values, the model "
                     "takes grids of multiples of %d of %d values", i, p->grid_t, p->grid_h,
                     p->grid_w, p->patch_dim, m->merge, P);
            return DG_EINVAL;
        }
        n_patch += (int64_t)p->grid_t * p->grid_h * p->grid_w;
    }
    if (n_patch > s->max_patches) {
        snprintf(err, errlen, "vision: %lld patches in one call, the state holds %d",
                 (long long)n_patch, s->max_patches);
        return DG_ELIMIT;
    }
    const int N = (int)n_patch, G = N / mm;
    int n_full;
    const int n_win = build_windows(m, s, images, n, &n_full);
    build_rope(m, s, images, n);
    be->upload(be, s->cos, s->host_cos, (int64_t)N * m->head_dim / 2);
    be->upload(be, s->sin, s->host_sin, (int64_t)N * m->head_dim / 2);
    for (int i = 0, row = 0; i < n; i++) {
        const int np = images[i]->grid_t * images[i]->grid_h * images[i]->grid_w;
        be->upload(be, s->pix + (int64_t)row * P, images[i]->pixel_values, (int64_t)np * P);
        row += np;
    }

    /* patch embedding (Conv3d with kernel = stride = one patch: a matmul), then the groups
     * of m² patches into window order */
    be->matmul(be, s->h, s->pix, &m->patch, NULL, N);
    be->gather_rows(be, s->x, s->h, s->window_index, G, (int64_t)mm * C);
    for (int j = 0; j < c->depth; j++) {
        const dg_vision_block *B = &m->blocks[j];
        block_forward(m, B, s, B->full ? s->cu_full : s->cu_window, B->full ? n_full : n_win, N);
    }
    /* merger: RMSNorm per patch, the m² patches of a token side by side [G, m²C], MLP with
     * exact GELU, then back to raster order of tokens */
    be->rmsnorm(be, s->h, s->x, m->ln_q, N, C, VISION_NORM_EPS);
    be->matmul(be, s->att, s->h, &m->mlp0, m->b_mlp0, G);
    be->gelu(be, s->att, s->att, (int64_t)G * mm * C);
    be->matmul(be, s->merged, s->att, &m->mlp2, m->b_mlp2, G);
    be->gather_rows(be, out, s->merged, s->reverse, G, c->out_hidden_size);
    return 0;
}
