/* One model shared by schedulers on several threads (duogen.h: "a model may be shared by
 * several schedulers"): two schedulers over one model, each stepped by its own thread at the
 * same time, run the same fixed-seed jobs — an answer that draws an image after reading
 * one, and a sampled text-only answer — and every text byte and PNG byte equals what one
 * scheduler alone gives for those jobs. Each scheduler runs on its own fork of the model's
 * backend (backend.h), so nothing but the weights is shared; a shared scratch, stream or
 * staging buffer would mix the threads' work and change the bits.
 *
 * Exact equality is the right bar on either backend: the same operations on the same
 * inputs in the same order give the same bits (the CPU's OpenMP splits are static for a
 * given thread count; the CUDA kernels and cuBLAS are deterministic for a given device),
 * whatever another thread runs beside them. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/device.h"
#include "common/harness.h"
#include "common/jobs.h"
#include "common/package.h"
#include "duogen.h"
#include "io/image.h"

static const char *pkg;   /* the tiny package of seed 11 with the Qwen2 vocabulary, made once */

static int setup(void) { return (pkg = test_package_once("tiny", 11, TEST_QWEN2_VOCAB)) != NULL; }

#define N_JOBS 2

/* The jobs every scheduler runs, in order. */
typedef struct {
    uint8_t      *png;
    size_t        png_len;
    dg_part       parts[2][2];
    dg_message    msg[2];
    dg_logit_bias bias;
    dg_request    req[N_JOBS];
} jobs;

static int jobs_init(jobs *j) {
    memset(j, 0, sizeof *j);
    if (!(j->png = test_png(40, 28, 1, &j->png_len))) return -1;
    j->parts[0][0] = (dg_part){.kind = DG_PART_IMAGE, .image = j->png, .image_len = j->png_len};
    j->parts[0][1] = (dg_part){.kind = DG_PART_TEXT, .text = "Draw what comes next.", .text_len = 21};
    j->parts[1][0] = (dg_part){.kind = DG_PART_TEXT, .text = "Tell a story.", .text_len = 13};
    j->msg[0] = (dg_message){DG_ROLE_USER, j->parts[0], 2};
    j->msg[1] = (dg_message){DG_ROLE_USER, j->parts[1], 1};
    /* <BOV> biased the way test_interleaved does, so that the random weights draw */
    j->bias = (dg_logit_bias){test_bov_id(pkg), 8.0f};
    j->req[0] = (dg_request){.id = "threads-draw", .messages = &j->msg[0], .n_messages = 1, .seed = 3,
                             .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 12, .logit_bias = &j->bias,
                                      .n_logit_bias = 1},
                             .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS |
                                              DG_IMAGE_GUIDANCE_SCALE | DG_IMAGE_MAX_IMAGES,
                                       .width = 32, .height = 32, .steps = 2, .guidance_scale = 3.0f,
                                       .max_images = 1}};
    j->req[1] = (dg_request){.id = "threads-text", .messages = &j->msg[1], .n_messages = 1, .seed = 9,
                             .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE | DG_TEXT_TOP_K,
                                      .max_new_tokens = 16, .temperature = 0.8f, .top_k = 40}};
    return 0;
}

/* One thread's work: a scheduler of its own over the shared model, every job in turn. */
typedef struct {
    dg_model          *m;
    const jobs        *j;
    pthread_barrier_t *start;    /* NULL: run at once */
    test_job           out[N_JOBS];
    int                rc;
    char               error[512];
} worker;

static void *work(void *arg) {
    worker *w = arg;
    dg_sched *s = NULL;
    w->rc = dg_sched_new(w->m, &(dg_sched_opts){.max_inflight = 1}, &s, w->error, sizeof w->error);
    if (w->start) pthread_barrier_wait(w->start);   /* both schedulers exist: step together */
    for (int i = 0; i < N_JOBS && w->rc == 0; i++) {
        dg_sink sink = test_job_sink(&w->out[i]);
        uint64_t seq;
        if ((w->rc = dg_sched_submit(s, &w->j->req[i], &sink, &seq, w->error, sizeof w->error)) < 0) break;
        while (w->rc == 0 && dg_sched_active(s) > 0) w->rc = dg_sched_step(s, w->error, sizeof w->error);
    }
    dg_sched_free(s);
    return NULL;
}

static void check_same(const worker *got, const worker *ref, const char *label) {
    for (int i = 0; i < N_JOBS; i++) {
        const test_job *a = &got->out[i], *r = &ref->out[i];
        if (a->error[0] || !a->finished) test_fail(__FILE__, __LINE__, "%s job %d: %s", label, i, a->error);
        if (a->len != r->len || memcmp(a->text, r->text, r->len))
            test_fail(__FILE__, __LINE__, "%s job %d: text \"%.*s\", alone \"%.*s\"", label, i, (int)a->len,
                      a->text, (int)r->len, r->text);
        CHECK_EQ_INT(a->n_png, r->n_png);
        for (int k = 0; k < a->n_png && k < r->n_png; k++)
            if (a->png_len[k] != r->png_len[k] || memcmp(a->png[k], r->png[k], r->png_len[k]))
                test_fail(__FILE__, __LINE__, "%s job %d: image %d differs from the one drawn alone", label, i, k + 1);
    }
}

/* The jobs on one scheduler alone, then on two at once (threads), on `device`. */
static void run_shared_model(const char *device) {
    char err[512];
    dg_model *m;
    jobs j;
    /* under ThreadSanitizer (tools/sanitize.sh tsan) each scheduler's operations run on its
     * own thread alone: libgomp is not instrumented, so the fork and join of its teams look
     * like races; what is checked is the two schedulers' threads over one model */
    const char *san = getenv("DG_SANITIZER");
    const int threads = san && !strcmp(san, "tsan") ? 1 : 2;
    if (dg_model_open(pkg, &(dg_model_opts){.device = device, .threads = threads}, &m, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "model on %s: %s", device, err);
        return;
    }
    if (jobs_init(&j) < 0) {
        test_fail(__FILE__, __LINE__, "test image");
        dg_model_close(m);
        return;
    }
    worker *ref = calloc(1, sizeof *ref), *w = calloc(2, sizeof *w);
    *ref = (worker){.m = m, .j = &j};
    work(ref);
    CHECK_EQ_INT(ref->rc, 0);
    if (ref->rc) printf("  alone: %s\n", ref->error);
    CHECK_EQ_INT(ref->out[0].n_png, 1);   /* the bias made it draw */
    CHECK(ref->out[1].len > 0);
    printf("  %s alone: %zu + %zu bytes of text, %d image(s)\n", device, ref->out[0].len, ref->out[1].len,
           ref->out[0].n_png);

    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, 2);
    pthread_t t[2];
    for (int k = 0; k < 2; k++) {
        w[k] = (worker){.m = m, .j = &j, .start = &start};
        CHECK(pthread_create(&t[k], NULL, work, &w[k]) == 0);
    }
    for (int k = 0; k < 2; k++) pthread_join(t[k], NULL);
    pthread_barrier_destroy(&start);
    for (int k = 0; k < 2; k++) {
        CHECK_EQ_INT(w[k].rc, 0);
        if (w[k].rc) printf("  thread %d: %s\n", k, w[k].error);
        check_same(&w[k], ref, k ? "thread 1" : "thread 0");
    }
    for (int i = 0; i < N_JOBS; i++) {
        test_job_free(&ref->out[i]);
        test_job_free(&w[0].out[i]);
        test_job_free(&w[1].out[i]);
    }
    free(ref);
    free(w);
    free(j.png);
    dg_model_close(m);
}

TEST(two_schedulers_on_two_threads_answer_as_one) {
    if (!setup()) { CHECK(!"setup"); return; }
    run_shared_model("cpu");
}

TEST(two_schedulers_on_two_threads_answer_as_one_on_cuda) {
    if (!test_cuda_present()) SKIP("%s", test_cuda_absent_reason());
    if (!setup()) { CHECK(!"setup"); return; }
    run_shared_model("cuda:0");
}

int main(void) { return test_main(); }
