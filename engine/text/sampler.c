/* sampler.c — repetition penalty, logit bias, temperature, top-k, top-p, seeded draws; stop strings. */
#include "text/sampler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct dg_sampler {
    int            vocab;
    float          temperature, top_p, repetition_penalty;
    int            top_k;
    dg_logit_bias *bias;       /* owned: [n_bias] */
    size_t         n_bias;
    uint64_t       rng[4];     /* xoshiro256** state */
    uint8_t       *seen;       /* owned: [vocab] 1 = token occurred */
    int32_t       *seen_list;  /* owned: [vocab] the seen ids, n_seen of them */
    int            n_seen;
    int32_t       *cand;       /* owned: [vocab] candidate ids, best first */
    float         *prob;       /* owned: [vocab] exp(logit / T - max) per token */
    float         *weight;     /* owned: [vocab] prob of cand[i] */
    int            starved;    /* the last sample's row had every token at -inf (banned) */
    int            kept;       /* the last top-k/top-p draw's candidates after top-p */
};

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro(uint64_t *s) {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t; s[3] = rotl(s[3], 45);
    return r;
}

/* Uniform in [0, 1) with 24 random bits: exact in float, the same everywhere. */
static float uniform(dg_sampler *s) { return (float)(xoshiro(s->rng) >> 40) * (1.0f / 16777216.0f); }

int dg_sampler_new(int vocab, const dg_sampler_params *p, dg_sampler **out, char *err, size_t errlen) {
    dg_sampler *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s) goto nomem;
    s->vocab = vocab;
    s->temperature = p->temperature;
    s->top_k = p->top_k > 0 && p->top_k < vocab ? p->top_k : 0;
    s->top_p = p->top_p > 0.0f && p->top_p < 1.0f ? p->top_p : 1.0f;
    s->repetition_penalty = p->repetition_penalty > 0.0f ? p->repetition_penalty : 1.0f;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    s->seen = calloc((size_t)vocab, 1);
    s->seen_list = malloc(sizeof(int32_t) * (size_t)vocab);
    s->cand = malloc(sizeof(int32_t) * (size_t)vocab);
    s->prob = malloc(sizeof(float) * (size_t)vocab);
    s->weight = malloc(sizeof(float) * (size_t)vocab);
    s->bias = malloc(sizeof(dg_logit_bias) * (p->n_logit_bias + 1));
    if (!s->seen || !s->seen_list || !s->cand || !s->prob || !s->weight || !s->bias)
        goto nomem;
    for (size_t i = 0; i < p->n_logit_bias; i++) {
        if (p->logit_bias[i].token < 0 || p->logit_bias[i].token >= vocab) {
            snprintf(err, errlen, "text.logit_bias: token %d is outside the vocabulary (ids 0 .. %d)",
                     p->logit_bias[i].token, vocab - 1);
            dg_sampler_free(s);
            return DG_EINVAL;
        }
        s->bias[i] = p->logit_bias[i];
    }
    s->n_bias = p->n_logit_bias;
    /* biases that ban every token leave nothing to write: refused now, before a prefill
     * (s->seen, still zero, counts the distinct banned ids) */
    int banned = 0;
    for (size_t i = 0; i < s->n_bias; i++)
        if (s->bias[i].bias == -INFINITY && !s->seen[s->bias[i].token]) {
            s->seen[s->bias[i].token] = 1;
            banned++;
        }
    memset(s->seen, 0, (size_t)vocab);
    if (banned == vocab) {
        snprintf(err, errlen, "text.logit_bias: every token of the vocabulary (%d) is banned (-inf): nothing could "
                 "be written", vocab);
        dg_sampler_free(s);
        return DG_EINVAL;
    }
    *out = s;
    return 0;
nomem:
    dg_sampler_free(s);
    snprintf(err, errlen, "sampler: out of memory");
    return DG_ENOMEM;
}

void dg_sampler_free(dg_sampler *s) {
    if (!s) return;
    free(s->seen);
    free(s->seen_list);
    free(s->cand);
    free(s->prob);
    free(s->weight);
    free(s->bias);
    free(s);
}

void dg_sampler_accept(dg_sampler *s, int32_t token) {
    if (token < 0 || token >= s->vocab || s->seen[token]) return;
    s->seen[token] = 1;
    s->seen_list[s->n_seen++] = token;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

/* Token a ranks below token b in weights l: a lower weight, or the same and a higher id.
 * A total order, so "the k best" is one set: ties at the edge keep the lower ids, as
 * by_logit_desc orders them and as the backends' topk selects. */
static int worse(const float *l, int32_t a, int32_t b) {
    return l[a] < l[b] || (l[a] == l[b] && a > b);
}

/* Min-heap of the k best candidates so far, the worst at h[0]. */
static void heap_down(int32_t *h, int n, int i, const float *l) {
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) return;
        if (c + 1 < n && worse(l, h[c + 1], h[c])) c++;
        if (!worse(l, h[c], h[i])) return;
        int32_t t = h[i]; h[i] = h[c]; h[c] = t;
        i = c;
    }
}

static int by_logit_desc(const void *a, const void *b, void *logits) {
    const float *l = logits;
    float x = l[*(const int32_t *)a], y = l[*(const int32_t *)b];
    if (x != y) return x < y ? 1 : -1;
    return *(const int32_t *)a - *(const int32_t *)b;   /* ties: lower id first, deterministic */
}

/* The k best tokens into s->cand, in descending logit order: O(V log k). A later id never
 * displaces an equal weight (it ranks below it). */
static void top(dg_sampler *s, const float *l, int k) {
    int n = 0;
    for (int i = 0; i < s->vocab; i++) {
        if (n < k) {
            s->cand[n++] = i;
            if (n == k)
                for (int j = n / 2 - 1; j >= 0; j--) heap_down(s->cand, n, j, l);
        } else if (l[i] > l[s->cand[0]]) {
            s->cand[0] = i;
            heap_down(s->cand, n, 0, l);
        }
    }
    qsort_r(s->cand, (size_t)k, sizeof *s->cand, by_logit_desc, (void *)l);
}

/* A draw from weights w[0..n) (unnormalised, summing to `total`). */
static int draw(dg_sampler *s, const float *w, int n, float total) {
    float u = uniform(s) * total, acc = 0.0f;
    for (int i = 0; i < n; i++) {
        acc += w[i];
        if (u < acc) return i;
    }
    return n - 1;   /* rounding left u just above the sum */
}

/* The logit biases, then the repetition penalty over the seen tokens, in place: in
 * transformers' order (SequenceBiasLogitsProcessor before RepetitionPenaltyLogitsProcessor;
 * the penalty's sign rule reads the biased logit). */
static void adjust(dg_sampler *s, float *logits) {
    for (size_t i = 0; i < s->n_bias; i++) logits[s->bias[i].token] += s->bias[i].bias;
    if (s->repetition_penalty != 1.0f)
        for (int i = 0; i < s->n_seen; i++) {
            float *x = &logits[s->seen_list[i]];
            *x = *x < 0.0f ? *x * s->repetition_penalty : *x / s->repetition_penalty;
        }
}

/* Top-p over the candidates s->cand[0..n) (best first) with their weights s->weight[0..n)
 * (exp(l/T - max)), then the draw. z: the weight of the whole vocabulary (top-p alone;
 * unused with top-k). Both paths end here, so they sum the same floats in the same order.
 *
 * transformers' TopP: in ascending order, tokens whose cumulative mass (over the top-k set
 * when top-k is on, else over all) is <= 1 - top_p are removed; the best token always
 * stays. Tokens outside the candidates are the smallest: their mass starts the cumulative
 * sum. */
static int32_t nucleus_draw(dg_sampler *s, int n, float z) {
    const float *cw = s->weight;
    /* the sums in double: over a flat distribution's 10^5 candidates a float cumulative sum
     * drifted by 1e-3 (each tiny term rounded against a sum near 1 - top_p) and let ~50
     * tokens past transformers' nucleus (torch sums its cumsum in double on the CPU) */
    double zc = 0.0;
    for (int i = 0; i < n; i++) zc += cw[i];
    const double norm = s->top_k ? zc : (double)z;
    int keep = n;
    if (s->top_p < 1.0f) {
        double cum = s->top_k ? 0.0 : ((double)z - zc) / (double)z;
        while (keep > 1) {
            cum += cw[keep - 1] / norm;
            if (cum > 1.0 - (double)s->top_p) break;
            keep--;
        }
    }
    s->kept = keep;
    float total = 0.0f;
    for (int i = 0; i < keep; i++) total += cw[i];
    return s->cand[draw(s, cw, keep, total)];
}

int dg_sampler_kept(const dg_sampler *s) { return s->kept; }

/* The token for an adjusted row logits[V] (host memory), not yet accepted. */
static int32_t choose(dg_sampler *s, const float *logits) {
    const int V = s->vocab;
    int32_t tok = argmax(logits, V);
    s->starved = logits[tok] == -INFINITY;   /* every token banned: the caller ends the sequence */
    /* greedy; and when every token is banned (-inf), the argmax is all there is; a top that
     * is +inf (an infinite bias through the engine's API) or NaN, or one that a tiny
     * temperature scales past the float range (1e20 / 1e-20), leaves no distribution to
     * draw from (exp(inf - inf)): the argmax, the lowest id, and no draw (the limit of
     * T -> 0); every path does the same */
    if (s->temperature <= 0.0f) return tok;
    const float inv_t = 1.0f / s->temperature, mx = logits[tok] * inv_t;
    if (!isfinite(mx)) return tok;
    /* s->prob[i] = exp(l_i / T - max): the unnormalised distribution, computed once (the
     * CPU backend's topk sums the same expression in the same order: keep them in step) */
    double zd = 0.0;   /* in double: a float sum of 10^5 near-equal terms was off by 1e-4 */
    for (int i = 0; i < V; i++) zd += (s->prob[i] = expf(logits[i] * inv_t - mx));
    /* through the log-sum-exp, as choose_on_device has it from the backend's topk (the same
     * double sum): the two paths' z the same bits (a huge m loses z there: that path then
     * comes here, and the plain sum is used) */
    const float z = fabsf(mx) <= 0x1p24f ? (float)exp(((double)mx + log(zd)) - (double)mx) : (float)zd;
    if (!s->top_k && s->top_p >= 1.0f)         /* plain sampling: no order needed */
        return isfinite(z) ? draw(s, s->prob, V, z)
                           : tok;   /* a NaN logit below the top: no distribution (draw() took the last id) */
    /* Candidates, best first: the top k; for top-p alone, the smallest top set found by
     * widening (64, 256, 1024) whose mass reaches top_p, which holds the whole nucleus.
     * Measured at V = 151936: plain temperature 1.8 ms/token, top-k 50 + top-p 1.8 ms,
     * top-p alone over a synthetic flat distribution (nucleus of ~10^5 tokens) 6-11 ms. */
    int n = s->top_k;
    if (n) {
        top(s, s->prob, n);
    } else {
        for (n = 64; n <= 1024 && n < V; n *= 4) {
            top(s, s->prob, n);
            float mass = 0.0f;
            for (int i = 0; i < n; i++) mass += s->prob[s->cand[i]];
            if (mass >= s->top_p * z) break;
        }
        if (n > 1024 || n >= V) {
            /* a flat distribution: every token with p > (1 - top_p) / V may be in the
             * nucleus; the others (total mass <= 1 - top_p, and the smallest) are not */
            const float floor_w = (1.0f - s->top_p) / (float)V * z;
            n = 0;
            for (int i = 0; i < V; i++)
                if (s->prob[i] > floor_w) s->cand[n++] = i;
            if (!n) return tok;   /* a NaN logit made z NaN: nothing compares above it */
            qsort_r(s->cand, (size_t)n, sizeof *s->cand, by_logit_desc, s->prob);
        }
    }
    for (int i = 0; i < n; i++) s->weight[i] = s->prob[s->cand[i]];
    return nucleus_draw(s, n, z);
}

int dg_sampler_starved(const dg_sampler *s) { return s->starved; }

int32_t dg_sampler_sample(dg_sampler *s, float *logits) {
    s->starved = 0;
    adjust(s, logits);
    int32_t tok = choose(s, logits);
    dg_sampler_accept(s, tok);
    return tok;
}

/* ---- the device path ----------------------------------------------------------------- */

/* Candidates fetched beyond those the host path would hold, so that a token just past them
 * can be shown not to belong (see candidates()). */
#define CAND_MARGIN 32

/* Asks the backend for the best K = min(need + CAND_MARGIN, V) tokens of the adjusted row
 * and orders them as the host path orders its candidates: s->cand[0..K) with weights
 * s->weight[0..K) = exp(l/T - mx) (the host's expression), by weight descending, ties by
 * lower id. *mx: the top logit scaled by 1/T; *lse (when asked): the backend's log-sum-exp.
 *
 * Returns 1 when the first `need` of them are the host's first `need` (same ids where the
 * weight is not 0, the same weights everywhere), else 0. The backend's order is by logit;
 * a token it left out has a logit <= that of the last one it returned, l_K, so its weight is
 * at most w_K's plus an ulp (expf is within 1 ulp of a monotone function; two ulps are
 * allowed): the first `need` are certain when the need-th weight is above that bound. When
 * w_K is 0, so is every left-out weight (expf underflows below one threshold): the zero
 * weights among the first `need` may then name other tokens than the host's, but a zero
 * weight changes no sum and is never drawn, so the token drawn is the same. K = V: all are
 * there. 0 also when K is over DG_BACKEND_TOPK_MAX; -1 when the top logit is not finite
 * (every token banned, or an infinite bias): the caller decides. */
static int candidates(dg_sampler *s, dg_backend *be, const float *row, int need, float inv_t,
                      float *mx, double *lse) {
    const int V = s->vocab, K = need + CAND_MARGIN < V ? need + CAND_MARGIN : V;
    float *w = s->weight;
    int32_t *id = s->cand;
    if (K > DG_BACKEND_TOPK_MAX) return 0;
    be->topk(be, row, V, K, inv_t, w, id, lse);
    if (!isfinite(w[0])) return -1;
    *mx = w[0] * inv_t;
    if (!isfinite(*mx)) return -1;   /* the host path's argmax (choose()) */
    for (int i = 0; i < K; i++) w[i] = expf(w[i] * inv_t - *mx);
    const float w_last = w[K - 1];
    /* by weight: already in order but where distinct logits gave equal weights (or, in
     * principle, expf was not monotone by an ulp): insertion sort, ~K compares */
    for (int i = 1; i < K; i++) {
        float wi = w[i];
        int32_t ii = id[i];
        int j = i;
        for (; j > 0 && (w[j - 1] < wi || (w[j - 1] == wi && id[j - 1] > ii)); j--) {
            w[j] = w[j - 1];
            id[j] = id[j - 1];
        }
        w[j] = wi;
        id[j] = ii;
    }
    if (K == V || w_last == 0.0f) return 1;
    return w[need - 1] > nextafterf(nextafterf(w_last, INFINITY), INFINITY);
}

/* The token from the backend's candidates, or -1 when they cannot decide it. */
static int32_t choose_on_device(dg_sampler *s, dg_backend *be, const float *row) {
    const int V = s->vocab;
    const float inv_t = 1.0f / s->temperature;
    float mx;
    int rc;
    if (s->top_k) {
        rc = candidates(s, be, row, s->top_k, inv_t, &mx, NULL);
        if (rc <= 0) return rc < 0 && (s->starved = s->weight[0] == -INFINITY) ? s->cand[0] : -1;
        return nucleus_draw(s, s->top_k, 0.0f);
    }
    if (s->top_p >= 1.0f) return -1;   /* plain sampling draws over every token, in index order */
    /* top-p alone: the host's widening, one backend call per width */
    double lse = 0.0;
    float z = 0.0f;
    int n;
    for (n = 64; n <= 1024 && n < V; n *= 4) {
        rc = candidates(s, be, row, n, inv_t, &mx, n == 64 ? &lse : NULL);
        if (rc <= 0) return rc < 0 && (s->starved = s->weight[0] == -INFINITY) ? s->cand[0] : -1;
        /* the CPU's lse is m + log(z), z summed in double: the host's z is made from the
         * same expression, bit for bit, while |m| <= 2^24; a larger m (a huge logit, or a
         * tiny temperature: 30 / 1e-8) loses z in it (log 78 vanished beside -2.8e21), so
         * the host path sums z itself */
        if (n == 64 && !(fabsf(mx) <= 0x1p24f)) return -1;
        if (n == 64) z = (float)exp(lse - (double)mx);
        float mass = 0.0f;
        for (int i = 0; i < n; i++) mass += s->weight[i];
        if (mass >= s->top_p * z) break;
    }
    if (n > 1024 || n >= V) return -1;   /* a flat distribution: the host's floor pass */
    return nucleus_draw(s, n, z);
}

int32_t dg_sampler_sample_device(dg_sampler *s, dg_backend *be, float *row, int32_t ban,
                                 float *host) {
    int n_bias = (int)s->n_bias;
    int32_t tok;
    s->starved = 0;
    if (!be->topk) {   /* no device path on this backend (backend.h): the host path */
        be->download(be, host, row, s->vocab);
        adjust(s, host);
        if (ban >= 0 && ban < s->vocab) host[ban] = -INFINITY;
        tok = choose(s, host);
        dg_sampler_accept(s, tok);
        return tok;
    }
    /* after the user's biases: -inf + b and (x + b) + -inf agree for every finite x */
    if (ban >= 0 && ban < s->vocab) s->bias[n_bias++] = (dg_logit_bias){ban, -INFINITY};
    be->logits_adjust(be, row, s->vocab, s->seen_list,
                      s->repetition_penalty != 1.0f ? s->n_seen : 0, s->repetition_penalty,
                      s->bias, n_bias);
    if (s->temperature <= 0.0f) {
        be->topk(be, row, s->vocab, 1, 1.0f, s->weight, s->cand, NULL);
        tok = s->cand[0];
        s->starved = s->weight[0] == -INFINITY;
    } else if ((tok = choose_on_device(s, be, row)) < 0) {
        be->download(be, host, row, s->vocab);
        tok = choose(s, host);
    }
    dg_sampler_accept(s, tok);
    return tok;
}

/* ---- choices from bounds ------------------------------------------------------------------ */

int dg_sampler_bounded(const dg_sampler *s) {
    return s->temperature <= 0.0f || (s->top_k > 0 && s->top_k <= DG_SAMPLER_BOUNDS_TOPK);
}

/* adjust() and the device path's ban for one token: the same operations in the same order
 * (the biases as listed, the penalty, then -inf added), so the same bits. */
static float adjust_one(const dg_sampler *s, int32_t j, float v, int32_t ban) {
    for (size_t i = 0; i < s->n_bias; i++)
        if (s->bias[i].token == j) v += s->bias[i].bias;
    if (s->repetition_penalty != 1.0f && s->seen[j]) v = v < 0.0f ? v * s->repetition_penalty : v / s->repetition_penalty;
    return j == ban ? v + -INFINITY : v;
}

/* Restores the min-heap h[0..k) below position j. */
static void sift_down_min(float *h, int k, int j) {
    for (;;) {
        int c = 2 * j + 1;
        if (c >= k) return;
        if (c + 1 < k && h[c + 1] < h[c]) c++;
        if (!(h[c] < h[j])) return;
        float t = h[j]; h[j] = h[c]; h[c] = t;
        j = c;
    }
}

/* The k-th largest of x[0..n) (1 <= k <= n, no NaN), h[0..k) scratch: a min-heap of the
 * k largest so far, its least at h[0]. */
static float kth_largest(const float *x, int n, int k, float *h) {
    for (int i = 0; i < k; i++) h[i] = x[i];
    for (int i = k / 2 - 1; i >= 0; i--) sift_down_min(h, k, i);
    for (int i = k; i < n; i++)
        if (x[i] > h[0]) {
            h[0] = x[i];
            sift_down_min(h, k, 0);
        }
    return h[0];
}

/* The bounds go through the biases, the penalty and the ban in place (adjust() on each, the
 * ban's -inf added), so that lo'[j] <= f_j(row[j]) <= hi'[j] for each token's adjustment
 * f_j: every step is monotone, and rounding keeps it so. (Into copies, two 600 KB memcpys a
 * token at V = 151936, it took 0.21 ms.)
 *
 * With k = 1 (greedy) or top_k: L = the k-th largest lower bound. At least k tokens are
 * worth >= L, so a token whose upper bound is below L is not among the k best: the
 * candidates are the tokens with hi' >= L, and their exact values are asked for. Greedy
 * takes the largest (the lowest id on ties). Top-k weighs them as choose() does (the same
 * expression, the same maximum: the best token is a candidate), orders them as top() does
 * and keeps the first k: the host's k when every other token's weight is below the k-th,
 * which holds where exp(H / T - max), H the largest upper bound left out, is two ulps below
 * it (expf is within an ulp of a monotone function, as candidates() allows) or is 0 (left
 * out weights are then 0, as in candidates(): a zero weight changes no sum and is never
 * drawn). Then top-p and the draw over them: nucleus_draw(), as both other paths. */
int32_t dg_sampler_sample_bounds(dg_sampler *s, float *lo, float *hi, int32_t ban, dg_sampler_pick_fn pick,
                                 void *user) {
    const int V = s->vocab, greedy = s->temperature <= 0.0f, k = greedy ? 1 : s->top_k;
    s->starved = 0;
    if (!dg_sampler_bounded(s)) return -1;
    adjust(s, lo);
    adjust(s, hi);
    if (ban >= 0 && ban < V) {
        lo[ban] += -INFINITY;
        hi[ban] += -INFINITY;
    }
    int nan = 0;
    float cut = -INFINITY;
    for (int j = 0; j < V; j++) {
        nan |= isnan(lo[j]) | isnan(hi[j]);
        cut = lo[j] > cut ? lo[j] : cut;
    }
    if (nan) return -1;
    if (k > 1) cut = kth_largest(lo, V, k, s->weight);
    if (cut == -INFINITY) return -1;   /* nothing is bounded away from it, every token may tie */
    int n = 0;
    float out = -INFINITY;   /* the largest upper bound left out */
    for (int j = 0; j < V; j++)
        if (hi[j] >= cut) {
            if (n == DG_SAMPLER_BOUNDS_MAX) return -1;
            s->cand[n++] = j;
        } else {
            out = hi[j] > out ? hi[j] : out;
        }
    if (n < k) return -1;   /* bounds that cross (lo > hi): not bounds */
    float *v = s->weight;
    pick(user, s->cand, n, v);
    int best = -1;
    for (int i = 0; i < n; i++) {
        v[i] = adjust_one(s, s->cand[i], v[i], ban);
        if (isnan(v[i])) return -1;
        if (best < 0 || v[i] > v[best]) best = i;
    }
    int32_t tok = s->cand[best];
    const float inv_t = greedy ? 1.0f : 1.0f / s->temperature, mx = v[best] * inv_t;
    if (!greedy && isfinite(mx)) {   /* else +inf, or scaled past the range: choose()'s argmax, no draw */
        for (int i = 0; i < n; i++) s->prob[s->cand[i]] = expf(v[i] * inv_t - mx);
        qsort_r(s->cand, (size_t)n, sizeof *s->cand, by_logit_desc, s->prob);
        for (int i = 0; i < k; i++) s->weight[i] = s->prob[s->cand[i]];
        const float w_out = expf(out * inv_t - mx);
        if (w_out != 0.0f && !(s->weight[k - 1] > nextafterf(nextafterf(w_out, INFINITY), INFINITY))) return -1;
        tok = nucleus_draw(s, k, 0.0f);
    }
    dg_sampler_accept(s, tok);
    return tok;
}

/* ---- stop strings --------------------------------------------------------------------- */

struct dg_stop {
    char  **stop;     /* owned: n_stop strings */
    size_t *len;
    size_t  n_stop, max_len;
    char   *hold;     /* owned: [max_len] bytes that may still start a stop string */
    size_t  n_hold;
    char   *tail;     /* owned: [max_len] scratch for the next hold */
    size_t  match_end;/* the last match's end in the text of its feed */
};

int dg_stop_new(const char *const *stop, size_t n_stop, dg_stop **out, char *err, size_t errlen) {
    dg_stop *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s || !(s->stop = calloc(n_stop + 1, sizeof *s->stop)) ||
        !(s->len = calloc(n_stop + 1, sizeof *s->len)))
        goto nomem;
    for (size_t i = 0; i < n_stop; i++) {
        if (!stop[i] || !stop[i][0]) continue;   /* an empty stop string never matches */
        if (!(s->stop[s->n_stop] = strdup(stop[i]))) goto nomem;
        s->len[s->n_stop] = strlen(stop[i]);
        if (s->len[s->n_stop] > s->max_len) s->max_len = s->len[s->n_stop];
        s->n_stop++;
    }
    if (!(s->hold = malloc(s->max_len + 1)) || !(s->tail = malloc(s->max_len + 1))) goto nomem;
    *out = s;
    return 0;
nomem:
    dg_stop_free(s);
    snprintf(err, errlen, "stop strings: out of memory");
    return DG_ENOMEM;
}

void dg_stop_free(dg_stop *s) {
    if (!s) return;
    for (size_t i = 0; s->stop && i < s->n_stop; i++) free(s->stop[i]);
    free(s->stop);
    free(s->len);
    free(s->hold);
    free(s->tail);
    free(s);
}

/* The text seen by the matcher is hold[0..n_hold) followed by the new bytes. */
static char at(const dg_stop *s, const char *text, size_t i) {
    return i < s->n_hold ? s->hold[i] : text[i - s->n_hold];
}

static int match_at(const dg_stop *s, const char *text, size_t pos, size_t k) {
    for (size_t j = 0; j < s->len[k]; j++)
        if (at(s, text, pos + j) != s->stop[k][j]) return 0;
    return 1;
}

/* Emits bytes [a, b) of hold + text, in at most two calls: the held bytes start at a
 * stop-string prefix, so both pieces begin on a character boundary. */
static void emit_range(const dg_stop *s, const char *text, size_t a, size_t b, dg_stop_emit emit,
                       void *user) {
    if (a < s->n_hold && a < b) emit(user, s->hold + a, (b < s->n_hold ? b : s->n_hold) - a);
    if (b > s->n_hold) {
        size_t from = a > s->n_hold ? a : s->n_hold;
        if (from < b) emit(user, text + from - s->n_hold, b - from);
    }
}

int dg_stop_feed(dg_stop *s, const char *text, size_t len, dg_stop_emit emit, void *user) {
    const size_t total = s->n_hold + len;
    /* the stop string that completes first (smallest end) wins */
    size_t best_end = (size_t)-1, best_start = 0;
    for (size_t k = 0; k < s->n_stop; k++)
        for (size_t p = 0; p + s->len[k] <= total; p++)
            if (p + s->len[k] < best_end && match_at(s, text, p, k)) {
                best_end = p + s->len[k];
                best_start = p;
                break;
            }
    if (best_end != (size_t)-1) {
        emit_range(s, text, 0, best_start, emit, user);
        s->match_end = best_end - s->n_hold;   /* >= 0: a held prefix never matches alone */
        s->n_hold = 0;
        return 1;
    }
    /* hold back the longest tail that is a proper prefix of a stop string */
    size_t keep = 0;
    for (size_t k = 0; k < s->n_stop; k++)
        for (size_t l = s->len[k] - 1 < total ? s->len[k] - 1 : total; l > keep; l--) {
            size_t j = 0;
            while (j < l && at(s, text, total - l + j) == s->stop[k][j]) j++;
            if (j == l) { keep = l; break; }
        }
    emit_range(s, text, 0, total - keep, emit, user);
    /* new hold = the last `keep` bytes of hold + text */
    for (size_t j = 0; j < keep; j++) s->tail[j] = at(s, text, total - keep + j);
    memcpy(s->hold, s->tail, keep);
    s->n_hold = keep;
    return 0;
}

size_t dg_stop_match_end(const dg_stop *s) { return s->match_end; }

void dg_stop_flush(dg_stop *s, dg_stop_emit emit, void *user) {
    if (s->n_hold) emit(user, s->hold, s->n_hold);
    s->n_hold = 0;
}
