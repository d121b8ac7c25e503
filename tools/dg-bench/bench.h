/* dg-bench: each benchmark registers itself with DG_BENCH(name, fn) in its own file under
 * tools/dg-bench/, and main.c runs the ones named on the command line (all by default).
 *
 * A benchmark prints its figures on stdout, one line each, and adds them to the JSON
 * report with bench_record(). No benchmark asserts a time. */
#ifndef DG_BENCH_H
#define DG_BENCH_H

#include <jansson.h>

#include "backend.h"
#include "duogen.h"

typedef struct {
    int         threads;        /* --threads N (0 = the benchmark's default) */
    const char *model_dir;      /* --model DIR, or NULL */
    const char *vocab_dir;      /* --vocab DIR, or NULL */
    int         quick;          /* --quick: smaller sizes, for a smoke run */
    int         bf16_compute;   /* --bf16-compute: the CPU backends in the bf16 compute order
                                   (kernels/cpu/matmul.h), else fp32 */
    int         mapped_weights; /* --mapped-weights: weights read from the files' maps
                                   (dg_backend_opts.cpu_mapped_weights), not huge pages */
    const char *llamacpp;       /* --llamacpp CMD: llama.cpp's baseline as a co-process
                                   (tools/reference/bench_llamacpp.py --serve), which the
                                   decoder benchmark runs turn about with ours; or NULL */
    const char *transformers;   /* --transformers CMD: the transformers baseline as a co-process
                                   for the vision benchmark (bench_transformers_vision.py
                                   --serve) or the decoder's (bench_transformers_decoder.py
                                   --serve), likewise; or NULL */
    const char *diffusers;      /* --diffusers CMD: the diffusers baseline as a co-process
                                   (bench_diffusers.py --serve) for the image benchmark's DiT
                                   steps and VAE, likewise; or NULL */
    json_t     *report;         /* object: benchmark name -> object of figures */
} bench_ctx;

typedef int (*bench_fn)(bench_ctx *ctx, json_t *out);   /* 0 or a negative error */

void   bench_register(const char *name, const char *what, bench_fn fn);
double bench_now_ms(void);   /* monotonic clock */

/* The package the benchmarks run on: --model DIR, else build/models/small, written by
 * build/mkmodel --preset small --seed 1 (with the Qwen2 vocabulary, or --vocab DIR) when it
 * is missing or lacks a component. 0 or -1. */
int    bench_small_package(bench_ctx *ctx, char *dir, size_t len);

/* Records one figure under the benchmark's JSON object and prints "name: value unit"; a
 * value that is not finite (a division by a zero count) is null in the report and "n/a". */
void   bench_record(json_t *out, const char *name, double value, const char *unit);

/* The median of v[0..n), n >= 1, sorting v in place (v[0] and v[n-1] are then the range). */
double bench_median(double *v, int n);

/* Records the median of v[0..n) as `key` (`unit`, "(median of the rounds)" added) and the
 * range as "<key>_min" and "<key>_max" (sorting v). */
void   bench_record_rounds(json_t *out, const char *key, double *v, int n, const char *unit);

/* The arithmetic limit of `threads` threads running at once, GFLOP/s: VDPBF16PS (bf16 != 0;
 * 64 flop an instruction) or VFMADD231PS (32) on zmm registers, 12 independent chains a
 * thread, no loads; the best of 3 runs of ~0.3 s (peak.c). 0 where the CPU lacks the
 * instruction. What a compute-bound benchmark prints its rate against. */
double bench_peak_gflops(int threads, int bf16);
/* bench_peak_gflops(threads, bf16), recorded as "peak_gflops_t<threads>" (not recorded, "n/a"
 * printed, where it is 0); returns it. */
double bench_record_peak(json_t *out, int threads, int bf16);
/* Records an arithmetic rate as "<key>_gflops" and, when peak > 0, as the fraction of it
 * "<key>_of_peak". */
void   bench_record_rate(json_t *out, const char *key, double gflops, double peak);

/* A baseline's command line: `base` (--llamacpp/--transformers/--diffusers CMD) with
 * " --threads N" (threads > 0), " --quick" (quick and --quick) and " --model DIR" (--model
 * given: the baseline runs the same package as ours, not its default small one). */
void   bench_peer_command(const bench_ctx *ctx, const char *base, int threads, int quick, char *out, size_t len);

/* A "cpu" backend of `threads` threads in the compute --bf16-compute chose: 0, or a
 * negative DG_E* with err. */
int    bench_cpu_backend(const bench_ctx *ctx, int threads, dg_backend **out, char *err, size_t errlen);
/* Records which compute the benchmark ran, as the figure "bf16_compute" (1: the bf16 compute
 * order, 0: fp32), for every benchmark whose matmuls it changes. */
void   bench_record_compute(const bench_ctx *ctx, json_t *out);

/* A baseline as a co-process (tools/reference/bench_llamacpp.py --serve), so that ours and
 * it are timed turn about, seconds apart, in one run: this host's memory bandwidth moves
 * between ~20 and ~65 GB/s on two threads from one minute to the next, and a figure taken
 * minutes after the other's compares two machines. bench_peer_start runs `cmd` through
 * /bin/sh with pipes on its stdin and stdout and reads its first line, a JSON object naming
 * the baseline ("baseline", "n_prompt"); each bench_peer_ask sends one command line and reads
 * one JSON object back (the caller's to json_decref). A reply {"error": ...}, a peer that
 * exits or says nothing for 300 s: NULL with err. */
typedef struct {
    int   pid, from, len;
    FILE *to;
    char  buf[4096];        /* what the peer wrote past the last line read */
    char  baseline[200];    /* its "baseline": name, version, dtype */
    int   n_prompt;         /* its prompt's length */
    char  why[400];         /* why it is not live: it did not start, or it dropped (kept by
                               bench_peer_stop) */
} bench_peer;

int     bench_peer_start(bench_peer *p, const char *cmd, char *err, size_t errlen);   /* 0 or -1 */
json_t *bench_peer_ask(bench_peer *p, const char *line, char *err, size_t errlen);
void    bench_peer_stop(bench_peer *p);   /* "quit", then waits for it; nothing if never started */
static inline int bench_peer_live(const bench_peer *p) { return p->pid > 0; }
/* The peer's turn: sends `cmd` and returns the seconds its reply reports ("s"; its "argmax"
 * into *argmax when that is not NULL). A peer that fails is stopped, with a message naming
 * it (`who`), and is no longer live, so that our figures go on without it: 0, as when it
 * is not live. */
double  bench_peer_turn(bench_peer *p, const char *who, const char *cmd, int *argmax);
/* A live peer's name, version and dtype recorded as "<label>_baseline" and printed, naming
 * it `who`; nothing when it is not live. */
void    bench_peer_announce(const bench_peer *p, json_t *out, const char *who, const char *label);
/* What became of a baseline, at the end of a benchmark (`suffix` after the keys: "" or a
 * thread count's "_t2"): nothing more when it is live (bench_peer_announce named it); else,
 * printed and recorded, "<label>_baseline_missing<suffix>": why this run has no figures of
 * it, or fewer: no command given (`flag`, the option that gives one), it did not start, or
 * it dropped part-way (the figures after that are ours alone). A baseline is only ever
 * compared in the run that timed it, turn about with ours: never from an earlier run's file. */
void    bench_peer_outcome(const bench_peer *p, json_t *out, const char *who, const char *label, const char *flag,
                           const char *suffix);

/* What a job told its sink: its text (the first 4095 bytes), images, usage and timings,
 * when its first BENCH_OBS_IMAGES images started and took their last step, and how it
 * ended. */
#define BENCH_OBS_IMAGES 8
typedef struct {
    int        done, failed, code, images;
    double     start_ms[BENCH_OBS_IMAGES], last_step_ms[BENCH_OBS_IMAGES], done_ms;
    size_t     len;
    char       text[4096];
    dg_usage   usage;
    dg_timings t;
    char       message[512];
} bench_obs;

/* A sink that records into o (zeroed here). */
dg_sink bench_obs_sink(bench_obs *o);

#define DG_BENCH(name, what, fn)                                                   \
    __attribute__((constructor)) static void bench_register_##name(void) {         \
        bench_register(#name, what, fn);                                           \
    }

#endif
