/* flow.c — flow-matching schedules, UniPC and Euler steps, guidance and seeded noise. */
#include "draw/flow.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"

void dg_flow_sigmas_karras(float *sig, int n, double sigma_min, double sigma_max, double rho) {
    const double lo = pow(sigma_min, 1.0 / rho), hi = pow(sigma_max, 1.0 / rho);
    for (int i = 0; i < n; i++) {
        const double ramp = n > 1 ? (double)i / (n - 1) : 0.0;
        const double s = pow(hi + ramp * (lo - hi), rho);
        sig[i] = (float)(s / (1.0 + s));
    }
    sig[n] = 0.0f;
}

void dg_flow_sigmas_shifted(float *sig, int n, double shift, double u_first, double u_last) {
    for (int i = 0; i < n; i++) {
        const double u = u_first + (n > 1 ? (double)i / (n - 1) : 0.0) * (u_last - u_first);
        sig[i] = (float)(shift * u / (1.0 + (shift - 1.0) * u));
    }
    sig[n] = 0.0f;
}

int dg_flow_new(dg_flow_solver solver, const float *sigmas, int n_steps, int64_t n, dg_flow **out,
                char *err, size_t errlen) {
    dg_flow *f;
    *out = NULL;
    if (n_steps < 1 || n_steps > DG_FLOW_MAX_STEPS || n < 1) {
        snprintf(err, errlen, "flow: %d steps over %lld elements", n_steps, (long long)n);
        return DG_EINVAL;
    }
    for (int i = 0; i < n_steps; i++)
        /* UniPC needs λ(σ_0) finite: σ_0 < 1; Euler may start at pure noise */
        if (!(sigmas[i] > sigmas[i + 1]) || !(sigmas[i] <= 1.0f) ||
            (solver == DG_FLOW_UNIPC && !(sigmas[i] < 1.0f))) {
            snprintf(err, errlen, "flow: sigmas must decrease inside (0, 1%s: sigma[%d] = %g, sigma[%d] = %g",
                     solver == DG_FLOW_UNIPC ? ")" : "]", i, sigmas[i], i + 1, sigmas[i + 1]);
            return DG_EINVAL;
        }
    if (sigmas[n_steps] != 0.0f) {
        snprintf(err, errlen, "flow: the last sigma must be 0, not %g", sigmas[n_steps]);
        return DG_EINVAL;
    }
    if (!(f = calloc(1, sizeof *f))) goto nomem;
    f->solver = solver;
    f->n_steps = n_steps;
    f->n = n;
    memcpy(f->sigmas, sigmas, sizeof(float) * (size_t)(n_steps + 1));
    if (solver == DG_FLOW_UNIPC &&
        (!(f->m_prev1 = malloc(sizeof(float) * (size_t)n)) ||
         !(f->m_prev2 = malloc(sizeof(float) * (size_t)n)) ||
         !(f->x_last = malloc(sizeof(float) * (size_t)n)) ||
         !(f->m_cur = malloc(sizeof(float) * (size_t)n))))
        goto nomem;
    *out = f;
    return 0;
nomem:
    dg_flow_free(f);
    snprintf(err, errlen, "flow: out of memory");
    return DG_ENOMEM;
}

void dg_flow_free(dg_flow *f) {
    if (!f) return;
    free(f->m_prev1);
    free(f->m_prev2);
    free(f->x_last);
    free(f->m_cur);
    free(f);
}

void dg_flow_reset(dg_flow *f) {
    f->step = 0;
    f->order_prev = 0;
    f->n_lower = 0;
}

float dg_flow_sigma(const dg_flow *f) { return f->sigmas[f->step < f->n_steps ? f->step : f->n_steps]; }

/* λ(σ) = ln(1 − σ) − ln σ (log-SNR of the flow path; +inf at σ = 0). */
static double lambda(float sigma) { return log(1.0 - (double)sigma) - log((double)sigma); }

/* One UniPC step (spec §5.3; diffusers UniPCMultistepScheduler.step with use_flow_sigmas,
 * predict_x0, bh2): the corrector UniC refines x with this step's x₀ prediction, then the
 * predictor UniP moves it to the next sigma. Coefficients in double, data in float. IEEE
 * arithmetic carries the last step, where σ = 0 gives λ = +inf, expm1(−inf) = −1 and
 * x_next = x̂₀. */
static void unipc_step(dg_flow *f, float *x, const float *v) {
    const int i = f->step, N = f->n_steps;
    const int64_t n = f->n;
    const float *sg = f->sigmas;
    float *m = f->m_cur;
    for (int64_t k = 0; k < n; k++) m[k] = x[k] - sg[i] * v[k];
    if (i > 0) {   /* corrector UniC, of the order the last predictor had */
        const double a = 1.0 - sg[i], h = lambda(sg[i]) - lambda(sg[i - 1]), hh = -h;
        const double phi = expm1(hh), B = phi, ratio = (double)sg[i] / sg[i - 1];
        double rho_d = 0.0, rho_t = 0.5, r = 1.0;   /* order 1: rhos_c = [0.5] */
        if (f->order_prev == 2) {
            const double k1 = phi / hh - 1.0, b1 = k1 / B, k2 = k1 / hh - 0.5, b2 = 2.0 * k2 / B;
            r = (lambda(sg[i - 2]) - lambda(sg[i - 1])) / h;
            rho_d = (b1 - b2) / (1.0 - r);   /* solve [[1, 1], [r, 1]]·ρ = [b1, b2] */
            rho_t = b1 - rho_d;
        }
        for (int64_t k = 0; k < n; k++) {
            const double m1 = f->m_prev1[k];
            const double d1 = f->order_prev == 2 ? ((double)f->m_prev2[k] - m1) / r : 0.0;
            const double base = ratio * f->x_last[k] - a * phi * m1;
            x[k] = (float)(base - a * B * (rho_d * d1 + rho_t * ((double)m[k] - m1)));
        }
    }
    float *t = f->m_prev2;   /* history: m_prev2 <- m_prev1 <- m */
    f->m_prev2 = f->m_prev1;
    f->m_prev1 = m;
    f->m_cur = t;
    int p = N - i < 2 ? N - i : 2;
    if (p > f->n_lower + 1) p = f->n_lower + 1;
    f->order_prev = p;
    memcpy(f->x_last, x, sizeof(float) * (size_t)n);
    /* predictor UniP of order p */
    const double a = 1.0 - sg[i + 1], h = lambda(sg[i + 1]) - lambda(sg[i]), hh = -h;
    const double phi = expm1(hh), B = phi, ratio = (double)sg[i + 1] / sg[i];
    const double r = p == 2 ? (lambda(sg[i - 1]) - lambda(sg[i])) / h : 1.0;
    for (int64_t k = 0; k < n; k++) {
        const double m0 = f->m_prev1[k];
        double xn = ratio * f->x_last[k] - a * phi * m0;
        if (p == 2) xn -= a * B * 0.5 * (((double)f->m_prev2[k] - m0) / r);   /* rhos_p = [0.5] */
        x[k] = (float)xn;
    }
    if (f->n_lower < 2) f->n_lower++;
}

int dg_flow_step(dg_flow *f, float *x, const float *v) {
    if (f->step >= f->n_steps) return DG_EINVAL;
    if (f->solver == DG_FLOW_UNIPC) {
        unipc_step(f, x, v);
    } else {
        const float d = f->sigmas[f->step + 1] - f->sigmas[f->step];
        for (int64_t k = 0; k < f->n; k++) x[k] += d * v[k];
    }
    f->step++;
    return 0;
}

void dg_flow_cfg(float *v, const float *v_c, const float *v_u, float scale, int64_t n) {
    for (int64_t i = 0; i < n; i++) v[i] = v_c[i] + scale * (v_c[i] - v_u[i]);
}

static uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void dg_flow_noise(float *x, int64_t n, uint64_t seed, int64_t first) {
    const double two_pi = 6.283185307179586476925286766559;
    const uint64_t key = splitmix64(seed ^ 0x6a09e667f3bcc909ull);
    for (int64_t i = 0; i < n; i++) {
        const uint64_t k = (uint64_t)(first + i);
        const uint64_t r = splitmix64(key + (k >> 1) * 0x9e3779b97f4a7c15ull);
        /* u1 in (0, 1] (log finite), u2 in [0, 1) */
        const double u1 = ((double)(r >> 32) + 1.0) / 4294967296.0;
        const double u2 = (double)(r & 0xffffffffu) / 4294967296.0;
        const double rad = sqrt(-2.0 * log(u1));
        x[i] = (float)(rad * ((k & 1) ? sin(two_pi * u2) : cos(two_pi * u2)));
    }
}
