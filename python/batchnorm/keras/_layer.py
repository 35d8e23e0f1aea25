"""The Keras-style stateful layer: ``BatchNormalization`` with tf-keras 2's semantics.

Every call is one pass of the core's kernels over the input (or over a reshaped view of
it); the per-channel bookkeeping around it (moving averages, renorm corrections,
ghost-batch parameter tiling) is NumPy on arrays of C values.

Conventions (tf-keras 2, see SEMANTICS.md §2):

* ``momentum`` weights the old value: ``moving = moving - (moving - batch) * (1 - momentum)``.
* The output is always normalized with the biased batch variance. ``moving_variance``
  receives the biased one too, except on tf-keras's *fused* path (4-D/5-D input, channel
  axis first or last, no renorm / virtual batch / adjustment, ``fused`` None or True),
  where TensorFlow's fused kernel returns, and tf-keras stores, the unbiased
  ``M/(M-1)`` variance.
* ``training=None`` means inference; ``trainable=False`` forces inference and freezes
  the moving statistics.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import numbers
import operator
import os
import threading
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._functional import inv_std_of
from . import constraints, initializers, regularizers

__all__ = ["BatchNormalization"]

_log = logging.getLogger("batchnorm")

_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
_TRAINABLE = ("gamma", "beta")
_SAVE_FORMAT = 1

_name_lock = threading.Lock()
_name_counters: dict[str, itertools.count[int]] = {}


def _unique_name(base: str) -> str:
    """tf-keras's default names: batch_normalization, batch_normalization_1, ..."""
    with _name_lock:
        n = next(_name_counters.setdefault(base, itertools.count()))
    return base if n == 0 else f"{base}_{n}"


def _resolve_dtype(dtype: Any) -> tuple[Any, np.dtype[Any], np.dtype[Any]]:
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


def _copy_all(targets: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
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


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range: infinite, which the range checks reject by name
        big: Any = value
        return math.inf if big > 0 else -math.inf


def _momentum(value: Any, name: str) -> float:
    m = _real(value, name)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (the weight of the old moving value), got {value!r}")
    return m


def _axis_arg(axis: Any) -> int | list[int]:
    def as_int(a: Any) -> int:
        if isinstance(a, bool):
            raise TypeError
        return operator.index(a)

    try:
        if isinstance(axis, (list, tuple)):
            if not axis:
                raise ValueError("axis must name at least one feature axis, got an empty list")
            return [as_int(a) for a in axis]
        return as_int(axis)
    except TypeError:
        raise TypeError(
            f"Expected an int or a list/tuple of ints for the argument 'axis', but received: {axis!r}"
        ) from None


def _renorm_clipping(clipping: Any) -> dict[str, float | None]:
    clipping = clipping or {}
    if not isinstance(clipping, dict):
        raise TypeError(f"renorm_clipping must be a dict with keys rmax, rmin, dmax; got {clipping!r}")
    keys = ["rmax", "rmin", "dmax"]
    if set(clipping) - set(keys):
        raise ValueError(f"Received invalid keys for `renorm_clipping` argument: {clipping}. Supported values: {keys}.")
    out: dict[str, float | None] = {}
    for k, v in clipping.items():
        out[k] = None if v is None else _real(v, f"renorm_clipping[{k!r}]")
    rmax, rmin, dmax = out.get("rmax"), out.get("rmin"), out.get("dmax")
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(f"renorm_clipping: rmax ({rmax}) must be >= rmin ({rmin})")
    if dmax is not None and dmax < 0:
        raise ValueError(f"renorm_clipping: dmax must be >= 0, got {dmax}")
    for k, v in out.items():
        if v is not None and math.isnan(v):
            raise ValueError(f"renorm_clipping[{k!r}] is NaN")
    return out


@dataclass
class _Build:
    """What building for an input shape decides: axes, fused, parameter shape, weights."""

    rank: int
    axes: tuple[int, ...]  # resolved feature axes, in the order given
    dims: dict[int, int]  # feature axis -> its size (the input spec)
    fused: bool
    param_shape: tuple[int, ...]
    weights: dict[str, np.ndarray]


@dataclass
class _Last:
    """What backward needs from the last call."""

    training: bool
    x: np.ndarray  # the (possibly reshaped) input the kernels saw
    input_shape: tuple[int, ...]
    axes: tuple[int, ...]  # feature axes of x for the core
    mean: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray | None  # the effective per-channel scale the pass used (tiled for ghost batches)
    reps: int  # ghost batches (1 without)
    scale_mult: np.ndarray | None  # d y / d gamma = x_hat * scale_mult + offset_mult
    offset_mult: np.ndarray | None
    weights: np.ndarray | None  # mask frequency weights (broadcastable to x), mask path only
    has_gamma: bool
    has_beta: bool
    param_shape: tuple[int, ...]


class BatchNormalization:
    """Batch normalization layer with tf-keras 2's arguments, numbers and quirks.

    ``layer(x, training=True)`` normalizes with the batch statistics and updates the
    moving statistics; ``training=False`` or ``None`` uses the moving statistics.
    ``layer.backward(dy)`` returns dx for the last call and fills ``layer.grads``.
    See the module docstring and the README for the conventions.
    """

    def __init__(  # noqa: PLR0917  (tf-keras's positional signature)
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 0.001,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float | None] | None = None,
        renorm_momentum: float = 0.99,
        fused: bool | None = None,
        trainable: bool = True,
        virtual_batch_size: int | None = None,
        adjustment: Callable[[np.ndarray], tuple[Any, Any]] | None = None,
        name: str | None = None,
        dtype: Any = "float32",
    ) -> None:
        self.axis: int | list[int] = _axis_arg(axis)
        self.momentum = _momentum(momentum, "momentum")
        eps = _real(epsilon, "epsilon")
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        self.epsilon = eps
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        if virtual_batch_size is not None:
            if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, (int, np.integer)):
                raise TypeError(f"virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}")
            if virtual_batch_size <= 0:
                raise ValueError(
                    "`virtual_batch_size` must be a positive integer that divides the true batch size of the "
                    f"input tensor. Received: virtual_batch_size={virtual_batch_size}"
                )
            virtual_batch_size = int(virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size
        if adjustment is not None and not callable(adjustment):
            raise TypeError(f"adjustment must be a callable(shape) -> (scale, bias) or None, got {adjustment!r}")
        if adjustment is not None and virtual_batch_size is not None:
            raise ValueError("When using `virtual_batch_size`, adjustment cannot be specified")
        self.adjustment = adjustment
        self._dtype_config, self.compute_dtype, self.param_dtype = _resolve_dtype(dtype)
        if fused is not None and not isinstance(fused, (bool, np.bool_)):
            raise TypeError(f"fused must be True, False or None, got {fused!r}")
        if fused:
            self._raise_if_fused_cannot_be_used()
        elif fused is None and not self._fused_can_be_used():
            fused = False
        self.fused: bool | None = None if fused is None else bool(fused)
        self._fused_arg = self.fused
        self.renorm_clipping: dict[str, float | None] = {}
        self.renorm_momentum = 0.99
        if self.renorm:
            self.renorm_clipping = _renorm_clipping(renorm_clipping)
            self.renorm_momentum = _momentum(renorm_momentum, "renorm_momentum")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {name!r}")
        self.name = name if name else _unique_name("batch_normalization")
        self._trainable = bool(trainable)
        self._lock = threading.RLock()
        self._build: _Build | None = None
        self._last: _Last | None = None
        self.grads: dict[str, np.ndarray] = {}
        self._precise_stats: Any = None  # an accumulator while inside bn.precise_statistics (_precise.py)

    # ----------------------------------------------------------------- fused rules
    def _raise_if_fused_cannot_be_used(self) -> None:
        if self.renorm:
            raise ValueError("Passing both `fused=True` and `renorm=True` is not supported")
        axis = [self.axis] if isinstance(self.axis, int) else self.axis
        if len(axis) > 1 or axis[0] not in (-4, -3, -1, 1, 3, 4):
            raise ValueError(
                "Passing `fused=True` is only supported when axis is 1 or 3 for input rank = 4 "
                f"or 1 or 4 for input rank = 5. Got axis {axis}"
            )
        if self.virtual_batch_size is not None:
            raise ValueError("Passing `fused=True` is not supported when `virtual_batch_size` is specified.")
        if self.adjustment is not None:
            raise ValueError("Passing `fused=True` is not supported when `adjustment` is specified.")
        if self.compute_dtype == np.float64:
            raise ValueError(
                "Passing `fused=True` is only supported when the compute dtype is float16, bfloat16, "
                "or float32. Got dtype: float64"
            )

    def _fused_can_be_used(self) -> bool:
        try:
            self._raise_if_fused_cannot_be_used()
        except ValueError:
            return False
        return True

    # ----------------------------------------------------------------- properties
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
        return [] if b is None else [k for k in _WEIGHTS if k in b.weights]

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

    # ----------------------------------------------------------------- building
    def _resolve_axes(self, rank: int) -> list[int]:
        axis = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        axis = [a + rank if a < 0 else a for a in axis]
        for a in axis:
            if a < 0 or a >= rank:
                raise ValueError(
                    "Invalid value for `axis` argument. Expected 0 <= axis < inputs.rank "
                    f"(with inputs.rank={rank}). Received: axis={tuple(axis)}"
                )
        if len(axis) != len(set(axis)):
            raise ValueError(f"Duplicate axis: {tuple(axis)}")
        return axis

    def _make_build(self, input_shape: Sequence[int | None]) -> _Build:
        shape = tuple(input_shape)
        rank = len(shape)
        if rank < 2:
            raise ValueError(
                f"BatchNormalization needs an input of at least 2 dimensions (a batch axis and a feature axis); "
                f"got shape {shape}"
            )
        axes = self._resolve_axes(rank)
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError(
                "When using `virtual_batch_size`, the batch dimension must be 0 and thus axis cannot include 0. "
                f"Received axis={axes}"
            )
        fused = self.fused
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
        if len(axes) == 1 and self.virtual_batch_size is None:
            param_shape: tuple[int, ...] = (dims[axes[0]],)
        else:
            ps = [dims.get(i, 1) for i in range(rank)]
            if self.virtual_batch_size is not None:
                ps.insert(1, 1)
            param_shape = tuple(ps)
        weights = self._initial_weights(param_shape)
        return _Build(rank, tuple(axes), dims, bool(fused), param_shape, weights)

    def _initial_weights(self, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        pdt = self.param_dtype

        def init(initializer: Any, what: str) -> np.ndarray:
            a = np.array(initializer(shape, pdt), dtype=pdt, copy=True)
            if a.shape != shape:
                a = np.array(np.broadcast_to(a, shape), dtype=pdt)
            return np.ascontiguousarray(a)

        w: dict[str, np.ndarray] = {}
        if self.scale:
            w["gamma"] = init(self.gamma_initializer, "gamma")
        if self.center:
            w["beta"] = init(self.beta_initializer, "beta")
        w["moving_mean"] = init(self.moving_mean_initializer, "moving_mean")
        w["moving_variance"] = init(self.moving_variance_initializer, "moving_variance")
        if self.renorm:
            with np.errstate(invalid="ignore"):
                w["moving_stddev"] = np.sqrt(init(self.moving_variance_initializer, "moving_stddev"))
                w["renorm_mean"] = init(self.moving_mean_initializer, "renorm_mean")
                w["renorm_stddev"] = np.sqrt(init(self.moving_variance_initializer, "renorm_stddev"))
        return w

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the weights for inputs of this shape (the first call does it by itself)."""
        with self._lock:
            if self._build is not None:
                return
            b = self._make_build(input_shape)
            self._commit_build(b)

    def _commit_build(self, b: _Build) -> None:
        self._build = b
        self.fused = b.fused
        self.axis = list(b.axes)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    # ----------------------------------------------------------------- calling
    def _input(self, inputs: Any) -> np.ndarray:
        x = inputs if isinstance(inputs, np.ndarray) else np.asarray(inputs)
        if x.dtype != self.compute_dtype:
            if x.dtype.kind not in "biuf" and x.dtype.name != "bfloat16":
                raise TypeError(f"inputs must be a real numeric array; got dtype {x.dtype}")
            x = x.astype(self.compute_dtype)
        if not x.flags.aligned:
            x = x.copy()
        return x

    def _check_spec(self, b: _Build, shape: tuple[int, ...]) -> None:
        if len(shape) != b.rank:
            raise ValueError(
                f'Input 0 of layer "{self.name}" is incompatible with the layer: expected ndim={b.rank}, '
                f"found ndim={len(shape)}. Full shape received: {shape}"
            )
        for a, d in b.dims.items():
            if shape[a] != d:
                raise ValueError(
                    f'Input 0 of layer "{self.name}" is incompatible with the layer: expected axis {a} of input '
                    f"shape to have value {d}, but received input with shape {shape}"
                )

    def __call__(self, inputs: Any, training: bool | None = None, mask: Any = None) -> np.ndarray:
        """Normalizes ``inputs``; ``training=True`` uses batch statistics and updates the moving ones."""
        with self._lock:
            x = self._input(inputs)
            b = self._build
            new_build = b is None
            if b is None:
                b = self._make_build(x.shape)
            else:
                self._check_spec(b, x.shape)
            train = bool(training) and self._trainable
            if train:
                y, updates, last = self._train(b, x, mask)
                if self._precise_stats is not None:  # bn.precise_statistics: pool the batch's values instead
                    self._precise_stats.add(x, tuple(sorted(b.axes)), last.weights)  # of moving the statistics
                    updates = {}
            else:
                y, last = self._infer(b, x)
                updates = {}
            # Everything is computed: commit (all the copies or none, then nothing can fail).
            _copy_all(b.weights, updates)
            if new_build:
                self._commit_build(b)
            self._last = last
            return y

    def _channel(self, a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a, dtype=self.param_dtype).reshape(-1)

    def _infer(self, b: _Build, x: np.ndarray) -> tuple[np.ndarray, _Last]:
        axes = tuple(sorted(b.axes))
        w = b.weights
        mean = np.array(w["moving_mean"], copy=True).reshape(-1)
        var = np.array(w["moving_variance"], copy=True).reshape(-1)
        gamma = None if "gamma" not in w else np.array(w["gamma"], copy=True).reshape(-1)
        beta = self._channel(w.get("beta"))
        y = np.empty_like(x)
        _core.normalize(x, y, axes, mean, var, gamma, beta, self.epsilon, False)
        inv_std = inv_std_of(var, self.epsilon, self.param_dtype)
        last = _Last(
            training=False,
            x=x,
            input_shape=x.shape,
            axes=axes,
            mean=mean,
            inv_std=inv_std,
            gamma=gamma,
            reps=1,
            scale_mult=None,
            offset_mult=None,
            weights=None,
            has_gamma="gamma" in w,
            has_beta="beta" in w,
            param_shape=b.param_shape,
        )
        return y, last

    def _adjustment(self, x: np.ndarray, keep_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        assert self.adjustment is not None
        result = self.adjustment(np.array(x.shape, dtype=np.int32))
        try:
            adj_scale, adj_bias = result
        except (TypeError, ValueError):
            raise TypeError(f"adjustment must return a pair (scale, bias), got {result!r}") from None
        out = []
        for name, v in (("scale", adj_scale), ("bias", adj_bias)):
            a = np.asarray(v, dtype=self.param_dtype)
            try:
                a = np.broadcast_to(a, keep_shape)
            except ValueError:
                raise ValueError(
                    f"adjustment {name} of shape {a.shape} does not broadcast to the per-channel shape {keep_shape}; "
                    "batchnorm supports per-channel adjustments only"
                ) from None
            out.append(np.ascontiguousarray(a).reshape(-1))
        return out[0], out[1]

    def _moving_average(self, var: np.ndarray, value: np.ndarray, momentum: float) -> np.ndarray:
        """tf-keras's ``var.assign_sub((var - value) * (1 - momentum))`` in the parameter dtype."""
        decay = self.param_dtype.type(1.0 - momentum)
        v = var.reshape(-1)
        return (v - (v - value.astype(self.param_dtype)) * decay).reshape(var.shape)  # type: ignore[no-any-return]

    def _train(self, b: _Build, x: np.ndarray, mask: Any) -> tuple[np.ndarray, dict[str, np.ndarray], _Last]:
        pdt = self.param_dtype
        axes = tuple(sorted(b.axes))
        w = b.weights
        vbs = self.virtual_batch_size
        if mask is not None and b.fused:
            warnings.warn(
                "Masking is not supported with `fused=True`. You should either turn off fusing (`fused=False`) "
                "or you should not pass a `mask` argument when calling the layer. For the moment `mask` will be "
                "ignored for the normalization.",
                stacklevel=3,
            )
            mask = None
        if mask is not None and vbs is not None:
            raise ValueError("a mask cannot be used with `virtual_batch_size` (tf-keras cannot broadcast it either)")
        if vbs is not None:
            batch = x.shape[0]
            if batch == 0:  # zero ghost batches: no statistics (the moving ones would become NaN)
                raise ValueError("training on an empty batch: the reduced axes hold no values")
            if batch % vbs != 0:
                raise ValueError(
                    f"virtual_batch_size={vbs} does not divide the batch size {batch} of the input "
                    f"(shape {x.shape}); in training the batch must be a multiple of it"
                )
            reps = batch // vbs
            xv = x.reshape((vbs, reps, *x.shape[1:]))
            core_axes = (1, *(a + 1 for a in axes))
        else:
            reps = 1
            xv = x
            core_axes = axes
        kept = tuple(xv.shape[a] for a in core_axes)
        channels = math.prod(x.shape[a] for a in axes)
        keep_shape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))

        scale_mult: np.ndarray | None = None
        offset_mult: np.ndarray | None = None
        if self.adjustment is not None:
            scale_mult, offset_mult = self._adjustment(x, keep_shape)

        gamma = None if "gamma" not in w else np.array(w["gamma"], dtype=pdt, copy=True).reshape(-1)
        beta = None if "beta" not in w else np.array(w["beta"], dtype=pdt, copy=True).reshape(-1)

        mean = np.empty(kept, pdt)
        var = np.empty(kept, pdt)
        inv_std = np.empty(kept, pdt)
        y = np.empty_like(xv)
        weights: np.ndarray | None = None
        need_stats_first = mask is not None or self.renorm
        if mask is not None:
            weights = self._mask_weights(mask, x)
            m64, v64 = self._weighted_moments(x, weights, axes)
            mean[...] = m64.reshape(kept)
            var[...] = v64.reshape(kept)
        elif self.renorm:
            _core.moments(xv, core_axes, mean, var)

        updates: dict[str, np.ndarray] = {}
        if self.renorm:
            new_mean, new_var = self._batch_moments(mean, var, reps, channels)
            eps = pdt.type(self.epsilon)
            stddev = np.sqrt(new_var + eps)
            renorm_stddev = np.maximum(w["renorm_stddev"].reshape(-1), np.sqrt(eps))
            r = stddev / renorm_stddev
            d = (new_mean - w["renorm_mean"].reshape(-1)) / renorm_stddev
            rmin, rmax, dmax = (self.renorm_clipping.get(k) for k in ("rmin", "rmax", "dmax"))
            if rmin is not None:
                r = np.maximum(r, pdt.type(rmin))
            if rmax is not None:
                r = np.minimum(r, pdt.type(rmax))
            if dmax is not None:
                d = np.minimum(np.maximum(d, pdt.type(-dmax)), pdt.type(dmax))
            if scale_mult is None or offset_mult is None:
                scale_mult, offset_mult = r, d
            else:
                scale_mult, offset_mult = r * scale_mult, d * scale_mult + offset_mult

        g_eff, b_eff = self._effective_affine(gamma, beta, scale_mult, offset_mult)
        g_tiled = None if g_eff is None else np.tile(g_eff, reps)
        b_tiled = None if b_eff is None else np.tile(b_eff, reps)
        if need_stats_first:
            _core.normalize(xv, y, core_axes, mean, var, g_tiled, b_tiled, self.epsilon, False)
            inv_std[...] = inv_std_of(var, self.epsilon, inv_std.dtype)
        else:
            _core.forward(xv, y, core_axes, g_tiled, b_tiled, self.epsilon, False, mean, var, inv_std)
        new_mean, new_var = self._batch_moments(mean, var, reps, channels)

        mom = self.momentum
        updates["moving_mean"] = self._moving_average(w["moving_mean"], new_mean, mom)
        if self.renorm:
            eps = pdt.type(self.epsilon)
            stddev = np.sqrt(new_var + eps)
            rmom = self.renorm_momentum
            updates["renorm_mean"] = self._moving_average(w["renorm_mean"], new_mean, rmom)
            updates["renorm_stddev"] = self._moving_average(w["renorm_stddev"], stddev, rmom)
            moving_stddev = self._moving_average(w["moving_stddev"], stddev, mom)
            updates["moving_stddev"] = moving_stddev
            updates["moving_variance"] = np.maximum(moving_stddev * moving_stddev - eps, pdt.type(0))
        else:
            if b.fused:  # TensorFlow's fused kernel hands back the unbiased variance (SEMANTICS §2.3)
                count = x.size // channels
                new_var = (new_var.astype(np.float64) * (count / max(count - 1, 1))).astype(pdt)
            updates["moving_variance"] = self._moving_average(w["moving_variance"], new_var, mom)

        last = _Last(
            training=True,
            x=xv,
            input_shape=x.shape,
            axes=core_axes,
            mean=mean,
            inv_std=inv_std,
            gamma=g_tiled,
            reps=reps,
            scale_mult=scale_mult,
            offset_mult=offset_mult,
            weights=weights,
            has_gamma=gamma is not None,
            has_beta=beta is not None,
            param_shape=b.param_shape,
        )
        return y.reshape(x.shape), updates, last

    def _batch_moments(
        self, mean: np.ndarray, var: np.ndarray, reps: int, channels: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel statistics for the moving averages (ghost batches: the average of theirs)."""
        if reps == 1:
            return mean.reshape(channels), var.reshape(channels)
        pdt = self.param_dtype
        m = mean.reshape(reps, channels).mean(axis=0, dtype=np.float64).astype(pdt)
        v = var.reshape(reps, channels).mean(axis=0, dtype=np.float64).astype(pdt)
        return m, v

    def _effective_affine(
        self,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
        scale_mult: np.ndarray | None,
        offset_mult: np.ndarray | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """scale' = scale_mult * gamma, offset' = offset_mult * gamma + beta (tf-keras's composition)."""
        if scale_mult is None or offset_mult is None:
            return gamma, beta
        g = scale_mult if gamma is None else scale_mult * gamma
        o = offset_mult if gamma is None else offset_mult * gamma
        if beta is not None:
            o = o + beta
        return np.ascontiguousarray(g), np.ascontiguousarray(o)

    def _mask_weights(self, mask: Any, x: np.ndarray) -> np.ndarray:
        m = np.asarray(mask)
        if m.dtype.kind not in "biuf":
            raise TypeError(f"mask must be a boolean or numeric array, got dtype {m.dtype}")
        try:
            m = np.broadcast_to(m, x.shape[:-1])
        except ValueError:
            raise ValueError(
                f"mask of shape {m.shape} does not match the input shape {x.shape} without its last axis, "
                f"{x.shape[:-1]} (tf-keras applies a mask along the last axis)"
            ) from None
        # tf-keras casts the mask to the compute dtype, then weights the moments with it.
        return m.astype(self.compute_dtype).astype(np.float64)[..., None]

    @staticmethod
    def _weighted_moments(x: np.ndarray, weights: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """tf.nn.weighted_moments: frequency-weighted mean and biased variance (0 where no weight)."""
        red = tuple(i for i in range(x.ndim) if i not in axes)
        xf = x.astype(np.float64)
        wsum = np.sum(np.broadcast_to(weights, x.shape), axis=red, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(wsum != 0, np.sum(weights * xf, axis=red, keepdims=True) / wsum, 0.0)
            var = np.where(wsum != 0, np.sum(weights * np.square(xf - mean), axis=red, keepdims=True) / wsum, 0.0)
        return mean, var

    # ----------------------------------------------------------------- backward
    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the last call with respect to its input; sets ``self.grads``.

        Training calls differentiate through the batch statistics (renorm's r and d and
        the adjustment are constants, as in tf-keras); inference calls treat the moving
        statistics as constants. ``grads`` holds ``"gamma"`` and ``"beta"`` (those the
        layer has), shaped like the weights. The layer keeps a reference to the last
        input (no copy, as autograd frameworks keep theirs): modifying that array in place
        before ``backward`` changes the gradient.
        """
        with self._lock:
            last = self._last
            if last is None:
                raise RuntimeError("backward() called before any forward call of the layer")
            g = dy if isinstance(dy, np.ndarray) else np.asarray(dy)
            if g.shape != last.input_shape:
                raise ValueError(f"dy has shape {g.shape}; expected {last.input_shape}, the shape of the last input")
            if g.dtype != self.compute_dtype:
                if g.dtype.kind not in "biuf" and g.dtype.name != "bfloat16":
                    raise TypeError(f"dy must be a real numeric array; got dtype {g.dtype}")
                g = g.astype(self.compute_dtype)
            g = g.reshape(last.x.shape)
            pdt = self.param_dtype
            kept = last.mean.shape
            dx = np.empty_like(last.x)
            dgamma = np.empty(kept, pdt)
            dbeta = np.empty(kept, pdt)
            fixed = not last.training or last.weights is not None
            _core.backward(
                g, last.x, dx, last.axes, last.mean, last.inv_std, last.gamma, None, False, dgamma, dbeta, fixed
            )
            if last.weights is not None:
                dx = self._masked_dx(last, g, dx, dgamma, dbeta)
            channels = dgamma.size // last.reps
            dg = dgamma.reshape(last.reps, channels).sum(axis=0, dtype=np.float64)
            db = dbeta.reshape(last.reps, channels).sum(axis=0, dtype=np.float64)
            if last.scale_mult is not None and last.offset_mult is not None:
                dg = dg * last.scale_mult + db * last.offset_mult
            grads: dict[str, np.ndarray] = {}
            if last.has_gamma:
                grads["gamma"] = dg.astype(pdt).reshape(last.param_shape)
            if last.has_beta:
                grads["beta"] = db.astype(pdt).reshape(last.param_shape)
            self.grads = grads
            return dx.reshape(last.input_shape)

    @staticmethod
    def _masked_dx(
        last: _Last, dy: np.ndarray, dx_fixed: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray
    ) -> np.ndarray:
        """dx of the masked path: the fixed-statistics part minus the weighted-moments part.

        With frequency weights w (W = sum w per channel), d mean/dx = w/W and
        d var/dx = 2w(x - mean)/W, so dx = a*(dy - w/W*sum(dy) - w*x_hat/W*sum(dy*x_hat)),
        a = gamma*inv_std; the core's fixed-statistics pass gives a*dy.
        """
        assert last.weights is not None
        axes = last.axes
        x = last.x
        red = tuple(i for i in range(x.ndim) if i not in axes)
        shape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
        w = last.weights
        wsum = np.sum(np.broadcast_to(w, x.shape), axis=red, keepdims=True)
        inv = last.inv_std.astype(np.float64).reshape(shape)
        mean = last.mean.astype(np.float64).reshape(shape)
        a = inv if last.gamma is None else last.gamma.astype(np.float64).reshape(shape) * inv
        with np.errstate(divide="ignore", invalid="ignore"):
            k_mean = np.where(wsum != 0, dbeta.astype(np.float64).reshape(shape) / wsum, 0.0)
            k_var = np.where(wsum != 0, dgamma.astype(np.float64).reshape(shape) / wsum, 0.0)
        x_hat = (x.astype(np.float64) - mean) * inv
        dx: np.ndarray = (dx_fixed.astype(np.float64) - a * w * (k_mean + x_hat * k_var)).astype(x.dtype)
        return dx

    # ----------------------------------------------------------------- weights
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
                if arr.dtype.kind not in "biuf":
                    raise TypeError(f"weight {key!r} must be a real numeric array, got dtype {arr.dtype}")
                new.append(arr.astype(ref.dtype))
            if b is not None:
                _copy_all(b.weights, dict(zip(keys, new, strict=True)))

    # ----------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        """The layer's config with tf-keras's keys (``fused`` and ``adjustment`` are not serialized)."""
        config: dict[str, Any] = {
            "name": self.name,
            "trainable": self._trainable,
            "dtype": self._dtype_config,
            "axis": list(self.axis) if isinstance(self.axis, list) else self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        if self.renorm:
            config["renorm"] = True
            config["renorm_clipping"] = dict(self.renorm_clipping)
            config["renorm_momentum"] = self.renorm_momentum
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        if self.adjustment is not None:
            _log.warning(
                "The `adjustment` function of this `BatchNormalization` layer cannot be serialized and has been "
                "omitted from the layer config. It will not be included when re-creating the layer from the "
                "saved config."
            )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchNormalization:
        """A new (unbuilt) layer from :meth:`get_config`'s dict (or a tf-keras layer's config)."""
        cfg = dict(config)
        for key in ("batch_input_shape", "synchronized"):
            value = cfg.pop(key, None)
            if key == "synchronized" and value:
                raise ValueError("synchronized=True is not supported by BatchNormalization; use SyncBatchNormalization")
        return cls(**cfg)

    # ----------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike[str] | Any) -> None:
        """Writes config, dtype, build shape and weights to a .npz file (``load`` reads it back exactly)."""
        with self._lock:
            if self.adjustment is not None:
                raise ValueError(
                    "a layer with an `adjustment` callable cannot be saved: the callable is not serializable"
                )
            config = self.get_config()
            b = self._build
            meta = {
                "format": _SAVE_FORMAT,
                "class": "BatchNormalization",
                "fused": self._fused_arg,
                "built": b is not None,
                "input_shape": None if b is None else self._input_shape_for(b),
            }
            arrays = {f"weight:{k}": np.array(b.weights[k], copy=True) for k in self._weight_keys()} if b else {}
            np.savez(
                path,
                config=np.array(json.dumps(config)),
                meta=np.array(json.dumps(meta)),
                **arrays,  # type: ignore[arg-type]
            )

    def _input_shape_for(self, b: _Build) -> list[int | None]:
        shape: list[int | None] = [None] * b.rank
        for a, d in b.dims.items():
            shape[a] = d
        return shape

    @classmethod
    def load(cls, path: str | os.PathLike[str] | Any) -> BatchNormalization:
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
        if meta.get("class") != "BatchNormalization" or meta.get("format") != _SAVE_FORMAT:
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

    def __repr__(self) -> str:
        state = "built" if self.built else "not built"
        return (
            f"BatchNormalization(name={self.name!r}, axis={self.axis!r}, momentum={self.momentum}, "
            f"epsilon={self.epsilon}, dtype={self.dtype!r}, {state})"
        )
