"""An independent float64 NumPy reference for batch normalization, and test helpers.

Nothing here calls batchnorm: every formula is written out from the definition
below in float64, from the exact values of the (possibly 16-bit) inputs.

    x_hat = (x - mean) * inv_std,   inv_std = 1 / sqrt(var + eps)   (var biased)
    y     = act(gamma * x_hat + beta)
    g     = dy * (gamma * x_hat + beta > 0)  for relu, else dy
    dx    = gamma * inv_std * (g - mean(g) - x_hat * mean(g * x_hat))
    dgamma = sum(g * x_hat),  dbeta = sum(g)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
ALL_DTYPES = (F32, F64, F16, BF16)
HALF_DTYPES = (F16, BF16)

# Stored mantissa bits and smallest subnormal exponent of the 16-bit formats.
_MANTISSA = {F16: 10, BF16: 7}
_MIN_SPACING_EXP = {F16: -24, BF16: -133}


def canon_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """The feature axes, non-negative and sorted."""
    items = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    return tuple(sorted(operator.index(a) % ndim for a in items))


def reduced_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    kept = canon_axes(axis, ndim)
    return tuple(d for d in range(ndim) if d not in kept)


def kept_shape(shape: Sequence[int], axis: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[a] for a in canon_axes(axis, len(shape)))


def bcast_shape(shape: Sequence[int], axis: int | Sequence[int]) -> tuple[int, ...]:
    """The keepdims shape: the kept axes' sizes, 1 elsewhere."""
    kept = canon_axes(axis, len(shape))
    return tuple(s if d in kept else 1 for d, s in enumerate(shape))


def stat_dtype(dtype: np.dtype) -> np.dtype:
    return F64 if np.dtype(dtype) == F64 else F32


def f64(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a).astype(np.float64)


def _per_channel(p: np.ndarray | None, shape: Sequence[int], axis, default: float) -> np.ndarray:
    b = bcast_shape(shape, axis)
    if p is None:
        return np.full(b, default)
    return np.asarray(p, dtype=np.float64).reshape(b)


class RefForward(NamedTuple):
    y: np.ndarray
    mean: np.ndarray  # kept shape
    var: np.ndarray
    inv_std: np.ndarray
    count: int
    pre: np.ndarray  # gamma * x_hat + beta, before the activation
    x_hat: np.ndarray


def moments_ref(x, axis) -> tuple[np.ndarray, np.ndarray]:
    xd = f64(x)
    red = reduced_axes(axis, xd.ndim)
    mean = xd.mean(axis=red, keepdims=True)
    var = ((xd - mean) ** 2).mean(axis=red, keepdims=True)
    kept = kept_shape(xd.shape, axis)
    return mean.reshape(kept), var.reshape(kept)


def normalize_ref(x, mean, var, gamma=None, beta=None, *, axis=-1, epsilon=1e-3, relu=False) -> np.ndarray:
    xd = f64(x)
    if xd.ndim == 1:
        xd2 = xd.reshape(1, -1)
        return normalize_ref(xd2, mean, var, gamma, beta, axis=1, epsilon=epsilon, relu=relu).reshape(xd.shape)
    m = _per_channel(mean, xd.shape, axis, 0.0)
    v = _per_channel(var, xd.shape, axis, 1.0)
    g = _per_channel(gamma, xd.shape, axis, 1.0)
    b = _per_channel(beta, xd.shape, axis, 0.0)
    pre = g * (xd - m) / np.sqrt(v + epsilon) + b
    return np.maximum(pre, 0.0) if relu else pre


def forward_ref(x, gamma=None, beta=None, *, axis=-1, epsilon=1e-3, relu=False) -> RefForward:
    xd = f64(x)
    mean, var = moments_ref(xd, axis)
    inv_std = 1.0 / np.sqrt(var + epsilon)
    b_shape = bcast_shape(xd.shape, axis)
    x_hat = (xd - mean.reshape(b_shape)) * inv_std.reshape(b_shape)
    pre = _per_channel(gamma, xd.shape, axis, 1.0) * x_hat + _per_channel(beta, xd.shape, axis, 0.0)
    y = np.maximum(pre, 0.0) if relu else pre
    count = int(np.prod([xd.shape[d] for d in reduced_axes(axis, xd.ndim)], dtype=np.int64))
    return RefForward(y, mean, var, inv_std, count, pre, x_hat)


def backward_ref(dy, x, gamma=None, beta=None, *, axis=-1, epsilon=1e-3, relu=False):
    """(dx, dgamma, dbeta) of forward_ref with the batch's own statistics, in float64."""
    xd = f64(x)
    fw = forward_ref(xd, gamma, beta, axis=axis, epsilon=epsilon, relu=relu)
    red = reduced_axes(axis, xd.ndim)
    b_shape = bcast_shape(xd.shape, axis)
    g = f64(dy)
    if relu:
        g = np.where(fw.pre > 0, g, 0.0)
    gam = _per_channel(gamma, xd.shape, axis, 1.0)
    mean_g = g.mean(axis=red, keepdims=True)
    mean_gx = (g * fw.x_hat).mean(axis=red, keepdims=True)
    dx = gam * fw.inv_std.reshape(b_shape) * (g - mean_g - fw.x_hat * mean_gx)
    kept = kept_shape(xd.shape, axis)
    dgamma = (g * fw.x_hat).sum(axis=red).reshape(kept)
    dbeta = g.sum(axis=red).reshape(kept)
    return dx, dgamma, dbeta


def dx_scale(dy, x, gamma=None, *, axis=-1, epsilon=1e-3) -> float:
    """The magnitude of the terms dx is made of: max |gamma * inv_std * dy| (dx itself may
    cancel to ~0, e.g. with one value per channel)."""
    fw = forward_ref(x, axis=axis, epsilon=epsilon)
    a = _per_channel(gamma, np.shape(x), axis, 1.0) * fw.inv_std.reshape(bcast_shape(np.shape(x), axis))
    return float(np.max(np.abs(a * f64(dy)))) if np.size(x) else 1.0


def mean_rounding_atol(x, gamma=None, *, axis=-1, epsilon=1e-3) -> float:
    """The error y (or a dx term) inherits from storing a channel's mean in the statistics
    dtype: |gamma| * inv_std * ulp(mean) / 2, the largest over the channels (twice that,
    for margin). Negligible unless |mean| / std is large: for float32 data it is the same
    size as the quantization of x itself."""
    fw = forward_ref(x, axis=axis, epsilon=epsilon)
    half_ulp = 2.0**-53 if np.asarray(x).dtype == F64 else 2.0**-24
    gam = np.ones_like(fw.mean) if gamma is None else np.abs(f64(gamma)).reshape(fw.mean.shape)
    return float(np.max(gam * fw.inv_std * np.abs(fw.mean) * half_ulp * 2, initial=0.0))


def backward_rounding_atol(dy, x, gamma=None, *, axis=-1, epsilon=1e-3) -> tuple[float, float]:
    """(dx, dgamma) allowances for the stored mean's rounding (see mean_rounding_atol):
    the library's x_hat is (x - m) * inv_std with m the rounded mean, so dgamma moves by
    inv_std * |sum dy| * |mean - m| and dx by |gamma| * inv_std^2 * |mean(dy x_hat)| * |mean - m|."""
    fw = forward_ref(x, axis=axis, epsilon=epsilon)
    if not np.size(x):
        return 0.0, 0.0
    half_ulp = 2.0**-53 if np.asarray(x).dtype == F64 else 2.0**-24
    red = reduced_axes(axis, np.ndim(x))
    g = f64(dy)
    dm = np.abs(fw.mean) * half_ulp * 2
    gam = np.ones_like(fw.mean) if gamma is None else np.abs(f64(gamma)).reshape(fw.mean.shape)
    sum_g = np.abs(g.sum(axis=red)).reshape(fw.mean.shape)
    mean_gx = np.abs((g * fw.x_hat).mean(axis=red)).reshape(fw.mean.shape)
    dx_atol = float(np.max(gam * fw.inv_std**2 * mean_gx * dm))
    dg_atol = float(np.max(fw.inv_std * sum_g * dm))
    return dx_atol, dg_atol


# ---- data ------------------------------------------------------------------------------


def random_data(rng: np.random.Generator, shape, dtype, axis=-1, *, loc=2.0, scale=3.0) -> np.ndarray:
    """C-contiguous data of `dtype` with a different mean and spread per channel."""
    shape = tuple(shape)
    b = bcast_shape(shape, axis) if len(shape) >= 1 else shape
    mu = loc + rng.standard_normal(b)
    sd = scale * (0.5 + rng.random(b))
    return (mu + sd * rng.standard_normal(shape)).astype(dtype)


def random_params(rng: np.random.Generator, channels_shape, dtype) -> tuple[np.ndarray, np.ndarray]:
    sd = stat_dtype(dtype)
    gamma = (0.5 + rng.random(channels_shape)) * rng.choice([-1.0, 1.0], size=channels_shape)
    beta = rng.standard_normal(channels_shape)
    return gamma.astype(sd), beta.astype(sd)


def relu_margin(x, gamma=None, beta=None, *, axis=-1, epsilon=1e-3) -> float:
    """Smallest |pre-activation| over x: how far the ReLU mask is from any rounding ambiguity.

    Values equal to their channel's mean (x_hat exactly 0, e.g. one value per channel) are
    left out: there the pre-activation is exactly beta in any precision.
    """
    fw = forward_ref(x, gamma, beta, axis=axis, epsilon=epsilon)
    pre = fw.pre[fw.x_hat != 0]
    return float(np.min(np.abs(pre))) if pre.size else np.inf


def make_layout(base: np.ndarray, layout: str) -> np.ndarray:
    """A view with the values and shape of `base` but another memory layout.

    c: C-contiguous; f: Fortran order; transposed: a transposed view of a C array;
    channels_last: NCHW shape with NHWC strides (what NumPy sees of a torch.channels_last
    tensor) - axis 1 moved innermost; step: every other element of a larger array on
    each axis; negative: reversed strides on every axis. With ":digits", on those axes
    only: step:0, negative:02; window:3 (a slice of an array 3 longer on those axes);
    order:0231 (C-contiguous with the axes in that order in memory, outermost first).
    """
    nd = base.ndim
    name, _, digits = layout.partition(":")
    axes = [int(d) for d in digits] if digits else list(range(nd))
    on = [slice(None)] * nd
    if name == "c":
        out = np.ascontiguousarray(base)
    elif name == "f":
        out = np.asfortranarray(base)
    elif name == "transposed":
        out = np.ascontiguousarray(base.T).T
    elif name in ("channels_last", "order"):
        perm = (0, *range(2, nd), 1) if name == "channels_last" else tuple(axes)  # NCHW -> NHWC
        out = np.ascontiguousarray(base.transpose(perm)).transpose(np.argsort(perm))
    elif name in ("step", "window"):
        grow = (lambda s: 2 * s) if name == "step" else (lambda s: s + 3)
        big = np.zeros(tuple(grow(s) if d in axes else s for d, s in enumerate(base.shape)), base.dtype)
        for d in axes:
            on[d] = slice(None, None, 2) if name == "step" else slice(base.shape[d])
        big[tuple(on)] = base
        out = big[tuple(on)]
    elif name == "negative":
        for d in axes:
            on[d] = slice(None, None, -1)
        out = np.ascontiguousarray(base[tuple(on)])[tuple(on)]
    else:
        raise ValueError(layout)
    assert out.shape == base.shape
    bits = f"u{base.itemsize}"
    assert np.array_equal(out.view(bits), base.view(bits))
    return out


def plan_kind(axis: int | Sequence[int], *arrays: np.ndarray) -> str:
    """The kind of plan the core makes for these same-shaped arrays (x first; then y, or dy
    and dx), by the rules of cpp/src/plan.cpp: size-1 dimensions dropped, reduction
    dimensions flipped to x's positive stride and sorted outer to inner (zero strides
    outermost), neighbours every array steps over contiguously merged. channels_last: one
    channel dimension, unit stride everywhere; channels_first: the innermost reduction
    dimension has unit stride everywhere; strided: anything else."""
    shape = arrays[0].shape
    kept = canon_axes(axis, len(shape))
    channel: list[tuple[int, list[int]]] = []
    reduce: list[tuple[int, list[int]]] = []
    for d, size in enumerate(shape):
        if size != 1:
            steps = [a.strides[d] // a.itemsize for a in arrays]
            (channel if d in kept else reduce).append((size, steps))
    reduce = [(n, [-s for s in st] if st[0] < 0 else st) for n, st in reduce]
    reduce.sort(key=lambda dim: -dim[1][0] if dim[1][0] else -np.inf)  # stable, like std::stable_sort

    def merged(dims):
        out: list[tuple[int, list[int]]] = []
        for n, st in dims:
            if out and all(p == q * n for p, q in zip(out[-1][1], st, strict=True)):
                out[-1] = (out[-1][0] * n, st)
            else:
                out.append((n, st))
        return out

    channel, reduce = merged(channel), merged(reduce)
    if len(channel) == 1 and set(channel[0][1]) == {1}:
        return "channels_last"
    if reduce and set(reduce[-1][1]) == {1}:
        return "channels_first"
    return "strided"


# ---- comparisons -------------------------------------------------------------------------


def spacing16(ref: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One ulp of the 16-bit format `dtype` at |ref| (float64), per element."""
    a = np.abs(np.asarray(ref, dtype=np.float64))
    _, e = np.frexp(a)  # a = m * 2**e with m in [0.5, 1): the binade's ulp is 2**(e - 1 - mantissa)
    exp = np.maximum(e - 1 - _MANTISSA[np.dtype(dtype)], _MIN_SPACING_EXP[np.dtype(dtype)])
    return np.ldexp(1.0, exp)


def _describe(got, ref, bad) -> str:
    idx = np.argwhere(bad)[:5]
    rows = [f"  at {tuple(int(i) for i in j)}: got {got[tuple(j)]!r}, expected {ref[tuple(j)]!r}" for j in idx]
    return f"{int(bad.sum())} of {bad.size} elements differ:\n" + "\n".join(rows)


def assert_close(got, ref, *, rtol: float, scale: float | None = None, name: str = "", atol: float = 0.0) -> None:
    """|got - ref| <= rtol * (|ref| + scale) + atol, elementwise (ref in float64; scale
    defaults to max|ref|).

    The scale part covers values near zero that come out of a cancellation (y or dx
    of a value near the mean), whose error is relative to the channel's magnitude.
    """
    got = np.asarray(got)
    g = got.astype(np.float64)
    r = np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape, f"{name}: shape {g.shape} != {r.shape}"
    if r.size == 0:
        return
    if scale is None:
        finite = r[np.isfinite(r)]
        scale = float(np.max(np.abs(finite))) if finite.size else 1.0
    tol = rtol * (np.abs(r) + scale) + atol
    bad = ~(np.abs(g - r) <= tol)
    bad &= ~((np.isnan(g) & np.isnan(r)) | ((g == r) & np.isinf(r)))
    assert not bad.any(), f"{name}: " + _describe(g, r, bad)


def assert_close16(
    got, ref, dtype, *, name: str = "", extra_rtol: float = 1e-6, scale: float | None = None, atol: float = 0.0
) -> None:
    """A 16-bit result within one ulp (of its own format, at the reference's magnitude)
    of the float64 reference, plus a float32-rounding allowance extra_rtol * scale
    (scale: max|ref| unless given)."""
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), f"{name}: dtype {got.dtype} != {dtype}"
    g = got.astype(np.float64)
    r = np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape
    if r.size == 0:
        return
    if scale is None:
        scale = float(np.max(np.abs(r)))
    tol = spacing16(r, dtype) + extra_rtol * scale + atol
    bad = ~(np.abs(g - r) <= tol)
    assert not bad.any(), f"{name}: " + _describe(g, r, bad)


def assert_output_close(
    got, ref, dtype, *, name: str = "", rtol: float | None = None, scale=None, atol: float = 0.0
) -> None:
    """y or dx against the reference with the tolerance of x's dtype. `scale`: the
    magnitude the absolute error is relative to (default max|ref|); `atol` for
    ill-conditioned data, see mean_rounding_atol."""
    dtype = np.dtype(dtype)
    if dtype in HALF_DTYPES:
        assert_close16(got, ref, dtype, name=name, scale=scale, atol=atol)
    else:
        assert np.asarray(got).dtype == dtype, f"{name}: dtype {np.asarray(got).dtype} != {dtype}"
        rtol = rtol if rtol is not None else (1e-5 if dtype == F32 else 1e-12)
        assert_close(got, ref, rtol=rtol, scale=scale, name=name, atol=atol)


def assert_stats_close(got, ref, dtype, *, name: str = "", rtol: float | None = None, scale=None) -> None:
    """Per-channel statistics: float32 (rounded from a wider sum) or float64."""
    dtype = np.dtype(dtype)
    got = np.asarray(got)
    assert got.dtype == stat_dtype(dtype), f"{name}: dtype {got.dtype} != {stat_dtype(dtype)}"
    if rtol is None:
        rtol = 1e-12 if dtype == F64 else 1e-6
    assert_close(got, ref, rtol=rtol, scale=scale, name=name)


def relu_margin_needed(dtype) -> float:
    """|pre-activation| below which the library's (float32 or float64) mask may
    legitimately differ from the float64 reference's."""
    return 1e-10 if np.dtype(dtype) == F64 else 1e-5


def relu_safe(make, dtype, *, axis=-1, epsilon=1e-3, tries: int = 50):
    """Calls make(attempt) -> (x, gamma, beta) until no pre-activation is within the
    rounding ambiguity of zero, so a ReLU mask comparison is well defined."""
    for attempt in range(tries):
        x, gamma, beta = make(attempt)
        if relu_margin(x, gamma, beta, axis=axis, epsilon=epsilon) > relu_margin_needed(dtype):
            return x, gamma, beta
    raise AssertionError("could not draw data away from the ReLU kink")
