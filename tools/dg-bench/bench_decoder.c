/* bench_decoder — the Qwen2.5-VL text decoder on the CPU backend: prefill tok/s for a
 * 512-token prompt, greedy-free decode tok/s (fixed token ids: the figure is the forward
 * pass alone, sampling excluded), with 1 and 2 threads (or --threads N), and peak RSS
 * against the size of the text weights.
 *
 * The model is --model DIR (a package: DIR/mllm) or build/models/small, written by
 * build/mkmodel --preset small --seed 1 when missing (with the Qwen2 vocabulary, or --vocab).
 * --quick: a 64-token prompt, 8 decode steps.
 *
 * "prefill_argmax" is the most likely next token after the prompt: the reference scripts
 * record theirs under the same key, as evidence that all three ran the same weights.
 *
 * When build/bench/transformers_decoder.json and build/bench/llamacpp_decoder.json exist
 * (tools/reference/bench_transformers_decoder.py, bench_llamacpp.py: bf16, equal precision
 * with our bf16 weights; their _f32 files, labelled, for comparison), the ratios to them are
 * printed too, with the baseline's name, version and dtype.
 *
 * The machine's read bandwidth is measured in the same run, with the same threads (a sum
 * over 1 GiB, far past the caches, best of 3), and decode is printed as a fraction of the
 * limit it implies: the bytes one decode token must read (every text matrix once: the
 * embedding table as the tied lm_head, or lm_head; the KV read is small here) over that
 * bandwidth. The same tokens' matrix-vector products are then timed alone
 * (decode_matmuls_*): their share of a decode step, and their own fraction of the limit. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "backend.h"
#include "bench.h"
#include "mllm/qwen2vl_config.h"
#include "cache/kv_cache.h"
#include "mllm/qwen2.h"
#include "io/safetensors.h"


/* The small package's MLLM folder. */
static int ensure_model(bench_ctx *ctx, char *dir, size_t len) {
    char pkg[900];
    if (bench_small_package(ctx, pkg, sizeof pkg) < 0) return -1;
    snprintf(dir, len, "%s/mllm", pkg);
    return 0;
}

static double peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0;
}

/* Resident memory now (VmRSS), MiB: what the process held before the model was opened
 * (shared libraries; with the CUDA backend linked in, cuBLAS alone brings ~160 MiB). */
static double rss_now_mb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kb = atof(line + 6);
    fclose(f);
    return kb / 1024.0;
}

static double text_weight_mb(const dg_st *st) {
    double b = 0;
    for (size_t i = 0; i < dg_st_count(st); i++) {
        const dg_st_tensor *t = dg_st_at(st, i);
        if (strncmp(t->name, "visual.", 7)) b += (double)t->nbytes;
    }
    return b / (1024.0 * 1024.0);
}

/* Bytes one decode token reads from the text weights: every matrix of the decoder once; of
 * the embedding table one row, unless it is also the (tied) lm_head. */
static double decode_bytes_per_token(const dg_st *st, int tied) {
    double b = 0;
    for (size_t i = 0; i < dg_st_count(st); i++) {
        const dg_st_tensor *t = dg_st_at(st, i);
        if (!strncmp(t->name, "visual.", 7)) continue;
        if (!strcmp(t->name, "model.embed_tokens.weight") && !tied) continue;
        b += (double)t->nbytes;
    }
    return b;
}

static volatile uint64_t read_sink;   /* the XORs are stored, so the loops are not dropped */

/* GB/s of reading 1 GiB with `threads` threads, best of 3: an XOR over 64-bit words into
 * eight independent accumulators, so that the loads, not the arithmetic, set the pace. The
 * buffer is in the pages the weights are in: 2 MiB huge pages when the backend reads them
 * from there (reading through 4 KiB pages gave ~10% less here, and a limit measured in
 * them would flatter the decode's fraction of it), else ordinary ones. */
static double read_bandwidth_gbs(int threads, int hugepages) {
    const size_t n = (size_t)1 << 27;   /* 64-bit words: 1 GiB */
    uint64_t *buf = mmap(NULL, n * sizeof *buf, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), sink = 0;
    double best = 0;
    if (buf == MAP_FAILED) return 0;
    if (hugepages) madvise(buf, n * sizeof *buf, MADV_HUGEPAGE);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = bench_now_ms();
        uint64_t x = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(^ : x)
        for (size_t i = 0; i < n; i += 8) {
            const uint64_t *p = buf + i;
            x ^= (p[0] ^ p[1]) ^ (p[2] ^ p[3]) ^ ((p[4] ^ p[5]) ^ (p[6] ^ p[7]));
        }
        double gbs = (double)(n * sizeof *buf) / ((bench_now_ms() - t0) / 1e3) / 1e9;
        sink ^= x;
        if (gbs > best) best = gbs;
    }
    munmap(buf, n * sizeof *buf);
    read_sink = sink;
    return best;
}

static int run(bench_ctx *ctx, json_t *out, const char *dir, int threads, double rss_start) {
    const int n_prompt = ctx->quick ? 64 : 512, n_decode = ctx->quick ? 8 : 64;
    dg_qwen2vl_config cfg;
    dg_backend *be = NULL;
    dg_st *st = NULL;
    dg_qwen2 m = {0};
    dg_qwen2_state *s = NULL;
    dg_kv_cache *kv = NULL;
    dg_kv_seq seq = {0};
    int32_t *ids = NULL;
    char err[512], name[96];
    int rc = -1;
    if (dg_config_load(dir, &cfg, err, sizeof err) < 0 ||
        bench_cpu_backend(ctx, threads, &be, err, sizeof err) < 0 ||
        dg_st_open_flags(dir, be->weights_hugepages ? DG_ST_HUGEPAGES : 0, NULL, NULL, &st, err, sizeof err) < 0 ||
        dg_qwen2_load(&m, &cfg.text, st, be, err, sizeof err) < 0 ||
        dg_qwen2_state_new(&m, m.be, n_prompt, 1, &s, err, sizeof err) < 0 ||
        dg_kv_cache_new(be, cfg.text.n_layers, cfg.text.n_kv_heads * cfg.text.head_dim, 16,
                        (n_prompt + n_decode) / 16 + 2, DG_DTYPE_F32, &kv, err, sizeof err) < 0 ||
        dg_kv_seq_init(&seq, n_prompt + n_decode, 16) < 0) {
        fprintf(stderr, "bench_decoder: %s\n", err);
        goto out;
    }
    ids = malloc(sizeof(int32_t) * (size_t)n_prompt);
    uint64_t x = 1;
    for (int i = 0; i < n_prompt; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t)((x >> 33) % 151643u % (uint64_t)cfg.text.vocab_size);
    }
    /* warm-up: page the weights in, so that the figures are not disk reads */
    dg_qwen2_input in = {.ids = ids, .n = 16, .n_logits = 1};
    if (dg_qwen2_forward(&m, s, kv, &seq, &in, NULL, err, sizeof err) < 0) goto fail;
    dg_kv_seq_release(kv, &seq);
    double t0 = bench_now_ms();
    in = (dg_qwen2_input){.ids = ids, .n = n_prompt, .n_logits = 1};
    if (dg_qwen2_forward(&m, s, kv, &seq, &in, NULL, err, sizeof err) < 0) goto fail;
    double t1 = bench_now_ms();
    /* the prompt's next token: the reference scripts record theirs, so that the three
     * runs are seen to compute the same model */
    int best = 0;
    for (int i = 1; i < cfg.text.vocab_size; i++) if (s->logits[i] > s->logits[best]) best = i;
    for (int i = 0; i < n_decode; i++) {
        in = (dg_qwen2_input){.ids = &ids[i], .n = 1, .n_logits = 1};
        if (dg_qwen2_forward(&m, s, kv, &seq, &in, NULL, err, sizeof err) < 0) goto fail;
    }
    double t2 = bench_now_ms();
    /* the same tokens' matrix-vector products alone (every matrix of every layer and the
     * lm_head at m = 1, on the activations the last step left): what the rest of a step
     * (norms, RoPE, attention, the threads' meeting points) adds is the difference */
    for (int i = 0; i < n_decode; i++) {
        for (int l = 0; l < cfg.text.n_layers; l++) {
            const dg_qwen2_layer *L = &m.layers[l];
            be->matmul(be, s->q, s->h, &L->wq, NULL, 1);
            be->matmul(be, s->k, s->h, &L->wk, NULL, 1);
            be->matmul(be, s->v, s->h, &L->wv, NULL, 1);
            be->matmul(be, s->x, s->att, &L->wo, NULL, 1);
            be->matmul(be, s->gate, s->h, &L->w_gate, NULL, 1);
            be->matmul(be, s->up, s->h, &L->w_up, NULL, 1);
            be->matmul(be, s->x, s->gate, &L->w_down, NULL, 1);
        }
        be->matmul(be, s->dev_logits, s->h, &m.lm_head, NULL, 1);
    }
    double t3 = bench_now_ms();
    snprintf(name, sizeof name, "prefill_%d_tok_s_t%d", n_prompt, threads);
    bench_record(out, name, n_prompt / ((t1 - t0) / 1e3), "tok/s");
    bench_ratio(out, "build/bench/transformers_decoder.json", name, "transformers", n_prompt / ((t1 - t0) / 1e3));
    bench_ratio(out, "build/bench/llamacpp_decoder.json", name, "llamacpp", n_prompt / ((t1 - t0) / 1e3));
    snprintf(name, sizeof name, "decode_tok_s_t%d", threads);
    bench_record(out, name, n_decode / ((t2 - t1) / 1e3), "tok/s");
    bench_ratio(out, "build/bench/transformers_decoder.json", name, "transformers", n_decode / ((t2 - t1) / 1e3));
    bench_ratio(out, "build/bench/llamacpp_decoder.json", name, "llamacpp", n_decode / ((t2 - t1) / 1e3));
    bench_record(out, "prefill_argmax", best, "(token id)");
    const double bw = read_bandwidth_gbs(threads, be->weights_hugepages), bytes = decode_bytes_per_token(st, cfg.text.tie_word_embeddings);
    snprintf(name, sizeof name, "read_bandwidth_gbs_t%d", threads);
    bench_record(out, name, bw, "GB/s");
    snprintf(name, sizeof name, "decode_bytes_per_token_mb");
    bench_record(out, name, bytes / 1e6, "MB");
    snprintf(name, sizeof name, "decode_fraction_of_bandwidth_limit_t%d", threads);
    bench_record(out, name, bw > 0 ? (n_decode / ((t2 - t1) / 1e3)) / (bw * 1e9 / bytes) : 0, "(of 1)");
    snprintf(name, sizeof name, "decode_matmuls_ms_per_token_t%d", threads);
    bench_record(out, name, (t3 - t2) / n_decode, "ms");
    snprintf(name, sizeof name, "decode_matmuls_share_of_step_t%d", threads);
    bench_record(out, name, (t3 - t2) / (t2 - t1), "(of 1)");
    snprintf(name, sizeof name, "decode_matmuls_fraction_of_bandwidth_limit_t%d", threads);
    bench_record(out, name, bw > 0 ? (n_decode / ((t3 - t2) / 1e3)) / (bw * 1e9 / bytes) : 0, "(of 1)");
    double w = text_weight_mb(st), rss = peak_rss_mb();
    bench_record(out, "text_weights_mb", w, "MiB");
    bench_record(out, "peak_rss_mb", rss, "MiB");
    bench_record(out, "peak_rss_over_weights", rss / w, "x");
    bench_record(out, "rss_before_open_mb", rss_start, "MiB");
    bench_record(out, "peak_rss_minus_before_open_over_weights", (rss - rss_start) / w, "x");
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "bench_decoder: %s\n", err);
out:
    free(ids);
    if (kv) dg_kv_seq_release(kv, &seq);
    dg_kv_seq_free(&seq);
    dg_kv_cache_free(kv);
    if (m.be) dg_qwen2_state_free(&m, s);
    dg_qwen2_unload(&m);
    dg_st_close(st);
    dg_backend_free(be);
    return rc;
}

static int bench_decoder(bench_ctx *ctx, json_t *out) {
    char dir[1024];
    const char *coretype = getenv("OPENBLAS_CORETYPE");
    if (ensure_model(ctx, dir, sizeof dir) < 0) return -1;
    printf("  model %s, OPENBLAS_CORETYPE=%s\n", dir, coretype ? coretype : "(unset)");
    json_object_set_new(out, "openblas_coretype", json_string(coretype ? coretype : ""));
    bench_record_compute(ctx, out);
    const double rss_start = rss_now_mb();
    if (ctx->threads > 0) return run(ctx, out, dir, ctx->threads, rss_start);
    for (int t = 1; t <= 2; t++)
        if (run(ctx, out, dir, t, rss_start) < 0) return -1;
    return 0;
}

DG_BENCH(decoder, "Qwen2.5-VL text decoder, small preset: prefill and decode tok/s, peak RSS", bench_decoder)
