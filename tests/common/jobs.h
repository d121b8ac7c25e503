/* Whole jobs through engine/duogen.h for tests: a sink that keeps everything a job emits
 * (text, the order of its events, its PNGs, usage), a request run to its end, small PNG
 * inputs. */
#ifndef DG_TEST_JOBS_H
#define DG_TEST_JOBS_H

#include <stddef.h>
#include <stdint.h>

#include "duogen.h"

#define TEST_JOB_MAX_EVENTS 512
#define TEST_JOB_MAX_PNGS   8

typedef struct {
    char     text[16384];                 /* the streamed text, NUL-terminated */
    size_t   len;
    char     events[TEST_JOB_MAX_EVENTS]; /* t text, s image started, p step, i image done,
                                             f finished, x failed; NUL-terminated */
    int      n_events;
    uint8_t *png[TEST_JOB_MAX_PNGS];      /* owned: the images' PNG bytes, in order */
    size_t   png_len[TEST_JOB_MAX_PNGS];
    int      png_w[TEST_JOB_MAX_PNGS], png_h[TEST_JOB_MAX_PNGS], n_png;
    int      finished;                    /* finished() or failed() was called */
    dg_finish_reason reason;
    dg_usage usage;
    char     error[512];                  /* failed()'s message, or a submit or step error */
} test_job;

/* A sink that fills c (zeroed by the caller). */
dg_sink  test_job_sink(test_job *c);
/* Submits r with test_job_sink(c) and steps s until no sequence is active. 0, the submit's
 * DG_E* code, or -100 after a fatal step error; the message is in c->error. */
int      test_job_run(dg_sched *s, const dg_request *r, test_job *c);
/* The same with another sink (one that wraps test_job_sink(c)'s callbacks). */
int      test_job_run_sink(dg_sched *s, const dg_request *r, test_job *c, const dg_sink *sink);
/* 1 when a and b streamed the same text bytes and the same PNG bytes. */
int      test_job_same(const test_job *a, const test_job *b);
void     test_job_free(test_job *c);      /* the PNGs; accepts a zeroed one */

/* A w x h gradient keyed by k as a PNG (malloc'd, *len bytes), or NULL. */
uint8_t *test_png(int w, int h, int k, size_t *len);

#endif
