"""Keras-style weight regularizers: a penalty added to the loss, and its gradient.

``L1(l1=0.01)``: ``l1 * sum(|w|)``; ``L2(l2=0.01)``: ``l2 * sum(w**2)``;
``L1L2(l1=0.0, l2=0.0)``: both. The names ``"l1"``, ``"l2"`` and ``"l1_l2"`` give
tf-keras's defaults (``"l1_l2"`` means ``L1L2(l1=0.01, l2=0.01)``). As in tf-keras the
factors are stored as float32 values (so ``L2(0.01).l2 == 0.009999999776482582``).

A regularizer is called on a weight for the penalty (``reg(w)``, a float32 scalar) and
``reg.gradient(w)`` gives its derivative, which the optimizers in
:mod:`batchnorm.optimizers` add to the layer's gradients (the derivative of ``|w|`` at 0
is 0, as TensorFlow's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._serialization import deserialize_object, get_object, serialize_object

__all__ = ["L1", "L1L2", "L2", "Regularizer", "deserialize", "get", "l1", "l1_l2", "l2", "serialize"]


def _factor(value: Any, name: str) -> float:
    try:
        f = float(np.float32(value))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(f) or f < 0:
        raise ValueError(f"Value of `{name}` must be a finite number >= 0. Received: {name}={value!r}")
    return f


def _array(w: Any) -> np.ndarray:
    a = np.asarray(w)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


class Regularizer:
    """Base class: ``reg(w)`` is the penalty, ``reg.gradient(w)`` its derivative."""

    def __call__(self, w: Any) -> np.floating[Any]:
        return np.float32(0.0)

    def gradient(self, w: Any) -> np.ndarray:
        return np.zeros_like(_array(w))

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Regularizer:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class L1L2(Regularizer):
    """``l1 * sum(|w|) + l2 * sum(w**2)``."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0) -> None:
        self.l1 = _factor(l1, "l1")
        self.l2 = _factor(l2, "l2")

    def __call__(self, w: Any) -> np.floating[Any]:
        a = _array(w)
        total = a.dtype.type(0.0)
        if self.l1:
            total = total + a.dtype.type(self.l1) * np.sum(np.abs(a))
        if self.l2:
            total = total + a.dtype.type(self.l2) * np.sum(np.square(a))
        return total  # type: ignore[no-any-return]

    def gradient(self, w: Any) -> np.ndarray:
        a = _array(w)
        g = np.zeros_like(a)
        if self.l1:
            g += a.dtype.type(self.l1) * np.sign(a)
        if self.l2:
            g += a.dtype.type(2.0 * self.l2) * a
        return g

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


class L1(L1L2):
    """``l1 * sum(|w|)`` (tf-keras default l1=0.01)."""

    def __init__(self, l1: float = 0.01) -> None:
        super().__init__(l1=l1, l2=0.0)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


class L2(L1L2):
    """``l2 * sum(w**2)`` (tf-keras default l2=0.01)."""

    def __init__(self, l2: float = 0.01) -> None:
        super().__init__(l1=0.0, l2=l2)

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}


def l1_l2(l1: float = 0.01, l2: float = 0.01) -> L1L2:
    """tf-keras's ``l1_l2`` shortcut: both penalties, 0.01 each by default."""
    return L1L2(l1=l1, l2=l2)


l1 = L1
l2 = L2

_CLASSES: dict[str, type[Regularizer]] = {c.__name__: c for c in (L1, L2, L1L2)}


class _L1L2Default(L1L2):
    def __init__(self) -> None:
        super().__init__(l1=0.01, l2=0.01)


_NAMES: dict[str, type[Regularizer]] = {"l1": L1, "l2": L2, "l1_l2": _L1L2Default}

RegularizerLike = Regularizer | Callable[[Any], Any]


def serialize(regularizer: RegularizerLike | None) -> dict[str, Any] | None:
    """tf-keras's serialized form: ``{"module", "class_name", "config", "registered_name"}``."""
    if isinstance(regularizer, _L1L2Default):
        return {
            "module": "keras.regularizers",
            "class_name": "L1L2",
            "config": regularizer.get_config(),
            "registered_name": None,
        }
    return serialize_object(regularizer, "keras.regularizers", Regularizer, "regularizer")


def deserialize(config: dict[str, Any] | str) -> Regularizer:
    """The regularizer a :func:`serialize` dict (or a name) describes."""
    obj = deserialize_object(config, _CLASSES, _NAMES, "regularizer")
    assert isinstance(obj, Regularizer)
    return obj


def get(identifier: Any) -> RegularizerLike | None:
    """A regularizer from a name, a serialized dict, an object or a callable (None stays None)."""
    return get_object(identifier, Regularizer, deserialize, "regularizer")  # type: ignore[no-any-return]


def gradient(regularizer: RegularizerLike, w: np.ndarray) -> np.ndarray:
    """The penalty's derivative at ``w``: ``regularizer.gradient(w)``.

    A plain callable (not a :class:`Regularizer`) has no known derivative; it must
    provide a ``gradient`` method to be used with the optimizers.
    """
    grad = getattr(regularizer, "gradient", None)
    if grad is None:
        raise TypeError(
            f"the regularizer {regularizer!r} has no gradient(w) method, so an optimizer cannot apply it; "
            "use batchnorm.regularizers.L1/L2/L1L2 or give it a gradient method"
        )
    return np.asarray(grad(w))
