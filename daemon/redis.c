#include "redis.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

/* ---- commands ---------------------------------------------------------------------------- */

dg_cmd *dg_cmd_new(void) {
    dg_cmd *c = calloc(1, sizeof *c);
    if (!c) abort();
    return c;
}

void dg_cmd_free(dg_cmd *c) {
    if (!c) return;
    for (int i = 0; i < c->argc; i++) free(c->argv[i]);
    free(c->argv);
    free(c->len);
    free(c);
}

void dg_cmd_add(dg_cmd *c, const void *data, size_t len) {
    if (c->argc == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 8;
        c->argv = realloc(c->argv, (size_t)c->cap * sizeof *c->argv);
        c->len = realloc(c->len, (size_t)c->cap * sizeof *c->len);
        if (!c->argv || !c->len) abort();
    }
    char *copy = malloc(len + 1);
    if (!copy) abort();
    if (len) memcpy(copy, data, len);
    copy[len] = 0;
    c->argv[c->argc] = copy;
    c->len[c->argc] = len;
    c->argc++;
}

void dg_cmd_adds(dg_cmd *c, const char *s) { dg_cmd_add(c, s, strlen(s)); }

void dg_cmd_addf(dg_cmd *c, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    dg_cmd_add(c, buf, (size_t)n);
}

static dg_cmd *cmd_from_va(const char *arg0, va_list ap) {
    dg_cmd *c = dg_cmd_new();
    for (const char *a = arg0; a; a = va_arg(ap, const char *)) dg_cmd_adds(c, a);
    return c;
}

dg_cmd *dg_cmd_of(const char *arg0, ...) {
    va_list ap;
    va_start(ap, arg0);
    dg_cmd *c = cmd_from_va(arg0, ap);
    va_end(ap);
    return c;
}

size_t dg_cmd_largest(const dg_cmd *c, size_t *all) {
    size_t m = 0;
    *all = 0;
    for (int i = 0; i < c->argc; i++) {
        if (c->len[i] > m) m = c->len[i];
        *all += c->len[i];
    }
    return m;
}

/* ---- time ---------------------------------------------------------------------------------- */

int64_t dg_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t dg_mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- configuration ------------------------------------------------------------------------- */

/* redis://[user[:password]@]host[:port][/db], the same with rediss:// (TLS), or
 * unix:///path[?db=N]. The host is a name, an IPv4 address, or an IPv6 address in brackets
 * ([::1]); the user and the password are percent-decoded (a password holding '@', ':' or
 * '/' is written %40, %3A, %2F), as other Redis clients read such URLs. */
static const char url_form[] = "redis://[user[:password]@]host[:port][/db] (an IPv6 address in brackets), "
                               "the same with rediss:// (TLS), or unix:///path[?db=N]";

static int hex_digit(int c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* s[0..n) with %XX decoded into out, NUL-terminated. -1 when it does not fit, or a '%' is not
 * followed by two hex digits or stands for NUL. */
static int pct_decode(char *out, size_t cap, const char *s, size_t n) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            int hi = i + 2 < n ? hex_digit((unsigned char)s[i + 1]) : -1;
            int lo = i + 2 < n ? hex_digit((unsigned char)s[i + 2]) : -1;
            if (hi < 0 || lo < 0 || (hi | lo) == 0) return -1;
            c = hi * 16 + lo;
            i += 2;
        }
        if (o + 1 >= cap) return -1;
        out[o++] = (char)c;
    }
    out[o] = 0;
    return 0;
}

/* host[:port] or [v6][:port] of s[0..n) into host (brackets dropped) and *port (kept when
 * absent). NULL, or what is wrong with it. */
static const char *parse_host_port(const char *s, size_t n, char *host, size_t cap, int *port) {
    const char *end = s + n, *h = s, *hend, *rest;
    const int v6 = n && s[0] == '[';
    if (v6) {
        if (!(hend = memchr(s, ']', n))) return "'[' without ']'";
        h = s + 1;
        rest = hend + 1;
        if (rest < end && *rest != ':') return "text after ']' that is not :port";
    } else {
        if (!(hend = memchr(s, ':', n))) hend = end;
        if (hend < end && memchr(hend + 1, ':', (size_t)(end - hend - 1)))
            return "more than one ':' (an IPv6 address goes in brackets: [::1]:6379)";
        rest = hend;
    }
    const size_t hl = (size_t)(hend - h);
    if (!hl) return "no host";
    if (hl >= cap) return "a host name too long";
    memcpy(host, h, hl);
    host[hl] = 0;
    unsigned char addr[sizeof(struct in6_addr)];
    if (v6 && inet_pton(AF_INET6, host, addr) != 1) return "not an IPv6 address in brackets";
    if (rest < end) {   /* ":port" */
        char digits[8];
        const size_t pl = (size_t)(end - rest - 1);
        if (!pl || pl >= sizeof digits) return "a port that is not 1..65535";
        memcpy(digits, rest + 1, pl);
        digits[pl] = 0;
        char *e;
        long p = strtol(digits, &e, 10);
        if (*e || digits[0] < '0' || digits[0] > '9' || p <= 0 || p > 65535) return "a port that is not 1..65535";
        *port = (int)p;
    }
    return NULL;
}

void dg_redis_url_redact(const char *url, char *out, size_t n) {
    /* any scheme's: a redis:// mistyped is still a password */
    const char *p = strstr(url, "://");
    if (p) p += 3;
    const char *auth_end = p ? p + strcspn(p, "/?#") : NULL, *at = NULL, *colon = NULL;
    for (const char *q = p; q && q < auth_end; q++)
        if (*q == '@') at = q;
    if (at) colon = memchr(p, ':', (size_t)(at - p));
    if (!colon) snprintf(out, n, "%s", url);
    else snprintf(out, n, "%.*s***%s", (int)(colon + 1 - url), url, at);
}

static int parse_url(dg_redis *r, const char *url, char *err, size_t errlen) {
    const char *why = "not a redis://, rediss:// or unix:// URL";
    if (!strncmp(url, "unix://", 7)) {
        const char *p = url + 7, *q = strchr(p, '?');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        why = "no socket path, or one too long";
        if (!n || n >= sizeof r->unix_path) goto bad;
        memcpy(r->unix_path, p, n);
        char tail;
        why = "a query that is not ?db=N";
        if (q && (sscanf(q, "?db=%d%c", &r->db, &tail) != 1 || r->db < 0)) goto bad;
        return 0;
    }
    r->port = 6379;
    r->tls = !strncmp(url, "rediss://", 9);
    if (strncmp(url, "redis://", 8) && !r->tls) goto bad;
    const char *p = url + 8 + r->tls, *auth_end = p + strcspn(p, "/?#"), *at = NULL;
    for (const char *q = p; q < auth_end; q++)   /* the userinfo ends at the authority's last '@' */
        if (*q == '@') at = q;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        why = "a user name too long, or with a '%' not followed by two hex digits";
        if (pct_decode(r->user, sizeof r->user, p, (size_t)((colon ? colon : at) - p))) goto bad;
        why = "a password too long, or with a '%' not followed by two hex digits";
        if (colon && pct_decode(r->password, sizeof r->password, colon + 1, (size_t)(at - colon - 1))) goto bad;
        p = at + 1;
    }
    if ((why = parse_host_port(p, (size_t)(auth_end - p), r->host, sizeof r->host, &r->port))) goto bad;
    why = "a query (?...) or fragment (#...): only /db follows the host";
    if (*auth_end == '?' || *auth_end == '#') goto bad;
    if (*auth_end == '/' && auth_end[1]) {
        char *end;
        long db = strtol(auth_end + 1, &end, 10);
        why = "a database that is not a number 0, 1, ...";
        if (*end || auth_end[1] < '0' || auth_end[1] > '9' || db > INT32_MAX) goto bad;
        r->db = (int)db;
    }
    return 0;
bad: {
    char shown[600];   /* never the password: errors go to the journal */
    dg_redis_url_redact(url, shown, sizeof shown);
    snprintf(err, errlen, "redis_url \"%s\": %s; the form is %s", shown, why, url_form);
    memset(r->password, 0, sizeof r->password);
    return -1;
}
}

/* host:port, an IPv6 address in brackets; returns buf */
static const char *host_port(char *buf, size_t n, const char *host, int port) {
    if (strchr(host, ':')) snprintf(buf, n, "[%s]:%d", host, port);
    else snprintf(buf, n, "%s:%d", host, port);
    return buf;
}

const char *dg_redis_where(const dg_redis *r, char *buf, size_t n) {
    if (r->unix_path[0]) snprintf(buf, n, "%s", r->unix_path);
    else host_port(buf, n, r->host, r->port);
    return buf;
}

static int read_password(dg_redis *r, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "password_file \"%s\": %s", path, strerror(errno));
        return -1;
    }
    /* the first line whole: a read error (a directory) is not "empty", and a password longer
     * than the buffer is refused, never sent cut short */
    char *line = NULL;
    size_t cap = 0;
    const ssize_t n = getline(&line, &cap, f);
    const int error = n < 0 && !feof(f) ? errno : 0;
    fclose(f);
    int rc = -1;
    if (error) snprintf(err, errlen, "password_file \"%s\": %s", path, strerror(error));
    else if (n < 0 || strcspn(line, "\r\n") == 0)
        snprintf(err, errlen, "password_file \"%s\": empty", path);
    else if (strcspn(line, "\r\n") >= sizeof r->password)
        snprintf(err, errlen, "password_file \"%s\": a password longer than %zu bytes", path,
                 sizeof r->password - 1);
    else {
        line[strcspn(line, "\r\n")] = 0;
        memcpy(r->password, line, strlen(line) + 1);
        rc = 0;
    }
    free(line);
    return rc;
}

static int parse_sentinels(dg_redis *r, const char *list, char *err, size_t errlen) {
    const char *why = "no Sentinel";
    for (const char *p = list; *p;) {
        const size_t n = strcspn(p, ",");
        int port = 0;
        why = "too many Sentinels";
        if (r->n_sentinels == DG_SENTINELS_MAX) goto bad;
        char *host = r->sentinel_host[r->n_sentinels];
        if ((why = parse_host_port(p, n, host, sizeof r->sentinel_host[0], &port))) goto bad;
        why = "a Sentinel without its :port";
        if (!port) goto bad;
        r->sentinel_port[r->n_sentinels++] = port;
        p += n + (p[n] == ',');
    }
    if (r->n_sentinels) return 0;
bad:
    snprintf(err, errlen, "sentinel \"%s\": %s; the form is host:port[,host:port...] (at most %d; an IPv6 "
             "address in brackets: [::1]:26379)", list, why, DG_SENTINELS_MAX);
    return -1;
}

int dg_redis_init(dg_redis *r, const dg_daemon_config *cfg, const char *client_name, int read_timeout_ms,
                  char *err, size_t errlen) {
    memset(r, 0, sizeof *r);
    if (parse_url(r, cfg->redis_url, err, errlen)) return -1;
    if (cfg->password_file[0] && read_password(r, cfg->password_file, err, errlen)) return -1;
    if (cfg->sentinel[0]) {
        if (parse_sentinels(r, cfg->sentinel, err, errlen)) return -1;
        snprintf(r->master_name, sizeof r->master_name, "%s", cfg->master_name);
    }
    dg_tls_opts *o = &r->tls_opts;
    snprintf(o->ca_file, sizeof o->ca_file, "%s", cfg->tls_ca_file);
    snprintf(o->cert_file, sizeof o->cert_file, "%s", cfg->tls_cert_file);
    snprintf(o->key_file, sizeof o->key_file, "%s", cfg->tls_key_file);
    snprintf(o->server_name, sizeof o->server_name, "%s", cfg->tls_server_name);
    if (!r->tls && (o->ca_file[0] || o->cert_file[0] || o->key_file[0] || o->server_name[0])) {
        char shown[600];
        dg_redis_url_redact(cfg->redis_url, shown, sizeof shown);
        snprintf(err, errlen, "%s is set, but redis_url \"%s\" is not rediss://: the connection would not use TLS",
                 o->ca_file[0] ? "tls_ca_file" : o->cert_file[0] ? "tls_cert_file" : o->key_file[0] ? "tls_key_file"
                 : "tls_server_name", shown);
        return -1;
    }
    if (r->tls && dg_tls_check(o, err, errlen)) return -1;
    snprintf(r->client_name, sizeof r->client_name, "%s", client_name);
    for (char *p = r->client_name; *p; p++)
        if (*p == ' ' || *p == '\n') *p = '_';   /* CLIENT SETNAME refuses spaces */
    r->read_timeout_ms = read_timeout_ms;
    return 0;
}

/* ---- connecting ---------------------------------------------------------------------------- */

/* The error replies of a server that cannot serve now but will: loading its dataset (after a
 * restart, or a replica's full sync), running a script past its time limit, a replica cut
 * off from its master, at maxmemory with nothing to evict (OOM: a queued command refused
 * makes its EXEC abort whole), a master demoted to a replica (READONLY: a Sentinel's new
 * master is found on reconnecting), too few replicas for min-replicas-to-write. The
 * command was not run. Returns the reply's text, or NULL. */
static const char *not_ready(const redisReply *rep) {
    static const char *const states[] = {"LOADING ", "BUSY ", "MASTERDOWN ", "OOM ", "READONLY ", "NOREPLICAS "};
    for (size_t i = 0; i < sizeof states / sizeof states[0]; i++)
        if (dg_reply_is_error(rep, states[i])) return rep->str;
    return NULL;
}

/* A connection to host:port, over TLS with rediss://; *link gets its relay. NULL with the
 * reason in why. */
static redisContext *open_tcp(const dg_redis *r, const char *host, int port, int timeout_ms, dg_tls_link **link,
                              char *why, size_t whylen) {
    *link = NULL;
    if (!r->tls) {
        struct timeval ct = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        redisContext *c = redisConnectWithTimeout(host, port, ct);
        if (!c || c->err) {
            snprintf(why, whylen, "%s", c ? c->errstr : "out of memory");
            if (c) redisFree(c);
            return NULL;
        }
        return c;
    }
    /* the handshake may want more than a TCP connect: a round trip or two, and the server's
     * signature */
    const int fd = dg_tls_open(&r->tls_opts, host, port, 2 * timeout_ms, link, why, whylen);
    if (fd < 0) return NULL;
    redisContext *c = redisConnectFd(fd);
    if (!c || c->err) {
        snprintf(why, whylen, "%s", c ? c->errstr : "out of memory");
        if (c) redisFree(c);
        else close(fd);
        dg_tls_close(*link, NULL, 0);
        *link = NULL;
        return NULL;
    }
    return c;
}

/* Closes a connection open_tcp (or the Unix socket's connect) made, and its relay. */
static void close_ctx(redisContext *c, dg_tls_link *link) {
    if (c) redisFree(c);
    dg_tls_close(link, NULL, 0);   /* after redisFree: the relay ends when hiredis's end closes */
}

/* Asks each Sentinel in turn for the master's address. */
static int resolve_master(dg_redis *r) {
    for (int i = 0; i < r->n_sentinels; i++) {
        dg_tls_link *link;
        char why[256];
        redisContext *s = open_tcp(r, r->sentinel_host[i], r->sentinel_port[i], 1000, &link, why, sizeof why);
        if (!s) {
            char where[300];
            log_debug("Sentinel %s: %s", host_port(where, sizeof where, r->sentinel_host[i], r->sentinel_port[i]), why);
            continue;
        }
        struct timeval tv = {1, 0};
        redisSetTimeout(s, tv);
        redisReply *rep = redisCommand(s, "SENTINEL get-master-addr-by-name %s", r->master_name);
        int ok = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
                 rep->element[0]->type == REDIS_REPLY_STRING && rep->element[0]->len < sizeof r->host;
        if (ok) {
            snprintf(r->host, sizeof r->host, "%s", rep->element[0]->str);
            r->port = atoi(rep->element[1]->str);
        }
        if (rep) freeReplyObject(rep);
        close_ctx(s, link);
        if (ok) return 0;
    }
    snprintf(r->error, sizeof r->error, "no Sentinel of %d answered for master \"%s\"",
             r->n_sentinels, r->master_name);
    return -1;
}

/* A refusal that comes out the same on every retry: a wrong password, none given where one
 * is wanted, one given where none is set, a database index the server lacks, an ACL
 * without the command. Anything else (too many clients, a server still loading, ...)
 * passes, and the connection is tried again after the backoff. */
static int refused_for_good(const redisReply *rep) {
    static const char *const fatal[] = {"WRONGPASS", "NOPERM", "NOAUTH"};
    for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++)
        if (dg_reply_is_error(rep, fatal[i])) return 1;
    return rep->type == REDIS_REPLY_ERROR &&
           (strstr(rep->str, "invalid password") || strstr(rep->str, "without any password configured") ||
            strstr(rep->str, "no password is set") || strstr(rep->str, "DB index is out of range"));
}

/* A server at its maxclients accepts the connection, writes its refusal and closes it:
 * the first command's reply is that refusal, the next command's a reset connection (a
 * refusal read so was ignored as CLIENT SETNAME's, and the worker said only "Connection
 * reset by peer (is it a TLS port?)"). 1 when rep is it (recorded), to be retried. */
static int turned_away(dg_redis *r, const redisReply *rep) {
    if (!dg_reply_is_error(rep, "ERR max number of clients")) return 0;
    char where[300];
    snprintf(r->error, sizeof r->error, "%s turned the connection away: %s (the server's maxclients; or fewer "
             "clients)", dg_redis_where(r, where, sizeof where), rep->str);
    return 1;
}

/* Runs one set-up command (AUTH, SELECT); on an error reply records it and returns -1,
 * setting r->fatal for a refusal no retry mends (the worker exits 78 naming it). */
static int setup_cmd(dg_redis *r, const char *what, redisReply *rep) {
    if (!rep) {
        snprintf(r->error, sizeof r->error, "%s: %s", what, r->c->errstr);
        return -1;
    }
    const int bad = rep->type == REDIS_REPLY_ERROR;
    if (bad && !turned_away(r, rep)) {   /* turned away: said by it, and retried */
        snprintf(r->error, sizeof r->error, "%s refused: %s", what, rep->str);
        if (refused_for_good(rep)) r->fatal = 1;
    }
    freeReplyObject(rep);
    return bad ? -1 : 0;
}

static int connect_now(dg_redis *r) {
    if (r->n_sentinels && resolve_master(r)) return -1;
    char why[400] = "out of memory";
    if (r->unix_path[0]) {
        r->c = redisConnectUnixWithTimeout(r->unix_path, (struct timeval){1, 0});
        if (r->c && r->c->err) snprintf(why, sizeof why, "%s", r->c->errstr);
    } else {
        r->c = open_tcp(r, r->host, r->port, 1000, &r->link, why, sizeof why);
    }
    if (!r->c || r->c->err) {
        char where[300];
        snprintf(r->error, sizeof r->error, "connect %s: %s", dg_redis_where(r, where, sizeof where), why);
        goto fail;
    }
    struct timeval rt = {r->read_timeout_ms / 1000, (r->read_timeout_ms % 1000) * 1000};
    /* keepalive: hiredis's on a plain TCP socket; the relay's socket has its own (tls.c) */
    if (redisSetTimeout(r->c, rt) != REDIS_OK ||
        (!r->unix_path[0] && !r->tls && redisEnableKeepAlive(r->c) != REDIS_OK)) {
        snprintf(r->error, sizeof r->error, "socket options: %s", r->c->errstr);
        goto fail;
    }
    if (r->password[0]) {
        redisReply *rep = r->user[0] ? redisCommand(r->c, "AUTH %s %s", r->user, r->password)
                                     : redisCommand(r->c, "AUTH %s", r->password);
        if (setup_cmd(r, "AUTH", rep)) goto fail;
    }
    if (r->db && setup_cmd(r, "SELECT", redisCommand(r->c, "SELECT %d", r->db))) goto fail;
    if (r->n_sentinels) {
        redisReply *rep = redisCommand(r->c, "ROLE");
        if (rep && turned_away(r, rep)) {   /* the first command: a server at its maxclients */
            freeReplyObject(rep);
            goto fail;
        }
        int master = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements > 0 &&
                     rep->element[0]->type == REDIS_REPLY_STRING && !strcmp(rep->element[0]->str, "master");
        if (rep && refused_for_good(rep)) {   /* an ACL without ROLE: no retry mends it */
            snprintf(r->error, sizeof r->error, "ROLE refused: %s (Sentinel needs it to find the master)", rep->str);
            r->fatal = 1;
        } else if (!master) {
            char where[300];
            snprintf(r->error, sizeof r->error, "%s is not a master (yet)", dg_redis_where(r, where, sizeof where));
        }
        if (rep) freeReplyObject(rep);
        if (!master) goto fail;
    }
    /* CLIENT SETNAME is cosmetic (it names us in CLIENT LIST); an ACL that forbids it is not
     * a reason to stay away. */
    redisReply *rep = redisCommand(r->c, "CLIENT SETNAME %s", r->client_name);
    if (!rep) {
        snprintf(r->error, sizeof r->error, "CLIENT SETNAME: %s", r->c->errstr);
        goto fail;
    }
    const int away = turned_away(r, rep);
    freeReplyObject(rep);
    if (away) goto fail;
    /* a server still loading its dataset accepts connections and answers LOADING to every
     * command but a few: not connected yet, the backoff applies */
    if (!(rep = redisCommand(r->c, "PING"))) {
        snprintf(r->error, sizeof r->error, "PING: %s", r->c->errstr);
        goto fail;
    }
    const char *busy = not_ready(rep);
    if (busy) snprintf(r->error, sizeof r->error, "not ready: %s", busy);
    if (dg_reply_is_error(rep, "NOAUTH")) {   /* the server wants a password we were not given */
        snprintf(r->error, sizeof r->error, "PING refused: %s (no password was given: password_file, "
                 "or the URL's)", rep->str);
        r->fatal = 1;
        busy = "";
    }
    freeReplyObject(rep);
    if (busy) goto fail;
    return 0;
fail: {
    /* the first command finds a connection the server closed at once: where the TLS session
     * says why, that is the reason; a plain connection closed so is most likely a TLS port's */
    const int cut = r->c && (r->c->err == REDIS_ERR_EOF ||
                             (r->c->err == REDIS_ERR_IO && strstr(r->c->errstr, "reset by peer")));
    char ended[256] = "";
    if (r->c) redisFree(r->c);
    dg_tls_close(r->link, ended, sizeof ended);   /* after redisFree, as close_ctx */
    r->c = NULL;
    r->link = NULL;
    const size_t n = strlen(r->error);
    if (cut && ended[0]) snprintf(r->error + n, sizeof r->error - n, " (TLS: %s)", ended);
    else if (cut && !r->tls && !r->unix_path[0] && r->connects == 0)
        snprintf(r->error + n, sizeof r->error - n, " (is it a TLS port? rediss:// speaks TLS)");
    return -1;
}
}

int dg_redis_ready(dg_redis *r) {
    if (r->c) return 1;
    int64_t now = dg_mono_ms();
    if (now < r->next_try_ms) return 0;
    if (connect_now(r) == 0) {
        r->connects++;
        r->used_ms = dg_mono_ms();
        char where[300];
        if (r->failures) log_info("reconnected to Redis %s after %d attempts", dg_redis_where(r, where, sizeof where),
                                  r->failures);
        r->failures = 0;
        r->backoff_ms = 0;
        r->error[0] = 0;
        return 1;
    }
    r->failures++;
    r->backoff_ms = r->backoff_ms ? r->backoff_ms * 2 : 100;
    if (r->backoff_ms > DG_REDIS_BACKOFF_MAX_MS) r->backoff_ms = DG_REDIS_BACKOFF_MAX_MS;
    /* +-20% jitter so that a fleet does not reconnect in lockstep */
    int jitter = (int)(((unsigned)rand() % 41u)) - 20;
    r->next_try_ms = now + r->backoff_ms + r->backoff_ms * jitter / 100;
    if (r->failures == 1 || r->failures % 20 == 0)
        log_warn("Redis unavailable (attempt %d): %s", r->failures, r->error);
    return 0;
}

int dg_redis_wait_ms(const dg_redis *r) {
    if (r->c) return 0;
    int64_t d = r->next_try_ms - dg_mono_ms();
    return d > 0 ? (int)d : 0;
}

static void drop_said(dg_redis *r, const char *why, int say) {
    if (!r->c) return;
    snprintf(r->error, sizeof r->error, "%s", why);
    if (say) log_warn("Redis connection lost: %s", why);
    close_ctx(r->c, r->link);
    r->c = NULL;
    r->link = NULL;
    r->next_try_ms = dg_mono_ms() + 100;
}

void dg_redis_drop(dg_redis *r, const char *why) {
    r->cut_last = r->c != NULL;
    drop_said(r, why, 1);
}

/* hiredis's words for a broken command, with what they most likely mean: its read timeout
 * says only EAGAIN's strerror; a server closing connections idle past its `timeout` says
 * only that it closed them. That one is a guess made only when it repeats: the third
 * connection running closed under a command sent after a second or more of quiet (a kill,
 * a restart, a value over a limit cut one after an engine step as well). */
static void io_why(dg_redis *r, char *why, size_t n) {
    const char *e = r->c->errstr[0] ? r->c->errstr : "I/O error";
    const int idle = r->c->err == REDIS_ERR_EOF && r->idle_ms >= 1000;
    r->idle_cuts = idle ? r->idle_cuts + 1 : 0;
    if (r->c->err == REDIS_ERR_IO && (!strcmp(e, strerror(EAGAIN)) || !strcmp(e, strerror(EWOULDBLOCK))))
        snprintf(why, n, "no reply within %d ms (a paused, busy or distant Redis)", r->read_timeout_ms);
    else if (idle && r->idle_cuts >= 3)
        snprintf(why, n, "%s (%d connections running closed after a second or more idle, this one after %lld ms: "
                 "the server's `timeout` closing idle clients? 0 in stock Redis and deploy/redis/redis.conf)", e,
                 r->idle_cuts, (long long)r->idle_ms);
    else
        snprintf(why, n, "%s", e);
}

/* A command refused as not ready: the connection goes as after a break (what else the
 * pipeline did is unknown to its caller), and while refusals go on (each within 10 s of the
 * last) the next try waits longer, 100 ms doubled up to 5 s: a full Redis is not asked ten
 * times a second, though the reads after each reconnect go through. The log says the first
 * refusal of a run and every 20th. */
static void drop_refused(dg_redis *r, const char *why) {
    const int64_t now = dg_mono_ms();
    const int going_on = r->refused_ms && now - r->refused_at_ms < (int64_t)r->refused_ms + 10000;
    r->refused_ms = going_on ? (r->refused_ms * 2 < 5000 ? r->refused_ms * 2 : 5000) : 100;
    r->refusals = going_on ? r->refusals + 1 : 1;
    r->refused_at_ms = now;
    char said[sizeof r->error + 64];
    snprintf(said, sizeof said, "%s (refused %d times in a row; trying again in %d ms)", why, r->refusals,
             r->refused_ms);
    r->cut_last = 0;
    drop_said(r, r->refusals > 1 ? said : why, r->refusals == 1 || r->refusals % 20 == 0);
    snprintf(r->error, sizeof r->error, "%s", why);
    r->next_try_ms = now + r->refused_ms;
}

void dg_redis_close(dg_redis *r) {
    close_ctx(r->c, r->link);
    r->c = NULL;
    r->link = NULL;
}

/* ---- commands ------------------------------------------------------------------------------- */

redisReply *dg_redis_cmd(dg_redis *r, const dg_cmd *cmd) {
    if (!r->c) {
        r->cut_last = 0;   /* nothing sent */
        return NULL;
    }
    r->idle_ms = dg_mono_ms() - r->used_ms;
    redisReply *rep = redisCommandArgv(r->c, cmd->argc, (const char **)cmd->argv, cmd->len);
    if (rep) r->used_ms = dg_mono_ms();
    if (!rep) {
        char why[sizeof r->error];
        io_why(r, why, sizeof why);
        dg_redis_drop(r, why);
    } else if (not_ready(rep)) {
        char why[sizeof r->error];
        snprintf(why, sizeof why, "the server is not ready: %s", rep->str);
        freeReplyObject(rep);
        rep = NULL;
        drop_refused(r, why);
    }
    return rep;
}

redisReply *dg_redis_cmdv(dg_redis *r, const char *arg0, ...) {
    va_list ap;
    va_start(ap, arg0);
    dg_cmd *c = cmd_from_va(arg0, ap);
    va_end(ap);
    redisReply *rep = dg_redis_cmd(r, c);
    dg_cmd_free(c);
    return rep;
}

int dg_redis_pipeline(dg_redis *r, dg_cmd *const *cmds, int n, redisReply **replies) {
    char why[sizeof r->error] = "I/O error";
    int refused = 0;
    for (int i = 0; i < n; i++) replies[i] = NULL;
    if (!r->c) {
        r->cut_last = 0;   /* nothing sent */
        return -1;
    }
    r->idle_ms = dg_mono_ms() - r->used_ms;
    for (int i = 0; i < n; i++)
        if (redisAppendCommandArgv(r->c, cmds[i]->argc, (const char **)cmds[i]->argv, cmds[i]->len) != REDIS_OK)
            goto fail;
    for (int i = 0; i < n; i++) {
        void *rep = NULL;
        if (redisGetReply(r->c, &rep) != REDIS_OK) goto fail;
        replies[i] = rep;
    }
    /* one command refused as not ready: the others' effects are unknown to the caller, as
     * after a broken connection (a MULTI with a refused command is discarded whole) */
    for (int i = 0; i < n && !refused; i++)
        if (not_ready(replies[i])) {
            snprintf(why, sizeof why, "the server is not ready: %s", replies[i]->str);
            refused = 1;
        }
    r->used_ms = dg_mono_ms();
    if (!refused) return 0;
    goto drop;
fail:
    io_why(r, why, sizeof why);
drop:
    for (int i = 0; i < n; i++) {
        if (replies[i]) freeReplyObject(replies[i]);
        replies[i] = NULL;
    }
    if (refused) drop_refused(r, why);
    else dg_redis_drop(r, why);
    return -1;
}

int dg_redis_send(dg_redis *r, dg_cmd **cmds, int n) {
    redisReply *rep[8];
    if (n > 8) abort();
    const int rc = dg_redis_pipeline(r, cmds, n, rep);
    for (int i = 0; i < n; i++) {
        if (!rc) freeReplyObject(rep[i]);
        dg_cmd_free(cmds[i]);
    }
    return rc;
}

int dg_reply_is_error(const redisReply *rep, const char *prefix) {
    return rep && rep->type == REDIS_REPLY_ERROR && !strncmp(rep->str, prefix, strlen(prefix));
}

long long dg_reply_int(const redisReply *rep, long long dflt) {
    if (!rep) return dflt;
    if (rep->type == REDIS_REPLY_INTEGER) return rep->integer;
    if (rep->type == REDIS_REPLY_STRING) return strtoll(rep->str, NULL, 10);
    return dflt;
}
