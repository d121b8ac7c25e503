#!/usr/bin/env python3
"""The polynomial of the bf16 attention's softmax exp (kernels/cpu/simd_math.h,
dg_exp512_nonpos):

    2^f = P(f)        for -1/2 <= f <= 1/2   (P degree 5, P(0) = 1: exp(0) is 1 exactly)

exp(x) is then 2^n · P(x·log2(e) - n), n the nearest integer, the scaling by VSCALEFPS.
A weighted least-squares fit on Chebyshev nodes, reweighted toward the largest relative
error (Lawson's iteration) so that it ends near the minimax polynomial; the reference is
numpy's exp2 in double. Prints the coefficients as float32 and the largest relative error
of P evaluated in float32 by Horner's rule, as the kernel does. numpy only:
    tools/reference/.venv/bin/python tools/reference/fit_exp2.py
"""
import numpy as np

N = 20000
DEG = 5


def main():
    f = 0.5 * np.cos(np.pi * (np.arange(N) + 0.5) / N)
    y = np.exp2(f)
    # P(f) = 1 + f·Q(f): Q fitted to (2^f - 1) / f, in the relative error of P
    a = np.stack([f ** i for i in range(1, DEG + 1)], 1) / y[:, None]
    b = 1.0 - 1.0 / y
    wt = np.ones(N)
    for _ in range(60):
        c, *_ = np.linalg.lstsq(a * wt[:, None], b * wt, rcond=None)
        e = np.abs(a @ c - b)
        wt = wt * (e / e.max() + 1e-3)
        wt /= wt.mean()
    c32 = np.concatenate([[1.0], c]).astype(np.float32)
    t = np.linspace(-0.5, 0.5, 400001).astype(np.float32)
    p = np.full_like(t, c32[DEG])
    for k in range(DEG - 1, -1, -1):
        p = (p * t + c32[k]).astype(np.float32)
    err = np.max(np.abs(p.astype(np.float64) / np.exp2(t.astype(np.float64)) - 1.0))
    print("P:", ", ".join("%.9ef" % v for v in c32))
    print("largest relative error in float32 Horner: %.3g" % err)


if __name__ == "__main__":
    main()
