"""SyncBatchNorm: torch.nn.SyncBatchNorm on CPU tensors, over torch.distributed (gloo, mpi).

In training inside an initialized process group of more than one rank, each rank reduces
its batch to per-channel partials (count, mean, M2) in float64, ONE all_gather brings
every rank's partials, and every rank merges them in rank order (Chan et al.), so all
ranks normalize with bitwise the same global statistics and update their running
statistics from them (unbiased with the global count). Backward reduces the two
per-channel sums locally, ONE all_reduce adds them, and each rank writes its dx from the
global sums. Outputs, dx and running statistics then equal those of one process on the
concatenated batch; weight/bias gradients stay per rank (their sum over ranks is the
one-process gradient; DistributedDataParallel averages them). Ranks may hold different
batch sizes, also none: a rank with an empty batch still takes part in both collectives.

A rank whose call fails (bad input, ...) still takes part in the collective it was due
in, marked as failed, so its peers raise instead of waiting for ever.

Outside an initialized process group, with one rank, or in eval mode it is the plain
batch norm of :class:`batchnorm.torch.BatchNorm2d`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import _core
from ..nn._layers import check_masked_count
from . import _kernels
from ._modules import _count_batch, _Forward

__all__ = ["SyncBatchNorm"]

_PEER_FAILED = "another rank failed in this synchronized batch-norm call"

# Ghost batches are chunks of one rank's batch, and ranks may hold different batch sizes, so
# chunk i would not exist on every rank: no per-chunk collective fits.
NO_GHOST_BATCHES = (
    "SyncBatchNorm does not support virtual_batch_size: ghost batches are chunks of one rank's batch, "
    "which may differ in size between ranks; use BatchNorm1d/2d/3d for ghost batches"
)


def _all_gather(group: Any, t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _gather_moments(group: Any, partials: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Global (count, mean, M2) from every rank's (3, C) float64 partials, merged in rank order.

    A rank that failed sends count -1; then every rank raises."""
    parts = _all_gather(group, partials)
    if any(bool((part[0] < 0).any()) for part in parts):
        raise RuntimeError(_PEER_FAILED)
    total = parts[0]
    for part in parts[1:]:  # in rank order, so that every rank rounds alike
        _core.merge_moments(total[0], total[1], total[2], part[0], part[1], part[2])
    return int(total[0, 0]) if total.shape[1] else 0, total[1], total[2]


def _failed(group: Any, channels: int) -> None:
    """Take part in the forward's all_gather as a rank that failed (its peers then raise)."""
    partials = torch.zeros(3, channels, dtype=torch.float64)
    partials[0] = -1.0
    _all_gather(group, partials)


def _sum_over_ranks(group: Any, *sums: torch.Tensor, failed: bool = False) -> list[torch.Tensor]:
    """Element-wise sums over ranks of per-channel float64 tensors, in one all_reduce.

    A rank that failed passes failed=True (and gets nothing back); then the others raise."""
    buf = torch.cat([*sums, torch.full((1,), float(failed), dtype=torch.float64)])
    dist.all_reduce(buf, group=group)
    if failed:
        return []
    if buf[-1] != 0:
        raise RuntimeError(_PEER_FAILED)
    return list(torch.split(buf[:-1], [s.numel() for s in sums]))


class _SyncFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: PLR0917 - autograd passes them positionally
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        factor: float,
        eps: float,
        group: Any,
        mask: Any,
    ) -> torch.Tensor:
        c = x.shape[1]
        partials = torch.zeros(3, c, dtype=torch.float64)
        try:
            m = _kernels.mask_for(x, mask)
            partials[0] = _core.partial_moments(x, _kernels.AXES, partials[1], partials[2], mask=m)
        except Exception:
            _failed(group, c)
            raise
        count, mean64, m2 = _gather_moments(group, partials)
        if m is not None and c:  # judged on the global masked count, the same on every rank
            check_masked_count(count, tuple(x.shape), f" over all {dist.get_world_size(group)} ranks")
        if count == 1:  # judged on the global batch, the same on every rank
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel "
                f"over all {dist.get_world_size(group)} ranks"
            )
        sdt = _kernels.stat_dtype(x)
        if count == 0:  # every rank empty: an empty output, running statistics untouched
            mean, inv_std = torch.zeros(c, dtype=sdt), torch.ones(c, dtype=sdt)
            y = _kernels.empty_output(x)
        else:
            var = (m2 / count).to(sdt)
            y, mean, inv = _kernels.infer_forward(x, weight, bias, mean64.to(sdt), var, eps)
            assert isinstance(inv, torch.Tensor)  # saved for backward: a tensor
            inv_std = inv
            if running_mean is not None and running_var is not None:
                _kernels.update_running(running_mean, running_var, mean, var, factor, count)
        ctx.count = count
        ctx.group = group
        ctx.mask = m
        ctx.save_for_backward(x, weight, mean, inv_std)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, inv_std = ctx.saved_tensors
        _kernels.follow_torch_threads()
        c = mean.numel()
        sum_dy = torch.zeros(c, dtype=torch.float64)
        sum_dy_xc = torch.zeros(c, dtype=torch.float64)
        gamma = _kernels.channels(weight, mean.dtype)
        try:
            if dy.dtype != x.dtype:
                dy = dy.to(x.dtype)
            if x.numel():
                _core.backward_sums(dy, x, _kernels.AXES, mean, inv_std, gamma, None, False, sum_dy, sum_dy_xc)
        except Exception:
            _sum_over_ranks(ctx.group, sum_dy, sum_dy_xc, failed=True)
            raise
        dweight, dbias = torch.empty(c, dtype=mean.dtype), torch.empty(c, dtype=mean.dtype)  # this rank's
        _core.parameter_gradients(inv_std, sum_dy, sum_dy_xc, dweight, dbias)
        total_dy, total_dy_xc = _sum_over_ranks(ctx.group, sum_dy, sum_dy_xc)
        dx = _kernels.empty_output(x)
        if x.numel():
            _core.backward_apply(
                dy, x, dx, _kernels.AXES, mean, inv_std, gamma, None, False, total_dy, total_dy_xc, ctx.count,
                mask=ctx.mask,
            )  # fmt: skip
        need = ctx.needs_input_grad
        return (dx if need[0] else None, *_kernels.param_grads(need, dweight, dbias, weight), *[None] * 6)


class SyncBatchNorm(_Forward, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm that runs on CPU tensors, on batchnorm's kernels.

    Same arguments, parameters, buffers and state_dict as torch's. Every rank of
    ``process_group`` (default: the whole world) must make the same sequence of training
    calls, forward then backward, as with any collective; batch sizes may differ, also 0.
    ``virtual_batch_size`` is refused (ValueError): see ``NO_GHOST_BATCHES``.
    """

    def __init__(self, *args: Any, virtual_batch_size: int | None = None, **kwargs: Any) -> None:
        if virtual_batch_size is not None:
            raise ValueError(NO_GHOST_BATCHES)
        super().__init__(*args, **kwargs)

    def _sync_group(self) -> Any | None:
        """The group a call synchronizes over, or None when it runs as a plain batch norm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """torch's forward; ``mask`` as BatchNorm1d's, its selected positions counted over
        all ranks (a rank whose mask selects nothing still takes part)."""
        if self.virtual_batch_size is not None:
            raise ValueError(NO_GHOST_BATCHES)
        group = self._sync_group()
        try:  # torch's checks, in torch's order and words
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            if group is not None:  # those of batch_norm, before the collective
                if input.device.type != "cpu":
                    raise ValueError(f"batchnorm.torch runs on CPU tensors; input is on {input.device}")
                for name, t in (("running_mean", self.running_mean), ("weight", self.weight)):
                    if t is not None and t.numel() != input.shape[1]:
                        raise RuntimeError(f"{name} should contain {input.shape[1]} elements not {t.numel()}")
        except Exception:
            if group is not None:
                _failed(group, self.num_features)
            raise
        if group is None:
            return super().forward(input, mask)
        counter = self.num_batches_tracked
        tracking = self.track_running_stats and counter is not None
        factor = self._factor(counter, tracking)
        _kernels.follow_torch_threads()
        y: torch.Tensor = _SyncFunction.apply(  # type: ignore[no-untyped-call]
            input,
            self.weight,
            self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            factor,
            self.eps,
            group,
            mask,
        )
        if tracking:
            assert counter is not None
            _count_batch(counter, input)
        return y


def _let_ddp_wrap_it() -> None:
    """DistributedDataParallel refuses every torch.nn.SyncBatchNorm in a CPU model, because
    torch's needs a GPU; this one does not, so its check skips ours (and still refuses torch's)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    check = getattr(ddp, "_passing_sync_batchnorm_handle", None)
    if check is None or getattr(check, "skips_batchnorm_torch", False):
        return

    def passing_sync_batchnorm_handle(self: Any, module: torch.nn.Module) -> None:
        for layer in module.modules():
            if isinstance(layer, torch.nn.SyncBatchNorm) and not isinstance(layer, SyncBatchNorm):
                check(self, layer)

    passing_sync_batchnorm_handle.skips_batchnorm_torch = True  # type: ignore[attr-defined]
    ddp._passing_sync_batchnorm_handle = passing_sync_batchnorm_handle  # type: ignore[method-assign]


_let_ddp_wrap_it()
