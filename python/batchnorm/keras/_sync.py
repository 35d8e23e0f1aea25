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

import inspect
import math
from typing import Any

import numpy as np

from .. import _core
from ..distributed import _mpi
from . import _args, _build, _step
from ._layer import BatchNormalization
from ._step import Last, Stats

__all__ = ["SyncBatchNormalization"]


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

    _SYNCHRONIZED = True

    def __init__(self, *args: Any, comm: Any = None, **kwargs: Any) -> None:
        _mpi.check_comm(comm)
        given = inspect.signature(BatchNormalization).bind(*args, **kwargs).arguments
        if _args.fused(given.get("fused")):
            raise ValueError("`fused` argument cannot be True for SyncBatchNormalization.")
        if given.get("virtual_batch_size") is not None:
            raise ValueError(
                "SyncBatchNormalization does not support `virtual_batch_size` (ghost batches would be per "
                f"process, not global); got virtual_batch_size={given['virtual_batch_size']!r}. Use BatchNormalization."
            )
        given["fused"] = False
        given["name"] = given.get("name") or _args.unique_name("sync_batch_normalization")
        super().__init__(**given)
        self.comm = comm
        self._call_comm: Any = None  # the communicator of the training call in progress
        self._in_collective = False  # whether that call has reached its all-reduce

    def __reduce_ex__(self, protocol: Any) -> Any:
        _mpi.check_picklable(self)
        return super().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _mpi.deepcopy_sharing_comm(self, memo)

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
            return math.prod(int(shape[a]) for a in _build.resolve_axes(self.axis, len(shape)))
        except Exception:  # an input without a usable shape: nothing better to send
            return 1

    def _batch_statistics(
        self, x: np.ndarray, axes: tuple[int, ...], weights: np.ndarray | None, mask: np.ndarray | None
    ) -> Stats | None:
        """The mean and biased variance of all processes' batches: this process's partials
        (count, mean, M2; with a mask: weight sum, weighted mean and M2), merged in one all-reduce."""
        comm = self._call_comm
        if comm is None:
            return super()._batch_statistics(x, axes, weights, mask)
        kept = tuple(x.shape[a] for a in axes)
        channels = math.prod(kept)
        count: Any = 0
        mean = np.zeros(channels, np.float64)
        m2 = np.zeros(channels, np.float64)
        if mask is not None:  # the kernels' weighted partials (mask: the same weights for every channel)
            count = np.full(channels, float(mask.sum(dtype=np.float64)))
            _core.partial_moments(x, axes, mean, m2, mask=mask)
        elif weights is not None:
            wsum, mu, sq = _step.weighted_partials(x, axes, weights)
            if (wsum < 0).any():
                raise ValueError("SyncBatchNormalization needs mask weights >= 0")
            count, mean, m2 = wsum.reshape(channels), mu.reshape(channels), sq.reshape(channels)
        elif x.size:
            count = _core.partial_moments(x, axes, mean, m2)

        self._in_collective = True
        counts, gmean, gm2 = _mpi.allreduce_moments(comm, count, mean, m2)
        total = int(counts[0]) if channels else 0
        if weights is None and total == 0 and channels:
            raise ValueError(
                "training on an empty batch: the reduced axes hold no values on any of the "
                f"{_mpi.world_size(comm)} processes"
            )
        pdt = self.param_dtype
        with np.errstate(divide="ignore", invalid="ignore"):
            var64 = np.where(counts > 0, gm2 / counts, 0.0)
        mean_s = np.where(counts > 0, gmean, 0.0).astype(pdt).reshape(kept)
        wsum_all = (
            None if weights is None else counts.reshape(tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim)))
        )
        return Stats(mean_s, var64.astype(pdt).reshape(kept), wsum_all, total, comm)

    # ----------------------------------------------------------------- backward
    def _backward_input(self, last: Last, dy: Any) -> np.ndarray:
        try:
            return super()._backward_input(last, dy)
        except Exception:
            if last.comm is not None:  # the peers are entering the backward all-reduce
                _mpi.allreduce_sum_failed(last.comm, 2 * last.mean.size)
            raise

    def _backward_pass(self, last: Last, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """After a synchronized training call: one all-reduce of the per-channel sums, dx
        from the global ones, the gradients from this process's rows only."""
        comm = last.comm
        if comm is None:
            return super()._backward_pass(last, dy)
        c = last.mean.size
        sum_dy = np.zeros(c, np.float64)
        sum_dy_xc = np.zeros(c, np.float64)
        try:
            if dy.size:
                _core.backward_sums(
                    dy, last.x, last.axes, last.mean, last.inv_std, last.gamma, None, False, sum_dy, sum_dy_xc
                )
        except Exception:
            _mpi.allreduce_sum_failed(comm, 2 * c)
            raise
        total_dy, total_dy_xc = _mpi.allreduce_sum(comm, sum_dy, sum_dy_xc)
        inv64 = last.inv_std.astype(np.float64).reshape(-1)

        def gradients(s: np.ndarray, sx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(dgamma, dbeta) from a pair of sums, by backward's rule, in float64."""
            dgamma, dbeta = np.empty(c), np.empty(c)
            _core.parameter_gradients(inv64, s, sx, dgamma, dbeta)
            return dgamma, dbeta

        # The kernels take a mask whose weights are the same for every channel, here and (the
        # weight sums tell) on every peer.
        wsum = np.zeros(1) if last.wsum is None else last.wsum.reshape(-1)
        on_kernels = last.mask is not None and bool(np.all(wsum == wsum[0]))
        if last.weights is None or on_kernels:
            dx = np.empty_like(last.x)
            count = last.count if last.weights is None else float(wsum[0])
            if count and dx.size:
                _core.backward_apply(
                    dy, last.x, dx, last.axes, last.mean, last.inv_std, last.gamma, None, False,
                    total_dy, total_dy_xc, count, mask=last.mask,
                )  # fmt: skip
        else:
            dx = _step.masked_dx(last, dy, total_dy, gradients(total_dy, total_dy_xc)[0])
        return dx, *gradients(sum_dy, sum_dy_xc)

    def __repr__(self) -> str:
        return "Sync" + super().__repr__()
