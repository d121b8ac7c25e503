#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "log.h"

struct dg_tls_link {
    pthread_t thread;
    SSL_CTX  *ctx;
    SSL      *ssl;
    int       tcp;          /* the socket to the server (non-blocking) */
    int       pair;         /* the relay's end of the socketpair (non-blocking) */
    char      peer[300];    /* host:port, for the log */
    int       asked_cert;   /* the server asked for a client certificate, and none is set */
    int       answered;     /* the server's first bytes after the handshake have come */
    char      failure[400]; /* why the relay ended, where not by hiredis's close (read after the join) */
    unsigned char up[16384];     /* hiredis -> server, not yet taken by the session */
    unsigned char down[16384];   /* server -> hiredis, not yet taken by the pair */
};

/* ---- errors ---------------------------------------------------------------------------------- */

/* OpenSSL's reason for the failure in this thread ("no start line", "key values
 * mismatch", ...): the first error queued, the cause (a later one wraps it: "PEM lib"), its
 * queue then emptied; `dflt` where it holds none. */
static const char *ssl_reason(char *buf, size_t len, const char *dflt) {
    unsigned long e = ERR_peek_error();
    if (!e) {
        snprintf(buf, len, "%s", dflt);
    } else {
        const char *r = ERR_reason_error_string(e);
        if (r) snprintf(buf, len, "%s", r);
        else ERR_error_string_n(e, buf, len);
    }
    ERR_clear_error();
    return buf;
}

static int64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- the files --------------------------------------------------------------------------------- */

/* Whether the file a setting names (where it names one) can be read by this process: a
 * missing or forbidden one is said with its setting's name and errno's words. */
static int readable(const char *setting, const char *path, char *err, size_t errlen) {
    if (!path[0] || !access(path, R_OK)) return 0;
    snprintf(err, errlen, "%s \"%s\": %s", setting, path, strerror(errno));
    return -1;
}

/* OpenSSL's pass phrase callback: an encrypted key would otherwise be asked for on the
 * terminal (of a daemon under systemd, or twice over of duogenctl) and then fail. Nothing is
 * given; *asked says that a pass phrase was wanted, so the refusal can say so. */
static int no_pass_phrase(char *buf, int size, int rwflag, void *asked) {
    (void)buf, (void)size, (void)rwflag;
    if (asked) *(int *)asked = 1;
    return -1;
}

/* A client context over the files, read now. NULL with err naming the file. */
static SSL_CTX *make_ctx(const dg_tls_opts *o, char *err, size_t errlen) {
    char why[256];
    int asked = 0;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        snprintf(err, errlen, "TLS: %s", ssl_reason(why, sizeof why, "out of memory"));
        return NULL;
    }
    SSL_CTX_set_default_passwd_cb(ctx, no_pass_phrase);
    SSL_CTX_set_default_passwd_cb_userdata(ctx, &asked);
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    /* the relay writes what hiredis gave it as it can, from a buffer of its own */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* a server that closes without close_notify (Redis on SHUTDOWN, CLIENT KILL) ends the
     * connection as a plain one ends: RESP frames itself, so a cut reply is still seen */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (readable("tls_ca_file", o->ca_file, err, errlen) || readable("tls_cert_file", o->cert_file, err, errlen) ||
        readable("tls_key_file", o->key_file, err, errlen))
        goto fail;
    if (o->key_file[0] && !o->cert_file[0]) {
        snprintf(err, errlen, "tls_key_file \"%s\" is set without tls_cert_file", o->key_file);
        goto fail;
    }
    if (o->ca_file[0] ? !SSL_CTX_load_verify_locations(ctx, o->ca_file, NULL) : !SSL_CTX_set_default_verify_paths(ctx)) {
        if (o->ca_file[0])
            snprintf(err, errlen, "tls_ca_file \"%s\": no PEM certificate read (%s)", o->ca_file,
                     ssl_reason(why, sizeof why, "unreadable"));
        else snprintf(err, errlen, "TLS: the system's CA certificates: %s", ssl_reason(why, sizeof why, "unreadable"));
        goto fail;
    }
    if (o->cert_file[0]) {
        const char *key = o->key_file[0] ? o->key_file : o->cert_file;
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert_file) != 1) {
            snprintf(err, errlen, "tls_cert_file \"%s\": no PEM certificate read (%s)", o->cert_file,
                     ssl_reason(why, sizeof why, "unreadable"));
            goto fail;
        }
        int mismatch = 0;
        if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 &&
            !(mismatch = ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH)) {
            if (asked)
                snprintf(err, errlen, "tls_key_file \"%s\" is encrypted: the key must be readable without a pass "
                         "phrase (written so by `openssl pkey -in KEY -out PLAIN`, kept readable by this user "
                         "only)", key);
            else
                snprintf(err, errlen, "tls_key_file \"%s\": no PEM private key read (%s)%s", key,
                         ssl_reason(why, sizeof why, "unreadable"),
                         o->key_file[0] ? "" : "; tls_key_file is not set, so the key is looked for there");
            goto fail;
        }
        if (mismatch || SSL_CTX_check_private_key(ctx) != 1) {
            snprintf(err, errlen, "tls_key_file \"%s\" is not the key of tls_cert_file \"%s\" (%s)", key, o->cert_file,
                     ssl_reason(why, sizeof why, "mismatch"));
            goto fail;
        }
    }
    SSL_CTX_set_default_passwd_cb_userdata(ctx, NULL);   /* `asked` ends here; the context does not */
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

int dg_tls_check(const dg_tls_opts *o, char *err, size_t errlen) {
    SSL_CTX *ctx = make_ctx(o, err, errlen);
    SSL_CTX_free(ctx);
    return ctx ? 0 : -1;
}

/* ---- connecting --------------------------------------------------------------------------------- */

/* Waits for fd to be ready for `events` until the monotonic deadline. 0, or -1 with errno
 * (ETIMEDOUT past the deadline). */
static int wait_fd(int fd, short events, int64_t deadline) {
    for (;;) {
        const int64_t left = deadline - mono_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        struct pollfd p = {fd, events, 0};
        const int n = poll(&p, 1, (int)left);
        if (n > 0) return 0;
        if (n < 0 && errno != EINTR) return -1;
    }
}

/* A non-blocking TCP socket connected to host:port (each address in turn), with hiredis's
 * options: no Nagle, keepalive probes after 15 s idle. -1 with err. */
static int tcp_connect(const char *host, int port, int64_t deadline, char *err, size_t errlen) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    const int g = getaddrinfo(host, service, &hints, &res);
    if (g) {
        snprintf(err, errlen, "%s", g == EAI_SYSTEM ? strerror(errno) : gai_strerror(g));
        return -1;
    }
    int fd = -1;
    for (const struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            snprintf(err, errlen, "socket: %s", strerror(errno));
            continue;
        }
        int e = 0;
        socklen_t el = sizeof e;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        if (errno == EINPROGRESS && !wait_fd(fd, POLLOUT, deadline) && !getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el) &&
            !e)
            break;
        snprintf(err, errlen, "%s", strerror(e ? e : errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) return -1;
    const int one = 1, idle = 15, intvl = 5, cnt = 3;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    return fd;
}

/* What a failed handshake means, for the operator: the certificate refused and why, or
 * OpenSSL's reason, or the socket's. `waited`: the wait for the socket failed (errno). */
static void handshake_error(SSL *ssl, int rc, int waited, const char *name, char *err, size_t errlen) {
    const int saved = errno;
    char why[256];
    const long v = SSL_get_verify_result(ssl);
    if (v != X509_V_OK) {
        const char *hint = "";
        if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH)
            hint = ": it does not name the host (tls_server_name sets the name to check)";
        else if (v == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT || v == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN ||
                 v == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY || v == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT)
            hint = ": no CA of tls_ca_file (or of the system's, where it is not set) signed it";
        snprintf(err, errlen, "TLS: the server's certificate for \"%s\" was refused: %s%s", name,
                 X509_verify_cert_error_string(v), hint);
    } else if (waited) {
        snprintf(err, errlen, "TLS handshake: %s", saved == ETIMEDOUT ? "timed out" : strerror(saved));
    } else if (SSL_get_error(ssl, rc) == SSL_ERROR_SYSCALL && !ERR_peek_last_error()) {
        snprintf(err, errlen, "TLS handshake: %s",
                 saved ? strerror(saved) : "the server closed the connection (is it a TLS port?)");
    } else {
        snprintf(err, errlen, "TLS handshake: %s", ssl_reason(why, sizeof why, "failed"));
    }
    ERR_clear_error();
}

/* The handshake on the non-blocking socket until the deadline. */
static int handshake(SSL *ssl, int fd, int64_t deadline, const char *name, char *err, size_t errlen) {
    for (;;) {
        ERR_clear_error();
        errno = 0;
        const int rc = SSL_connect(ssl);
        if (rc == 1) return 0;
        const int e = SSL_get_error(ssl, rc);
        int waited = 0;
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            if (!wait_fd(fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline)) continue;
            waited = 1;
        }
        handshake_error(ssl, rc, waited, name, err, errlen);
        return -1;
    }
}

static void *relay(void *arg);

/* Called by OpenSSL where the server asks for a client certificate and none is set: the
 * handshake goes on without one (a server with tls-auth-clients optional takes that), and
 * a refusal after it can say why. */
static int client_cert_cb(SSL *ssl, X509 **x509, EVP_PKEY **pkey) {
    (void)x509, (void)pkey;
    dg_tls_link *l = SSL_get_app_data(ssl);
    l->asked_cert = 1;
    return 0;
}

/* Discards a SIGPIPE our writes raised while it was blocked (not one that was pending
 * before), and restores the thread's mask. */
static void sigpipe_restore(const sigset_t *pipe_set, const sigset_t *old, int was_pending) {
    const struct timespec zero = {0, 0};
    if (!was_pending)
        while (sigtimedwait(pipe_set, NULL, &zero) > 0) {}
    pthread_sigmask(SIG_SETMASK, old, NULL);
}

static const char no_cert[] = "the server asked for a client certificate, and none is set: tls_cert_file and tls_key_file";

int dg_tls_open(const dg_tls_opts *o, const char *host, int port, int timeout_ms, dg_tls_link **link,
                char *err, size_t errlen) {
    *link = NULL;
    const int64_t deadline = mono_ms() + timeout_ms;
    dg_tls_link *l = calloc(1, sizeof *l);
    if (!l) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    l->tcp = l->pair = -1;
    if (strchr(host, ':')) snprintf(l->peer, sizeof l->peer, "[%s]:%d", host, port);
    else snprintf(l->peer, sizeof l->peer, "%s:%d", host, port);
    int sv[2] = {-1, -1};
    /* a write to a server that has gone raises SIGPIPE in this thread (duogenctl does not
     * ignore it): blocked while we write, and one we raised discarded */
    sigset_t pipe_set, old;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    sigset_t pending;
    sigpending(&pending);
    const int pipe_was_pending = sigismember(&pending, SIGPIPE) == 1;

    char why[256];
    if (!(l->ctx = make_ctx(o, err, errlen))) goto fail;
    if ((l->tcp = tcp_connect(host, port, deadline, why, sizeof why)) < 0) {
        snprintf(err, errlen, "%s", why);
        goto fail;
    }
    if (!o->cert_file[0]) SSL_CTX_set_client_cert_cb(l->ctx, client_cert_cb);
    if (!(l->ssl = SSL_new(l->ctx)) || SSL_set_fd(l->ssl, l->tcp) != 1) {
        snprintf(err, errlen, "TLS: %s", ssl_reason(why, sizeof why, "out of memory"));
        goto fail;
    }
    SSL_set_app_data(l->ssl, l);
    /* the name the certificate must carry: a DNS name (also sent as SNI) or an address */
    const char *name = o->server_name[0] ? o->server_name : host;
    unsigned char addr[sizeof(struct in6_addr)];
    const int is_ip = inet_pton(AF_INET, name, addr) == 1 || inet_pton(AF_INET6, name, addr) == 1;
    X509_VERIFY_PARAM *vp = SSL_get0_param(l->ssl);
    X509_VERIFY_PARAM_set_hostflags(vp, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(vp, name) != 1
              : SSL_set_tlsext_host_name(l->ssl, name) != 1 || X509_VERIFY_PARAM_set1_host(vp, name, 0) != 1) {
        snprintf(err, errlen, "TLS: \"%s\" cannot be checked as a host name (%s)", name,
                 ssl_reason(why, sizeof why, "refused"));
        goto fail;
    }
    if (handshake(l->ssl, l->tcp, deadline, name, err, errlen)) {
        if (l->asked_cert) snprintf(err, errlen, "TLS handshake: %s", no_cert);
        goto fail;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) {
        snprintf(err, errlen, "socketpair: %s", strerror(errno));
        goto fail;
    }
    l->pair = sv[0];
    if (fcntl(l->pair, F_SETFL, fcntl(l->pair, F_GETFL) | O_NONBLOCK)) {
        snprintf(err, errlen, "fcntl: %s", strerror(errno));
        goto fail;
    }
    /* the relay takes no signal: they go to the threads that handle them */
    sigset_t all, mine;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &mine);
    const int rc = pthread_create(&l->thread, NULL, relay, l);
    pthread_sigmask(SIG_SETMASK, &mine, NULL);
    if (rc) {
        snprintf(err, errlen, "the TLS relay's thread: %s", strerror(rc));
        goto fail;
    }
    sigpipe_restore(&pipe_set, &old, pipe_was_pending);
    log_debug("TLS connection to %s: %s, %s", l->peer, SSL_get_version(l->ssl), SSL_get_cipher_name(l->ssl));
    *link = l;
    return sv[1];
fail:
    sigpipe_restore(&pipe_set, &old, pipe_was_pending);
    if (sv[1] >= 0) close(sv[1]);
    if (l->pair >= 0) close(l->pair);
    if (l->tcp >= 0) close(l->tcp);
    SSL_free(l->ssl);
    SSL_CTX_free(l->ctx);
    free(l);
    return -1;
}

void dg_tls_close(dg_tls_link *l, char *why, size_t whylen) {
    if (!l) return;
    pthread_join(l->thread, NULL);
    if (why && whylen) snprintf(why, whylen, "%s", l->asked_cert ? no_cert : l->failure);
    SSL_free(l->ssl);
    SSL_CTX_free(l->ctx);
    free(l);
}

/* ---- the relay ---------------------------------------------------------------------------------- */

static int again(void) { return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR; }

/* After an SSL call on the session returned rc <= 0: the poll event it waits for (POLLIN,
 * POLLOUT), or 0 when the session is over: *closed where the server ended it in order,
 * else *failed says why. */
static short ssl_wait(SSL *ssl, int rc, int *closed, const char **failed, char *why, size_t len) {
    const int saved = errno;
    switch (SSL_get_error(ssl, rc)) {
    case SSL_ERROR_WANT_READ: return POLLIN;
    case SSL_ERROR_WANT_WRITE: return POLLOUT;
    case SSL_ERROR_ZERO_RETURN: *closed = 1; return 0;
    case SSL_ERROR_SYSCALL:
        if (!ERR_peek_last_error()) {
            snprintf(why, len, "%s", saved ? strerror(saved) : "the connection broke");
            *failed = why;
            return 0;
        }
        /* fall through */
    default: *failed = ssl_reason(why, len, "the connection broke"); return 0;
    }
}

/* Carries hiredis's bytes to the server ("up") and the server's to hiredis ("down"), each
 * through a buffer of its own, until one side ends. A pass tries each direction as far as
 * it goes without waiting; then the relay waits for what the blocked calls wait for. A
 * read from the session is made only with the down buffer empty, so the server's orderly
 * end leaves nothing undelivered. */
static void *relay(void *arg) {
    dg_tls_link *l = arg;
    size_t up_len = 0, up_off = 0, down_len = 0, down_off = 0;
    const char *failed = NULL;   /* a TLS failure, logged; NULL: an orderly end */
    char why[256];
    int client_gone = 0, server_closed = 0, tcp_hup = 0;
    for (;;) {
        short tcp_events = 0;
        for (int progress = 1; progress && !client_gone && !server_closed && !failed;) {
            progress = 0;
            tcp_events = 0;
            if (up_off == up_len) {
                const ssize_t n = recv(l->pair, l->up, sizeof l->up, 0);
                if (n > 0) up_len = (size_t)n, up_off = 0, progress = 1;
                else if (n == 0 || !again()) client_gone = 1;
            }
            if (up_off < up_len && !client_gone) {
                ERR_clear_error();
                errno = 0;
                const int w = SSL_write(l->ssl, l->up + up_off, (int)(up_len - up_off));
                if (w > 0) up_off += (size_t)w, progress = 1;
                else tcp_events |= ssl_wait(l->ssl, w, &server_closed, &failed, why, sizeof why);
            }
            if (down_off == down_len && !client_gone && !server_closed && !failed) {
                ERR_clear_error();
                errno = 0;
                const int rd = SSL_read(l->ssl, l->down, sizeof l->down);
                if (rd > 0) down_len = (size_t)rd, down_off = 0, progress = 1, l->answered = 1;
                else tcp_events |= ssl_wait(l->ssl, rd, &server_closed, &failed, why, sizeof why);
            }
            if (down_off < down_len && !client_gone) {
                const ssize_t n = send(l->pair, l->down + down_off, down_len - down_off, MSG_NOSIGNAL);
                if (n > 0) down_off += (size_t)n, progress = 1;
                else if (!again()) client_gone = 1;
            }
        }
        if (client_gone || server_closed || failed) break;
        struct pollfd p[2] = {
            {l->pair, (short)((up_off == up_len ? POLLIN : 0) | (down_off < down_len ? POLLOUT : 0)), 0},
            {tcp_hup && !tcp_events ? -1 : l->tcp, tcp_events, 0},
        };
        if (poll(p, 2, -1) < 0 && errno != EINTR) {
            snprintf(why, sizeof why, "poll: %s", strerror(errno));
            failed = why;
            break;
        }
        /* hiredis's end closed: nobody waits for what is left either way */
        if (p[0].revents & (POLLHUP | POLLERR)) client_gone = 1;
        /* the server's socket ended: the next SSL call says how; no spinning on it meanwhile */
        if (p[1].revents & (POLLHUP | POLLERR)) tcp_hup = 1;
    }
    /* TLS 1.3: the server checks a client certificate after the client's handshake is done,
     * and one it refuses ends the connection with an alert that the reset often overtakes:
     * said, where the server never answered */
    char refused[sizeof l->failure];
    if ((failed || server_closed) && SSL_get_certificate(l->ssl) && !l->answered) {   /* tls_cert_file set */
        snprintf(refused, sizeof refused, "%s, before any answer: the server may have refused the client "
                 "certificate (tls_cert_file: signed by a CA the server trusts?)", failed ? failed : "closed");
        failed = refused;
    }
    if (failed) {   /* no SSL_shutdown after a failure (OpenSSL forbids it) */
        snprintf(l->failure, sizeof l->failure, "%s", failed);
        log_warn("TLS connection to %s: %s", l->peer, failed);
    } else if (server_closed) {
        snprintf(l->failure, sizeof l->failure, "the server closed the connection");
        log_debug("TLS connection to %s: closed by the server", l->peer);
    } else {
        SSL_shutdown(l->ssl);   /* hiredis closed: close_notify, where the socket takes it now */
        ERR_clear_error();
    }
    close(l->tcp);
    l->tcp = -1;
    if (!client_gone) {
        /* the server is gone: hiredis reads end-of-file; what it writes meanwhile (the
         * command it sends before it reads) is taken and dropped until it closes its end,
         * so that its write() neither raises SIGPIPE (duogenctl does not ignore it: a
         * TLS 1.3 server refuses a missing client certificate after the handshake, when
         * the first command may be on its way) nor blocks on a full socket */
        shutdown(l->pair, SHUT_WR);
        for (;;) {
            struct pollfd p = {l->pair, POLLIN, 0};
            if (poll(&p, 1, -1) < 0 && errno != EINTR) break;
            const ssize_t n = recv(l->pair, l->up, sizeof l->up, 0);
            if (n == 0 || (n < 0 && !again())) break;
        }
    }
    close(l->pair);
    l->pair = -1;
    return NULL;
}
