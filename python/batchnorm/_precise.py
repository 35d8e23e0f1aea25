"""``precise_statistics``: exact population statistics for the layers' inference pass (PreciseBN).

The moving averages a layer keeps while training lag behind the weights and weight the
last batches most (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"). Inside
``with bn.precise_statistics(layers):`` every training-mode call of those layers still
returns its usual output (normalized with the batch's own statistics; backward works as
usual) but, instead of updating the moving statistics, hands its input to an accumulator
that pools the per-channel (count, mean, M2) partials of every batch exactly (the C++
core's reduce, merged with Chan et al.'s formula in float64). On a normal exit the pooled
mean and variance become the layer's moving statistics:

* Keras-style ``BatchNormalization``: ``moving_mean`` = the mean of all values seen,
  ``moving_variance`` = their variance with the estimator the layer's moving average
  uses: biased (M2/n), or unbiased (M2/(n - 1)) on tf-keras's fused path
  (``layer.fused``). Masked calls pool with the mask's weights. With
  ``renorm`` ``moving_stddev`` becomes ``sqrt(variance + epsilon)``; ``renorm_mean`` and
  ``renorm_stddev`` (training-time corrections) are left alone.
* PyTorch-style ``BatchNorm1d/2d/3d``: ``running_mean`` = the mean, ``running_var`` =
  the unbiased variance over the total count, and ``num_batches_tracked`` advances by
  the number of training calls, as ``torch.optim.swa_utils.update_bn`` counts them.
  ``SyncBatchNorm`` (and the Keras-style ``SyncBatchNormalization``) in an MPI job pools
  the partials of every process (one all-reduce per layer on exit, so every process must
  leave the block together).

n is the number of values per channel over all batches, so the result is that of
the whole data set concatenated, whatever the batch sizes. If the block raises, nothing
is committed. Inference-mode calls are not counted (put PyTorch-style layers in
``train()`` mode, call Keras-style ones with ``training=True``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import numpy as np

from . import _core
from .distributed import _mpi

__all__ = ["PreciseStatistics", "precise_statistics"]

_registry_lock = threading.Lock()


class _Accumulator:
    """One layer's pooled per-channel (count, mean, M2), in float64, and its batch count.

    The layers call :meth:`add` from their training path (under their own lock) in place
    of the moving-statistics update.
    """

    def __init__(self) -> None:
        self.batches = 0
        self.count: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: np.ndarray, axes: tuple[int, ...], weights: np.ndarray | None = None) -> None:
        """Pools the values of x per channel (``axes`` kept); ``weights``: frequency weights
        broadcastable to x (a Keras mask), None for all ones."""
        channels = math.prod(x.shape[a] for a in axes)
        self.batches += 1
        if weights is None:
            mean = np.empty(channels, np.float64)
            m2 = np.empty(channels, np.float64)
            n = _core.partial_moments(x, axes, mean, m2) if x.size else 0
            count = np.full(channels, float(n))
            if n == 0:
                mean[...] = 0.0
                m2[...] = 0.0
        else:
            red = tuple(i for i in range(x.ndim) if i not in axes)
            w = np.broadcast_to(np.asarray(weights, np.float64), x.shape)
            xf = x.astype(np.float64)
            count = w.sum(axis=red, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                mu = np.where(count > 0, (w * xf).sum(axis=red, keepdims=True) / count, 0.0)
            m2 = (w * np.square(xf - mu)).sum(axis=red).reshape(channels)
            mean = mu.reshape(channels)
            count = count.reshape(channels)
        self.merge(count, mean, m2)

    def merge(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        if self.count is None or self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        if count.shape != self.count.shape:
            raise ValueError(
                f"precise_statistics: this call has {count.size} channels, earlier calls had {self.count.size}"
            )
        self.count, self.mean, self.m2 = _mpi.merge_moments((self.count, self.mean, self.m2), (count, mean, m2))


def _is_keras(layer: Any) -> bool:
    return hasattr(layer, "moving_mean") and hasattr(layer, "_build")


def _is_torch(layer: Any) -> bool:
    return hasattr(layer, "running_mean") and hasattr(layer, "num_batches_tracked")


def _commit_keras(layer: Any, acc: _Accumulator) -> None:
    b = layer._build
    if b is None or acc.count is None or acc.mean is None or acc.m2 is None:
        return
    n, mean, m2 = acc.count, acc.mean, acc.m2
    seen = n > 0
    if not seen.any():
        return
    w = b.weights
    pdt = layer.param_dtype
    with np.errstate(divide="ignore", invalid="ignore"):
        # tf-keras's fused kernel stores M/(M-1) with M-1 floored at 1 (no NaN for M = 1).
        var = m2 / np.maximum(n - 1, 1) if b.fused else m2 / n

    values = {"moving_mean": mean, "moving_variance": var}
    if "moving_stddev" in w:
        values["moving_stddev"] = np.sqrt(var + layer.epsilon)
    # every new value first, then the writes: a failure leaves the statistics as they were
    new = {k: np.where(seen, v, w[k].reshape(-1).astype(np.float64)).astype(pdt) for k, v in values.items()}
    for k, v in new.items():
        w[k].reshape(-1)[...] = v


def _commit_torch(layer: Any, acc: _Accumulator) -> None:
    rm, rv, nbt = layer._running_mean, layer._running_var, layer._num_batches_tracked
    if rm is None or rv is None or nbt is None:
        return
    if acc.count is not None and acc.mean is not None and acc.m2 is not None:
        n, mean, m2 = acc.count, acc.mean, acc.m2
        seen = n > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            var = m2 / (n - 1)  # torch's unbiased estimator: NaN for one value in all
        new_mean = np.where(seen, mean, rm.astype(np.float64)).astype(rm.dtype)
        new_var = np.where(seen, var, rv.astype(np.float64)).astype(rv.dtype)
        rm[...] = new_mean  # both computed first: a failure leaves the statistics as they were
        rv[...] = new_var
    nbt += acc.batches


def _sync_comm(layer: Any) -> Any:
    """The communicator a SyncBatchNorm layer pools over (None: one process)."""
    from .keras import SyncBatchNormalization
    from .nn import SyncBatchNorm

    return _mpi.active_comm(layer.comm) if isinstance(layer, (SyncBatchNorm, SyncBatchNormalization)) else None


def _channels(layer: Any, acc: _Accumulator) -> int:
    """The number of per-channel partials a synchronized layer sends when pooling."""
    if acc.count is not None:
        return int(acc.count.size)
    if _is_torch(layer):
        return int(layer.num_features)
    b = layer._build
    return 0 if b is None else math.prod(b.dims.values())


class PreciseStatistics:
    """The context manager :func:`precise_statistics` returns (see the module docstring).

    After the block, :attr:`batches` maps each layer's position in :attr:`layers` to the
    number of training calls it pooled and :attr:`counts` to the number of values per
    channel (a float64 array; masked Keras calls count their weights).
    """

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.batches: list[int] = [0] * len(layers)
        self.counts: list[np.ndarray | None] = [None] * len(layers)
        self._accumulators: list[_Accumulator] | None = None

    def __enter__(self) -> PreciseStatistics:
        if self._accumulators is not None:
            raise RuntimeError("this precise_statistics block is already active")
        accs = [_Accumulator() for _ in self.layers]
        attached: list[Any] = []
        with _registry_lock:
            try:
                for layer, acc in zip(self.layers, accs, strict=True):
                    with layer._lock:
                        if layer._precise_stats is not None:
                            raise RuntimeError(f"{layer!r} is already inside another precise_statistics block")
                        layer._precise_stats = acc
                    attached.append(layer)
            except BaseException:
                for layer in attached:
                    with layer._lock:
                        layer._precise_stats = None
                raise
        self._accumulators = accs
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        accs = self._accumulators
        self._accumulators = None
        if accs is None:
            return
        for i, (layer, acc) in enumerate(zip(self.layers, accs, strict=True)):
            with layer._lock:
                layer._precise_stats = None
            self.batches[i] = acc.batches
            if exc_type is not None:
                continue
            comm = _sync_comm(layer)
            if comm is not None:
                c = _channels(layer, acc)
                count = np.zeros(c) if acc.count is None else acc.count
                mean = np.zeros(c) if acc.mean is None else acc.mean
                m2 = np.zeros(c) if acc.m2 is None else acc.m2
                acc.count, acc.mean, acc.m2 = _mpi.allreduce_moments(comm, count, mean, m2)
            self.counts[i] = None if acc.count is None else acc.count.copy()
            with layer._lock:
                if _is_keras(layer):
                    _commit_keras(layer, acc)
                else:
                    _commit_torch(layer, acc)


def precise_statistics(layer_or_layers: Any) -> PreciseStatistics:
    """A context manager: inside it, training-mode calls of the given layers pool exact
    population statistics instead of updating the moving ones; on exit they are committed.

    ``layer_or_layers``: a ``bn.BatchNormalization`` or ``bn.BatchNorm1d/2d/3d`` (also
    ``SyncBatchNorm``), or an iterable of them::

        with bn.precise_statistics(layers):
            for x in batches:          # e.g. the training set, with the weights frozen
                net(x, training=True)  # the usual training outputs; moving stats untouched
        # now every layer's moving mean/variance are those of all the values it saw

    See the module docstring of ``batchnorm._precise`` for the estimators.
    """
    items = [layer_or_layers] if (_is_keras(layer_or_layers) or _is_torch(layer_or_layers)) else layer_or_layers
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise TypeError(
            "precise_statistics takes a batch-norm layer (bn.BatchNormalization, bn.BatchNorm1d/2d/3d) or an "
            f"iterable of them, got {type(layer_or_layers).__name__}"
        )
    layers: list[Any] = []
    seen: set[int] = set()
    for layer in items:
        if not (_is_keras(layer) or _is_torch(layer)) or not hasattr(layer, "_precise_stats"):
            raise TypeError(
                f"precise_statistics: expected batch-norm layers of this package, got {type(layer).__name__}"
            )
        if _is_torch(layer) and not layer.track_running_stats:
            raise ValueError(
                f"{layer!r} has no running statistics (track_running_stats=False): there is nothing to compute"
            )
        if id(layer) not in seen:
            seen.add(id(layer))
            layers.append(layer)
    return PreciseStatistics(layers)
