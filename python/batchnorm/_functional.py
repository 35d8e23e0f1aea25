"""The stateless functional API: moments, normalize, forward, backward.

Argument handling lives here (array conversion, output allocation, the checks that need
Python objects); the rules the core can decide (feature axes, empty batch, epsilon, output
strides) are decided there alone, and the arithmetic is all in the C++ core, which
receives the NumPy buffers as they are, with the GIL released.

Each function first offers its arguments, untouched, to its ``_core.fast_*`` binding. The
common call (exact ndarrays of the right dtypes, C-contiguous; an int axis; a float
epsilon; ``out`` None or a fitting array apart from the inputs) is already in the form
the general path below would hand to the core: nothing to convert, copy or reject. The
binding recognises it with a few C-level checks, allocates the outputs as the general path
would and runs the same core call, which saves several microseconds per call on small
inputs. For anything else it returns None and the general path runs; it never raises on
its own. What it accepts, and why that is equivalent, is spelled out where it is defined,
in ``python/src/register_fast_path.cpp``; ``tests/test_fast_path.py`` checks both paths
agree on borderline inputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from . import _core

__all__ = ["BatchStats", "backward", "forward", "moments", "normalize"]

AxisLike = int | Sequence[int]
_TooHardError = getattr(np, "exceptions", np).TooHardError  # numpy.exceptions is new in NumPy 1.25


class BatchStats(NamedTuple):
    """Statistics of one training batch, as :func:`forward` returns them.

    ``mean`` and ``variance`` (biased) per channel, ``inv_std = 1/sqrt(variance +
    epsilon)``, and ``count``, the number of values reduced per channel (with a mask, the
    positions it selects). Float32 for float16/bfloat16/float32 inputs, float64 for
    float64 inputs.
    """

    mean: np.ndarray
    variance: np.ndarray
    inv_std: np.ndarray
    count: int  # type: ignore[assignment]  # the field shadows tuple.count, by design of the API


_ACTIVATIONS = {None: False, "relu": True}


def _data(x: ArrayLike, name: str, min_ndim: int) -> np.ndarray:
    a = x if type(x) is np.ndarray else np.asarray(x)
    if a.dtype.kind in "OSU":  # None, a str, a dict...: a wrong type, whatever its ndim
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 array; got dtype {a.dtype}")
    if a.ndim < min_ndim:
        need = "1 dimension" if min_ndim == 1 else "2 dimensions (a batch axis and a feature axis)"
        raise ValueError(f"{name} must have at least {need}; got an array of ndim {a.ndim}")
    if not a.flags.aligned:  # e.g. np.frombuffer at an odd offset: the kernels need aligned elements
        a = a.copy()
    return a


def _stat_dtype(x: np.ndarray) -> type[np.floating]:
    return np.float64 if x.dtype == np.float64 else np.float32


def real_array(value: ArrayLike, name: str) -> np.ndarray:
    """value as an array, if it holds real numbers: complex, object (None) and string values
    are a TypeError, never silently converted (to their real part, NaN, or parsed)."""
    a = value if isinstance(value, np.ndarray) else np.asarray(value)
    if a.dtype.kind not in "biuf" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a


class CopyableLayer:
    """copy.deepcopy and pickle for a layer that holds a lock (``_lock``, made by
    ``_new_lock``): everything but the lock is copied, under it, and the copy gets a fresh
    one; a copy made inside bn.precise_statistics is not part of the block."""

    _lock: Any
    _new_lock: Any = None  # threading.Lock or threading.RLock, set by the layer class

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        state["_precise_stats"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = type(self)._new_lock()


def _channel_param(p: ArrayLike | None, name: str, dtype: type[np.floating]) -> np.ndarray | None:
    if p is None:
        return None
    a = np.ascontiguousarray(real_array(p, name), dtype=dtype)
    return a  # its size is the core's check


def _output(out: np.ndarray | None, like: np.ndarray, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    """A new array shaped like `like` (same memory order), or the caller's `out`.

    Its dtype, shape, writeability and whether its elements overlap each other are the
    core's checks; whether it overlaps an input other than as that same view is this one."""
    if out is None:
        return np.empty_like(like)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    for a in inputs:
        if np.may_share_memory(out, a) and not _same_view(out, a) and _overlap(out, a):
            raise ValueError("out overlaps an input without being that same array; pass the input itself for in place")
    return out


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a and b share an element (bounded effort; too hard to tell counts as yes)."""
    try:
        return bool(np.shares_memory(a, b, max_work=10**6))  # type: ignore[arg-type]  # stubs allow only -1, 0
    except _TooHardError:
        return True


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides


def _relu(activation: str | None) -> bool:
    try:
        return _ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}") from None


def _epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a real number, got {type(epsilon).__name__}")
    try:
        return float(epsilon)
    except OverflowError:  # an int beyond float range: infinite, which the core rejects by name
        big: Any = epsilon
        return math.inf if big > 0 else -math.inf


def _mask(mask: ArrayLike, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """A boolean (or 0/1) mask as the core takes it: 0/1 values of x's dtype, broadcast
    (zero strides, no copy) to x's shape without its feature axes."""
    m = mask if isinstance(mask, np.ndarray) else np.asarray(mask)
    if m.dtype.kind not in "biu":
        raise TypeError(f"mask must be a boolean (or 0/1 integer) array, got dtype {m.dtype}")
    if m.dtype.kind != "b" and np.any((m != 0) & (m != 1)):
        raise ValueError("mask must hold only 0 and 1 (or be boolean)")
    reduced = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    try:
        # converted before broadcasting: the copy has the mask's size, never x's
        return np.broadcast_to(m.astype(x.dtype), reduced)
    except ValueError:
        raise ValueError(
            f"mask of shape {m.shape} does not broadcast to {reduced}, the shape of x without its feature axes {axes}"
        ) from None


def moments(x: ArrayLike, axis: AxisLike = -1, mask: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased (population) variance of ``x``.

    ``axis`` names the feature axes (int or tuple), which are kept; the statistics reduce
    over all the others. Returns arrays shaped like the kept axes, float32 for 16-bit and
    float32 inputs, float64 for float64. The variance is computed with shifted sums in
    double precision, so data far from zero (mean/std of 1e6 in float32) keeps its digits.

    ``mask`` (boolean or 0/1, shaped like x without its feature axes, or broadcastable to
    that) restricts the statistics to the positions where it is true; one that selects
    nothing is a ValueError.
    """
    if mask is None:
        fast = _core.fast_moments(x, axis)
        if fast is not None:
            return fast
    x = _data(x, "x", 2)
    axes = _core.feature_axes(axis, x.ndim)
    return _core.moments(x, axes, mask=None if mask is None else _mask(mask, x, axes))


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    variance: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: AxisLike = -1,
    epsilon: float = 1e-3,
    activation: str | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inference pass: ``act(gamma * (x - mean) / sqrt(variance + epsilon) + beta)``.

    ``mean``, ``variance``, ``gamma`` and ``beta`` hold one value per channel of the
    feature axes (any shape with that many elements, in C order); ``gamma=None`` means 1
    and ``beta=None`` means 0. ``activation`` is None or ``"relu"`` (fused). ``out`` may be
    a preallocated array of x's shape and dtype, or x itself.
    """
    fast = _core.fast_normalize(x, mean, variance, gamma, beta, axis, epsilon, activation, out)
    if fast is not None:
        return fast
    x = _data(x, "x", 1)
    axes = _core.feature_axes(axis, x.ndim)
    dtype = _stat_dtype(x)
    y = _output(out, x, (x,))
    _core.normalize(
        x,
        y,
        axes,
        _channel_param(mean, "mean", dtype),
        _channel_param(variance, "variance", dtype),
        _channel_param(gamma, "gamma", dtype),
        _channel_param(beta, "beta", dtype),
        _epsilon(epsilon),
        _relu(activation),
    )
    return y


def forward(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: AxisLike = -1,
    epsilon: float = 1e-3,
    activation: str | None = None,
    out: np.ndarray | None = None,
    mask: ArrayLike | None = None,
) -> tuple[np.ndarray, BatchStats]:
    """Training pass: normalize ``x`` with its own batch statistics.

    Returns ``y`` (x's shape and dtype) and :class:`BatchStats` (mean, biased variance,
    inv_std, count). Raises ValueError for an empty batch.

    With ``mask`` (as :func:`moments` takes it) the statistics come from the positions it
    selects, and every position is normalized with them (padded sequences: the padding
    does not enter the statistics); ``count`` is the number of selected positions.
    """
    if mask is None:
        fast = _core.fast_forward(x, gamma, beta, axis, epsilon, activation, out)
        if fast is not None:
            y, mean, variance, inv_std, count = fast
            return y, BatchStats(mean, variance, inv_std, count)
    x = _data(x, "x", 2)
    axes = _core.feature_axes(axis, x.ndim)
    dtype = _stat_dtype(x)
    g = _channel_param(gamma, "gamma", dtype)
    b = _channel_param(beta, "beta", dtype)
    eps = _epsilon(epsilon)
    relu = _relu(activation)
    m = None if mask is None else _mask(mask, x, axes)
    y = _output(out, x, (x,) if m is None else (x, m))
    mean, variance, inv_std, count = _core.forward(x, y, axes, g, b, eps, relu, mask=m)
    return y, BatchStats(mean, variance, inv_std, count)


def backward(
    dy: ArrayLike,
    x: ArrayLike,
    stats: BatchStats,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: AxisLike = -1,
    activation: str | None = None,
    out: np.ndarray | None = None,
    mask: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient of :func:`forward` with respect to x, gamma and beta.

    ``stats`` is what ``forward`` returned for ``x`` (its ``mean`` and ``inv_std`` are
    used). ``beta`` matters only with ``activation="relu"``, whose mask is rebuilt from x,
    stats, gamma and beta exactly as the forward pass computed it. Returns ``dx``
    (x's shape and dtype), ``dgamma = sum(dy' * x_hat)`` and ``dbeta = sum(dy')``
    (``dy'``: dy masked by the activation), always, also when gamma/beta are None.
    ``mask`` must be the one ``forward`` was given: dx is then the exact gradient of the
    masked forward (dgamma and dbeta still sum over every position, as every position
    was normalized).
    """
    if type(stats) is BatchStats and mask is None:  # a NamedTuple: reading its fields (again below) runs no user code
        fast = _core.fast_backward(dy, x, stats.mean, stats.inv_std, gamma, beta, axis, activation, out)
        if fast is not None:
            return fast
    x = _data(x, "x", 2)
    dy = _data(dy, "dy", 2)
    axes = _core.feature_axes(axis, x.ndim)
    kept = tuple(x.shape[a] for a in axes)
    dtype = _stat_dtype(x)
    try:
        stat_mean, stat_inv_std = stats.mean, stats.inv_std
    except AttributeError:
        raise TypeError("stats must be the BatchStats that forward() returned") from None
    mean = _channel_param(stat_mean, "stats.mean", dtype)
    inv_std = _channel_param(stat_inv_std, "stats.inv_std", dtype)
    g = _channel_param(gamma, "gamma", dtype)
    b = _channel_param(beta, "beta", dtype)
    relu = _relu(activation)
    m = None if mask is None else _mask(mask, x, axes)
    dx = _output(out, x, (x, dy) if m is None else (x, dy, m))
    dgamma = np.empty(kept, dtype)
    dbeta = np.empty(kept, dtype)
    _core.backward(dy, x, dx, axes, mean, inv_std, g, b, relu, dgamma, dbeta, mask=m)
    return dx, dgamma, dbeta
