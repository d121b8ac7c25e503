#include "job.h"
#include "outdir.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int dg_job_id_valid(const char *id, size_t len) {
    if (!id || len == 0 || len > DG_JOB_ID_MAX) return 0;
    for (size_t i = 0; i < len; i++) {
        char c = id[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == ':' || c == '-'))
            return 0;
    }
    return 1;
}

int dg_job_images_to_files(const Duogen__V1__Job *pb, const dg_daemon_config *cfg) {
    if (!pb || !cfg->output_root[0]) return 0;
    return pb->image_output == DUOGEN__V1__JOB__IMAGE_OUTPUT__FILES ||
           pb->image_output == DUOGEN__V1__JOB__IMAGE_OUTPUT__IMAGE_OUTPUT_DEFAULT;
}

/* The engine's rule (dg_utf8_valid_prefix, the same answer on every string), written here
 * because the daemon also links over the test engine (tests/engine_fake), which has no
 * tokenizer. */
long dg_utf8_invalid_at(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        size_t k;
        unsigned min;
        if (c < 0x80) { i++; continue; }
        else if ((c & 0xE0) == 0xC0) { k = 1; min = 0x80; c &= 0x1F; }
        else if ((c & 0xF0) == 0xE0) { k = 2; min = 0x800; c &= 0x0F; }
        else if ((c & 0xF8) == 0xF0) { k = 3; min = 0x10000; c &= 0x07; }
        else return (long)i;
        for (size_t t = 1; t <= k; t++) {
            if (i + t >= n || (p[i + t] & 0xC0) != 0x80) return (long)i;
            c = (c << 6) | (p[i + t] & 0x3F);
        }
        if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return (long)i;
        i += k + 1;
    }
    return -1;
}

void dg_utf8_scrub(char *s) {
    size_t n = strlen(s), at = 0;
    long bad;
    while (at < n && (bad = dg_utf8_invalid_at(s + at, n - at)) >= 0) {
        s[at + (size_t)bad] = '?';
        at += (size_t)bad + 1;
    }
}

const char *dg_clip(const char *s, char *out, size_t cap) {
    size_t n = strlen(s);
    if (n < cap) {
        memcpy(out, s, n + 1);
    } else {
        size_t k = cap > 4 ? cap - 4 : 0;
        while (k > 0 && ((unsigned char)s[k] & 0xC0) == 0x80) k--;   /* a character's first byte */
        memcpy(out, s, k);
        snprintf(out + k, cap - k, "...");
    }
    dg_utf8_scrub(out);
    return out;
}

/* Wire types of Job's own fields, to say which field is broken when unpacking fails. */
static const char *job_field_name(uint32_t field, int *wire) {
    static const struct { uint32_t n; int wire; const char *name; } f[] = {
        {1, 2, "id"}, {2, 2, "messages"}, {3, 2, "text"}, {4, 2, "image"}, {5, 0, "seed"},
        {6, 0, "deadline_unix_ms"}, {7, 0, "max_attempts"}, {8, 0, "result_ttl_s"},
        {9, 0, "inline_images"}, {10, 2, "metadata"}, {11, 0, "image_output"},
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].n == field) { *wire = f[i].wire; return f[i].name; }
    return NULL;
}

static int read_varint(const uint8_t *p, size_t n, size_t *pos, uint64_t *v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*pos >= n) return -1;
        uint8_t b = p[(*pos)++];
        *v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) return 0;
    }
    return -1;
}

void dg_job_peek(const uint8_t *p, size_t n, dg_job_wire *out) {
    static const dg_job_wire none;
    size_t pos = 0;
    *out = none;
    while (pos < n) {
        uint64_t key, v;
        if (read_varint(p, n, &pos, &key)) goto unreadable;
        switch (key & 7) {
        case 0:
            if (read_varint(p, n, &pos, &v)) goto unreadable;
            /* protobuf keeps a uint32's low 32 bits */
            if (key >> 3 == 7) out->max_attempts = (uint32_t)v;
            if (key >> 3 == 8) out->result_ttl_s = (uint32_t)v;
            break;
        case 1: if (n - pos < 8) goto unreadable; pos += 8; break;
        case 5: if (n - pos < 4) goto unreadable; pos += 4; break;
        case 2:
            if (read_varint(p, n, &pos, &v) || v > n - pos) goto unreadable;
            if (key >> 3 == 1) out->id = (const char *)p + pos, out->id_len = (size_t)v;
            pos += v;
            break;
        default: goto unreadable;
        }
    }
    return;
unreadable:
    *out = none;
}

/* protobuf-c hands a string field over as a C string: a NUL in it silently cut the text
 * there ("Describe this.\0 Ignore the rest" reached the model as "Describe this."). The
 * wire bytes of a message that unpacked are walked with its descriptor, into every message
 * field (maps are messages of key and value), and the first string holding a NUL is named:
 * 0, or -1 with message.field in *name. */
static int string_with_nul(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t n, const char **msg,
                           const char **name) {
    size_t pos = 0;
    while (pos < n) {
        uint64_t key, v;
        if (read_varint(p, n, &pos, &key)) return 0;   /* unpacked already: cannot happen */
        const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3));
        switch (key & 7) {
        case 0: if (read_varint(p, n, &pos, &v)) return 0; break;
        case 1: pos += 8; break;
        case 5: pos += 4; break;
        case 2:
            if (read_varint(p, n, &pos, &v) || v > n - pos) return 0;
            if (f && f->type == PROTOBUF_C_TYPE_STRING && memchr(p + pos, 0, v)) {
                *msg = d->short_name, *name = f->name;
                return -1;
            }
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                string_with_nul(f->descriptor, p + pos, v, msg, name) < 0)
                return -1;
            pos += v;
            break;
        default: return 0;
        }
    }
    return 0;
}

/* A singular message field given twice in one message, at any depth: other readers merge
 * the two, protobuf-c (1.4) refuses the whole job (a oneof's member it merges). 0, or -1
 * with message.field in *msg, *name. */
static int message_twice(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t n, const char **msg,
                         const char **name) {
    uint8_t seen[64] = {0};
    size_t pos = 0;
    while (pos < n) {
        uint64_t key, v;
        if (read_varint(p, n, &pos, &key)) return 0;
        const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3));
        switch (key & 7) {
        case 0: if (read_varint(p, n, &pos, &v)) return 0; break;
        case 1: if (n - pos < 8) return 0; pos += 8; break;
        case 5: if (n - pos < 4) return 0; pos += 4; break;
        case 2:
            if (read_varint(p, n, &pos, &v) || v > n - pos) return 0;
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) {
                const size_t i = (size_t)(f - d->fields);
                if (f->label != PROTOBUF_C_LABEL_REPEATED && !(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
                    i < sizeof seen && seen[i]++) {
                    *msg = d->short_name, *name = f->name;
                    return -1;
                }
                if (message_twice(f->descriptor, p + pos, v, msg, name) < 0) return -1;
            }
            pos += v;
            break;
        default: return 0;
        }
    }
    return 0;
}

/* Walks the top level of a Job that protobuf-c refused and describes the first problem. */
static void describe_malformed(const uint8_t *p, size_t n, char *err, size_t errlen) {
    size_t pos = 0;
    while (pos < n) {
        size_t at = pos;
        uint64_t key, v;
        if (read_varint(p, n, &pos, &key)) {
            snprintf(err, errlen, "job: not a duogen.v1.Job protobuf: truncated field key at byte %zu", at);
            return;
        }
        uint32_t field = (uint32_t)(key >> 3);
        int wire = (int)(key & 7), want = -1;
        const char *name = job_field_name(field, &want);
        if (field == 0) {
            snprintf(err, errlen, "job: not a duogen.v1.Job protobuf: field number 0 at byte %zu", at);
            return;
        }
        if (name && wire != want) {
            snprintf(err, errlen, "job: field %u (%s) has wire type %d, expected %d", field, name,
                     wire, want);
            return;
        }
        switch (wire) {
        case 0: if (read_varint(p, n, &pos, &v)) goto truncated; break;
        case 1: if (n - pos < 8) goto truncated; pos += 8; break;
        case 5: if (n - pos < 4) goto truncated; pos += 4; break;
        case 2:
            if (read_varint(p, n, &pos, &v) || v > n - pos) goto truncated;
            pos += v;
            break;
        default:
            snprintf(err, errlen, "job: not a duogen.v1.Job protobuf: wire type %d at byte %zu",
                     wire, at);
            return;
        truncated:
            snprintf(err, errlen, "job: field %u%s%s%s truncated at byte %zu of %zu", field,
                     name ? " (" : "", name ? name : "", name ? ")" : "", at, n);
            return;
        }
    }
    const char *in_msg, *field;
    if (message_twice(&duogen__v1__job__descriptor, p, n, &in_msg, &field) < 0) {
        snprintf(err, errlen, "job: %s.%s is given twice (appended messages); send it once: this worker's "
                 "protobuf reader does not merge a message field sent twice", in_msg, field);
        return;
    }
    snprintf(err, errlen, "job: not a valid duogen.v1.Job protobuf (%zu bytes; a nested message "
             "is malformed or a field has the wrong type)", n);
}

/* A parameter with presence (a one-field oneof `_<name>` in duogen.proto): present when its
 * case is not NOT_SET (0). */
#define HAS(msg, field) ((msg)->_##field##_case != 0)

#define FAIL(code, ...) do { snprintf(err, errlen, __VA_ARGS__); return (code); } while (0)

static int finite_in(float v, float lo, float hi) { return isfinite(v) && v >= lo && v <= hi; }

/* ImageParams: each limit and choice, naming the field. */
static dg_job_status validate_image(const Duogen__V1__ImageParams *ip, const dg_daemon_config *cfg, char *err,
                                    size_t errlen) {
    /* each side named alone (0 is "the model's default", not a size to show) */
    const uint32_t side[2] = {ip->width, ip->height};
    for (int i = 0; i < 2; i++)
        if (side[i] % 16 || side[i] > (uint32_t)cfg->max_image_side)
            FAIL(DG_JOB_BAD_REQUEST, "image.%s: %u must be a multiple of 16 up to %d (0: the model's default)",
                 i ? "height" : "width", side[i], cfg->max_image_side);
    if (ip->steps > (uint32_t)cfg->max_steps)
        FAIL(DG_JOB_BAD_REQUEST, "image.steps: %u, over the limit of %d", ip->steps, cfg->max_steps);
    if (HAS(ip, guidance_scale) && !finite_in(ip->guidance_scale, 0, 100))
        FAIL(DG_JOB_BAD_REQUEST, "image.guidance_scale: %g is not in 0..100 (0: no guidance)", ip->guidance_scale);
    if (HAS(ip, max_images) && ip->max_images > (uint32_t)cfg->max_output_images)
        FAIL(DG_JOB_BAD_REQUEST, "image.max_images: %u, over the limit of %d", ip->max_images, cfg->max_output_images);
    if (ip->schedule != DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__SCHEDULE_DEFAULT &&
        ip->schedule != DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__KARRAS &&
        ip->schedule != DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__SHIFTED)
        FAIL(DG_JOB_BAD_REQUEST, "image.schedule: %d is not SCHEDULE_DEFAULT, KARRAS or SHIFTED", (int)ip->schedule);
    if (HAS(ip, shift) && !finite_in(ip->shift, 0.001, 100))   /* engine/params.c says why */
        FAIL(DG_JOB_BAD_REQUEST, "image.shift: %g is not in [0.001, 100]", ip->shift);
    if (HAS(ip, shift) && ip->schedule == DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__KARRAS)
        FAIL(DG_JOB_BAD_REQUEST, "image.shift: the KARRAS schedule has no shift");
    return DG_JOB_OK;
}

static dg_job_status validate(const Duogen__V1__Job *pb, const dg_daemon_config *cfg, char *err, size_t errlen) {
    char quoted[72];
    if (!dg_job_id_valid(pb->id, strlen(pb->id)))
        FAIL(DG_JOB_BAD_REQUEST, pb->id[0] ? "id: \"%s\" is not 1..128 characters of A-Z a-z 0-9 . _ : -"
                                           : "id: missing%s", pb->id[0] ? dg_clip(pb->id, quoted, sizeof quoted) : "");
    if (pb->n_messages == 0) FAIL(DG_JOB_BAD_REQUEST, "messages: empty");
    if (pb->n_messages > (size_t)cfg->max_messages)
        FAIL(DG_JOB_BAD_REQUEST, "messages: %zu, over the limit of %d", pb->n_messages, cfg->max_messages);
    size_t text_bytes = 0;
    int images = 0;
    for (size_t m = 0; m < pb->n_messages; m++) {
        const Duogen__V1__Message *msg = pb->messages[m];
        if (msg->role == DUOGEN__V1__MESSAGE__ROLE__ROLE_UNSPECIFIED || msg->role > 3)
            FAIL(DG_JOB_BAD_REQUEST, "messages[%zu].role: must be SYSTEM, USER or ASSISTANT", m);
        if (msg->n_parts == 0) FAIL(DG_JOB_BAD_REQUEST, "messages[%zu].parts: empty", m);
        for (size_t p = 0; p < msg->n_parts; p++) {
            const Duogen__V1__Part *part = msg->parts[p];
            if (part->kind_case == DUOGEN__V1__PART__KIND_TEXT) {
                size_t n = strlen(part->text);
                long bad = dg_utf8_invalid_at(part->text, n);
                if (bad >= 0) FAIL(DG_JOB_BAD_REQUEST, "messages[%zu].parts[%zu].text: invalid UTF-8 at byte %ld", m, p, bad);
                text_bytes += n;
            } else if (part->kind_case == DUOGEN__V1__PART__KIND_IMAGE) {
                const Duogen__V1__Image *im = part->image;
                images++;
                if (im->source_case == DUOGEN__V1__IMAGE__SOURCE__NOT_SET)
                    FAIL(DG_JOB_BAD_REQUEST, "messages[%zu].parts[%zu].image: no data, redis_key or path", m, p);
                if (im->source_case == DUOGEN__V1__IMAGE__SOURCE_DATA) {
                    if (im->data.len == 0) FAIL(DG_JOB_BAD_IMAGE, "messages[%zu].parts[%zu].image: empty data", m, p);
                    if (im->data.len > cfg->max_image_bytes)
                        FAIL(DG_JOB_BAD_REQUEST, "messages[%zu].parts[%zu].image: %zu bytes, over max_image_bytes %zu",
                             m, p, im->data.len, cfg->max_image_bytes);
                }
                if (im->source_case == DUOGEN__V1__IMAGE__SOURCE_PATH && !cfg->image_root[0])
                    FAIL(DG_JOB_BAD_REQUEST, "messages[%zu].parts[%zu].image.path: this worker reads no files (image_root unset)", m, p);
            } else {
                FAIL(DG_JOB_BAD_REQUEST, "messages[%zu].parts[%zu]: neither text nor image", m, p);
            }
        }
    }
    if (text_bytes > cfg->max_text_bytes)
        FAIL(DG_JOB_BAD_REQUEST, "messages: %zu bytes of text, over max_text_bytes %zu", text_bytes, cfg->max_text_bytes);
    if (images > cfg->max_input_images)
        FAIL(DG_JOB_BAD_REQUEST, "messages: %d images, over max_input_images %d", images, cfg->max_input_images);

    const Duogen__V1__TextParams *t = pb->text;
    if (t) {
        if (t->max_new_tokens > (uint32_t)cfg->max_new_tokens)
            FAIL(DG_JOB_BAD_REQUEST, "text.max_new_tokens: %u, over the limit of %d", t->max_new_tokens, cfg->max_new_tokens);
        /* optional fields: checked when present (absent takes the package's default) */
        if (HAS(t, temperature) && !finite_in(t->temperature, 0, 100))
            FAIL(DG_JOB_BAD_REQUEST, "text.temperature: %g is not in 0..100 (0: greedy)", t->temperature);
        if (HAS(t, top_p) && !(finite_in(t->top_p, 0, 1) && t->top_p > 0))
            FAIL(DG_JOB_BAD_REQUEST, "text.top_p: %g is not in (0, 1] (1: off)", t->top_p);
        if (HAS(t, top_k) && t->top_k > 1000000)
            FAIL(DG_JOB_BAD_REQUEST, "text.top_k: %u is over 1000000 (0: off)", t->top_k);
        if (HAS(t, repetition_penalty) && !(finite_in(t->repetition_penalty, 0, 100) && t->repetition_penalty > 0))
            FAIL(DG_JOB_BAD_REQUEST, "text.repetition_penalty: %g is not in (0, 100] (1: off)", t->repetition_penalty);
        if (t->n_stop > (size_t)cfg->max_stop_strings)
            FAIL(DG_JOB_BAD_REQUEST, "text.stop: %zu strings, over the limit of %d", t->n_stop, cfg->max_stop_strings);
        for (size_t i = 0; i < t->n_stop; i++) {
            if (!t->stop[i][0] || strlen(t->stop[i]) > 256)
                FAIL(DG_JOB_BAD_REQUEST, "text.stop[%zu]: must be 1..256 bytes", i);
            /* a match held or cut part of a character: text events of broken UTF-8 */
            long bad = dg_utf8_invalid_at(t->stop[i], strlen(t->stop[i]));
            if (bad >= 0) FAIL(DG_JOB_BAD_REQUEST, "text.stop[%zu]: invalid UTF-8 at byte %ld", i, bad);
        }
        if (t->n_logit_bias > (size_t)cfg->max_logit_bias)
            FAIL(DG_JOB_BAD_REQUEST, "text.logit_bias: %zu entries, over the limit of %d", t->n_logit_bias, cfg->max_logit_bias);
        for (size_t i = 0; i < t->n_logit_bias; i++) {
            float b = t->logit_bias[i]->value;
            if (t->logit_bias[i]->key < 0)
                FAIL(DG_JOB_BAD_REQUEST, "text.logit_bias: token id %d is negative", t->logit_bias[i]->key);
            if (isnan(b) || b == INFINITY || (isfinite(b) && fabsf(b) > 1000))
                FAIL(DG_JOB_BAD_REQUEST, "text.logit_bias[%d]: %g must be within -1000..1000 or -inf",
                     t->logit_bias[i]->key, b);
            /* a map on the wire may repeat a key; the engine would add the entries up, past
             * the limit above */
            for (size_t k = 0; k < i; k++)
                if (t->logit_bias[k]->key == t->logit_bias[i]->key)
                    FAIL(DG_JOB_BAD_REQUEST, "text.logit_bias[%d]: given twice", t->logit_bias[i]->key);
        }
    }
    dg_job_status st = pb->image ? validate_image(pb->image, cfg, err, errlen) : DG_JOB_OK;
    if (st != DG_JOB_OK) return st;
    if (pb->image_output == DUOGEN__V1__JOB__IMAGE_OUTPUT__FILES && !cfg->output_root[0])
        FAIL(DG_JOB_BAD_REQUEST, "image_output: FILES, but this worker writes no files (output_root unset)");
    if ((int)pb->image_output < 0 || pb->image_output > DUOGEN__V1__JOB__IMAGE_OUTPUT__FILES)
        FAIL(DG_JOB_BAD_REQUEST, "image_output: %d is not IMAGE_OUTPUT_DEFAULT, REDIS or FILES", (int)pb->image_output);
    if (dg_job_images_to_files(pb, cfg) && !dg_outdir_id_ok(pb->id))
        FAIL(DG_JOB_BAD_REQUEST, "id: \"%s\" cannot name a directory under output_root", pb->id);
    if (pb->max_attempts > DG_JOB_MAX_ATTEMPTS)
        FAIL(DG_JOB_BAD_REQUEST, "max_attempts: %u, over %d", pb->max_attempts, DG_JOB_MAX_ATTEMPTS);
    if (pb->result_ttl_s > DG_JOB_MAX_TTL_S) FAIL(DG_JOB_BAD_REQUEST, "result_ttl_s: %u, over one year", pb->result_ttl_s);
    /* metadata becomes fields of the job hash, which every reader takes for text: bounded,
     * and UTF-8 (raw bytes broke a Python reader with decode_responses; a 2000-byte key was
     * cut to 1023 bytes in silence) */
    if (pb->n_metadata > DG_JOB_MAX_METADATA)
        FAIL(DG_JOB_BAD_REQUEST, "metadata: %zu entries, over the limit of %d", pb->n_metadata, DG_JOB_MAX_METADATA);
    for (size_t i = 0; i < pb->n_metadata; i++) {
        const char *k = pb->metadata[i]->key, *v = pb->metadata[i]->value;
        const size_t kn = strlen(k), vn = strlen(v);
        long bad = dg_utf8_invalid_at(k, kn);
        if (!kn || kn > DG_JOB_MAX_META_KEY_BYTES)
            FAIL(DG_JOB_BAD_REQUEST, "metadata: key \"%s\" is %zu bytes, not 1..%d", dg_clip(k, quoted, sizeof quoted),
                 kn, DG_JOB_MAX_META_KEY_BYTES);
        if (bad >= 0) FAIL(DG_JOB_BAD_REQUEST, "metadata: a key has invalid UTF-8 at byte %ld", bad);
        if (vn > DG_JOB_MAX_META_VAL_BYTES)
            FAIL(DG_JOB_BAD_REQUEST, "metadata[\"%s\"]: %zu bytes, over %d", dg_clip(k, quoted, sizeof quoted), vn,
                 DG_JOB_MAX_META_VAL_BYTES);
        if ((bad = dg_utf8_invalid_at(v, vn)) >= 0)
            FAIL(DG_JOB_BAD_REQUEST, "metadata[\"%s\"]: invalid UTF-8 at byte %ld", dg_clip(k, quoted, sizeof quoted), bad);
    }
    return DG_JOB_OK;
}

/* protobuf-c's allocations for one job, within a budget (dg_job_parse). malloc and free, so
 * that free_unpacked with the default allocator frees them. */
typedef struct {
    size_t left;
    int    over;
} unpack_budget;

static void *budget_alloc(void *data, size_t size) {
    unpack_budget *b = data;
    if (size > b->left) {
        b->over = 1;
        return NULL;
    }
    b->left -= size;
    return malloc(size);
}

static void budget_free(void *data, void *p) { free(p); }

dg_job_status dg_job_parse(dg_job *j, const uint8_t *data, size_t len, const dg_daemon_config *cfg,
                           char *err, size_t errlen) {
    memset(j, 0, sizeof *j);
    if (len > cfg->max_job_bytes)
        FAIL(DG_JOB_BAD_REQUEST, "job: %zu bytes, over max_job_bytes %zu", len, cfg->max_job_bytes);
    if (len == 0) FAIL(DG_JOB_BAD_REQUEST, "job: empty (0 bytes)");
    /* the unpacked job's memory is bounded by its size: a few bytes on the wire (an empty
     * part is 2) unpack into a struct of ~50, so millions of empty parts in a 60 MB job took
     * 2 GB; a real job unpacks into about its own size (its text and images) */
    unpack_budget b = {.left = 4 * len + ((size_t)4 << 20)};
    ProtobufCAllocator alloc = {budget_alloc, budget_free, &b};
    j->pb = duogen__v1__job__unpack(&alloc, len, data);
    if (!j->pb) {
        if (b.over) FAIL(DG_JOB_BAD_REQUEST, "job: %zu bytes that unpack into more than %zu (too many parts or messages)",
                         len, 4 * len + ((size_t)4 << 20));
        describe_malformed(data, len, err, errlen);
        return DG_JOB_BAD_REQUEST;
    }
    const char *in_msg, *field;
    if (string_with_nul(&duogen__v1__job__descriptor, data, len, &in_msg, &field) < 0)
        FAIL(DG_JOB_BAD_REQUEST, "job: a %s.%s string holds a NUL byte (strings are UTF-8 text without NUL)", in_msg,
             field);
    return validate(j->pb, cfg, err, errlen);
}

/* Whether directory `dir` holds no entry: an image_root whose file system is not mounted
 * is an empty mountpoint. */
static int dir_empty(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int empty = 1;
    for (struct dirent *e; empty && (e = readdir(d));) empty = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..");
    closedir(d);
    return empty;
}

/* A file the job names that cannot be opened: missing (the job's reference, UNAVAILABLE,
 * unless the whole root is empty: a mount gone, this worker's), not a file (a socket), or
 * unreadable by this worker now (permissions, I/O, memory: DG_JOB_WORKER). */
static dg_job_status open_failure(int e, const char *root) {
    if (e == ENOENT) return dir_empty(root) ? DG_JOB_WORKER : DG_JOB_UNAVAILABLE;
    return e == ENOTDIR || e == ELOOP || e == ENAMETOOLONG || e == ENXIO ? DG_JOB_UNAVAILABLE : DG_JOB_WORKER;
}

/* Reads a file below image_root: the path is resolved and must stay inside the root. */
static dg_job_status read_image_file(const char *root, const char *path, size_t limit, uint8_t **out,
                                     size_t *len, const char *what, char *err, size_t errlen) {
    char full[PATH_MAX], real[PATH_MAX], real_root[PATH_MAX], q[200];
    const char *shown = dg_clip(path, q, sizeof q);
    if (path[0] == '/') snprintf(full, sizeof full, "%s", path);
    else snprintf(full, sizeof full, "%s/%s", root, path);
    /* this worker's own folder missing (unmounted, removed): no job's fault */
    if (!realpath(root, real_root)) {
        const int e = errno;
        char qr[200];
        FAIL(DG_JOB_WORKER, "%s: this worker's image_root \"%s\": %s", what, dg_clip(root, qr, sizeof qr), strerror(e));
    }
    if (!realpath(full, real)) {
        const int e = errno;
        const dg_job_status st = open_failure(e, real_root);
        FAIL(st, "%s: \"%s\": %s%s", what, shown, strerror(e),
             st == DG_JOB_WORKER && e == ENOENT ? " (this worker's image_root is empty: not mounted?)" : "");
    }
    size_t rl = strlen(real_root);
    if (strncmp(real, real_root, rl) || (real[rl] != '/' && real[rl] != 0))
        FAIL(DG_JOB_BAD_REQUEST, "%s: \"%s\" is outside the image root", what, shown);
    /* non-blocking: a FIFO (or device) put there would block the worker in open() forever;
     * it is refused below as not a regular file */
    int fd = open(real, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        const int e = errno;
        FAIL(open_failure(e, real_root), "%s: \"%s\": %s", what, shown, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        close(fd);
        FAIL(DG_JOB_UNAVAILABLE, "%s: \"%s\" is not a regular file", what, shown);
    }
    if ((size_t)st.st_size > limit || st.st_size == 0) {
        close(fd);
        /* over max_image_bytes is over a limit (BAD_REQUEST, as inline data over it); empty, no image */
        FAIL(st.st_size ? DG_JOB_BAD_REQUEST : DG_JOB_BAD_IMAGE, "%s: \"%s\" is %lld bytes (allowed 1..%zu)", what,
             shown, (long long)st.st_size, limit);
    }
    uint8_t *buf = malloc((size_t)st.st_size);
    if (!buf) abort();
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
        if (n <= 0) {   /* an I/O error (or a file cut while read): this worker's, for now */
            const int e = n < 0 ? errno : 0;
            close(fd);
            free(buf);
            FAIL(DG_JOB_WORKER, "%s: \"%s\": %s", what, shown, e ? strerror(e) : "short read (the file shrank)");
        }
        got += (size_t)n;
    }
    close(fd);
    *out = buf;
    *len = got;
    return DG_JOB_OK;
}

static dg_job_status fetch_image(dg_job *j, const Duogen__V1__Image *im, dg_redis *r,
                                 const dg_daemon_config *cfg, const char *what, dg_part *part,
                                 char *err, size_t errlen) {
    uint8_t *buf = NULL;
    size_t len = 0;
    if (im->source_case == DUOGEN__V1__IMAGE__SOURCE_DATA) {
        part->image = im->data.data;
        part->image_len = im->data.len;
        return DG_JOB_OK;
    }
    if (im->source_case == DUOGEN__V1__IMAGE__SOURCE_PATH) {
        dg_job_status st = read_image_file(cfg->image_root, im->path, cfg->max_image_bytes, &buf,
                                           &len, what, err, errlen);
        if (st != DG_JOB_OK) return st;
    } else {
        char q[200];
        const char *key = dg_clip(im->redis_key, q, sizeof q);
        /* its size first: a key far over the limit is not read into memory to be refused */
        redisReply *rep = dg_redis_cmdv(r, "STRLEN", im->redis_key, NULL);
        if (!rep) FAIL(DG_JOB_RETRY, "%s: Redis unavailable while reading \"%s\"", what, key);
        if (rep->type == REDIS_REPLY_ERROR) {   /* NOPERM, WRONGTYPE: GET would say the same, after reading it all */
            /* NOPERM: this worker's ACL does not let it read the key (its configuration, not
             * the job's: another attempt, and in the end the error, say so) */
            const dg_job_status st = !strncmp(rep->str, "NOPERM", 6) ? DG_JOB_WORKER : DG_JOB_UNAVAILABLE;
            snprintf(err, errlen, "%s: key \"%s\": %s", what, key, rep->str);
            freeReplyObject(rep);
            return st;
        }
        const long long size = rep->type == REDIS_REPLY_INTEGER ? rep->integer : -1;
        freeReplyObject(rep);
        if (size > (long long)cfg->max_image_bytes)
            FAIL(DG_JOB_BAD_REQUEST, "%s: key \"%s\" holds %lld bytes (allowed 1..%zu)", what, key, size,
                 cfg->max_image_bytes);
        rep = dg_redis_cmdv(r, "GET", im->redis_key, NULL);
        if (!rep) FAIL(DG_JOB_RETRY, "%s: Redis unavailable while reading \"%s\"", what, key);
        dg_job_status st = DG_JOB_OK;
        if (rep->type == REDIS_REPLY_NIL)
            st = DG_JOB_UNAVAILABLE, snprintf(err, errlen, "%s: key \"%s\" does not exist", what, key);
        else if (rep->type != REDIS_REPLY_STRING)
            st = rep->type == REDIS_REPLY_ERROR && !strncmp(rep->str, "NOPERM", 6) ? DG_JOB_WORKER : DG_JOB_UNAVAILABLE,
            snprintf(err, errlen, "%s: key \"%s\": %s", what, key,
                     rep->type == REDIS_REPLY_ERROR ? rep->str : "not a string");
        else if (rep->len == 0 || rep->len > cfg->max_image_bytes)
            st = rep->len ? DG_JOB_BAD_REQUEST : DG_JOB_BAD_IMAGE,
            snprintf(err, errlen, "%s: key \"%s\" holds %zu bytes (allowed 1..%zu)", what, key, (size_t)rep->len,
                     cfg->max_image_bytes);
        if (st == DG_JOB_OK) {
            len = rep->len;
            buf = malloc(len);
            if (!buf) abort();
            memcpy(buf, rep->str, len);
        }
        freeReplyObject(rep);
        if (st != DG_JOB_OK) return st;
    }
    j->fetched[j->n_fetched++] = buf;
    part->image = buf;
    part->image_len = len;
    return DG_JOB_OK;
}

/* The protocol's presence becomes the engine's set bits: an optional field when present, a
 * plain one (0 = the package's default) when not 0. Values are in range (validate()). */
static void text_params(const Duogen__V1__TextParams *t, dg_text_params *out) {
    if (t->max_new_tokens) {
        out->set |= DG_TEXT_MAX_NEW_TOKENS;
        out->max_new_tokens = (int32_t)t->max_new_tokens;
    }
    if (HAS(t, temperature)) {
        out->set |= DG_TEXT_TEMPERATURE;
        out->temperature = t->temperature;
    }
    if (HAS(t, top_p)) {
        out->set |= DG_TEXT_TOP_P;
        out->top_p = t->top_p;
    }
    if (HAS(t, top_k)) {
        out->set |= DG_TEXT_TOP_K;
        out->top_k = (int32_t)t->top_k;
    }
    if (HAS(t, repetition_penalty)) {
        out->set |= DG_TEXT_REPETITION_PENALTY;
        out->repetition_penalty = t->repetition_penalty;
    }
}

static void image_params(const Duogen__V1__ImageParams *ip, dg_image_params *out) {
    if (ip->width) {
        out->set |= DG_IMAGE_WIDTH;
        out->width = (int32_t)ip->width;
    }
    if (ip->height) {
        out->set |= DG_IMAGE_HEIGHT;
        out->height = (int32_t)ip->height;
    }
    if (ip->steps) {
        out->set |= DG_IMAGE_STEPS;
        out->steps = (int32_t)ip->steps;
    }
    if (HAS(ip, guidance_scale)) {
        out->set |= DG_IMAGE_GUIDANCE_SCALE;
        out->guidance_scale = ip->guidance_scale;
    }
    if (HAS(ip, max_images)) {
        out->set |= DG_IMAGE_MAX_IMAGES;
        out->max_images = (int32_t)ip->max_images;
    }
    if (HAS(ip, shift)) {
        out->set |= DG_IMAGE_SHIFT;
        out->shift = ip->shift;
    }
    if (ip->schedule == DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__KARRAS) {
        out->set |= DG_IMAGE_SCHEDULE;
        out->schedule = DG_SCHEDULE_KARRAS;
    }
    if (ip->schedule == DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__SHIFTED) {
        out->set |= DG_IMAGE_SCHEDULE;
        out->schedule = DG_SCHEDULE_SHIFTED;
    }
}

dg_job_status dg_job_prepare(dg_job *j, dg_redis *r, const dg_daemon_config *cfg, char *err, size_t errlen) {
    const Duogen__V1__Job *pb = j->pb;
    size_t n_parts = 0;
    for (size_t m = 0; m < pb->n_messages; m++) n_parts += pb->messages[m]->n_parts;
    j->messages = calloc(pb->n_messages, sizeof *j->messages);
    j->parts = calloc(n_parts, sizeof *j->parts);
    j->fetched = calloc(n_parts, sizeof *j->fetched);
    if (!j->messages || !j->parts || !j->fetched) abort();

    dg_part *part = j->parts;
    int image_no = 0;
    for (size_t m = 0; m < pb->n_messages; m++) {
        const Duogen__V1__Message *msg = pb->messages[m];
        j->messages[m].role = msg->role == DUOGEN__V1__MESSAGE__ROLE__SYSTEM ? DG_ROLE_SYSTEM
                            : msg->role == DUOGEN__V1__MESSAGE__ROLE__USER   ? DG_ROLE_USER
                                                                             : DG_ROLE_ASSISTANT;
        j->messages[m].parts = part;
        j->messages[m].n_parts = msg->n_parts;
        for (size_t p = 0; p < msg->n_parts; p++, part++) {
            const Duogen__V1__Part *in = msg->parts[p];
            if (in->kind_case == DUOGEN__V1__PART__KIND_TEXT) {
                part->kind = DG_PART_TEXT;
                part->text = in->text;
                part->text_len = strlen(in->text);
            } else {
                char what[64];
                snprintf(what, sizeof what, "image %d (messages[%zu].parts[%zu])", ++image_no, m, p);
                part->kind = DG_PART_IMAGE;
                dg_job_status st = fetch_image(j, in->image, r, cfg, what, part, err, errlen);
                if (st != DG_JOB_OK) return st;
            }
        }
    }

    dg_request *q = &j->req;
    q->id = pb->id;
    q->messages = j->messages;
    q->n_messages = pb->n_messages;
    q->seed = pb->seed;
    q->deadline_unix_ms = pb->deadline_unix_ms;
    if (pb->text) {
        const Duogen__V1__TextParams *t = pb->text;
        text_params(t, &q->text);
        if (t->n_stop) {
            j->stop = calloc(t->n_stop, sizeof *j->stop);
            if (!j->stop) abort();
            for (size_t i = 0; i < t->n_stop; i++) j->stop[i] = t->stop[i];
            q->text.stop = j->stop;
            q->text.n_stop = t->n_stop;
        }
        if (t->n_logit_bias) {
            j->bias = calloc(t->n_logit_bias, sizeof *j->bias);
            if (!j->bias) abort();
            for (size_t i = 0; i < t->n_logit_bias; i++)
                j->bias[i] = (dg_logit_bias){t->logit_bias[i]->key, t->logit_bias[i]->value};
            q->text.logit_bias = j->bias;
            q->text.n_logit_bias = t->n_logit_bias;
        }
    }
    if (pb->image) image_params(pb->image, &q->image);
    if (pb->n_metadata) {
        j->meta = calloc(pb->n_metadata, sizeof *j->meta);
        if (!j->meta) abort();
        for (size_t i = 0; i < pb->n_metadata; i++)
            j->meta[i] = (dg_kv){pb->metadata[i]->key, pb->metadata[i]->value};
        q->metadata = j->meta;
        q->n_metadata = pb->n_metadata;
    }
    return DG_JOB_OK;
}

void dg_job_free(dg_job *j) {
    if (!j) return;
    if (j->pb) duogen__v1__job__free_unpacked(j->pb, NULL);
    for (int i = 0; i < j->n_fetched; i++) free(j->fetched[i]);
    free(j->fetched);
    free(j->messages);
    free(j->parts);
    free(j->stop);
    free(j->bias);
    free(j->meta);
    memset(j, 0, sizeof *j);
}
