/* The daemon's own parsers: configuration (file, options, sizes, consistency), Redis URLs,
 * and Job validation (each limit and each malformation names its field). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../daemon/daemon_config.h"
#include "../daemon/outdir.h"
#include "../daemon/job.h"
#include "../daemon/redis.h"
#include "common/harness.h"

static char err[1024];

TEST(config_defaults_are_consistent) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    CHECK_EQ_INT(dg_daemon_config_finish(&c, err, sizeof err), 0);
    CHECK_EQ_INT(c.renew_ms, c.claim_idle_ms / 3);
    CHECK(strchr(c.worker_id, ':') != NULL);
}

TEST(config_file_and_options) {
    char path[] = "/tmp/dg-config-XXXXXX";
    int fd = mkstemp(path);
    const char *text = "# a comment\n  redis_url = \"redis://10.0.0.1:6380/2\"\nmax_image_bytes = 2M # trailing\n"
                       "claim_idle_ms=9000\nworker_id = \"gpu#3\"   # a '#' in quotes is the value's\n\n";
    CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
    close(fd);
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    CHECK_EQ_INT(dg_daemon_config_load(&c, path, err, sizeof err), 0);
    CHECK_EQ_STR(c.redis_url, "redis://10.0.0.1:6380/2");
    CHECK_EQ_INT(c.max_image_bytes, 2u << 20);
    CHECK_EQ_INT(c.claim_idle_ms, 9000);
    CHECK_EQ_STR(c.worker_id, "gpu#3");
    CHECK_EQ_INT(dg_daemon_config_set(&c, "max-inflight", "4", err, sizeof err), 0);
    CHECK_EQ_INT(c.max_inflight, 4);
    CHECK_EQ_INT(dg_daemon_config_set(&c, "max_inflight", "0", err, sizeof err), 0);   /* 0: from the memory */
    CHECK_EQ_INT(dg_daemon_config_set(&c, "max_inflight", "257", err, sizeof err), -1);
    CHECK(strstr(err, "max_inflight") && strstr(err, "0..256"));
    CHECK_EQ_INT(dg_daemon_config_set(&c, "nonsense", "1", err, sizeof err), -1);
    CHECK(strstr(err, "unknown setting \"nonsense\"") && !strstr(err, "did you mean"));
    /* a mistyped name is answered with the nearest setting, as it was written */
    CHECK_EQ_INT(dg_daemon_config_set(&c, "max_inflights", "4", err, sizeof err), -1);
    CHECK(strstr(err, "unknown setting \"max_inflights\" (did you mean max_inflight?)"));
    CHECK_EQ_INT(dg_daemon_config_set(&c, "claim-idle-sm", "4", err, sizeof err), -1);
    CHECK(strstr(err, "(did you mean claim-idle-ms?)"));
    CHECK_EQ_INT(dg_daemon_config_set(&c, "--claim_idle-sm", "4", err, sizeof err), -1);
    CHECK(strstr(err, "unknown option \"--claim_idle-sm\" (did you mean --claim-idle-ms?)"));
    CHECK_EQ_INT(dg_daemon_config_set(&c, "--claim-idle-ms", "4000", err, sizeof err), 0);
    CHECK_EQ_INT(c.claim_idle_ms, 4000);
    CHECK_EQ_INT(dg_daemon_config_set(&c, "heartbeat", "4", err, sizeof err), -1);
    CHECK(strstr(err, "(did you mean heartbeat_ms?)"));
    CHECK_EQ_INT(dg_daemon_config_set(&c, "tls_ca", "x", err, sizeof err), -1);
    CHECK(strstr(err, "(did you mean tls_ca_file?)"));
    CHECK_EQ_INT(dg_daemon_config_set(&c, "max_job_bytes", "12Q", err, sizeof err), -1);
    unlink(path);

    char path2[] = "/tmp/dg-config-XXXXXX";
    fd = mkstemp(path2);
    CHECK(write(fd, "block_ms 10\n", 12) == 12);
    close(fd);
    CHECK_EQ_INT(dg_daemon_config_load(&c, path2, err, sizeof err), -1);
    CHECK(strstr(err, "line 1: expected key = value"));
    unlink(path2);
    CHECK_EQ_INT(dg_daemon_config_load(&c, "/nonexistent/duogend.conf", err, sizeof err), -1);
    CHECK(strstr(err, "/nonexistent/duogend.conf"));
}

static int load_text(dg_daemon_config *c, const char *text, size_t n) {
    char path[] = "/tmp/dg-config-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0 && write(fd, text, n) == (ssize_t)n);
    close(fd);
    int rc = dg_daemon_config_load(c, path, err, sizeof err);
    unlink(path);
    return rc;
}

/* Lines of any length are one line each; a file that cannot be read whole is refused, never
 * taken as the part of it that was read (a directory read as empty, a NUL's rest dropped). */
TEST(config_long_lines_and_unreadable_files) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    static char text[12000];
    size_t n = 0;
    n += (size_t)snprintf(text + n, sizeof text - n, "# ");
    memset(text + n, 'x', 5000);   /* a comment longer than any fixed line buffer */
    n += 5000;
    n += (size_t)snprintf(text + n, sizeof text - n, "\nclaim_idle_ms = 7000\n");
    CHECK_EQ_INT(load_text(&c, text, n), 0);
    CHECK_EQ_INT(c.claim_idle_ms, 7000);

    n = (size_t)snprintf(text, sizeof text, "\nmodel = ");
    memset(text + n, 'm', 3000);   /* a value longer than model's 511 bytes: refused by its limit */
    n += 3000;
    text[n++] = '\n';
    CHECK_EQ_INT(load_text(&c, text, n), -1);
    CHECK(strstr(err, "line 2: model: value longer than 511 bytes"));

    CHECK_EQ_INT(load_text(&c, "threads = 4\0garbage\n", 20), -1);
    CHECK(strstr(err, "line 1: a NUL byte"));

    char dir[] = "/tmp/dg-config-dir-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    CHECK_EQ_INT(dg_daemon_config_load(&c, dir, err, sizeof err), -1);
    CHECK(strstr(err, dir) && strstr(err, "Is a directory"));
    rmdir(dir);
}

TEST(config_refuses_inconsistent_values) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    c.claim_idle_ms = 1000;
    c.renew_ms = 1000;
    CHECK_EQ_INT(dg_daemon_config_finish(&c, err, sizeof err), -1);
    CHECK(strstr(err, "renew_ms"));
    dg_daemon_config_defaults(&c);
    c.jobs_retain_s = c.result_ttl_s;
    CHECK_EQ_INT(dg_daemon_config_finish(&c, err, sizeof err), -1);
    CHECK(strstr(err, "jobs_retain_s"));
}

static int url(const char *u, dg_redis *r) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    snprintf(c.redis_url, sizeof c.redis_url, "%s", u);
    return dg_redis_init(r, &c, "t", 1000, err, sizeof err);
}

TEST(redis_urls) {
    dg_redis r;
    CHECK_EQ_INT(url("redis://127.0.0.1:6390/3", &r), 0);
    CHECK_EQ_STR(r.host, "127.0.0.1");
    CHECK_EQ_INT(r.port, 6390);
    CHECK_EQ_INT(r.db, 3);
    CHECK_EQ_INT(url("redis://worker:s3cret@redis.example:7000", &r), 0);
    CHECK_EQ_STR(r.user, "worker");
    CHECK_EQ_STR(r.password, "s3cret");
    CHECK_EQ_INT(r.port, 7000);
    CHECK_EQ_INT(url("redis://queue", &r), 0);
    CHECK_EQ_INT(r.port, 6379);
    CHECK_EQ_INT(url("unix:///run/redis.sock?db=5", &r), 0);
    CHECK_EQ_STR(r.unix_path, "/run/redis.sock");
    CHECK_EQ_INT(r.db, 5);
    CHECK_EQ_INT(url("http://x", &r), -1);
    CHECK(strstr(err, "http://x"));
    CHECK_EQ_INT(url("redis://h:99999", &r), -1);
    CHECK_EQ_INT(url("redis://:1", &r), -1);
    CHECK_EQ_INT(r.tls, 0);
    /* rediss://: the same grammar, over TLS (the system's CAs: no file to read) */
    CHECK_EQ_INT(url("rediss://worker:pw@redis.example:6380/2", &r), 0);
    CHECK_EQ_INT(r.tls, 1);
    CHECK_EQ_STR(r.host, "redis.example");
    CHECK_EQ_STR(r.user, "worker");
    CHECK_EQ_STR(r.password, "pw");
    CHECK_EQ_INT(r.port, 6380);
    CHECK_EQ_INT(r.db, 2);
    CHECK_EQ_INT(url("rediss://queue", &r), 0);
    CHECK_EQ_INT(r.port, 6379);
    CHECK_EQ_INT(url("redisss://queue", &r), -1);
    CHECK_EQ_INT(url("rediss://", &r), -1);
}

static int password_file(const char *text, size_t n, dg_redis *r) {
    char path[] = "/tmp/dg-password-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0 && write(fd, text, n) == (ssize_t)n);
    close(fd);
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    snprintf(c.password_file, sizeof c.password_file, "%s", path);
    int rc = dg_redis_init(r, &c, "t", 1000, err, sizeof err);
    unlink(path);
    return rc;
}

/* password_file: its first line, whole. A file that holds none (empty, a blank first line, a
 * directory) or a longer one than the connection keeps is refused: a password cut short or
 * none at all would be refused by Redis as a wrong password, far from its cause. */
TEST(redis_password_file) {
    dg_redis r;
    CHECK_EQ_INT(password_file("s3cret\r\nsecond line\n", 20, &r), 0);
    CHECK_EQ_STR(r.password, "s3cret");
    CHECK_EQ_INT(password_file("no newline", 10, &r), 0);
    CHECK_EQ_STR(r.password, "no newline");
    CHECK_EQ_INT(password_file("", 0, &r), -1);
    CHECK(strstr(err, "password_file") && strstr(err, ": empty"));
    CHECK_EQ_INT(password_file("\nafter a blank line\n", 20, &r), -1);
    CHECK(strstr(err, ": empty"));
    static char long_pw[600];
    memset(long_pw, 'p', sizeof long_pw);
    CHECK_EQ_INT(password_file(long_pw, sizeof long_pw, &r), -1);
    CHECK(strstr(err, "a password longer than 511 bytes"));
    CHECK_EQ_INT(password_file(long_pw, 511, &r), 0);
    CHECK_EQ_INT(strlen(r.password), 511);

    char dir[] = "/tmp/dg-password-dir-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    snprintf(c.password_file, sizeof c.password_file, "%s", dir);
    CHECK_EQ_INT(dg_redis_init(&r, &c, "t", 1000, err, sizeof err), -1);
    CHECK(strstr(err, dir) && strstr(err, "Is a directory"));
    rmdir(dir);
}

static int tls_url(const char *u, const char *ca, const char *cert, const char *key, dg_redis *r) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    snprintf(c.redis_url, sizeof c.redis_url, "%s", u);
    snprintf(c.tls_ca_file, sizeof c.tls_ca_file, "%s", ca);
    snprintf(c.tls_cert_file, sizeof c.tls_cert_file, "%s", cert);
    snprintf(c.tls_key_file, sizeof c.tls_key_file, "%s", key);
    return dg_redis_init(r, &c, "t", 1000, err, sizeof err);
}

/* TLS settings are checked when the configuration is read, before anything connects: each
 * refusal names the setting and the file (the files' contents: tests/integration/test_tls.py) */
TEST(redis_tls_settings) {
    dg_redis r;
    CHECK_EQ_INT(tls_url("redis://h", "/etc/ssl/certs/ca-certificates.crt", "", "", &r), -1);
    CHECK(strstr(err, "tls_ca_file is set, but redis_url \"redis://h\" is not rediss://"));
    CHECK_EQ_INT(tls_url("unix:///run/r.sock", "", "", "k.pem", &r), -1);
    CHECK(strstr(err, "tls_key_file is set"));
    CHECK_EQ_INT(tls_url("rediss://h", "/nonexistent/ca.pem", "", "", &r), -1);
    CHECK(strstr(err, "tls_ca_file \"/nonexistent/ca.pem\": No such file or directory"));
    CHECK_EQ_INT(tls_url("rediss://h", "", "/nonexistent/c.pem", "", &r), -1);
    CHECK(strstr(err, "tls_cert_file \"/nonexistent/c.pem\": No such file or directory"));
    CHECK_EQ_INT(tls_url("rediss://h", "", "", "/nonexistent/k.pem", &r), -1);
    CHECK(strstr(err, "tls_key_file \"/nonexistent/k.pem\": No such file or directory"));
    /* a file that holds no PEM certificate: OpenSSL's reason */
    char junk[] = "/tmp/duogen-tls-XXXXXX";
    const int fd = mkstemp(junk);
    CHECK(fd >= 0);
    CHECK_EQ_INT((int)write(fd, "not a certificate\n", 18), 18);
    close(fd);
    CHECK_EQ_INT(tls_url("rediss://h", junk, "", "", &r), -1);
    CHECK(strstr(err, "tls_ca_file \"/tmp/duogen-tls-") && strstr(err, "no certificate or crl found"));
    CHECK_EQ_INT(tls_url("rediss://h", "", junk, "", &r), -1);
    CHECK(strstr(err, "tls_cert_file \"/tmp/duogen-tls-") && strstr(err, "no start line"));
    CHECK_EQ_INT(tls_url("rediss://h", "", "", junk, &r), -1);
    CHECK(strstr(err, "tls_key_file \"/tmp/duogen-tls-") && strstr(err, "is set without tls_cert_file"));
    unlink(junk);
}

/* ---- jobs ---------------------------------------------------------------------------- */

static uint8_t *pack(Duogen__V1__Job *j, size_t *n) {
    *n = duogen__v1__job__get_packed_size(j);
    uint8_t *b = malloc(*n + 1);
    duogen__v1__job__pack(j, b);
    return b;
}

/* A valid job: one user message with text; tweak() changes one thing. */
static dg_job_status check_job(void (*tweak)(Duogen__V1__Job *), const dg_daemon_config *cfg) {
    Duogen__V1__Job j = DUOGEN__V1__JOB__INIT;
    Duogen__V1__Message m = DUOGEN__V1__MESSAGE__INIT, *ms[1] = {&m};
    Duogen__V1__Part p = DUOGEN__V1__PART__INIT, *ps[1] = {&p};
    Duogen__V1__TextParams t = DUOGEN__V1__TEXT_PARAMS__INIT;
    Duogen__V1__ImageParams ip = DUOGEN__V1__IMAGE_PARAMS__INIT;
    j.id = "job-1";
    j.messages = ms;
    j.n_messages = 1;
    m.role = DUOGEN__V1__MESSAGE__ROLE__USER;
    m.parts = ps;
    m.n_parts = 1;
    p.kind_case = DUOGEN__V1__PART__KIND_TEXT;
    p.text = "hello";
    j.text = &t;
    j.image = &ip;
    if (tweak) tweak(&j);
    size_t n;
    uint8_t *b = pack(&j, &n);
    dg_job job;
    dg_job_status st = dg_job_parse(&job, b, n, cfg, err, sizeof err);
    dg_job_free(&job);
    free(b);
    return st;
}

static void no_id(Duogen__V1__Job *j) { j->id = ""; }
static void bad_id(Duogen__V1__Job *j) { j->id = "has space"; }
static void no_messages(Duogen__V1__Job *j) { j->n_messages = 0; }
static void no_role(Duogen__V1__Job *j) { j->messages[0]->role = 0; }
static void bad_utf8(Duogen__V1__Job *j) { j->messages[0]->parts[0]->text = "ok \xc3\x28 bad"; }
static void surrogate(Duogen__V1__Job *j) { j->messages[0]->parts[0]->text = "\xed\xa0\x80"; }
static void big_tokens(Duogen__V1__Job *j) { j->text->max_new_tokens = 1u << 30; }
static void nan_temp(Duogen__V1__Job *j) {
    j->text->_temperature_case = DUOGEN__V1__TEXT_PARAMS___TEMPERATURE_TEMPERATURE;
    j->text->temperature = NAN;
}
static void zero_top_p(Duogen__V1__Job *j) { j->text->_top_p_case = DUOGEN__V1__TEXT_PARAMS___TOP_P_TOP_P; }
static void zero_penalty(Duogen__V1__Job *j) {
    j->text->_repetition_penalty_case = DUOGEN__V1__TEXT_PARAMS___REPETITION_PENALTY_REPETITION_PENALTY;
}
static void many_images(Duogen__V1__Job *j) {
    j->image->_max_images_case = DUOGEN__V1__IMAGE_PARAMS___MAX_IMAGES_MAX_IMAGES;
    j->image->max_images = 1000;
}
static void zero_shift(Duogen__V1__Job *j) { j->image->_shift_case = DUOGEN__V1__IMAGE_PARAMS___SHIFT_SHIFT; }
static void broken_stop(Duogen__V1__Job *j) {   /* the second byte of "é" alone */
    static char *stops[] = {"ok", "caf\xc3"};
    j->text->n_stop = 2;
    j->text->stop = stops;
}
static void karras_shift(Duogen__V1__Job *j) {
    j->image->schedule = DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__KARRAS;
    j->image->_shift_case = DUOGEN__V1__IMAGE_PARAMS___SHIFT_SHIFT;
    j->image->shift = 3.0f;
}
static void unknown_schedule(Duogen__V1__Job *j) { j->image->schedule = 7; }
static void negative_guidance(Duogen__V1__Job *j) {
    j->image->_guidance_scale_case = DUOGEN__V1__IMAGE_PARAMS___GUIDANCE_SCALE_GUIDANCE_SCALE;
    j->image->guidance_scale = -1.0f;
}
/* every parameter that may be 0, present as 0: valid (greedy, no top-k, no guidance, no images) */
static void zeros(Duogen__V1__Job *j) {
    j->text->_temperature_case = DUOGEN__V1__TEXT_PARAMS___TEMPERATURE_TEMPERATURE;
    j->text->_top_k_case = DUOGEN__V1__TEXT_PARAMS___TOP_K_TOP_K;
    j->image->_guidance_scale_case = DUOGEN__V1__IMAGE_PARAMS___GUIDANCE_SCALE_GUIDANCE_SCALE;
    j->image->_max_images_case = DUOGEN__V1__IMAGE_PARAMS___MAX_IMAGES_MAX_IMAGES;
    j->image->schedule = DUOGEN__V1__IMAGE_PARAMS__SCHEDULE__KARRAS;
}
static void odd_width(Duogen__V1__Job *j) { j->image->width = 100; }
static void odd_height(Duogen__V1__Job *j) { j->image->height = 97; }
static void many_steps(Duogen__V1__Job *j) { j->image->steps = 100000; }
static void good_params(Duogen__V1__Job *j) {
    j->text->_temperature_case = DUOGEN__V1__TEXT_PARAMS___TEMPERATURE_TEMPERATURE;
    j->text->temperature = 0.7f;
    j->text->_top_p_case = DUOGEN__V1__TEXT_PARAMS___TOP_P_TOP_P;
    j->text->top_p = 0.9f;
    j->image->width = 512;
    j->image->height = 768;
    j->image->steps = 20;
}

/* metadata: n entries of key k, value v (the same entry repeated: the limits are per entry
 * and on the count) */
static Duogen__V1__Job__MetadataEntry meta_entry = DUOGEN__V1__JOB__METADATA_ENTRY__INIT;
static Duogen__V1__Job__MetadataEntry *meta_list[100];
static void with_meta(Duogen__V1__Job *j, int n, char *k, char *v) {
    meta_entry.key = k;
    meta_entry.value = v;
    for (int i = 0; i < n; i++) meta_list[i] = &meta_entry;
    j->metadata = meta_list;
    j->n_metadata = (size_t)n;
}
static char long_key[200], long_val[5000];
static void meta_ok(Duogen__V1__Job *j) { with_meta(j, 64, "trace", "caf\xc3\xa9 \xe2\x82\xac"); }
static void meta_many(Duogen__V1__Job *j) { with_meta(j, 65, "k", "v"); }
static void meta_bad_value(Duogen__V1__Job *j) { with_meta(j, 1, "who", "ok\xff"); }
static void meta_bad_key(Duogen__V1__Job *j) { with_meta(j, 1, "\xfe", "v"); }
static void meta_empty_key(Duogen__V1__Job *j) { with_meta(j, 1, "", "v"); }
static void meta_long_key(Duogen__V1__Job *j) {
    memset(long_key, 'K', 129);
    with_meta(j, 1, long_key, "v");
}
static void meta_long_value(Duogen__V1__Job *j) {
    memset(long_val, 'v', 4097);
    with_meta(j, 1, "big", long_val);
}

/* Metadata becomes fields of the job hash, read as text: at most 64 entries, keys of 1..128
 * bytes, values of 4096, all UTF-8 (raw bytes were echoed, and broke a reader decoding
 * UTF-8; a 2000-byte key was cut in silence). */
TEST(job_metadata_is_bounded_and_utf8) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    CHECK_EQ_INT(check_job(meta_ok, &c), DG_JOB_OK);
    CHECK_EQ_INT(check_job(meta_many, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "metadata: 65 entries, over the limit of 64"));
    CHECK_EQ_INT(check_job(meta_bad_value, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "metadata[\"who\"]: invalid UTF-8 at byte 2"));
    CHECK_EQ_INT(check_job(meta_bad_key, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "metadata: a key has invalid UTF-8 at byte 0"));
    CHECK_EQ_INT(check_job(meta_empty_key, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "metadata: key \"\" is 0 bytes, not 1..128"));
    CHECK_EQ_INT(check_job(meta_long_key, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "is 129 bytes, not 1..128"));
    CHECK_EQ_INT(check_job(meta_long_value, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "metadata[\"big\"]: 4097 bytes, over 4096"));
}

TEST(job_validation_names_the_field) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    CHECK_EQ_INT(check_job(NULL, &c), DG_JOB_OK);
    CHECK_EQ_INT(check_job(good_params, &c), DG_JOB_OK);
    CHECK_EQ_INT(check_job(no_id, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "id: missing"));
    CHECK_EQ_INT(check_job(bad_id, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "\"has space\""));
    CHECK_EQ_INT(check_job(no_messages, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "messages: empty"));
    CHECK_EQ_INT(check_job(no_role, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "messages[0].role"));
    CHECK_EQ_INT(check_job(bad_utf8, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "messages[0].parts[0].text: invalid UTF-8 at byte 3"));
    CHECK_EQ_INT(check_job(surrogate, &c), DG_JOB_BAD_REQUEST);
    CHECK_EQ_INT(check_job(big_tokens, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "text.max_new_tokens"));
    CHECK_EQ_INT(check_job(nan_temp, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "text.temperature"));
    CHECK_EQ_INT(check_job(odd_width, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "image.width: 100 must be a multiple of 16 up to "));   /* the height not given: not named */
    CHECK_EQ_INT(check_job(odd_height, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "image.height: 97 must be a multiple of 16 up to "));
    CHECK_EQ_INT(check_job(many_steps, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "image.steps"));
}

/* Parameters with presence: a present value is checked (0 where 0 means something is
 * valid), an absent one is not looked at. */
TEST(job_validation_of_present_parameters) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    CHECK_EQ_INT(check_job(zeros, &c), DG_JOB_OK);
    CHECK_EQ_INT(check_job(zero_top_p, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "text.top_p: 0 is not in (0, 1]"));
    CHECK_EQ_INT(check_job(zero_penalty, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "text.repetition_penalty: 0 is not in (0, 100]"));
    CHECK_EQ_INT(check_job(many_images, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "image.max_images: 1000, over the limit"));
    CHECK_EQ_INT(check_job(broken_stop, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "text.stop[1]: invalid UTF-8 at byte 3"));
    CHECK_EQ_INT(check_job(zero_shift, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "image.shift: 0 is not in [0.001, 100]"));
    CHECK_EQ_INT(check_job(karras_shift, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "image.shift: the KARRAS schedule has no shift"));
    CHECK_EQ_INT(check_job(unknown_schedule, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "image.schedule: 7"));
    CHECK_EQ_INT(check_job(negative_guidance, &c), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "image.guidance_scale: -1"));
}

/* The engine's set bits follow the protocol's presence: a present 0 is set, an absent field
 * and a plain field at 0 are not; a schedule other than SCHEDULE_DEFAULT is set. */
TEST(job_presence_becomes_set_bits) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    Duogen__V1__Job j = DUOGEN__V1__JOB__INIT;
    Duogen__V1__Message m = DUOGEN__V1__MESSAGE__INIT, *ms[1] = {&m};
    Duogen__V1__Part p = DUOGEN__V1__PART__INIT, *ps[1] = {&p};
    Duogen__V1__TextParams t = DUOGEN__V1__TEXT_PARAMS__INIT;
    Duogen__V1__ImageParams ip = DUOGEN__V1__IMAGE_PARAMS__INIT;
    j.id = "job-1";
    j.messages = ms;
    j.n_messages = 1;
    m.role = DUOGEN__V1__MESSAGE__ROLE__USER;
    m.parts = ps;
    m.n_parts = 1;
    p.kind_case = DUOGEN__V1__PART__KIND_TEXT;
    p.text = "hello";
    j.text = &t;
    j.image = &ip;
    zeros(&j);
    ip.steps = 7;
    size_t n;
    uint8_t *b = pack(&j, &n);
    dg_job job;
    CHECK_EQ_INT(dg_job_parse(&job, b, n, &c, err, sizeof err), DG_JOB_OK);
    CHECK_EQ_INT(dg_job_prepare(&job, NULL, &c, err, sizeof err), DG_JOB_OK);
    CHECK_EQ_INT(job.req.text.set, DG_TEXT_TEMPERATURE | DG_TEXT_TOP_K);
    CHECK(job.req.text.temperature == 0.0f && job.req.text.top_k == 0);
    CHECK_EQ_INT(job.req.image.set, DG_IMAGE_STEPS | DG_IMAGE_GUIDANCE_SCALE | DG_IMAGE_MAX_IMAGES | DG_IMAGE_SCHEDULE);
    CHECK_EQ_INT(job.req.image.steps, 7);
    CHECK_EQ_INT(job.req.image.max_images, 0);
    CHECK_EQ_INT(job.req.image.schedule, DG_SCHEDULE_KARRAS);
    dg_job_free(&job);
    free(b);
}

TEST(job_malformed_protobuf_is_described) {
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    dg_job job;
    /* field 2 (messages) sent as a varint */
    const uint8_t wrong_type[] = {0x0a, 0x01, 'x', 0x10, 0x05};
    CHECK_EQ_INT(dg_job_parse(&job, wrong_type, sizeof wrong_type, &c, err, sizeof err), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "field 2 (messages) has wire type 0, expected 2"));
    dg_job_free(&job);
    /* a length running past the end */
    const uint8_t truncated[] = {0x0a, 0x40, 'a', 'b'};
    CHECK_EQ_INT(dg_job_parse(&job, truncated, sizeof truncated, &c, err, sizeof err), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "field 1 (id) truncated"));
    dg_job_free(&job);
    CHECK_EQ_INT(dg_job_parse(&job, (const uint8_t *)"", 0, &c, err, sizeof err), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "empty"));
    dg_job_free(&job);
    c.max_job_bytes = 3;
    CHECK_EQ_INT(dg_job_parse(&job, wrong_type, sizeof wrong_type, &c, err, sizeof err), DG_JOB_BAD_REQUEST);
    CHECK(strstr(err, "over max_job_bytes 3"));
    dg_job_free(&job);
}

TEST(job_ids) {
    CHECK(dg_job_id_valid("a-b_c.d:1", 9));
    CHECK(!dg_job_id_valid("", 0));
    CHECK(!dg_job_id_valid("a/b", 3));
    char long_id[130];
    memset(long_id, 'x', sizeof long_id);
    CHECK(dg_job_id_valid(long_id, 128));
    CHECK(!dg_job_id_valid(long_id, 129));
}

TEST(job_limits_and_id_read_off_the_wire) {
    /* id "j", a message with max_attempts-like bytes inside it (field 7 of Message: not the
     * job's), seed 5, max_attempts 9, result_ttl_s 600, id "k7", max_attempts 4: the last
     * occurrence wins */
    const uint8_t job[] = {0x0a, 0x01, 'j', 0x12, 0x02, 0x38, 0x63, 0x28, 0x05, 0x38, 0x09,
                           0x40, 0xd8, 0x04, 0x0a, 0x02, 'k', '7', 0x38, 0x04};
    dg_job_wire wire;
    dg_job_peek(job, sizeof job, &wire);
    CHECK_EQ_INT(wire.max_attempts, 4);
    CHECK_EQ_INT(wire.result_ttl_s, 600);
    CHECK(wire.id_len == 2 && wire.id && !memcmp(wire.id, "k7", 2));
    dg_daemon_config c;
    dg_daemon_config_defaults(&c);
    dg_job j;
    (void)dg_job_parse(&j, job, sizeof job, &c, err, sizeof err);   /* refused (no message), but unpacked */
    CHECK(j.pb != NULL);                                             /* protobuf-c read the same value */
    if (j.pb) {
        CHECK_EQ_INT(j.pb->max_attempts, 4);
        CHECK_EQ_INT(j.pb->result_ttl_s, 600);
        CHECK_EQ_STR(j.pb->id, "k7");
    }
    dg_job_free(&j);
    dg_job_peek(job, 9, &wire);                                    /* before the limits */
    CHECK(wire.max_attempts == 0 && wire.result_ttl_s == 0 && wire.id_len == 1);
    dg_job_peek(job, 4, &wire);                                    /* cut inside the message: nothing */
    CHECK(wire.max_attempts == 0 && wire.id == NULL);
    const uint8_t bad_wire[] = {0x38, 0x02, 0x0f};                 /* wire type 7 */
    dg_job_peek(bad_wire, sizeof bad_wire, &wire);
    CHECK_EQ_INT(wire.max_attempts, 0);
    const uint8_t big[] = {0x38, 0x81, 0x80, 0x80, 0x80, 0x10};    /* 2^32 + 1: low 32 bits */
    dg_job_peek(big, sizeof big, &wire);
    CHECK_EQ_INT(wire.max_attempts, 1);
}

/* Every fsync of the program, by the path of its file: dg_outdir_write's durability is
 * checked by what it syncs (this definition takes the place of libc's for the daemon's
 * objects linked here). */
static char synced[8][4096];
static int n_synced;
int fsync(int fd) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    if (n_synced < 8) {
        ssize_t n = readlink(link, synced[n_synced], sizeof synced[0] - 1);
        synced[n_synced++][n > 0 ? n : 0] = 0;
    }
    return (int)syscall(SYS_fsync, fd);
}

static int was_synced(const char *path) {
    for (int i = 0; i < n_synced; i++) if (!strcmp(synced[i], path)) return 1;
    return 0;
}

TEST(outdir_syncs_file_its_directory_and_the_new_directory_entry) {
    char root[] = "/tmp/dg-outdir-XXXXXX", path[4200], real[4096], want[4200];
    CHECK(mkdtemp(root) != NULL);
    CHECK(realpath(root, real) != NULL);
    const uint8_t png[] = {0x89, 'P', 'N', 'G'};
    n_synced = 0;
    CHECK_EQ_INT(dg_outdir_write(root, "job1", 1, png, sizeof png, path, sizeof path, err, sizeof err), 0);
    snprintf(want, sizeof want, "%s/job1", real);
    CHECK(was_synced(want));                /* the rename of the file in <id>/ */
    CHECK(was_synced(real));                /* <id>/ itself, made now, in output_root */
    n_synced = 0;                           /* a second image: the directory exists already */
    CHECK_EQ_INT(dg_outdir_write(root, "job1", 2, png, sizeof png, path, sizeof path, err, sizeof err), 0);
    CHECK(!was_synced(real));
    n_synced = 0;                           /* a later attempt's first image: its maker may have died unsynced */
    CHECK_EQ_INT(dg_outdir_write(root, "job1", 1, png, sizeof png, path, sizeof path, err, sizeof err), 0);
    CHECK(was_synced(real));
    dg_outdir_prune(root, "job1", 0);
    snprintf(want, sizeof want, "%s/job1", root);
    CHECK_EQ_INT(rmdir(want), 0);
    CHECK_EQ_INT(rmdir(root), 0);
}

int main(void) { return test_main(); }
