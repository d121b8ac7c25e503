/* libFuzzer target: the Redis URL and Sentinel list readers (daemon/redis.c) on arbitrary
 * text, as an operator may write it: the URL, then after a newline the Sentinel list. They
 * must never crash; a refusal comes with a reason and says nothing of the URL's password; what
 * is read is a usable endpoint (a host or a socket path, a port 1..65535); and a URL written
 * back from what was read (the user and password percent-encoded, an IPv6 host in brackets)
 * reads the same. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../daemon/redis.h"

/* s percent-encoded where a URL's userinfo needs it */
static void encode(char *out, const char *s) {
    for (; *s; s++) {
        const unsigned char c = (unsigned char)*s;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("-._~", c))
            *out++ = (char)c;
        else
            out += sprintf(out, "%%%02X", c);
    }
    *out = 0;
}

/* another letter or digit of the same kind: a hex digit stays one, 0 stays 0 (%00 stays
 * refused) */
static char rotate(char c) {
    static const char *const kinds[] = {"123456789", "abcdef", "ghijklmnopqrstuvwxyz", "ABCDEF",
                                        "GHIJKLMNOPQRSTUVWXYZ"};
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        const char *at = c ? strchr(kinds[k], c) : NULL;
        if (at) return at[1] ? at[1] : kinds[k][0];
    }
    return c;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static dg_daemon_config cfg;
    dg_daemon_config_defaults(&cfg);
    if (size >= sizeof cfg.redis_url) return 0;
    const uint8_t *nl = memchr(data, '\n', size);
    const size_t ul = nl ? (size_t)(nl - data) : size;
    memcpy(cfg.redis_url, data, ul);
    cfg.redis_url[ul] = 0;
    if (nl && size - ul - 1 >= sizeof cfg.sentinel) return 0;
    if (nl) {
        memcpy(cfg.sentinel, nl + 1, size - ul - 1);
        cfg.sentinel[size - ul - 1] = 0;
        snprintf(cfg.master_name, sizeof cfg.master_name, "m");
    }
    if (memchr(cfg.redis_url, 0, ul) || (nl && memchr(cfg.sentinel, 0, size - ul - 1))) return 0;

    static dg_redis r, again;
    char err[2048] = "";
    if (dg_redis_init(&r, &cfg, "fuzz", 1000, err, sizeof err)) {
        if (!err[0]) abort();   /* a refusal without a reason is a bug */
        /* the error says nothing of the password: the same URL with the password's letters
         * and digits changed (keeping its %-escapes valid or not as they were) is refused
         * with the same text */
        const char *p = strstr(cfg.redis_url, "://");
        const char *end = p ? p + 3 + strcspn(p + 3, "/?#") : NULL, *at = NULL;
        for (const char *q = p ? p + 3 : NULL; q && q < end; q++)
            if (*q == '@') at = q;
        char *colon = at ? memchr(p + 3, ':', (size_t)(at - p - 3)) : NULL;
        if (!colon) return 0;
        char first[sizeof err];
        snprintf(first, sizeof first, "%s", err);
        for (char *q = colon + 1; q < at; q++) *q = rotate(*q);
        if (!dg_redis_init(&again, &cfg, "fuzz", 1000, err, sizeof err) || strcmp(err, first)) {
            fprintf(stderr, "the password changed the error:\n  %s\n  %s\n", first, err);
            abort();
        }
        return 0;
    }
    if (r.unix_path[0] ? r.port != 0 : (!r.host[0] || r.port < 1 || r.port > 65535)) abort();
    for (int i = 0; i < r.n_sentinels; i++)
        if (!r.sentinel_host[i][0] || r.sentinel_port[i] < 1 || r.sentinel_port[i] > 65535) abort();
    if (r.unix_path[0]) return 0;

    /* written back and read again: the same endpoint and credentials */
    static char user[3 * sizeof r.user], pass[3 * sizeof r.password];
    encode(user, r.user);
    encode(pass, r.password);
    const int v6 = strchr(r.host, ':') != NULL;
    snprintf(cfg.redis_url, sizeof cfg.redis_url, "redis%s://%s%s%s%s%s%s%s:%d/%d", r.tls ? "s" : "", user,
             r.password[0] ? ":" : "", pass, r.user[0] || r.password[0] ? "@" : "", v6 ? "[" : "", r.host,
             v6 ? "]" : "", r.port, r.db);
    cfg.sentinel[0] = 0;
    if (strlen(cfg.redis_url) >= sizeof cfg.redis_url - 1) return 0;   /* did not fit the setting */
    if (dg_redis_init(&again, &cfg, "fuzz", 1000, err, sizeof err)) {
        fprintf(stderr, "written back as %s: %s\n", cfg.redis_url, err);
        abort();
    }
    if (strcmp(again.host, r.host) || again.port != r.port || again.db != r.db || strcmp(again.user, r.user) ||
        strcmp(again.password, r.password) || again.tls != r.tls)
        abort();
    return 0;
}
