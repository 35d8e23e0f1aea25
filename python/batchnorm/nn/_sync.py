"""SyncBatchNorm: PyTorch-style batch norm with statistics shared across MPI processes.

In training, each process reduces its own batch to per-channel partials (count, mean,
M2), ONE all-reduce merges them exactly (:mod:`batchnorm.distributed`), and every process
normalizes its batch with the global statistics and updates its running statistics from
them. Backward reduces the two per-channel sums locally, ONE all-reduce adds them, and
each process writes its dx from the global sums. So on R processes the outputs, dx and
running statistics equal those of one process on the concatenated batch; the
weight/bias gradients stay per process (their sum over processes is the one-process
gradient), as with torch's SyncBatchNorm under DistributedDataParallel.

As torch.nn.SyncBatchNorm, it synchronizes only in training mode; in eval mode (also
with track_running_stats=False) and without MPI peers it is the plain layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from ..distributed import _mpi
from ._layers import AXES, Batch, Saved, _BatchNorm, check_masked_count, stat_dtype

__all__ = ["SyncBatchNorm"]

# Ghost batches are chunks of one process's batch, and processes may hold different batch
# sizes, so chunk i would not exist on every process: no per-chunk collective fits.
NO_GHOST_BATCHES = (
    "SyncBatchNorm does not support virtual_batch_size: ghost batches are chunks of one process's "
    "batch, which may differ in size between processes; use BatchNorm1d/2d/3d for ghost batches"
)


class SyncBatchNorm(_BatchNorm):
    """Batch norm synchronized over the processes of an MPI communicator.

    ``SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, dtype="float32", comm=None)``: torch's arguments, with
    ``comm`` an mpi4py communicator (default: ``MPI.COMM_WORLD``, imported at the first
    training call; without mpi4py or with one process the layer is the plain one). Any
    input with at least 2 dimensions, channels on axis 1. Every process of ``comm`` must
    make the same sequence of training calls (forward, then backward), as with any
    collective operation; processes may hold different batch sizes, also zero.
    ``virtual_batch_size`` is refused (ValueError): see ``NO_GHOST_BATCHES``.
    """

    def __init__(self, *args: Any, comm: Any = None, **kwargs: Any) -> None:
        if kwargs.get("virtual_batch_size") is not None:
            raise ValueError(NO_GHOST_BATCHES)
        super().__init__(*args, **kwargs)
        self.comm = _mpi.check_comm(comm)

    def __reduce_ex__(self, protocol: Any) -> Any:
        _mpi.check_picklable(self)
        return super().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _mpi.deepcopy_sharing_comm(self, memo)

    @classmethod
    def convert_sync_batchnorm(cls, layer: _BatchNorm, comm: Any = None) -> SyncBatchNorm:
        """A SyncBatchNorm with the configuration, parameters and running statistics of a
        BatchNorm1d/2d/3d layer (copies), as torch's ``convert_sync_batchnorm`` does."""
        if not isinstance(layer, _BatchNorm):
            raise TypeError(f"expected a BatchNorm1d/2d/3d layer, got {type(layer).__name__}")
        if layer.virtual_batch_size is not None:
            raise ValueError(NO_GHOST_BATCHES)
        new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, layer.dtype)
        new.comm = _mpi.check_comm(comm)
        new.load_state_dict(layer.state_dict())
        new.training = layer.training
        return new

    def _check_input_dim(self, x: np.ndarray) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")

    def _sync_comm(self) -> Any:
        """The communicator of a training call, or None when it runs unsynchronized."""
        return _mpi.active_comm(self.comm) if self.training else None

    def forward(self, x: Any, mask: Any = None) -> np.ndarray:
        """Normalize x (N, C, ...) along axis 1, with global batch statistics in training;
        ``mask`` as BatchNorm1d's, its selected positions counted over all processes (a
        process whose mask selects nothing still takes part)."""
        if self.virtual_batch_size is not None:
            raise ValueError(NO_GHOST_BATCHES)
        comm = self._sync_comm()
        if comm is None:
            a = x if type(x) is np.ndarray else np.asarray(x)
            if a.ndim >= 2 and a.shape[1] == 0:
                raise ValueError("SyncBatchNorm number of input channels should be non-zero")
            return super().forward(x, mask)
        try:
            a = self._input(x)
            if a.shape[1] == 0:
                raise ValueError("SyncBatchNorm number of input channels should be non-zero")
            # torch's checks, but not "more than 1 value per channel": that is a global
            # matter here (checked on the global count, the same on every process).
            self._check_eps(True)
            self._check_compatible(a)
            m = self._layer_mask(mask, a, True)
        except Exception:
            _mpi.allreduce_moments_failed(comm, self.num_features)
            raise
        return self._run(a, True, comm, mask=m)

    def _batch_pass(
        self, x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, comm: Any, mask: Any = None
    ) -> Batch:
        if comm is None:
            return super()._batch_pass(x, weight, bias, comm, mask)
        c = self.num_features
        try:
            mean = np.empty(c, np.float64)
            m2 = np.empty(c, np.float64)
            count = _core.partial_moments(x, AXES, mean, m2, mask=mask)
        except Exception:
            _mpi.allreduce_moments_failed(comm, c)
            raise
        counts, mean, m2 = _mpi.allreduce_moments(comm, count, mean, m2)
        total = int(counts[0]) if c else 0
        if mask is not None and c:  # judged on the global count, the same on every process
            check_masked_count(total, x.shape, f" over all {_mpi.world_size(comm)} processes")
        if total == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel "
                f"over all {_mpi.world_size(comm)} processes"
            )
        sdt = stat_dtype(x.dtype)
        y = np.empty_like(x)
        if total == 0:  # every process empty: as torch on an empty batch
            return Batch(y, np.zeros(c, sdt), np.ones(c, sdt), 0, None, comm)
        mean_s = mean.astype(sdt)
        var_s = (m2 / total).astype(sdt)
        eps = float(self.eps)
        inv_std = np.empty_like(var_s)
        _core.normalize(x, y, AXES, mean_s, var_s, weight, bias, eps, False, inv_std=inv_std)
        return Batch(y, mean_s, inv_std, total, (mean, m2 / (total - 1)), comm)

    def _backward_input(self, saved: Saved, dy: Any) -> np.ndarray:
        try:
            return super()._backward_input(saved, dy)
        except Exception:
            if saved.comm is not None:  # the peers are entering the backward all-reduce
                _mpi.allreduce_sum_failed(saved.comm, 2 * saved.mean.shape[0])
            raise

    def _backward_pass(self, saved: Saved, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        comm = saved.comm
        if comm is None:
            return super()._backward_pass(saved, dy, dx)
        sdt = stat_dtype(saved.x.dtype)
        c = saved.mean.shape[0]
        sum_dy = np.empty(c, np.float64)
        sum_dy_xc = np.empty(c, np.float64)
        try:
            _core.backward_sums(
                dy, saved.x, AXES, saved.mean, saved.inv_std, saved.weight, None, False, sum_dy, sum_dy_xc
            )
        except Exception:
            _mpi.allreduce_sum_failed(comm, 2 * c)
            raise
        dgamma, dbeta = np.empty(c, sdt), np.empty(c, sdt)  # this process's, as backward rounds them
        _core.parameter_gradients(saved.inv_std, sum_dy, sum_dy_xc, dgamma, dbeta)
        total_dy, total_dy_xc = _mpi.allreduce_sum(comm, sum_dy, sum_dy_xc)
        if saved.count:
            _core.backward_apply(
                dy, saved.x, dx, AXES, saved.mean, saved.inv_std, saved.weight, None, False,
                total_dy, total_dy_xc, saved.count, mask=saved.mask,
            )  # fmt: skip
        return dgamma, dbeta
