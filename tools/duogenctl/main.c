/* duogenctl — producer and monitor for duogen queues.
 *
 *   duogenctl [--redis URL] [--password-file F] [--tls-* ...] [--prefix P] COMMAND [ARGS]
 *   duogenctl --help | --man
 *
 * The commands, the global options and the --param keys are the tables `commands`,
 * `global_options` and `params` below: main() dispatches through the first, and --help and
 * the manual page duogenctl(1) (hidden option --man, daemon/manpage.h) are written from all
 * three, so that neither can drift from the code.
 *
 * Exit status: 0 success (for --wait and result: the job is done), 1 the job failed, was
 * cancelled or expired, 2 usage, 3 Redis or file errors. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../../daemon/daemon_config.h"
#include "../../daemon/job.h"
#include "../../daemon/manpage.h"
#include "../../daemon/outdir.h"
#include "../../daemon/redis.h"
#include "duogen.pb-c.h"
#include "html.h"
#include "out.h"
#include "top.h"
#include <jansson.h>

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

#define EXIT_JOB   1
#define EXIT_USAGE 2
#define EXIT_IO    3

/* The --param keys, in --help and duogenctl(1); set_param() reads them. `example` is one
 * valid KEY=VALUE (tests/integration/test_manpages.py enqueues each). */
static const struct param {
    const char *key, *example, *help;
} params[] = {
    {"max_new_tokens", "max_new_tokens=512", "text tokens the answer may have (<BOV> and pictures not counted: max_images), 1 .. the worker's max_new_tokens"},
    {"temperature", "temperature=0", "sampling temperature, 0 .. 100; 0 is greedy decoding"},
    {"top_p", "top_p=0.9", "nucleus sampling, (0, 1]; 1 is off"},
    {"top_k", "top_k=40", "the k most likely tokens, 0 .. 1000000; 0 is off"},
    {"repetition_penalty", "repetition_penalty=1.1", "(0, 100]; 1 is off"},
    {"stop", "stop=END", "a stop string; give it again for more"},
    {"bias.<token>", "bias.151665=-inf", "added to the logit of token id <token>; -inf bans it"},
    {"width", "width=512", "pixels of the drawn images, a multiple of 16 up to the worker's max_image_side"},
    {"height", "height=512", "as width"},
    {"steps", "steps=20", "denoising steps per image, 1 .. the worker's max_steps"},
    {"guidance_scale", "guidance_scale=0", "classifier-free guidance, 0 .. 100; 0 is none (one DiT forward per step; up to 1 for a published pipeline's package)"},
    {"max_images", "max_images=2", "images the answer may have, 0 .. the worker's max_output_images; 0 is text only"},
    {"schedule", "schedule=karras", "default (the package's), karras or shifted"},
    {"shift", "shift=3", "the shifted schedule's shift, [0.001, 100]; given alone it selects shifted"},
    {"seed", "seed=7", "seed of the sampler and of the noise: the same job and seed give the same answer"},
    {"deadline_s", "deadline_s=600", "seconds from when the job is sent: not started by then, it expires; running, it stops"},
    {"max_attempts", "max_attempts=3", "deliveries before the job is dead-lettered; 0 is the worker's default"},
    {"result_ttl_s", "result_ttl_s=3600", "seconds the result, events and images are kept; 0 is the worker's default"},
    {"inline_images", "inline_images=true", "the Result protobuf carries the PNG bytes too"},
    {"meta.<key>", "meta.user=ann", "free-form metadata, echoed into the job hash"},
};

static const char *prefix = "duogen";
static dg_redis R;

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static const char *die_where;   /* where the input that is wrong was read ("FILE" line N), or NULL */

static void die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("duogenctl: ", stderr);
    if (die_where) fprintf(stderr, "%s: ", die_where);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static void key(char *out, size_t n, const char *kind, const char *id) {
    if (id) snprintf(out, n, "%s:%s:%s", prefix, kind, id);
    else snprintf(out, n, "%s:%s", prefix, kind);
}

static int redis_seen;   /* a reply has come: Redis was there once (a wait may wait for it) */

/* An error reply, said with the command and its key (which of a pipeline's, and what the
 * ACL refused: a producer's user cannot read what stats and dead read). */
static void refused(const dg_cmd *c, const redisReply *rep) __attribute__((noreturn));
static void refused(const dg_cmd *c, const redisReply *rep) {
    die(EXIT_IO, "Redis refused %s%s%.200s: %s%s", c->argv[0], c->argc > 1 ? " " : "", c->argc > 1 ? c->argv[1] : "",
        rep->str,
        dg_reply_is_error(rep, "NOPERM") ? " (this Redis user's ACL does not allow it: stats, top, dead and prune need the "
                                           "operator's rights, deploy/redis/users.acl.example)"
                                         : "");
}

static redisReply *cmd(dg_cmd *c) {
    if (!dg_redis_ready(&R)) die(EXIT_IO, "Redis: %s", R.error);
    redisReply *rep = dg_redis_cmd(&R, c);
    if (!rep) die(EXIT_IO, "Redis: %s", R.error);
    if (rep->type == REDIS_REPLY_ERROR) refused(c, rep);
    dg_cmd_free(c);
    redis_seen = 1;
    return rep;
}

/* cmd() for the commands of a wait, n of them in one pipeline (commands that may be sent
 * again: reads): a Redis that goes away (a restart, a failover) is waited for and the
 * commands sent again, not a reason to give up on a job that goes on meanwhile. The
 * replies go into rep; the caller frees them and the commands. */
static void pipeline_waiting(dg_cmd *const *cmds, int n, redisReply **rep) {
    int told = 0;
    while (n && (!dg_redis_ready(&R) || dg_redis_pipeline(&R, cmds, n, rep))) {
        if (!redis_seen) die(EXIT_IO, "Redis: %s", R.error);   /* never there: a wrong URL, not a restart */
        if (!told++) fprintf(stderr, "duogenctl: Redis went away (%s); waiting for it\n", R.error);
        int ms = dg_redis_wait_ms(&R);
        struct timespec ts = {0, (long)(ms < 50 ? 50 : ms > 1000 ? 1000 : ms) * 1000000L};
        nanosleep(&ts, NULL);
    }
    for (int i = 0; i < n; i++)
        if (rep[i]->type == REDIS_REPLY_ERROR) refused(cmds[i], rep[i]);
    if (told) fprintf(stderr, "duogenctl: Redis is back\n");
    redis_seen |= n > 0;
}

/* One command so; c is freed. */
static redisReply *cmd_waiting(dg_cmd *c) {
    redisReply *rep;
    pipeline_waiting(&c, 1, &rep);
    dg_cmd_free(c);
    return rep;
}

static const redisReply *hfield(const redisReply *h, const char *name) {
    for (size_t i = 0; h && h->type == REDIS_REPLY_ARRAY && i + 1 < h->elements; i += 2)
        if (!strcmp(h->element[i]->str, name)) return h->element[i + 1];
    return NULL;
}

static const char *hstr(const redisReply *h, const char *name) {
    const redisReply *v = hfield(h, name);
    return v && v->type == REDIS_REPLY_STRING ? v->str : "";
}

static long long hint(const redisReply *h, const char *name) {
    const redisReply *v = hfield(h, name);
    return v && v->type == REDIS_REPLY_INTEGER ? v->integer : 0;
}

/* The whole of a file, or of a pipe or another stream, to its end: malloc'd, its length in
 * *len (0 for an empty one, still a buffer). NULL with errno (EISDIR for a folder). */
static uint8_t *read_all(const char *path, size_t *len) {
    struct stat st;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    const int bad = fstat(fileno(f), &st) ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
    if (bad) {
        fclose(f);
        errno = bad;
        return NULL;
    }
    size_t cap = S_ISREG(st.st_mode) && st.st_size > 0 ? (size_t)st.st_size + 1 : 65536, n = 0;
    uint8_t *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;   /* the end, or an error (below) */
        uint8_t *more = realloc(buf, cap *= 2);
        if (!more) free(buf);
        buf = more;
    }
    const int e = !buf ? ENOMEM : ferror(f) ? (errno ? errno : EIO) : 0;
    fclose(f);
    if (e) {
        free(buf);
        errno = e;
        return NULL;
    }
    *len = n;
    return buf;
}

static uint8_t *read_file(const char *path, size_t *len) {
    uint8_t *buf = read_all(path, len);
    if (!buf) die(EXIT_IO, "\"%s\": %s", path, strerror(errno));
    if (!*len) die(EXIT_IO, "\"%s\": empty", path);
    return buf;
}

/* DIR/NAME whole or not at all: written to a temporary name, then renamed over it. */
static void write_file(const char *dir, const char *name, const void *data, size_t len) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    int ok = f && fwrite(data, 1, len, f) == len;
    if (f && fclose(f)) ok = 0;
    if (!ok || rename(tmp, path)) {
        unlink(tmp);
        die(EXIT_IO, "cannot write \"%s\"", path);
    }
}

/* ---- enqueue ------------------------------------------------------------------------------ */

typedef struct {
    Duogen__V1__Job job;
    Duogen__V1__TextParams text;
    Duogen__V1__ImageParams image;
    char **stop; size_t n_stop;
    Duogen__V1__TextParams__LogitBiasEntry **bias; size_t n_bias;
    Duogen__V1__Job__MetadataEntry **meta; size_t n_meta;
    double deadline_s;   /* deadline_s as given: the job's deadline is set when it is sent; 0 none */
} job_builder;

#define DEADLINE_MAX_S 1e9   /* seconds: about 31 years, within what a job's milliseconds hold */

static float parse_float(const char *k, const char *v) {
    char *end;
    float f = strtof(v, &end);
    if (*end || end == v || !isfinite(f)) die(EXIT_USAGE, "--param %s=%s: not a number", k, v);
    return f;
}

/* A decimal integer in 0 .. max, digits only (strtoull would take a sign, spaces and a
 * wrap-around: "-1", " -1" and 2^32 must not become 4294967295, 4294967295 and 0). */
static uint64_t parse_u64(const char *k, const char *v, uint64_t max) {
    char *end;
    errno = 0;
    unsigned long long n = v[0] >= '0' && v[0] <= '9' ? strtoull(v, &end, 10) : 0;
    if (v[0] < '0' || v[0] > '9' || *end || errno == ERANGE || n > max)
        die(EXIT_USAGE, "--param %s=%s: not an integer in 0..%llu", k, v, (unsigned long long)max);
    return n;
}

static uint32_t parse_uint(const char *k, const char *v) { return (uint32_t)parse_u64(k, v, UINT32_MAX); }

static int parse_bool(const char *k, const char *v) {
    if (!strcmp(v, "1") || !strcmp(v, "true")) return 1;
    if (!strcmp(v, "0") || !strcmp(v, "false")) return 0;
    die(EXIT_USAGE, "--param %s=%s: not 1, 0, true or false", k, v);
}

static Duogen__V1__ImageParams__Schedule parse_schedule(const char *v) {
    if (!strcmp(v, "default")) return DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__SCHEDULE_DEFAULT;
    if (!strcmp(v, "karras")) return DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__KARRAS;
    if (!strcmp(v, "shifted")) return DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__SHIFTED;
    die(EXIT_USAGE, "--param schedule=%s: not default, karras or shifted", v);
}

/* One --param KEY=VALUE into the job. A key given sets its field, 0 included (the fields
 * with presence in duogen.proto: temperature=0 is greedy, guidance_scale=0 no guidance,
 * max_images=0 text only); a key not given leaves the field absent: the package's default. */
static void set_param(job_builder *b, const char *kv) {
    char k[128];
    const char *eq = strchr(kv, '=');
    if (!eq) die(EXIT_USAGE, "--param \"%s\": expected KEY=VALUE", kv);
    if ((size_t)(eq - kv) >= sizeof k)
        die(EXIT_USAGE, "--param \"%.40s...\": a key of %zu bytes (%zu at most)", kv, (size_t)(eq - kv), sizeof k - 1);
    memcpy(k, kv, (size_t)(eq - kv));
    k[eq - kv] = 0;
    const char *v = eq + 1;
    if (!strcmp(k, "max_new_tokens")) b->text.max_new_tokens = parse_uint(k, v);
    else if (!strcmp(k, "temperature")) {
        b->text._temperature_case = DUOGEN__V1__TEXT_PARAMS___TEMPERATURE_TEMPERATURE;
        b->text.temperature = parse_float(k, v);
    } else if (!strcmp(k, "top_p")) {
        b->text._top_p_case = DUOGEN__V1__TEXT_PARAMS___TOP_P_TOP_P;
        b->text.top_p = parse_float(k, v);
    } else if (!strcmp(k, "top_k")) {
        b->text._top_k_case = DUOGEN__V1__TEXT_PARAMS___TOP_K_TOP_K;
        b->text.top_k = parse_uint(k, v);
    } else if (!strcmp(k, "repetition_penalty")) {
        b->text._repetition_penalty_case = DUOGEN__V1__TEXT_PARAMS___REPETITION_PENALTY_REPETITION_PENALTY;
        b->text.repetition_penalty = parse_float(k, v);
    } else if (!strcmp(k, "stop")) {
        b->stop = realloc(b->stop, (b->n_stop + 1) * sizeof *b->stop);
        b->stop[b->n_stop++] = strdup(v);
    } else if (!strncmp(k, "bias.", 5)) {
        Duogen__V1__TextParams__LogitBiasEntry *e = malloc(sizeof *e);
        duogen__v1__text_params__logit_bias_entry__init(e);
        char *end;
        errno = 0;
        const unsigned long long id = k[5] >= '0' && k[5] <= '9' ? strtoull(k + 5, &end, 10) : ULLONG_MAX;
        if (id > INT32_MAX || *end || errno)
            die(EXIT_USAGE, "--param %s: \"%s\" is not a token id (0..%d)", k, k + 5, INT32_MAX);
        e->key = (int32_t)id;
        e->value = !strcmp(v, "-inf") ? -INFINITY : parse_float(k, v);
        b->bias = realloc(b->bias, (b->n_bias + 1) * sizeof *b->bias);
        b->bias[b->n_bias++] = e;
    } else if (!strcmp(k, "width")) b->image.width = parse_uint(k, v);
    else if (!strcmp(k, "height")) b->image.height = parse_uint(k, v);
    else if (!strcmp(k, "steps")) b->image.steps = parse_uint(k, v);
    else if (!strcmp(k, "guidance_scale") || !strcmp(k, "guidance")) {
        b->image._guidance_scale_case = DUOGEN__V1__IMAGE_PARAMS___GUIDANCE_SCALE_GUIDANCE_SCALE;
        b->image.guidance_scale = parse_float(k, v);
    } else if (!strcmp(k, "max_images")) {
        b->image._max_images_case = DUOGEN__V1__IMAGE_PARAMS___MAX_IMAGES_MAX_IMAGES;
        b->image.max_images = parse_uint(k, v);
    } else if (!strcmp(k, "shift")) {
        b->image._shift_case = DUOGEN__V1__IMAGE_PARAMS___SHIFT_SHIFT;
        b->image.shift = parse_float(k, v);
    } else if (!strcmp(k, "schedule")) b->image.schedule = parse_schedule(v);
    else if (!strcmp(k, "seed")) b->job.seed = parse_u64(k, v, UINT64_MAX);
    else if (!strcmp(k, "deadline_s")) {
        b->deadline_s = parse_float(k, v);
        if (!(b->deadline_s > 0 && b->deadline_s <= DEADLINE_MAX_S))
            die(EXIT_USAGE, "--param %s=%s: not a number of seconds in (0, %g]", k, v, DEADLINE_MAX_S);
    } else if (!strcmp(k, "max_attempts")) b->job.max_attempts = parse_uint(k, v);
    else if (!strcmp(k, "result_ttl_s")) b->job.result_ttl_s = parse_uint(k, v);
    else if (!strcmp(k, "inline_images")) b->job.inline_images = parse_bool(k, v);
    else if (!strncmp(k, "meta.", 5)) {
        Duogen__V1__Job__MetadataEntry *e = malloc(sizeof *e);
        duogen__v1__job__metadata_entry__init(e);
        e->key = strdup(k + 5);
        e->value = strdup(v);
        b->meta = realloc(b->meta, (b->n_meta + 1) * sizeof *b->meta);
        b->meta[b->n_meta++] = e;
    } else {
        const char *keys[N_OF(params)];
        for (size_t i = 0; i < N_OF(params); i++) keys[i] = params[i].key;
        char tail[96];
        fprintf(stderr, "duogenctl: %s%s--param %s: unknown%s; the keys:", die_where ? die_where : "",
                die_where ? ": " : "", k, dg_did_you_mean(dg_nearest_name(k, keys, N_OF(params)), tail, sizeof tail));
        for (size_t i = 0; i < N_OF(params); i++) fprintf(stderr, " %s", params[i].key);
        fputc('\n', stderr);
        exit(EXIT_USAGE);
    }
}

static int follow(const char *id, int show_text);
static int write_result(const char *id, const char *out_dir, const char *html_dir, int print);

/* What enqueue's options (and its job file) say. */
typedef struct {
    job_builder b;
    char        id[160], *text;      /* text: malloc'd, grown as words come */
    size_t      tl, tcap;            /* bytes of text, of its buffer */
    const char *system, *out_dir;
    char        images[64][4096];    /* paths */
    int         n_images, wait, high;
    json_t     *job_file;            /* owns the strings a job file handed out; NULL without */
} enqueue_opts;

static void job_check(const enqueue_opts *o, const char *what);

/* Appends n bytes of text (after a space when sep and there is text already). */
static void text_add(enqueue_opts *o, const char *t, size_t n, int sep) {
    sep = sep && o->tl;
    if (o->tl + sep + n + 1 > o->tcap) {
        size_t cap = o->tcap ? o->tcap : 4096;
        while (cap < o->tl + sep + n + 1) cap *= 2;
        if (!(o->text = realloc(o->text, cap))) die(EXIT_IO, "out of memory for %zu bytes of text", cap);
        o->tcap = cap;
    }
    if (sep) o->text[o->tl++] = ' ';
    memcpy(o->text + o->tl, t, n);
    o->tl += n;
    o->text[o->tl] = 0;
}

/* A job in JSON: {"id", "system", "text", "images": [paths relative to dir], "params":
 * {KEY: VALUE} with the keys of --param}, read into o (the strings handed out are j's).
 * what names it in errors ("job file \"x\"", or a batch's "\"x\" line 12"). */
static void job_from_json(json_t *j, const char *dir, const char *what, enqueue_opts *o) {
    job_builder *b = &o->b;
    const char *key;
    json_t *v;
    json_object_foreach(j, key, v) {
        if (!strcmp(key, "id") && json_is_string(v)) {
            if (json_string_length(v) >= sizeof o->id) die(EXIT_USAGE, "%s: id is too long", what);
            snprintf(o->id, sizeof o->id, "%s", json_string_value(v));
        } else if (!strcmp(key, "system") && json_is_string(v)) o->system = json_string_value(v);
        else if (!strcmp(key, "text") && json_is_string(v)) {
            o->tl = 0;
            text_add(o, json_string_value(v), json_string_length(v), 0);
        }
        else if (!strcmp(key, "images") && json_is_array(v)) {
            size_t i;
            json_t *im;
            json_array_foreach(v, i, im) {
                if (!json_is_string(im) || o->n_images == 64)
                    die(EXIT_USAGE, "%s: images[%zu] is not a path (64 at most)", what, i);
                const char *p = json_string_value(im);
                int n = p[0] == '/' ? snprintf(o->images[o->n_images], sizeof o->images[0], "%s", p)
                                    : snprintf(o->images[o->n_images], sizeof o->images[0], "%s/%s", dir, p);
                if (n < 0 || (size_t)n >= sizeof o->images[0]) die(EXIT_USAGE, "%s: images[%zu]: path too long", what, i);
                o->n_images++;
            }
        } else if (!strcmp(key, "params") && json_is_object(v)) {
            const char *pk;
            json_t *pv;
            json_object_foreach(v, pk, pv) {
                char num[64], *kv;
                const char *val = num;
                if (json_is_string(pv)) val = json_string_value(pv);
                else if (json_is_integer(pv)) snprintf(num, sizeof num, "%lld", (long long)json_integer_value(pv));
                else if (json_is_number(pv)) snprintf(num, sizeof num, "%.9g", json_number_value(pv));
                else if (json_is_boolean(pv)) snprintf(num, sizeof num, "%s", json_is_true(pv) ? "true" : "false");
                else die(EXIT_USAGE, "%s: params.%s must be a string, number or boolean", what, pk);
                if (asprintf(&kv, "%s=%s", pk, val) < 0) die(EXIT_IO, "out of memory");
                die_where = what;   /* set_param's complaints name the file or the line */
                set_param(b, kv);
                die_where = NULL;
                free(kv);
            }
        } else {   /* a key not known, or a known one with a value of another type */
            static const char *const keys[] = {"id", "system", "text", "images", "params"};
            static const char *const types[] = {"a string", "a string", "a string", "a list of paths",
                                                "an object of --param keys"};
            char tail[96];
            for (size_t k = 0; k < N_OF(keys); k++)
                if (!strcmp(key, keys[k])) die(EXIT_USAGE, "%s: \"%s\" must be %s", what, key, types[k]);
            die(EXIT_USAGE, "%s: unknown or mistyped key \"%s\"%s (the keys: id system text images params)", what,
                key, dg_did_you_mean(dg_nearest_name(key, keys, N_OF(keys)), tail, sizeof tail));
        }
    }
}

/* The folder of path, for the paths relative to it. */
static void dir_of(const char *path, char *dir, size_t n) {
    snprintf(dir, n, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0; else snprintf(dir, n, ".");
}

/* A job file (JSON, as job_from_json reads). Returns the parsed document, which owns the
 * strings handed out; options after --job override it. */
static json_t *load_job_file(const char *path, enqueue_opts *o) {
    json_error_t je;
    FILE *probe = fopen(path, "rb");   /* a file that cannot be read is exit 3, a bad one 2 */
    if (!probe) die(EXIT_IO, "job file \"%s\": %s", path, strerror(errno));
    fclose(probe);
    json_t *j = json_load_file(path, 0, &je);
    if (!j || !json_is_object(j)) die(EXIT_USAGE, "job file \"%s\": %s", path, j ? "not a JSON object" : je.text);
    char dir[4096], what[4200];
    dir_of(path, dir, sizeof dir);
    snprintf(what, sizeof what, "job file \"%s\"", path);
    job_from_json(j, dir, what, o);
    return j;
}


/* job-<unix ms>-<4 random hex digits>. */
static void new_job_id(char *id, size_t n) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    srand((unsigned)ts.tv_nsec ^ (unsigned)getpid());
    snprintf(id, n, "job-%lld-%04x", (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000, rand() & 0xffff);
}

static void parse_enqueue(int argc, char **argv, enqueue_opts *o) {
    duogen__v1__job__init(&o->b.job);
    duogen__v1__text_params__init(&o->b.text);
    duogen__v1__image_params__init(&o->b.image);
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--job") && i + 1 < argc) {
            if (o->job_file) die(EXIT_USAGE, "enqueue: one --job at most");
            o->job_file = load_job_file(argv[++i], o);
        } else if (!strcmp(a, "--id") && i + 1 < argc) snprintf(o->id, sizeof o->id, "%s", argv[++i]);
        else if (!strcmp(a, "--system") && i + 1 < argc) o->system = argv[++i];
        else if (!strcmp(a, "--image") && i + 1 < argc) {
            if (o->n_images == 64) die(EXIT_USAGE, "at most 64 images");
            snprintf(o->images[o->n_images++], sizeof o->images[0], "%s", argv[++i]);
        } else if (!strcmp(a, "--param") && i + 1 < argc) set_param(&o->b, argv[++i]);
        else if (!strcmp(a, "--wait")) o->wait = 1;
        else if (!strcmp(a, "--high")) o->high = 1;
        else if (!strcmp(a, "--out") && i + 1 < argc) { o->out_dir = argv[++i]; o->wait = 1; }
        else if (a[0] == '-' && a[1] == '-') {   /* a mistyped option is not text of the job */
            static const char *const opts[] = {"--job", "--id", "--system", "--image", "--param", "--wait",
                                               "--high", "--out"};
            for (size_t k = 0; k < N_OF(opts); k++)
                if (!strcmp(a, opts[k])) die(EXIT_USAGE, "enqueue: %s needs a value", a);
            char tail[96];
            die(EXIT_USAGE, "enqueue: unknown option \"%s\"%s", a,
                dg_did_you_mean(dg_nearest_name(a, opts, N_OF(opts)), tail, sizeof tail));
        }
        else text_add(o, a, strlen(a), 1);
    }
    if (!o->id[0]) new_job_id(o->id, sizeof o->id);
    job_check(o, "enqueue");
}

/* What a job must have before it goes out (what: where it was said, for the message): some
 * text or an image, and an id a worker takes. */
static void job_check(const enqueue_opts *o, const char *what) {
    if (!o->tl && !o->n_images) die(EXIT_USAGE, "%s: no text and no image", what);
    /* a worker would refuse it under an id of its own, and --wait would wait for nothing */
    if (!dg_job_id_valid(o->id, strlen(o->id)))
        die(EXIT_USAGE, "%s: id \"%s\" is not 1..128 characters of A-Z a-z 0-9 . _ : -", what, o->id);
    if (o->id[0] == '-')   /* `watch -h` and the like would read it as an option */
        die(EXIT_USAGE, "%s: id \"%s\" starts with \"-\": duogenctl's commands could not name it", what, o->id);
    if (!dg_outdir_id_ok(o->id))   /* batch --out's DIR/<id>/, a worker's output_root/<id>/ */
        die(EXIT_USAGE, "%s: id \"%s\" cannot name a folder of answers", what, o->id);
}

/* A Job's messages: the system text (if any), then one user message of the images and the
 * text. They point into this storage, which lives until the job is packed; the image bytes
 * are read into imgs[i].data (freed by free_messages). */
typedef struct {
    Duogen__V1__Message  sys_msg, user_msg, *msgs[2];
    Duogen__V1__Part     sys_part, *sys_parts[1], *user_parts[65], parts[65];
    Duogen__V1__Image    imgs[64];
    size_t               n_msgs;
    int                  n_imgs;
} job_messages;

static void build_messages(job_messages *m, enqueue_opts *o) {
    size_t n_parts = 0;
    m->n_msgs = 0;
    if (o->system) {
        duogen__v1__message__init(&m->sys_msg);
        duogen__v1__part__init(&m->sys_part);
        m->sys_part.kind_case = DUOGEN__V1__PART__KIND_TEXT;
        m->sys_part.text = (char *)o->system;
        m->sys_parts[0] = &m->sys_part;
        m->sys_msg.role = DUOGEN__V1__MESSAGE__ROLE__SYSTEM;
        m->sys_msg.parts = m->sys_parts;
        m->sys_msg.n_parts = 1;
        m->msgs[m->n_msgs++] = &m->sys_msg;
    }
    for (int i = 0; i < o->n_images; i++) {
        duogen__v1__image__init(&m->imgs[i]);
        m->imgs[i].source_case = DUOGEN__V1__IMAGE__SOURCE_DATA;
        m->imgs[i].data.data = read_file(o->images[i], &m->imgs[i].data.len);
        duogen__v1__part__init(&m->parts[n_parts]);
        m->parts[n_parts].kind_case = DUOGEN__V1__PART__KIND_IMAGE;
        m->parts[n_parts].image = &m->imgs[i];
        m->user_parts[n_parts] = &m->parts[n_parts];
        n_parts++;
    }
    m->n_imgs = o->n_images;
    if (o->tl) {
        duogen__v1__part__init(&m->parts[n_parts]);
        m->parts[n_parts].kind_case = DUOGEN__V1__PART__KIND_TEXT;
        m->parts[n_parts].text = o->text;
        m->user_parts[n_parts] = &m->parts[n_parts];
        n_parts++;
    }
    duogen__v1__message__init(&m->user_msg);
    m->user_msg.role = DUOGEN__V1__MESSAGE__ROLE__USER;
    m->user_msg.parts = m->user_parts;
    m->user_msg.n_parts = n_parts;
    m->msgs[m->n_msgs++] = &m->user_msg;
}

static void free_messages(job_messages *m) {
    for (int i = 0; i < m->n_imgs; i++) free(m->imgs[i].data.data);
}

/* The job, packed, onto the (high or normal) queue stream, with its state "queued"; its
 * deadline_s counts from now. An id whose job has a result already is not sent again (a
 * worker would only skip it): that is said, and 0 returned; else 1. */
static int push_job(enqueue_opts *o) {
    job_messages m;
    job_builder *b = &o->b;
    char k_jobs[512], k_job[512], k_result[512];
    key(k_jobs, sizeof k_jobs, o->high ? "jobs:high" : "jobs", NULL);
    key(k_job, sizeof k_job, "job", o->id);
    key(k_result, sizeof k_result, "result", o->id);
    build_messages(&m, o);   /* its files read before anything is written */
    /* "queued" first: the worker's "running" always comes after it */
    redisReply *set = cmd(dg_cmd_of("HSETNX", k_job, "state", "queued", NULL));
    const int known = set->type == REDIS_REPLY_INTEGER && set->integer == 0;
    freeReplyObject(set);
    if (known) {   /* the same id again: a retry of this job, or a new job under a used id */
        redisReply *st = cmd(dg_cmd_of("HGET", k_result, "status", NULL));
        const int ended = st->type == REDIS_REPLY_STRING;
        if (ended)
            fprintf(stderr, "duogenctl: job \"%s\" has ended already (%s): not sent again; its result stands "
                    "(a new job needs another id)\n", o->id, st->str);
        freeReplyObject(st);
        if (ended) {
            free_messages(&m);
            return 0;
        }
    }
    b->job.id = o->id;
    b->job.messages = m.msgs;
    b->job.n_messages = m.n_msgs;
    b->text.stop = b->stop;
    b->text.n_stop = b->n_stop;
    b->text.logit_bias = b->bias;
    b->text.n_logit_bias = b->n_bias;
    b->job.text = &b->text;
    b->job.image = &b->image;
    b->job.metadata = b->meta;
    b->job.n_metadata = b->n_meta;
    b->job.deadline_unix_ms = 0;
    if (b->deadline_s > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        b->job.deadline_unix_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 + (int64_t)(b->deadline_s * 1000);
    }

    size_t len = duogen__v1__job__get_packed_size(&b->job);
    uint8_t *buf = malloc(len);
    if (!buf) die(EXIT_IO, "out of memory for a job of %zu bytes", len);
    duogen__v1__job__pack(&b->job, buf);
    freeReplyObject(cmd(dg_cmd_of("EXPIRE", k_job, "86400", NULL)));
    dg_cmd *x = dg_cmd_of("XADD", k_jobs, "*", "id", o->id, "job", NULL);
    dg_cmd_add(x, buf, len);
    freeReplyObject(cmd(x));
    free(buf);
    free_messages(&m);
    return 1;
}

static int cmd_enqueue(int argc, char **argv) {
    static enqueue_opts o;   /* static: 256 KB of image paths */
    parse_enqueue(argc, argv, &o);
    push_job(&o);
    printf("%s\n", o.id);
    dg_ctl_flush();
    int rc = 0;
    if (o.wait) {
        rc = follow(o.id, 1);
        int rc2 = write_result(o.id, o.out_dir, NULL, 0);
        if (!rc) rc = rc2;
    }
    json_decref(o.job_file);
    free(o.text);
    return rc;
}

/* ---- following events ----------------------------------------------------------------------- */

/* The view of --wait: on a terminal the answer's text streams to stdout as it comes; while
 * an image is drawn, a progress bar stands on a line of its own (stderr) and is cleared when
 * the text goes on, so the two never overwrite each other. Into a pipe or file, the text
 * of the attempt that ended is written once it ends. */
typedef struct {
    int tty;           /* stderr is a terminal: draw the bar */
    int live;          /* stdout is a terminal: the text as it comes; else the last attempt's
                          text once the job ends (a script reads one answer, not a retried
                          attempt's beginning before it) */
    int bar_shown;     /* the bar occupies the current line */
    int mid_line;      /* the text printed so far does not end with a newline */
    int tokens;
    char  *held;       /* !live: the current attempt's text */
    size_t n_held, cap_held;
} view;

static void bar_clear(view *v) {
    if (!v->bar_shown) return;
    fputs("\r\033[K", stderr);
    fflush(stderr);
    v->bar_shown = 0;
}

static void bar_show(view *v, const char *what, double frac) {
    if (!v->tty) return;
    if (v->live && !v->bar_shown && v->mid_line) {   /* keep the text's line: the bar goes below it */
        fputc('\n', stdout);
        dg_ctl_flush();
        v->mid_line = 0;
    }
    int width = 30, filled = (int)(frac * width + 0.5);
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < filled ? '#' : '.';
    bar[width] = 0;
    fprintf(stderr, "\r\033[K[%s] %-28s %5d tokens", bar, what, v->tokens);
    fflush(stderr);
    v->bar_shown = 1;
}

static void put_text(view *v, const char *text) {
    size_t n = strlen(text);
    if (!n) return;
    if (!v->live) {
        if (v->n_held + n + 1 > v->cap_held) {
            v->cap_held = (v->n_held + n + 1) * 2;
            if (!(v->held = realloc(v->held, v->cap_held))) die(EXIT_IO, "out of memory");
        }
        memcpy(v->held + v->n_held, text, n + 1);
        v->n_held += n;
        v->mid_line = text[n - 1] != '\n';
        return;
    }
    bar_clear(v);
    fputs(text, stdout);
    dg_ctl_flush();
    v->mid_line = text[n - 1] != '\n';
}

/* The answer's text from the result hash (events trimmed away: what was followed is not all
 * of it), on stdout. */
static void print_result_text(const char *id) {
    char k_result[512];
    key(k_result, sizeof k_result, "result", id);
    redisReply *rep = cmd(dg_cmd_of("HGET", k_result, "text", NULL));
    if (rep->type == REDIS_REPLY_STRING) {
        fwrite(rep->str, 1, rep->len, stdout);
        if (rep->len && rep->str[rep->len - 1] != '\n') fputc('\n', stdout);
    }
    freeReplyObject(rep);
}

/* FNV-1a over an event's fields, names and values with their lengths: a send the worker
 * made again after a cut connection repeats an event byte for byte (its seq and its time
 * in the pb included); another attempt's event of the same seq differs. */
static uint64_t event_hash(const redisReply *f) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < f->elements; i++) {
        const redisReply *e = f->element[i];
        const size_t len = e->type == REDIS_REPLY_STRING ? e->len : 0;
        for (size_t k = 0; k < sizeof len; k++) h = (h ^ (uint8_t)(len >> (8 * k))) * 1099511628211ull;
        for (size_t k = 0; k < len; k++) h = (h ^ (uint8_t)e->str[k]) * 1099511628211ull;
    }
    return h;
}

/* Reads the job's events from the start; prints text as it arrives (show_text) or one line
 * per event, each read's lines flushed before the next waits (into a pipe they
 * came all at once when the job ended). Returns 0 for done, EXIT_JOB otherwise. */
static int follow(const char *id, int show_text) {
    char k_events[512], last[64] = "0", line[8192];   /* an error of 1024 bytes with its code, a path of 4096 */
    key(k_events, sizeof k_events, "events", id);
    view v = {.tty = show_text && isatty(2), .live = !show_text || isatty(1)};
    int rc = -1, gap = 0;
    unsigned long long seq_next = 1;   /* each attempt's events count from 1 */
    uint64_t *seen = NULL;             /* event_hash() of this attempt's events by seq - 1: 0 none */
    size_t n_seen = 0, cap_seen = 0;
    bar_show(&v, "waiting for a worker", 0);
    while (rc < 0) {
        redisReply *rep = cmd_waiting(dg_cmd_of("XREAD", "COUNT", "100", "BLOCK", "1000", "STREAMS", k_events, last, NULL));
        if (rep->type != REDIS_REPLY_ARRAY) { freeReplyObject(rep); continue; }
        const redisReply *entries = rep->element[0]->element[1];
        for (size_t i = 0; i < entries->elements && rc < 0; i++) {
            const redisReply *e = entries->element[i], *f = e->element[1];
            snprintf(last, sizeof last, "%s", e->element[0]->str);
            const char *type = hstr(f, "type");
            const unsigned long long seq = strtoull(hstr(f, "seq"), NULL, 10);
            const uint64_t h = event_hash(f) | 1;
            if (seq >= 1 && seq <= n_seen && seen[seq - 1] == h) continue;   /* shown already: sent again */
            line[0] = 0;
            if (seq >= 1 && seq < seq_next) {   /* a new attempt: the job started over */
                n_seen = 0;
                v.n_held = 0;
                if (!v.live) v.mid_line = 0;
                gap = 0;
                if (show_text && v.live && v.tokens) {
                    bar_clear(&v);
                    if (v.mid_line) put_text(&v, "\n");
                    fprintf(stderr, "duogenctl: attempt %s (worker %s) starts the answer over\n", hstr(f, "attempt"),
                            hstr(f, "worker"));
                }
            } else if (seq > seq_next && !gap) {   /* trimmed (events_maxlen): some are gone */
                gap = 1;
                bar_clear(&v);
                fprintf(stderr, "duogenctl: %llu events of job \"%s\" were trimmed before they were read%s\n",
                        seq - seq_next, id, show_text ? "; the answer is the result's text" : "");
            }
            seq_next = seq + 1;
            if (seq >= 1 && seq <= 1u << 22) {   /* a bound: a reader of a hostile stream stays small */
                if (seq > cap_seen) {
                    cap_seen = seq * 2;
                    seen = realloc(seen, cap_seen * sizeof *seen);
                    if (!seen) abort();
                }
                for (; n_seen < seq; n_seen++) seen[n_seen] = 0;
                seen[seq - 1] = h;
            }
            if (!strcmp(type, "text")) {
                v.tokens++;
                if (show_text) put_text(&v, hstr(f, "text"));
                else snprintf(line, sizeof line, "text %s", hstr(f, "text"));
            } else if (!strcmp(type, "started")) {
                snprintf(line, sizeof line, "started worker=%s attempt=%s", hstr(f, "worker"), hstr(f, "attempt"));
                if (show_text) {
                    bar_clear(&v);
                    line[0] = 0;
                }
            } else if (!strcmp(type, "image_started")) {
                snprintf(line, sizeof line, "image_started index=%s %sx%s steps=%s", hstr(f, "index"),
                         hstr(f, "width"), hstr(f, "height"), hstr(f, "steps"));
                if (show_text) {
                    char what[64];
                    snprintf(what, sizeof what, "image %s: %sx%s", hstr(f, "index"), hstr(f, "width"), hstr(f, "height"));
                    bar_show(&v, what, 0);
                    line[0] = 0;
                }
            } else if (!strcmp(type, "step")) {
                snprintf(line, sizeof line, "step index=%s %s/%s", hstr(f, "index"), hstr(f, "step"), hstr(f, "steps"));
                if (show_text) {
                    char what[64];
                    snprintf(what, sizeof what, "image %s step %s/%s", hstr(f, "index"), hstr(f, "step"), hstr(f, "steps"));
                    bar_show(&v, what, atof(hstr(f, "step")) / atof(hstr(f, "steps")));
                    line[0] = 0;
                }
            } else if (!strcmp(type, "image")) {
                /* a Redis key, or a file's path where the worker writes images to files */
                const char *where = hstr(f, "key")[0] ? hstr(f, "key") : hstr(f, "path");
                snprintf(line, sizeof line, "image index=%s %s=%s %sx%s", hstr(f, "index"), hstr(f, "key")[0] ? "key" : "path",
                         where, hstr(f, "width"), hstr(f, "height"));
                if (show_text) {
                    snprintf(line, sizeof line, "%s[image %s: %s]\n", v.mid_line ? "\n" : "", hstr(f, "index"), where);
                    put_text(&v, line);
                    line[0] = 0;
                }
            } else if (!strcmp(type, "done") || !strcmp(type, "failed") || !strcmp(type, "cancelled")) {
                rc = !strcmp(type, "done") && !strcmp(hstr(f, "status"), "done") ? 0 : EXIT_JOB;
                if (!strcmp(type, "done")) snprintf(line, sizeof line, "%s (%s)", hstr(f, "status"), hstr(f, "finish_reason"));
                else if (!strcmp(type, "failed")) snprintf(line, sizeof line, "failed: %s: %s", hstr(f, "code"), hstr(f, "error"));
                else snprintf(line, sizeof line, "cancelled");
                if (show_text) {
                    bar_clear(&v);
                    if (v.live && v.mid_line) fputc('\n', stdout);
                    v.mid_line = 0;
                    if (gap) {   /* what was followed is not all of it */
                        print_result_text(id);
                    } else if (!v.live && v.n_held) {
                        fputs(v.held, stdout);
                        if (v.held[v.n_held - 1] != '\n') fputc('\n', stdout);
                    }
                    dg_ctl_flush();
                    fprintf(stderr, "%s\n", line);
                    line[0] = 0;
                }
            }
            if (line[0]) printf("%s\n", line);
        }
        freeReplyObject(rep);
        dg_ctl_flush();
    }
    dg_ctl_flush();
    free(v.held);
    free(seen);
    return rc;
}

/* ---- results ---------------------------------------------------------------------------------- */

/* A file's bytes (malloc'd), or NULL with *len 0 when it cannot be read. */
static uint8_t *slurp(const char *path, size_t *len) {
    uint8_t *buf = read_all(path, len);
    if (buf && !*len) {
        free(buf);
        buf = NULL;
    }
    return buf;
}

/* The target of the answer's link to image n, "![image n](target)" (the worker writes
 * one per image, to its key or its file), malloc'd; "" when the answer has none. */
static char *link_target(const char *text, int n) {
    char open[32];
    snprintf(open, sizeof open, "![image %d](", n);
    const char *a = strstr(text, open), *b = a ? strchr(a + strlen(open), ')') : NULL;
    char *t = b ? strndup(a + strlen(open), (size_t)(b - a - strlen(open))) : strdup("");
    if (!t) die(EXIT_IO, "out of memory");
    return t;
}

/* The result's images, in order: for each, the URL its answer links it by and its bytes
 * (inline in the Result, from its file, or from its Redis key). The array of *n, URLs and
 * bytes owned (free_images frees them). */
static dg_html_image *fetch_images(const Duogen__V1__Result *res, const char *text, int *n) {
    dg_html_image *imgs = calloc(res->n_output + 1, sizeof *imgs);
    if (!imgs) die(EXIT_IO, "out of memory");
    *n = 0;
    for (size_t i = 0; i < res->n_output; i++) {
        const Duogen__V1__Image *im = res->output[i]->kind_case == DUOGEN__V1__PART__KIND_IMAGE ? res->output[i]->image : NULL;
        if (!im) continue;
        dg_html_image *out = &imgs[(*n)++];
        /* the file the worker wrote: Image.file, or path where a worker before that field
         * named it there (never with the bytes inline) */
        const char *file = im->file && im->file[0] ? im->file
                         : im->source_case == DUOGEN__V1__IMAGE__SOURCE_PATH ? im->path : "";
        int from_file = file[0] != 0;
        uint8_t *bytes = NULL;
        size_t len = 0;
        /* the link is to the key or the file; an image inlined in the Result (inline_images)
         * names neither there, and its link is found by its number */
        out->url = from_file ? strdup(file) : im->key[0] ? strdup(im->key) : link_target(text, *n);
        if (!out->url) die(EXIT_IO, "out of memory");
        if (im->source_case == DUOGEN__V1__IMAGE__SOURCE_DATA && im->data.len) {
            if ((bytes = malloc(im->data.len))) memcpy(bytes, im->data.data, len = im->data.len);
        } else if (from_file) {
            bytes = slurp(file, &len);
        } else {
            redisReply *rep = cmd(dg_cmd_of("GET", im->key, NULL));
            if (rep->type == REDIS_REPLY_STRING && (bytes = malloc(rep->len))) memcpy(bytes, rep->str, len = rep->len);
            freeReplyObject(rep);
        }
        if (!bytes) fprintf(stderr, "duogenctl: image %d (%s) is gone\n", *n, out->url);
        out->png = bytes;
        out->len = len;
    }
    return imgs;
}

static void free_images(dg_html_image *imgs, int n) {
    for (int i = 0; i < n; i++) {
        free((uint8_t *)imgs[i].png);
        free((char *)imgs[i].url);
    }
    free(imgs);
}

/* DIR/answer.md with the links to images whose bytes are here made image-N.png, and those
 * files (an image that is gone keeps its link; an image-N.png an earlier answer written
 * into DIR left, of its number or above this answer's count, goes). Returns how many are
 * gone. */
static int write_markdown(const char *dir, const char *text, const dg_html_image *imgs, int n_images) {
    char path[4096];
    if (mkdir(dir, 0755) && errno != EEXIST) die(EXIT_IO, "cannot create \"%s\": %s", dir, strerror(errno));
    snprintf(path, sizeof path, "%s/answer.md", dir);
    FILE *md = fopen(path, "w");
    if (!md) die(EXIT_IO, "cannot write \"%s\"", path);
    for (const char *p = text; *p;) {
        const char *hit = NULL;
        int n = 0;
        for (int i = 0; i < n_images; i++) {   /* the earliest link; of :1 and :10 there, :10 */
            const char *h = imgs[i].url[0] ? strstr(p, imgs[i].url) : NULL;
            if (h && (!hit || h < hit || (h == hit && strlen(imgs[i].url) > strlen(imgs[n - 1].url)))) {
                hit = h;
                n = i + 1;
            }
        }
        if (!hit) { fputs(p, md); break; }
        fwrite(p, 1, (size_t)(hit - p), md);
        if (imgs[n - 1].png) fprintf(md, "image-%d.png", n);
        else fputs(imgs[n - 1].url, md);
        p = hit + strlen(imgs[n - 1].url);
    }
    if (fclose(md)) die(EXIT_IO, "cannot write \"%s\"", path);
    int written = 0;
    for (int i = 0; i < n_images; i++) {
        char name[64];
        snprintf(name, sizeof name, "image-%d.png", i + 1);
        if (imgs[i].png) {
            write_file(dir, name, imgs[i].png, imgs[i].len);
            written++;
        } else {
            snprintf(path, sizeof path, "%s/%s", dir, name);
            if (unlink(path) && errno != ENOENT) die(EXIT_IO, "cannot remove \"%s\": %s", path, strerror(errno));
        }
    }
    DIR *d = opendir(dir);   /* an earlier answer's pictures past this one's */
    for (struct dirent *e; d && (e = readdir(d));) {
        int k, end = 0;
        if (!strncmp(e->d_name, "image-", 6) && e->d_name[6] >= '1' && e->d_name[6] <= '9' &&
            sscanf(e->d_name, "image-%d.png%n", &k, &end) == 1 && end && !e->d_name[end] && k > n_images) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if (unlink(path) && errno != ENOENT) die(EXIT_IO, "cannot remove \"%s\": %s", path, strerror(errno));
        }
    }
    if (d) closedir(d);
    fprintf(stderr, "wrote %s/answer.md and %d image(s)%s\n", dir, written,
            written < n_images ? " (the others are gone: their links are kept as they were)" : "");
    return n_images - written;
}

/* Prints the result (print), and writes it as Markdown and PNGs into out_dir and as one HTML
 * page into html_dir (either may be NULL). Returns 0 when the job is done, else EXIT_JOB. */
static int write_result(const char *id, const char *out_dir, const char *html_dir, int print) {
    char k_result[512], err[1024];
    key(k_result, sizeof k_result, "result", id);
    redisReply *h = cmd(dg_cmd_of("HGETALL", k_result, NULL));
    if (h->elements == 0) {
        freeReplyObject(h);
        fprintf(stderr, "duogenctl: no result for \"%s\" (yet)\n", id);
        return EXIT_JOB;
    }
    const char *status = hstr(h, "status"), *text = hstr(h, "text");
    int rc = !strcmp(status, "done") ? 0 : EXIT_JOB;
    if (print) {
        printf("status: %s\n", status);
        if (*hstr(h, "error")) printf("error: %s: %s\n", hstr(h, "error_code"), hstr(h, "error"));
        printf("images: %s\n\n%s\n", hstr(h, "images"), text);
    }
    if (out_dir || html_dir) {
        const redisReply *pb = hfield(h, "pb");
        Duogen__V1__Result *res = pb && pb->type == REDIS_REPLY_STRING
                                  ? duogen__v1__result__unpack(NULL, pb->len, (const uint8_t *)pb->str) : NULL;
        if (!res) die(EXIT_IO, "%s: its pb field is not a Result", k_result);
        int n_images;
        dg_html_image *imgs = fetch_images(res, text, &n_images);
        /* an answer written without a picture it had is not the whole answer */
        if (out_dir && write_markdown(out_dir, text, imgs, n_images) && !rc) rc = EXIT_JOB;
        if (html_dir && dg_html_write_answer(html_dir, id, text, imgs, n_images, res, err, sizeof err))
            die(EXIT_IO, "%s", err);
        for (int i = 0; html_dir && i < n_images; i++)   /* as for out_dir: a picture is missing */
            if (!imgs[i].png && !rc) rc = EXIT_JOB;
        if (html_dir) fprintf(stderr, "wrote %s/index.html\n", html_dir);
        free_images(imgs, n_images);
        duogen__v1__result__free_unpacked(res, NULL);
    }
    freeReplyObject(h);
    return rc;
}

/* ---- batch ---------------------------------------------------------------------------------- */

/* One job of a batch file. */
typedef struct {
    char id[160];
    long line;
    char status[16];   /* "" while it has not ended; done, failed, cancelled, expired */
    int  in_flight;    /* enqueued by this run, or found queued or running */
    int  before;       /* had ended before this run */
} batch_job;

static int batch_job_cmp(const void *a, const void *b) {
    return strcmp(((const batch_job *)a)->id, ((const batch_job *)b)->id);
}

static batch_job *batch_find(batch_job *jobs, size_t n, const char *id) {
    batch_job probe;
    snprintf(probe.id, sizeof probe.id, "%s", id);
    return bsearch(&probe, jobs, n, sizeof *jobs, batch_job_cmp);
}

static void builder_reset(job_builder *b) {
    for (size_t i = 0; i < b->n_stop; i++) free(b->stop[i]);
    for (size_t i = 0; i < b->n_bias; i++) free(b->bias[i]);
    for (size_t i = 0; i < b->n_meta; i++) {
        free(b->meta[i]->key);
        free(b->meta[i]->value);
        free(b->meta[i]);
    }
    free(b->stop);
    free(b->bias);
    free(b->meta);
    memset(b, 0, sizeof *b);
    duogen__v1__job__init(&b->job);
    duogen__v1__text_params__init(&b->text);
    duogen__v1__image_params__init(&b->image);
}

/* A batch file's line read into o, checked as enqueue checks its options (and its images
 * readable); the id, when the line has none, is <stem>-<line>. Returns the JSON document
 * (owning o's strings; the caller frees it), or NULL for a blank line. Dies naming the
 * line where it is wrong. */
static json_t *batch_line(const char *text, const char *path, const char *dir, const char *stem, long lineno,
                          enqueue_opts *o) {
    static char where[4200];
    snprintf(where, sizeof where, "\"%s\" line %ld", path, lineno);
    if (!text[strspn(text, " \t\r\n")]) return NULL;
    builder_reset(&o->b);
    o->id[0] = 0;
    o->tl = 0;
    o->n_images = 0;
    o->system = NULL;
    json_error_t je;
    json_t *j = json_loads(text, 0, &je);
    if (!j || !json_is_object(j)) die(EXIT_USAGE, "%s: %s", where, j ? "not a JSON object" : je.text);
    job_from_json(j, dir, where, o);
    if (!o->id[0] && snprintf(o->id, sizeof o->id, "%s-%ld", stem, lineno) >= (int)sizeof o->id)
        die(EXIT_USAGE, "%s: no id, and %s-%ld is too long for one", where, stem, lineno);
    job_check(o, where);
    /* each image is read when its line is sent: it must be a file that can be read then */
    for (int i = 0; i < o->n_images; i++) {
        struct stat st;
        FILE *f = fopen(o->images[i], "rb");
        if (!f || fstat(fileno(f), &st)) die(EXIT_IO, "%s: image \"%s\": %s", where, o->images[i], strerror(errno));
        fclose(f);
        if (!S_ISREG(st.st_mode))
            die(EXIT_IO, "%s: image \"%s\": %s", where, o->images[i],
                S_ISDIR(st.st_mode) ? "a folder" : "not a regular file (a batch reads each image as its line goes out)");
        if (!st.st_size) die(EXIT_IO, "%s: image \"%s\": empty", where, o->images[i]);
    }
    return j;
}

/* A batch file, opened for one of its two passes. A regular file is opened again for the
 * second; anything else (a pipe, /dev/stdin, a process substitution) can be read once, so
 * the first pass keeps its bytes in *mem (*mem_len) and both passes read those. */
static FILE *batch_open(const char *path, char **mem, size_t *mem_len) {
    if (*mem) return fmemopen(*mem, *mem_len, "r");
    struct stat st;
    FILE *f = fopen(path, "r");
    if (!f) die(EXIT_IO, "batch file \"%s\": %s", path, strerror(errno));
    if (fstat(fileno(f), &st)) die(EXIT_IO, "batch file \"%s\": %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) die(EXIT_IO, "batch file \"%s\": a folder", path);
    if (S_ISREG(st.st_mode)) return f;
    fclose(f);
    if (!(*mem = (char *)read_all(path, mem_len))) die(EXIT_IO, "batch file \"%s\": %s", path, strerror(errno));
    if (!*mem_len) die(EXIT_USAGE, "batch file \"%s\": no job in it", path);
    return fmemopen(*mem, *mem_len, "r");
}

/* The id of a batch line that gives none is <stem>-<line>: the stem is the file's name
 * without its last extension ("jobs.mon.jsonl": "jobs.mon"), each byte an id cannot hold
 * made '_' (and a leading '-', which duogenctl's commands would read as an option); "batch"
 * where nothing is left. */
static void batch_stem(const char *path, char *stem, size_t n) {
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    const char *dot = strrchr(base, '.');
    size_t len = dot && dot > base ? (size_t)(dot - base) : strlen(base);
    if (len >= n) len = n - 1;
    for (size_t i = 0; i < len; i++)   /* the workers' alphabet (job.c), a '-' not first */
        stem[i] = dg_job_id_valid(base + i, 1) && (base[i] != '-' || i) ? base[i] : '_';
    stem[len] = 0;
    if (!len || !strcmp(stem, ".") || !strcmp(stem, "..")) snprintf(stem, n, "batch");
}

/* Reads the file's lines into *jobs (sorted by id) after checking each; dies at the first
 * line that is wrong, or an id given twice. Returns how many. */
static size_t batch_read(const char *path, const char *dir, const char *stem, enqueue_opts *o, batch_job **jobs,
                         char **mem, size_t *mem_len) {
    FILE *f = batch_open(path, mem, mem_len);
    if (!f) die(EXIT_IO, "batch file \"%s\": %s", path, strerror(errno));
    char *text = NULL;
    size_t cap = 0, n = 0, room = 0;
    long lineno = 0;
    *jobs = NULL;
    while (getline(&text, &cap, f) >= 0) {
        json_t *j = batch_line(text, path, dir, stem, ++lineno, o);
        if (!j) continue;
        if (n == room && !(*jobs = realloc(*jobs, (room = room ? 2 * room : 256) * sizeof **jobs)))
            die(EXIT_IO, "out of memory");
        batch_job *b = &(*jobs)[n++];
        memset(b, 0, sizeof *b);
        snprintf(b->id, sizeof b->id, "%s", o->id);
        b->line = lineno;
        json_decref(j);
    }
    if (ferror(f)) die(EXIT_IO, "batch file \"%s\": %s", path, strerror(errno));
    fclose(f);
    free(text);
    if (!n) die(EXIT_USAGE, "batch file \"%s\": no job in it", path);
    qsort(*jobs, n, sizeof **jobs, batch_job_cmp);
    for (size_t i = 1; i < n; i++)
        if (!strcmp((*jobs)[i].id, (*jobs)[i - 1].id))
            die(EXIT_USAGE, "\"%s\" lines %ld and %ld: the same id \"%s\"", path, (*jobs)[i - 1].line,
                (*jobs)[i].line, (*jobs)[i].id);
    return n;
}

/* Where a batch stands, on a line of its own on stderr when that is a terminal (redrawn as
 * jobs go out and end; cleared before any other line is written). */
static struct {
    int    tty;
    size_t n, sent, ended, done;
} progress;

static void progress_clear(void) {
    if (!progress.tty) return;
    fputs("\r\033[K", stderr);
    fflush(stderr);
}

static void progress_show(void) {
    if (!progress.tty) return;
    fprintf(stderr, "\r\033[Kbatch: %zu of %zu ended (%zu done), %zu sent", progress.ended, progress.n, progress.done,
            progress.sent);
    fflush(stderr);
}

/* A job of the batch has ended with status: said on a line of its own (with its error), its
 * answer written under out_dir/<id>/ where asked. */
static void batch_ended(batch_job *b, const char *status, const char *out_dir, int before) {
    snprintf(b->status, sizeof b->status, "%s", status);
    b->in_flight = 0;
    b->before = before;
    progress.ended++;
    progress.done += !strcmp(status, "done");
    progress_clear();
    char k_result[512];
    key(k_result, sizeof k_result, "result", b->id);
    /* HGET, which a producer's ACL grants (deploy/redis/users.acl.example), not HMGET */
    dg_cmd *ask[2] = {dg_cmd_of("HGET", k_result, "error_code", NULL), dg_cmd_of("HGET", k_result, "error", NULL)};
    redisReply *r[2];
    pipeline_waiting(ask, 2, r);
    const int has_error = r[0]->type == REDIS_REPLY_STRING && r[1]->type == REDIS_REPLY_STRING && r[1]->len;
    if (has_error)
        printf("%s %s%s: %s: %s\n", b->id, status, before ? " (before this run)" : "", r[0]->str, r[1]->str);
    else
        printf("%s %s%s\n", b->id, status, before ? " (before this run)" : "");
    for (int q = 0; q < 2; q++) {
        freeReplyObject(r[q]);
        dg_cmd_free(ask[q]);
    }
    if (out_dir) {
        char dir[4400];
        snprintf(dir, sizeof dir, "%s/%s", out_dir, b->id);
        dg_ctl_flush();
        write_result(b->id, dir, NULL, 0);
    }
    dg_ctl_flush();
    progress_show();
}

/* The done stream's newest entry id ("0-0" when it is empty): ends after it are this run's
 * to see. */
static void done_position(char *last, size_t n) {
    char k_done[512];
    key(k_done, sizeof k_done, "done", NULL);
    redisReply *r = cmd_waiting(dg_cmd_of("XREVRANGE", k_done, "+", "-", "COUNT", "1", NULL));
    snprintf(last, n, "%s", r->type == REDIS_REPLY_ARRAY && r->elements ? r->element[0]->element[0]->str : "0-0");
    freeReplyObject(r);
}

/* Reads the done stream after *last for up to a second: each entry of a job of this batch
 * still in flight ends it. Every ~10 s, and when asked (sweep), the jobs in flight are also
 * looked up directly (a done entry trimmed away before it was read is not missed).
 * Returns how many ended. */
static size_t batch_wait(batch_job *jobs, size_t n, char *last, size_t last_n, const char *out_dir, int sweep) {
    static int64_t swept_ms;
    size_t ended = 0;
    char k_done[512];
    key(k_done, sizeof k_done, "done", NULL);
    redisReply *r = cmd_waiting(dg_cmd_of("XREAD", "COUNT", "500", "BLOCK", "1000", "STREAMS", k_done, last, NULL));
    if (r->type == REDIS_REPLY_ARRAY && r->elements) {
        const redisReply *entries = r->element[0]->element[1];
        for (size_t i = 0; i < entries->elements; i++) {
            const redisReply *e = entries->element[i];
            snprintf(last, last_n, "%s", e->element[0]->str);
            batch_job *b = batch_find(jobs, n, hstr(e->element[1], "id"));
            if (b && b->in_flight) {
                batch_ended(b, hstr(e->element[1], "status"), out_dir, 0);
                ended++;
            }
        }
    }
    freeReplyObject(r);
    if (!sweep && dg_mono_ms() - swept_ms < 10000) return ended;
    swept_ms = dg_mono_ms();
    enum { CHUNK = 256 };
    dg_cmd *ask[CHUNK];
    batch_job *of[CHUNK];
    redisReply *rep[CHUNK];
    for (size_t i = 0; i < n;) {
        int k = 0;
        for (; i < n && k < CHUNK; i++) {
            if (!jobs[i].in_flight) continue;
            char k_result[512];
            key(k_result, sizeof k_result, "result", jobs[i].id);
            of[k] = &jobs[i];
            ask[k++] = dg_cmd_of("HGET", k_result, "status", NULL);
        }
        pipeline_waiting(ask, k, rep);
        for (int q = 0; q < k; q++) {
            if (rep[q]->type == REDIS_REPLY_STRING) {
                batch_ended(of[q], rep[q]->str, out_dir, 0);
                ended++;
            }
            freeReplyObject(rep[q]);
            dg_cmd_free(ask[q]);
        }
    }
    return ended;
}

static int cmd_batch(int argc, char **argv) {
    static enqueue_opts o;   /* static: 256 KB of image paths */
    const char *path = NULL, *out_dir = NULL;
    int wait = 0, high = 0;
    long window = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--wait")) wait = 1;
        else if (!strcmp(argv[i], "--high")) high = 1;
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out_dir = argv[++i], wait = 1;
        else if (!strcmp(argv[i], "--window") && i + 1 < argc) {
            char *end;
            window = strtol(argv[++i], &end, 10);
            if (*end || window < 1 || window > 1000000) die(EXIT_USAGE, "batch: --window is 1 .. 1000000 jobs");
            wait = 1;
        } else if (argv[i][0] == '-' || path) return -1;
        else path = argv[i];
    }
    if (!path) return -1;
    if (out_dir && mkdir(out_dir, 0755) && errno != EEXIST)
        die(EXIT_IO, "cannot create \"%s\": %s", out_dir, strerror(errno));
    char dir[4096], stem[256], *mem = NULL;
    size_t mem_len = 0;
    dir_of(path, dir, sizeof dir);
    batch_stem(path, stem, sizeof stem);

    /* every line checked before the first job goes out: a batch is enqueued whole or not at all */
    batch_job *jobs;
    const size_t n = batch_read(path, dir, stem, &o, &jobs, &mem, &mem_len);
    progress.tty = wait && isatty(2);
    progress.n = n;
    char last[64];
    done_position(last, sizeof last);   /* before looking: an end after the look is in the stream */

    /* the file again, line by line: each job that has not run and is not running goes out;
     * one that has ended (an earlier run of this batch) or is on its way is not sent twice */
    FILE *f = batch_open(path, &mem, &mem_len);
    if (!f) die(EXIT_IO, "batch file \"%s\": %s", path, strerror(errno));
    char *text = NULL;
    size_t cap = 0, in_flight = 0, sent = 0, on_way = 0, ended_before = 0;
    long lineno = 0;
    while (getline(&text, &cap, f) >= 0) {
        json_t *j = batch_line(text, path, dir, stem, ++lineno, &o);
        if (!j) continue;
        batch_job *b = batch_find(jobs, n, o.id);
        if (!b || b->line != lineno) die(EXIT_IO, "batch file \"%s\" changed while it was read", path);
        char k_result[512], k_job[512];
        key(k_result, sizeof k_result, "result", o.id);
        key(k_job, sizeof k_job, "job", o.id);
        dg_cmd *ask[2] = {dg_cmd_of("HGET", k_result, "status", NULL), dg_cmd_of("HGET", k_job, "state", NULL)};
        redisReply *rep[2];
        pipeline_waiting(ask, 2, rep);
        const char *state = rep[1]->type == REDIS_REPLY_STRING ? rep[1]->str : "";
        if (rep[0]->type == REDIS_REPLY_STRING) {   /* ended, in an earlier run of this batch */
            ended_before++;
            if (wait) batch_ended(b, rep[0]->str, out_dir, 1);
            else snprintf(b->status, sizeof b->status, "%s", rep[0]->str), b->before = 1;
        } else if (!strcmp(state, "running") || !strcmp(state, "retrying")) {
            b->in_flight = 1;   /* a worker has it: not sent again */
            in_flight++;
            on_way++;
        } else {
            /* new, or "queued" by an earlier run: sent (again). An entry still waiting from
             * that run is only acknowledged once this one's result exists; one that never
             * went out (that run stopped between its two writes) is not waited for forever */
            while (window && in_flight >= (size_t)window)
                in_flight -= batch_wait(jobs, n, last, sizeof last, out_dir, 0);
            o.high = high;
            char where[4200];
            snprintf(where, sizeof where, "\"%s\" line %ld", path, lineno);
            die_where = where;   /* a file that changed since the check is named with its line */
            push_job(&o);        /* (one that ended meanwhile is not sent: the sweep finds its result) */
            die_where = NULL;
            b->in_flight = 1;
            in_flight++;
            sent++;
            progress.sent = sent;
            progress_show();
        }
        for (int q = 0; q < 2; q++) {
            freeReplyObject(rep[q]);
            dg_cmd_free(ask[q]);
        }
        json_decref(j);
    }
    fclose(f);
    free(text);
    free(mem);
    free(o.text);
    o.text = NULL;
    o.tcap = 0;
    builder_reset(&o.b);
    progress_clear();
    fprintf(stderr, "duogenctl: %s: %zu jobs: %zu enqueued, %zu running already, %zu ended before\n", path, n, sent,
            on_way, ended_before);
    progress_show();
    if (!wait) {
        free(jobs);
        return 0;
    }
    for (int sweep = 1; in_flight; sweep = 0) in_flight -= batch_wait(jobs, n, last, sizeof last, out_dir, sweep);
    progress_clear();

    /* the tally: every job of the file, each once */
    size_t done = 0, failed = 0, cancelled = 0, expired = 0, open = 0, before = 0;
    for (size_t i = 0; i < n; i++) {
        const char *s = jobs[i].status;
        before += jobs[i].before;
        if (!s[0]) open++;
        else if (!strcmp(s, "done")) done++;
        else if (!strcmp(s, "cancelled")) cancelled++;
        else if (!strcmp(s, "expired")) expired++;
        else failed++;
    }
    printf("batch %s: %zu jobs: %zu done, %zu failed, %zu cancelled, %zu expired", path, n, done, failed, cancelled,
           expired);
    if (open) printf(", %zu not ended yet", open);
    if (before) printf(" (%zu ended before this run)", before);
    printf("\n");
    free(jobs);
    return done == n ? 0 : EXIT_JOB;
}

/* ---- stats, dead, cancel ------------------------------------------------------------------------ */

static int cmd_stats(int argc, char **argv) {
    (void)argv;
    if (argc) return -1;
    const char *names[2] = {"jobs", "jobs:high"};
    for (int s = 0; s < 2; s++) {
        char k[512];
        key(k, sizeof k, names[s], NULL);
        redisReply *len = cmd(dg_cmd_of("XLEN", k, NULL));
        printf("stream %-24s length %lld\n", k, len->integer);
        freeReplyObject(len);
        dg_cmd *c = dg_cmd_of("XINFO", "GROUPS", k, NULL);
        redisReply *g = dg_redis_ready(&R) ? dg_redis_cmd(&R, c) : NULL;
        dg_cmd_free(c);
        if (g && g->type == REDIS_REPLY_ARRAY)
            for (size_t i = 0; i < g->elements; i++) {
                const redisReply *info = g->element[i];
                const redisReply *lag = hfield(info, "lag");
                char lagbuf[24] = "?";   /* entries not yet delivered; nil when Redis cannot tell */
                if (lag && lag->type == REDIS_REPLY_INTEGER) snprintf(lagbuf, sizeof lagbuf, "%lld", lag->integer);
                printf("  group %-18s consumers %lld  pending %lld  lag %s  last-delivered %s\n",
                       hstr(info, "name"), hint(info, "consumers"), hint(info, "pending"),
                       lagbuf, hstr(info, "last-delivered-id"));
            }
        if (g) freeReplyObject(g);
    }
    char pattern[512];
    key(pattern, sizeof pattern, "worker", "*");
    printf("\nworkers:\n  %-28s %-9s %-8s %-8s %-7s %-9s %s\n", "id", "state", "done", "failed", "dead", "heartbeat", "job");
    char cursor[32] = "0", evicting[256] = "";
    int n_workers = 0;
    do {
        redisReply *sc = cmd(dg_cmd_of("SCAN", cursor, "MATCH", pattern, "COUNT", "1000", NULL));
        snprintf(cursor, sizeof cursor, "%s", sc->element[0]->str);
        for (size_t i = 0; i < sc->element[1]->elements; i++) {
            const char *wk = sc->element[1]->element[i]->str;
            redisReply *h = cmd(dg_cmd_of("HGETALL", wk, NULL));
            if (!strcmp(hstr(h, "redis_evicts"), "1") && !evicting[0])   /* the first worker that read it */
                snprintf(evicting, sizeof evicting, "%s", wk + strlen(pattern) - 1);
            /* a hash with no beat yet: the id's lease taken (its owner field), the first beat
             * to come (it showed "starting" nowhere, and a heartbeat 56 years ago) */
            const char *beat = hstr(h, "updated_ms"), *state = hstr(h, "state");
            char age[32] = "          -";   /* as wide as "%6.1fs ago" */
            if (beat[0]) snprintf(age, sizeof age, "%6.1fs ago", (dg_now_ms() - strtoll(beat, NULL, 10)) / 1000.0);
            printf("  %-28s %-9s %-8s %-8s %-7s %s %s\n", wk + strlen(pattern) - 1, state[0] ? state : "starting",
                   hstr(h, "jobs_done"), hstr(h, "jobs_failed"), hstr(h, "jobs_dead"), age, hstr(h, "job"));
            freeReplyObject(h);
            n_workers++;
        }
        freeReplyObject(sc);
    } while (strcmp(cursor, "0"));
    if (!n_workers) printf("  (none alive)\n");
    char k_dead[512], k_done[512];
    key(k_dead, sizeof k_dead, "dead", NULL);
    key(k_done, sizeof k_done, "done", NULL);
    redisReply *d = cmd(dg_cmd_of("XLEN", k_dead, NULL));
    redisReply *dn = cmd(dg_cmd_of("XLEN", k_done, NULL));
    printf("\ndead letters %lld   done entries %lld\n", d->integer, dn->integer);
    freeReplyObject(d);
    freeReplyObject(dn);
    if (evicting[0])
        printf("\nwarning: Redis evicts keys when full (its maxmemory-policy is not noeviction, worker %s read): a "
               "job's entry, pending list or result can be deleted and the job lost; set maxmemory-policy "
               "noeviction\n", evicting);
    return 0;
}

static int cmd_dead(int argc, char **argv) {
    char k_dead[512];
    key(k_dead, sizeof k_dead, "dead", NULL);
    if (argc == 0 || !strcmp(argv[0], "list")) {
        const char *count = "20";
        for (int a = 1; a < argc; a++) {
            if (!strcmp(argv[a], "--count") && a + 1 < argc) {
                count = argv[++a];
                char *end;
                errno = 0;
                const long long n = strtoll(count, &end, 10);
                if (*end || end == count || errno || n < 1)
                    die(EXIT_USAGE, "dead list --count %s: not a whole number of 1 or more", count);
            } else {
                die(EXIT_USAGE, "dead list: unknown option \"%s\" (--count N)", argv[a]);
            }
        }
        redisReply *rep = cmd(dg_cmd_of("XREVRANGE", k_dead, "+", "-", "COUNT", count, NULL));
        for (size_t i = 0; i < rep->elements; i++) {
            const redisReply *f = rep->element[i]->element[1];
            printf("%s  %-24s deliveries %-3s worker %-20s %s: %s\n", rep->element[i]->element[0]->str,
                   hstr(f, "id"), hstr(f, "deliveries"), hstr(f, "worker"), hstr(f, "code"), hstr(f, "error"));
        }
        if (!rep->elements) printf("no dead letters\n");
        freeReplyObject(rep);
        return 0;
    }
    if (strcmp(argv[0], "requeue") || argc < 2) die(EXIT_USAGE, "dead: list [--count N] | requeue ID... | requeue --all");
    int all = !strcmp(argv[1], "--all"), requeued = 0;
    redisReply *rep = cmd(dg_cmd_of("XRANGE", k_dead, "-", "+", NULL));
    for (size_t i = 0; i < rep->elements; i++) {
        const char *entry = rep->element[i]->element[0]->str;
        const redisReply *f = rep->element[i]->element[1];
        const char *id = hstr(f, "id");
        int wanted = all;
        for (int a = 1; a < argc && !wanted; a++) wanted = !strcmp(argv[a], id);
        if (!wanted) continue;
        const redisReply *job = hfield(f, "job");
        char k_jobs[512], k_high[512], k_result[512], k_events[512], k_job[512];
        key(k_jobs, sizeof k_jobs, "jobs", NULL);
        key(k_high, sizeof k_high, "jobs:high", NULL);
        /* back to the stream it came from where that is the high one (it went to the normal
         * stream and lost its priority); any other value is not trusted as a key */
        if (!strcmp(hstr(f, "stream"), k_high)) snprintf(k_jobs, sizeof k_jobs, "%s", k_high);
        key(k_result, sizeof k_result, "result", id);
        key(k_events, sizeof k_events, "events", id);
        key(k_job, sizeof k_job, "job", id);
        /* the failed result goes, or the worker would acknowledge the job without running it;
         * its events and job hash too, or `watch` would read the old failure; all or nothing */
        freeReplyObject(cmd(dg_cmd_of("MULTI", NULL)));
        freeReplyObject(cmd(dg_cmd_of("DEL", k_result, k_events, k_job, NULL)));
        freeReplyObject(cmd(dg_cmd_of("HSET", k_job, "state", "queued", NULL)));
        freeReplyObject(cmd(dg_cmd_of("EXPIRE", k_job, "86400", NULL)));
        dg_cmd *x = dg_cmd_of("XADD", k_jobs, "*", "id", id, "job", NULL);
        dg_cmd_add(x, job ? job->str : "", job ? job->len : 0);
        freeReplyObject(cmd(x));
        freeReplyObject(cmd(dg_cmd_of("XDEL", k_dead, entry, NULL)));
        redisReply *ex = cmd(dg_cmd_of("EXEC", NULL));
        for (size_t k = 0; ex->type == REDIS_REPLY_ARRAY && k < ex->elements; k++)
            if (ex->element[k]->type == REDIS_REPLY_ERROR)
                die(EXIT_IO, "requeue of \"%s\": Redis refused a command of it: %s (the dead letter may be gone: "
                    "check XLEN %s)", id, ex->element[k]->str, k_jobs);
        if (ex->type != REDIS_REPLY_ARRAY) die(EXIT_IO, "requeue of \"%s\": the transaction did not run", id);
        freeReplyObject(ex);
        printf("requeued %s\n", id);
        requeued++;
    }
    freeReplyObject(rep);
    if (!requeued) {
        fprintf(stderr, "duogenctl: nothing to requeue\n");
        return EXIT_JOB;
    }
    return 0;
}

/* Consumers of the workers' group whose worker is gone: Redis keeps a consumer until
 * XGROUP DELCONSUMER, and every worker id that ever read (a replaced host, an autoscaled
 * one) stays in the group. One is removed when it holds no pending entry, has been idle
 * idle_ms and no live worker has its id (no heartbeat hash). The look and the removal are
 * one transaction under WATCH of that hash: a worker starting under the id writes it (its
 * id lease) before it reads a job, which aborts the removal. An entry pending with a
 * removed consumer would be dropped from the pending list (no reaper could take it over):
 * those are left for a worker's reaper. */
static void prune_stream(const char *k, const char *group, long long idle_ms, int dry, int *removed, int *kept) {
    redisReply *cs = cmd(dg_cmd_of("XINFO", "CONSUMERS", k, group, NULL));
    for (size_t i = 0; cs->type == REDIS_REPLY_ARRAY && i < cs->elements; i++) {
        const redisReply *c = cs->element[i];
        const char *name = hstr(c, "name");
        const long long idle = hint(c, "idle");
        char k_worker[512];
        key(k_worker, sizeof k_worker, "worker", name);
        if (hint(c, "pending") > 0 || idle < idle_ms) {
            ++*kept;
            continue;
        }
        freeReplyObject(cmd(dg_cmd_of("WATCH", k_worker, NULL)));
        redisReply *live = cmd(dg_cmd_of("EXISTS", k_worker, NULL));
        redisReply *pend = cmd(dg_cmd_of("XPENDING", k, group, "-", "+", "1", name, NULL));
        const int keep = live->integer > 0 || (pend->type == REDIS_REPLY_ARRAY && pend->elements > 0);
        freeReplyObject(live);
        freeReplyObject(pend);
        if (keep || dry) {
            freeReplyObject(cmd(dg_cmd_of("UNWATCH", NULL)));
            if (keep) {
                ++*kept;
                continue;
            }
            printf("would remove consumer %-28s group %s of %s (idle %lld s, no live worker, nothing pending)\n",
                   name, group, k, idle / 1000);
            ++*removed;
            continue;
        }
        freeReplyObject(cmd(dg_cmd_of("MULTI", NULL)));
        freeReplyObject(cmd(dg_cmd_of("XGROUP", "DELCONSUMER", k, group, name, NULL)));
        redisReply *ex = cmd(dg_cmd_of("EXEC", NULL));
        if (ex->type != REDIS_REPLY_ARRAY || ex->elements != 1) {   /* the worker came back meanwhile */
            printf("kept consumer %-28s group %s of %s: a worker under its id started as it was removed\n", name,
                   group, k);
            ++*kept;
        } else {
            const redisReply *r = ex->element[0];
            if (r->type == REDIS_REPLY_ERROR) die(EXIT_IO, "Redis refused XGROUP DELCONSUMER %s: %s", k, r->str);
            printf("removed consumer %-28s group %s of %s (idle %lld s, no live worker, nothing pending)\n", name,
                   group, k, idle / 1000);
            ++*removed;
        }
        freeReplyObject(ex);
    }
    freeReplyObject(cs);
}

static int cmd_prune(int argc, char **argv) {
    long long idle_s = 3600;
    int dry = 0;
    const char *group = "duogen";
    for (int a = 0; a < argc; a++) {
        if (!strcmp(argv[a], "--dry-run")) {
            dry = 1;
        } else if (!strcmp(argv[a], "--group") && a + 1 < argc) {
            group = argv[++a];
        } else if (!strcmp(argv[a], "--idle-s") && a + 1 < argc) {
            const char *v = argv[++a];
            char *end;
            errno = 0;
            idle_s = v[0] >= '0' && v[0] <= '9' ? strtoll(v, &end, 10) : -1;
            if (idle_s < 0 || *end || errno || idle_s > 100LL * 365 * 86400)
                die(EXIT_USAGE, "prune --idle-s %s: not a whole number of seconds (0 .. 100 years)", v);
        } else {
            die(EXIT_USAGE, "prune: unknown option \"%s\" (--group G, --idle-s S, --dry-run)", argv[a]);
        }
    }
    const char *names[2] = {"jobs", "jobs:high"};
    int removed = 0, kept = 0;
    for (int s = 0; s < 2; s++) {
        char k[512];
        key(k, sizeof k, names[s], NULL);
        redisReply *t = cmd(dg_cmd_of("TYPE", k, NULL));
        int has_group = t->type == REDIS_REPLY_STATUS && !strcmp(t->str, "stream");
        freeReplyObject(t);
        if (has_group) {
            redisReply *gs = cmd(dg_cmd_of("XINFO", "GROUPS", k, NULL));
            has_group = 0;
            for (size_t g = 0; gs->type == REDIS_REPLY_ARRAY && g < gs->elements; g++)
                has_group |= !strcmp(hstr(gs->element[g], "name"), group);
            freeReplyObject(gs);
        }
        if (has_group) prune_stream(k, group, idle_s * 1000, dry, &removed, &kept);
    }
    printf("%s %d consumer%s; kept %d (a live worker, pending entries, or idle under %lld s)\n",
           dry ? "would remove" : "removed", removed, removed == 1 ? "" : "s", kept, idle_s);
    return 0;
}

static int cmd_watch(int argc, char **argv) {
    if (argc != 1) return -1;
    /* asked once with cmd(): an unreachable Redis is exit 3, and an id nothing is known of
     * (a typo, or a job of a producer that XADDs without the job hash, still queued) is
     * said on stderr before the wait, not waited for in silence */
    char k_job[512], k_result[512], k_events[512];
    key(k_job, sizeof k_job, "job", argv[0]);
    key(k_result, sizeof k_result, "result", argv[0]);
    key(k_events, sizeof k_events, "events", argv[0]);
    /* one key a command: the shipped ACL grants the producer each kind of key in its own
     * selector, and Redis wants every key of a command within one */
    long long known = 0;
    const char *keys[3] = {k_job, k_result, k_events};
    for (int i = 0; i < 3 && !known; i++) {
        redisReply *rep = cmd(dg_cmd_of("EXISTS", keys[i], NULL));
        known = rep->type == REDIS_REPLY_INTEGER ? rep->integer : 0;
        freeReplyObject(rep);
    }
    if (!known)
        fprintf(stderr, "duogenctl: nothing is known of job \"%s\" yet (no %s, %s or %s): waiting for it "
                "(a job whose producer writes %s before its XADD, as duogenctl does, has one at once)\n",
                argv[0], k_job, k_result, k_events, k_job);
    return follow(argv[0], 0);
}

static int cmd_result(int argc, char **argv) {
    const char *out = NULL, *html = NULL;
    if (argc < 1) return -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--html") && i + 1 < argc) html = argv[++i];
        else return -1;
    }
    return write_result(argv[0], out, html, 1);
}

static int cmd_cancel(int argc, char **argv) {
    char k[512], k_job[512], k_result[512];
    if (argc != 1) return -1;
    key(k, sizeof k, "cancel", argv[0]);
    key(k_job, sizeof k_job, "job", argv[0]);
    key(k_result, sizeof k_result, "result", argv[0]);
    redisReply *st = cmd(dg_cmd_of("HGET", k_result, "status", NULL));
    if (st->type == REDIS_REPLY_STRING) {   /* ended: nothing to stop */
        fprintf(stderr, "duogenctl: job \"%s\" has ended already (%s): nothing to cancel\n", argv[0], st->str);
        freeReplyObject(st);
        return EXIT_JOB;
    }
    freeReplyObject(st);
    /* the key lives as long as the job's own keys (its result_ttl_s, in the job hash): it
     * outlived them by a day, one per cancelled job (found in a soak) */
    redisReply *known = cmd(dg_cmd_of("EXISTS", k_job, NULL));
    if (known->integer == 0)   /* a typo, or a producer that writes no job hash: the key stops it if it comes */
        fprintf(stderr, "duogenctl: no job \"%s\" is known (no job hash): the cancel key is set anyway and "
                "stops it if it is queued; it expires in 24 h\n", argv[0]);
    freeReplyObject(known);
    redisReply *life = cmd(dg_cmd_of("HGET", k_job, "ttl_s", NULL));   /* written once a worker took it */
    char ttl[24] = "86400";
    if (life->type == REDIS_REPLY_STRING && strtoll(life->str, NULL, 10) > 0)
        snprintf(ttl, sizeof ttl, "%lld", strtoll(life->str, NULL, 10));
    freeReplyObject(life);
    freeReplyObject(cmd(dg_cmd_of("SET", k, "1", "EX", ttl, NULL)));
    printf("cancel requested for %s\n", argv[0]);
    return 0;
}

static int cmd_top(int argc, char **argv) {
    double interval = 1;
    int once = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--interval") && i + 1 < argc) interval = atof(argv[++i]);
        else if (!strcmp(argv[i], "--once")) once = 1;
        else return -1;
    }
    if (!(interval >= 0.05 && interval <= 3600)) die(EXIT_USAGE, "top: --interval is seconds, 0.05 .. 3600");
    char where[300];   /* never the URL: it may hold a password */
    char at[290];
    dg_redis_where(&R, at, sizeof at);
    if (R.unix_path[0]) snprintf(where, sizeof where, "%s", at);
    else snprintf(where, sizeof where, "%s/%d", at, R.db);
    return dg_top_run(&R, prefix, where, (int)(interval * 1000), once);
}

/* The commands: main() dispatches through this table; --help and duogenctl(1) are written
 * from it. `run` gets the words after the command's name and returns an exit status, or -1
 * when they do not fit `args` (the usage, exit 2). */
static const struct command {
    const char *name, *args, *help;
    int (*run)(int argc, char **argv);
} commands[] = {
    {"enqueue", "[--job FILE] [--id ID] [--system TEXT] [--image FILE]... [--param KEY=VALUE]... [--high] "
     "[--wait] [--out DIR] TEXT...",
     "Put a job on the queue (duogen:jobs, or duogen:jobs:high with --high) and print its id (default "
     "job-<unix ms>-<4 hex digits>; an id whose job has ended is not sent again: its result stands, and "
     "the new job needs another id). The words TEXT are the user's message, the --image files (PNG or JPEG) "
     "come before it, --system is a system message. --job FILE reads a JSON job file: {\"id\", \"system\", "
     "\"text\", \"images\": [paths relative to the file], \"params\": {KEY: VALUE}}; options after it override "
     "it. --param sets one job parameter (PARAMETERS). --wait follows the job, printing its text as it comes "
     "with a progress bar while images are drawn (when stdout is not a terminal: the text of the attempt "
     "that ended, once it ends; a job retried after a worker died starts over), and exits with the job's "
     "status; a Redis that goes away meanwhile is waited for. --out DIR implies --wait and writes the "
     "answer there as result --out does.",
     cmd_enqueue},
    {"batch", "FILE [--wait] [--out DIR] [--window N] [--high]",
     "Enqueue every job of FILE, JSON Lines: one job a line in the form of enqueue's --job file (its images "
     "relative to FILE; blank lines skipped; FILE may be a pipe), the id <FILE's name without its last "
     "extension>-<line number> where a line has none. Every "
     "line is checked first (its id unique in the file, its images files that can be read): a FILE with a wrong line sends "
     "nothing and names the line. A job whose result exists is not sent again, nor one a worker holds: run "
     "the same FILE again to go on after an interruption. --wait waits for every job, printing a line as each "
     "ends (id, status, the error of a failed one), then the tally (on a terminal, a line on stderr says how "
     "many have ended); exit 0 when all are done, else 1. --out "
     "DIR implies --wait and writes each job's answer as DIR/<id>/ (as result --out). --window N implies "
     "--wait and keeps at most N jobs of FILE on their way at once (the rest wait their turn here, not in "
     "Redis's memory).", cmd_batch},
    {"watch", "ID", "Follow a job's events from its start until it ends, one line per event. An id nothing is "
     "known of yet (no job hash, result or events: a typo, or a job whose producer did not write the job hash "
     "and no worker took yet) is said on stderr, then waited for.", cmd_watch},
    {"result", "ID [--out DIR] [--html DIR]",
     "Print a job's status, error and text. --out DIR writes DIR/answer.md, the Markdown answer with each "
     "image link pointing at its file, and the images as DIR/image-N.png (an image that is gone keeps its "
     "link, and the exit status is 1; an image-N.png past the answer's count, an earlier answer's, is "
     "removed). --html DIR writes DIR/index.html, "
     "one self-contained page: the answer's Markdown rendered (raw HTML in it is dropped), each image in "
     "place as a data: URI, then the status, the timings of each phase and the usage (an image that is "
     "gone: exit status 1).",
     cmd_result},
    {"cancel", "ID", "Ask the worker to stop the job at its next step; it ends as cancelled. A job that has "
     "ended already is left as it is (exit 1).", cmd_cancel},
    {"stats", "", "Print each queue stream's length, its group's pending entries and lag, the live workers "
     "(state, counts, heartbeat age, job), and the dead-letter and done counts.", cmd_stats},
    {"top", "[--interval S] [--once]",
     "A live view of the fleet, redrawn every S seconds (default 1) until q or Ctrl-C: each queue stream's "
     "length with its group's pending entries and lag; the jobs finished in the last minute by status and "
     "the dead letters; each live worker with its state, heartbeat age and counts, and each job it runs with "
     "its phase, progress, tokens, images and denoising step. --once prints one view as plain lines; into a "
     "file or a pipe, the view is written so every S seconds, a blank line after each, until Ctrl-C.",
     cmd_top},
    {"dead", "[list [--count N] | requeue ID... | requeue --all]",
     "List the dead letters, newest first (20 unless --count), or put dead jobs back on duogen:jobs, "
     "deleting their failed result, events and job hash (which says queued again) so that they run again.",
     cmd_dead},
    {"prune", "[--group G] [--idle-s S] [--dry-run]",
     "Remove from the workers' consumer group of the job streams (G, default duogen, the workers' group "
     "setting) the consumers whose worker is gone: no live worker with the id, no pending entry, idle S "
     "seconds or more (default 3600). Redis keeps every consumer that ever read until it is removed, so "
     "replaced or autoscaled hosts' ids pile up in XINFO and in stats' count. --dry-run names them only.",
     cmd_prune},
};

static const struct global_option {
    const char *name, *arg, *help;
} global_options[] = {
    {"--redis", "URL", "redis://[user[:password]@]host:port/db (an IPv6 address in brackets; a password's '@', ':', "
     "'/', '%' written %40, %3A, %2F, %25), rediss://... (TLS) or unix:///path; default $DUOGEN_REDIS, "
     "else redis://127.0.0.1:6379/0"},
    {"--password-file", "FILE", "file whose first line is the Redis password"},
    {"--tls-ca-file", "FILE", "with rediss://: PEM CA certificates the server's certificate must chain to "
     "(default: $DUOGEN_TLS_CA_FILE, else the system's)"},
    {"--tls-cert-file", "FILE", "with rediss://: PEM client certificate, for a server that asks for one "
     "(default: $DUOGEN_TLS_CERT_FILE)"},
    {"--tls-key-file", "FILE", "with rediss://: PEM key of --tls-cert-file (default: $DUOGEN_TLS_KEY_FILE, else in "
     "that file)"},
    {"--tls-server-name", "NAME", "with rediss://: the name the server's certificate must carry (default: the "
     "URL's host)"},
    {"--prefix", "PREFIX", "the workers' key prefix (default duogen)"},
};

static int usage(FILE *out) {
    fprintf(out, "usage: duogenctl [OPTION]... COMMAND [ARG]...\n\noptions:\n");
    for (size_t i = 0; i < N_OF(global_options); i++) {
        char opt[64];
        snprintf(opt, sizeof opt, "%s %s", global_options[i].name, global_options[i].arg);
        fprintf(out, "  %-22s %s\n", opt, global_options[i].help);
    }
    fprintf(out, "\ncommands:\n");
    for (size_t i = 0; i < N_OF(commands); i++)
        fprintf(out, "  %s%s%s\n", commands[i].name, commands[i].args[0] ? " " : "", commands[i].args);
    fprintf(out, "\n--param keys (a key not given takes the package's default; a key given, 0 included, is used):\n");
    for (size_t i = 0; i < N_OF(params); i++) fprintf(out, "  %-20s %s\n", params[i].key, params[i].help);
    fprintf(out, "\nduogenctl(1) says more.\n");
    return out == stdout ? 0 : EXIT_USAGE;
}

/* One .TP entry: NAME in bold, then ARGS in the font `font` selects ("" roman, "\\fI" italic),
 * then HELP as the paragraph. */
static void man_entry(FILE *out, const char *name, const char *font, const char *args, const char *help) {
    fputs(".TP\n\\fB", out);
    dg_man_text(out, name);
    fprintf(out, "\\fR %s", font);
    dg_man_text(out, args);
    fputs(font[0] ? "\\fR\n" : "\n", out);
    dg_man_text(out, help);
    fputc('\n', out);
}

/* duogenctl(1) in roff, from the three tables. */
static int write_manual(FILE *out) {
    dg_man_head(out, "duogenctl", "1", "put jobs on duogen queues, follow them, read their results");
    fputs(".SH SYNOPSIS\n.B duogenctl\n[\\fIoption\\fR]... \\fIcommand\\fR [\\fIarg\\fR]...\n"
          ".SH DESCRIPTION\n.B duogenctl\nis the command-line producer and monitor of a duogen fleet: it "
          "speaks the protocol of\n.BR duogend (8)\nthrough Redis, as a producer in any language does "
          "(examples/producers/ in the sources).\n.SH OPTIONS\n", out);
    for (size_t i = 0; i < N_OF(global_options); i++)
        man_entry(out, global_options[i].name, "\\fI", global_options[i].arg, global_options[i].help);
    fputs(".SH COMMANDS\n\\fIcommand\\fR \\fB\\-\\-help\\fR prints that command's usage and entry below.\n", out);
    for (size_t i = 0; i < N_OF(commands); i++) man_entry(out, commands[i].name, "", commands[i].args, commands[i].help);
    fputs(".SH PARAMETERS\nThe keys of \\fBenqueue \\-\\-param\\fR \\fIkey\\fB=\\fIvalue\\fR and of a job "
          "file's \\fBparams\\fR. A key not given takes the model package's default; a key given is used "
          "as it is, 0 included. A value out of range fails the job with an error naming the field.\n", out);
    for (size_t i = 0; i < N_OF(params); i++) {
        fputs(".TP\n\\fB", out);
        dg_man_text(out, params[i].key);
        fputs("\\fR\n", out);
        dg_man_text(out, params[i].help);
        fputs(" (e.g. \\fB", out);
        dg_man_text(out, params[i].example);
        fputs("\\fR)\n", out);
    }
    fputs(".SH ENVIRONMENT\n.TP\n\\fBDUOGEN_REDIS\\fR\nThe Redis URL when \\fB\\-\\-redis\\fR is not given.\n"
          ".TP\n\\fBDUOGEN_TLS_CA_FILE\\fR, \\fBDUOGEN_TLS_CERT_FILE\\fR, \\fBDUOGEN_TLS_KEY_FILE\\fR\nThe files "
          "of \\fB\\-\\-tls\\-ca\\-file\\fR, \\fB\\-\\-tls\\-cert\\-file\\fR and \\fB\\-\\-tls\\-key\\-file\\fR when "
          "those are not given (with a \\fBrediss://\\fR URL).\n"
          ".SH EXIT STATUS\n.TP\n\\fB0\\fR\nSuccess; for \\fBresult\\fR and \\fB\\-\\-wait\\fR, the job is done.\n"
          ".TP\n\\fB1\\fR\nThe job failed, was cancelled or expired, or has no result yet.\n"
          ".TP\n\\fB2\\fR\nA usage error.\n.TP\n\\fB3\\fR\nRedis or a file could not be read or written.\n"
          ".SH EXAMPLES\n.EX\nduogenctl enqueue \\-\\-image photo.jpg \\-\\-param max_images=2 \\e\n"
          "    \\-\\-out out \"How do I make this soup?\"\n"
          "duogenctl batch render.jsonl \\-\\-out answers \\-\\-window 64\nduogenctl stats\n.EE\n"
          ".SH SEE ALSO\n.BR duogend (8),\n.BR duogend.conf (5),\n.BR redis\\-cli (1)\n", out);
    return fflush(out) ? EXIT_IO : 0;
}

/* An option or command not known: one line naming it, with the nearest known one where
 * there is one, not the whole usage (an option known but last, without its value, says so). */
static int unknown_word(const char *what, const char *word, int has_next) {
    const char *names[N_OF(global_options) > N_OF(commands) ? N_OF(global_options) : N_OF(commands)];
    size_t n = 0;
    const int option = !strcmp(what, "option");
    for (size_t k = 0; k < (option ? N_OF(global_options) : N_OF(commands)); k++)
        names[n++] = option ? global_options[k].name : commands[k].name;
    for (size_t k = 0; k < n && option && !has_next; k++)
        if (!strcmp(word, names[k])) {
            fprintf(stderr, "duogenctl: %s needs a value (%s %s)\n", word, word, global_options[k].arg);
            return EXIT_USAGE;
        }
    char tail[96];
    fprintf(stderr, "duogenctl: unknown %s \"%s\"%s; duogenctl --help lists them\n", what, word,
            dg_did_you_mean(dg_nearest_name(word, names, n), tail, sizeof tail));
    return EXIT_USAGE;
}

int main(int argc, char **argv) {
    dg_daemon_config cfg;
    dg_daemon_config_defaults(&cfg);
    const char *env_url = getenv("DUOGEN_REDIS");
    if (env_url) snprintf(cfg.redis_url, sizeof cfg.redis_url, "%s", env_url);
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--redis") && i + 1 < argc) snprintf(cfg.redis_url, sizeof cfg.redis_url, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--password-file") && i + 1 < argc)
            snprintf(cfg.password_file, sizeof cfg.password_file, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--tls-ca-file") && i + 1 < argc)
            snprintf(cfg.tls_ca_file, sizeof cfg.tls_ca_file, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--tls-cert-file") && i + 1 < argc)
            snprintf(cfg.tls_cert_file, sizeof cfg.tls_cert_file, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--tls-key-file") && i + 1 < argc)
            snprintf(cfg.tls_key_file, sizeof cfg.tls_key_file, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--tls-server-name") && i + 1 < argc)
            snprintf(cfg.tls_server_name, sizeof cfg.tls_server_name, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--prefix") && i + 1 < argc) prefix = argv[++i];
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return usage(stdout);
        else if (!strcmp(argv[i], "--man")) return write_manual(stdout);   /* hidden: the build's */
        else return unknown_word("option", argv[i], i + 1 < argc);
    }
    /* the TLS files the options did not name, from the environment, as the URL: an
     * operator's shell (or rollout.sh) sets them once; with a plain URL they are not used
     * (and not refused) */
    if (!strncmp(cfg.redis_url, "rediss://", 9)) {
        const struct { const char *env; char *to; size_t size; } tls_env[] = {
            {"DUOGEN_TLS_CA_FILE", cfg.tls_ca_file, sizeof cfg.tls_ca_file},
            {"DUOGEN_TLS_CERT_FILE", cfg.tls_cert_file, sizeof cfg.tls_cert_file},
            {"DUOGEN_TLS_KEY_FILE", cfg.tls_key_file, sizeof cfg.tls_key_file},
        };
        for (size_t k = 0; k < N_OF(tls_env); k++) {
            const char *v = getenv(tls_env[k].env);
            if (!tls_env[k].to[0] && v) snprintf(tls_env[k].to, tls_env[k].size, "%s", v);
        }
    }
    const struct command *c = NULL;
    for (size_t k = 0; i < argc && k < N_OF(commands); k++)
        if (!strcmp(argv[i], commands[k].name)) c = &commands[k];
    if (!c) return i < argc ? unknown_word("command", argv[i], 1) : usage(stderr);
    if (i + 1 < argc && (!strcmp(argv[i + 1], "--help") || !strcmp(argv[i + 1], "-h"))) {
        printf("usage: duogenctl [OPTION]... %s%s%s\n\n%s\n\nduogenctl --help lists the options and --param keys; "
               "duogenctl(1) says more.\n", c->name, c->args[0] ? " " : "", c->args, c->help);
        return 0;
    }
    char err[512];
    const struct { const char *opt, *path; } files[] = {
        {"--password-file", cfg.password_file}, {"--tls-ca-file", cfg.tls_ca_file},
        {"--tls-cert-file", cfg.tls_cert_file}, {"--tls-key-file", cfg.tls_key_file},
    };
    for (size_t k = 0; k < N_OF(files); k++)   /* a file: 3; a bad URL or a file not of its kind: 2 */
        if (files[k].path[0] && access(files[k].path, R_OK))
            die(EXIT_IO, "%s \"%s\": %s", files[k].opt, files[k].path, strerror(errno));
    signal(SIGPIPE, SIG_IGN);   /* out.h */
    if (dg_redis_init(&R, &cfg, "duogenctl", 10000, err, sizeof err)) die(EXIT_USAGE, "%s", err);
    int rc = c->run(argc - i - 1, argv + i + 1);
    dg_redis_close(&R);
    dg_ctl_flush();
    if (rc < 0) {
        fprintf(stderr, "usage: duogenctl [OPTION]... %s %s\n", c->name, c->args);
        rc = EXIT_USAGE;
    }
    return rc;
}
