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
 * Baselines (bf16: equal precision with our bf16 weights). llama.cpp, with --llamacpp CMD
 * (tools/reference/bench_llamacpp.py --serve), and transformers, with --transformers CMD
 * (tools/reference/bench_transformers_decoder.py --serve; `make bench-decoder` passes both
 * when the reference venv has them), run as co-processes turn about with ours: three
 * prompts each, then 8 rounds of 8 decode tokens each, the order alternating, and a ratio
 * is the median of the rounds' ratios (its _min and _max beside it). This host's memory
 * bandwidth moves between ~20 and ~65 GB/s on two threads from one minute to the next, and
 * decode with it: two runs minutes apart compared two machines (0.95x and 1.22x the same
 * day). A baseline is compared only in the run that timed it: without a co-process (none
 * given, it did not start, or it dropped), "<label>_baseline_missing_tN" says why, never an
 * earlier run's file. Equal precision is our bf16 compute (--bf16-compute): in the fp32
 * compute the ratios are named "..._vs_<label>_ours_fp32" (our fp32 activations against a
 * bf16 baseline: not the same work at the same precision, labelled so). The baselines'
 * prefill_argmax must be ours ("<label>_same_argmax" 1), or the figures compare two models.
 *
 * The machine's read bandwidth is measured in every decode round, with the same threads (a
 * sum over 512 MiB, far past the caches, best of 3), and decode is printed as a fraction of
 * the limit it implies (the median of the rounds', each against its own round's bandwidth):
 * the bytes one decode token must read (every text matrix once: the embedding table as the
 * tied lm_head, or lm_head; the KV read is small here) over that bandwidth; llama.cpp's too.
 * The same tokens' matrix-vector products are timed alone in every round
 * (decode_matmuls_*): their share of a decode step, and their own fraction of the limit;
 * and the lm_head's alone (decode_lm_head_*: the largest matrix, one stream), its GB/s
 * against the read loop's of the same round: the GEMV's own rate. The same tokens are decoded
 * in every round with the prompt's KV in bf16 as well (kv_bf16, the CPU's option: a cache of
 * its own, filled by the same prefill), the two in turn, the order alternating:
 * decode_tok_s_tN_kv_bf16 and decode_kv_bf16_time_over_fp32_tN (the median of the rounds).
 * And with the logit screen (engine/MODELS.md "The logit screen", the product's default for
 * greedy jobs on the CPU), a third in turn: each step's forward leaves the bounds, and the
 * greedy token is chosen from them (dg_sampler_sample_bounds, its exact rows picked), the
 * choice included in the time (the others time the forward alone, their lm_head whole):
 * decode_screen_tok_s_tN, decode_screen_time_over_full_tN, decode_screen_tok_s_tN_vs_llamacpp,
 * its fraction of the limit its own bytes imply (the int8 copy in the lm_head's place), the
 * candidates a token read in full, and the tokens the bounds did not decide (the row
 * computed whole). And a fourth in turn, the screen with a top-k sampler (k 50, T 1, top-p
 * 0.95: a common sampled job), its choice and draw from the bounds with the k best and
 * those the bounds cannot tell from the k-th read in full: decode_screen_topk50_tok_s_tN,
 * decode_screen_topk50_time_over_full_tN (against the plain decode's forward alone, which
 * leaves out the whole row's own top-k choice, ~0.1 ms), the rows read in full a token.
 * The same token ids are fed in all four. 
 * Peak RSS is taken before the bandwidth's buffer and the bf16 cache are made, and is each
 * thread count's own. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backend.h"
#include "bench.h"
#include "mllm/qwen2vl_config.h"
#include "cache/kv_cache.h"
#include "mllm/qwen2.h"
#include "io/safetensors.h"
#include "text/sampler.h"


/* The small package's MLLM folder. */
static int ensure_model(bench_ctx *ctx, char *dir, size_t len) {
    char pkg[900];
    if (bench_small_package(ctx, pkg, sizeof pkg) < 0) return -1;
    snprintf(dir, len, "%s/mllm", pkg);
    return 0;
}

/* A line of /proc/self/status in MiB: "VmRSS" (resident now) or "VmHWM" (its peak since
 * the start or since reset_peak_rss). */
static double status_mb(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    const size_t n = strlen(key);
    double kb = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':') kb = atof(line + n + 1);
    fclose(f);
    return kb / 1024.0;
}

/* The peak resident memory back to what is resident now (Linux's clear_refs "5"), so that
 * each thread count's peak is its own, not the last one's bandwidth buffer. Where that file
 * cannot be written the peak is the process's, and the later figure at most too high. */
static void reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
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
 * the embedding table one row, unless it is also the (tied) lm_head; a checkpoint that is
 * tied and still holds an lm_head.weight (the engine reads the table: qwen2.c) counts the
 * table once. */
static double decode_bytes_per_token(const dg_st *st, int tied) {
    double b = 0;
    for (size_t i = 0; i < dg_st_count(st); i++) {
        const dg_st_tensor *t = dg_st_at(st, i);
        if (!strncmp(t->name, "visual.", 7)) continue;
        if (!strcmp(t->name, "model.embed_tokens.weight") && !tied) continue;
        if (!strcmp(t->name, "lm_head.weight") && tied) continue;
        b += (double)t->nbytes;
    }
    return b;
}

static volatile uint64_t read_sink;   /* the XORs are stored, so the loops are not dropped */

/* A buffer for the read bandwidth: 512 MiB, far past the caches, in the pages the weights
 * are in: 2 MiB huge pages when the backend reads them from there (reading through 4 KiB
 * pages gave ~10% less here, and a limit measured in them would flatter the decode's
 * fraction of it), else ordinary ones; written once. NULL when out of memory. */
#define READ_WORDS ((size_t)1 << 26)
static uint64_t *read_buffer(int threads, int hugepages) {
    uint64_t *buf = mmap(NULL, READ_WORDS * sizeof *buf, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return NULL;
    if (hugepages) madvise(buf, READ_WORDS * sizeof *buf, MADV_HUGEPAGE);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < READ_WORDS; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;
    return buf;
}

/* GB/s of reading the buffer with `threads` threads, best of 3: an XOR over 64-bit words
 * into eight independent accumulators, so that the loads, not the arithmetic, set the pace. */
static double read_bandwidth_gbs(const uint64_t *buf, int threads) {
    double best = 0;
    uint64_t sink = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = bench_now_ms();
        uint64_t x = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(^ : x)
        for (size_t i = 0; i < READ_WORDS; i += 8) {
            const uint64_t *p = buf + i;
            x ^= (p[0] ^ p[1]) ^ (p[2] ^ p[3]) ^ ((p[4] ^ p[5]) ^ (p[6] ^ p[7]));
        }
        double gbs = (double)(READ_WORDS * sizeof *buf) / ((bench_now_ms() - t0) / 1e3) / 1e9;
        sink ^= x;
        if (gbs > best) best = gbs;
    }
    read_sink = sink;
    return best;
}

/* The decode steps' matrix-vector products alone, for `tokens` tokens: every matrix of
 * every layer and the lm_head at m = 1, on the activations the last step left; what the
 * rest of a step (norms, RoPE, attention, the threads' meeting points) adds is the
 * difference. Milliseconds. */
static double matmuls_alone_ms(const dg_qwen2 *m, dg_qwen2_state *s, int tokens) {
    dg_backend *be = m->be;
    const double t0 = bench_now_ms();
    for (int i = 0; i < tokens; i++) {
        for (int l = 0; l < m->cfg.n_layers; l++) {
            const dg_qwen2_layer *L = &m->layers[l];
            be->matmul(be, s->q, s->h, &L->wq, NULL, 1);
            be->matmul(be, s->k, s->h, &L->wk, NULL, 1);
            be->matmul(be, s->v, s->h, &L->wv, NULL, 1);
            be->matmul(be, s->x, s->att, &L->wo, NULL, 1);
            be->matmul(be, s->gate, s->h, &L->w_gate, NULL, 1);
            be->matmul(be, s->up, s->h, &L->w_up, NULL, 1);
            be->matmul(be, s->x, s->gate, &L->w_down, NULL, 1);
        }
        be->matmul(be, s->dev_logits, s->h, &m->lm_head, NULL, 1);
    }
    return bench_now_ms() - t0;
}

/* GB/s of the lm_head's matrix-vector product alone (the largest matrix, one stream read
 * once: the GEMV's own rate, without the other products' starts and ends), best of 2. */
static double lm_head_gbs(const dg_qwen2 *m, dg_qwen2_state *s) {
    dg_backend *be = m->be;
    const double bytes = (double)m->lm_head.rows * (double)m->lm_head.cols * (double)dg_dtype_size(m->lm_head.dtype);
    double best = 0;
    for (int rep = 0; rep < 2; rep++) {
        const double t0 = bench_now_ms();
        be->matmul(be, s->dev_logits, s->h, &m->lm_head, NULL, 1);
        const double gbs = bytes / ((bench_now_ms() - t0) / 1e3) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

/* One of the decode's other ways (the KV in bf16, the screen): its tok/s over the rounds'
 * times t[] and its time over the plain decode's, ratio[] (the median of the rounds); the
 * keys are formats of the thread count. */
static void record_way(json_t *out, const char *tok_key, const char *ratio_key, int threads, const double *t,
                       double *ratio, int rounds, int n_decode) {
    char name[96];
    double sum = 0;
    for (int r = 0; r < rounds; r++) sum += t[r];
    snprintf(name, sizeof name, tok_key, threads);
    bench_record(out, name, n_decode / sum, "tok/s");
    snprintf(name, sizeof name, ratio_key, threads);
    bench_record_rounds(out, name, ratio, rounds, "x");
}

/* The token of the screened forward's one logits row (its bounds in s->lo, s->hi), greedy
 * or sampled, as the scheduler chooses it: from the bounds, the candidates' rows read in
 * full; else the row computed whole. *picked: the candidates' count added. -1 when the
 * bounds did not decide. */
typedef struct {
    const dg_qwen2 *m;
    dg_qwen2_state *s;
    long           *picked;
} screen_pick;

static void screen_pick_rows(void *user, const int32_t *ids, int n, float *out) {
    screen_pick *p = user;
    dg_qwen2_pick(p->m, p->s, 0, ids, n, out);
    *p->picked += n;
}

static int screen_choose(const dg_qwen2 *m, dg_qwen2_state *s, dg_sampler *sampler, long *picked) {
    screen_pick p = {m, s, picked};
    if (dg_sampler_sample_bounds(sampler, s->lo, s->hi, -1, screen_pick_rows, &p) >= 0) return 0;
    dg_qwen2_logits_row(m, s, 0);
    dg_sampler_sample_device(sampler, s->be, s->dev_logits, -1, s->logits);
    return -1;
}

#define PREFILL_ROUNDS 3
#define DECODE_ROUNDS 8

/* A baseline timed turn about with ours (bench.h bench_peer), its times and ratios a round. */
typedef struct {
    const char *who, *label; /* its name in messages; the figures' prefix ("llamacpp_...") */
    const char *cmd;         /* --llamacpp / --transformers CMD, or NULL */
    const char *flag;        /* the option that gives cmd */
    bench_peer  p;
    int         argmax;      /* the prompt's next token by its prefill */
    double      pre[PREFILL_ROUNDS], pre_ratio[PREFILL_ROUNDS];
    double      dec[DECODE_ROUNDS], dec_ratio[DECODE_ROUNDS], frac[DECODE_ROUNDS];
} baseline;

/* The baseline's figures beside ours (`name` in tok/s, `n` tokens in `rounds` rounds of
 * times t and ratios ratio); nothing when it has no co-process (bench_peer_outcome says why).
 * `tag` after the ratio's name: "" or "_ours_fp32". */
static void record_baseline(json_t *out, const baseline *b, const char *name, int n, const double *t, double *ratio,
                            int rounds, const char *tag) {
    char k2[160];
    if (!bench_peer_live(&b->p)) return;
    double sum = 0;
    for (int r = 0; r < rounds; r++) sum += t[r];
    snprintf(k2, sizeof k2, "%s_%s", b->label, name);
    bench_record(out, k2, n / sum, "tok/s");
    snprintf(k2, sizeof k2, "%s_vs_%s%s", name, b->label, tag);
    bench_record_rounds(out, k2, ratio, rounds, "x");
}

/* The figures of one thread count. Prefill: PREFILL_ROUNDS prompts each, ours and the
 * baseline's in turn. Decode: DECODE_ROUNDS rounds of n_decode / DECODE_ROUNDS tokens, each
 * round ours, the same tokens' matrix-vector products alone, the baseline's, and the read
 * bandwidth, the order of ours and the baseline's alternating. A ratio is the median of the
 * rounds' ratios, a fraction of the bandwidth limit the median of the rounds' fractions,
 * each against the bandwidth of its own round. */
static int run(bench_ctx *ctx, json_t *out, const char *dir, int threads, double rss_start) {
    const int n_prompt = ctx->quick ? 64 : 512, n_decode = ctx->quick ? 8 : 64;
    const int pre_rounds = ctx->quick ? 1 : PREFILL_ROUNDS, rounds = ctx->quick ? 2 : DECODE_ROUNDS;
    const int per = n_decode / rounds;
    dg_qwen2vl_config cfg;
    dg_backend *be = NULL;
    dg_st *st = NULL;
    dg_qwen2 m = {0};
    dg_qwen2_state *s = NULL;
    dg_kv_cache *kv = NULL, *kv16 = NULL, *kvs = NULL, *kvt = NULL;   /* fp32 (the default), bf16, the screen's two */
    dg_kv_seq seq = {0}, seq16 = {0}, seqs = {0}, seqt = {0};
    dg_sampler *greedy = NULL, *topk = NULL;
    baseline B[2] = {{.who = "llama.cpp", .label = "llamacpp", .cmd = ctx->llamacpp, .flag = "--llamacpp",
                      .p = {.pid = -1, .from = -1}, .argmax = -1},
                     {.who = "transformers", .label = "transformers", .cmd = ctx->transformers, .flag = "--transformers",
                      .p = {.pid = -1, .from = -1}, .argmax = -1}};
    const char *tag = ctx->bf16_compute ? "" : "_ours_fp32";
    uint64_t *bwbuf = NULL;
    int32_t *ids = NULL;
    char err[512], name[96], cmd[2200];
    int rc = -1;
    double ours_pre[PREFILL_ROUNDS];
    double ours_dec[DECODE_ROUNDS], alone[DECODE_ROUNDS], bw[DECODE_ROUNDS], dec16[DECODE_ROUNDS], ratio16[DECODE_ROUNDS];
    double frac[DECODE_ROUNDS], frac_alone[DECODE_ROUNDS], head[DECODE_ROUNDS], frac_head[DECODE_ROUNDS];
    double decs[DECODE_ROUNDS], ratios[DECODE_ROUNDS], frac_s[DECODE_ROUNDS], vs_s[2][DECODE_ROUNDS];
    double dect[DECODE_ROUNDS], ratiot[DECODE_ROUNDS];
    long picked = 0, undecided = 0, picked_t = 0, undecided_t = 0;
    for (int b = 0; b < 2; b++) {
        if (!B[b].cmd) continue;
        bench_peer_command(ctx, B[b].cmd, threads, 1, cmd, sizeof cmd);
        if (bench_peer_start(&B[b].p, cmd, err, sizeof err) < 0)
            fprintf(stderr, "bench_decoder: no %s baseline at %d threads: %s\n", B[b].who, threads, err);
        else if (B[b].p.n_prompt != n_prompt) {
            fprintf(stderr, "bench_decoder: the %s baseline's prompt is %d tokens, ours %d: not compared\n", B[b].who,
                    B[b].p.n_prompt, n_prompt);
            bench_peer_stop(&B[b].p);
            snprintf(B[b].p.why, sizeof B[b].p.why, "its prompt is %d tokens, ours %d", B[b].p.n_prompt, n_prompt);
        }
    }
    if (dg_config_load(dir, &cfg, err, sizeof err) < 0 ||
        bench_cpu_backend(ctx, threads, &be, err, sizeof err) < 0 ||
        dg_st_open_flags(dir, be->weights_hugepages ? DG_ST_HUGEPAGES : 0, NULL, NULL, &st, err, sizeof err) < 0 ||
        dg_qwen2_load(&m, &cfg.text, st, be, err, sizeof err) < 0 || dg_qwen2_screen(&m, 0, err, sizeof err) < 0 ||
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
    for (int r = 0; r < pre_rounds; r++) {
        for (int b = 0; b < 2 && r % 2; b++) B[b].pre[r] = bench_peer_turn(&B[b].p, B[b].who, "prefill", &B[b].argmax);
        dg_kv_seq_release(kv, &seq);
        double t0 = bench_now_ms();
        in = (dg_qwen2_input){.ids = ids, .n = n_prompt, .n_logits = 1};
        if (dg_qwen2_forward(&m, s, kv, &seq, &in, NULL, err, sizeof err) < 0) goto fail;
        ours_pre[r] = (bench_now_ms() - t0) / 1e3;
        for (int b = 0; b < 2 && !(r % 2); b++) B[b].pre[r] = bench_peer_turn(&B[b].p, B[b].who, "prefill", &B[b].argmax);
        for (int b = 0; b < 2; b++) B[b].pre_ratio[r] = B[b].pre[r] / ours_pre[r];
    }
    /* the prompt's next token: the reference scripts record theirs, so that the runs are
     * seen to compute the same model */
    int best = 0;
    for (int i = 1; i < cfg.text.vocab_size; i++) if (s->logits[i] > s->logits[best]) best = i;
    /* the memory the decoder holds, before the bandwidth's buffer adds its own */
    const double rss = status_mb("VmHWM");
    if (!(bwbuf = read_buffer(threads, be->weights_hugepages))) {
        snprintf(err, sizeof err, "no memory for the bandwidth's buffer");
        goto fail;
    }
    /* the same prompt into a bf16 KV cache (kv_bf16: half the bytes), decoded beside ours */
    if (dg_kv_cache_new(be, cfg.text.n_layers, cfg.text.n_kv_heads * cfg.text.head_dim, 16,
                        (n_prompt + n_decode) / 16 + 2, DG_DTYPE_BF16, &kv16, err, sizeof err) < 0 ||
        dg_kv_seq_init(&seq16, n_prompt + n_decode, 16) < 0)
        goto fail;
    in = (dg_qwen2_input){.ids = ids, .n = n_prompt, .n_logits = 1};
    if (dg_qwen2_forward(&m, s, kv16, &seq16, &in, NULL, err, sizeof err) < 0) goto fail;
    /* and into a third and a fourth (fp32) for the decode with the logit screen, greedy and top-k */
    const int ways = m.screen ? 4 : 2;
    if (!m.screen) printf("  no logit screen on this CPU (it pays with AVX-512 VNNI): no decode_screen figures\n");
    if (m.screen && (dg_kv_cache_new(be, cfg.text.n_layers, cfg.text.n_kv_heads * cfg.text.head_dim, 16,
                                     (n_prompt + n_decode) / 16 + 2, DG_DTYPE_F32, &kvs, err, sizeof err) < 0 ||
                     dg_kv_cache_new(be, cfg.text.n_layers, cfg.text.n_kv_heads * cfg.text.head_dim, 16,
                                     (n_prompt + n_decode) / 16 + 2, DG_DTYPE_F32, &kvt, err, sizeof err) < 0 ||
                     dg_kv_seq_init(&seqs, n_prompt + n_decode, 16) < 0 ||
                     dg_kv_seq_init(&seqt, n_prompt + n_decode, 16) < 0 ||
                     dg_sampler_new(cfg.text.vocab_size, &(dg_sampler_params){0}, &greedy, err, sizeof err) < 0 ||
                     dg_sampler_new(cfg.text.vocab_size,
                                    &(dg_sampler_params){.temperature = 1.0f, .top_k = 50, .top_p = 0.95f, .seed = 1},
                                    &topk, err, sizeof err) < 0 ||
                     dg_qwen2_forward(&m, s, kvs, &seqs, &in, NULL, err, sizeof err) < 0 ||
                     dg_qwen2_forward(&m, s, kvt, &seqt, &in, NULL, err, sizeof err) < 0))
        goto fail;
    const double bytes = decode_bytes_per_token(st, cfg.text.tie_word_embeddings);
    /* with the screen: the lm_head's int8 copy instead of the lm_head (its few rows read in
     * full are left out) */
    const double lm_head_bytes = (double)m.lm_head.rows * (double)m.lm_head.cols * (double)dg_dtype_size(m.lm_head.dtype),
                 copy_bytes = (double)m.lm_head.rows * (double)((m.lm_head.cols + 63) / 64 * 64),
                 screen_bytes = bytes - lm_head_bytes + copy_bytes;
    snprintf(cmd, sizeof cmd, "decode %d", per);
    for (int r = 0, k = 0; r < rounds; r++) {
        for (int b = 0; b < 2 && r % 2; b++) B[b].dec[r] = bench_peer_turn(&B[b].p, B[b].who, cmd, NULL);
        /* fp32 KV, bf16 KV, the screen greedy and top-k: the same tokens, in turn */
        dg_kv_cache *const kvw[4] = {kv, kv16, kvs, kvt};
        dg_kv_seq *const seqw[4] = {&seq, &seq16, &seqs, &seqt};
        double *const tw[4] = {&ours_dec[r], &dec16[r], &decs[r], &dect[r]};
        for (int way = 0; way < ways; way++) {
            const int which = (way + r) % ways;
            double t0 = bench_now_ms();
            for (int i = 0; i < per; i++) {
                in = (dg_qwen2_input){.ids = &ids[(k + i) % n_prompt], .n = 1, .n_logits = 1, .bounds = which >= 2};
                if (dg_qwen2_forward(&m, s, kvw[which], seqw[which], &in, NULL, err, sizeof err) < 0) goto fail;
                if (which == 2 && screen_choose(&m, s, greedy, &picked) < 0) undecided++;
                if (which == 3 && screen_choose(&m, s, topk, &picked_t) < 0) undecided_t++;
            }
            *tw[which] = (bench_now_ms() - t0) / 1e3;
        }
        k += per;
        ratio16[r] = dec16[r] / ours_dec[r];
        if (m.screen) ratios[r] = decs[r] / ours_dec[r], ratiot[r] = dect[r] / ours_dec[r];
        alone[r] = matmuls_alone_ms(&m, s, per) / 1e3;
        head[r] = lm_head_gbs(&m, s);
        for (int b = 0; b < 2 && !(r % 2); b++) B[b].dec[r] = bench_peer_turn(&B[b].p, B[b].who, cmd, NULL);
        bw[r] = read_bandwidth_gbs(bwbuf, threads);
        const double limit = bw[r] * 1e9 / bytes;   /* tokens a second the bandwidth allows */
        frac[r] = per / ours_dec[r] / limit;
        frac_alone[r] = per / alone[r] / limit;
        frac_head[r] = head[r] / bw[r];
        if (m.screen) frac_s[r] = per / decs[r] / (bw[r] * 1e9 / screen_bytes);
        for (int b = 0; b < 2; b++) {
            B[b].frac[r] = B[b].dec[r] > 0 ? per / B[b].dec[r] / limit : 0;
            B[b].dec_ratio[r] = B[b].dec[r] / ours_dec[r];
            if (m.screen) vs_s[b][r] = B[b].dec[r] / decs[r];
        }
    }
    double sum_pre = 0, sum_dec = 0, sum_alone = 0;
    for (int r = 0; r < pre_rounds; r++) sum_pre += ours_pre[r];
    for (int r = 0; r < rounds; r++) sum_dec += ours_dec[r], sum_alone += alone[r];

    const double pre_tok_s = pre_rounds * n_prompt / sum_pre, dec_tok_s = n_decode / sum_dec;
    for (int b = 0; b < 2; b++) bench_peer_announce(&B[b].p, out, B[b].who, B[b].label);
    snprintf(name, sizeof name, "prefill_%d_tok_s_t%d", n_prompt, threads);
    bench_record(out, name, pre_tok_s, "tok/s");
    for (int b = 0; b < 2; b++)
        record_baseline(out, &B[b], name, pre_rounds * n_prompt, B[b].pre, B[b].pre_ratio, pre_rounds, tag);
    snprintf(name, sizeof name, "decode_tok_s_t%d", threads);
    bench_record(out, name, dec_tok_s, "tok/s");
    for (int b = 0; b < 2; b++) {
        record_baseline(out, &B[b], name, n_decode, B[b].dec, B[b].dec_ratio, rounds, tag);
        if (!bench_peer_live(&B[b].p)) continue;
        char k2[160];
        snprintf(k2, sizeof k2, "%s_decode_fraction_of_bandwidth_limit_t%d", B[b].label, threads);
        bench_record(out, k2, bench_median(B[b].frac, rounds), "(of 1)");
        snprintf(k2, sizeof k2, "%s_prefill_argmax", B[b].label);
        bench_record(out, k2, B[b].argmax, "(token id)");
        snprintf(k2, sizeof k2, "%s_same_argmax", B[b].label);
        bench_record(out, k2, B[b].argmax == best, B[b].argmax == best ? "(the same model)" : "(NOT ours: another model?)");
        if (B[b].argmax != best)
            fprintf(stderr, "bench_decoder: the %s baseline's next token after the prompt is %d, ours %d: are they "
                    "the same weights?\n", B[b].who, B[b].argmax, best);
    }
    bench_record(out, "prefill_argmax", best, "(token id)");
    snprintf(name, sizeof name, "read_bandwidth_gbs_t%d", threads);
    bench_record_rounds(out, name, bw, rounds, "GB/s");
    bench_record(out, "decode_bytes_per_token_mb", bytes / 1e6, "MB");
    snprintf(name, sizeof name, "decode_fraction_of_bandwidth_limit_t%d", threads);
    bench_record(out, name, bench_median(frac, rounds), "(of 1)");
    record_way(out, "decode_tok_s_t%d_kv_bf16", "decode_kv_bf16_time_over_fp32_t%d", threads, dec16, ratio16, rounds,
               n_decode);
    if (m.screen) {
        record_way(out, "decode_screen_tok_s_t%d", "decode_screen_time_over_full_t%d", threads, decs, ratios, rounds,
                   n_decode);
        bench_record(out, "decode_screen_bytes_per_token_mb", screen_bytes / 1e6, "MB");
        snprintf(name, sizeof name, "decode_screen_fraction_of_bandwidth_limit_t%d", threads);
        bench_record(out, name, bench_median(frac_s, rounds), "(of 1)");
        for (int b = 0; b < 2; b++)
            if (bench_peer_live(&B[b].p)) {
                snprintf(name, sizeof name, "decode_screen_tok_s_t%d_vs_%s%s", threads, B[b].label, tag);
                bench_record_rounds(out, name, vs_s[b], rounds, "x");
            }
        snprintf(name, sizeof name, "decode_screen_rows_read_per_token_t%d", threads);
        bench_record(out, name, (double)picked / (n_decode - undecided > 0 ? n_decode - undecided : 1), "rows");
        snprintf(name, sizeof name, "decode_screen_undecided_tokens_t%d", threads);
        bench_record(out, name, (double)undecided, "tokens");
        record_way(out, "decode_screen_topk50_tok_s_t%d", "decode_screen_topk50_time_over_full_t%d", threads, dect,
                   ratiot, rounds, n_decode);
        snprintf(name, sizeof name, "decode_screen_topk50_rows_read_per_token_t%d", threads);
        bench_record(out, name, (double)picked_t / (n_decode - undecided_t > 0 ? n_decode - undecided_t : 1), "rows");
        snprintf(name, sizeof name, "decode_screen_topk50_undecided_tokens_t%d", threads);
        bench_record(out, name, (double)undecided_t, "tokens");
        bench_record(out, "logit_screen_mb", copy_bytes / 1048576.0, "MiB");
    }
    snprintf(name, sizeof name, "decode_matmuls_ms_per_token_t%d", threads);
    bench_record(out, name, sum_alone * 1e3 / n_decode, "ms");
    snprintf(name, sizeof name, "decode_matmuls_share_of_step_t%d", threads);
    bench_record(out, name, sum_alone / sum_dec, "(of 1)");
    snprintf(name, sizeof name, "decode_matmuls_fraction_of_bandwidth_limit_t%d", threads);
    bench_record(out, name, bench_median(frac_alone, rounds), "(of 1)");
    snprintf(name, sizeof name, "decode_lm_head_read_gbs_t%d", threads);
    bench_record_rounds(out, name, head, rounds, "GB/s");
    snprintf(name, sizeof name, "decode_lm_head_fraction_of_read_bandwidth_t%d", threads);
    bench_record(out, name, bench_median(frac_head, rounds), "(of 1)");
    double w = text_weight_mb(st);
    bench_record(out, "text_weights_mb", w, "MiB");
    snprintf(name, sizeof name, "peak_rss_mb_t%d", threads);
    bench_record(out, name, rss, "MiB");
    snprintf(name, sizeof name, "peak_rss_over_weights_t%d", threads);
    bench_record(out, name, rss / w, "x");
    bench_record(out, "rss_before_open_mb", rss_start, "MiB");
    snprintf(name, sizeof name, "peak_rss_minus_before_open_over_weights_t%d", threads);
    bench_record(out, name, (rss - rss_start) / w, "x");
    for (int b = 0; b < 2; b++) {
        snprintf(name, sizeof name, "_t%d", threads);
        bench_peer_outcome(&B[b].p, out, B[b].who, B[b].label, B[b].flag, name);
    }
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "bench_decoder: %s\n", err);
out:
    for (int b = 0; b < 2; b++) bench_peer_stop(&B[b].p);
    if (bwbuf) munmap(bwbuf, READ_WORDS * sizeof *bwbuf);
    free(ids);
    if (kv) dg_kv_seq_release(kv, &seq);
    if (kv16) dg_kv_seq_release(kv16, &seq16);
    dg_kv_seq_free(&seq);
    dg_kv_seq_free(&seq16);
    dg_kv_cache_free(kv);
    dg_kv_cache_free(kv16);
    if (kvs) dg_kv_seq_release(kvs, &seqs);
    dg_kv_seq_free(&seqs);
    dg_kv_cache_free(kvs);
    if (kvt) dg_kv_seq_release(kvt, &seqt);
    dg_kv_seq_free(&seqt);
    dg_kv_cache_free(kvt);
    dg_sampler_free(greedy);
    dg_sampler_free(topk);
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
    const double rss_start = status_mb("VmRSS");
    if (ctx->threads > 0) return run(ctx, out, dir, ctx->threads, rss_start);
    for (int t = 1; t <= 2; t++) {
        reset_peak_rss();
        if (run(ctx, out, dir, t, rss_start) < 0) return -1;
    }
    return 0;
}

DG_BENCH(decoder, "Qwen2.5-VL text decoder, small preset: prefill and decode tok/s, peak RSS", bench_decoder)
