/* flow.h — the rectified-flow sampler of the DiT (docs/specs/cosmos_dit_wan_vae.md §5): sigma
 * schedules, the UniPC (bh2, order 2, corrector on) and Euler solvers, classifier-free
 * guidance and seeded Gaussian noise. (engine/sampler.h is the TOKEN sampler.)
 *
 * Flow matching: x_σ = σ·ε + (1 − σ)·x₀, the network predicts the velocity v = ε − x₀, so
 * x̂₀ = x − σ·v. The sampler holds only its own history; the caller owns x and calls the
 * DiT once (twice with guidance) per step:
 *
 *     float sig[DG_FLOW_MAX_STEPS + 1];
 *     dg_flow_sigmas_karras(sig, 36, 0.01, 200.0, 7.0);     // post-trained Cosmos-Predict2.5
 *     dg_flow *f; dg_flow_new(DG_FLOW_UNIPC, sig, 36, n, &f, err, sizeof err);
 *     dg_flow_noise(x, n, seed, 0);                          // x = ε
 *     for (int i = 0; i < 36; i++) {
 *         ... v_c, v_u = DiT(x, timestep dg_flow_sigma(f)) with and without the condition
 *         dg_flow_cfg(v, v_c, v_u, 7.0f, n);
 *         dg_flow_step(f, x, v);                              // x: σ_i -> σ_{i+1}
 *     }                                                       // x = the clean latent
 *
 * All sampler math is fp32 on host arrays (coefficients in double), as the references do
 * it (P25 `.float()`; diffusers' scheduler in the sample's float32). */
#ifndef DG_FLOW_H
#define DG_FLOW_H

#include <stddef.h>
#include <stdint.h>

#define DG_FLOW_MAX_STEPS 1000

typedef enum {
    DG_FLOW_UNIPC,   /* UniPC bh2, order 2, x₀-prediction, corrector on, lower order final */
    DG_FLOW_EULER,   /* x ← x + (σ_{i+1} − σ_i)·v */
} dg_flow_solver;

typedef struct {
    dg_flow_solver solver;
    int            n_steps;
    int            step;                        /* steps taken */
    float          sigmas[DG_FLOW_MAX_STEPS + 1];  /* σ_0 > .. > σ_{n-1} > σ_n = 0 */
    int64_t        n;                           /* elements of x */
    /* UniPC history (owned, [n] each): x₀ predictions of the last two steps, the sample
     * the last predictor started from, and this step's x₀ prediction */
    float         *m_prev1, *m_prev2, *x_last, *m_cur;
    int            order_prev, n_lower;
} dg_flow;

/* Karras (EDM, rho) sigmas mapped to flow sigmas s/(1+s), n values then a final 0:
 * s_i = (smax^(1/ρ) + i/(n−1)·(smin^(1/ρ) − smax^(1/ρ)))^ρ. The post-trained Cosmos-Predict2.5
 * default is n = 36, smin 0.01, smax 200, ρ 7 (spec §5.2a; diffusers UniPC use_karras_sigmas
 * with use_flow_sigmas). sig has n + 1 entries. */
void dg_flow_sigmas_karras(float *sig, int n, double sigma_min, double sigma_max, double rho);
/* Shifted linear sigmas, n values then 0: u_i = u_first + i/(n−1)·(u_last − u_first),
 * σ_i = shift·u/(1 + (shift − 1)·u). The pre-trained Cosmos-Predict2.5 default is n = 35,
 * shift 5, u from 0.999 to 0.999/35 (linspace(0.999, 0, 36)[:-1], spec §5.2b); diffusers'
 * FlowMatchEulerDiscreteScheduler(shift) uses u from 1 to 1/1000. */
void dg_flow_sigmas_shifted(float *sig, int n, double shift, double u_first, double u_last);

/* A sampler over n_steps steps of the given sigmas (n_steps + 1 entries, the last 0) for
 * x of n elements. DG_EINVAL for bad steps or sigmas that do not decrease to 0. */
int   dg_flow_new(dg_flow_solver solver, const float *sigmas, int n_steps, int64_t n,
                  dg_flow **out, char *err, size_t errlen);
void  dg_flow_free(dg_flow *f);    /* accepts NULL */
/* Back to step 0 (same sigmas and size) for the next image. */
void  dg_flow_reset(dg_flow *f);

/* σ of the current step: the DiT's timestep input (Cosmos: t = σ, already in [0, 1]). */
float dg_flow_sigma(const dg_flow *f);
/* Advances x[n] in place from σ_step to σ_step+1 given the (guided) velocity v[n] at
 * (x, σ_step). After the last step x is the final x̂₀. DG_EINVAL after the last step. */
int   dg_flow_step(dg_flow *f, float *x, const float *v);

/* v = v_c + scale·(v_c − v_u) (spec §5.4: Cosmos' g = 7, i.e. CFG 8); v may alias v_c. */
void  dg_flow_cfg(float *v, const float *v_c, const float *v_u, float scale, int64_t n);

/* x[i] = N(0,1) sample number first + i of the stream `seed`: element k comes from the
 * 64-bit counter hash splitmix64(seed, k/2) as two 32-bit uniforms (Box–Muller: even k the
 * cosine, odd k the sine), so any slice can be drawn on its own and the values depend on
 * nothing but (seed, k): the same on every run and machine (IEEE double log/sqrt/sin/cos,
 * rounded to float). */
void  dg_flow_noise(float *x, int64_t n, uint64_t seed, int64_t first);

#endif
