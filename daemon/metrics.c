/* Prometheus metrics in the text exposition format, served on metrics_address:metrics_port by
 * a thread of its own (GET any path, HEAD; one response per connection, connections side by
 * side). The figures come from
 * the worker's stats under its lock; nothing here touches Redis or the engine. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "log.h"
#include "worker.h"

typedef struct {
    char  *buf;
    size_t len, cap;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        t->cap = t->cap * 2 + (size_t)(n > 0 ? n : 0) + 256;
        t->buf = realloc(t->buf, t->cap);
        if (!t->buf) abort();
    }
}

static void metric(text *t, const char *name, const char *type, const char *help) {
    put(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value as the exposition format writes it: backslash, double quote and line feed
 * escaped (a worker id or a key prefix may hold any of them). */
static void escape_label(char *out, size_t cap, const char *v) {
    size_t n = 0;
    for (; *v && n + 3 < cap; v++) {
        if (*v == '\\' || *v == '"') out[n++] = '\\', out[n++] = *v;
        else if (*v == '\n') out[n++] = '\\', out[n++] = 'n';
        else out[n++] = *v;
    }
    out[n] = 0;
}

/* Every family's HELP and TYPE, then all its samples: a family's samples are together, after
 * its TYPE line, as the format asks (one metric family at a time). */
static void render(dg_worker *w, text *t) {
    dg_worker_stats s;
    pthread_mutex_lock(&w->lock);
    s = w->stats;
    pthread_mutex_unlock(&w->lock);
    char wid[2 * sizeof w->cfg->worker_id], stream[2][2 * sizeof w->keys.streams[0]];
    escape_label(wid, sizeof wid, w->cfg->worker_id);
    for (int i = 0; i < 2; i++) escape_label(stream[i], sizeof stream[i], w->keys.streams[i]);

    metric(t, "duogen_jobs_total", "counter", "Jobs finished by this worker, by outcome.");
    struct { const char *outcome; int64_t n; } outcomes[] = {
        {"done", s.jobs_done}, {"failed", s.jobs_failed}, {"cancelled", s.jobs_cancelled},
        {"expired", s.jobs_expired}, {"dead_lettered", s.jobs_dead}, {"skipped_existing_result", s.jobs_skipped},
    };
    for (size_t i = 0; i < sizeof outcomes / sizeof outcomes[0]; i++)
        put(t, "duogen_jobs_total{worker=\"%s\",outcome=\"%s\"} %lld\n", wid, outcomes[i].outcome,
            (long long)outcomes[i].n);

    metric(t, "duogen_phase_seconds", "summary",
           "Time spent per phase over ended jobs: queue and total over every job that ran, the engine's "
           "phases over the jobs it finished (a failed run's engine times are not known).");
    struct { const char *phase; double sec; int64_t jobs; } phases[] = {
        {"queue", s.queue_s, s.timed_jobs}, {"prefill", s.prefill_s, s.engine_timed_jobs},
        {"decode", s.decode_s, s.engine_timed_jobs}, {"vision", s.vision_s, s.engine_timed_jobs},
        {"diffusion", s.diffusion_s, s.engine_timed_jobs}, {"vae", s.vae_s, s.engine_timed_jobs},
        {"total", s.total_s, s.timed_jobs},
    };
    for (size_t i = 0; i < sizeof phases / sizeof phases[0]; i++) {
        put(t, "duogen_phase_seconds_sum{worker=\"%s\",phase=\"%s\"} %.6f\n", wid, phases[i].phase, phases[i].sec);
        put(t, "duogen_phase_seconds_count{worker=\"%s\",phase=\"%s\"} %lld\n", wid, phases[i].phase,
            (long long)phases[i].jobs);
    }

    metric(t, "duogen_tokens_total", "counter", "Generated text tokens.");
    put(t, "duogen_tokens_total{worker=\"%s\"} %lld\n", wid, (long long)s.tokens);
    metric(t, "duogen_tokens_per_second", "gauge",
           "Generated tokens per second of decode time, over the jobs the engine finished in the worker's life.");
    put(t, "duogen_tokens_per_second{worker=\"%s\"} %.3f\n", wid,
        s.decode_s > 0 ? (double)s.timed_tokens / s.decode_s : 0.0);
    metric(t, "duogen_timed_tokens_total", "counter",
           "Generated tokens of the jobs the engine finished: the tokens of duogen_phase_seconds_sum{phase=\"decode\"}.");
    put(t, "duogen_timed_tokens_total{worker=\"%s\"} %lld\n", wid, (long long)s.timed_tokens);
    metric(t, "duogen_draft_tokens_total", "counter", "Drafted tokens fed to the decoder (draft_tokens).");
    put(t, "duogen_draft_tokens_total{worker=\"%s\"} %lld\n", wid, (long long)s.draft_tokens);
    metric(t, "duogen_draft_kept_total", "counter", "Drafted tokens the model chose itself: tokens that cost no step.");
    put(t, "duogen_draft_kept_total{worker=\"%s\"} %lld\n", wid, (long long)s.draft_kept);
    metric(t, "duogen_screened_tokens_total", "counter",
           "Greedy and top-k tokens chosen from the logit screen's bounds (logit_screen): the lm_head read in full for a few rows only.");
    put(t, "duogen_screened_tokens_total{worker=\"%s\"} %lld\n", wid, (long long)s.screened);
    metric(t, "duogen_unscreened_tokens_total", "counter",
           "Greedy and top-k tokens whose bounds did not decide: their logits computed whole.");
    put(t, "duogen_unscreened_tokens_total{worker=\"%s\"} %lld\n", wid, (long long)s.unscreened);
    metric(t, "duogen_images_total", "counter", "Generated images.");
    put(t, "duogen_images_total{worker=\"%s\"} %lld\n", wid, (long long)s.images);
    metric(t, "duogen_denoise_steps_total", "counter", "Denoising steps run.");
    put(t, "duogen_denoise_steps_total{worker=\"%s\"} %lld\n", wid, (long long)s.steps);
    metric(t, "duogen_timed_denoise_steps_total", "counter",
           "Denoising steps of the jobs the engine finished: the steps of duogen_phase_seconds_sum{phase=\"diffusion\"}.");
    put(t, "duogen_timed_denoise_steps_total{worker=\"%s\"} %lld\n", wid, (long long)s.timed_steps);
    metric(t, "duogen_denoise_steps_per_second", "gauge",
           "Denoising steps per second of diffusion time, over the jobs the engine finished in the worker's life.");
    put(t, "duogen_denoise_steps_per_second{worker=\"%s\"} %.3f\n", wid,
        s.diffusion_s > 0 ? (double)s.timed_steps / s.diffusion_s : 0.0);

    struct { const char *cache; int64_t hits, misses; size_t bytes; } caches[] = {
        {"prefix_kv", s.cache.kv_hits, s.cache.kv_misses, s.cache.kv_cached_bytes},
        {"latent", s.cache.latent_hits, s.cache.latent_misses, s.cache.latent_bytes},
        {"vision", s.cache.vision_hits, s.cache.vision_misses, s.cache.vision_bytes},
    };
    enum { N_CACHES = sizeof caches / sizeof caches[0] };
    metric(t, "duogen_cache_hits_total", "counter", "Cache hits, by cache (prefix_kv: 16-token prompt blocks; latent, vision: pictures).");
    for (int i = 0; i < N_CACHES; i++)
        put(t, "duogen_cache_hits_total{worker=\"%s\",cache=\"%s\"} %lld\n", wid, caches[i].cache, (long long)caches[i].hits);
    metric(t, "duogen_cache_misses_total", "counter", "Cache misses, by cache (the units of the hits).");
    for (int i = 0; i < N_CACHES; i++)
        put(t, "duogen_cache_misses_total{worker=\"%s\",cache=\"%s\"} %lld\n", wid, caches[i].cache, (long long)caches[i].misses);
    metric(t, "duogen_cache_hit_ratio", "gauge", "Hits over lookups, by cache (0 before any lookup).");
    for (int i = 0; i < N_CACHES; i++) {
        int64_t look = caches[i].hits + caches[i].misses;
        put(t, "duogen_cache_hit_ratio{worker=\"%s\",cache=\"%s\"} %.4f\n", wid, caches[i].cache,
            look ? (double)caches[i].hits / (double)look : 0.0);
    }
    metric(t, "duogen_cache_bytes", "gauge",
           "Bytes held, by cache (prefix_kv: the KV blocks a later prompt can reuse, within the pool).");
    for (int i = 0; i < N_CACHES; i++)
        put(t, "duogen_cache_bytes{worker=\"%s\",cache=\"%s\"} %zu\n", wid, caches[i].cache, caches[i].bytes);
    metric(t, "duogen_kv_pool_bytes", "gauge", "The KV pool: every sequence's K and V, the prefix cache within it.");
    put(t, "duogen_kv_pool_bytes{worker=\"%s\"} %zu\n", wid, s.cache.kv_bytes);

    metric(t, "duogen_queue_lag_entries", "gauge", "Entries of a job stream not yet delivered to the group (-1: unknown).");
    for (int i = 0; i < 2; i++)
        put(t, "duogen_queue_lag_entries{worker=\"%s\",stream=\"%s\"} %lld\n", wid, stream[i], (long long)s.queue_lag[i]);
    metric(t, "duogen_queue_pending_entries", "gauge", "Entries of a job stream delivered to the group and not yet acknowledged (-1: unknown).");
    for (int i = 0; i < 2; i++)
        put(t, "duogen_queue_pending_entries{worker=\"%s\",stream=\"%s\"} %lld\n", wid, stream[i],
            (long long)s.queue_pending[i]);
    metric(t, "duogen_entries_lost_total", "counter", "Pending entries found deleted (trimmed) before they ran.");
    put(t, "duogen_entries_lost_total{worker=\"%s\"} %lld\n", wid, (long long)s.entries_lost);
    metric(t, "duogen_leases_lost_total", "counter",
           "Runs stopped because another attempt took their entry (a pause past claim_idle_ms).");
    put(t, "duogen_leases_lost_total{worker=\"%s\"} %lld\n", wid, (long long)s.leases_lost);
    const int ready = !strcmp(s.state, "idle") || !strcmp(s.state, "running") || !strcmp(s.state, "draining");
    metric(t, "duogen_worker_ready", "gauge", "1 once the worker takes jobs (0 while its model loads and warms up).");
    put(t, "duogen_worker_ready{worker=\"%s\"} %d\n", wid, ready);
    metric(t, "duogen_worker_busy", "gauge", "1 while the worker holds jobs.");
    put(t, "duogen_worker_busy{worker=\"%s\"} %d\n", wid, !strcmp(s.state, "running") || !strcmp(s.state, "draining"));
    metric(t, "duogen_redis_up", "gauge", "1 while the main Redis connection is up.");
    put(t, "duogen_redis_up{worker=\"%s\"} %d\n", wid, s.redis_up);
    metric(t, "duogen_redis_evicts", "gauge",
           "1 when Redis's maxmemory-policy is not noeviction (a full Redis deletes keys: jobs can be lost), 0 when "
           "it is, -1 not known (INFO refused, or not connected yet).");
    put(t, "duogen_redis_evicts{worker=\"%s\"} %d\n", wid, s.redis_evicts);
    metric(t, "duogen_job_phase_seconds", "gauge",
           "Seconds the held job longest in each phase has been in it (0: no job in that phase; writing: its result waits to be written).");
    const int64_t now = dg_mono_ms();
    for (int p = 0; p < DG_PHASE_COUNT; p++)
        put(t, "duogen_job_phase_seconds{worker=\"%s\",phase=\"%s\"} %.3f\n", wid, dg_phase_name((dg_phase)p),
            s.phase_since_ms[p] ? (double)(now - s.phase_since_ms[p]) / 1e3 : 0.0);
    metric(t, "duogen_job_stalled_seconds", "gauge",
           "Seconds since the held job longest without progress in each phase made any (a token, a denoising "
           "step, the phase begun); 0: no job in that phase. A long decode that moves stays low.");
    for (int p = 0; p < DG_PHASE_COUNT; p++)
        put(t, "duogen_job_stalled_seconds{worker=\"%s\",phase=\"%s\"} %.3f\n", wid, dg_phase_name((dg_phase)p),
            s.progress_since_ms[p] ? (double)(now - s.progress_since_ms[p]) / 1e3 : 0.0);
    metric(t, "duogen_start_time_seconds", "gauge", "Unix time the worker started.");
    put(t, "duogen_start_time_seconds{worker=\"%s\"} %.3f\n", wid, (double)s.started_ms / 1e3);
}

/* The response to a connection whose request head came (or whose second ran out: what it
 * sent does not matter, any path is /metrics): headers only for HEAD. A client that does
 * not read holds the thread at most its socket's send timeout (1 s). */
static void respond(dg_worker *w, int fd, const char *req, size_t got) {
    text body = {0}, head = {0};
    render(w, &body);
    put(&head, "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
               "Content-Length: %zu\r\nConnection: close\r\n\r\n", body.len);
    const int is_head = got >= 5 && !memcmp(req, "HEAD ", 5);
    const text *parts[2] = {&head, &body};
    for (int i = 0; i < (is_head ? 1 : 2); i++) {
        size_t off = 0;
        while (off < parts[i]->len) {
            ssize_t n = send(fd, parts[i]->buf + off, parts[i]->len - off, MSG_NOSIGNAL);
            if (n <= 0) break;
            off += (size_t)n;
        }
    }
    free(head.buf);
    free(body.buf);
}

/* Connections are served side by side (poll), each with a second for its request head and
 * 200 ms afterwards to read away what it sent beyond it (closing a socket with unread input
 * resets the connection, and the client would lose the answer): idle connections (a port
 * scan, a load balancer's TCP check) used to be served one after another, a second each,
 * and a scrape behind a dozen of them went past Prometheus's 10 s timeout. Past
 * METRICS_CONNS at once, new ones wait in the listen backlog; fewer under a low limit of
 * open files (metrics_conns), whose descriptors the jobs' files and Redis need (at 32,
 * clients holding connections open made the next image's file fail, EMFILE). */
enum { METRICS_CONNS = 32 };

/* The connections served at once: a quarter of the open-file limit above 64, 1 .. 32. */
static int metrics_conns(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY) return METRICS_CONNS;
    long n = ((long)(rl.rlim_cur > 1 << 20 ? 1 << 20 : rl.rlim_cur) - 64) / 4;
    return n < 1 ? 1 : n > METRICS_CONNS ? METRICS_CONNS : (int)n;
}

struct metrics_conn {
    int     fd;              /* -1: free */
    int     answered;        /* the response went out: draining */
    int64_t until;           /* monotonic ms */
    size_t  got;
    char    req[2048];
};

static void conn_close(struct metrics_conn *c) {
    close(c->fd);
    c->fd = -1;
}

static void conn_answer(dg_worker *w, struct metrics_conn *c) {
    respond(w, c->fd, c->req, c->got);
    shutdown(c->fd, SHUT_WR);
    c->answered = 1;
    c->until = dg_mono_ms() + 200;
}

static void *metrics_main(void *arg) {
    dg_worker *w = arg;
    struct metrics_conn *conns = calloc(METRICS_CONNS, sizeof *conns);
    if (!conns) {
        log_error("metrics: out of memory for its connections; no metrics served");
        return NULL;
    }
    for (int i = 0; i < METRICS_CONNS; i++) conns[i].fd = -1;
    const int max_conns = metrics_conns();
    int64_t accept_after = 0;   /* accept failed for want of descriptors: not before then */
    while (!w->keeper_stop) {
        struct pollfd p[METRICS_CONNS + 1];
        int slot[METRICS_CONNS + 1], n = 0, room = 0;
        int64_t now = dg_mono_ms(), wait = 200;
        for (int i = 0; i < max_conns; i++) {
            if (conns[i].fd < 0) {
                room = 1;
                continue;
            }
            p[n] = (struct pollfd){conns[i].fd, POLLIN, 0};
            slot[n++] = i;
            if (conns[i].until - now < wait) wait = conns[i].until - now;
        }
        if (room && now >= accept_after) {
            p[n] = (struct pollfd){w->metrics_fd, POLLIN, 0};
            slot[n++] = -1;
        } else if (room && accept_after - now < wait) {
            wait = accept_after - now;
        }
        if (poll(p, (nfds_t)n, wait < 0 ? 0 : (int)wait) < 0 && errno != EINTR) continue;
        now = dg_mono_ms();
        for (int k = 0; k < n; k++) {
            if (slot[k] < 0) {
                if (!(p[k].revents & POLLIN)) continue;
                int fd = accept4(w->metrics_fd, NULL, NULL, SOCK_CLOEXEC);
                if (fd < 0) {
                    /* out of descriptors (or memory): the connection stays in the backlog
                     * and the listener readable; polling it again at once spun a core */
                    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                        if (!accept_after) log_warn("metrics: cannot take a connection: %s; trying again each second",
                                                    strerror(errno));
                        accept_after = now + 1000;
                    }
                    continue;
                }
                accept_after = 0;
                struct timeval tv = {1, 0};
                setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
                for (int i = 0; i < max_conns; i++)
                    if (conns[i].fd < 0) {
                        conns[i] = (struct metrics_conn){.fd = fd, .until = now + 1000};
                        break;
                    }
                continue;
            }
            struct metrics_conn *c = &conns[slot[k]];
            if (p[k].revents) {
                char sink[4096];
                char *into = c->answered ? sink : c->req + c->got;
                size_t cap = c->answered ? sizeof sink : sizeof c->req - 1 - c->got;
                ssize_t r = cap ? recv(c->fd, into, cap, MSG_DONTWAIT) : 0;
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (c->answered) {
                    if (r <= 0) conn_close(c);
                    continue;
                }
                if (r > 0) c->got += (size_t)r;
                /* the head's end: a blank line (memmem: a NUL in it does not hide it), the
                 * buffer full, or the client done sending */
                if (r <= 0 || c->got == sizeof c->req - 1 || memmem(c->req, c->got, "\r\n\r\n", 4) ||
                    memmem(c->req, c->got, "\n\n", 2))
                    conn_answer(w, c);
                continue;
            }
            if (now >= c->until) {
                if (c->answered) conn_close(c);
                else conn_answer(w, c);
            }
        }
    }
    for (int i = 0; i < METRICS_CONNS; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);
    free(conns);
    return NULL;
}

int dg_metrics_start(dg_worker *w, char *err, size_t errlen) {
    const char *addr = w->cfg->metrics_address;
    const int port = w->cfg->metrics_port;
    struct sockaddr_storage ss = {0};
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    socklen_t len;
    char where[96];
    if (inet_pton(AF_INET, addr, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        len = sizeof *a4;
        snprintf(where, sizeof where, "%s:%d", addr, port);
    } else if (inet_pton(AF_INET6, addr, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        len = sizeof *a6;
        snprintf(where, sizeof where, "[%s]:%d", addr, port);
    } else {   /* dg_daemon_config_finish refused it already */
        snprintf(err, errlen, "metrics_address: \"%s\" is not an IPv4 or IPv6 address", addr);
        return -1;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        bind(fd, (struct sockaddr *)&ss, len) || listen(fd, 16)) {
        snprintf(err, errlen, "metrics: cannot listen on %s: %s", where, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    w->metrics_fd = fd;
    if (pthread_create(&w->metrics, NULL, metrics_main, w)) {
        close(fd);
        w->metrics_fd = -1;
        snprintf(err, errlen, "metrics: cannot start its thread");
        return -1;
    }
    log_info("metrics on http://%s/metrics", where);
    return 0;
}

void dg_metrics_stop(dg_worker *w) {
    if (w->metrics_fd < 0) return;
    w->keeper_stop = 1;   /* the metrics thread shares the keeper's stop flag */
    pthread_join(w->metrics, NULL);
    close(w->metrics_fd);
    w->metrics_fd = -1;
}
