"""Bit-for-bit snapshots of a layer's whole state, and the layers the reliability tests use.

``snapshot(layer)`` walks everything reachable from the layer's attributes (weights,
moving/running statistics, counters, the built flag and build record, gradients, the
saved last call, the configuration) and records NumPy arrays by identity, dtype, shape
and bytes, floats by their bit pattern (so NaN compares equal to itself) and any other
object by identity. Two snapshots are equal only if the layer is bit-for-bit unchanged
and still holds the very same array objects (live weights stay live).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np

import batchnorm as bn

_ATOMS = (bool, int, str, bytes, type(None))


def _walk(obj: Any, path: str, out: dict[str, Any], seen: set[int]) -> None:
    if isinstance(obj, np.ndarray):
        out[path] = ("ndarray", id(obj), obj.dtype.str, obj.shape, obj.strides, obj.tobytes())
        return
    if isinstance(obj, np.generic):
        out[path] = ("scalar", np.asarray(obj).dtype.str, np.asarray(obj).tobytes())
        return
    if isinstance(obj, float):
        out[path] = ("float", struct.pack("<d", obj))
        return
    if isinstance(obj, _ATOMS):
        out[path] = obj
        return
    if id(obj) in seen:
        out[path] = ("seen", id(obj))
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        out[path] = ("dict", id(obj), tuple(map(repr, obj)))
        for k, v in obj.items():
            _walk(v, f"{path}[{k!r}]", out, seen)
    elif isinstance(obj, (list, tuple)):
        out[path] = (type(obj).__name__, id(obj) if isinstance(obj, list) else None, len(obj))
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out[path] = ("dataclass", type(obj).__name__, id(obj))
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), f"{path}.{f.name}", out, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("batchnorm"):
        out[path] = ("object", type(obj).__name__, id(obj))
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", out, seen)
    else:  # locks, callables, communicators, foreign objects: the same object
        out[path] = ("object", type(obj).__name__, id(obj))


def snapshot(layer: Any) -> dict[str, Any]:
    """Everything reachable from the layer, as comparable values (see the module docstring)."""
    out: dict[str, Any] = {}
    _walk(layer, "layer", out, set())
    return out


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, "<absent>") != after.get(k, "<absent>"))
    assert not changed, "layer state changed at: " + ", ".join(changed[:10])


# ---- layers in a realistic state: built, trained once, backward done ---------------------------

KERAS_KINDS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "keras": ({}, (8, 3)),
    "keras-fused": ({"axis": 1}, (4, 3, 2, 2)),
    "keras-axes": ({"axis": [1, 3]}, (4, 3, 2, 5)),
    "keras-renorm": ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}}, (8, 3)),
    "keras-vbs": ({"virtual_batch_size": 4}, (8, 3)),
    "keras-adjustment": ({"adjustment": lambda shape: (np.float32(1.5), np.float32(0.25))}, (8, 3)),
    "keras-nocenter-noscale": ({"center": False, "scale": False}, (8, 3)),
    "keras-float16": ({"dtype": "float16"}, (8, 3)),
    "keras-float64": ({"dtype": "float64"}, (8, 3)),
    "keras-sync": ({}, (8, 3)),  # SyncBatchNormalization; without MPI peers: the plain layer
}
KERAS_CLASSES: dict[str, type] = {"keras-sync": bn.SyncBatchNormalization}

TORCH_KINDS: dict[str, tuple[type, dict[str, Any], tuple[int, ...]]] = {
    "torch1d": (bn.BatchNorm1d, {}, (8, 3)),
    "torch1d-ncl": (bn.BatchNorm1d, {}, (4, 3, 5)),
    "torch2d": (bn.BatchNorm2d, {}, (4, 3, 2, 2)),
    "torch3d": (bn.BatchNorm3d, {}, (2, 3, 2, 2, 2)),
    "torch2d-cumulative": (bn.BatchNorm2d, {"momentum": None}, (4, 3, 2, 2)),
    "torch2d-noaffine": (bn.BatchNorm2d, {"affine": False}, (4, 3, 2, 2)),
    "torch2d-notrack": (bn.BatchNorm2d, {"track_running_stats": False}, (4, 3, 2, 2)),
    "torch2d-float64": (bn.BatchNorm2d, {"dtype": "float64"}, (4, 3, 2, 2)),
    "sync": (bn.SyncBatchNorm, {}, (4, 3, 2, 2)),
    "sync-cumulative": (bn.SyncBatchNorm, {"momentum": None}, (4, 3, 2, 2)),
}

LAYER_KINDS = [*KERAS_KINDS, *TORCH_KINDS]


def input_shape(kind: str) -> tuple[int, ...]:
    return KERAS_KINDS[kind][1] if kind in KERAS_KINDS else TORCH_KINDS[kind][2]


def make_layer(kind: str, *, trained: bool = True, seed: int = 0) -> Any:
    """A layer of the given kind; trained: one training call and its backward (so every
    piece of state - moving statistics, counters, grads, the saved call - is populated),
    then a second training call with other data so the moving statistics are not initial."""
    rng = np.random.default_rng(seed)
    if kind in KERAS_KINDS:
        kwargs, shape = KERAS_KINDS[kind]
        layer = KERAS_CLASSES.get(kind, bn.BatchNormalization)(**kwargs)
        call = lambda x: layer(x, training=True)  # noqa: E731
    else:
        cls, kwargs, shape = TORCH_KINDS[kind]
        layer = cls(shape[1], **kwargs)
        call = layer
    if trained:
        dtype = input_dtype(kind)
        for _ in range(2):
            x = rng.normal(1.0, 2.0, size=shape).astype(dtype)
            call(x)
        layer.backward(rng.standard_normal(shape).astype(dtype))
    return layer


def input_dtype(kind: str) -> np.dtype:
    """float32, or the layer's dtype for PyTorch-style layers (which, as torch, do not cast)."""
    if kind in TORCH_KINDS:
        return np.dtype(TORCH_KINDS[kind][1].get("dtype", "float32"))
    return np.dtype(np.float32)


def train_input(kind: str, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 3.0, size=input_shape(kind)).astype(input_dtype(kind))


def training_call(layer: Any, x: np.ndarray) -> np.ndarray:
    """One training-mode forward of either layer family."""
    if isinstance(layer, bn.BatchNormalization):
        return layer(x, training=True)
    layer.train()
    return layer(x)  # type: ignore[no-any-return]


def same_weights(rng: np.random.Generator, shape: tuple[int, ...], *layers: Any) -> None:
    """Builds Keras-style layers for `shape` and gives them all the same non-trivial
    weights, drawn for the first one."""
    for layer in layers:
        layer.build(shape)
    weights = [rng.uniform(0.5, 2.0, w.shape) for w in layers[0].get_weights()]
    for layer in layers:
        layer.set_weights(weights)
