"""How far the training forward's y is from float64 on float32 data far from zero.

The statistics are exact to float32 rounding, but every pass subtracts the mean rounded to
float32, so y carries an error of up to about |mean|/std * 2**-24 (half a float32 ulp of the
mean, in units of std). This prints the largest error of y against float64 (computed from the
same float32 values) for batchnorm, for the a*x + b fold in float32 (a = 1/std, b = -mean*a,
each rounded to float32), and for PyTorch when it is installed:

    python tools/mean_rounding.py
"""

from __future__ import annotations

import numpy as np

import batchnorm as bn

CASES = [(1.0, 1.0), (1e2, 1.0), (1e3, 1.0), (1e4, 1.0), (1e4, 0.2), (1e6, 1.0)]
EPS = 1e-12  # PyTorch refuses 0 in training; small enough not to matter at these variances


def main() -> None:
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"{'mean':>8} {'std':>5} {'bound':>9} {'batchnorm':>9} {'a*x+b':>9} {'torch':>9}")
    for mean, std in CASES:
        x = (mean + std * rng.standard_normal((4096, 8))).astype(np.float32)
        xd = x.astype(np.float64)
        want = (xd - xd.mean(0)) / np.sqrt(xd.var(0) + EPS)
        y, _ = bn.forward(x, axis=-1, epsilon=EPS)
        a = (1 / np.sqrt(xd.var(0) + EPS)).astype(np.float32)
        b = (-xd.mean(0) * a).astype(np.float32)
        fold = a * x + b
        row = [np.abs(y - want).max(), np.abs(fold - want).max()]
        if torch is not None:
            t = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True, eps=EPS)
            row.append(np.abs(t.numpy() - want).max())
        cells = " ".join(f"{v:>9.2g}" for v in row)
        print(f"{mean:>8g} {std:>5g} {mean / std * 2**-24:>9.2g} {cells}")


if __name__ == "__main__":
    main()
