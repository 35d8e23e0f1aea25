"""The weights of a built Keras-style layer: tf-keras's names and order, the optimizer
protocol, get_weights/set_weights, and the all-or-nothing copy every change goes through."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._functional import real_array
from ._build import Build

WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
_TRAINABLE = ("gamma", "beta")


def copy_all(targets: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
    """np.copyto(targets[k], values[k]) for every k, all or nothing: the weights are live
    arrays (updated in place), and if a copy fails (it cannot, short of an asynchronous
    exception or an injected fault), the copies already made are undone."""
    done: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        for key, value in values.items():
            target = targets[key]
            done.append((target, target.copy()))
            np.copyto(target, value)
    except BaseException:
        for target, old in reversed(done):
            target[...] = old
        raise


class LayerWeights:
    """The weight half of BatchNormalization (its base class): reads and writes ``_build.weights``."""

    name: str
    compute_dtype: np.dtype[Any]
    gamma_regularizer: Any
    beta_regularizer: Any
    gamma_constraint: Any
    beta_constraint: Any
    _trainable: bool
    _lock: threading.RLock
    _build: Build | None

    @property
    def dtype(self) -> str:
        """The layer's (compute) dtype name: float16, bfloat16, float32 or float64."""
        return "bfloat16" if self.compute_dtype.name == "bfloat16" else self.compute_dtype.name

    @property
    def built(self) -> bool:
        return self._build is not None

    @property
    def trainable(self) -> bool:
        """False: gamma/beta are not trainable and every call runs in inference mode."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        with self._lock:
            self._trainable = bool(value)

    def _weight(self, key: str) -> np.ndarray | None:
        b = self._build
        return None if b is None else b.weights.get(key)

    @property
    def gamma(self) -> np.ndarray | None:
        return self._weight("gamma")

    @property
    def beta(self) -> np.ndarray | None:
        return self._weight("beta")

    @property
    def moving_mean(self) -> np.ndarray | None:
        return self._weight("moving_mean")

    @property
    def moving_variance(self) -> np.ndarray | None:
        return self._weight("moving_variance")

    @property
    def moving_stddev(self) -> np.ndarray | None:
        return self._weight("moving_stddev")

    @property
    def renorm_mean(self) -> np.ndarray | None:
        return self._weight("renorm_mean")

    @property
    def renorm_stddev(self) -> np.ndarray | None:
        return self._weight("renorm_stddev")

    def _weight_keys(self) -> list[str]:
        b = self._build
        return [] if b is None else [k for k in WEIGHTS if k in b.weights]

    @property
    def weight_names(self) -> list[str]:
        """tf-keras's variable names, in weights order: ``<name>/gamma:0``, ..."""
        return [f"{self.name}/{k}:0" for k in self._weight_keys()]

    @property
    def weights(self) -> list[np.ndarray]:
        """The weights (live arrays) in tf-keras order: gamma, beta, moving_mean, moving_variance, renorm's."""
        b = self._build
        return [] if b is None else [b.weights[k] for k in self._weight_keys()]

    @property
    def trainable_weights(self) -> list[np.ndarray]:
        return list(self.trainable_parameters.values())

    @property
    def non_trainable_weights(self) -> list[np.ndarray]:
        b = self._build
        if b is None:
            return []
        keys = self._weight_keys()
        if self._trainable:
            keys = [k for k in keys if k not in _TRAINABLE]
        return [b.weights[k] for k in keys]

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """The optimizer protocol: trainable weights by name (live arrays, updated in place)."""
        b = self._build
        if b is None or not self._trainable:
            return {}
        return {k: b.weights[k] for k in _TRAINABLE if k in b.weights}

    @property
    def parameter_regularizers(self) -> dict[str, Any]:
        """The optimizer protocol: regularizers by parameter name (their gradients join the update)."""
        regs = {"gamma": self.gamma_regularizer, "beta": self.beta_regularizer}
        return {k: r for k, r in regs.items() if r is not None}

    @property
    def parameter_constraints(self) -> dict[str, Any]:
        """The optimizer protocol: constraints by parameter name (applied after each update)."""
        cons = {"gamma": self.gamma_constraint, "beta": self.beta_constraint}
        return {k: c for k, c in cons.items() if c is not None}

    @property
    def losses(self) -> list[np.floating[Any]]:
        """Regularization penalties of the current weights (gamma's, then beta's)."""
        out: list[np.floating[Any]] = []
        for key, reg in (("gamma", self.gamma_regularizer), ("beta", self.beta_regularizer)):
            w = self._weight(key)
            if reg is not None and w is not None:
                out.append(w.dtype.type(np.asarray(reg(w))))
        return out

    def get_weights(self) -> list[np.ndarray]:
        """Copies of the weights, in tf-keras order."""
        with self._lock:
            return [np.array(a, copy=True) for a in self.weights]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets the weights from a list in tf-keras order (e.g. a tf-keras layer's get_weights())."""
        with self._lock:
            keys = self._weight_keys()
            ws = list(weights)
            if len(ws) != len(keys):
                raise ValueError(
                    f'You called `set_weights(weights)` on layer "{self.name}" with a weight list of length '
                    f"{len(ws)}, but the layer was expecting {len(keys)} weights."
                    + ("" if self.built else " The layer is not built yet: call it or build(input_shape) first.")
                )
            b = self._build
            new: list[np.ndarray] = []
            for key, value in zip(keys, ws, strict=True):
                assert b is not None
                ref = b.weights[key]
                arr = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
                if arr.shape != ref.shape:
                    raise ValueError(
                        f"Layer {self.name} weight shape {ref.shape} is not compatible with provided weight "
                        f"shape {arr.shape} (weight {key!r})."
                    )
                real_array(arr, f"weight {key!r}")
                new.append(arr.astype(ref.dtype))
            if b is not None:
                copy_all(b.weights, dict(zip(keys, new, strict=True)))
