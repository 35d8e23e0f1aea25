"""A quick before/after measurement of batchnorm's passes, for working on the kernels.

Each repetition times one call next to a non-temporal copy of the same number of bytes
(``_core.copy_memory``, the library's own threads) and reports the median time and the
median of the per-repetition fractions of the copy limit (model bytes: moments 1B,
inference 2B, training forward 3B, backward 5B; B = bytes of x). Inputs rotate over at
least four buffers (more for small shapes) so every call starts from memory. Only
batchnorm is timed: for the comparison with PyTorch and NumPy, and for the published
table, use ``python -m batchnorm bench`` (docs/performance.md).

    python benchmarks/passes.py                       # every shape, float32, 2 threads
    python benchmarks/passes.py r50-56-nchw,dense-4096x1024 moments,forward,backward float16 1,2
    python benchmarks/passes.py 64x4096@-1,16x8192 inference float32 1 --in-cache
    python benchmarks/passes.py dense-256x4096 inference float32 1 --numpy-offset

A shape is a name of the table or dimensions with an optional feature axis
(``64x4096@-1``; the default axis is -1, channels last). ``--in-cache`` times the
arithmetic rather than the memory: one set of arrays, small enough to stay in cache,
called over and over; it prints microseconds per call (the best of 7 loops).
``--numpy-offset`` starts x, dy and the output 16 bytes past a cache line, where NumPy
puts its large arrays (glibc's block header), instead of on one.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import batchnorm as bn
from batchnorm import _core
from batchnorm.tools.bench import DEFAULT_SHAPES, parse_shapes
from batchnorm.tools.bench_cases import MODE_BYTES, _numpy_dtype

# The large shapes of the benchmark's own table (benchmarks/shapes.txt), and its byte model.
SHAPES = {s.name: (s.dims, s.axis) for s in parse_shapes(DEFAULT_SHAPES) if s.kind == "large"}
MODEL_BYTES = {"moments": 1, **MODE_BYTES}


def spaced(shape, dtype, k, fill=None, extra=0):
    """An array of its own pages whose start is 64 * (67 * k mod 1024) bytes into a page
    group: arrays allocated one after another on the heap lie a power of two plus a few
    bytes apart when their size is a power of two, and a pass whose output starts a few
    bytes after its input modulo a large power of two runs at a third of its speed here
    (copies too: docs/performance.md). `extra` bytes further on. Filled (touched: no page
    faults when timed)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    offset = 64 * (67 * k % 1024) + extra
    raw = np.empty(nbytes + offset + 4096, np.uint8)
    start = (-raw.ctypes.data) % 4096 + offset
    a = raw[start : start + nbytes].view(dtype).reshape(shape)
    a[...] = 1 if fill is None else fill
    return a


def make_calls(shape, axis, dtype, nbuf, extra=0):
    """nbuf sets of (x, dy, out), each `extra` bytes past a line, and, per mode, a call on set i."""
    rng = np.random.default_rng(0)
    xs = [spaced(shape, dtype, 3 * i, rng.standard_normal(shape, dtype=np.float32), extra) for i in range(nbuf)]
    dys = [spaced(shape, dtype, 3 * i + 1, rng.standard_normal(shape, dtype=np.float32), extra) for i in range(nbuf)]
    outs = [spaced(shape, dtype, 3 * i + 2, None, extra) for i in range(nbuf)]
    channels = shape[axis]
    mean, var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    stats = bn.forward(xs[0], gamma, beta, axis=axis, out=outs[0])[1]
    return {
        "moments": lambda i: bn.moments(xs[i], axis=axis),
        "inference": lambda i: bn.normalize(xs[i], mean, var, gamma, beta, axis=axis, out=outs[i]),
        "forward": lambda i: bn.forward(xs[i], gamma, beta, axis=axis, out=outs[i]),
        "backward": lambda i: bn.backward(dys[i], xs[i], stats, gamma, beta, axis=axis, out=outs[i]),
    }


def measure_in_cache(shape, axis, mode, dtype, threads, *, loops=7, extra=0):
    """Microseconds per call on one set of arrays (the best of `loops` loops of calls)."""
    bn.set_num_threads(threads)
    dtype = _numpy_dtype(dtype)
    call = make_calls(shape, axis, dtype, 1, extra)[mode]
    calls = max(20, int(2e7 // (int(np.prod(shape)) * np.dtype(dtype).itemsize)))
    best = float("inf")
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(calls):
            call(0)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def measure(shape, axis, mode, dtype, threads, *, repeats=11, warmup=2, extra=0):
    bn.set_num_threads(threads)
    dtype = _numpy_dtype(dtype)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    nbuf = max(4, int(512e6 // (3 * nbytes)))
    calls = make_calls(shape, axis, dtype, nbuf, extra)
    copies = [spaced((nbytes // 4,), np.float32, 3 * nbuf + i) for i in range(max(8, int(8e8 // nbytes)))]
    times, fractions = [], []
    for r in range(warmup + repeats):
        src, dst = copies[(2 * r) % len(copies)], copies[(2 * r + 1) % len(copies)]
        t0 = time.perf_counter()
        _core.copy_memory(src, dst, True)
        limit = 2 * nbytes / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        calls[mode](r % nbuf)
        elapsed = time.perf_counter() - t0
        if r >= warmup:
            times.append(elapsed)
            fractions.append(MODEL_BYTES[mode] * nbytes / elapsed / limit)
    return float(np.median(times)), float(np.median(fractions))


def shape_of(name: str) -> tuple[tuple[int, ...], int]:
    """A table shape by name, or dimensions with an optional axis: ``64x4096@-1``."""
    if name in SHAPES:
        return SHAPES[name]
    dims, _, axis = name.partition("@")
    try:
        return tuple(int(d) for d in dims.split("x")), int(axis or -1)
    except ValueError:
        raise SystemExit(f"unknown shape {name!r}: a name of {sorted(SHAPES)} or dimensions like 64x4096@-1") from None


def main(argv: list[str]) -> None:
    in_cache = "--in-cache" in argv
    extra = 16 if "--numpy-offset" in argv else 0
    argv = [a for a in argv if a not in ("--in-cache", "--numpy-offset")]
    names = argv[0].split(",") if argv and argv[0] != "all" else list(SHAPES)
    modes = argv[1].split(",") if len(argv) > 1 else ["inference", "forward", "backward"]
    dtypes = argv[2].split(",") if len(argv) > 2 else ["float32"]
    threads = [int(t) for t in argv[3].split(",")] if len(argv) > 3 else [2]
    print(f"batchnorm {bn.__version__}, ISA {bn.info()['simd']}")
    for nt in threads:
        for dtype in dtypes:
            for name in names:
                shape, axis = shape_of(name)
                for mode in modes:
                    if in_cache:
                        us = measure_in_cache(shape, axis, mode, dtype, nt, extra=extra)
                        print(f"{nt} threads  {dtype:8s} {name:16s} {mode:9s} {us:9.1f} us per call, in cache")
                        continue
                    t, f = measure(shape, axis, mode, dtype, nt, extra=extra)
                    print(f"{nt} threads  {dtype:8s} {name:16s} {mode:9s} {t * 1e3:8.3f} ms  {f:5.2f} of the limit")


if __name__ == "__main__":
    main(sys.argv[1:])
