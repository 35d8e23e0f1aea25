"""Keras-style weight constraints, applied by the optimizers after each update.

``NonNeg()``: negative entries become 0. ``MaxNorm(max_value=2, axis=0)``,
``MinMaxNorm(min_value=0.0, max_value=1.0, rate=1.0, axis=0)`` and
``UnitNorm(axis=0)`` rescale by the L2 norm over ``axis`` with tf-keras's formulas
(``w * desired / (1e-7 + norm)``). Names: ``"non_neg"``, ``"max_norm"``,
``"min_max_norm"``, ``"unit_norm"`` (and the class names); any callable ``f(w) -> w``
works too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._serialization import deserialize_object, get_object, serialize_object

__all__ = [
    "Constraint",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "UnitNorm",
    "deserialize",
    "get",
    "max_norm",
    "min_max_norm",
    "non_neg",
    "serialize",
    "unit_norm",
]

_EPSILON = 1e-7  # tf-keras's backend.epsilon()

AxisArg = int | Sequence[int]


def _array(w: Any) -> np.ndarray:
    a = np.asarray(w)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _axis(axis: AxisArg) -> int | tuple[int, ...]:
    return axis if isinstance(axis, int) else tuple(axis)


class Constraint:
    """Base class: ``c(w)`` returns the constrained weight (a new array)."""

    def __call__(self, w: Any) -> np.ndarray:
        return _array(w)

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Constraint:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _norms(w: np.ndarray, axis: AxisArg) -> np.ndarray:
    out: np.ndarray = np.sqrt(np.sum(np.square(w), axis=_axis(axis), keepdims=True))
    return out


class NonNeg(Constraint):
    """``w * (w >= 0)``."""

    def __call__(self, w: Any) -> np.ndarray:
        a = _array(w)
        out: np.ndarray = a * (a >= 0).astype(a.dtype)
        return out


class MaxNorm(Constraint):
    """Rescales to an L2 norm (over ``axis``) of at most ``max_value``."""

    def __init__(self, max_value: float = 2, axis: AxisArg = 0) -> None:
        self.max_value = max_value
        self.axis = axis

    def __call__(self, w: Any) -> np.ndarray:
        a = _array(w)
        norms = _norms(a, self.axis)
        desired = np.clip(norms, 0, self.max_value)
        return a * (desired / (a.dtype.type(_EPSILON) + norms))  # type: ignore[no-any-return]

    def get_config(self) -> dict[str, Any]:
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(Constraint):
    """Moves the L2 norm (over ``axis``) into [min_value, max_value] at ``rate``."""

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: AxisArg = 0) -> None:
        self.min_value = min_value
        self.max_value = max_value
        self.rate = rate
        self.axis = axis

    def __call__(self, w: Any) -> np.ndarray:
        a = _array(w)
        norms = _norms(a, self.axis)
        desired = self.rate * np.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms
        return a * (desired / (a.dtype.type(_EPSILON) + norms)).astype(a.dtype)  # type: ignore[no-any-return]

    def get_config(self) -> dict[str, Any]:
        return {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate, "axis": self.axis}


class UnitNorm(Constraint):
    """Rescales to unit L2 norm over ``axis``."""

    def __init__(self, axis: AxisArg = 0) -> None:
        self.axis = axis

    def __call__(self, w: Any) -> np.ndarray:
        a = _array(w)
        return a / (a.dtype.type(_EPSILON) + _norms(a, self.axis))  # type: ignore[no-any-return]

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis}


non_neg = NonNeg
max_norm = MaxNorm
min_max_norm = MinMaxNorm
unit_norm = UnitNorm

_CLASSES: dict[str, type[Constraint]] = {c.__name__: c for c in (NonNeg, MaxNorm, MinMaxNorm, UnitNorm)}
_NAMES: dict[str, type[Constraint]] = {
    "non_neg": NonNeg,
    "nonneg": NonNeg,
    "max_norm": MaxNorm,
    "maxnorm": MaxNorm,
    "min_max_norm": MinMaxNorm,
    "unit_norm": UnitNorm,
    "unitnorm": UnitNorm,
}

ConstraintLike = Constraint | Callable[[Any], Any]


def serialize(constraint: ConstraintLike | None) -> dict[str, Any] | None:
    """tf-keras's serialized form: ``{"module", "class_name", "config", "registered_name"}``."""
    return serialize_object(constraint, "keras.constraints", Constraint, "constraint")


def deserialize(config: dict[str, Any] | str) -> Constraint:
    """The constraint a :func:`serialize` dict (or a name) describes."""
    obj = deserialize_object(config, _CLASSES, _NAMES, "constraint")
    assert isinstance(obj, Constraint)
    return obj


def get(identifier: Any) -> ConstraintLike | None:
    """A constraint from a name, a serialized dict, an object or a callable (None stays None)."""
    return get_object(identifier, Constraint, deserialize, "constraint")  # type: ignore[no-any-return]
