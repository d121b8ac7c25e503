#include "top.h"
#include "out.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static char refusal[320];   /* a frame's first error reply ("XLEN duogen:dead: NOPERM ..."): "" when none */

/* One command's reply; NULL for an error reply (freed here, the frame's first kept in
 * refusal) or a lost connection. What a NULL stood for is shown as "?", never as 0. */
static redisReply *get(dg_redis *r, dg_cmd *c) {
    redisReply *rep = dg_redis_ready(r) ? dg_redis_cmd(r, c) : NULL;
    if (rep && rep->type == REDIS_REPLY_ERROR) {
        if (!refusal[0])
            snprintf(refusal, sizeof refusal, "%s %.100s: %s", c->argv[0], c->argc > 1 ? c->argv[1] : "", rep->str);
        freeReplyObject(rep);
        rep = NULL;
    }
    dg_cmd_free(c);
    return rep;
}

/* n as a figure, "?" where its reply did not come */
static const char *figure(const redisReply *rep, char *buf, size_t len) {
    if (!rep || rep->type != REDIS_REPLY_INTEGER) return "?";
    snprintf(buf, len, "%lld", rep->integer);
    return buf;
}

static const char *field(const redisReply *h, const char *name) {
    for (size_t i = 0; h && h->type == REDIS_REPLY_ARRAY && i + 1 < h->elements; i += 2)
        if (h->element[i]->type == REDIS_REPLY_STRING && !strcmp(h->element[i]->str, name))
            return h->element[i + 1]->type == REDIS_REPLY_STRING ? h->element[i + 1]->str : "";
    return "";
}

static long long field_int(const redisReply *h, const char *name) {
    for (size_t i = 0; h && h->type == REDIS_REPLY_ARRAY && i + 1 < h->elements; i += 2)
        if (h->element[i]->type == REDIS_REPLY_STRING && !strcmp(h->element[i]->str, name))
            return h->element[i + 1]->type == REDIS_REPLY_INTEGER ? h->element[i + 1]->integer : -1;
    return -1;
}

/* "queue  duogen:jobs  length 3  pending 1  lag 2" for both streams and each of their groups. */
static void frame_queue(FILE *out, dg_redis *r, const char *prefix) {
    static const char *streams[] = {"jobs:high", "jobs"};
    for (int s = 0; s < 2; s++) {
        char k[512];
        snprintf(k, sizeof k, "%s:%s", prefix, streams[s]);
        redisReply *len = get(r, dg_cmd_of("XLEN", k, NULL));
        redisReply *groups = get(r, dg_cmd_of("XINFO", "GROUPS", k, NULL));
        char n[24];
        fprintf(out, "%-7s %-22s length %-6s", s ? "" : "queue", k, figure(len, n, sizeof n));
        for (size_t g = 0; groups && g < groups->elements; g++) {
            const redisReply *info = groups->element[g];
            long long lag = field_int(info, "lag");
            char lag_text[24] = "?";   /* Redis cannot always tell (entries deleted) */
            if (lag >= 0) snprintf(lag_text, sizeof lag_text, "%lld", lag);
            fprintf(out, "  group %s: pending %lld  lag %s", field(info, "name"), field_int(info, "pending"), lag_text);
        }
        fputc('\n', out);
        freeReplyObject(len);
        freeReplyObject(groups);
    }
}

/* The done stream's entries of the last minute, by status, and the dead letters. */
static void frame_rates(FILE *out, dg_redis *r, const char *prefix) {
    static const char *names[] = {"done", "failed", "cancelled", "expired"};
    long long counts[4] = {0};
    char k[512], since[32];
    snprintf(k, sizeof k, "%s:done", prefix);
    snprintf(since, sizeof since, "%lld", (long long)(dg_now_ms() - 60000));
    redisReply *rep = get(r, dg_cmd_of("XRANGE", k, since, "+", "COUNT", "100000", NULL));
    for (size_t i = 0; rep && i < rep->elements; i++) {
        const char *status = field(rep->element[i]->element[1], "status");
        for (int s = 0; s < 4; s++) counts[s] += !strcmp(status, names[s]);
    }
    const int read_done = rep != NULL;
    freeReplyObject(rep);
    snprintf(k, sizeof k, "%s:dead", prefix);
    rep = get(r, dg_cmd_of("XLEN", k, NULL));
    fprintf(out, "last minute");
    for (int s = 0; s < 4; s++) {
        if (read_done) fprintf(out, "  %s %lld", names[s], counts[s]);
        else fprintf(out, "  %s ?", names[s]);
    }
    char n[24];
    fprintf(out, "   dead letters %s\n", figure(rep, n, sizeof n));
    freeReplyObject(rep);
}

/* "[#####.....]  52%" */
static void put_bar(FILE *out, double frac) {
    char bar[16];
    int filled = (int)(frac * 10 + 0.5);
    for (int i = 0; i < 10; i++) bar[i] = i < filled ? '#' : '.';
    bar[10] = 0;
    fprintf(out, "[%s] %3.0f%%", bar, frac * 100);
}

/* One line per job a worker runs ("-" when idle), the worker's columns on its first. */
static void frame_worker(FILE *out, dg_redis *r, const char *prefix, const char *id, const redisReply *w) {
    char jobs[512], head[160];
    const char *beat = field(w, "updated_ms"), *state = field(w, "state");   /* none yet: starting */
    char age[24] = "     -";
    if (beat[0]) snprintf(age, sizeof age, "%5.1fs", (dg_now_ms() - strtoll(beat, NULL, 10)) / 1000.0);
    snprintf(head, sizeof head, "%-20.20s %-9.9s %s %6s %6s", id, state[0] ? state : "starting", age,
             field(w, "jobs_done"), field(w, "jobs_failed"));
    snprintf(jobs, sizeof jobs, "%s", field(w, "job"));
    int lines = 0;
    for (char *save = NULL, *job = strtok_r(jobs, " ", &save); job; job = strtok_r(NULL, " ", &save)) {
        char k[512];
        snprintf(k, sizeof k, "%s:job:%s", prefix, job);
        redisReply *j = get(r, dg_cmd_of("HMGET", k, "phase", "progress", "tokens", "images", "step", NULL));
        const char *v[5] = {"?", "0", "0", "0", "0"};
        for (size_t i = 0; j && i < j->elements && i < 5; i++)
            if (j->element[i]->type == REDIS_REPLY_STRING) v[i] = j->element[i]->str;
        fprintf(out, "%-51s %-20.20s %-10.10s ", lines++ ? "" : head, job, v[0]);
        put_bar(out, atof(v[1]));
        fprintf(out, " %6s %4s %5s\n", v[2], v[3], v[4]);
        freeReplyObject(j);
    }
    if (!lines) fprintf(out, "%-51s -\n", head);
}

static void frame_workers(FILE *out, dg_redis *r, const char *prefix) {
    char pattern[512], cursor[32] = "0";
    int n = 0, evicts = 0, scanned = 1;
    snprintf(pattern, sizeof pattern, "%s:worker:*", prefix);
    fprintf(out, "\n%-20s %-9s %6s %6s %6s %-20s %-10s %-17s %6s %4s %5s\n", "WORKER", "STATE", "BEAT", "DONE",
            "FAILED", "JOB", "PHASE", "PROGRESS", "TOKENS", "IMGS", "STEP");
    do {
        redisReply *sc = get(r, dg_cmd_of("SCAN", cursor, "MATCH", pattern, "COUNT", "1000", NULL));
        if (!sc) {
            scanned = 0;
            break;
        }
        snprintf(cursor, sizeof cursor, "%s", sc->element[0]->str);
        for (size_t i = 0; i < sc->element[1]->elements; i++) {
            const char *wk = sc->element[1]->element[i]->str;
            redisReply *w = get(r, dg_cmd_of("HGETALL", wk, NULL));
            if (w && w->elements) frame_worker(out, r, prefix, wk + strlen(pattern) - 1, w);
            n += w && w->elements;
            evicts |= w && !strcmp(field(w, "redis_evicts"), "1");
            freeReplyObject(w);
        }
        freeReplyObject(sc);
    } while (strcmp(cursor, "0"));
    if (!n) fprintf(out, "%s\n", scanned ? "(no live worker)" : "(the workers could not be listed: ?)");
    if (evicts) fprintf(out, "\nwarning: Redis evicts keys when full (maxmemory-policy is not noeviction): jobs can be lost\n");
}

/* One frame into out (keys: the screen's, which q quits). Returns 0, or -1 when Redis could
 * not be read or refused a command (the frame says so, its figures "?"). */
static int render(FILE *out, dg_redis *r, const char *prefix, const char *where, int keys) {
    char clock[16];
    time_t now = time(NULL);
    strftime(clock, sizeof clock, "%H:%M:%S", localtime(&now));
    fprintf(out, "duogen top   %s   prefix %s   %s%s\n\n", where, prefix, clock, keys ? "   (q quits)" : "");
    if (!dg_redis_ready(r)) {
        fprintf(out, "Redis: %s (trying again)\n", r->error[0] ? r->error : "not connected");
        return -1;
    }
    refusal[0] = 0;
    frame_queue(out, r, prefix);
    frame_rates(out, r, prefix);
    frame_workers(out, r, prefix);
    if (!refusal[0]) return 0;
    fprintf(out, "\nRedis refused %s: the figures it would give are shown as ?%s\n", refusal,
            strstr(refusal, "NOPERM") ? " (this Redis user's ACL: top needs the operator's rights, "
                                        "deploy/redis/users.acl.example)" : "");
    return -1;
}

static volatile sig_atomic_t stop;
static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

/* Draws the frame over the last one: each line cut to the terminal's width and cleared to
 * its end, then the rest of the screen cleared. */
static void draw(const char *frame) {
    struct winsize ws = {0};
    int cols = ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col ? ws.ws_col : 200;
    fputs("\033[H", stdout);
    for (const char *p = frame; *p;) {
        size_t n = strcspn(p, "\n");
        fwrite(p, 1, n < (size_t)cols ? n : (size_t)cols, stdout);
        fputs("\033[K", stdout);
        p += n;
        if (*p == '\n') {
            fputs("\r\n", stdout);
            p++;
        }
    }
    fputs("\033[J", stdout);
    dg_ctl_flush();
}

/* Waits up to ms for a key; returns 1 when q was pressed. A stdin at its end is not read again. */
static int wait_key(int ms, int *stdin_open) {
    struct pollfd p = {.fd = STDIN_FILENO, .events = POLLIN};
    if (!*stdin_open) {
        struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        return 0;
    }
    if (poll(&p, 1, ms) <= 0) return 0;
    char c;
    ssize_t n = read(STDIN_FILENO, &c, 1);
    if (n <= 0) *stdin_open = 0;
    return n == 1 && (c == 'q' || c == 'Q');
}

int dg_top_run(dg_redis *r, const char *prefix, const char *where, int interval_ms, int once) {
    char *frame = NULL;
    size_t len = 0;
    if (once) {
        int rc = render(stdout, r, prefix, where, 0);
        dg_ctl_flush();
        return rc ? 3 : 0;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;   /* no SA_RESTART: the wait returns at once */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    if (!isatty(STDOUT_FILENO)) {   /* into a file or a pipe: a frame an interval, as --once writes it */
        while (!stop) {
            render(stdout, r, prefix, where, 0);
            putchar('\n');
            dg_ctl_flush();   /* a full disk: exit 3, naming it; a pipe whose reader left: SIGPIPE */
            int stdin_open = 0;
            wait_key(interval_ms, &stdin_open);
        }
        return 0;
    }
    struct termios saved, raw;
    int tty = tcgetattr(STDIN_FILENO, &saved) == 0, stdin_open = 1;
    if (tty) {
        raw = saved;
        raw.c_lflag &= ~(tcflag_t)(ICANON | ECHO);
        raw.c_cc[VMIN] = 1;
        raw.c_cc[VTIME] = 0;
        tcsetattr(STDIN_FILENO, TCSANOW, &raw);
    }
    fputs("\033[?1049h\033[?25l", stdout);   /* the alternate screen, no cursor */
    while (!stop) {
        FILE *f = open_memstream(&frame, &len);
        if (!f) break;
        render(f, r, prefix, where, 1);
        fclose(f);
        draw(frame);
        free(frame);
        frame = NULL;
        if (wait_key(interval_ms, &stdin_open)) break;
    }
    fputs("\033[?25h\033[?1049l", stdout);
    dg_ctl_flush();
    if (tty) tcsetattr(STDIN_FILENO, TCSANOW, &saved);
    return 0;
}
