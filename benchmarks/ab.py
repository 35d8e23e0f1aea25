"""Two builds of batchnorm in one process, called alternately: is the second slower?

For kernel and schedule work, where a change of a few percent must be told from the
drift of this machine's memory bandwidth over minutes (which moves whole runs of
``python -m batchnorm bench`` by 10-30%). Both compiled cores are loaded side by side
and each repetition times A then B, or B then A (alternating), on buffers rotated over
1 GiB (so every call reads memory), so drift hits both alike. Prints, per row, the
median over repetitions of time(B)/time(A).
Runs in both load orders are averaged by the caller: a build loaded second can be a
little slower (about 1-2%) in a before-against-before run.

    python benchmarks/ab.py BEFORE_SITE AFTER_SITE [shapes] [modes] [dtypes] [--reps 40]

BEFORE_SITE and AFTER_SITE are directories holding an installed ``batchnorm`` package
(e.g. two virtual environments' site-packages). Shapes, modes and dtypes are
comma-separated as in benchmarks/passes.py (default: every large shape of the bench,
inference/forward/backward, float32).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import statistics
import sys
import time
from types import ModuleType

import numpy as np

from batchnorm.tools.bench import DEFAULT_SHAPES, parse_shapes
from batchnorm.tools.bench_cases import _numpy_dtype

SHAPES = {s.name: (s.dims, s.axis) for s in parse_shapes(DEFAULT_SHAPES) if s.kind == "large"}


def load_core(site: str, tag: str) -> ModuleType:
    """The compiled core of the batchnorm installed under site, as module `tag`._core."""
    (path,) = glob.glob(os.path.join(site, "batchnorm", "_core*.so"))
    spec = importlib.util.spec_from_file_location(f"{tag}._core", path)  # PyInit__core either way
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calls(core: ModuleType, bufs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], axis: int) -> dict[str, object]:
    """Per mode, a call of `core` on buffer set i: (x, dy, out)."""
    x0 = bufs[0][0]
    axes = [axis % x0.ndim]
    c = x0.shape[axis]
    sdt = np.float64 if x0.dtype == np.float64 else np.float32
    mean, var, inv = np.zeros(c, sdt), np.ones(c, sdt), np.ones(c, sdt)
    gamma, beta = np.ones(c, sdt), np.zeros(c, sdt)
    dg, db = np.empty(c, sdt), np.empty(c, sdt)
    core.forward(x0, bufs[0][2], axes, gamma, beta, 1e-5, False, mean, var, inv)
    return {
        "inference": lambda i: core.normalize(bufs[i][0], bufs[i][2], axes, mean, var, gamma, beta, 1e-5, False),
        "forward": lambda i: core.forward(bufs[i][0], bufs[i][2], axes, gamma, beta, 1e-5, False, mean, var, inv),
        "backward": lambda i: core.backward(
            bufs[i][1], bufs[i][0], bufs[i][2], axes, mean, inv, gamma, beta, False, dg, db
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("shapes", nargs="?", default=",".join(SHAPES))
    p.add_argument("modes", nargs="?", default="inference,forward,backward")
    p.add_argument("dtypes", nargs="?", default="float32")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cores = (load_core(args.a, "a"), load_core(args.b, "b"))
    for core in cores:
        core.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'shape':<17}{'dtype':<10}{'mode':<11}{'A ms':>8}{'B ms':>8}{'B/A':>7}")
    for name in args.shapes.split(","):
        dims, axis = SHAPES[name]
        for dtype in args.dtypes.split(","):
            dt = _numpy_dtype(dtype)
            x = rng.standard_normal(dims, dtype=np.float32).astype(dt)
            # buffer sets spanning 1 GiB, rotated, so that every call starts from memory
            nbuf = max(4, -(-(1 << 30) // x.nbytes))
            bufs = [
                (x.copy(), rng.standard_normal(dims, dtype=np.float32).astype(dt), np.ones_like(x)) for _ in range(nbuf)
            ]
            per_core = [calls(core, bufs, axis) for core in cores]
            for mode in args.modes.split(","):
                times: list[list[float]] = [[], []]
                for rep in range(args.reps + 2):
                    order = (0, 1) if rep % 2 == 0 else (1, 0)
                    for k in order:
                        i = (2 * rep + k) % nbuf
                        time.sleep(0.012)  # no OpenMP thread left spinning from the call before
                        t = time.perf_counter()
                        per_core[k][mode](i)  # type: ignore[operator]
                        if rep >= 2:
                            times[k].append(time.perf_counter() - t)
                ratio = statistics.median(b / a for a, b in zip(times[0], times[1], strict=True))
                ta, tb = (statistics.median(t) * 1e3 for t in times)
                print(f"{name:<17}{dtype:<10}{mode:<11}{ta:>8.3f}{tb:>8.3f}{ratio:>7.3f}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
