"""The Keras-style layers' constructor arguments: checks, tf-keras's default names and dtype policies."""

from __future__ import annotations

import itertools
import math
import numbers
import operator
import threading
from typing import Any

import numpy as np

_name_lock = threading.Lock()
_name_counters: dict[str, itertools.count[int]] = {}


def unique_name(base: str) -> str:
    """tf-keras's default names: batch_normalization, batch_normalization_1, ..."""
    with _name_lock:
        n = next(_name_counters.setdefault(base, itertools.count()))
    return base if n == 0 else f"{base}_{n}"


def resolve_dtype(dtype: Any) -> tuple[Any, np.dtype[Any], np.dtype[Any]]:
    """(config value, compute dtype, parameter dtype) of a layer dtype or Keras policy."""
    if isinstance(dtype, dict):  # a serialized Keras Policy
        dtype = (dtype.get("config") or {}).get("name", dtype)
    mixed = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
    if isinstance(dtype, str) and dtype in mixed:
        config: Any = {
            "module": "keras.mixed_precision",
            "class_name": "Policy",
            "config": {"name": dtype},
            "registered_name": None,
        }
        compute = mixed[dtype]
    else:
        compute = "float32" if dtype is None else dtype
        config = None
    if compute == "bfloat16" or getattr(compute, "__name__", None) == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError('a bfloat16 layer needs ml_dtypes (pip install "batchnorm[bfloat16]")') from None
        cdt = np.dtype(ml_dtypes.bfloat16)
    else:
        try:
            cdt = np.dtype(compute)
        except TypeError:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}") from None
        if cdt not in (np.float16, np.float32, np.float64):
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
    if config is None:
        config = "bfloat16" if cdt.name == "bfloat16" else cdt.name
    pdt = np.dtype(np.float64) if cdt == np.float64 else np.dtype(np.float32)
    return config, cdt, pdt


def real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range: infinite, which the range checks reject by name
        big: Any = value
        return math.inf if big > 0 else -math.inf


def momentum(value: Any, name: str) -> float:
    m = real(value, name)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (the weight of the old moving value), got {value!r}")
    return m


def epsilon(value: Any) -> float:
    eps = real(value, "epsilon")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {value!r}")
    return eps


def axis(value: Any) -> int | list[int]:
    def as_int(a: Any) -> int:
        if isinstance(a, bool):
            raise TypeError
        return operator.index(a)

    try:
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("axis must name at least one feature axis, got an empty list")
            return [as_int(a) for a in value]
        return as_int(value)
    except TypeError:
        raise TypeError(
            f"Expected an int or a list/tuple of ints for the argument 'axis', but received: {value!r}"
        ) from None


def virtual_batch_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"virtual_batch_size must be a positive int or None, got {value!r}")
    if value <= 0:
        raise ValueError(
            "`virtual_batch_size` must be a positive integer that divides the true batch size of the "
            f"input tensor. Received: virtual_batch_size={value}"
        )
    return int(value)


def fused(value: Any) -> bool | None:
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"fused must be True, False or None, got {value!r}")
    return None if value is None else bool(value)


def renorm_clipping(clipping: Any) -> dict[str, float | None]:
    clipping = clipping or {}
    if not isinstance(clipping, dict):
        raise TypeError(f"renorm_clipping must be a dict with keys rmax, rmin, dmax; got {clipping!r}")
    keys = ["rmax", "rmin", "dmax"]
    if set(clipping) - set(keys):
        raise ValueError(f"Received invalid keys for `renorm_clipping` argument: {clipping}. Supported values: {keys}.")
    out: dict[str, float | None] = {}
    for k, v in clipping.items():
        out[k] = None if v is None else real(v, f"renorm_clipping[{k!r}]")
    rmax, rmin, dmax = out.get("rmax"), out.get("rmin"), out.get("dmax")
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(f"renorm_clipping: rmax ({rmax}) must be >= rmin ({rmin})")
    if dmax is not None and dmax < 0:
        raise ValueError(f"renorm_clipping: dmax must be >= 0, got {dmax}")
    for k, v in out.items():
        if v is not None and math.isnan(v):
            raise ValueError(f"renorm_clipping[{k!r}] is NaN")
    return out
