"""Collective plumbing for synchronized batch norm over MPI (mpi4py, imported lazily).

Shared by the PyTorch-style ``SyncBatchNorm`` and the Keras-style
``SyncBatchNormalization``. Everything sent is per channel, so a message is O(C)
whatever the batch size:

- :func:`allreduce_moments` merges per-channel (count, mean, M2) partials of all
  processes in ONE all-reduce, with a user-defined MPI operation that applies the
  parallel-variance merge of Chan et al. Ranks may hold different batch sizes, even
  none. The operation is declared non-commutative, so MPI combines the partials in rank
  order and every process receives the same, reproducible, statistics.
- :func:`allreduce_sum` sums several per-channel arrays in ONE all-reduce (the two
  backward sums).

If a process fails before a collective (bad input, ...), it calls
:func:`allreduce_moments_failed` / :func:`allreduce_sum_failed` instead and re-raises its
own error; the other processes then get :class:`PeerError` from the same collective
instead of waiting for ever.

Typical use in a training forward and backward::

    count = _core.partial_moments(x, axes, mean, m2)             # local partials, float64
    counts, mean, m2 = allreduce_moments(comm, count, mean, m2)   # global statistics
    ...
    sum_dy, sum_dy_xc = allreduce_sum(comm, sum_dy, sum_dy_xc)    # global backward sums
"""

from __future__ import annotations

import copy
import functools
import pickle
from typing import Any

import numpy as np

from .. import _core

__all__ = [
    "PeerError",
    "active_comm",
    "allreduce_moments",
    "allreduce_moments_failed",
    "allreduce_sum",
    "allreduce_sum_failed",
    "check_comm",
    "check_picklable",
    "deepcopy_sharing_comm",
    "default_comm",
    "merge_moments",
    "world_size",
]

Comm = Any  # an mpi4py communicator (mpi4py is optional, so no static type here)
Moments = tuple[Any, Any, Any]  # per-channel (count, mean, M2) array-likes


class PeerError(RuntimeError):
    """Another process failed its part of a synchronized call (its own error says why)."""


@functools.cache
def _mpi() -> Any | None:
    """mpi4py.MPI (importing it initializes MPI), or None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


def default_comm() -> Comm | None:
    """mpi4py's COMM_WORLD, or None when mpi4py is not installed."""
    mpi = _mpi()
    return None if mpi is None else mpi.COMM_WORLD


def world_size(comm: Comm | None) -> int:
    """The number of processes of comm (1 for None)."""
    return 1 if comm is None else int(comm.Get_size())


def check_comm(comm: Any) -> Comm | None:
    """comm itself if it can be one (None, or an object with mpi4py's Get_size and Allreduce):
    a wrong one is a TypeError when the layer is made, not an AttributeError at its first call."""
    if comm is not None and not (
        callable(getattr(comm, "Get_size", None)) and callable(getattr(comm, "Allreduce", None))
    ):
        raise TypeError(f"comm must be an mpi4py communicator or None, got {comm!r}")
    return comm


def check_picklable(owner: Any) -> None:
    """Before pickling a synchronized layer: mpi4py pickles only its predefined communicators
    (COMM_WORLD, COMM_SELF: the loading process's own); any other comm is a TypeError saying so."""
    comm = owner.comm
    if comm is None:
        return
    try:
        pickle.dumps(comm)
    except Exception as e:
        raise TypeError(
            f"cannot pickle a {type(owner).__name__} whose comm is {comm!r} ({e}): mpi4py pickles only "
            "MPI.COMM_WORLD and MPI.COMM_SELF. Set layer.comm = None (COMM_WORLD) before pickling and "
            "the communicator to use after loading"
        ) from None


def deepcopy_sharing_comm(owner: Any, memo: dict[int, Any]) -> Any:
    """copy.deepcopy of a synchronized layer: all its state is copied, but the copy shares the
    communicator (a process resource, not state; mpi4py cannot copy one it did not predefine)."""
    memo[id(owner.comm)] = owner.comm
    new = object.__new__(type(owner))
    memo[id(owner)] = new
    new.__setstate__(copy.deepcopy(owner.__getstate__(), memo))
    return new


def active_comm(comm: Comm | None) -> Comm | None:
    """The communicator to synchronize over: comm (COMM_WORLD when None and mpi4py is
    installed), or None when there is nothing to synchronize with (no mpi4py, one process)."""
    c = default_comm() if comm is None else comm
    return c if world_size(c) > 1 else None


def merge_moments(a: Moments, b: Moments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel merge of two (count, mean, M2) partials a and b (1-D, float64): the core's
    merge_moments (Chan et al.) on copies of a. An empty side (count 0) contributes nothing;
    a negative count marks a failed process and makes the result (-1, 0, 0).
    """
    n, mean, m2 = (np.array(v, np.float64) for v in a)  # copies: the core merges into them
    nb, mb, qb = (np.ascontiguousarray(v, np.float64) for v in b)
    failed = (n < 0) | (nb < 0)
    _core.merge_moments(n, mean, m2, nb, mb, qb)
    if failed.any():
        n[failed], mean[failed], m2[failed] = -1.0, 0.0, 0.0
    return n, mean, m2


def _merge_op_function(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
    """The MPI user operation: inout = in (lower ranks) merged with inout, per channel.

    One element of the datatype is one channel's (count, mean, M2) triple, so MPI may cut
    the buffer into pieces anywhere between channels and the merge stays correct."""
    a = np.frombuffer(inbuf, np.float64).reshape(-1, 3)
    b = np.frombuffer(inoutbuf, np.float64).reshape(-1, 3)
    n, mean, m2 = merge_moments((a[:, 0], a[:, 1], a[:, 2]), (b[:, 0], b[:, 1], b[:, 2]))
    b[:, 0] = n
    b[:, 1] = mean
    b[:, 2] = m2


@functools.cache
def _merge_op() -> tuple[Any, Any]:
    """(the merge operation, the triple datatype), created once per process."""
    mpi = _mpi()
    if mpi is None:  # pragma: no cover - callers only get here with a communicator
        raise RuntimeError("mpi4py is not installed")
    triple = mpi.DOUBLE.Create_contiguous(3)
    triple.Commit()
    return mpi.Op.Create(_merge_op_function, commute=False), triple


def _allreduce_triples(comm: Comm, triples: np.ndarray) -> np.ndarray:
    op, triple = _merge_op()
    out = np.empty_like(triples)
    if triples.shape[0]:
        comm.Allreduce([triples, triples.shape[0], triple], [out, triples.shape[0], triple], op=op)
    return out


def allreduce_moments(comm: Comm, count: Any, mean: Any, m2: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global per-channel (count, mean, M2) from every process's partials, in one all-reduce.

    ``count`` is this process's number of values per channel (an int, or one per channel),
    ``mean`` and ``m2`` (sum of squared deviations from the mean) its per-channel partials,
    e.g. from ``_core.partial_moments``; a process with no values passes count 0. Returns
    float64 arrays shaped like ``mean``: the total count, the mean and M2 of all values of
    all processes (the biased variance is M2/count, the unbiased M2/(count - 1)).
    Identical on every process. Raises PeerError if another process failed.
    """
    mu = np.asarray(mean, np.float64)
    sq = np.asarray(m2, np.float64)
    counts = np.asarray(count, np.float64)
    if sq.size != mu.size:
        raise ValueError(f"mean has {mu.size} elements but m2 has {sq.size}")
    if (counts < 0).any():
        raise ValueError("count must be non-negative")
    triples = np.empty((mu.size, 3), np.float64)
    triples[:, 0] = np.broadcast_to(counts, mu.shape).ravel()
    triples[:, 1] = mu.ravel()
    triples[:, 2] = sq.ravel()
    out = _allreduce_triples(comm, triples)
    if (out[:, 0] < 0).any():
        raise PeerError("another process failed in this synchronized batch-norm call")
    return tuple(out[:, k].reshape(mu.shape).copy() for k in range(3))  # type: ignore[return-value]


def allreduce_moments_failed(comm: Comm, channels: int) -> None:
    """Take part in the all-reduce of :func:`allreduce_moments` as a process that failed,
    so that the others raise PeerError instead of waiting. Re-raise your error after it."""
    triples = np.zeros((channels, 3), np.float64)
    triples[:, 0] = -1.0
    _allreduce_triples(comm, triples)


def _allreduce_flagged(comm: Comm, buf: np.ndarray) -> np.ndarray:
    mpi = _mpi()
    if mpi is None:  # pragma: no cover
        raise RuntimeError("mpi4py is not installed")
    out = np.empty_like(buf)
    comm.Allreduce(buf, out, op=mpi.SUM)
    return out


def allreduce_sum(comm: Comm, *arrays: Any) -> tuple[np.ndarray, ...]:
    """Element-wise sums over all processes of several arrays, in one all-reduce (float64).

    Returns float64 arrays shaped like the inputs, identical on every process. Raises
    PeerError if another process failed.
    """
    parts = [np.asarray(a, np.float64) for a in arrays]
    buf = np.empty(sum(p.size for p in parts) + 1, np.float64)
    offset = 0
    for p in parts:
        buf[offset : offset + p.size] = p.ravel()
        offset += p.size
    buf[-1] = 0.0  # the failure flag: processes that failed send 1
    out = _allreduce_flagged(comm, buf)
    if out[-1] != 0:
        raise PeerError("another process failed in this synchronized batch-norm call")
    result = []
    offset = 0
    for p in parts:
        result.append(out[offset : offset + p.size].reshape(p.shape).copy())
        offset += p.size
    return tuple(result)


def allreduce_sum_failed(comm: Comm, size: int) -> None:
    """Take part in the all-reduce of :func:`allreduce_sum` (``size`` = the total number of
    elements of its arrays) as a process that failed. Re-raise your error after it."""
    buf = np.zeros(size + 1, np.float64)
    buf[-1] = 1.0
    _allreduce_flagged(comm, buf)
