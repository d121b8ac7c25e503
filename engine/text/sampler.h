/* sampler.h — next-token choice and stop strings.
 *
 * dg_sampler turns a logits row into a token, in the order transformers applies its
 * processors (docs/specs/qwen2_5_vl.md §7; generation/utils.py _get_logits_processor): logit
 * bias (SequenceBias), repetition penalty over every token seen so far (prompt included; its
 * sign rule reads the biased logit), then temperature, top-k, top-p, and a draw from a
 * seeded xoshiro256** generator: the same seed and logits give the same tokens on every
 * machine. temperature <= 0 is greedy (argmax after bias and penalty); so is a row whose top
 * logit is +inf or NaN, or, under plain sampling, that holds a NaN anywhere, or one that
 * 1 / temperature scales past the float range (1e-30): the argmax, the lowest id, with no
 * draw (the limit of T -> 0), on every path. Biases that ban every token are refused by
 * dg_sampler_new; a row whose every token is -inf all the same (the engine's own ban)
 * gives its argmax and marks the sampler starved (dg_sampler_starved): the caller ends the
 * sequence instead of writing a banned token.
 *
 *     dg_sampler *s;  dg_sampler_new(V, &(dg_sampler_params){.temperature = 0.7f,
 *                                    .top_p = 0.9f, .seed = 42}, &s, err, sizeof err);
 *     for (i...) dg_sampler_accept(s, prompt[i]);
 *     int32_t tok = dg_sampler_sample(s, logits);   // modifies logits; accepts tok itself
 *
 * dg_sampler_sample_device does the same from a row in backend memory: penalty and bias on
 * the backend (be->logits_adjust), the best ~100 tokens fetched with be->topk, temperature,
 * top-k, top-p and the draw on the host over those only; rows that these candidates do not
 * decide are downloaded and finished by the host path. On the CPU backends it picks exactly
 * the token dg_sampler_sample picks (tests/test_sampler.c checks it over many rows).
 *
 * dg_stop holds back the end of the generated text while it could still become one of
 * the stop strings, and reports a match; the text before the match is emitted, the stop
 * string itself is not (as the OpenAI API does; transformers' stop_strings keeps it). */
#ifndef DG_SAMPLER_H
#define DG_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "duogen.h"

typedef struct {
    float                temperature;         /* <= 0: greedy */
    int32_t              top_k;               /* <= 0: off */
    float                top_p;               /* <= 0 or >= 1: off */
    float                repetition_penalty;  /* <= 0 or 1: off */
    const dg_logit_bias *logit_bias;          /* copied */
    size_t               n_logit_bias;
    uint64_t             seed;
} dg_sampler_params;

typedef struct dg_sampler dg_sampler;

/* DG_EINVAL for a logit_bias token outside [0, vocab), DG_ENOMEM. */
int     dg_sampler_new(int vocab, const dg_sampler_params *p, dg_sampler **out, char *err,
                       size_t errlen);
void    dg_sampler_free(dg_sampler *s);   /* accepts NULL */
/* Marks a token as seen (for the repetition penalty): every prompt token, once. */
void    dg_sampler_accept(dg_sampler *s, int32_t token);
/* Chooses the next token from logits[vocab] (overwritten) and accepts it. No allocation. */
int32_t dg_sampler_sample(dg_sampler *s, float *logits);

/* 1 when the last token sampled came from a row whose every token was -inf (every id
 * banned by logit_bias and the engine's own bans): no token is allowed; the sequence ends. */
int     dg_sampler_starved(const dg_sampler *s);
/* The candidates the last top-k/top-p draw chose among (after top-p): for tests. */
int     dg_sampler_kept(const dg_sampler *s);
/* The token dg_sampler_sample(s, logits) would give after logits[ban] = -INFINITY (ban -1:
 * none), for the row `row` [vocab] in be's memory, which is modified (penalty, bias, ban);
 * accepts it. Greedy is one topk of 1; top-k (up to 2016) and top-p (nuclei up to 1024
 * tokens) use at most 1056 candidates; plain temperature sampling (no top-k, no top-p),
 * wider nuclei and ties at the candidates' edge download the row into `host` [vocab]
 * (scratch) and take the host path. The same token as the host path on the CPU backends
 * (for finite logits); on a GPU also for greedy and top-k, while top-p without top-k
 * normalises by the GPU's sum, which may move a cutoff that falls within ~1e-5 of the mass
 * of a token (kernels/cuda/sample.cu). A backend without the sampling pair (backend.h)
 * has the row downloaded into `host` and the host path choose. No allocation. */
int32_t dg_sampler_sample_device(dg_sampler *s, dg_backend *be, float *row, int32_t ban,
                                 float *host);

/* 1 when dg_sampler_sample_bounds can decide s's choices: greedy (temperature <= 0), or
 * top-k with k <= DG_SAMPLER_BOUNDS_TOPK (with or without top-p: over the top k, the
 * distribution needs no other token). Plain temperature sampling and top-p alone normalise
 * over the whole vocabulary, which bounds do not give exactly. */
#define DG_SAMPLER_BOUNDS_TOPK 256
int     dg_sampler_bounded(const dg_sampler *s);

/* The values of some tokens of the row being sampled: out[i] for ids[i], i < n (ids
 * ascending; n <= DG_SAMPLER_BOUNDS_MAX). */
typedef void (*dg_sampler_pick_fn)(void *user, const int32_t *ids, int n, float *out);
#define DG_SAMPLER_BOUNDS_MAX 1024

/* The token dg_sampler_sample_device would choose (ban as there) from a row that is not at
 * hand, given lo[j] <= row[j] <= hi[j] for every token j (HOST arrays [vocab]; the logit
 * screen's, backend.h matmul_bounds; overwritten: the adjustments are applied to them in
 * place) and pick() for the exact values of the tokens asked for. The penalty and the
 * biases are monotone in a logit, so they are applied to both bounds; every token whose
 * upper bound reaches the k-th best lower bound (k = 1 greedy, else top_k) is a candidate,
 * and their exact values (adjusted as the row would have been) decide: greedy the largest,
 * the lowest id on ties; top-k the k best weights, then top-p and the draw as the other
 * paths do them: the same token and the same draws, whatever the bounds' width, where the
 * k-th weight is shown above every weight left out (sampler.c). Accepts it. -1 (nothing
 * accepted, no draw made) when !dg_sampler_bounded(s), a bound is NaN, more than
 * DG_SAMPLER_BOUNDS_MAX tokens are candidates (a flat row, or all banned), or the k-th
 * weight is not shown: the caller then computes the row and calls
 * dg_sampler_sample_device. No allocation. */
int32_t dg_sampler_sample_bounds(dg_sampler *s, float *lo, float *hi, int32_t ban, dg_sampler_pick_fn pick,
                                 void *user);

typedef struct dg_stop dg_stop;
typedef void (*dg_stop_emit)(void *user, const char *text, size_t len);

int  dg_stop_new(const char *const *stop, size_t n_stop, dg_stop **out, char *err, size_t errlen);
void dg_stop_free(dg_stop *s);    /* accepts NULL */
/* Feeds generated text; passes what is certainly not part of a stop string to emit.
 * Returns 1 when a stop string was completed (the text before it has been emitted and
 * the sequence should end), else 0. */
int  dg_stop_feed(dg_stop *s, const char *text, size_t len, dg_stop_emit emit, void *user);
/* At the end of a sequence that did not stop: emits what was held back. */
void dg_stop_flush(dg_stop *s, dg_stop_emit emit, void *user);
/* After dg_stop_feed returned 1: how many bytes of that call's text the match took (the
 * bytes after them were neither emitted nor held). A caller that goes on after a match (the
 * scheduler's draw marker) feeds text + that offset again. */
size_t dg_stop_match_end(const dg_stop *s);

#endif
