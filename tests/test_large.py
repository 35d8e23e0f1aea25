"""Size (docs/reliability.md, "Size"): 64-bit indexing, and the memory a pass needs.

* More than 2**31 elements, and more than 2**31 values per channel, give the right
  statistics: zero-stride (np.broadcast_to) inputs in the default run, and a real 4 GiB
  float16 array in a test marked ``slow`` (CI runs it: the default ``pytest`` run
  includes slow tests; deselect locally with ``-m "not slow"``).
* Peak memory of forward and backward is the output plus O(threads x channels):
  measured in a fresh process, both the Python-visible allocations (tracemalloc, which
  NumPy reports its buffers to) and the resident set (VmHWM of /proc/self/status after
  resetting it through /proc/self/clear_refs), which also sees the C++ core's own
  allocations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import batchnorm as bn
import reference as ref

# ---- more than 2**31 elements, without the memory: zero strides -------------------------------

I32 = 2**31


@pytest.mark.parametrize(
    ("base_shape", "shape", "axis", "base_red"),
    [
        # channels-first: 513 copies of (4 channels x 2**20 values); 2**31 + 2**22 elements
        ((1, 4, 1 << 20), (513, 4, 1 << 20), 1, (0, 2)),
        # one channel, 2049 x 2**20 = 2**31 + 2**20 values in it (a count past 2**31)
        ((1, 1, 1 << 20), (2049, 1, 1 << 20), 1, (0, 2)),
        # channels-last rows: 32769 copies of a (4099, 16) block; row index past 2**27
        ((4099, 16), (32769, 4099, 16), -1, (0,)),
        # the broadcast axis innermost (stride 0 where the kernels would vectorize)
        ((3, 1 << 19, 1), (3, 1 << 19, 1366), 0, (1, 2)),
    ],
    ids=["channels-first", "one-channel", "channels-last", "zero-stride-inner"],
)
def test_moments_of_more_than_2_31_elements(base_shape, shape, axis, base_red):
    """Every broadcast axis is reduced, so each channel's statistics are those of the base."""
    rng = np.random.default_rng(sum(shape))
    base = rng.normal(3.0, 2.0, base_shape).astype(np.float32)
    x = np.broadcast_to(base, shape)
    assert x.size > I32
    mean, var = bn.moments(x, axis=axis)
    b64 = base.astype(np.float64)
    want_mean, want_var = b64.mean(axis=base_red), b64.var(axis=base_red)
    assert mean.shape == want_mean.shape
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-6 * float(np.abs(b64).max()))
    np.testing.assert_allclose(var, want_var, rtol=2e-6)


# ---- a real array of more than 2**31 elements ---------------------------------------------------


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
@pytest.mark.skipif(_mem_available() < 6 * 2**30, reason="needs 6 GiB of free memory (a 4 GiB float16 array)")
def test_float16_array_of_more_than_2_31_elements(restore_threads):
    """A 4 GiB float16 array, (262 000, 2, 4099) with the channels on axis 1: 2**31 +
    392 352 elements; the same memory seen as one channel holds them all. Filled with one
    (2, 4099) block repeated (its 8198 elements: no power of two divides the period, so an
    index that wrapped at 2**31 or 2**32 would read other values): the statistics are the
    block's, backward and forward (in place) give every block the output of the first,
    and the first block's outputs match the float64 reference."""
    bn.set_num_threads(max(2, bn.get_num_threads()))
    rng = np.random.default_rng(16)
    reps, period = 262_000, 4099
    block = rng.normal(20.0, 3.0, (2, period)).astype(np.float16)
    b64 = block.astype(np.float64)
    x = np.empty((reps, 2, period), np.float16)
    assert x.size > I32
    np.copyto(x, block)

    # moments: 2 channels; then all 2**31 + 392 352 values as one channel
    mean, var = bn.moments(x, axis=1)
    np.testing.assert_allclose(mean, b64.mean(1), rtol=1e-6)
    np.testing.assert_allclose(var, b64.var(1), rtol=1e-5)
    mean1, var1 = bn.moments(x.reshape(-1, 1), axis=-1)
    np.testing.assert_allclose(mean1, [b64.mean()], rtol=1e-6)
    np.testing.assert_allclose(var1, [b64.var()], rtol=1e-5)

    # blocks to compare with the first: the middle, the first past element 2**31, the last
    probes = [reps // 2, I32 // block.size + 1, reps - 1]
    assert probes[1] * block.size > I32
    count = reps * period

    # backward in place (out=x), dy repeating with the same period (a zero-stride view)
    eps = 1e-3
    inv_std = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
    stats = bn.BatchStats(mean, var, inv_std, count)
    dy_block = rng.standard_normal((2, period)).astype(np.float16)
    dy = np.broadcast_to(dy_block, x.shape)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, axis=1, out=x)
    assert dx is x
    g64 = dy_block.astype(np.float64)
    inv64 = inv_std.astype(np.float64)[:, None]
    x_hat = (b64 - mean.astype(np.float64)[:, None]) * inv64
    np.testing.assert_allclose(dbeta, reps * g64.sum(1), rtol=1e-5)
    np.testing.assert_allclose(dgamma, reps * (g64 * x_hat).sum(1), rtol=1e-5, atol=1e-4 * reps)
    rdx = inv64 * (g64 - dbeta.astype(np.float64)[:, None] / count - x_hat * dgamma.astype(np.float64)[:, None] / count)
    ref.assert_output_close(x[0], rdx, np.float16, name="dx, first block")
    for r in probes:
        assert x[r].tobytes() == x[0].tobytes(), f"dx of block {r} differs from block 0"

    # forward in place
    np.copyto(x, block)
    y, st = bn.forward(x, axis=1, epsilon=eps, out=x)
    assert y is x
    assert st.count == count
    np.testing.assert_allclose(st.mean, b64.mean(1), rtol=1e-6)
    np.testing.assert_allclose(st.variance, b64.var(1), rtol=1e-5)
    ry = (b64 - b64.mean(1, keepdims=True)) / np.sqrt(b64.var(1, keepdims=True) + eps)
    ref.assert_output_close(x[0], ry, np.float16, name="y, first block")
    for r in probes:
        assert x[r].tobytes() == x[0].tobytes(), f"y of block {r} differs from block 0"


# ---- peak memory: the output plus O(threads x channels) ---------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, tracemalloc
    import numpy as np
    import batchnorm as bn

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    cases, threads = json.loads(sys.argv[1])
    bn.set_num_threads(threads)
    results = {}
    for label, shape, axis in cases:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        _, st = bn.forward(x[:64], axis=axis)  # warm up: load every kernel, start the OpenMP team
        bn.backward(dy[:64], x[:64], st, axis=axis)
        for name in ("forward", "backward"):
            reset_peak()
            before = status()
            tracemalloc.start()
            if name == "forward":
                y, st = bn.forward(x, axis=axis)
            else:
                y, _, _ = bn.backward(dy, x, st, axis=axis)
            traced_now, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            after = status()
            results[f"{label}/{name}"] = {
                "output": y.nbytes,
                "traced_peak": traced_peak,
                "rss_growth": after["VmHWM"] - before["VmRSS"],
            }
            del y
        del x, dy
    print(json.dumps(results))
    """
)


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEMORY_CASES = [  # 64 MiB inputs (a stray copy of one would show as +64 MiB)
    ("channels-last", (1 << 20, 16), -1),
    ("channels-first", (32, 16, 1 << 15), 1),
    ("many-channels-last", (1 << 14, 1024), -1),
    ("many-channels-first", (8, 4096, 512), 1),
]


def test_peak_memory_is_the_output_plus_per_channel_scratch():
    threads = 8
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, json.dumps([MEMORY_CASES, threads])],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    results = json.loads(proc.stdout)
    rss = _clear_refs_works()
    for label, shape, axis in MEMORY_CASES:
        channels = shape[axis]
        # scratch the core may use: a few doubles per channel per thread, plus a margin for
        # the allocator's granularity and the small Python objects of the call
        scratch = threads * channels * 8 * 8 + (1 << 20)
        for name in ("forward", "backward"):
            r = results[f"{label}/{name}"]
            out = r["output"]
            assert out == 4 * int(np.prod(shape))
            # Python-visible allocations: the output and the per-channel results
            assert r["traced_peak"] <= out + 64 * channels + 65536, (label, name, r)
            if rss:  # resident growth, C++ scratch included: the output's pages plus the scratch
                assert r["rss_growth"] <= out + scratch + (2 << 20), (label, name, r, scratch)
    print(json.dumps(results, indent=1))  # the figures docs/reliability.md reports (pytest -s)
