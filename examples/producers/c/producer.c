/* A duogen producer in plain C: hiredis and protobuf-c (Debian: libhiredis-dev,
 * libprotobuf-c-dev, protobuf-c-compiler).
 *
 *   c-producer --redis URL --id ID --image FILE --out DIR [--prefix P] [--meta KEY=VALUE]... TEXT...
 *
 * Enqueues one job (the image, then the text, as the user's message), follows its events,
 * waits for its result and writes DIR/answer.md with DIR/image-N.png. duogen.pb-c.[ch] are
 * generated from proto/duogen.proto (`protoc-c --c_out=. duogen.proto`); `make` builds this
 * file into build/producers/c-producer. examples/producers/README.md says what every
 * producer of this folder prints and exits with.
 *
 * Build by hand:
 *   protoc-c --proto_path=proto --c_out=. proto/duogen.proto
 *   cc -I. -o c-producer producer.c duogen.pb-c.c $(pkg-config --cflags --libs hiredis libprotobuf-c) */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include "duogen.pb-c.h"

#define EXIT_JOB   1
#define EXIT_USAGE 2
#define EXIT_IO    3
#define TIMEOUT_S  120
#define MAX_META   32

typedef struct {
    const char *url, *prefix, *id, *image, *out;
    const char *meta[MAX_META];
    int         n_meta;
    char        text[8192];
} options;

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("producer: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static void parse_options(int argc, char **argv, options *o) {
    *o = (options){.url = "redis://127.0.0.1:6379/0", .prefix = "duogen"};
    size_t tl = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strncmp(a, "--", 2) && !v) die(EXIT_USAGE, "%s needs a value", a);
        if (!strcmp(a, "--redis")) o->url = argv[++i];
        else if (!strcmp(a, "--prefix")) o->prefix = argv[++i];
        else if (!strcmp(a, "--id")) o->id = argv[++i];
        else if (!strcmp(a, "--image")) o->image = argv[++i];
        else if (!strcmp(a, "--out")) o->out = argv[++i];
        else if (!strcmp(a, "--meta")) {
            if (o->n_meta == MAX_META || !strchr(v, '=')) die(EXIT_USAGE, "--meta \"%s\": KEY=VALUE, %d at most", v, MAX_META);
            o->meta[o->n_meta++] = argv[++i];
        } else if (!strncmp(a, "--", 2)) die(EXIT_USAGE, "unknown option \"%s\"", a);
        else tl += (size_t)snprintf(o->text + tl, sizeof o->text - tl, "%s%s", tl ? " " : "", a);
        if (tl >= sizeof o->text) die(EXIT_USAGE, "the text is longer than %zu bytes", sizeof o->text - 1);
    }
    if (!o->id || !o->image || !o->out || !tl)
        die(EXIT_USAGE, "usage: c-producer --redis URL --id ID --image FILE --out DIR [--prefix P] "
                        "[--meta KEY=VALUE]... TEXT...");
    /* the ids a worker accepts; another would be dead-lettered under an id of the worker's
     * own, and this producer would wait for a result that never comes */
    size_t n = strlen(o->id);
    int ok = n >= 1 && n <= 128;
    for (size_t i = 0; i < n && ok; i++) ok = isalnum((unsigned char)o->id[i]) || strchr("._:-", o->id[i]);
    if (!ok) die(EXIT_USAGE, "--id \"%s\" is not 1..128 characters of A-Z a-z 0-9 . _ : -", o->id);
}

/* s[0..n) with %XX decoded (a password holding '@', ':' or '/' is written %40, %3A, %2F in a URL) */
static void url_decode(char *out, size_t cap, const char *s, size_t n, const char *url) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++, o++) {
        int c = (unsigned char)s[i];
        unsigned v;
        if (c == '%' && (i + 2 >= n || !isxdigit((unsigned char)s[i + 1]) || !isxdigit((unsigned char)s[i + 2])))
            die(EXIT_USAGE, "--redis \"%s\": a '%%' not followed by two hex digits", url);
        if (c == '%' && sscanf(s + i + 1, "%2x", &v) == 1) c = (int)v, i += 2;
        if (o + 1 >= cap) die(EXIT_USAGE, "--redis: user or password too long");
        out[o] = (char)c;
    }
    out[o] = 0;
}

/* redis://[[user]:password@]host[:port][/db], an IPv6 host in brackets ([::1]): connected,
 * authenticated, the database selected. */
static redisContext *connect_url(const char *url) {
    char host[256] = "127.0.0.1", user[256] = "", pass[256] = "";
    int port = 6379, db = 0;
    if (strncmp(url, "redis://", 8)) die(EXIT_USAGE, "--redis \"%s\": expected redis://host:port/db", url);
    const char *p = url + 8, *end = p + strcspn(p, "/"), *at = NULL;
    for (const char *q = p; q < end; q++)
        if (*q == '@') at = q;   /* the user and password end at the last '@' before the host */
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        url_decode(user, sizeof user, p, (size_t)((colon ? colon : at) - p), url);
        if (colon) url_decode(pass, sizeof pass, colon + 1, (size_t)(at - colon - 1), url);
        p = at + 1;
    }
    const char *hend = *p == '[' ? memchr(p, ']', (size_t)(end - p)) : p + strcspn(p, ":/");
    if (!hend) die(EXIT_USAGE, "--redis \"%s\": '[' without ']'", url);
    if (hend > p + (*p == '[')) snprintf(host, sizeof host, "%.*s", (int)(hend - p - (*p == '[')), p + (*p == '['));
    p = hend + (*p == '[');
    if (*p == ':') port = (int)strtol(p + 1, (char **)&p, 10);
    if (*p == '/') db = atoi(p + 1);
    redisContext *r = redisConnectWithTimeout(host, port, (struct timeval){.tv_sec = 10});
    if (!r || r->err) die(EXIT_IO, "Redis %s:%d: %s", host, port, r ? r->errstr : "out of memory");
    struct timeval rw = {.tv_sec = 30};
    redisSetTimeout(r, rw);
    redisReply *rep = NULL;
    if (user[0] && pass[0]) rep = redisCommand(r, "AUTH %s %s", user, pass);
    else if (pass[0]) rep = redisCommand(r, "AUTH %s", pass);
    if (pass[0] && (!rep || rep->type == REDIS_REPLY_ERROR)) die(EXIT_IO, "Redis AUTH: %s", rep ? rep->str : r->errstr);
    freeReplyObject(rep);
    rep = redisCommand(r, "SELECT %d", db);
    if (!rep || rep->type == REDIS_REPLY_ERROR) die(EXIT_IO, "Redis SELECT %d: %s", db, rep ? rep->str : r->errstr);
    freeReplyObject(rep);
    return r;
}

/* A reply of a command that must not fail; the caller frees it. */
static redisReply *must(redisContext *r, redisReply *rep, const char *what) {
    if (!rep) die(EXIT_IO, "Redis %s: %s", what, r->errstr);
    if (rep->type == REDIS_REPLY_ERROR) die(EXIT_IO, "Redis %s: %s", what, rep->str);
    return rep;
}

static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(EXIT_IO, "\"%s\": %s", path, strerror(errno));
    uint8_t *buf = NULL;
    size_t cap = 0;
    *len = 0;
    for (size_t n = 1; n;) {
        if (*len == cap && !(buf = realloc(buf, cap = cap ? cap * 2 : 65536))) die(EXIT_IO, "out of memory");
        *len += n = fread(buf + *len, 1, cap - *len, f);
    }
    if (ferror(f)) die(EXIT_IO, "\"%s\": read failed", path);
    fclose(f);
    return buf;
}

/* The job, packed: one user message of the image and the text, and the metadata.
 * Returns malloc'd bytes; *len their count. */
static uint8_t *pack_job(const options *o, size_t *len) {
    Duogen__V1__Job job = DUOGEN__V1__JOB__INIT;
    Duogen__V1__Message msg = DUOGEN__V1__MESSAGE__INIT, *msgs[1] = {&msg};
    Duogen__V1__Part image_part = DUOGEN__V1__PART__INIT, text_part = DUOGEN__V1__PART__INIT;
    Duogen__V1__Part *parts[2] = {&image_part, &text_part};
    Duogen__V1__Image image = DUOGEN__V1__IMAGE__INIT;
    Duogen__V1__Job__MetadataEntry meta[MAX_META], *metas[MAX_META];
    char keys[MAX_META][256];

    image.source_case = DUOGEN__V1__IMAGE__SOURCE_DATA;
    image.data.data = read_file(o->image, &image.data.len);
    image_part.kind_case = DUOGEN__V1__PART__KIND_IMAGE;
    image_part.image = &image;
    text_part.kind_case = DUOGEN__V1__PART__KIND_TEXT;
    text_part.text = (char *)o->text;
    msg.role = DUOGEN__V1__MESSAGE__ROLE__USER;
    msg.n_parts = 2;
    msg.parts = parts;
    for (int i = 0; i < o->n_meta; i++) {
        const char *eq = strchr(o->meta[i], '=');
        duogen__v1__job__metadata_entry__init(&meta[i]);
        snprintf(keys[i], sizeof keys[i], "%.*s", (int)(eq - o->meta[i]), o->meta[i]);
        meta[i].key = keys[i];
        meta[i].value = (char *)eq + 1;
        metas[i] = &meta[i];
    }
    job.id = (char *)o->id;
    job.n_messages = 1;
    job.messages = msgs;
    job.n_metadata = (size_t)o->n_meta;
    job.metadata = metas;
    *len = duogen__v1__job__get_packed_size(&job);
    uint8_t *buf = malloc(*len ? *len : 1);
    if (!buf) die(EXIT_IO, "out of memory");
    duogen__v1__job__pack(&job, buf);
    free(image.data.data);
    return buf;
}

/* The name of an enum value, lower-cased ("DONE" -> "done"), or as the proto spells it. */
static const char *enum_name(const ProtobufCEnumDescriptor *d, int value, int lower, char *buf, size_t n) {
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(d, value);
    snprintf(buf, n, "%s", v ? v->name : "UNKNOWN");
    for (char *p = buf; lower && *p; p++) *p = (char)tolower((unsigned char)*p);
    return buf;
}

/* Prints one event's line (none for text deltas); returns 1 when it is the job's last. */
static int print_event(const Duogen__V1__Event *ev) {
    char name[64];
    switch (ev->payload_case) {
    case DUOGEN__V1__EVENT__PAYLOAD_STARTED:
        printf("started worker=%s attempt=%u\n", ev->started->worker_id, ev->started->attempt);
        return 0;
    case DUOGEN__V1__EVENT__PAYLOAD_IMAGE_STARTED:
        printf("image %u started %ux%u steps=%u\n", ev->image_started->index, ev->image_started->width,
               ev->image_started->height, ev->image_started->steps);
        return 0;
    case DUOGEN__V1__EVENT__PAYLOAD_STEP:
        printf("image %u step %u/%u\n", ev->step->index, ev->step->step, ev->step->steps);
        return 0;
    case DUOGEN__V1__EVENT__PAYLOAD_IMAGE_DONE:
        printf("image %u done %s\n", ev->image_done->index,   /* its key, or its file (output_root) */
               ev->image_done->key[0] ? ev->image_done->key : ev->image_done->path);
        return 0;
    case DUOGEN__V1__EVENT__PAYLOAD_DONE:
        printf("%s\n", enum_name(&duogen__v1__result__status__descriptor, ev->done->status, 1, name, sizeof name));
        return 1;
    case DUOGEN__V1__EVENT__PAYLOAD_FAILED: {
        const Duogen__V1__Error *e = ev->failed->error;
        printf("failed %s: %s\n", enum_name(&duogen__v1__error__code__descriptor, e ? e->code : 0, 0, name, sizeof name),
               e ? e->message : "");
        return 1;
    }
    case DUOGEN__V1__EVENT__PAYLOAD_CANCELLED:
        printf("cancelled\n");
        return 1;
    default:
        return 0;
    }
}

/* Reads the job's events from the first, printing them, until its final event. */
static void follow(redisContext *r, const char *events_key) {
    char last[64] = "0";
    time_t deadline = time(NULL) + TIMEOUT_S;
    while (time(NULL) < deadline) {
        redisReply *rep = must(r, redisCommand(r, "XREAD COUNT 100 BLOCK 1000 STREAMS %s %s", events_key, last), "XREAD");
        int final = 0;
        /* [[stream, [[entry id, [field, value, ...]], ...]]], or nil after the BLOCK */
        const redisReply *entries = rep->type == REDIS_REPLY_ARRAY ? rep->element[0]->element[1] : NULL;
        for (size_t i = 0; entries && i < entries->elements && !final; i++) {
            const redisReply *entry = entries->element[i], *fields = entry->element[1];
            snprintf(last, sizeof last, "%s", entry->element[0]->str);
            for (size_t f = 0; f + 1 < fields->elements; f += 2) {
                if (strcmp(fields->element[f]->str, "pb")) continue;
                const redisReply *v = fields->element[f + 1];
                Duogen__V1__Event *ev = duogen__v1__event__unpack(NULL, v->len, (const uint8_t *)v->str);
                if (!ev) die(EXIT_IO, "%s %s: not an Event", events_key, last);
                final = print_event(ev);
                duogen__v1__event__free_unpacked(ev, NULL);
            }
        }
        freeReplyObject(rep);
        fflush(stdout);
        if (final) return;
    }
    die(EXIT_IO, "no final event on %s within %d s", events_key, TIMEOUT_S);
}

/* answer.md: the text parts as they are, each image as a Markdown link to its file, between
 * blank lines (as the worker's result text has them); the images as image-N.png. */
static void write_answer(redisContext *r, const Duogen__V1__Result *res, const char *dir) {
    char path[4096];
    if (mkdir(dir, 0755) && errno != EEXIST) die(EXIT_IO, "\"%s\": %s", dir, strerror(errno));
    snprintf(path, sizeof path, "%s/answer.md", dir);
    FILE *md = fopen(path, "w");
    if (!md) die(EXIT_IO, "\"%s\": %s", path, strerror(errno));
    int n = 0;
    for (size_t i = 0; i < res->n_output; i++) {
        const Duogen__V1__Part *part = res->output[i];
        if (part->kind_case == DUOGEN__V1__PART__KIND_TEXT) {
            fputs(part->text, md);
            continue;
        }
        const Duogen__V1__Image *im = part->image;
        redisReply *rep = NULL;
        uint8_t *file = NULL;
        const void *data = im->data.data;   /* the job asked for inline_images */
        size_t len = im->data.len;
        if (im->source_case == DUOGEN__V1__IMAGE__SOURCE_PATH) {   /* written to a shared file system */
            data = file = read_file(im->path, &len);
        } else if (im->source_case != DUOGEN__V1__IMAGE__SOURCE_DATA) {
            rep = must(r, redisCommand(r, "GET %s", im->key), "GET");
            if (rep->type != REDIS_REPLY_STRING) die(EXIT_IO, "%s has expired", im->key);
            data = rep->str;
            len = rep->len;
        }
        snprintf(path, sizeof path, "%s/image-%d.png", dir, ++n);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(data, 1, len, f) != len || fclose(f)) die(EXIT_IO, "cannot write \"%s\"", path);
        freeReplyObject(rep);
        free(file);
        fprintf(md, "\n\n![image %d](image-%d.png)\n\n", n, n);
    }
    if (fclose(md)) die(EXIT_IO, "cannot write \"%s/answer.md\"", dir);
    printf("wrote %s/answer.md and %d image(s)\n", dir, n);
}

int main(int argc, char **argv) {
    options o;
    char key[1024];
    parse_options(argc, argv, &o);
    size_t len;
    uint8_t *job = pack_job(&o, &len);   /* before connecting: a missing image enqueues nothing */
    redisContext *r = connect_url(o.url);

    /* "queued" before the XADD: a worker's "running" comes after it */
    snprintf(key, sizeof key, "%s:job:%s", o.prefix, o.id);
    freeReplyObject(must(r, redisCommand(r, "HSETNX %s state queued", key), "HSETNX"));
    snprintf(key, sizeof key, "%s:jobs", o.prefix);
    freeReplyObject(must(r, redisCommand(r, "XADD %s * id %s job %b", key, o.id, job, len), "XADD"));
    free(job);
    printf("enqueued %s\n", o.id);
    fflush(stdout);

    snprintf(key, sizeof key, "%s:events:%s", o.prefix, o.id);
    follow(r, key);

    snprintf(key, sizeof key, "%s:result:%s", o.prefix, o.id);   /* written with the final event */
    redisReply *rep = must(r, redisCommand(r, "HGET %s pb", key), "HGET");
    if (rep->type != REDIS_REPLY_STRING) die(EXIT_IO, "no result for %s", o.id);
    Duogen__V1__Result *res = duogen__v1__result__unpack(NULL, rep->len, (const uint8_t *)rep->str);
    if (!res) die(EXIT_IO, "%s: not a Result", key);
    freeReplyObject(rep);
    write_answer(r, res, o.out);
    int rc = res->status == DUOGEN__V1__RESULT__STATUS__DONE ? 0 : EXIT_JOB;
    duogen__v1__result__free_unpacked(res, NULL);
    redisFree(r);
    return rc;
}
