"""BatchNorm1d/2d/3d: torch.nn.BatchNorm*d whose forward runs on batchnorm's kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import _core, _ghost
from ._functional import _batch_norm, _tracing, ghost_batch_norm


class _Forward:
    """torch.nn.modules.batchnorm._BatchNorm.forward, except that num_batches_tracked moves
    only after a pass that succeeded (torch advances it first), so a failed call changes no buffer."""

    training: bool
    track_running_stats: bool
    momentum: float | None
    eps: float
    virtual_batch_size: int | None = None  # ghost batches (BatchNorm1d/2d/3d only)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """torch's forward; ``mask`` (bool, or 0/1 integers; the input's shape without the
        channel axis, or broadcastable to it) restricts the batch statistics to the
        positions it selects (every position is normalized with them; the running
        statistics take them, the variance unbiased with the masked count). Where the
        running statistics are used (eval) it changes nothing."""
        self._check_input_dim(input)  # type: ignore[attr-defined]  # torch's, per dimension
        # Each read once: a Module attribute read goes through __getattr__, slow beside a small kernel.
        params, buffers = self._parameters, self._buffers  # type: ignore[attr-defined]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        counter = buffers["num_batches_tracked"]
        training = self.training
        tracking = training and self.track_running_stats and counter is not None
        if self.virtual_batch_size is not None:
            chunk = _ghost.chunk_of(self.virtual_batch_size, training, input.shape[0], mask)
            if chunk is not None:
                return self._ghost_forward(input, chunk, counter, tracking)
        factor = self._factor(counter, tracking)
        use_running = not training or self.track_running_stats
        return _batch_norm(
            input,
            running_mean if use_running else None,
            running_var if use_running else None,
            params["weight"],
            params["bias"],
            training or (running_mean is None and running_var is None),
            factor,
            self.eps,
            None,
            mask,
            counter if tracking else None,
        )

    def _ghost_forward(
        self, input: torch.Tensor, chunk: int, counter: torch.Tensor | None, tracking: bool
    ) -> torch.Tensor:
        """A training call over ghost batches of `chunk` samples (more than one)."""
        params, buffers = self._parameters, self._buffers  # type: ignore[attr-defined]
        chunks = _ghost.chunks(input.shape[0], chunk).number
        if tracking and counter is not None:
            tracked = 0 if self.momentum is not None else int(counter)
            factors = _ghost.factors(self.momentum, tracked, chunks)
        else:
            factors = [0.0] * chunks
        use_running = self.track_running_stats
        y: torch.Tensor = ghost_batch_norm(
            input,
            buffers["running_mean"] if use_running else None,
            buffers["running_var"] if use_running else None,
            params["weight"],
            params["bias"],
            factors,
            self.eps,
            chunk,
        )
        if tracking and counter is not None:
            counter.add_(chunks)
        return y

    def _factor(self, counter: torch.Tensor | None, tracking: bool) -> float:
        """The weight of this batch in the running statistics (torch's exponential_average_factor)."""
        if self.momentum is not None:
            return self.momentum
        if tracking and counter is not None:  # cumulative average over the batches so far
            return 1.0 / float(counter + 1)
        return 0.0


def _count_batch(counter: torch.Tensor, input: torch.Tensor) -> None:
    """num_batches_tracked += 1, after a pass that succeeded."""
    if _tracing(input):
        counter.add_(1)
    else:
        _core.count_batch(counter)  # add_ without its dispatch, which costs as much as a small batch


class _Ghost(_Forward):
    """The keyword ``virtual_batch_size=k``: in training, each chunk of k samples is normalized
    with its own statistics and moves the running statistics once, as
    ``torch.cat([m(c) for c in x.split(k)])`` does, in one pass (``batchnorm._ghost``)."""

    def __init__(self, *args: Any, virtual_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.virtual_batch_size = _ghost.check_size(virtual_batch_size)

    def extra_repr(self) -> str:
        s: str = super().extra_repr()  # type: ignore[misc]
        return s if self.virtual_batch_size is None else f"{s}, virtual_batch_size={self.virtual_batch_size}"


class BatchNorm1d(_Ghost, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on batchnorm's kernels: same parameters, buffers and state_dict,
    and ``virtual_batch_size`` (ghost batches)."""


class BatchNorm2d(_Ghost, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on batchnorm's kernels: same parameters, buffers and state_dict,
    and ``virtual_batch_size`` (ghost batches)."""


class BatchNorm3d(_Ghost, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on batchnorm's kernels: same parameters, buffers and state_dict,
    and ``virtual_batch_size`` (ghost batches)."""


_OURS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TORCH = {ours: theirs for theirs, ours in _OURS.items()}


def _sync_class() -> type[torch.nn.Module]:
    from ._sync import SyncBatchNorm  # torch.distributed only when asked for

    cls: type[torch.nn.Module] = SyncBatchNorm
    return cls


def _replace(
    module: torch.nn.modules.batchnorm._BatchNorm, cls: type[torch.nn.Module], **extra: object
) -> torch.nn.Module:
    """A cls holding module's own Parameter and buffer tensors, flags and training mode."""
    new = cls(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        device="meta",  # nothing worth allocating: every tensor is replaced by module's below
        **extra,
    )
    for name, param in module._parameters.items():
        new._parameters[name] = param
    for name, buf in module._buffers.items():
        new._buffers[name] = buf
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def _swap(module: torch.nn.Module, pick: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
    out = pick(module)
    for name, child in module.named_children():
        out.add_module(name, _swap(child, pick))
    return out


def convert(module: torch.nn.Module, *, sync: bool = False, process_group: object = None) -> torch.nn.Module:
    """Every torch.nn.BatchNorm1d/2d/3d in module (and module itself) swapped for batchnorm's.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the replacements hold the same
    Parameter and buffer tensors (an optimizer made before keeps working), requires_grad
    and the training flag; submodules are replaced in place and the (possibly new) root
    is returned. ``sync=True`` gives :class:`SyncBatchNorm` over ``process_group``
    instead, for every batch norm including torch's own SyncBatchNorm.
    """

    def pick(m: torch.nn.Module) -> torch.nn.Module:
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            return m
        if sync or isinstance(m, torch.nn.SyncBatchNorm):  # a SyncBatchNorm stays synchronized
            cls = _sync_class()
            group = process_group if sync else getattr(m, "process_group", None)
            if type(m) is cls and m.process_group is group:
                return m
            return _replace(m, cls, process_group=group)
        ours = _OURS.get(type(m))
        return m if ours is None else _replace(m, ours)

    return _swap(module, pick)


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :func:`convert`: batchnorm's modules back to torch's, same tensors."""

    def pick(m: torch.nn.Module) -> torch.nn.Module:
        if type(m) in _TORCH:
            return _replace(m, _TORCH[type(m)])  # type: ignore[arg-type]
        if isinstance(m, torch.nn.SyncBatchNorm) and type(m) is not torch.nn.SyncBatchNorm:
            return _replace(m, torch.nn.SyncBatchNorm, process_group=m.process_group)
        return m

    return _swap(module, pick)
