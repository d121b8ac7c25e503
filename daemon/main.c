/* duogend — the duogen worker daemon.
 *
 *   duogend [--config FILE] [--redis URL] [--model DIR] [--device cpu|cuda:N] [--KEY VALUE]...
 *   duogend --help                 every setting (daemon_config.c's table) with its default
 *   duogend --man 8 | --man 5      (hidden) duogend(8) or duogend.conf(5) in roff, from that table
 *
 * Exit status: 0 after a clean stop; 75 when the engine failed (systemd restarts it);
 * 78 for a configuration problem, a model that cannot be opened, or Redis refusing our
 * credentials or commands (RestartPreventExitStatus=78 keeps systemd from looping). */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon_config.h"
#include "duogen.h"
#include "log.h"
#include "manpage.h"
#include "notify.h"
#include "redis.h"
#include "worker.h"


static volatile sig_atomic_t stop_requested;

static void on_signal(int sig) {
    (void)sig;
    if (stop_requested < 2) stop_requested++;   /* the second signal: stop now */
}

/* SIGHUP (and SIGUSR1/2), which operators send daemons to reload, killed the worker
 * mid-job with nothing logged. The settings are read at start only: the signal is said and
 * ignored (write(2): the one output a handler may make). */
static void on_ignored_signal(int sig) {
    static const char hup[] = "duogend: SIGHUP ignored: the settings are read at start; restart the worker "
                              "to change them (SIGTERM stops it, draining its jobs)\n";
    static const char usr[] = "duogend: SIGUSR1/SIGUSR2 ignored\n";
    const int saved = errno;
    ssize_t n = sig == SIGHUP ? write(STDERR_FILENO, hup, sizeof hup - 1) : write(STDERR_FILENO, usr, sizeof usr - 1);
    (void)n;
    errno = saved;
}

static void usage(FILE *out) {
    fprintf(out, "usage: duogend [--config FILE] [--SETTING VALUE]...\n\n");
    dg_daemon_config_usage(out);
}

/* While the model loads: a STATUS= line and EXTEND_TIMEOUT_USEC= so that systemd's start
 * timeout follows the load instead of cutting it. */
static void on_load_progress(void *user, const char *phase, double fraction) {
    (void)user;
    dg_notify_status("loading model: %s %.0f%%", phase, fraction * 100);
    dg_notify_extend(30u * 1000000u);
}

int main(int argc, char **argv) {
    dg_daemon_config cfg;
    char err[1024];
    dg_daemon_config_defaults(&cfg);
    dg_log_init();
    dg_notify_init();

    /* --config first, so that the other options override the file */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--man")) {   /* hidden: the build writes the manual pages with it */
            if (i + 1 >= argc || dg_man_duogend(stdout, argv[i + 1])) {
                fprintf(stderr, "duogend: --man 8 (duogend) or --man 5 (duogend.conf)\n");
                return EX_CONFIG;
            }
            return fflush(stdout) ? EX_CONFIG : 0;
        }
        if (!strcmp(argv[i], "--config") && i + 1 >= argc) {   /* not a worker on the defaults */
            fprintf(stderr, "duogend: --config needs a file\n");
            return EX_CONFIG;
        }
        if (!strcmp(argv[i], "--config") && dg_daemon_config_load(&cfg, argv[i + 1], err, sizeof err)) {
            fprintf(stderr, "duogend: %s\n", err);
            return EX_CONFIG;
        }
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--config")) { i++; continue; }
        /* one line that names the mistake (the journal keeps it), not the whole usage */
        if (strncmp(a, "--", 2)) {
            fprintf(stderr, "duogend: unexpected argument \"%s\" (a setting is --name value; duogend --help "
                    "lists them)\n", a);
            return EX_CONFIG;
        }
        const char *key = strcmp(a, "--redis") ? a : "--redis-url";
        if (i + 1 >= argc) {
            if (dg_daemon_config_set(&cfg, key, "", err, sizeof err) && strstr(err, "unknown option"))
                fprintf(stderr, "duogend: %s\n", err);
            else fprintf(stderr, "duogend: %s needs a value\n", a);
            return EX_CONFIG;
        }
        if (dg_daemon_config_set(&cfg, key, argv[++i], err, sizeof err)) {
            fprintf(stderr, "duogend: %s\n", err);
            return EX_CONFIG;
        }
    }
    if (dg_daemon_config_finish(&cfg, err, sizeof err)) {
        fprintf(stderr, "duogend: %s\n", err);
        return EX_CONFIG;
    }
    dg_log_level = dg_log_parse_level(cfg.log_level);
    srand((unsigned)time(NULL) ^ (unsigned)getpid());

    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_ignored_signal;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    char url[600];   /* never a password the URL holds */
    dg_redis_url_redact(cfg.redis_url, url, sizeof url);
    log_info("worker \"%s\" starting: model \"%s\" on %s, Redis %s, prefix \"%s\", group \"%s\"",
             cfg.worker_id, cfg.model, cfg.device, cfg.sentinel[0] ? cfg.sentinel : url, cfg.prefix, cfg.group);
    /* the Redis settings and the metrics first: a bad URL, an unreadable password file or a
     * port that cannot be bound fails the start (not a worker minutes later, after its
     * load), and a loading worker answers its scrapes */
    dg_worker w;
    if (dg_worker_prepare(&w, &cfg, &stop_requested, err, sizeof err) ||
        (cfg.metrics_port && dg_metrics_start(&w, err, sizeof err))) {
        log_error("%s", err);
        dg_notify_phase("failed: %s", err);
        dg_worker_free(&w);
        return EX_CONFIG;
    }
    dg_notify_phase("loading model %s", cfg.model);
    dg_notify_extend(30u * 1000000u);

    dg_model *model = NULL;
    dg_model_opts mo = {.device = cfg.device, .threads = cfg.threads, .device_memory = cfg.gpu_memory,
                        .cpu_bf16_compute = cfg.cpu_bf16_compute,
                        .cpu_mapped_weights = cfg.cpu_mapped_weights,
                        .logit_screen = cfg.logit_screen, .progress = on_load_progress};
    int rc = dg_model_open(cfg.model, &mo, &model, err, sizeof err);
    if (rc) {
        log_error("cannot open the model: %s", err);
        dg_notify_phase("failed: %s", err);
        dg_worker_free(&w);
        return dg_error_class(rc) == DG_ERROR_RETRYABLE || rc == DG_EDEVICE ? EX_TEMPFAIL : EX_CONFIG;
    }
    log_info("model loaded: %s", dg_model_describe(model));

    rc = dg_worker_init(&w, model, err, sizeof err);
    if (rc) {
        log_error("%s", err);
        dg_notify_phase("failed: %s", err);
        dg_worker_free(&w);
        dg_model_close(model);
        return rc == DG_EDEVICE || dg_error_class(rc) == DG_ERROR_RETRYABLE ? EX_TEMPFAIL : EX_CONFIG;
    }
    if (cfg.warmup && !stop_requested) {
        dg_notify_phase("warming up");
        dg_worker_state(&w, "warming up");
        dg_notify_extend(120u * 1000000u);
        const int64_t t0 = dg_now_ms();
        dg_usage u;
        if ((rc = dg_sched_warmup(w.sched, &u, err, sizeof err)) < 0) {
            log_error("%s", err);
            dg_notify_phase("failed: %s", err);
            dg_worker_free(&w);
            dg_model_close(model);
            return rc == DG_EDEVICE || dg_error_class(rc) == DG_ERROR_RETRYABLE ? EX_TEMPFAIL : EX_CONFIG;
        }
        log_info("warm-up: %lld prompt tokens, %lld generated, %lld picture(s) in %lld ms",
                 (long long)u.prompt_tokens, (long long)u.generated_tokens, (long long)u.images,
                 (long long)(dg_now_ms() - t0));
    }
    dg_worker_state(&w, "idle");
    dg_notify_ready("idle");
    log_info("ready");

    int code = stop_requested ? 0 : dg_worker_run(&w);
    dg_notify_stopping("stopped");
    log_info("stopped (exit %d)", code);
    dg_worker_free(&w);
    dg_model_close(model);
    return code;
}
