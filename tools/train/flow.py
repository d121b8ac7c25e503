"""The engine's image sampler in PyTorch/numpy, step for step (engine/draw/flow.c and
engine/draw/painter.c): the sigma schedules, UniPC (bh2, order 2, x0-prediction,
corrector on, lower order at the end), classifier-free guidance v = v_c + g·(v_c − v_u),
and the seeded noise dg_flow_noise (splitmix64 counter hash + Box-Muller), so that the
training probes and the goldens draw exactly what the engine draws from the same seed.

Flow matching: x_sigma = sigma·eps + (1 − sigma)·x0, the DiT predicts v = eps − x0.
"""
import math

import numpy as np
import torch

M64 = (1 << 64) - 1
COND_TIMESTEP = 1e-4


def shifted(u, shift):
    """The shift's map of a noise level u in [0, 1] (a number or a tensor): the sampler's
    schedule below, and the training levels of stage dit3 (train.SIGMA_SHIFT)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sigmas_shifted(n, shift, u_first=0.999, u_last=None):
    """dg_flow_sigmas_shifted as the painter calls it (u from 0.999 to 0.999/n), n + 1 values."""
    u_last = 0.999 / n if u_last is None else u_last
    out = []
    for i in range(n):
        u = u_first + (i / (n - 1) if n > 1 else 0.0) * (u_last - u_first)
        out.append(np.float32(shifted(u, shift)))
    return np.array(out + [0.0], dtype=np.float32)


def sigmas_karras(n, sigma_min=0.01, sigma_max=200.0, rho=7.0):
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    out = []
    for i in range(n):
        s = (hi + (i / (n - 1) if n > 1 else 0.0) * (lo - hi)) ** rho
        out.append(np.float32(s / (1 + s)))
    return np.array(out + [0.0], dtype=np.float32)


def schedule(steps, shift):
    """The painter's choice: shift > 0 the shifted schedule, else Karras."""
    return sigmas_shifted(steps, shift) if shift > 0 else sigmas_karras(steps)


def _splitmix64(z):
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(M64)
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(M64)
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(M64)
    return z ^ (z >> np.uint64(31))


def noise(n, seed, first=0):
    """dg_flow_noise(x, n, seed, first): float32 [n]."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64((seed ^ 0x6A09E667F3BCC909) & M64))
        k = np.arange(first, first + n, dtype=np.uint64)
        r = _splitmix64((key + (k >> np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(M64))
    u1 = ((r >> np.uint64(32)).astype(np.float64) + 1.0) / 4294967296.0
    u2 = (r & np.uint64(0xFFFFFFFF)).astype(np.float64) / 4294967296.0
    rad = np.sqrt(-2.0 * np.log(u1))
    ang = 2.0 * math.pi * u2
    return np.where(k & np.uint64(1), rad * np.sin(ang), rad * np.cos(ang)).astype(np.float32)


def image_seed(job_seed, index):
    """The noise stream of image `index` (0-based) of a job: seed·0x9E3779B97F4A7C15 + index + 1."""
    return (job_seed * 0x9E3779B97F4A7C15 + index + 1) & M64


def _lambda(s):
    return math.log(1.0 - float(s)) - math.log(float(s)) if s > 0 else math.inf


class UniPC:
    """dg_flow with DG_FLOW_UNIPC over float32 tensors of any shape (coefficients in
    double, data in float, as flow.c)."""

    def __init__(self, sigmas):
        self.sg = [np.float32(s) for s in sigmas]
        self.n = len(sigmas) - 1
        self.step_i = 0
        self.m_prev1 = self.m_prev2 = self.x_last = None
        self.order_prev = 0
        self.n_lower = 0

    def sigma(self):
        return float(self.sg[min(self.step_i, self.n)])

    def step(self, x, v):
        """x [any] float32 at sigma_i, v the (guided) velocity there -> x at sigma_{i+1}."""
        i, N, sg = self.step_i, self.n, self.sg
        x = x.double()
        m = (x.float() - torch.tensor(float(sg[i]), dtype=torch.float32) * v.float()).double()
        if i > 0:
            a, h = 1.0 - float(sg[i]), _lambda(sg[i]) - _lambda(sg[i - 1])
            hh = -h
            phi = math.expm1(hh)
            B, ratio = phi, float(sg[i]) / float(sg[i - 1])
            rho_d, rho_t, r = 0.0, 0.5, 1.0
            if self.order_prev == 2:
                k1 = phi / hh - 1.0
                b1 = k1 / B
                k2 = k1 / hh - 0.5
                b2 = 2.0 * k2 / B
                r = (_lambda(sg[i - 2]) - _lambda(sg[i - 1])) / h
                rho_d = (b1 - b2) / (1.0 - r)
                rho_t = b1 - rho_d
            m1 = self.m_prev1
            d1 = (self.m_prev2 - m1) / r if self.order_prev == 2 else torch.zeros_like(m1)
            base = ratio * self.x_last - a * phi * m1
            x = (base - a * B * (rho_d * d1 + rho_t * (m - m1))).float().double()
        self.m_prev2, self.m_prev1 = self.m_prev1, m
        p = min(N - i, 2, self.n_lower + 1)
        self.order_prev = p
        self.x_last = x
        a, h = 1.0 - float(sg[i + 1]), _lambda(sg[i + 1]) - _lambda(sg[i])
        hh = -h
        phi = -1.0 if math.isinf(hh) else math.expm1(hh)
        B, ratio = phi, float(sg[i + 1]) / float(sg[i])
        r = (_lambda(sg[i - 1]) - _lambda(sg[i])) / h if p == 2 else 1.0
        xn = ratio * self.x_last - a * phi * self.m_prev1
        if p == 2:
            xn = xn - a * B * 0.5 * ((self.m_prev2 - self.m_prev1) / r)
        if self.n_lower < 2:
            self.n_lower += 1
        self.step_i += 1
        return xn.float()
