"""A Keras-style layer's own file format: config, build shape and weights in one .npz file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import zipfile
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ._build import Build, plan_build, weight_keys

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
    """The layer :meth:`save` wrote: same config, dtype, build state and bit-identical weights.

    A hostile file cannot make it allocate much more than the file's own size: every
    member is checked against its .npy header before it is read, and the build against
    the weights' shapes before it allocates."""
    not_ours = f"{path!r} is not a BatchNormalization file written by save()"
    # A truncated, corrupt or foreign file fails in the zip reader, the .npy reader, json or the
    # layer's own checks with many exception types; all of them mean the same: ValueError.
    try:  # the file is opened here, so that it is closed whatever fails
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(open(path, "rb")) if isinstance(path, (str, os.PathLike)) else path
            size = fh.seek(0, os.SEEK_END) - fh.seek(0)
            members = _read_members(stack.enter_context(zipfile.ZipFile(fh)), size)
            config = json.loads(str(members["config"][()]))
            meta = json.loads(str(members["meta"][()]))
    # RuntimeError: an encrypted entry, or (RecursionError) JSON nested too deep
    except (ValueError, TypeError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{not_ours}: {type(e).__name__}: {e}") from e
    arrays = {k.split(":", 1)[1]: v for k, v in members.items() if k.startswith("weight:")}
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise ValueError(f"{not_ours}: its config and meta are not JSON objects")
    if meta.get("class") != "BatchNormalization" or meta.get("format") != _FORMAT:
        raise ValueError(not_ours)
    try:
        layer = cls.from_config({**config, "fused": meta.get("fused")})
        if meta.get("built"):
            shape = meta["input_shape"]
            if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
                raise ValueError(f"input_shape {shape!r} is not a list of sizes")
            param_shape = plan_build(layer, shape).param_shape
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{not_ours}: its config does not make a layer: {e}") from e
    if meta.get("built"):
        keys = weight_keys(layer)
        if sorted(keys) != sorted(arrays):
            raise ValueError(f"{path!r} holds weights {sorted(arrays)}; the layer has {sorted(keys)}")
        for k in keys:  # before building: the build allocates weights of the shape the config says
            if arrays[k].shape != param_shape:
                raise ValueError(f"{path!r}: weight {k!r} has shape {arrays[k].shape}; its config makes {param_shape}")
            if arrays[k].dtype.kind not in "biuf":
                raise ValueError(f"{not_ours}: weight {k!r} has dtype {arrays[k].dtype}")
        layer.build(shape)
        for k in keys:
            np.copyto(layer._weight(k), arrays[k])  # type: ignore[arg-type]
    return layer


_MAX_JSON_CHARS = 1 << 20  # config and meta: a real one is a few KB; json's work grows with the text


def _is_dim(d: Any) -> bool:
    return d is None or (type(d) is int and d >= 0)


def _read_members(zf: zipfile.ZipFile, size: int) -> dict[str, np.ndarray]:
    """The arrays save() writes (config, meta, weight:*), each checked against its .npy header
    and its zip entry before anything is allocated: an entry must be stored (as save() writes
    it), exactly as long as its header says, and hold plain data; and the entries together
    no longer than the file (entries that overlap could repeat its bytes many times)."""
    infos = [i for i in zf.infolist() if i.filename in ("config.npy", "meta.npy") or i.filename.startswith("weight:")]
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise ValueError(f"entry {info.filename!r} is compressed; save() stores its arrays")
    if sum(i.file_size for i in infos) > size:
        raise ValueError(f"its entries claim {sum(i.file_size for i in infos)} bytes in a file of {size}")
    out = {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        with zf.open(info) as m:
            version = np.lib.format.read_magic(m)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(m)
            nbytes = math.prod(shape) * dtype.itemsize
            if dtype.hasobject:
                raise ValueError(f"entry {info.filename!r} holds Python objects")
            if m.tell() + nbytes != info.file_size:
                raise ValueError(
                    f"entry {info.filename!r} holds {info.file_size} bytes; its header says {shape} {dtype}"
                )
            if name in ("config", "meta") and nbytes > 4 * _MAX_JSON_CHARS:
                raise ValueError(f"its {name} is {nbytes} bytes long")
        with zf.open(info) as m:
            out[name] = np.lib.format.read_array(m, allow_pickle=False)
    return out
