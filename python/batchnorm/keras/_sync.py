"""SyncBatchNormalization: the Keras-style layer with statistics shared across MPI processes.

tf-keras's ``SyncBatchNormalization`` (``BatchNormalization(synchronized=True)``) on CPU
processes joined by MPI. In a training call each process reduces its own batch to
per-channel partials (count, mean, M2; with a mask: weight sum, weighted mean and M2),
ONE all-reduce merges them exactly (:mod:`batchnorm.distributed`), and every process normalizes
its rows with the global mean and biased variance and moves its moving statistics towards
them. Backward reduces the two per-channel sums locally, ONE all-reduce adds them, and
each process writes its dx from the global sums. So on R processes the outputs, dx and
moving statistics equal those of one process running ``BatchNormalization(fused=False)``
on the concatenated batch (to rounding); the gamma/beta gradients stay per process (their
sum over processes is the one-process gradient).

As in tf-keras the layer is never fused: ``moving_variance`` receives the biased
variance. Inference calls (``training`` false, or ``trainable=False``) are the plain
layer's and communicate nothing; so is everything without mpi4py or with one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._functional import inv_std_of
from ..distributed import _mpi
from ._layer import BatchNormalization, _Build, _Last, _unique_name

__all__ = ["SyncBatchNormalization"]


@dataclass
class _SyncLast(_Last):
    """A synchronized training call: what its backward needs besides the plain fields."""

    comm: Any = None
    count: int = 0  # values per channel over all processes (unmasked calls)
    wsum: np.ndarray | None = None  # mask weight per channel over all processes (masked calls)


class SyncBatchNormalization(BatchNormalization):
    """Batch normalization (tf-keras 2) with batch statistics over the processes of an MPI job.

    ``SyncBatchNormalization(axis=-1, momentum=0.99, epsilon=0.001, center=True,
    scale=True, <initializers, regularizers, constraints>, renorm=False,
    renorm_clipping=None, renorm_momentum=0.99, fused=None, trainable=True,
    virtual_batch_size=None, adjustment=None, name=None, dtype="float32", comm=None)``:
    ``BatchNormalization``'s arguments plus ``comm``, an mpi4py communicator (default
    ``MPI.COMM_WORLD``, imported at the first training call; without mpi4py or with one
    process the layer is ``BatchNormalization(fused=False)``).

    Supported in synchronized training: axis ints and lists, ``center``/``scale`` off,
    every initializer/regularizer/constraint, ``renorm`` (r and d from the global
    statistics), ``adjustment`` (called with the local input's shape) and ``mask``
    (weighted moments pooled over processes; weights must be >= 0). Not supported:
    ``fused=True`` (ValueError, as tf-keras) and ``virtual_batch_size`` (ValueError at
    construction: ghost batches are per process, not global).

    Every process of ``comm`` must make the same sequence of training calls (forward,
    then backward) with the same feature sizes, as with any collective; batch sizes may
    differ, also be zero. A process whose call fails raises its own error and the others
    get ``batchnorm.PeerError`` from the same collective instead of hanging; a call
    that raises changes nothing. ``get_config()`` has tf-keras's keys (no ``comm``);
    ``save`` writes BatchNormalization's file format, which either class can ``load``.
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
        comm: Any = None,
    ) -> None:
        if fused is not None and not isinstance(fused, (bool, np.bool_)):
            raise TypeError(f"fused must be True, False or None, got {fused!r}")
        if fused:
            raise ValueError("`fused` argument cannot be True for SyncBatchNormalization.")
        if virtual_batch_size is not None:
            raise ValueError(
                "SyncBatchNormalization does not support `virtual_batch_size` (ghost batches would be per "
                f"process, not global); got virtual_batch_size={virtual_batch_size!r}. Use BatchNormalization."
            )
        super().__init__(
            axis, momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
            moving_mean_initializer, moving_variance_initializer, beta_regularizer, gamma_regularizer,
            beta_constraint, gamma_constraint, renorm, renorm_clipping, renorm_momentum, False, trainable,
            None, adjustment, name if name else _unique_name("sync_batch_normalization"), dtype,
        )  # fmt: skip
        self.comm = comm
        self._call_comm: Any = None  # the communicator of the training call in progress
        self._in_collective = False  # whether that call has reached its all-reduce

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SyncBatchNormalization:
        """A new (unbuilt) layer from :meth:`get_config`'s dict (or a tf-keras layer's config)."""
        cfg = dict(config)
        cfg.pop("batch_input_shape", None)
        cfg.pop("synchronized", None)
        return cls(**cfg)

    # ----------------------------------------------------------------- forward
    def __call__(self, inputs: Any, training: bool | None = None, mask: Any = None) -> np.ndarray:
        """Normalizes ``inputs``; in training with the statistics of all processes' batches."""
        with self._lock:
            comm = _mpi.active_comm(self.comm) if (bool(training) and self._trainable) else None
            if comm is None:
                return super().__call__(inputs, training, mask)
            self._call_comm = comm
            self._in_collective = False
            try:
                return super().__call__(inputs, training, mask)
            except Exception:
                if not self._in_collective:  # the peers are entering the forward all-reduce
                    _mpi.allreduce_moments_failed(comm, self._channels_for(inputs))
                raise
            finally:
                self._call_comm = None

    def _channels_for(self, inputs: Any) -> int:
        """The number of channels the peers send (this process's build, else its input's)."""
        b = self._build
        if b is not None:
            return math.prod(b.dims.values())
        try:
            shape = np.shape(inputs)
            return math.prod(int(shape[a]) for a in self._resolve_axes(len(shape)))
        except Exception:  # an input without a usable shape: nothing better to send
            return 1

    def _train(self, b: _Build, x: np.ndarray, mask: Any) -> tuple[np.ndarray, dict[str, np.ndarray], _Last]:
        comm = self._call_comm
        if comm is None:
            return super()._train(b, x, mask)
        pdt = self.param_dtype
        axes = tuple(sorted(b.axes))
        w = b.weights
        kept = tuple(x.shape[a] for a in axes)
        channels = math.prod(kept)
        keep_shape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))

        # Local work that may fail: before the collective (the caller tells the peers).
        scale_mult: np.ndarray | None = None
        offset_mult: np.ndarray | None = None
        if self.adjustment is not None:
            scale_mult, offset_mult = self._adjustment(x, keep_shape)
        weights: np.ndarray | None = None
        mean = np.zeros(channels, np.float64)
        m2 = np.zeros(channels, np.float64)
        if mask is not None:
            weights = self._mask_weights(mask, x)
            red = tuple(i for i in range(x.ndim) if i not in axes)
            wb = np.broadcast_to(weights, x.shape)
            count: Any = wb.sum(axis=red).reshape(channels)
            if (count < 0).any():
                raise ValueError("SyncBatchNormalization needs mask weights >= 0")
            xf = x.astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                mu = np.where(count > 0, (wb * xf).sum(axis=red).reshape(channels) / count, 0.0)
            m2 = (wb * np.square(xf - mu.reshape(keep_shape))).sum(axis=red).reshape(channels)
            mean = mu
        elif x.size:
            count = _core.partial_moments(x, axes, mean, m2)
        else:
            count = 0

        self._in_collective = True
        counts, gmean, gm2 = _mpi.allreduce_moments(comm, count, mean, m2)
        total = int(counts[0]) if channels else 0
        if mask is None and total == 0 and channels:
            raise ValueError(
                "training on an empty batch: the reduced axes hold no values on any of the "
                f"{_mpi.world_size(comm)} processes"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            var64 = np.where(counts > 0, gm2 / counts, 0.0)
        mean_s = np.where(counts > 0, gmean, 0.0).astype(pdt).reshape(kept)
        var_s = var64.astype(pdt).reshape(kept)

        gamma = None if "gamma" not in w else np.array(w["gamma"], dtype=pdt, copy=True).reshape(-1)
        beta = None if "beta" not in w else np.array(w["beta"], dtype=pdt, copy=True).reshape(-1)
        new_mean, new_var = mean_s.reshape(-1), var_s.reshape(-1)
        eps = pdt.type(self.epsilon)
        if self.renorm:  # r and d from the global statistics, as BatchNormalization does from its batch's
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
        y = np.empty_like(x)
        _core.normalize(x, y, axes, mean_s, var_s, g_eff, b_eff, self.epsilon, False)
        inv_std = inv_std_of(var_s, self.epsilon, pdt)  # the one normalize used

        mom = self.momentum
        updates = {"moving_mean": self._moving_average(w["moving_mean"], new_mean, mom)}
        if self.renorm:
            stddev = np.sqrt(new_var + eps)
            rmom = self.renorm_momentum
            updates["renorm_mean"] = self._moving_average(w["renorm_mean"], new_mean, rmom)
            updates["renorm_stddev"] = self._moving_average(w["renorm_stddev"], stddev, rmom)
            moving_stddev = self._moving_average(w["moving_stddev"], stddev, mom)
            updates["moving_stddev"] = moving_stddev
            updates["moving_variance"] = np.maximum(moving_stddev * moving_stddev - eps, pdt.type(0))
        else:  # never fused: the biased variance, as tf-keras's SyncBatchNormalization
            updates["moving_variance"] = self._moving_average(w["moving_variance"], new_var, mom)

        last = _SyncLast(
            training=True,
            x=x,
            input_shape=x.shape,
            axes=axes,
            mean=mean_s,
            inv_std=inv_std,
            gamma=g_eff,
            reps=1,
            scale_mult=scale_mult,
            offset_mult=offset_mult,
            weights=weights,
            has_gamma=gamma is not None,
            has_beta=beta is not None,
            param_shape=b.param_shape,
            comm=comm,
            count=total,
            wsum=None if mask is None else counts.reshape(keep_shape),
        )
        return y, updates, last

    # ----------------------------------------------------------------- backward
    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the last call with respect to its input; sets ``self.grads``.

        After a synchronized training call: one all-reduce of the per-channel sums, dx
        from the global ones, ``grads`` from this process's rows only."""
        with self._lock:
            last = self._last
            if not isinstance(last, _SyncLast) or last.comm is None:
                return super().backward(dy)
            comm = last.comm
            c = last.mean.size
            sum_dy = np.zeros(c, np.float64)
            sum_dy_xc = np.zeros(c, np.float64)
            try:
                g = dy if isinstance(dy, np.ndarray) else np.asarray(dy)
                if g.shape != last.input_shape:
                    raise ValueError(
                        f"dy has shape {g.shape}; expected {last.input_shape}, the shape of the last input"
                    )
                if g.dtype != self.compute_dtype:
                    if g.dtype.kind not in "biuf" and g.dtype.name != "bfloat16":
                        raise TypeError(f"dy must be a real numeric array; got dtype {g.dtype}")
                    g = g.astype(self.compute_dtype)
                if g.size:
                    _core.backward_sums(
                        g, last.x, last.axes, last.mean, last.inv_std, last.gamma, None, False, sum_dy, sum_dy_xc
                    )
            except Exception:
                _mpi.allreduce_sum_failed(comm, 2 * c)
                raise
            total_dy, total_dy_xc = _mpi.allreduce_sum(comm, sum_dy, sum_dy_xc)
            inv64 = last.inv_std.astype(np.float64).reshape(-1)
            if last.weights is None:
                dx = np.empty_like(last.x)
                if last.count and dx.size:
                    _core.backward_apply(
                        g, last.x, dx, last.axes, last.mean, last.inv_std, last.gamma, None, False,
                        total_dy, total_dy_xc, last.count,
                    )  # fmt: skip
            else:
                dx = self._sync_masked_dx(last, g, total_dy, total_dy_xc * inv64)
            # This process's gradients (sum(dy * x_hat), sum(dy)), as the plain layer composes them.
            dg = sum_dy_xc * inv64
            db = sum_dy
            if last.scale_mult is not None and last.offset_mult is not None:
                dg = dg * last.scale_mult + db * last.offset_mult
            pdt = self.param_dtype
            grads: dict[str, np.ndarray] = {}
            if last.has_gamma:
                grads["gamma"] = dg.astype(pdt).reshape(last.param_shape)
            if last.has_beta:
                grads["beta"] = db.astype(pdt).reshape(last.param_shape)
            self.grads = grads
            return dx.reshape(last.input_shape)

    @staticmethod
    def _sync_masked_dx(last: _SyncLast, dy: np.ndarray, total_dy: np.ndarray, total_dy_xhat: np.ndarray) -> np.ndarray:
        """dx of a masked call: a*(dy - w*(sum(dy) + x_hat*sum(dy*x_hat))/W), sums and W global."""
        assert last.weights is not None
        assert last.wsum is not None
        x = last.x
        shape = last.wsum.shape
        wsum = last.wsum
        inv = last.inv_std.astype(np.float64).reshape(shape)
        mean = last.mean.astype(np.float64).reshape(shape)
        a = inv if last.gamma is None else last.gamma.astype(np.float64).reshape(shape) * inv
        with np.errstate(divide="ignore", invalid="ignore"):
            k_mean = np.where(wsum != 0, total_dy.reshape(shape) / wsum, 0.0)
            k_var = np.where(wsum != 0, total_dy_xhat.reshape(shape) / wsum, 0.0)
        x_hat = (x.astype(np.float64) - mean) * inv
        dx: np.ndarray = (a * (dy.astype(np.float64) - last.weights * (k_mean + x_hat * k_var))).astype(x.dtype)
        return dx

    def __repr__(self) -> str:
        return "Sync" + super().__repr__()
