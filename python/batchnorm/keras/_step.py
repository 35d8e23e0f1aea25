"""The per-channel arithmetic around a Keras-style layer's passes: ghost batches, masks,
adjustment, renorm's corrections, moving averages, and the records backward reads.

NumPy on arrays of C values (or of C per ghost batch); the passes over the data are the
core's, made by the layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Stats:
    """A training batch's statistics, as the normalizing pass takes them."""

    mean: np.ndarray  # parameter dtype, one per channel (per ghost batch and channel)
    variance: np.ndarray  # biased
    wsum: np.ndarray | None = None  # masked calls: the mask weight per channel (float64, keepdims shape)
    count: int = 0  # synchronized calls: values per channel over all processes
    comm: Any = None  # synchronized calls: the communicator the statistics were shared over


@dataclass
class Last:
    """What backward needs from the last call."""

    training: bool
    x: np.ndarray  # the (possibly reshaped) input the kernels saw
    input_shape: tuple[int, ...]
    axes: tuple[int, ...]  # feature axes of x for the core
    mean: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray | None  # the effective per-channel scale the pass used (tiled for ghost batches)
    reps: int = 1  # ghost batches
    scale_mult: np.ndarray | None = None  # d y / d gamma = x_hat * scale_mult + offset_mult
    offset_mult: np.ndarray | None = None
    weights: np.ndarray | None = None  # mask frequency weights (broadcastable to x), mask path only
    mask: np.ndarray | None = None  # the weights as the kernels took them (core_mask), if they did
    wsum: np.ndarray | None = None  # mask path: Stats.wsum
    count: int = 0  # Stats.count
    comm: Any = None  # Stats.comm


def ghost_batches(x: np.ndarray, axes: tuple[int, ...], vbs: int | None) -> tuple[np.ndarray, tuple[int, ...], int]:
    """(view, its feature axes, ghost batches): tf-keras's strided ghost batches as a leading
    axis kept by the core (row i in ghost batch i mod B/vbs); x itself without them."""
    if vbs is None:
        return x, axes, 1
    batch = x.shape[0]
    if batch == 0:  # zero ghost batches: no statistics (the moving ones would become NaN)
        raise ValueError("training on an empty batch: the reduced axes hold no values")
    if batch % vbs != 0:
        raise ValueError(
            f"virtual_batch_size={vbs} does not divide the batch size {batch} of the input "
            f"(shape {x.shape}); in training the batch must be a multiple of it"
        )
    reps = batch // vbs
    return x.reshape((vbs, reps, *x.shape[1:])), (1, *(a + 1 for a in axes)), reps


def mask_weights(mask: Any, x: np.ndarray, compute_dtype: np.dtype[Any]) -> np.ndarray:
    """A mask over x's positions without the last axis, as float64 frequency weights broadcastable to x."""
    m = np.asarray(mask)
    if m.dtype.kind not in "biuf":
        raise TypeError(f"mask must be a boolean or numeric array, got dtype {m.dtype}")
    try:
        m = np.broadcast_to(m, x.shape[:-1])
    except ValueError:
        raise ValueError(
            f"mask of shape {m.shape} does not match the input shape {x.shape} without its last axis, "
            f"{x.shape[:-1]} (tf-keras applies a mask along the last axis)"
        ) from None
    # tf-keras casts the mask to the compute dtype, then weights the moments with it.
    return m.astype(compute_dtype).astype(np.float64)[..., None]


def core_mask(weights: np.ndarray, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray | None:
    """The mask weights as the kernels take them: x's dtype (tf-keras's cast), x's shape
    without the feature axes (a view that keeps the broadcast), or None where they cannot:
    weights that vary along a feature axis (a mask over the last axis of channels-first
    data) or whose sum is not positive (tf-keras then gives mean and variance 0)."""
    varying = [a for a in axes if weights.shape[a] != 1]
    if varying:  # the same weights for every channel, or the kernels cannot take them
        first = weights[tuple(slice(0, 1) if i in varying else slice(None) for i in range(weights.ndim))]
        if not np.array_equal(weights, np.broadcast_to(first, weights.shape)):
            return None
        weights = first
    w = np.broadcast_to(weights, x.shape)
    view = w[tuple(0 if i in axes else slice(None) for i in range(x.ndim))]
    total = float(view.sum(dtype=np.float64)) if view.size else 0.0
    if not (math.isfinite(total) and total > 0):
        return None
    return view.astype(x.dtype)  # exact: the weights were cast to the compute dtype


def weighted_partials(
    x: np.ndarray, axes: tuple[int, ...], weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel weight sum, weighted mean (0 where no weight) and weighted M2 of x, in
    float64 and the keepdims shape: tf.nn.weighted_moments' terms."""
    red = tuple(i for i in range(x.ndim) if i not in axes)
    w = np.broadcast_to(weights, x.shape)
    xf = x.astype(np.float64)
    wsum = w.sum(axis=red, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(wsum != 0, (w * xf).sum(axis=red, keepdims=True) / wsum, 0.0)
    m2 = (w * np.square(xf - mean)).sum(axis=red, keepdims=True)
    return wsum, mean, m2


def adjustment(
    fn: Callable[[np.ndarray], tuple[Any, Any]], x: np.ndarray, keep_shape: tuple[int, ...], pdt: np.dtype[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (scale, bias) the user's adjustment returns for x's shape."""
    result = fn(np.array(x.shape, dtype=np.int32))
    try:
        adj_scale, adj_bias = result
    except (TypeError, ValueError):
        raise TypeError(f"adjustment must return a pair (scale, bias), got {result!r}") from None
    out = []
    for name, v in (("scale", adj_scale), ("bias", adj_bias)):
        a = np.asarray(v, dtype=pdt)
        try:
            a = np.broadcast_to(a, keep_shape)
        except ValueError:
            raise ValueError(
                f"adjustment {name} of shape {a.shape} does not broadcast to the per-channel shape {keep_shape}; "
                "batchnorm supports per-channel adjustments only"
            ) from None
        out.append(np.ascontiguousarray(a).reshape(-1))
    return out[0], out[1]


def renorm_correction(
    mean: np.ndarray,
    variance: np.ndarray,
    weights: dict[str, np.ndarray],
    epsilon: float,
    clipping: dict[str, float | None],
) -> tuple[np.ndarray, np.ndarray]:
    """Batch renormalization's r and d (clipped) from the batch statistics and the renorm weights."""
    pdt = variance.dtype.type
    eps = pdt(epsilon)
    stddev = np.sqrt(variance + eps)
    renorm_stddev = np.maximum(weights["renorm_stddev"].reshape(-1), np.sqrt(eps))
    r = stddev / renorm_stddev
    d = (mean - weights["renorm_mean"].reshape(-1)) / renorm_stddev
    rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
    if rmin is not None:
        r = np.maximum(r, pdt(rmin))
    if rmax is not None:
        r = np.minimum(r, pdt(rmax))
    if dmax is not None:
        d = np.minimum(np.maximum(d, pdt(-dmax)), pdt(dmax))
    return r, d


def effective_affine(
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    scale_mult: np.ndarray | None,
    offset_mult: np.ndarray | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """scale' = scale_mult * gamma, offset' = offset_mult * gamma + beta (tf-keras's composition)."""
    if scale_mult is None or offset_mult is None:
        return gamma, beta
    g = scale_mult if gamma is None else scale_mult * gamma
    o = offset_mult if gamma is None else offset_mult * gamma
    if beta is not None:
        o = o + beta
    return np.ascontiguousarray(g), np.ascontiguousarray(o)


def channel_moments(stats: Stats, reps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance for the moving averages (ghost batches: the average of theirs)."""
    channels = stats.mean.size // reps
    if reps == 1:
        return stats.mean.reshape(channels), stats.variance.reshape(channels)
    pdt = stats.mean.dtype
    m = stats.mean.reshape(reps, channels).mean(axis=0, dtype=np.float64).astype(pdt)
    v = stats.variance.reshape(reps, channels).mean(axis=0, dtype=np.float64).astype(pdt)
    return m, v


def moving_average(var: np.ndarray, value: np.ndarray, momentum: float) -> np.ndarray:
    """tf-keras's ``var.assign_sub((var - value) * (1 - momentum))`` in var's dtype."""
    # tf-keras makes 1 - momentum a float32 tensor, then casts it: rounded to float32 first, float64 vars too
    decay = var.dtype.type(np.float32(1.0 - momentum))
    v = var.reshape(-1)
    return (v - (v - value.astype(var.dtype)) * decay).reshape(var.shape)  # type: ignore[no-any-return]


def masked_dx(last: Last, dy: np.ndarray, sum_dy: np.ndarray, sum_dy_xhat: np.ndarray) -> np.ndarray:
    """A masked call's dx = a*(dy - w*k), a = gamma*inv_std, from the per-channel sums over
    the batch: k = (sum(dy) + x_hat*sum(dy*x_hat)) / W (0 where W = 0), in float64 from dy
    itself (a 16-bit a*dy would lose the digits the subtraction keeps), rounded once.

    With frequency weights w (W = sum w per channel), d mean/dx = w/W and
    d var/dx = 2w(x - mean)/W, which gives that dx.
    """
    assert last.wsum is not None
    assert last.weights is not None
    wsum = last.wsum
    shape = wsum.shape
    inv = last.inv_std.astype(np.float64).reshape(shape)
    mean = last.mean.astype(np.float64).reshape(shape)
    a = inv if last.gamma is None else last.gamma.astype(np.float64).reshape(shape) * inv
    with np.errstate(divide="ignore", invalid="ignore"):
        k_mean = np.where(wsum != 0, sum_dy.reshape(shape) / wsum, 0.0)
        k_var = np.where(wsum != 0, sum_dy_xhat.reshape(shape) / wsum, 0.0)
    x_hat = (last.x.astype(np.float64) - mean) * inv
    return (a * (dy.astype(np.float64) - last.weights * (k_mean + x_hat * k_var))).astype(last.x.dtype)
