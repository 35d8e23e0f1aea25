"""Keras-style weight initializers for :class:`batchnorm.BatchNormalization`.

``get(identifier)`` accepts what tf-keras accepts: a Keras name (``"zeros"``,
``"ones"``, ``"constant"``, ``"random_normal"``, ``"random_uniform"``,
``"truncated_normal"``, ``"glorot_uniform"``, ``"glorot_normal"``, ``"he_normal"``,
``"he_uniform"``, ``"lecun_normal"``, ``"lecun_uniform"``, ``"variance_scaling"``), a
class name (``"GlorotUniform"``), a serialized dict (``{"class_name": ..., "config":
...}``), an initializer object, or any callable ``f(shape, dtype=None) -> array``.

The formulas and defaults are tf-keras's (``VarianceScaling`` fans, the truncated
normal's 2-sigma cut and its 0.8796 correction). Random draws come from NumPy, so the
values differ from TensorFlow's for the same seed; a seeded initializer gives the same
values on every call, an unseeded one new values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._serialization import deserialize_object, get_object, serialize_object

__all__ = [
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Initializer",
    "LecunNormal",
    "LecunUniform",
    "Ones",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
    "deserialize",
    "get",
    "serialize",
]

Shape = tuple[int, ...]
DTypeLike = Any


def _dtype(dtype: DTypeLike) -> np.dtype[Any]:
    return np.dtype(np.float32 if dtype is None else dtype)


class Initializer:
    """Base class: ``init(shape, dtype=None)`` returns a new NumPy array."""

    def __call__(self, shape: Shape, dtype: DTypeLike = None) -> np.ndarray:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Initializer:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Zeros(Initializer):
    """All zeros."""

    def __call__(self, shape: Shape, dtype: DTypeLike = None) -> np.ndarray:
        return np.zeros(tuple(shape), _dtype(dtype))


class Ones(Initializer):
    """All ones."""

    def __call__(self, shape: Shape, dtype: DTypeLike = None) -> np.ndarray:
        return np.ones(tuple(shape), _dtype(dtype))


class Constant(Initializer):
    """Every element ``value`` (a scalar)."""

    def __init__(self, value: float = 0) -> None:
        if not np.isscalar(value):
            raise TypeError(f"Constant initializer takes a scalar value, got {value!r}")
        self.value = value

    def __call__(self, shape: Shape, dtype: DTypeLike = None) -> np.ndarray:
        return np.full(tuple(shape), self.value, _dtype(dtype))

    def get_config(self) -> dict[str, Any]:
        return {"value": self.value}


class _Random(Initializer):
    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


def _truncated_normal(rng: np.random.Generator, mean: float, stddev: float, shape: Shape) -> np.ndarray:
    """Normal(mean, stddev) values redrawn until within two standard deviations."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return mean + stddev * out


class RandomNormal(_Random):
    """Normal distribution (tf-keras defaults: mean 0, stddev 0.05)."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def __call__(self, shape: Shape, dtype: DTypeLike = None) -> np.ndarray:
        return self._rng().normal(self.mean, self.stddev, tuple(shape)).astype(_dtype(dtype))

    def get_config(self) -> dict[str, Any]:
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


class RandomUniform(_Random):
    """Uniform distribution on [minval, maxval) (tf-keras defaults: -0.05, 0.05)."""

    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None) -> None:
        super().__init__(seed)
        self.minval, self.maxval = minval, maxval

    def __call__(self, shape: Shape, dtype: DTypeLike = None) -> np.ndarray:
        return self._rng().uniform(self.minval, self.maxval, tuple(shape)).astype(_dtype(dtype))

    def get_config(self) -> dict[str, Any]:
        return {"minval": self.minval, "maxval": self.maxval, "seed": self.seed}


class TruncatedNormal(_Random):
    """Normal distribution cut at two standard deviations (mean 0, stddev 0.05)."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def __call__(self, shape: Shape, dtype: DTypeLike = None) -> np.ndarray:
        return _truncated_normal(self._rng(), self.mean, self.stddev, tuple(shape)).astype(_dtype(dtype))

    def get_config(self) -> dict[str, Any]:
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


def _fans(shape: Shape) -> tuple[float, float]:
    """tf-keras's fan_in, fan_out: the last two dims times the receptive field."""
    if len(shape) < 1:
        return 1.0, 1.0
    if len(shape) == 1:
        return float(shape[0]), float(shape[0])
    if len(shape) == 2:
        return float(shape[0]), float(shape[1])
    receptive = float(math.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


class VarianceScaling(_Random):
    """Samples scaled to the weight's fans: ``scale / n`` variance, n from ``mode``."""

    _MODES = ("fan_in", "fan_out", "fan_avg")
    _DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if not scale > 0.0:
            raise ValueError(f"Argument `scale` must be positive float. Received: scale={scale}")
        if mode not in self._MODES:
            raise ValueError(f"Argument `mode` should be one of {self._MODES}. Received: mode={mode!r}")
        distribution = distribution.lower()
        if distribution == "normal":  # tf-keras's compatibility alias
            distribution = "truncated_normal"
        if distribution not in self._DISTRIBUTIONS:
            raise ValueError(
                f"Argument `distribution` should be one of {self._DISTRIBUTIONS}. "
                f"Received: distribution={distribution!r}"
            )
        self.scale, self.mode, self.distribution = scale, mode, distribution

    def __call__(self, shape: Shape, dtype: DTypeLike = None) -> np.ndarray:
        shape = tuple(shape)
        fan_in, fan_out = _fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        scale = self.scale / max(1.0, n)
        rng = self._rng()
        if self.distribution == "truncated_normal":
            # 0.879... is the stddev of a unit normal truncated to [-2, 2].
            out = _truncated_normal(rng, 0.0, math.sqrt(scale) / 0.87962566103423978, shape)
        elif self.distribution == "untruncated_normal":
            out = rng.normal(0.0, math.sqrt(scale), shape)
        else:
            limit = math.sqrt(3.0 * scale)
            out = rng.uniform(-limit, limit, shape)
        return out.astype(_dtype(dtype))

    def get_config(self) -> dict[str, Any]:
        return {"scale": self.scale, "mode": self.mode, "distribution": self.distribution, "seed": self.seed}


class _Preset(VarianceScaling):
    """A VarianceScaling with fixed scale/mode/distribution; its config is the seed only."""

    _PRESET: tuple[float, str, str] = (1.0, "fan_in", "truncated_normal")

    def __init__(self, seed: int | None = None) -> None:
        scale, mode, distribution = self._PRESET
        super().__init__(scale, mode, distribution, seed)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


class GlorotUniform(_Preset):
    """Uniform on ±sqrt(6 / (fan_in + fan_out))."""

    _PRESET = (1.0, "fan_avg", "uniform")


class GlorotNormal(_Preset):
    """Truncated normal with stddev sqrt(2 / (fan_in + fan_out))."""

    _PRESET = (1.0, "fan_avg", "truncated_normal")


class HeNormal(_Preset):
    """Truncated normal with stddev sqrt(2 / fan_in)."""

    _PRESET = (2.0, "fan_in", "truncated_normal")


class HeUniform(_Preset):
    """Uniform on ±sqrt(6 / fan_in)."""

    _PRESET = (2.0, "fan_in", "uniform")


class LecunNormal(_Preset):
    """Truncated normal with stddev sqrt(1 / fan_in)."""

    _PRESET = (1.0, "fan_in", "truncated_normal")


class LecunUniform(_Preset):
    """Uniform on ±sqrt(3 / fan_in)."""

    _PRESET = (1.0, "fan_in", "uniform")


_CLASSES: dict[str, type[Initializer]] = {
    c.__name__: c
    for c in (
        Zeros,
        Ones,
        Constant,
        RandomNormal,
        RandomUniform,
        TruncatedNormal,
        VarianceScaling,
        GlorotUniform,
        GlorotNormal,
        HeNormal,
        HeUniform,
        LecunNormal,
        LecunUniform,
    )
}
_NAMES: dict[str, type[Initializer]] = {
    "zeros": Zeros,
    "zero": Zeros,
    "ones": Ones,
    "one": Ones,
    "constant": Constant,
    "random_normal": RandomNormal,
    "normal": RandomNormal,
    "random_uniform": RandomUniform,
    "uniform": RandomUniform,
    "truncated_normal": TruncatedNormal,
    "variance_scaling": VarianceScaling,
    "glorot_uniform": GlorotUniform,
    "glorot_normal": GlorotNormal,
    "he_normal": HeNormal,
    "he_uniform": HeUniform,
    "lecun_normal": LecunNormal,
    "lecun_uniform": LecunUniform,
}

InitializerLike = Initializer | Callable[..., Any]


def serialize(initializer: InitializerLike | None) -> dict[str, Any] | None:
    """tf-keras's serialized form: ``{"module", "class_name", "config", "registered_name"}``."""
    return serialize_object(initializer, "keras.initializers", Initializer, "initializer")


def deserialize(config: dict[str, Any] | str) -> Initializer:
    """The initializer a :func:`serialize` dict (or a name) describes."""
    obj = deserialize_object(config, _CLASSES, _NAMES, "initializer")
    assert isinstance(obj, Initializer)
    return obj


def get(identifier: Any) -> InitializerLike | None:
    """An initializer from a name, a serialized dict, an object or a callable (None stays None)."""
    return get_object(identifier, Initializer, deserialize, "initializer")  # type: ignore[no-any-return]
