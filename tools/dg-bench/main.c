/* dg-bench — the engine's benchmarks.
 *
 *   dg-bench [--json FILE] [--threads N] [--model DIR] [--vocab DIR] [--quick] [--bf16-compute]
 *            [--mapped-weights] [--llamacpp CMD] [--transformers CMD] [--diffusers CMD]
 *            [NAME...]
 *   dg-bench --list
 */
#include "bench.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BENCH_MAX 64

static struct bench_entry { const char *name, *what; bench_fn fn; } benches[BENCH_MAX];
static int n_benches;

void bench_register(const char *name, const char *what, bench_fn fn) {
    if (n_benches < BENCH_MAX) benches[n_benches++] = (struct bench_entry){name, what, fn};
}

double bench_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

void bench_record(json_t *out, const char *name, double value, const char *unit) {
    if (!isfinite(value)) {   /* JSON has no NaN or infinity (jansson refuses them): null, said so */
        json_object_set_new(out, name, json_null());
        printf("  %-44s %12s %s (not a number: %g; null in the report)\n", name, "n/a", unit, value);
    } else {
        json_object_set_new(out, name, json_real(value));
        printf("  %-44s %12.3f %s\n", name, value, unit);
    }
    fflush(stdout);
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bench_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, by_value);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void bench_record_rate(json_t *out, const char *key, double gflops, double peak) {
    char name[160];
    snprintf(name, sizeof name, "%s_gflops", key);
    bench_record(out, name, gflops, "GFLOP/s");
    if (peak <= 0) return;
    snprintf(name, sizeof name, "%s_of_peak", key);
    bench_record(out, name, gflops / peak, "(of the instruction's limit)");
}

void bench_record_rounds(json_t *out, const char *key, double *v, int n, const char *unit) {
    char name[160], u[96];
    snprintf(u, sizeof u, "%s (median of the rounds)", unit);
    bench_record(out, key, bench_median(v, n), u);
    snprintf(name, sizeof name, "%s_min", key);
    bench_record(out, name, v[0], unit);
    snprintf(name, sizeof name, "%s_max", key);
    bench_record(out, name, v[n - 1], unit);
}

void bench_peer_command(const bench_ctx *ctx, const char *base, int threads, int quick, char *out, size_t len) {
    size_t n = (size_t)snprintf(out, len, "%s", base);
    if (threads > 0 && n < len) n += (size_t)snprintf(out + n, len - n, " --threads %d", threads);
    if (quick && ctx->quick && n < len) n += (size_t)snprintf(out + n, len - n, " --quick");
    if (!ctx->model_dir || n >= len) return;
    n += (size_t)snprintf(out + n, len - n, " --model '");   /* the folder in single quotes, for /bin/sh */
    for (const char *c = ctx->model_dir; *c && n + 5 < len; c++) {
        if (*c == '\'') n += (size_t)snprintf(out + n, len - n, "'\\''");
        else out[n++] = *c;
    }
    if (n + 2 <= len) out[n++] = '\'', out[n] = 0;
}

int bench_cpu_backend(const bench_ctx *ctx, int threads, dg_backend **out, char *err, size_t errlen) {
    return dg_backend_new_opts("cpu",
                               &(dg_backend_opts){.n_threads = threads, .cpu_bf16_compute = ctx->bf16_compute,
                                                  .cpu_mapped_weights = ctx->mapped_weights},
                               out, err, errlen);
}

void bench_record_compute(const bench_ctx *ctx, json_t *out) {
    bench_record(out, "bf16_compute", ctx->bf16_compute, ctx->bf16_compute ? "(bf16 compute)" : "(fp32 compute)");
    bench_record(out, "mapped_weights", ctx->mapped_weights,
                 ctx->mapped_weights ? "(weights read from the file maps)" : "(weights in huge pages)");
}

int bench_small_package(bench_ctx *ctx, char *dir, size_t len) {
    static const char *pkg = "build/models/small";
    if (ctx->model_dir) {
        snprintf(dir, len, "%s", ctx->model_dir);
        return 0;
    }
    snprintf(dir, len, "%s", pkg);
    if (access("build/models/small/duogen.json", R_OK) == 0 && access("build/models/small/dit/config.json", R_OK) == 0)
        return 0;
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p build/models && build/mkmodel --preset small --seed 1 --out %s%s%s",
             pkg, pkg, ctx->vocab_dir ? " --vocab " : "", ctx->vocab_dir ? ctx->vocab_dir : "");
    printf("  creating %s: %s\n", pkg, cmd);
    return system(cmd) == 0 ? 0 : -1;
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const struct bench_entry *)a)->name, ((const struct bench_entry *)b)->name);
}

/* The usage: asked for (--help), on standard output and exit 0; else on standard error, 2. */
static int usage(int asked) {
    fprintf(asked ? stdout : stderr, "usage: dg-bench [--json FILE] [--threads N] [--model DIR] [--vocab DIR] "
                    "[--quick] [--bf16-compute] [--mapped-weights] [--llamacpp CMD] [--transformers CMD] [--diffusers CMD] "
                    "[--list] [NAME...]\n");
    return asked ? 0 : 2;
}

int main(int argc, char **argv) {
    bench_ctx ctx = {0};
    const char *json_path = NULL;
    const char *names[BENCH_MAX];
    int n_names = 0;

    qsort(benches, (size_t)n_benches, sizeof benches[0], by_name);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return usage(1);
        if (!strcmp(a, "--json") && i + 1 < argc) json_path = argv[++i];
        else if (!strcmp(a, "--threads") && i + 1 < argc) ctx.threads = atoi(argv[++i]);
        else if (!strcmp(a, "--model") && i + 1 < argc) ctx.model_dir = argv[++i];
        else if (!strcmp(a, "--vocab") && i + 1 < argc) ctx.vocab_dir = argv[++i];
        else if (!strcmp(a, "--quick")) ctx.quick = 1;
        else if (!strcmp(a, "--bf16-compute")) ctx.bf16_compute = 1;
        else if (!strcmp(a, "--mapped-weights")) ctx.mapped_weights = 1;
        else if (!strcmp(a, "--llamacpp") && i + 1 < argc) ctx.llamacpp = argv[++i];
        else if (!strcmp(a, "--transformers") && i + 1 < argc) ctx.transformers = argv[++i];
        else if (!strcmp(a, "--diffusers") && i + 1 < argc) ctx.diffusers = argv[++i];
        else if (!strcmp(a, "--list")) {
            for (int b = 0; b < n_benches; b++) printf("%-20s %s\n", benches[b].name, benches[b].what);
            return 0;
        } else if (a[0] == '-') return usage(0);
        else if (n_names < BENCH_MAX) names[n_names++] = a;
    }
    for (int k = 0; k < n_names; k++) {   /* a mistyped name runs nothing: said before anything runs */
        int known = 0;
        for (int b = 0; b < n_benches && !known; b++) known = !strcmp(names[k], benches[b].name);
        if (!known) {
            fprintf(stderr, "dg-bench: unknown benchmark \"%s\" (dg-bench --list names them)\n", names[k]);
            return 2;
        }
    }

    ctx.report = json_object();
    int failed = 0;
    for (int b = 0; b < n_benches; b++) {
        int wanted = n_names == 0;
        for (int k = 0; k < n_names; k++) wanted |= !strcmp(names[k], benches[b].name);
        if (!wanted) continue;
        printf("%s: %s\n", benches[b].name, benches[b].what);
        json_t *out = json_object();
        int rc = benches[b].fn(&ctx, out);
        if (rc < 0) {
            fprintf(stderr, "dg-bench: %s failed (%d)\n", benches[b].name, rc);
            failed++;
        }
        json_object_set_new(ctx.report, benches[b].name, out);
    }
    if (json_path && json_dump_file(ctx.report, json_path, JSON_INDENT(2) | JSON_SORT_KEYS) != 0) {
        fprintf(stderr, "dg-bench: cannot write \"%s\"\n", json_path);
        failed++;
    }
    json_decref(ctx.report);
    return failed ? 1 : 0;
}
