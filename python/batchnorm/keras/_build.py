"""Building a Keras-style layer for an input shape: feature axes, tf-keras's fused rule,
parameter shape and initial weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._functional import real_array

if TYPE_CHECKING:
    from ._layer import BatchNormalization


@dataclass
class Build:
    """What building for an input shape decides: axes, fused, parameter shape, weights."""

    rank: int
    axes: tuple[int, ...]  # resolved feature axes, in the order given
    dims: dict[int, int]  # feature axis -> its size (the input spec)
    fused: bool
    param_shape: tuple[int, ...]
    weights: dict[str, np.ndarray]


def fused_obstacle(layer: BatchNormalization) -> str | None:
    """Why tf-keras's fused kernel cannot serve this layer's arguments (None: it can)."""
    if layer.renorm:
        return "Passing both `fused=True` and `renorm=True` is not supported"
    axis = [layer.axis] if isinstance(layer.axis, int) else layer.axis
    if len(axis) > 1 or axis[0] not in (-4, -3, -1, 1, 3, 4):
        return (
            "Passing `fused=True` is only supported when axis is 1 or 3 for input rank = 4 "
            f"or 1 or 4 for input rank = 5. Got axis {axis}"
        )
    if layer.virtual_batch_size is not None:
        return "Passing `fused=True` is not supported when `virtual_batch_size` is specified."
    if layer.adjustment is not None:
        return "Passing `fused=True` is not supported when `adjustment` is specified."
    if layer.compute_dtype == np.float64:
        return (
            "Passing `fused=True` is only supported when the compute dtype is float16, bfloat16, "
            "or float32. Got dtype: float64"
        )
    return None


def resolve_axes(axis: int | list[int], rank: int) -> list[int]:
    """The feature axes as non-negative ints, in the order given, checked against the rank."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    axes = [a + rank if a < 0 else a for a in axes]
    for a in axes:
        if a < 0 or a >= rank:
            raise ValueError(
                "Invalid value for `axis` argument. Expected 0 <= axis < inputs.rank "
                f"(with inputs.rank={rank}). Received: axis={tuple(axes)}"
            )
    if len(axes) != len(set(axes)):
        raise ValueError(f"Duplicate axis: {tuple(axes)}")
    return axes


def make_build(layer: BatchNormalization, input_shape: Sequence[int | None]) -> Build:
    b = plan_build(layer, input_shape)
    b.weights = initial_weights(layer, b.param_shape)
    return b


def plan_build(layer: BatchNormalization, input_shape: Sequence[int | None]) -> Build:
    """What building for this shape decides, without the weights (nothing is allocated)."""
    shape = tuple(input_shape)
    rank = len(shape)
    if rank < 2:
        raise ValueError(
            f"BatchNormalization needs an input of at least 2 dimensions (a batch axis and a feature axis); "
            f"got shape {shape}"
        )
    axes = resolve_axes(layer.axis, rank)
    vbs = layer.virtual_batch_size
    if vbs is not None and 0 in axes:
        raise ValueError(
            "When using `virtual_batch_size`, the batch dimension must be 0 and thus axis cannot include 0. "
            f"Received axis={axes}"
        )
    fused = layer.fused
    if fused is None:
        fused = rank in (4, 5)
    elif fused and rank not in (4, 5):
        raise ValueError(
            f"Batch normalization layers with `fused=True` only support 4D or 5D input tensors. "
            f"Received tensor with shape: {shape}"
        )
    if fused and not (axes == [1] or (axes == [3] and rank == 4) or (axes == [4] and rank == 5)):
        if rank == 5:
            fused = False
        else:
            raise ValueError(
                "Unsupported axis. The use of `fused=True` is only possible with `axis=1` or `axis=3` "
                f"for 4D input tensors. Received: axis={tuple(axes)}"
            )
    dims: dict[int, int] = {}
    for a in axes:
        d = shape[a]
        if d is None:
            raise ValueError(
                f"Input has undefined `axis` dimension. Received input with shape {shape} and axis={tuple(axes)}"
            )
        dims[a] = int(d)
    if len(axes) == 1 and vbs is None:
        param_shape: tuple[int, ...] = (dims[axes[0]],)
    else:
        ps = [dims.get(i, 1) for i in range(rank)]
        if vbs is not None:
            ps.insert(1, 1)
        param_shape = tuple(ps)
    return Build(rank, tuple(axes), dims, bool(fused), param_shape, {})


def weight_keys(layer: BatchNormalization) -> list[str]:
    """The weights a build of this layer creates, in tf-keras's order (as initial_weights)."""
    keys = ["gamma"] * layer.scale + ["beta"] * layer.center + ["moving_mean", "moving_variance"]
    return keys + ["moving_stddev", "renorm_mean", "renorm_stddev"] * layer.renorm


def initial_weights(layer: BatchNormalization, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    pdt = layer.param_dtype

    def init(initializer: Any) -> np.ndarray:
        a = np.array(real_array(initializer(shape, pdt), "an initializer's result"), dtype=pdt, copy=True)
        if a.shape != shape:
            a = np.array(np.broadcast_to(a, shape), dtype=pdt)
        return np.ascontiguousarray(a)

    w: dict[str, np.ndarray] = {}
    if layer.scale:
        w["gamma"] = init(layer.gamma_initializer)
    if layer.center:
        w["beta"] = init(layer.beta_initializer)
    w["moving_mean"] = init(layer.moving_mean_initializer)
    w["moving_variance"] = init(layer.moving_variance_initializer)
    if layer.renorm:
        with np.errstate(invalid="ignore"):
            w["moving_stddev"] = np.sqrt(init(layer.moving_variance_initializer))
            w["renorm_mean"] = init(layer.moving_mean_initializer)
            w["renorm_stddev"] = np.sqrt(init(layer.moving_variance_initializer))
    return w
