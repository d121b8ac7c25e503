/* TLS for the daemon's and duogenctl's Redis connections (rediss:// URLs).
 *
 * hiredis 0.14 (Debian 12's) speaks plain sockets only. A TLS connection here is a relay:
 * dg_tls_open connects to the server and completes the handshake in the caller's thread
 * (the server's certificate checked against tls_ca_file, or the system's CAs, and its name
 * against the host or tls_server_name; a client certificate sent where one is set), then
 * hands the session to a thread of its own that carries bytes between it and one end of a
 * socketpair. hiredis gets the other end (redisConnectFd) and speaks RESP there as to any
 * server: timeouts, pipelines and replies of many megabytes work as on TCP.
 *
 * Either end closes the other. The server closing the connection, or a TLS failure (logged,
 * with OpenSSL's reason), closes the relay's end of the pair: hiredis reads end-of-file, as
 * when a plain server goes, and the connection heals as any other (redis.h). redisFree
 * closes hiredis's end: the relay sends close_notify, closes the socket and ends, and
 * dg_tls_close joins it; no thread outlives its connection.
 *
 * The files are read again at every connect: a certificate, key or CA bundle rotated on
 * disk is used from the next reconnect on, without a restart. dg_tls_check reads them once
 * at start, so that a missing or unreadable file or a key that does not match its
 * certificate stops the start with its name. */
#ifndef DG_TLS_H
#define DG_TLS_H

#include <stddef.h>

typedef struct {
    char ca_file[512];       /* PEM CA certificates the server's must chain to; "" = the system's */
    char cert_file[512];     /* PEM client certificate (chain); "" = none */
    char key_file[512];      /* PEM key of cert_file; "" = in cert_file */
    char server_name[256];   /* the name checked in the server's certificate and sent as SNI;
                                "" = the host connected to */
} dg_tls_opts;

typedef struct dg_tls_link dg_tls_link;   /* one connection's session and relay thread */

/* Reads the files as a connect would. 0, or -1 with err naming the file and the problem. */
int  dg_tls_check(const dg_tls_opts *o, char *err, size_t errlen);

/* Connects to host:port within timeout_ms (the TCP connect, and the handshake again), and
 * starts the relay. Returns the file descriptor hiredis is to use (its end of the pair),
 * *link set; or -1 with err saying what failed (the name, the connect, the handshake, the
 * certificate and why it was refused). */
int  dg_tls_open(const dg_tls_opts *o, const char *host, int port, int timeout_ms, dg_tls_link **link,
                 char *err, size_t errlen);

/* After hiredis's end is closed (redisFree): waits for the relay to end and frees it.
 * Where why is not NULL, it gets why the session ended before that ("" where hiredis's
 * close ended it): the server's close, a TLS failure, or that the server asked for a
 * client certificate and none is set. Accepts NULL. */
void dg_tls_close(dg_tls_link *l, char *why, size_t whylen);

#endif
