"""A Keras-style layer's own file format: config, build shape and weights in one .npz file."""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ._build import Build

if TYPE_CHECKING:
    from ._layer import BatchNormalization

L = TypeVar("L", bound="BatchNormalization")

_FORMAT = 1


def save(layer: BatchNormalization, path: str | os.PathLike[str] | Any) -> None:
    """Writes config, dtype, build shape and weights to a .npz file (``load`` reads it back exactly)."""
    with layer._lock:
        if layer.adjustment is not None:
            raise ValueError("a layer with an `adjustment` callable cannot be saved: the callable is not serializable")
        config = layer.get_config()
        b = layer._build
        meta = {
            "format": _FORMAT,
            "class": "BatchNormalization",
            "fused": layer._fused_arg,
            "built": b is not None,
            "input_shape": None if b is None else _input_shape(b),
        }
        arrays = {f"weight:{k}": np.array(b.weights[k], copy=True) for k in layer._weight_keys()} if b else {}
        np.savez(
            path,
            config=np.array(json.dumps(config)),
            meta=np.array(json.dumps(meta)),
            **arrays,  # type: ignore[arg-type]
        )


def _input_shape(b: Build) -> list[int | None]:
    """The input shape a build accepts: its feature sizes, None elsewhere."""
    shape: list[int | None] = [None] * b.rank
    for a, d in b.dims.items():
        shape[a] = d
    return shape


def load(cls: type[L], path: str | os.PathLike[str] | Any) -> L:
    """The layer :meth:`save` wrote: same config, dtype, build state and bit-identical weights."""
    not_ours = f"{path!r} is not a BatchNormalization file written by save()"
    # A truncated, corrupt or foreign file fails in the zip reader, np.load, json or the
    # layer's own checks with many exception types; all of them mean the same: ValueError.
    try:  # the file is opened here: np.load leaks its own handle when the zip is corrupt
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(open(path, "rb")) if isinstance(path, (str, os.PathLike)) else path
            f = stack.enter_context(np.load(fh, allow_pickle=False))  # an .npy file gives an array: TypeError
            config = json.loads(str(f["config"][()]))
            meta = json.loads(str(f["meta"][()]))
            arrays = {k.split(":", 1)[1]: np.array(f[k]) for k in f.files if k.startswith("weight:")}
    except (ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{not_ours}: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise ValueError(f"{not_ours}: its config and meta are not JSON objects")
    if meta.get("class") != "BatchNormalization" or meta.get("format") != _FORMAT:
        raise ValueError(not_ours)
    try:
        layer = cls.from_config({**config, "fused": meta.get("fused")})
        if meta.get("built"):
            layer.build(meta["input_shape"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{not_ours}: its config does not make a layer: {e}") from e
    if layer.built:
        keys = layer._weight_keys()
        if sorted(keys) != sorted(arrays):
            raise ValueError(f"{path!r} holds weights {sorted(arrays)}; the layer has {sorted(keys)}")
        for k in keys:
            if arrays[k].shape != layer._weight(k).shape:  # type: ignore[union-attr]
                raise ValueError(f"{path!r}: weight {k!r} has shape {arrays[k].shape}")
            if arrays[k].dtype.kind not in "biuf":
                raise ValueError(f"{not_ours}: weight {k!r} has dtype {arrays[k].dtype}")
            np.copyto(layer._weight(k), arrays[k])  # type: ignore[arg-type]
    return layer
