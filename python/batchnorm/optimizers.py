"""Optimizers for the layers' trainable parameters, with tf-keras's (Keras 2.11+) formulas.

``opt.step(layer)`` (or a list of layers) updates each trainable parameter of the layer
in place from ``layer.grads`` plus the parameter's regularizer gradient, then applies
the parameter's constraint. It works with any object that follows this small protocol:

* ``layer.trainable_parameters``: a dict ``name -> np.ndarray`` of the parameters,
  updated in place (``BatchNormalization``: ``"gamma"``, ``"beta"``); without it, the
  array attributes named like the gradients (a PyTorch-style layer's ``weight`` and
  ``bias``);
* ``layer.grads``: a dict ``name -> gradient`` (a parameter without a gradient is left
  alone and its step count does not advance);
* optionally ``layer.parameter_regularizers`` and ``layer.parameter_constraints``:
  dicts ``name -> regularizer`` (with a ``gradient(w)`` method) and ``name -> callable``.

State (momenta, velocities, step counts) is kept per parameter, i.e. per (layer, name);
a parameter's step count advances once per update of that parameter. The arithmetic is
done in the parameter's dtype, as TensorFlow does, with tf-keras's rounding of the
hyperparameters: each is rounded once from the Python (double) value to that dtype -
``1 - beta_2`` is the double difference, rounded once - except the learning rate, which
tf-keras keeps in a float32 variable: it is rounded to float32 first, even for float64
parameters (so float64 results match tf-keras's bit for bit, not the exact rate's).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import weakref
from typing import Any

import numpy as np

from ._functional import real_array
from .keras import regularizers as _regularizers

__all__ = ["SGD", "Adam", "Optimizer", "RMSprop"]


def _hyper(value: Any, name: str, low: float = 0.0, high: float = math.inf, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok = (v > low if open_low else v >= low) and v <= high
    if not ok or math.isnan(v):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return v


class _Slot:
    """One parameter's optimizer state."""

    __slots__ = ("arrays", "step")

    def __init__(self) -> None:
        self.step = 0
        self.arrays: dict[str, np.ndarray] = {}

    def copy(self) -> _Slot:
        s = _Slot()
        s.step = self.step
        s.arrays = {k: v.copy() for k, v in self.arrays.items()}
        return s

    def get(self, key: str, like: np.ndarray) -> np.ndarray:
        a = self.arrays.get(key)
        if a is None or a.shape != like.shape or a.dtype != like.dtype:
            a = np.zeros_like(like)
            self.arrays[key] = a
        return a


class Optimizer:
    """Base class: subclasses implement ``_update(param, grad, slot)`` (in place)."""

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = _hyper(learning_rate, "learning_rate")
        self._state: weakref.WeakKeyDictionary[Any, dict[str, _Slot]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def step(self, layers: Any) -> None:
        """Applies the layer's (or layers') ``grads`` to its trainable parameters."""
        items = layers if isinstance(layers, (list, tuple)) else [layers]
        for layer in items:
            self._step_one(layer)

    def _step_one(self, layer: Any) -> None:
        grads: dict[str, Any] = dict(getattr(layer, "grads", None) or {})
        if hasattr(layer, "trainable_parameters"):
            params: dict[str, np.ndarray] = dict(layer.trainable_parameters)
        elif hasattr(layer, "grads"):  # no explicit list: the attributes the gradients are named after
            params = {k: getattr(layer, k) for k in grads if isinstance(getattr(layer, k, None), np.ndarray)}
            missing = sorted(set(grads) - set(params))
            if missing:
                raise TypeError(f"{type(layer).__name__} has gradients for {missing} but no such array attributes")
        else:
            raise TypeError(
                f"{type(layer).__name__} exposes neither trainable_parameters (a dict name -> array) nor grads; "
                "the optimizers update layers that do"
            )
        regs: dict[str, Any] = dict(getattr(layer, "parameter_regularizers", None) or {})
        cons: dict[str, Any] = dict(getattr(layer, "parameter_constraints", None) or {})
        # Check everything first, so a bad gradient changes nothing.
        work: list[tuple[str, np.ndarray, np.ndarray]] = []
        for name, param in params.items():
            if name not in grads or grads[name] is None:
                continue
            if not isinstance(param, np.ndarray) or not param.flags.writeable:
                raise TypeError(f"parameter {name!r} must be a writeable NumPy array to be updated in place")
            g = real_array(grads[name], f"gradient of {name!r}")
            if g.shape != param.shape:
                if g.size != param.size:
                    raise ValueError(f"gradient of {name!r} has shape {g.shape}; the parameter has {param.shape}")
                g = g.reshape(param.shape)
            g = g.astype(param.dtype)
            if name in regs:
                g = g + _regularizers.gradient(regs[name], param).astype(param.dtype)
            work.append((name, param, g))
        with self._lock:
            try:
                slots = self._state.setdefault(layer, {})
            except TypeError:  # not weak-referenceable: keep it alive with the state
                slots = self._strong_state(layer)
            # The updates run on copies of the parameters and of their optimizer state,
            # committed together at the end: an update or a constraint that raises changes
            # neither the layer nor the optimizer.
            staged: list[tuple[str, np.ndarray, np.ndarray, _Slot]] = []
            for name, param, g in work:
                slot = slots[name].copy() if name in slots else _Slot()
                new = param.copy()
                slot.step += 1
                self._update(new, g, slot)
                if name in cons:
                    new[...] = real_array(cons[name](new), f"constraint of {name!r}'s result").astype(param.dtype)
                staged.append((name, param, new, slot))
            # Under the layer's own lock (if it has one), so that a concurrent call of the
            # layer sees all of this step's parameters or none of them.
            lock: Any = getattr(layer, "_lock", None)
            with lock if hasattr(lock, "__enter__") else contextlib.nullcontext():
                for name, param, new, slot in staged:
                    param[...] = new
                    slots[name] = slot

    def __getstate__(self) -> dict[str, Any]:
        """copy.deepcopy and pickle: the hyperparameters and each layer's slots, held strongly
        (a weak mapping cannot be pickled); a layer copied or pickled together with the
        optimizer keeps its state in the copy, the others' state is dropped with them."""
        with self._lock:
            state = self.__dict__.copy()
            state["_state"] = list(self._state.items())
            state["_strong"] = list(state.get("_strong", {}).values())
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        pairs, strong = state.pop("_state"), state.pop("_strong")
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._state = weakref.WeakKeyDictionary(pairs)
        if strong:  # keyed by the id of the layer, which is a new object
            self._strong = {id(layer): (layer, slots) for layer, slots in strong}

    def _strong_state(self, layer: Any) -> dict[str, _Slot]:
        store: dict[int, tuple[Any, dict[str, _Slot]]] = self.__dict__.setdefault("_strong", {})
        entry = store.setdefault(id(layer), (layer, {}))
        return entry[1]

    def _update(self, param: np.ndarray, grad: np.ndarray, slot: _Slot) -> None:
        raise NotImplementedError

    def iterations(self, layer: Any, name: str) -> int:
        """How many updates parameter ``name`` of ``layer`` has received."""
        slots = self._state.get(layer, {})
        return slots[name].step if name in slots else 0

    def get_config(self) -> dict[str, Any]:
        return {"learning_rate": self.learning_rate}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _f(x: float, like: np.ndarray) -> Any:
    """A Python hyperparameter as a scalar of the parameter's dtype (tf.cast(x, var.dtype))."""
    return like.dtype.type(x)


def _lr(x: float, like: np.ndarray) -> Any:
    """The learning rate as tf-keras uses it: a float32 variable cast to the parameter's dtype,
    so rounded to float32 first, even for float64 parameters."""
    return like.dtype.type(np.float32(x))


class SGD(Optimizer):
    """Gradient descent with optional (Nesterov) momentum, tf-keras's form:

    ``m = momentum*m - lr*g``; ``w += m`` (Nesterov: ``w += momentum*m - lr*g``).
    """

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(learning_rate)
        self.momentum = _hyper(momentum, "momentum", 0.0, 1.0)
        self.nesterov = bool(nesterov)

    def _update(self, param: np.ndarray, grad: np.ndarray, slot: _Slot) -> None:
        lr = _lr(self.learning_rate, param)
        if self.momentum == 0.0 and not self.nesterov:
            param += -grad * lr
            return
        mom = _f(self.momentum, param)
        m = slot.get("m", param)
        m[...] = -grad * lr + m * mom
        if self.nesterov:
            param += -grad * lr + m * mom
        else:
            param += m

    def get_config(self) -> dict[str, Any]:
        return {"learning_rate": self.learning_rate, "momentum": self.momentum, "nesterov": self.nesterov}


class RMSprop(Optimizer):
    """RMSprop, tf-keras's form (epsilon inside the square root):

    ``v = rho*v + (1-rho)*g^2``; centered: ``a = rho*a + (1-rho)*g``, ``den = v - a^2 + eps``,
    else ``den = v + eps``; ``inc = lr*g/sqrt(den)``; momentum: ``m = momentum*m + inc``,
    ``w -= m``; else ``w -= inc``.
    """

    def __init__(
        self,
        learning_rate: float = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-07,
        centered: bool = False,
    ) -> None:
        super().__init__(learning_rate)
        self.rho = _hyper(rho, "rho", 0.0, 1.0)
        self.momentum = _hyper(momentum, "momentum", 0.0, 1.0)
        self.epsilon = _hyper(epsilon, "epsilon")
        self.centered = bool(centered)

    def _update(self, param: np.ndarray, grad: np.ndarray, slot: _Slot) -> None:
        lr = _lr(self.learning_rate, param)
        rho = _f(self.rho, param)
        one_minus_rho = _f(1.0 - self.rho, param)
        eps = _f(self.epsilon, param)
        v = slot.get("velocity", param)
        v[...] = rho * v + one_minus_rho * np.square(grad)
        if self.centered:
            a = slot.get("average_gradient", param)
            a[...] = rho * a + one_minus_rho * grad
            den = v - np.square(a) + eps
        else:
            den = v + eps
        inc = lr * grad * (1 / np.sqrt(den))
        if self.momentum > 0:
            m = slot.get("momentum", param)
            m[...] = _f(self.momentum, param) * m + inc
            param -= m
        else:
            param -= inc

    def get_config(self) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "rho": self.rho,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "centered": self.centered,
        }


class Adam(Optimizer):
    """Adam, tf-keras's form (``t`` = this parameter's step count, from 1):

    ``alpha = lr*sqrt(1-beta_2^t)/(1-beta_1^t)``; ``m += (g-m)*(1-beta_1)``;
    ``v += (g^2-v)*(1-beta_2)``; amsgrad: ``v_hat = max(v_hat, v)``;
    ``w -= m*alpha/(sqrt(v or v_hat) + eps)``.
    """

    def __init__(
        self,
        learning_rate: float = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-07,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(learning_rate)
        self.beta_1 = _hyper(beta_1, "beta_1", 0.0, 1.0)
        self.beta_2 = _hyper(beta_2, "beta_2", 0.0, 1.0)
        self.epsilon = _hyper(epsilon, "epsilon")
        self.amsgrad = bool(amsgrad)

    def _update(self, param: np.ndarray, grad: np.ndarray, slot: _Slot) -> None:
        one = _f(1.0, param)
        lr = _lr(self.learning_rate, param)
        t = _f(slot.step, param)
        beta_1_power = np.power(_f(self.beta_1, param), t)
        beta_2_power = np.power(_f(self.beta_2, param), t)
        alpha = lr * np.sqrt(one - beta_2_power) / (one - beta_1_power)
        m = slot.get("m", param)
        v = slot.get("v", param)
        # tf-keras's (1 - self.beta_2) is a Python (double) difference, rounded once to the dtype
        m += (grad - m) * _f(1.0 - self.beta_1, param)
        v += (np.square(grad) - v) * _f(1.0 - self.beta_2, param)
        if self.amsgrad:
            v_hat = slot.get("vhat", param)
            np.maximum(v_hat, v, out=v_hat)
            v_use = v_hat
        else:
            v_use = v
        param -= (m * alpha) / (np.sqrt(v_use) + _f(self.epsilon, param))

    def get_config(self) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "amsgrad": self.amsgrad,
        }
