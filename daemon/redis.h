/* Redis connections of the daemon (hiredis 0.14 API, RESP2).
 *
 * A dg_redis is one connection that heals itself: when a command fails with an I/O error,
 * or the server answers that it is not ready (LOADING its dataset after a restart, BUSY with
 * a script, MASTERDOWN), the context is dropped, and dg_redis_ready() reconnects later with
 * jittered exponential backoff (100 ms .. 5 s), re-applying the socket timeouts (hiredis
 * 0.14 forgets them on reconnect), keepalive, AUTH, SELECT and CLIENT SETNAME; a PING that
 * is answered not ready fails the reconnect. With Sentinels configured, every reconnect
 * asks them for the current master and checks its ROLE. A rediss:// URL puts every
 * connection over TLS (tls.h).
 *
 * Not thread-safe: each thread owns its connections. */
#ifndef DG_REDIS_H
#define DG_REDIS_H

#include <hiredis.h>
#include <stddef.h>
#include <stdint.h>

#include "daemon_config.h"
#include "tls.h"

/* A command under construction: binary-safe arguments with their lengths. */
#define DG_REDIS_BACKOFF_MAX_MS 5000   /* the longest wait between connect attempts, before jitter */

typedef struct {
    int     argc, cap;
    char  **argv;   /* owned copies, each NUL-terminated */
    size_t *len;
} dg_cmd;

dg_cmd *dg_cmd_new(void);
void    dg_cmd_free(dg_cmd *c);   /* accepts NULL */
void    dg_cmd_add(dg_cmd *c, const void *data, size_t len);
void    dg_cmd_adds(dg_cmd *c, const char *s);
void    dg_cmd_addf(dg_cmd *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
dg_cmd *dg_cmd_of(const char *arg0, ...);   /* strings, NULL-terminated */
size_t  dg_cmd_largest(const dg_cmd *c, size_t *all);   /* its longest argument's length; *all: their sum */

#define DG_SENTINELS_MAX 8

typedef struct {
    /* where: from the URL, or from the Sentinels at each connect */
    char   host[256];
    int    port;
    char   unix_path[256];
    int    db;
    char   user[128];
    char   password[512];
    int    n_sentinels;
    char   sentinel_host[DG_SENTINELS_MAX][256];
    int    sentinel_port[DG_SENTINELS_MAX];
    char   master_name[128];
    char   client_name[256];
    int    read_timeout_ms;     /* must exceed any BLOCK used on this connection */
    int    tls;                 /* rediss://: every connection (Sentinels' too) over TLS (tls.h) */
    dg_tls_opts tls_opts;
    dg_tls_link *link;          /* owned: c's TLS relay; NULL without TLS */

    redisContext *c;            /* owned; NULL while disconnected */
    int64_t next_try_ms;        /* monotonic time of the next connect attempt */
    int     backoff_ms;         /* up to DG_REDIS_BACKOFF_MAX_MS, +-20% */
    int     failures;           /* consecutive failed connects */
    int     refused_ms;         /* the wait after a refusal (not ready, full, read-only),
                                   doubled while refusals go on (each within 10 s of the last:
                                   a full Redis still answers reads, so a command that went
                                   through does not say the refusals are over) */
    int     refusals;           /* refusals in that run, for the log (the 1st, every 20th) */
    int64_t refused_at_ms;      /* monotonic time of the last refusal */
    int     fatal;              /* authentication or permission refused: retrying will not help */
    int     cut_last;           /* the last command or pipeline that failed was sent and cut
                                   by a lost connection: not refused as not ready (the server
                                   answered), not unsent (no connection) */
    uint64_t connects;          /* successful connects so far: a new one forgets WATCHes */
    int64_t used_ms;            /* monotonic time of the last reply (or the connect) */
    int64_t idle_ms;            /* how long the connection had been idle when the last
                                   command went (a server's `timeout` closes idle ones) */
    int     idle_cuts;          /* connections running closed by the server under a command
                                   sent after a second or more idle */
    char    error[512];         /* the last problem, for logs and the heartbeat */
} dg_redis;

/* Parses the configuration (URL, password file, Sentinels). No network I/O. */
int  dg_redis_init(dg_redis *r, const dg_daemon_config *cfg, const char *client_name,
                   int read_timeout_ms, char *err, size_t errlen);
/* url as a log may show it: a password in it written *** */
void dg_redis_url_redact(const char *url, char *out, size_t n);
/* Where r connects: host:port, [v6]:port or the socket's path; returns buf. */
const char *dg_redis_where(const dg_redis *r, char *buf, size_t n);
/* 1 when connected (connecting now if the backoff allows), 0 when not. Sets r->fatal when
 * the server refused our credentials. */
int  dg_redis_ready(dg_redis *r);
/* Milliseconds until the next connect attempt (0 when connected or due). */
int  dg_redis_wait_ms(const dg_redis *r);
void dg_redis_drop(dg_redis *r, const char *why);
void dg_redis_close(dg_redis *r);

/* One command. NULL on an I/O error, or when the server is not ready (it answered LOADING,
 * BUSY or MASTERDOWN: it loads its dataset, say), the connection then dropped; NULL when
 * disconnected. Other error replies are returned as replies. The caller frees the reply. */
redisReply *dg_redis_cmd(dg_redis *r, const dg_cmd *cmd);
redisReply *dg_redis_cmdv(dg_redis *r, const char *arg0, ...);   /* strings, NULL-terminated */

/* Sends n commands in one pipeline and reads n replies into replies[]. Returns 0, or -1
 * on an I/O error or when one reply says the server is not ready (connection dropped,
 * replies[] all NULL; which of the commands ran is unknown). */
int  dg_redis_pipeline(dg_redis *r, dg_cmd *const *cmds, int n, redisReply **replies);
/* The same for commands whose replies nobody reads (n <= 8): frees the commands and the
 * replies. 0, or -1 as dg_redis_pipeline. */
int  dg_redis_send(dg_redis *r, dg_cmd **cmds, int n);

/* Helpers over replies. */
int  dg_reply_is_error(const redisReply *rep, const char *prefix);   /* error starting with prefix */
long long dg_reply_int(const redisReply *rep, long long dflt);
int64_t dg_now_ms(void);      /* CLOCK_REALTIME, ms */
int64_t dg_mono_ms(void);     /* CLOCK_MONOTONIC, ms */

#endif
