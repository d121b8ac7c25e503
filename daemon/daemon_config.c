#include "daemon_config.h"
#include "duogen.h"
#include "job.h"
#include "log.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef enum { KEY_GROUP, KEY_STR, KEY_INT, KEY_SIZE } key_type;

/* The one table of settings: the file's keys, the command-line options, --help and the
 * manual pages duogend(8) and duogend.conf(5) all come from it. A GROUP row starts the
 * heading the rows after it are listed under; it is not a setting. */
#define GROUP(title)             {title, KEY_GROUP, 0, 0, 0, 0, NULL}
#define STR(name, help)          {#name, KEY_STR, offsetof(dg_daemon_config, name), sizeof(((dg_daemon_config *)0)->name), 0, 0, help}
#define STRINGIFY_(x) #x
#define STRINGIFY(x)  STRINGIFY_(x)
#define INT(name, lo, hi, help)  {#name, KEY_INT, offsetof(dg_daemon_config, name), 0, lo, hi, help}
#define SIZE(name, help)         {#name, KEY_SIZE, offsetof(dg_daemon_config, name), 0, 1, 0, help}
#define SIZE0(name, help)        {#name, KEY_SIZE, offsetof(dg_daemon_config, name), 0, 0, 0, help}

static const struct key {
    const char *name;
    key_type    type;
    size_t      offset, size;
    long long   lo, hi;
    const char *help;
} keys[] = {
    GROUP("Redis"),
    STR(redis_url, "redis://[user[:password]@]host:port/db (an IPv6 address in brackets, [::1]; '@', ':', '/' "
                   "and '%' of a password written %40, %3A, %2F, %25), rediss://... (TLS) or unix:///path"),
    STR(password_file, "file holding the Redis password"),
    STR(sentinel, "host:port,... of Redis Sentinels (an IPv6 address in brackets; spoken to over TLS too with a "
                  "rediss:// URL)"),
    STR(master_name, "Sentinel master name"),
    STR(tls_ca_file, "with rediss://: PEM CA certificates the server's certificate must chain to (empty: the "
                     "system's); read again at every connect, as the two below"),
    STR(tls_cert_file, "with rediss://: PEM client certificate, for a server that asks for one (tls-auth-clients)"),
    STR(tls_key_file, "with rediss://: PEM key of tls_cert_file, not encrypted (empty: in that file)"),
    STR(tls_server_name, "with rediss://: the name the server's certificate must carry, also sent as SNI (empty: "
                         "the host connected to)"),
    STR(prefix, "Redis key prefix"),
    STR(group, "consumer group"),
    STR(worker_id, "consumer name (default <hostname>:<device>); one live process per id: a second stops with exit 78"),
    GROUP("Model and engine"),
    STR(model, "model package directory"),
    STR(device, "cpu or cuda:N"),
    INT(threads, 0, 1024, "engine CPU threads (0 = all)"),
    INT(max_inflight, 0, 256, "jobs stepped together; 0 = as many as the memory free to the worker holds (a "
        "cgroup's limit, MemoryMax=, included), sized between 1 and 16"),
    SIZE0(kv_cache_bytes, "KV cache (prefix cache included) budget; 0 = the engine's default"),
    INT(kv_bf16, -1, 1, "1: keep the KV cache in bf16, half the memory; -1: in fp32; 0: the device's "
        "default (fp32 on the CPU, bf16 on a GPU where its bf16 attention is in use)"),
    INT(draft_tokens, -1, 7, "decode drafts by prompt lookup: up to N tokens that followed the context's last "
        "tokens where they occurred before are fed and checked in the same forward (the same answers, fewer "
        "steps where text repeats); -1: off; 0: the default (2 on the CPU for a decoder of 64 MiB or more, else "
        "off)"),
    INT(cpu_bf16_compute, 0, 1, "1: matmuls over bf16 weights round activations to bf16 (~1.5x prefill "
        "where the CPU has AVX-512 BF16; logits move by ~0.04) (CPU devices)"),
    INT(logit_screen, -1, 1, "greedy and top-k tokens from bounds off an int8 copy of the lm_head, only the rows that "
        "could win read in full: the same tokens, decode reading ~half the lm_head (memory: half the lm_head's "
        "bf16 size); 0: on where it pays (a CPU with AVX-512 VNNI), -1: off, 1: wherever the device has it"),
    INT(cpu_mapped_weights, 0, 1, "1: read weights from the memory-mapped files (page cache shared between "
        "processes); 0: copy them into transparent huge pages at load, faster decode (CPU devices)"),
    SIZE0(vision_cache_bytes, "vision-tower output cache budget; 0 = 64 images at the model's default size"),
    SIZE0(latent_cache_bytes, "VAE latent cache budget; 0 = 64 images at the model's default size"),
    INT(max_condition_pixels, 0, 268435456, "earlier images above this many pixels are scaled down as "
        "condition frames; 0 = 1048576 (1024x1024)"),
    INT(max_condition_frames, 0, DG_MAX_IMAGES, "a picture is conditioned on at most this many earlier pictures, the "
        "latest (each adds its tokens to every DiT forward of the drawing); 0 = all of them"),
    SIZE0(gpu_memory, "device memory the GPU backend takes at start, e.g. 70G; 0 = 90% of free"),
    INT(warmup, 0, 1, "1: before READY, one small job through every part of the model (a prompt, two tokens, "
        "a smallest picture): a device or package that cannot run a job fails the start, not the first job"),
    GROUP("Queue behaviour"),
    INT(block_ms, 10, 60000, "XREADGROUP BLOCK while idle"),
    INT(claim_idle_ms, 100, 86400000, "idle time after which an entry is taken over"),
    INT(renew_ms, 0, 86400000, "lease renewal interval (0 = claim_idle_ms/3)"),
    INT(reaper_ms, 50, 86400000, "interval between the reaper's passes over the pending list (XAUTOCLAIM); a pass stopped by the free slots goes on as they free, and an entry given back is taken again at its claim_idle_ms"),
    INT(heartbeat_ms, 50, 600000, "worker hash refresh interval"),
    INT(flush_ms, 0, 10000, "progress of fast steps is written at most this often (cancel checks too)"),
    INT(drain_ms, 0, 86400000, "time running jobs get to finish after SIGTERM"),
    INT(trim_ms, 100, 86400000, "interval of job stream trimming"),
    INT(max_attempts, 1, 1000, "default deliveries before dead-lettering"),
    INT(result_ttl_s, 1, 365 * 86400, "default TTL of results, events and images"),
    INT(jobs_retain_s, 0, 365 * 86400, "acknowledged job entries are kept this long"),
    INT(events_maxlen, 10, 10000000, "cap of each job's event stream"),
    INT(done_maxlen, 10, 100000000, "cap of the done stream"),
    INT(dead_maxlen, 10, 100000000, "cap of the dead-letter stream"),
    GROUP("Limits on one job"),
    SIZE(max_job_bytes, "largest serialized Job"),
    SIZE(max_image_bytes, "largest encoded input image"),
    INT(max_image_pixels, 0, 1000000000, "input images of more pixels (width x height) are refused before they are "
        "decoded; 0 = 50000000 (a 64 MP photo needs more: 3 bytes a pixel while the job runs)"),
    INT(max_input_images, 0, DG_MAX_IMAGES, "input images per job (a conversation holds at most " STRINGIFY(DG_MAX_IMAGES)
        " pictures, given and drawn: past them no more are drawn)"),
    INT(max_messages, 1, 100000, "messages per job"),
    SIZE(max_text_bytes, "text bytes per job"),
    INT(max_new_tokens, 1, 1000000, "upper bound of TextParams.max_new_tokens"),
    INT(max_steps, 1, 1000, "upper bound of ImageParams.steps (the engine draws with 1000 at most)"),
    INT(max_image_side, 16, 16384, "upper bound of generated width and height"),
    INT(max_output_images, 0, 1024, "upper bound of ImageParams.max_images"),
    INT(max_stop_strings, 0, 1024, "stop strings per job"),
    INT(max_logit_bias, 0, 1000000, "logit_bias entries per job"),
    STR(image_root, "directory under which Image.path may point (empty: paths refused); a file missing there "
                    "fails the job (UNAVAILABLE), the folder itself unreadable is this worker's problem (the job "
                    "is left for a later attempt)"),
    STR(output_root, "directory drawn images are written under (<id>/<n>.png) instead of Redis"),
    GROUP("Operation"),
    STR(log_level, "err, warning, info or debug"),
    INT(metrics_port, 0, 65535, "Prometheus metrics port on metrics_address (0 = off)"),
    STR(metrics_address, "the address the metrics listen on: 127.0.0.1 (this host only), an interface's IPv4 or "
                         "IPv6 address (a central Prometheus scrapes it there), or 0.0.0.0 / :: (every interface: "
                         "a firewall in front)"),
};

void dg_daemon_config_defaults(dg_daemon_config *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->redis_url, sizeof c->redis_url, "redis://127.0.0.1:6379/0");
    snprintf(c->device, sizeof c->device, "cpu");
    snprintf(c->prefix, sizeof c->prefix, "duogen");
    snprintf(c->group, sizeof c->group, "duogen");
    snprintf(c->log_level, sizeof c->log_level, "info");
    snprintf(c->metrics_address, sizeof c->metrics_address, "127.0.0.1");
    c->max_inflight = 0;
    c->block_ms = 2000;
    c->claim_idle_ms = 60000;
    c->reaper_ms = 15000;
    c->heartbeat_ms = 2000;
    c->flush_ms = 20;
    c->drain_ms = 120000;
    c->trim_ms = 30000;
    c->max_attempts = 3;
    c->result_ttl_s = 86400;
    c->jobs_retain_s = 3600;
    c->events_maxlen = 10000;
    c->done_maxlen = 100000;
    c->dead_maxlen = 100000;
    c->max_job_bytes = 64u << 20;
    c->max_image_bytes = 20u << 20;
    c->max_input_images = 16;
    c->max_messages = 256;
    c->max_text_bytes = 1u << 20;
    c->max_new_tokens = 8192;
    c->max_steps = 200;
    c->max_image_side = 2048;
    c->max_output_images = 16;
    c->max_stop_strings = 16;
    c->max_logit_bias = 1024;
    c->warmup = 1;
}

/* Accepts 123, 64k, 20M, 1G (powers of 1024); 0 only where allow_zero. */
static int parse_size(const char *s, size_t *out, int allow_zero) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || s[0] == '-') return -1;
    unsigned shift = 0;
    switch (tolower((unsigned char)*end)) {
    case 'k': shift = 10; end++; break;
    case 'm': shift = 20; end++; break;
    case 'g': shift = 30; end++; break;
    default: break;
    }
    if (*end || (v == 0 && !allow_zero) || v > (SIZE_MAX >> shift)) return -1;
    *out = (size_t)(v << shift);
    return 0;
}

/* Edit distance (insertions, deletions, substitutions) of two short names; names of 63
 * bytes or more count as far apart. */
static size_t edit_distance(const char *a, const char *b) {
    const size_t n = strlen(a), m = strlen(b);
    size_t row[64];
    if (n >= sizeof row / sizeof row[0] || m >= sizeof row / sizeof row[0]) return SIZE_MAX;
    for (size_t j = 0; j <= m; j++) row[j] = j;
    for (size_t i = 1; i <= n; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= m; j++) {
            const size_t up = row[j];
            size_t d = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < d) d = up + 1;
            if (row[j - 1] + 1 < d) d = row[j - 1] + 1;
            row[j] = d;
            diag = up;
        }
    }
    return row[m];
}

const char *dg_nearest_name(const char *word, const char *const *names, size_t n) {
    const char *best = NULL;
    size_t best_d = 3;
    for (size_t i = 0; i < n; i++) {
        const size_t d = names[i] ? edit_distance(word, names[i]) : SIZE_MAX;
        if (d < best_d) best_d = d, best = names[i];
    }
    if (best || strlen(word) < 4) return best;
    for (size_t i = 0; i < n; i++)
        if (names[i] && !strncmp(names[i], word, strlen(word))) return names[i];
    return NULL;
}

const char *dg_did_you_mean(const char *near, char *buf, size_t n) {
    if (!near) return "";
    snprintf(buf, n, " (did you mean %s?)", near);
    return buf;
}

int dg_daemon_config_set(dg_daemon_config *c, const char *key, const char *value, char *err, size_t errlen) {
    char name[64];
    const int option = !strncmp(key, "--", 2);   /* as the command line gave it */
    const char *bare = key + (option ? 2 : 0);
    size_t n = strlen(bare);
    if (n >= sizeof name) n = sizeof name - 1;
    for (size_t i = 0; i < n; i++) name[i] = bare[i] == '-' ? '_' : bare[i];
    name[n] = 0;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const struct key *k = &keys[i];
        if (k->type == KEY_GROUP || strcmp(k->name, name)) continue;
        char *field = (char *)c + k->offset;
        if (k->type == KEY_STR) {
            if (strlen(value) >= k->size) {
                snprintf(err, errlen, "%s: value longer than %zu bytes", name, k->size - 1);
                return -1;
            }
            memcpy(field, value, strlen(value) + 1);
        } else if (k->type == KEY_INT) {
            char *end;
            errno = 0;
            long long v = strtoll(value, &end, 10);
            if (errno || end == value || *end || v < k->lo || v > k->hi) {
                snprintf(err, errlen, "%s: \"%s\" is not an integer in %lld..%lld", name, value,
                         k->lo, k->hi);
                return -1;
            }
            *(int *)field = (int)v;
        } else {
            if (parse_size(value, (size_t *)field, k->lo == 0)) {
                snprintf(err, errlen, "%s: \"%s\" is not a size (e.g. 4096, 64k, 20M)", name, value);
                return -1;
            }
        }
        return 0;
    }
    const char *names[sizeof keys / sizeof keys[0]];
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        names[i] = keys[i].type == KEY_GROUP ? NULL : keys[i].name;
    const char *near = dg_nearest_name(name, names, sizeof keys / sizeof keys[0]);
    char hint[72], tail[96];   /* in the form it was written: a file's key, or an option's dashes */
    if (near) {
        snprintf(hint, sizeof hint, "%s%s", option ? "--" : "", near);
        for (char *h = hint; *h; h++) if (*h == '_' && (option || strchr(key, '-'))) *h = '-';
    }
    snprintf(err, errlen, "unknown %s \"%s\"%s", option ? "option" : "setting", key,
             dg_did_you_mean(near ? hint : NULL, tail, sizeof tail));
    return -1;
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s)) s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1])) *--e = 0;
    return s;
}

int dg_daemon_config_load(dg_daemon_config *c, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "config \"%s\": %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL, msg[512];
    size_t cap = 0;
    ssize_t len;
    int lineno = 0, rc = 0;
    /* getline: a line of any length is one line (a long comment is a comment, a long value
     * is refused by its key's own limit, never read as a second line) */
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (memchr(line, 0, (size_t)len)) {
            snprintf(err, errlen, "config \"%s\" line %d: a NUL byte (not a text file?)", path, lineno);
            rc = -1;
            break;
        }
        /* a comment from a '#' outside double quotes ("a#b" is a value) */
        int quoted = 0;
        for (char *ch = line; *ch; ch++) {
            if (*ch == '"') quoted = !quoted;
            else if (*ch == '#' && !quoted) {
                *ch = 0;
                break;
            }
        }
        char *s = trim(line);
        if (!*s) continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            snprintf(err, errlen, "config \"%s\" line %d: expected key = value", path, lineno);
            rc = -1;
            break;
        }
        *eq = 0;
        char *v = trim(eq + 1);
        size_t vl = strlen(v);
        if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') { v[vl - 1] = 0; v++; }
        if (dg_daemon_config_set(c, trim(s), v, msg, sizeof msg)) {
            snprintf(err, errlen, "config \"%s\" line %d: %s", path, lineno, msg);
            rc = -1;
            break;
        }
    }
    if (rc == 0 && !feof(f)) {   /* a read error, or no memory for a line: not a partial config */
        snprintf(err, errlen, "config \"%s\": %s", path, strerror(errno));
        rc = -1;
    }
    free(line);
    fclose(f);
    return rc;
}

int dg_daemon_config_finish(dg_daemon_config *c, char *err, size_t errlen) {
    if (!c->worker_id[0]) {
        char host[200] = "localhost";
        gethostname(host, sizeof host - 1);
        snprintf(c->worker_id, sizeof c->worker_id, "%s:%s", host, c->device);
    }
    if (!c->renew_ms) c->renew_ms = c->claim_idle_ms / 3;
    if (c->renew_ms >= c->claim_idle_ms) {
        snprintf(err, errlen, "renew_ms (%d) must be below claim_idle_ms (%d), or running jobs "
                 "would be taken over", c->renew_ms, c->claim_idle_ms);
        return -1;
    }
    if (dg_log_parse_level(c->log_level) < 0) {
        snprintf(err, errlen, "log_level: \"%s\" is not err, warning, info or debug", c->log_level);
        return -1;
    }
    if (!c->prefix[0] || !c->group[0]) {
        snprintf(err, errlen, "prefix and group must not be empty");
        return -1;
    }
    /* they are label values of the metrics too, which Prometheus takes only as UTF-8: one
     * byte that is not made a healthy worker's every scrape fail (and DuogenWorkerDown fire) */
    const char *texts[3][2] = {{"worker_id", c->worker_id}, {"prefix", c->prefix}, {"group", c->group}};
    for (int i = 0; i < 3; i++) {
        const long bad = dg_utf8_invalid_at(texts[i][1], strlen(texts[i][1]));
        if (bad >= 0) {
            snprintf(err, errlen, "%s: not UTF-8 at byte %ld (it names the worker in Redis and in its metrics)",
                     texts[i][0], bad);
            return -1;
        }
    }
    unsigned char addr[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET, c->metrics_address, addr) != 1 && inet_pton(AF_INET6, c->metrics_address, addr) != 1) {
        snprintf(err, errlen, "metrics_address: \"%s\" is not an IPv4 or IPv6 address (127.0.0.1, 10.1.2.3, ::1, "
                 "0.0.0.0, ::; no brackets, no host name)", c->metrics_address);
        return -1;
    }
    if (c->sentinel[0] && !c->master_name[0]) {
        snprintf(err, errlen, "sentinel is set but master_name is not");
        return -1;
    }
    if ((int64_t)c->jobs_retain_s >= c->result_ttl_s) {
        snprintf(err, errlen, "jobs_retain_s (%d) must be below result_ttl_s (%d): an entry still in "
                 "the stream must find its result if it is ever delivered again", c->jobs_retain_s,
                 c->result_ttl_s);
        return -1;
    }
    return 0;
}

/* A size as the file would write it: the largest unit that divides it exactly. */
static void format_size(char *out, size_t n, size_t v) {
    static const char units[] = "GMk";
    for (int u = 0; u < 3; u++) {
        unsigned shift = 30 - 10 * (unsigned)u;
        if (v && v % ((size_t)1 << shift) == 0) {
            snprintf(out, n, "%zu%c", v >> shift, units[u]);
            return;
        }
    }
    snprintf(out, n, "%zu", v);
}

int dg_daemon_config_setting(size_t i, dg_daemon_setting *out) {
    static const char *kinds[] = {[KEY_STR] = "text", [KEY_INT] = "integer", [KEY_SIZE] = "size"};
    dg_daemon_config defaults;
    const char *group = "";
    size_t seen = 0;
    dg_daemon_config_defaults(&defaults);
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        const struct key *key = &keys[k];
        if (key->type == KEY_GROUP) {
            group = key->name;
            continue;
        }
        if (seen++ != i) continue;
        const char *field = (const char *)&defaults + key->offset;
        *out = (dg_daemon_setting){.name = key->name, .group = group, .kind = kinds[key->type], .help = key->help};
        if (key->type == KEY_STR) snprintf(out->value, sizeof out->value, "%s", field);
        else if (key->type == KEY_INT) {
            snprintf(out->value, sizeof out->value, "%d", *(const int *)field);
            snprintf(out->range, sizeof out->range, "%lld..%lld", key->lo, key->hi);
        } else {
            format_size(out->value, sizeof out->value, *(const size_t *)field);
            snprintf(out->range, sizeof out->range, key->lo ? "above 0" : "0 or more");
        }
        return 0;
    }
    return -1;
}

void dg_daemon_config_usage(FILE *out) {
    dg_daemon_setting s;
    const char *group = "";
    for (size_t i = 0; !dg_daemon_config_setting(i, &s); i++) {
        if (strcmp(group, s.group)) fprintf(out, "%s%s:\n", i ? "\n" : "", s.group);
        group = s.group;
        char opt[64];
        snprintf(opt, sizeof opt, "--%s", s.name);
        for (char *p = opt + 2; *p; p++) if (*p == '_') *p = '-';
        fprintf(out, "  %-24s %s%s%s%s\n", opt, s.help, s.value[0] ? " [" : "", s.value, s.value[0] ? "]" : "");
    }
}
