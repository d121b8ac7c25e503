/* daemon_config.h — duogend configuration: defaults, a `key = value` file (--config FILE) and command-line
 * options (--key value, dashes for underscores), applied in that order. */
#ifndef DG_DAEMON_CONFIG_H
#define DG_DAEMON_CONFIG_H

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

typedef struct {
    /* where */
    char redis_url[512];        /* redis://[user@]host:port/db or unix:///path[?db=N] */
    char password_file[512];    /* file whose first line is the Redis password; "" = none */
    char sentinel[512];         /* host:port,host:port of Redis Sentinels; "" = none */
    char master_name[128];      /* the Sentinel master name */
    char tls_ca_file[512];      /* rediss://: PEM CAs the server's certificate must chain to; "" = the system's */
    char tls_cert_file[512];    /* rediss://: PEM client certificate; "" = none */
    char tls_key_file[512];     /* rediss://: PEM key of tls_cert_file; "" = in that file */
    char tls_server_name[256];  /* rediss://: name checked in the certificate (and SNI); "" = the host */
    char model[512];            /* model package directory */
    char device[64];            /* cpu | cuda:N */
    char prefix[128];           /* key prefix, e.g. "duogen" or "{duogen}" */
    char group[128];            /* consumer group */
    char worker_id[256];        /* consumer name; default <hostname>:<device> */
    char image_root[512];       /* Image.path must resolve below it; "" = paths refused */
    char output_root[512];      /* drawn images as files below it (Job.image_output); "" = Redis only */
    char log_level[16];
    int  threads;               /* engine CPU threads; 0 = all */
    int  max_inflight;          /* jobs stepped together; 0 until the worker sizes it (dg_sched_max_inflight) */

    /* queue behaviour, milliseconds unless named otherwise */
    int  block_ms;              /* XREADGROUP BLOCK while idle */
    int  claim_idle_ms;         /* an entry idle this long is taken over from its owner */
    int  renew_ms;              /* lease renewal interval for running jobs; 0 = claim_idle/3 */
    int  reaper_ms;             /* how often XAUTOCLAIM looks for abandoned entries */
    int  heartbeat_ms;          /* worker hash refresh */
    int  flush_ms;              /* progress events of fast steps are written together this often */
    int  drain_ms;              /* on SIGTERM, time the running jobs get to finish */
    int  trim_ms;               /* how often the job streams are trimmed */
    int  max_attempts;          /* default deliveries before dead-lettering */
    int  result_ttl_s;          /* default TTL of result, events, images, job hash */
    int  jobs_retain_s;         /* acknowledged job entries are kept this long */
    int  events_maxlen;         /* cap of each duogen:events:<id> stream */
    int  done_maxlen;           /* cap of duogen:done */
    int  dead_maxlen;           /* cap of duogen:dead */

    /* limits on one job */
    size_t max_job_bytes;       /* serialized Job */
    size_t max_image_bytes;     /* one encoded input image */
    int    max_input_images;
    int    max_messages;
    size_t max_text_bytes;      /* all text of the job */
    int    max_new_tokens;      /* upper bound for TextParams.max_new_tokens */
    int    max_steps;
    int    max_image_side;      /* pixels, width and height of generated images */
    int    max_output_images;
    int    max_stop_strings;
    int    max_logit_bias;
    int    metrics_port;        /* Prometheus text metrics on metrics_address; 0 = off */
    char   metrics_address[64]; /* an IPv4 or IPv6 address; default 127.0.0.1 */
    size_t kv_cache_bytes;      /* engine caches; 0 = the engine's default */
    int    kv_bf16;             /* 1: KV in bf16 (dg_sched_opts.kv_bf16) */
    int    draft_tokens;        /* dg_sched_opts.draft_tokens */
    int    cpu_bf16_compute;    /* 1: bf16 compute (dg_model_opts.cpu_bf16_compute) */
    int    cpu_mapped_weights;  /* 1: weights read in place (dg_model_opts.cpu_mapped_weights) */
    int    logit_screen;        /* dg_model_opts.logit_screen */
    size_t vision_cache_bytes;
    size_t latent_cache_bytes;
    int    max_condition_pixels; /* earlier images larger than this are scaled down as DiT
                                    condition frames; 0 = the engine's default (1024²) */
    int    max_condition_frames; /* the latest earlier images a picture is conditioned on; 0 = all */
    int    max_image_pixels;     /* input images over this many pixels are refused; 0 = the engine's 50M */
    size_t gpu_memory;          /* bytes the GPU backend takes at start; 0 = 90% of free memory */
    int    warmup;              /* 1: dg_sched_warmup before READY */
} dg_daemon_config;

void dg_daemon_config_defaults(dg_daemon_config *c);
/* Sets one key from text: a file's `max_inflight`, or an option's `--max-inflight` (dashes or
 * underscores either way). Returns 0, or -1 with a message naming the key (as it was given,
 * with the nearest known one when it is unknown) and the value. */
int  dg_daemon_config_set(dg_daemon_config *c, const char *key, const char *value, char *err, size_t errlen);
/* Reads a file of `key = value` lines ('#' starts a comment). -1 names the file and line. */
int  dg_daemon_config_load(dg_daemon_config *c, const char *path, char *err, size_t errlen);
/* Fills derived values (worker id, renew interval) and checks consistency. */
int  dg_daemon_config_finish(dg_daemon_config *c, char *err, size_t errlen);

/* The one of names[0..n) (NULL entries skipped) that `word` was most likely meant to be: the
 * nearest by edit distance within 2 (max_inflights, stast), else one that `word` of 4 or more
 * bytes begins (claim_idle for claim_idle_ms); NULL when none is that near. For the "did you
 * mean" of an unknown setting, command or option. */
const char *dg_nearest_name(const char *word, const char *const *names, size_t n);
/* The tail of an unknown word's message: " (did you mean NEAR?)" written into buf, or "" when
 * near is NULL. Returns what to print. */
const char *dg_did_you_mean(const char *near, char *buf, size_t n);

/* One setting as --help and the manual pages show it. The strings are static. */
typedef struct {
    const char *name;       /* the file's key; the option is --name with '_' as '-' */
    const char *group;      /* the heading it is listed under, e.g. "Queue behaviour" */
    const char *kind;       /* "text", "integer" or "size" (123, 64k, 20M, 1G) */
    const char *help;       /* one line */
    char        value[64];  /* the default as the file would write it; "" = none */
    char        range[64];  /* what the value may be, e.g. "1..1000"; "" for text */
} dg_daemon_setting;

/* Fills *out with setting i (0-based) in the table's order, the order --help lists them.
 * Returns 0, or -1 when i is past the last setting. */
int  dg_daemon_config_setting(size_t i, dg_daemon_setting *out);
/* Writes the settings, under their headings, as --help shows them. */
void dg_daemon_config_usage(FILE *out);

#endif
