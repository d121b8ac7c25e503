/* A baseline as a co-process (bench.h bench_peer): one command line out, one JSON line back. */
#include "bench.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* The longest a reply may take: a 512-token prefill on one thread is seconds; loading the
 * model and writing its GGUF the first time, a minute. */
#define PEER_REPLY_MS (300 * 1000)

/* One line from the peer into line (without its newline), through p->buf: 0, or -1 with err
 * when it exits, says nothing for PEER_REPLY_MS, or writes a line past the buffer. */
static int read_line(bench_peer *p, char *line, size_t cap, char *err, size_t errlen) {
    for (;;) {
        char *nl = memchr(p->buf, '\n', (size_t)p->len);
        if (nl) {
            const size_t n = (size_t)(nl - p->buf);
            if (n >= cap) break;
            memcpy(line, p->buf, n);
            line[n] = 0;
            p->len -= (int)n + 1;
            memmove(p->buf, nl + 1, (size_t)p->len);
            return 0;
        }
        if (p->len == (int)sizeof p->buf) break;
        struct pollfd pfd = {.fd = p->from, .events = POLLIN};
        int rc;
        while ((rc = poll(&pfd, 1, PEER_REPLY_MS)) < 0 && errno == EINTR) {}
        if (rc == 0) {
            snprintf(err, errlen, "baseline: no reply in %d s", PEER_REPLY_MS / 1000);
            return -1;
        }
        ssize_t got;
        while ((got = read(p->from, p->buf + p->len, sizeof p->buf - (size_t)p->len)) < 0 && errno == EINTR) {}
        if (got <= 0) {
            snprintf(err, errlen, "baseline: exited before replying (its messages are above)");
            return -1;
        }
        p->len += (int)got;
    }
    snprintf(err, errlen, "baseline: a reply longer than %zu bytes", sizeof p->buf);
    return -1;
}

static json_t *read_reply(bench_peer *p, char *err, size_t errlen) {
    char line[sizeof p->buf];
    json_error_t je;
    if (read_line(p, line, sizeof line, err, errlen) < 0) return NULL;
    json_t *j = json_loads(line, 0, &je);
    if (!json_is_object(j)) {
        json_decref(j);
        snprintf(err, errlen, "baseline: not a JSON object: \"%.200s\"", line);
        return NULL;
    }
    const char *e = json_string_value(json_object_get(j, "error"));
    if (e) {
        snprintf(err, errlen, "baseline: %s", e);
        json_decref(j);
        return NULL;
    }
    return j;
}

int bench_peer_start(bench_peer *p, const char *cmd, char *err, size_t errlen) {
    int to[2], from[2];
    memset(p, 0, sizeof *p);
    p->pid = -1;
    p->from = -1;
    if (pipe(to) < 0) goto fail;
    if (pipe(from) < 0) {
        close(to[0]);
        close(to[1]);
        goto fail;
    }
    signal(SIGPIPE, SIG_IGN);   /* a peer that died is an error reply, not our end */
    fflush(NULL);
    p->pid = fork();
    if (p->pid == 0) {
        dup2(to[0], 0);
        dup2(from[1], 1);
        close(to[0]), close(to[1]), close(from[0]), close(from[1]);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    if (p->pid < 0) {
        close(to[1]);
        close(from[0]);
        goto fail;
    }
    p->from = from[0];
    if (!(p->to = fdopen(to[1], "w"))) {
        close(to[1]);
        snprintf(err, errlen, "baseline: %s", strerror(errno));
        bench_peer_stop(p);
        snprintf(p->why, sizeof p->why, "did not start: %s", err);
        return -1;
    }
    json_t *hello = read_reply(p, err, errlen);
    if (!hello) {
        bench_peer_stop(p);
        snprintf(p->why, sizeof p->why, "did not start: %s", err);
        return -1;
    }
    snprintf(p->baseline, sizeof p->baseline, "%s", json_string_value(json_object_get(hello, "baseline")) ?: "?");
    p->n_prompt = (int)json_integer_value(json_object_get(hello, "n_prompt"));
    json_decref(hello);
    return 0;
fail:
    snprintf(err, errlen, "baseline: cannot start \"%s\": %s", cmd, strerror(errno));
    snprintf(p->why, sizeof p->why, "%s", err);
    return -1;
}

json_t *bench_peer_ask(bench_peer *p, const char *line, char *err, size_t errlen) {
    if (fprintf(p->to, "%s\n", line) < 0 || fflush(p->to) != 0) {
        snprintf(err, errlen, "baseline: cannot send \"%s\": %s", line, strerror(errno));
        return NULL;
    }
    return read_reply(p, err, errlen);
}

void bench_peer_stop(bench_peer *p) {
    if (p->pid <= 0) return;   /* never started */
    if (p->to) {
        fputs("quit\n", p->to);
        fclose(p->to);
    }
    if (p->from >= 0) close(p->from);
    if (p->pid > 0) waitpid(p->pid, NULL, 0);
    char why[sizeof p->why];
    memcpy(why, p->why, sizeof why);
    memset(p, 0, sizeof *p);
    memcpy(p->why, why, sizeof why);
    p->pid = -1;
    p->from = -1;
}

double bench_peer_turn(bench_peer *p, const char *who, const char *cmd, int *argmax) {
    char err[512];
    if (!bench_peer_live(p)) return 0;
    json_t *r = bench_peer_ask(p, cmd, err, sizeof err);
    const double s = r ? json_number_value(json_object_get(r, "s")) : 0;
    if (r && argmax) *argmax = (int)json_integer_value(json_object_get(r, "argmax"));
    if (r && s <= 0) snprintf(err, sizeof err, "baseline: no time in its reply to \"%s\"", cmd);
    json_decref(r);
    if (s > 0) return s;
    fprintf(stderr, "dg-bench: the %s baseline dropped: %s\n", who, err);
    char name[sizeof p->baseline];
    memcpy(name, p->baseline, sizeof name);
    bench_peer_stop(p);
    snprintf(p->why, sizeof p->why, "%s dropped at \"%s\": %s", name, cmd, err);
    return 0;
}

void bench_peer_announce(const bench_peer *p, json_t *out, const char *who, const char *label) {
    char name[96];
    if (!bench_peer_live(p)) return;
    snprintf(name, sizeof name, "%s_baseline", label);
    json_object_set_new(out, name, json_string(p->baseline));
    printf("  %s: %s, a co-process, turn about with ours in each round\n", who, p->baseline);
}

void bench_peer_outcome(const bench_peer *p, json_t *out, const char *who, const char *label, const char *flag,
                        const char *suffix) {
    char name[128], why[512];
    if (bench_peer_live(p)) return;
    if (p->why[0]) snprintf(why, sizeof why, "%s", p->why);
    else snprintf(why, sizeof why, "not asked for (%s CMD)", flag);
    snprintf(name, sizeof name, "%s_baseline_missing%s", label, suffix);
    json_object_set_new(out, name, json_string(why));
    printf("  %s: no %s figures in this run: %s\n", name, who, why);
}
