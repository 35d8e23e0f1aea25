#!/usr/bin/env python
"""Coverage-guided fuzzing of the functional API: moments, normalize, forward, backward.

Run (atheris = libFuzzer for Python; ``pip install "batchnorm[fuzz]"``)::

    python tests/fuzz/fuzz_functional.py -max_total_time=60           # what CI runs
    python tests/fuzz/fuzz_functional.py -max_total_time=3600 corpus/ # a longer run, keeping a corpus
    python tests/fuzz/fuzz_functional.py crash-<sha1>                 # replay a finding

Any libFuzzer flag works (``-runs=N``, ``-jobs=N``, ``-seed=N``, ``-timeout=S``); this
script adds ``-timeout=30`` (an input running longer is reported as a hang) and
``-rss_limit_mb=4096`` unless given. A finding is written to ``crash-*`` / ``timeout-*``
in the current directory.

Each input decodes (structure-aware, from the fuzzer's bytes) into: a dtype (float16,
bfloat16, float32, float64); 1 to 5 dimensions of size 0 to 70 (mostly small, including
0 and 1; up to 2**18 elements, so that the threaded paths run); a memory layout - C or
Fortran order, a transpose, or an ``as_strided`` view with per-axis strides from -3 to
+3 elements, zero included, always inside its base buffer; the feature axes (int or
tuple, negative or not, sometimes out of range or repeated); the values (random with a
fuzzed offset and scale, sometimes constant, integer-valued or tiny) with NaN, +-inf,
subnormals, huge values and -0.0 planted at fuzzed places; gamma/beta (or None, maybe
with NaN), epsilon (0, tiny, normal, large; sometimes negative or NaN), the activation,
and ``out=`` (None, a fresh array in another layout, or in place).

Invariants checked on every input (a violation raises, which is a finding):

1. No crash and no hang (libFuzzer watches both: a signal, or -timeout).
2. Errors: a call raises only ValueError or TypeError, exactly when the input is
   invalid (ndim too small, axis out of range or repeated, epsilon negative or NaN, an
   empty batch in moments/forward, an out= that overlaps itself); valid inputs never raise.
3. Results have the documented shapes and dtypes (y/dx: x's; statistics: the kept
   axes' shape, float32 or float64 for float64 inputs; count = values per channel),
   ``out=`` is returned, and the inputs are not written (except an in-place out).
4. Per-channel isolation: for every channel whose values (x, dy, gamma, beta) are all
   finite and moderate (|v| <= 1e4, 1e3 for 16-bit; and a spread that is not lost to
   the rounding of the mean), the statistics and outputs match the float64 reference
   (tests/reference.py) within the test suite's tolerances (times 4), whatever the
   other channels hold. A channel holding a NaN has a NaN variance (IEEE).
5. Reproducibility: a second call gives the same bits.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    import batchnorm as bn
    from batchnorm import _functional  # noqa: F401  (instrumented: argument handling, checks)

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import reference as ref

DTYPES = [ref.F32, ref.F64, ref.F16, ref.BF16]
MAX_ELEMENTS = 1 << 18


class Finding(AssertionError):
    """An invariant does not hold."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Finding(what)


def finfo(dtype: np.dtype) -> Any:
    return ml_dtypes.finfo(dtype) if dtype == ref.BF16 else np.finfo(dtype)


# ---- decoding an input ---------------------------------------------------------------------------


def draw_shape(fdp: atheris.FuzzedDataProvider) -> tuple[int, ...]:
    ndim = fdp.ConsumeIntInRange(1, 5)
    shape = []
    for _ in range(ndim):
        kind = fdp.ConsumeIntInRange(0, 9)
        shape.append(fdp.ConsumeIntInRange(0, 1) if kind == 0 else fdp.ConsumeIntInRange(2, 7 if kind < 8 else 70))
    while math.prod(shape) > MAX_ELEMENTS:
        i = int(np.argmax(shape))
        shape[i] //= 2
    return tuple(shape)


def draw_strides(fdp: atheris.FuzzedDataProvider, shape: tuple[int, ...]) -> tuple[int, ...] | str:
    """A layout: 'c', 'f', 'T' (reversed axes of a C array), or per-axis strides in elements."""
    mode = fdp.ConsumeIntInRange(0, 5)
    if mode <= 2:
        return ("c", "f", "T")[mode]
    strides = []
    inner = 1
    for n in reversed(shape):  # mode 3: steps over a C layout; 4, 5: arbitrary small strides
        if mode == 3:
            step = fdp.PickValueInList([1, 1, 2, -1, -2, 0])
            strides.append(step * inner)
            inner *= max(n, 1) * max(abs(step), 1)
        else:
            strides.append(fdp.ConsumeIntInRange(-3, 3))
    return tuple(reversed(strides))


def make_array(base_values: np.ndarray, shape: tuple[int, ...], layout: tuple[int, ...] | str, dtype) -> np.ndarray:
    """An array of `shape` and `layout` whose elements are drawn from base_values (a view
    of a base buffer, never reaching outside it)."""
    n = math.prod(shape)
    if isinstance(layout, str):
        flat = np.resize(base_values, max(n, 1))[:n].astype(dtype).reshape(shape)
        if layout == "c":
            return np.ascontiguousarray(flat)
        if layout == "f":
            return np.asfortranarray(flat)
        return np.ascontiguousarray(flat.T).T
    lo = sum(s * (d - 1) for s, d in zip(layout, shape, strict=True) if s < 0 and d > 0)
    hi = sum(s * (d - 1) for s, d in zip(layout, shape, strict=True) if s > 0 and d > 0)
    size = hi - lo + 1 if n else 1
    base = np.resize(base_values, size).astype(dtype)
    item = base.itemsize
    return as_strided(base[-lo:] if n else base, shape=shape, strides=tuple(s * item for s in layout))


def draw_values(fdp: atheris.FuzzedDataProvider, count: int, dtype: np.dtype) -> np.ndarray:
    seed = fdp.ConsumeIntInRange(0, 2**32 - 1)
    rng = np.random.default_rng(seed)
    mode = fdp.ConsumeIntInRange(0, 5)
    loc = fdp.PickValueInList([0.0, 0.0, 1.0, -3.0, 100.0, 1e4, -1e3, 65000.0])
    scale = fdp.PickValueInList([1.0, 1.0, 0.1, 10.0, 1e-3, 1e3, 1e-6])
    count = max(count, 1)
    if mode == 0:
        v = np.full(count, loc)
    elif mode == 1:
        v = np.round(rng.normal(loc, scale, count))
    elif mode == 2:
        v = rng.uniform(-1, 1, count) * float(finfo(dtype).tiny) * 4
    else:
        v = rng.normal(loc, scale, count)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):  # plant special values
        special = fdp.PickValueInList(
            [np.nan, np.inf, -np.inf, -0.0, float(finfo(dtype).smallest_subnormal), float(finfo(dtype).max) / 2]
        )
        v[fdp.ConsumeIntInRange(0, count - 1)] = special
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(dtype).astype(np.float64)


def draw_axes(fdp: atheris.FuzzedDataProvider, ndim: int) -> tuple[Any, bool]:
    """(axis argument, valid)."""
    mode = fdp.ConsumeIntInRange(0, 11)
    if mode == 0:
        return ndim + fdp.ConsumeIntInRange(0, 2), False  # out of range
    if mode == 1 and ndim >= 1:
        a = fdp.ConsumeIntInRange(0, ndim - 1)
        return (a, a - ndim), False  # repeated
    if mode <= 5:
        a = fdp.ConsumeIntInRange(0, ndim - 1)
        return (a - ndim if fdp.ConsumeBool() else a), True
    k = fdp.ConsumeIntInRange(1, ndim)
    axes = sorted({fdp.ConsumeIntInRange(0, ndim - 1) for _ in range(k)})
    return tuple(a - ndim if fdp.ConsumeBool() else a for a in axes), True


def overlaps_itself(a: np.ndarray) -> bool:
    if a.size <= 1:
        return False
    offsets = np.zeros((), np.int64)
    for n, s in zip(a.shape, a.strides, strict=True):
        offsets = np.add.outer(offsets, np.arange(n, dtype=np.int64) * s)
    return bool((np.diff(np.sort(offsets, axis=None)) < a.itemsize).any())


# ---- the checks ----------------------------------------------------------------------------------


def channel_masks(x64: np.ndarray, axes: tuple[int, ...], dy64: np.ndarray | None, params: list, dtype) -> tuple:
    """(moderate, has_nan) per channel, in the kept shape."""
    red = tuple(d for d in range(x64.ndim) if d not in axes)
    bound = 1e3 if dtype in ref.HALF_DTYPES else 1e4
    # nonzero values near the bottom of the computing dtype's range make per-channel
    # coefficients (products of them) subnormal, which keep no relative precision
    low = 1e-290 if dtype == ref.F64 else 1e-30

    def moderate(v: np.ndarray) -> np.ndarray:
        a = np.abs(v)
        return np.isfinite(v) & (a <= bound) & ((a == 0) | (a >= low))

    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.all(moderate(x64), axis=red)
        nan = np.any(np.isnan(x64), axis=red) | np.any(np.isinf(x64), axis=red)
        if dy64 is not None:
            ok &= np.all(moderate(dy64), axis=red)
        for p in params:
            if p is not None:
                ok &= moderate(p.astype(np.float64)).reshape(ok.shape)
        # the spread must survive the rounding of the mean (else the reference's exact
        # deviations and the library's (x - rounded mean) differ by more than rounding)
        if x64.size and all(x64.shape[d] for d in red):
            mean = np.where(ok.reshape([x64.shape[d] if d in axes else 1 for d in range(x64.ndim)]), x64, 0).mean(
                axis=red
            )
            xs = np.where(np.isfinite(x64), x64, 0)
            spread = xs.max(axis=red) - xs.min(axis=red)
            half_ulp = 2.0**-24 if dtype != ref.F64 else 2.0**-53
            ok &= (spread == 0) | (spread > np.abs(mean) * half_ulp * 1e4)
    return ok, nan


def close(
    got: np.ndarray, want: np.ndarray, rtol: float, scale: float, atol: Any, what: str, big: float = np.inf
) -> None:
    """|got - want| <= rtol*(|want| + scale) + atol, where |want| is within the output
    dtype's range `big` (beyond it the output is an infinity of the right sign)."""
    g = np.asarray(got, np.float64)
    w = np.asarray(want, np.float64)
    tol = rtol * (np.abs(w) + scale) + atol
    overflow = np.abs(w) > big
    if (overflow & ~((g == np.sign(w) * np.inf) | (np.abs(g) >= big * 0.99))).any():
        raise Finding(f"{what}: a value beyond the dtype's range is not an infinity of its sign")
    bad = ~(np.abs(g - w) <= tol) & ~(np.isnan(g) & np.isnan(w)) & ~overflow
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise Finding(f"{what}: got {g[i]!r}, expected {w[i]!r} at {i} (tol {np.broadcast_to(tol, g.shape)[i]:.3g})")


def per_channel_view(a: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """a (data-shaped) with the kept axes first, flattened to (channels, rest)."""
    red = tuple(d for d in range(len(shape)) if d not in axes)
    moved = np.transpose(a, axes + red)
    c = math.prod(shape[d] for d in axes)
    return moved.reshape(c, -1)


def ulp(want: np.ndarray, dtype) -> np.ndarray | float:
    """One unit in the last place of the output dtype at the reference values (an output
    rounds to within half of one; subnormals have a fixed spacing)."""
    if dtype in ref.HALF_DTYPES:
        return ref.spacing16(want, dtype)
    # near and below the smallest normal, intermediate results lose their relative precision
    return np.spacing(np.abs(want).astype(dtype)).astype(np.float64) + float(finfo(dtype).tiny) * 2.0**-16


def rtols(dtype) -> tuple[float, float]:
    """(statistics, outputs) relative tolerances: the suite's, times 4."""
    if dtype == ref.F64:
        return 4e-12, 4e-12
    if dtype == ref.F32:
        return 4e-6, 4e-5
    return 4e-6, 4 * 2.0 ** -(8 if dtype == ref.BF16 else 11)


_CASE: dict[str, Any] = {}  # what the current input decoded to, for the report of a finding
_ARRAYS: dict[str, Any] = {}  # its arrays: saved to $BATCHNORM_FUZZ_DUMP (.npz) with a finding


def TestOneInput(data: bytes) -> None:  # atheris's name
    _CASE.clear()
    try:
        with np.errstate(all="ignore"):  # the references meet NaN/inf on purpose
            one_input(atheris.FuzzedDataProvider(data))
    except Exception as e:
        dump = os.environ.get("BATCHNORM_FUZZ_DUMP")
        if dump:
            np.savez(dump, **{k: v for k, v in _ARRAYS.items() if v is not None}, case=np.array(repr(_CASE)))
        raise Finding(f"{type(e).__name__}: {e}\n  input: {_CASE}") from e


def one_input(fdp: atheris.FuzzedDataProvider) -> None:
    dtype = fdp.PickValueInList(DTYPES)
    shape = draw_shape(fdp)
    ndim = len(shape)
    x = make_array(draw_values(fdp, 4096, dtype), shape, draw_strides(fdp, shape), dtype)
    axis, axes_valid = draw_axes(fdp, ndim)
    fn = fdp.PickValueInList(["moments", "normalize", "forward", "backward"])
    eps = fdp.PickValueInList([1e-3, 1e-5, 0.0, 1.0, 1e-12, 10.0, -1e-3, float("nan")])
    relu = fdp.ConsumeBool() and fn != "moments"
    axes = tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))) if axes_valid else ()
    kept = tuple(shape[a] for a in axes)
    channels = math.prod(kept)
    sdt = ref.stat_dtype(dtype)

    def param() -> np.ndarray | None:
        if not fdp.ConsumeBool():
            return None
        v = draw_values(fdp, max(channels, 1), np.dtype(sdt))[: max(channels, 1)]
        return v[:channels].astype(sdt).reshape(kept) if channels else np.zeros(kept, sdt)

    gamma = param() if fn != "moments" and axes_valid else None
    beta = param() if fn != "moments" and axes_valid else None
    dy = None
    if fn == "backward":
        dy = make_array(draw_values(fdp, 4096, dtype), shape, draw_strides(fdp, shape), dtype)
    mean_in = var_in = None
    if fn == "normalize" and axes_valid:
        mean_in = param()
        var_in = param()
        if mean_in is None:
            mean_in = np.zeros(kept, sdt)
        if var_in is None:
            var_in = np.ones(kept, sdt)
        var_in = np.abs(var_in).astype(sdt)
    out_mode = fdp.ConsumeIntInRange(0, 3) if fn != "moments" else 0
    _CASE.update(fn=fn, dtype=dtype.name, shape=shape, x_strides=x.strides, axis=axis, eps=eps, relu=relu,
                 gamma=gamma is not None, beta=beta is not None, out_mode=out_mode)  # fmt: skip

    # What the call must do: raise (and what), or succeed.
    red_sizes = [shape[d] for d in range(ndim) if d not in axes]
    invalid: type[Exception] | None = None
    if (
        ndim < (1 if fn == "normalize" else 2)
        or not axes_valid
        or (fn in ("normalize", "forward") and not (eps >= 0))  # negative or NaN
        or (fn in ("moments", "forward") and 0 in red_sizes)  # empty batch
    ):
        invalid = ValueError

    stats = None
    if fn == "backward" and invalid is None:
        st_mean, st_var = ref.moments_ref(x, axes) if x.size and 0 not in red_sizes else (np.zeros(kept), np.ones(kept))
        with np.errstate(all="ignore"):
            inv = (1.0 / np.sqrt(st_var + 1e-3)).astype(sdt)
        stats = bn.BatchStats(st_mean.astype(sdt), st_var.astype(sdt), inv, math.prod(red_sizes))
    elif fn == "backward":
        stats = bn.BatchStats(
            np.zeros(max(channels, 1), sdt), np.ones(max(channels, 1), sdt), np.ones(max(channels, 1), sdt), 1
        )

    out = None
    if out_mode == 1:
        out = np.empty(shape, dtype, order="F")
    elif out_mode == 2:
        big = np.empty(tuple(2 * max(n, 1) for n in shape), dtype)
        out = big[tuple(slice(None, None, -2) for _ in shape)][tuple(slice(0, n) for n in shape)]
    elif out_mode == 3 and x.flags.writeable:
        out = x if fn != "backward" or not fdp.ConsumeBool() else dy
        if invalid is None and overlaps_itself(out):
            invalid = ValueError

    x_before = x.copy()
    dy_before = None if dy is None else dy.copy()
    _ARRAYS.clear()
    _ARRAYS.update(x=x_before, dy=dy_before, gamma=gamma, beta=beta, mean=mean_in, variance=var_in)
    if stats is not None:
        _ARRAYS.update(stats_mean=stats.mean, stats_inv_std=stats.inv_std)

    def call() -> Any:
        if fn == "moments":
            return bn.moments(x, axis=axis)
        if fn == "normalize":
            return bn.normalize(x, mean_in, var_in, gamma, beta, axis=axis, epsilon=eps,
                                activation="relu" if relu else None, out=out)  # fmt: skip
        if fn == "forward":
            return bn.forward(x, gamma, beta, axis=axis, epsilon=eps, activation="relu" if relu else None, out=out)
        return bn.backward(dy, x, stats, gamma, beta, axis=axis, activation="relu" if relu else None, out=out)

    try:
        result = call()
    except (ValueError, TypeError) as e:
        if invalid is None:
            raise Finding(f"{fn} raised on a valid input: {type(e).__name__}: {e}") from e
        if not isinstance(e, invalid):
            raise Finding(f"{fn} raised {type(e).__name__} ({e}), expected {invalid.__name__}") from e
        return
    if invalid is not None:
        raise Finding(f"{fn} accepted an invalid input ({invalid.__name__} expected)")

    # 3. shapes, dtypes, out=, inputs untouched
    in_place = out is not None and (out is x or out is dy)
    if not in_place:
        check(x.tobytes() == x_before.tobytes(), "x was written")
        if dy is not None:
            check(dy.tobytes() == dy_before.tobytes(), "dy was written")
    x_in = x_before.astype(np.float64)
    dy_in = None if dy_before is None else dy_before.astype(np.float64)
    if fn == "moments":
        mean, var = result
        for s in (mean, var):
            check(s.shape == kept and s.dtype == sdt, f"moments: statistics {s.shape} {s.dtype}")
        outputs = {"mean": mean, "var": var}
    elif fn == "normalize":
        y = result
        check(y.shape == shape and y.dtype == dtype, "normalize: y shape/dtype")
        check(out is None or y is out, "normalize: out= not returned")
        outputs = {"y": y}
    elif fn == "forward":
        y, st = result
        check(y.shape == shape and y.dtype == dtype, "forward: y shape/dtype")
        check(out is None or y is out, "forward: out= not returned")
        for s in (st.mean, st.variance, st.inv_std):
            check(s.shape == kept and s.dtype == sdt, "forward: statistics shape/dtype")
        check(type(st.count) is int and st.count == math.prod(red_sizes), "forward: count")
        outputs = {"y": y, "mean": st.mean, "var": st.variance, "inv_std": st.inv_std}
    else:
        dx, dg, db = result
        check(dx.shape == shape and dx.dtype == dtype, "backward: dx shape/dtype")
        check(out is None or dx is out, "backward: out= not returned")
        for s in (dg, db):
            check(s.shape == kept and s.dtype == sdt, "backward: dgamma/dbeta shape/dtype")
        outputs = {"dx": dx, "dgamma": dg, "dbeta": db}

    # 5. reproducible (not for in-place calls, whose input is gone)
    if not in_place and fdp.ConsumeIntInRange(0, 3) == 0:
        again = call()
        flat = again if isinstance(again, tuple) else (again,)
        flat = [a for v in flat for a in (v[:3] if isinstance(v, bn.BatchStats) else (v,))]
        first = result if isinstance(result, tuple) else (result,)
        first = [a for v in first for a in (v[:3] if isinstance(v, bn.BatchStats) else (v,))]
        for a, b in zip(flat, first, strict=True):
            check(a.tobytes() == b.tobytes(), f"{fn}: a second call gave other bits")

    # 4. the reference, channel by channel
    if channels == 0 or x.size == 0:
        return
    ok, has_nan = channel_masks(x_in, axes, dy_in, [gamma, beta, mean_in, var_in], dtype)
    if fn in ("moments", "forward"):
        var = outputs["var"]
        check(bool(np.all(np.isnan(var[has_nan]))), f"{fn}: a channel with NaN/inf has a non-NaN variance")
    if not ok.any():
        return
    rtol_s, rtol_y = rtols(dtype)
    e = eps if fn != "backward" else 1e-3
    if fn in ("moments", "forward"):
        m, v = moments64(x_in, axes)
        xmax = float(np.abs(per_channel_view(x_in, shape, axes)[ok.reshape(-1)]).max())
        tiny = 2 * float(np.finfo(sdt).tiny)  # below it, the statistics dtype has no relative precision
        close(outputs["mean"][ok], m[ok], rtol_s, xmax, tiny, f"{fn}: mean")
        # (the float64 reference's own mean is off by a few ulp of |x|, which it squares)
        close(outputs["var"][ok], v[ok], rtol_s * 2, 0.0, tiny + (64 * 2.0**-52 * xmax) ** 2, f"{fn}: variance")
    if fn in ("forward", "normalize"):
        if fn == "forward":
            r = forward64(x_in, gamma, beta, axes, e, relu)
            want, pre, var_used = r.y, r.pre, outputs["var"].astype(np.float64)  # (0 exactly for constants)
        else:
            want = ref.normalize_ref(x_in, mean_in, var_in, gamma, beta, axis=axes, epsilon=e, relu=relu)
            pre = ref.normalize_ref(x_in, mean_in, var_in, gamma, beta, axis=axes, epsilon=e, relu=False)
            var_used = var_in.astype(np.float64)
        # var + epsilon below the statistics dtype's normal range (epsilon 0, subnormal data):
        # the stored variance underflows and 1/sqrt of it is inf, as IEEE float32 has it
        ok = ok & ((var_used + e) >= float(np.finfo(sdt).tiny))
        if not ok.any():
            return
        got_c = per_channel_view(outputs["y"].astype(np.float64), shape, axes)[ok.reshape(-1)]
        want_c = per_channel_view(want, shape, axes)[ok.reshape(-1)]
        pre_c = per_channel_view(pre, shape, axes)[ok.reshape(-1)]
        if relu:  # where the pre-activation is within rounding of 0, either side is right
            amb = np.abs(pre_c) <= 1e-4 * (np.abs(pre_c).max() + 1)
            got_c = np.where(amb, want_c, got_c)
        scale = float(np.abs(want_c).max()) if want_c.size else 1.0
        if fn == "forward":
            atol = _y_atol(x_in, r.mean, r.var, gamma, beta, axes, e, ok, dtype)
        else:
            atol = _y_atol(x_in, mean_in, var_in, gamma, beta, axes, e, ok, dtype)
        big = float(finfo(dtype).max)
        close(got_c, want_c, rtol_y, scale, atol + 4 * ulp(want_c, dtype), f"{fn}: y", big)
    if fn == "backward":
        if relu:
            return  # the mask comes from the library's rounded statistics: covered by the test suite
        rdx, rdg, rdb, bound = _backward_ref(dy_in, x_in, stats, gamma, axes)
        sel = ok.reshape(-1)
        got_c = per_channel_view(outputs["dx"].astype(np.float64), shape, axes)[sel]
        want_c = per_channel_view(rdx, shape, axes)[sel]
        u = 2.0**-53 if dtype == ref.F64 else 2.0**-24
        bound_c = per_channel_view(np.broadcast_to(bound, shape), shape, axes)[sel]
        big = float(finfo(dtype).max)
        close(got_c, want_c, rtol_y, 0.0, 16 * u * float(bound_c.max()) + 4 * ulp(want_c, dtype), "backward: dx", big)
        # sums that cancel: errors relative to the sum of the magnitudes (per channel)
        red = tuple(d for d in range(ndim) if d not in axes)
        b_shape = tuple(shape[d] if d in axes else 1 for d in range(ndim))
        x_hat = (x_in - stats.mean.astype(np.float64).reshape(b_shape)) * stats.inv_std.astype(np.float64).reshape(
            b_shape
        )
        mag_g = np.abs(dy_in * x_hat).sum(axis=red).reshape(kept)
        mag_b = np.abs(dy_in).sum(axis=red).reshape(kept)
        for name, got, want, mag in (
            ("dgamma", outputs["dgamma"], rdg, mag_g),
            ("dbeta", outputs["dbeta"], rdb, mag_b),
        ):
            atol = rtol_s * 4 * mag[ok] + 2 * float(np.finfo(sdt).tiny)
            close(got[ok], want[ok], rtol_s * 4, 0.0, atol, f"backward: {name}")


def moments64(x64: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance in float64, the mean refined once
    (mean + mean(x - mean)): np.mean alone is off by ~n ulp of |mean| (1e-11 relative for
    1e5 values near 1000), which a mean/std of 1e6 turns into a visible error of y."""
    red = tuple(d for d in range(x64.ndim) if d not in axes)
    m0 = x64.mean(axis=red, keepdims=True)
    m = m0 + (x64 - m0).mean(axis=red, keepdims=True)
    v = ((x64 - m) ** 2).mean(axis=red, keepdims=True)
    kept = tuple(x64.shape[a] for a in axes)
    return m.reshape(kept), v.reshape(kept)


def forward64(x64, gamma, beta, axes, eps, relu):  # the reference's forward_ref, with moments64
    m, v = moments64(x64, axes)
    b = tuple(x64.shape[d] if d in axes else 1 for d in range(x64.ndim))
    inv = 1.0 / np.sqrt(v + eps)
    g = 1.0 if gamma is None else gamma.astype(np.float64).reshape(b)
    be = 0.0 if beta is None else beta.astype(np.float64).reshape(b)
    pre = g * (x64 - m.reshape(b)) * inv.reshape(b) + be
    return ref.RefForward(np.maximum(pre, 0.0) if relu else pre, m, v, inv, 0, pre, None)


def _y_atol(x64, mean, var, gamma, beta, axes, eps, ok, dtype) -> float:
    """What y = gamma*(x - mean)*inv_std + beta may lose to arithmetic in the statistics
    dtype (float32 for all but float64 data): a few units of its last place in each term."""
    u = 2.0**-53 if dtype == ref.F64 else 2.0**-24
    b = tuple(x64.shape[d] if d in axes else 1 for d in range(x64.ndim))
    with np.errstate(all="ignore"):
        inv = 1.0 / np.sqrt(np.asarray(var, np.float64).reshape(b) + eps)
        g = 1.0 if gamma is None else np.abs(gamma.astype(np.float64)).reshape(b)
        be = 0.0 if beta is None else np.abs(beta.astype(np.float64)).reshape(b)
        m = np.abs(np.asarray(mean, np.float64)).reshape(b)
        term = g * inv * (np.abs(x64) + m) + be
    sel = np.broadcast_to(ok.reshape(b), x64.shape)
    t = term[sel]
    return float(t.max()) * u * 16 if t.size else 0.0


def _backward_ref(dy64, x64, stats, gamma, axes):
    """dx, dgamma, dbeta in float64 from the given (rounded) statistics - the gradient of
    forward at those statistics - and the magnitude of the terms dx is made of."""
    shape = x64.shape
    red = tuple(d for d in range(x64.ndim) if d not in axes)
    b = tuple(shape[d] if d in axes else 1 for d in range(x64.ndim))
    mean = stats.mean.astype(np.float64).reshape(b)
    inv = stats.inv_std.astype(np.float64).reshape(b)
    g = 1.0 if gamma is None else gamma.astype(np.float64).reshape(b)
    x_hat = (x64 - mean) * inv
    n = math.prod(shape[d] for d in red)
    db = dy64.sum(axis=red)
    dg = (dy64 * x_hat).sum(axis=red)
    dx = g * inv * (dy64 - db.reshape(b) / n - x_hat * dg.reshape(b) / n)
    bound = np.abs(g * inv) * (np.abs(dy64) + np.abs(db.reshape(b)) / n + np.abs(x_hat * dg.reshape(b)) / n)
    bound = bound + np.abs(g * inv * inv * dg.reshape(b) / n) * (np.abs(x64) + np.abs(mean))
    # the rounding of the two sums (in any order): ~sqrt(n) ulps of the sums of magnitudes
    sum_dy = np.abs(dy64).sum(axis=red, keepdims=True)
    sum_gx = np.abs(dy64 * x_hat).sum(axis=red, keepdims=True)
    bound = bound + np.abs(g * inv) * (sum_dy + np.abs(x_hat) * sum_gx) / n * math.sqrt(n)
    return dx, dg.reshape(stats.mean.shape), db.reshape(stats.mean.shape), bound


def main() -> None:
    argv = list(sys.argv)
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=30")
    if not any(a.startswith("-rss_limit_mb=") for a in argv):
        argv.append("-rss_limit_mb=4096")
    bn.set_num_threads(max(2, bn.get_num_threads()))
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
