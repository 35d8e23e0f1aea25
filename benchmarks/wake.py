"""What a call costs when the machine has been idle: the fixed price every library pays
in ``python -m batchnorm bench``, whose 12 ms sleep before each call lets OpenMP's idle
threads fall asleep (libgomp spins for a few milliseconds, then waits in the kernel).

For a small input (256 KiB: just enough for two threads) and the benchmark's dense-256x4096
(4 MiB), times batchnorm's inference and PyTorch's, at 1 and 2 threads, back to back and
after a sleep, with a non-temporal copy of the same bytes beside them, and prints medians:

    python benchmarks/wake.py            # 12 ms sleeps, 41 repetitions
    python benchmarks/wake.py 5 101      # 5 ms sleeps, 101 repetitions
"""

from __future__ import annotations

import sys
import time

import numpy as np

import batchnorm as bn
from batchnorm import _core


def make_calls(dims: tuple[int, int], torch) -> tuple[dict, int]:
    """The calls on buffer i (a copy, batchnorm, PyTorch if given) and how many buffers."""
    count = max(8, int(256e6 // (4 * dims[0] * dims[1])))  # rotate over 256 MB: from memory
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(dims, dtype=np.float32) for _ in range(count)]
    outs = [np.ones_like(x) for x in xs]
    m, v = np.zeros(dims[1], np.float32), np.ones(dims[1], np.float32)
    g, b = np.ones(dims[1], np.float32), np.zeros(dims[1], np.float32)
    calls = {
        "copy": lambda i: _core.copy_memory(xs[i], outs[i], True),
        "batchnorm": lambda i: bn.normalize(xs[i], m, v, g, b, axis=1, out=outs[i]),
    }
    if torch is not None:
        tx = [torch.from_numpy(x) for x in xs]
        tm, tv, tg, tb = (torch.from_numpy(a) for a in (m, v, g, b))
        calls["torch"] = lambda i: torch.nn.functional.batch_norm(tx[i], tm, tv, tg, tb, False, 0.0, 1e-3)
    return calls, count


def medians(calls: dict, count: int, sleep: float, repeats: int) -> dict[str, float]:
    """Median seconds per call, the calls taken in turn, each after `sleep` seconds."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    i = 0
    for _ in range(repeats + 2):  # two untimed
        for name, call in calls.items():
            if sleep:
                time.sleep(sleep)
            t0 = time.perf_counter()
            call(i % count)
            times[name].append(time.perf_counter() - t0)
            i += 1
    return {k: float(np.median(t[2:])) for k, t in times.items()}


def main(argv: list[str]) -> None:
    gap = float(argv[0]) / 1e3 if argv else 0.012
    repeats = int(argv[1]) if len(argv) > 1 else 41
    try:
        import torch
    except ImportError:
        torch = None
    print(f"batchnorm {bn.__version__}, ISA {bn.info()['simd']}; medians of {repeats}; microseconds")
    for dims in ((16, 4096), (256, 4096)):
        calls, count = make_calls(dims, torch)
        for threads in (1, 2):
            bn.set_num_threads(threads)
            if torch is not None:
                torch.set_num_threads(threads)
            for sleep in (0.0, gap):
                cells = "  ".join(f"{k} {t * 1e6:7.1f}" for k, t in medians(calls, count, sleep, repeats).items())
                print(f"{dims[0]}x{dims[1]}  {threads} threads  sleep {sleep * 1e3:4.1f} ms:  {cells}")


if __name__ == "__main__":
    main(sys.argv[1:])
