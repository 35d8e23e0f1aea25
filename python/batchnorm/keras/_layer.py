"""The Keras-style stateful layer: ``BatchNormalization`` with tf-keras 2's semantics.

Every call is one pass of the core's kernels over the input (or over a reshaped view of
it); the per-channel bookkeeping around it (moving averages, renorm corrections,
ghost-batch parameter tiling) is NumPy on arrays of C values (``_step``).

Conventions (tf-keras 2's):

* ``momentum`` weights the old value: ``moving = moving - (moving - batch) * (1 - momentum)``,
  with ``1 - momentum`` taken in double and rounded to float32 (tf-keras's float32 tensor),
  then to the weights' dtype - for float64 weights too, so they match tf-keras bit for bit.
* The output is always normalized with the biased batch variance. ``moving_variance``
  receives the biased one too, except on tf-keras's *fused* path (4-D/5-D input, channel
  axis first or last, no renorm / virtual batch / adjustment, ``fused`` None or True),
  where TensorFlow's fused kernel returns, and tf-keras stores, the unbiased
  ``M/(M-1)`` variance.
* ``training=None`` means inference; ``trainable=False`` forces inference and freezes
  the moving statistics.

A training call gets the batch statistics from one hook, :meth:`_batch_statistics`, and
backward its per-channel sums from another, :meth:`_backward_pass`; the synchronized
layer overrides those two and shares everything else.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from .. import _core
from .._functional import CopyableLayer
from . import _args, _build, _saving, _step, constraints, initializers, regularizers
from ._build import Build
from ._step import Last, Stats
from ._weights import LayerWeights, copy_all

__all__ = ["BatchNormalization"]

_log = logging.getLogger("batchnorm")

L = TypeVar("L", bound="BatchNormalization")


class BatchNormalization(LayerWeights, CopyableLayer):
    """Batch normalization layer with tf-keras 2's arguments, numbers and quirks.

    ``layer(x, training=True)`` normalizes with the batch statistics and updates the
    moving statistics; ``training=False`` or ``None`` uses the moving statistics.
    ``layer.backward(dy)`` returns dx for the last call and fills ``layer.grads``.
    See the module docstring and the README for the conventions.
    """

    _new_lock = staticmethod(threading.RLock)  # re-entrant: the weight methods call each other

    _SYNCHRONIZED = False  # whether a config with tf-keras's `synchronized=True` makes this class

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
        self.axis: int | list[int] = _args.axis(axis)
        self.momentum = _args.momentum(momentum, "momentum")
        self.epsilon = _args.epsilon(epsilon)
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
        self.virtual_batch_size = _args.virtual_batch_size(virtual_batch_size)
        if adjustment is not None and not callable(adjustment):
            raise TypeError(f"adjustment must be a callable(shape) -> (scale, bias) or None, got {adjustment!r}")
        if adjustment is not None and self.virtual_batch_size is not None:
            raise ValueError("When using `virtual_batch_size`, adjustment cannot be specified")
        self.adjustment = adjustment
        self._dtype_config, self.compute_dtype, self.param_dtype = _args.resolve_dtype(dtype)
        self.fused: bool | None = _args.fused(fused)
        obstacle = _build.fused_obstacle(self)
        if self.fused and obstacle is not None:
            raise ValueError(obstacle)
        if self.fused is None and obstacle is not None:
            self.fused = False
        self._fused_arg = self.fused
        self.renorm_clipping: dict[str, float | None] = {}
        self.renorm_momentum = 0.99
        if self.renorm:
            self.renorm_clipping = _args.renorm_clipping(renorm_clipping)
            self.renorm_momentum = _args.momentum(renorm_momentum, "renorm_momentum")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {name!r}")
        self.name = name if name else _args.unique_name("batch_normalization")
        self._trainable = bool(trainable)
        self._lock = self._new_lock()
        self._build: Build | None = None
        self._last: Last | None = None
        self.grads: dict[str, np.ndarray] = {}
        self._precise_stats: Any = None  # an accumulator while inside bn.precise_statistics (_precise.py)

    # ----------------------------------------------------------------- building
    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the weights for inputs of this shape (the first call does it by itself)."""
        with self._lock:
            if self._build is not None:
                return
            b = _build.make_build(self, input_shape)
            self._commit_build(b)

    def _commit_build(self, b: Build) -> None:
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

    def _check_spec(self, b: Build, shape: tuple[int, ...]) -> None:
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
                b = _build.make_build(self, x.shape)
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
            copy_all(b.weights, updates)
            if new_build:
                self._commit_build(b)
            self._last = last
            return y

    def _channel(self, a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a, dtype=self.param_dtype).reshape(-1)

    def _infer(self, b: Build, x: np.ndarray) -> tuple[np.ndarray, Last]:
        axes = tuple(sorted(b.axes))
        w = b.weights
        mean = np.array(w["moving_mean"], copy=True).reshape(-1)
        var = np.array(w["moving_variance"], copy=True).reshape(-1)
        gamma = None if "gamma" not in w else np.array(w["gamma"], copy=True).reshape(-1)
        beta = self._channel(w.get("beta"))
        y = np.empty_like(x)
        inv_std = np.empty_like(var)
        _core.normalize(x, y, axes, mean, var, gamma, beta, self.epsilon, False, inv_std=inv_std)
        last = Last(training=False, x=x, input_shape=x.shape, axes=axes, mean=mean, inv_std=inv_std, gamma=gamma)
        return y, last

    def _train(self, b: Build, x: np.ndarray, mask: Any) -> tuple[np.ndarray, dict[str, np.ndarray], Last]:
        """A training call: output, moving-statistics updates (not yet applied), record for backward."""
        pdt = self.param_dtype
        w = b.weights
        if mask is not None and b.fused:
            warnings.warn(
                "Masking is not supported with `fused=True`. You should either turn off fusing (`fused=False`) "
                "or you should not pass a `mask` argument when calling the layer. For the moment `mask` will be "
                "ignored for the normalization.",
                stacklevel=3,
            )
            mask = None
        if mask is not None and self.virtual_batch_size is not None:
            raise ValueError("a mask cannot be used with `virtual_batch_size` (tf-keras cannot broadcast it either)")
        xv, axes, reps = _step.ghost_batches(x, tuple(sorted(b.axes)), self.virtual_batch_size)
        keep_shape = tuple(x.shape[i] if i in b.axes else 1 for i in range(x.ndim))

        scale_mult: np.ndarray | None = None
        offset_mult: np.ndarray | None = None
        if self.adjustment is not None:
            scale_mult, offset_mult = _step.adjustment(self.adjustment, x, keep_shape, pdt)
        gamma = None if "gamma" not in w else np.array(w["gamma"], dtype=pdt, copy=True).reshape(-1)
        beta = None if "beta" not in w else np.array(w["beta"], dtype=pdt, copy=True).reshape(-1)
        weights = None if mask is None else _step.mask_weights(mask, x, self.compute_dtype)
        cmask = None if weights is None else _step.core_mask(weights, xv, axes)

        stats = self._batch_statistics(xv, axes, weights, cmask)
        if self.renorm:  # r and d scale and shift the normalized batch (tf-keras's composition with adjustment)
            assert stats is not None
            r, d = _step.renorm_correction(*_step.channel_moments(stats, reps), w, self.epsilon, self.renorm_clipping)
            if scale_mult is None or offset_mult is None:
                scale_mult, offset_mult = r, d
            else:
                scale_mult, offset_mult = r * scale_mult, d * scale_mult + offset_mult
        g_eff, b_eff = _step.effective_affine(gamma, beta, scale_mult, offset_mult)
        g_tiled = None if g_eff is None else np.tile(g_eff, reps)
        b_tiled = None if b_eff is None else np.tile(b_eff, reps)
        y = np.empty_like(xv)
        kept = tuple(xv.shape[a] for a in axes)
        inv_std = np.empty(kept, pdt)
        if stats is None:  # one pass computes the statistics and normalizes with them
            stats = Stats(np.empty(kept, pdt), np.empty(kept, pdt))
            _core.forward(
                xv, y, axes, g_tiled, b_tiled, self.epsilon, False, stats.mean, stats.variance, inv_std, mask=cmask
            )
        else:
            _core.normalize(
                xv, y, axes, stats.mean, stats.variance, g_tiled, b_tiled, self.epsilon, False, inv_std=inv_std
            )

        new_mean, new_var = _step.channel_moments(stats, reps)
        if b.fused:  # TensorFlow's fused kernel hands back the unbiased variance (tensorflow/tensorflow#55545)
            count = x.size // new_var.size
            new_var = (new_var.astype(np.float64) * (count / max(count - 1, 1))).astype(pdt)
        last = Last(
            training=True,
            x=xv,
            input_shape=x.shape,
            axes=axes,
            mean=stats.mean,
            inv_std=inv_std,
            gamma=g_tiled,
            reps=reps,
            scale_mult=scale_mult,
            offset_mult=offset_mult,
            weights=weights,
            mask=cmask,
            wsum=stats.wsum,
            count=stats.count,
            comm=stats.comm,
        )
        return y.reshape(x.shape), self._moving_updates(w, new_mean, new_var), last

    def _batch_statistics(
        self, x: np.ndarray, axes: tuple[int, ...], weights: np.ndarray | None, mask: np.ndarray | None
    ) -> Stats | None:
        """The batch's per-channel mean and biased variance (``axes`` kept; ``weights``: the
        mask's, ``mask``: those weights as the kernels take them, or None where they cannot),
        or None where the normalizing pass may compute them itself (renorm needs them first,
        and weights the kernels cannot take). The hook SyncBatchNormalization overrides."""
        pdt = self.param_dtype
        kept = tuple(x.shape[a] for a in axes)
        if weights is not None and mask is None:
            wsum, mean, m2 = _step.weighted_partials(x, axes, weights)
            with np.errstate(divide="ignore", invalid="ignore"):
                var = np.where(wsum != 0, m2 / wsum, 0.0)
            return Stats(mean.astype(pdt).reshape(kept), var.astype(pdt).reshape(kept), wsum)
        if self.renorm:
            stats = Stats(np.empty(kept, pdt), np.empty(kept, pdt))
            _core.moments(x, axes, stats.mean, stats.variance, mask=mask)
            return stats
        return None

    def _moving_updates(
        self, w: dict[str, np.ndarray], mean: np.ndarray, variance: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The new moving statistics (renorm's too) after a batch with these per-channel statistics."""
        mom = self.momentum
        updates = {"moving_mean": _step.moving_average(w["moving_mean"], mean, mom)}
        if not self.renorm:
            updates["moving_variance"] = _step.moving_average(w["moving_variance"], variance, mom)
            return updates
        pdt = self.param_dtype
        eps = pdt.type(self.epsilon)
        stddev = np.sqrt(variance + eps)
        rmom = self.renorm_momentum
        updates["renorm_mean"] = _step.moving_average(w["renorm_mean"], mean, rmom)
        updates["renorm_stddev"] = _step.moving_average(w["renorm_stddev"], stddev, rmom)
        moving_stddev = _step.moving_average(w["moving_stddev"], stddev, mom)
        updates["moving_stddev"] = moving_stddev
        updates["moving_variance"] = np.maximum(moving_stddev * moving_stddev - eps, pdt.type(0))
        return updates

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
            g = self._backward_input(last, dy)
            dx, dg, db = self._backward_pass(last, g)
            if last.scale_mult is not None and last.offset_mult is not None:
                dg = dg * last.scale_mult + db * last.offset_mult
            b = self._build
            assert b is not None  # built by the call that set self._last
            pdt = self.param_dtype
            grads: dict[str, np.ndarray] = {}
            if "gamma" in b.weights:
                grads["gamma"] = dg.astype(pdt).reshape(b.param_shape)
            if "beta" in b.weights:
                grads["beta"] = db.astype(pdt).reshape(b.param_shape)
            self.grads = grads
            return dx.reshape(last.input_shape)

    def _backward_input(self, last: Last, dy: Any) -> np.ndarray:
        """dy checked against the last input, in the compute dtype and the shape the kernels saw."""
        g = dy if isinstance(dy, np.ndarray) else np.asarray(dy)
        if g.shape != last.input_shape:
            raise ValueError(f"dy has shape {g.shape}; expected {last.input_shape}, the shape of the last input")
        if g.dtype != self.compute_dtype:
            if g.dtype.kind not in "biuf" and g.dtype.name != "bfloat16":
                raise TypeError(f"dy must be a real numeric array; got dtype {g.dtype}")
            g = g.astype(self.compute_dtype)
        return g.reshape(last.x.shape)

    def _backward_pass(self, last: Last, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """dx and this call's per-channel sum(dy * x_hat) and sum(dy) (float64, ghost batches
        added up). The hook SyncBatchNormalization overrides."""
        pdt = self.param_dtype
        kept = last.mean.shape
        dx = np.empty_like(last.x)
        dgamma = np.empty(kept, pdt)
        dbeta = np.empty(kept, pdt)
        numpy_mask = last.training and last.weights is not None and last.mask is None
        fixed = not last.training or numpy_mask
        _core.backward(
            dy, last.x, dx, last.axes, last.mean, last.inv_std, last.gamma, None, False, dgamma, dbeta, fixed,
            mask=last.mask,
        )  # fmt: skip
        if numpy_mask:  # weights the kernels could not take: dx from the core's sums
            dx = _step.masked_dx(last, dy, dbeta.astype(np.float64), dgamma.astype(np.float64))
        channels = dgamma.size // last.reps
        dg = dgamma.reshape(last.reps, channels).sum(axis=0, dtype=np.float64)
        db = dbeta.reshape(last.reps, channels).sum(axis=0, dtype=np.float64)
        return dx, dg, db

    # ----------------------------------------------------------------- config and files
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
    def from_config(cls: type[L], config: dict[str, Any]) -> L:
        """A new (unbuilt) layer from :meth:`get_config`'s dict (or a tf-keras layer's config)."""
        cfg = dict(config)
        cfg.pop("batch_input_shape", None)
        if cfg.pop("synchronized", None) and not cls._SYNCHRONIZED:
            raise ValueError("synchronized=True is not supported by BatchNormalization; use SyncBatchNormalization")
        return cls(**cfg)

    def save(self, path: str | os.PathLike[str] | Any) -> None:
        """Writes config, dtype, build shape and weights to a .npz file (``load`` reads it back exactly)."""
        _saving.save(self, path)

    @classmethod
    def load(cls: type[L], path: str | os.PathLike[str] | Any) -> L:
        """The layer :meth:`save` wrote: same config, dtype, build state and bit-identical weights."""
        return _saving.load(cls, path)

    def __repr__(self) -> str:
        state = "built" if self.built else "not built"
        return (
            f"BatchNormalization(name={self.name!r}, axis={self.axis!r}, momentum={self.momentum}, "
            f"epsilon={self.epsilon}, dtype={self.dtype!r}, {state})"
        )
