#!/usr/bin/env python3
"""The polynomials of the CPU GELU's vector erf (kernels/cpu/vision_ops.c, gelu_avx2).

    erf(z)             = z * P(z^2)              for |z| < 1   (P degree 5)
    erfc(z) * exp(z^2) = Q(1/z)                  for 1 <= z    (Q degree 9, fitted on 1 .. 10)

Each is a weighted least-squares fit on Chebyshev nodes, reweighted toward the largest
relative error (Lawson's iteration) so that it ends near the minimax polynomial; the
reference values are Python's math.erf / math.erfc in double. The script prints the
coefficients as float32 and the largest relative error of each polynomial when it is
evaluated in float32 by Horner's rule, as the kernel does. numpy only:
    tools/reference/.venv/bin/python tools/reference/fit_erf.py
"""
import math

import numpy as np

N = 20000


def fit(xs, f, t_of_x, deg):
    t = t_of_x(xs)
    a = np.stack([t ** i for i in range(deg + 1)], 1)
    w = 1.0 / np.abs(f)            # relative error
    wt = np.ones_like(xs)
    for _ in range(60):
        c, *_ = np.linalg.lstsq(a * (wt * w)[:, None], f * wt * w, rcond=None)
        e = np.abs(a @ c - f) * w
        wt = wt * (e / e.max() + 1e-3)
        wt /= wt.mean()
    return np.float32(c)


def horner32(c, t):
    t = t.astype(np.float32)
    p = np.full_like(t, c[-1])
    for k in c[-2::-1]:
        p = (p * t + k).astype(np.float32)
    return p


def main():
    erf = np.vectorize(math.erf)
    erfc = np.vectorize(math.erfc)
    nodes = np.cos(np.linspace(0.0, np.pi, N))

    z = nodes * 0.5 + 0.5                                          # 0 .. 1
    f = np.where(z > 0, erf(z) / np.where(z > 0, z, 1.0), 2.0 / math.sqrt(math.pi))
    p = fit(z, f, lambda x: x * x, 5)
    z32 = z.astype(np.float32)
    rel = np.abs(horner32(p, z32 * z32) / f - 1.0).max()
    print("P (erf(z)/z in z^2, |z| < 1): max rel err %.3g" % rel)
    print("  " + ", ".join("%.9gf" % v for v in p))

    z = 1.0 / (nodes * 0.45 + 0.55)                                # 1 .. 10
    f = erfc(z) * np.exp(z * z)
    q = fit(z, f, lambda x: 1.0 / x, 9)
    u32 = (np.float32(1.0) / z.astype(np.float32)).astype(np.float32)
    rel = np.abs(horner32(q, u32) / f - 1.0).max()
    print("Q (erfc(z) exp(z^2) in 1/z, 1 <= z <= 10): max rel err %.3g" % rel)
    print("  " + ", ".join("%.9gf" % v for v in q))


if __name__ == "__main__":
    main()
