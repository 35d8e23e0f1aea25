"""The kernels as torch.library operators, for code that torch traces (torch.compile, export).

Each op has a fake kernel (shapes, dtypes and strides without running anything) and
the functional ones an autograd formula. torch accepts autograd formulas only on ops
that mutate nothing, so the running-statistics update is an op of its own, declared
as mutating its two buffers; the forward ops return what it needs.

Eager calls do not come here: an op call costs several microseconds more than a
plain autograd.Function (see docs/torch.md), so ``batch_norm`` takes this path only
while torch is tracing.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _kernels


def _infer_forward(  # noqa: PLR0917 - the op's schema
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, inv_std = _kernels.infer_forward(x, weight, bias, running_mean, running_var, eps)
    assert isinstance(inv_std, torch.Tensor)  # an op's output
    return y, inv_std  # not the mean: it may be running_mean itself, and an op's outputs may not alias


def _backward(  # noqa: PLR0917 - the op's schema
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    weight: torch.Tensor | None,
    fixed_statistics: bool,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sdt = _kernels.stat_dtype(x)
    mean = _kernels.channels(mean, sdt)  # type: ignore[assignment]  # running_mean in eval
    return _kernels.backward(dy, x, mean, inv_std, weight, fixed_statistics, _kernels.mask_for(x, mask))


def _ghost_forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, inv_std, var = _kernels.ghost_forward(x, weight, bias, eps, chunk)
    assert isinstance(mean, torch.Tensor)  # an op's outputs: tensors, not NumPy arrays
    assert isinstance(inv_std, torch.Tensor)
    assert isinstance(var, torch.Tensor)
    return y, mean, inv_std, var


def _stats(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """A per-channel statistic, or with `chunk` one per ghost batch and channel."""
    if chunk is None:
        return x.new_empty(x.shape[1], dtype=_kernels.stat_dtype(x))
    chunks = (x.shape[0] + chunk - 1) // chunk
    return x.new_empty((chunks, x.shape[1]), dtype=_kernels.stat_dtype(x))


def _train_forward_fake(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.empty_output(x), _stats(x), _stats(x), _stats(x)


def _infer_forward_fake(  # noqa: PLR0917 - the op's schema
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels.empty_output(x), _stats(x)


def _backward_fake(  # noqa: PLR0917 - the op's schema
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    weight: torch.Tensor | None,
    fixed_statistics: bool,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.empty_output(x), _stats(x), _stats(x)


def _ghost_forward_fake(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.empty_output(x), _stats(x, chunk), _stats(x, chunk), _stats(x, chunk)


def _ghost_backward_fake(  # noqa: PLR0917 - the op's schema
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    weight: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.empty_output(x), _stats(x), _stats(x)


def _update_running_chunks_fake(  # noqa: PLR0917 - the op's schema
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    factors: list[float],
    counts: list[int],
) -> None:
    return None


def _update_running_fake(  # noqa: PLR0917 - the op's schema
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    factor: float,
    count: int,
) -> None:
    return None


SCHEMAS = {
    "train_forward": "(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? mask=None)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    "infer_forward": "(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps)"
    " -> (Tensor, Tensor)",
    "backward": "(Tensor dy, Tensor x, Tensor mean, Tensor inv_std, Tensor? weight, bool fixed_statistics,"
    " Tensor? mask=None) -> (Tensor, Tensor, Tensor)",
    "update_running": "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
    " float factor, int count) -> ()",
    "ghost_forward": "(Tensor x, Tensor? weight, Tensor? bias, float eps, int chunk)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    "ghost_backward": "(Tensor dy, Tensor x, Tensor mean, Tensor inv_std, Tensor? weight, int chunk)"
    " -> (Tensor, Tensor, Tensor)",
    "update_running_chunks": "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
    " float[] factors, int[] counts) -> ()",
}
_LIB = torch.library.Library("batchnorm", "DEF")  # type: ignore[no-untyped-call]  # define/impl: cheaper than custom_op
for _name, _kernel, _fake in (
    ("train_forward", _kernels.batch_forward, _train_forward_fake),
    ("infer_forward", _infer_forward, _infer_forward_fake),
    ("backward", _backward, _backward_fake),
    ("update_running", _kernels.update_running, _update_running_fake),
    ("ghost_forward", _ghost_forward, _ghost_forward_fake),
    ("ghost_backward", _kernels.ghost_backward, _ghost_backward_fake),
    ("update_running_chunks", _kernels.update_running_chunks, _update_running_chunks_fake),
):
    _LIB.define(_name + SCHEMAS[_name])  # type: ignore[no-untyped-call]
    _LIB.impl(_name, _kernel, "CPU")  # type: ignore[no-untyped-call]
    torch.library.register_fake(f"batchnorm::{_name}", _fake, lib=_LIB)


def _train_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, _, _, mask = inputs
    _, mean, inv_std, var = output
    ctx.mark_non_differentiable(mean, inv_std, var)
    ctx.save_for_backward(x, weight, mean, inv_std, mask)


def _train_backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    x, weight, mean, inv_std, mask = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.batchnorm.backward(dy, x, mean, inv_std, weight, False, mask)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, *_kernels.param_grads(need, dweight, dbias, weight), None, None)


def _ghost_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, _, _, chunk = inputs
    _, mean, inv_std, var = output
    ctx.mark_non_differentiable(mean, inv_std, var)
    ctx.chunk = chunk
    ctx.save_for_backward(x, weight, mean, inv_std)


def _ghost_train_backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    x, weight, mean, inv_std = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.batchnorm.ghost_backward(dy, x, mean, inv_std, weight, ctx.chunk)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, *_kernels.param_grads(need, dweight, dbias, weight), None, None)


def _infer_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, _, running_mean, _, _ = inputs
    _, inv_std = output
    ctx.mark_non_differentiable(inv_std)
    ctx.save_for_backward(x, weight, running_mean, inv_std)


def _infer_backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    x, weight, running_mean, inv_std = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.batchnorm.backward(dy, x, running_mean, inv_std, weight, True, None)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, *_kernels.param_grads(need, dweight, dbias, weight), None, None, None)


SECOND_ORDER = "batchnorm.torch has no second-order gradients: its backward pass is not differentiable"


def _second_order(ctx: Any, *_: Any) -> tuple[None, ...]:
    raise RuntimeError(SECOND_ORDER)


def _no_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    return None


for _name in ("backward", "ghost_backward"):
    torch.library.register_autograd(f"batchnorm::{_name}", _second_order, setup_context=_no_context, lib=_LIB)
torch.library.register_autograd("batchnorm::ghost_forward", _ghost_train_backward, setup_context=_ghost_setup, lib=_LIB)
torch.library.register_autograd("batchnorm::train_forward", _train_backward, setup_context=_train_setup, lib=_LIB)
torch.library.register_autograd("batchnorm::infer_forward", _infer_backward, setup_context=_infer_setup, lib=_LIB)


def batch_norm(  # noqa: PLR0917 - torch.nn.functional.batch_norm's positional signature
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: Any,
    eps: float,
    chunk: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch.nn.functional.batch_norm through the ops (arguments already checked); with
    `chunk`, over ghost batches, momentum then holding the factor of each chunk; with `mask`
    (a tensor, training only), statistics of the positions it selects."""
    y: torch.Tensor
    if chunk is not None:
        y, mean, _, var = torch.ops.batchnorm.ghost_forward(x, weight, bias, eps, chunk)
        if x.numel() and running_mean is not None and running_var is not None:
            counts = _kernels.chunk_counts(x, chunk)
            torch.ops.batchnorm.update_running_chunks(running_mean, running_var, mean, var, momentum, counts)
        return y
    if training:
        y, mean, _, var = torch.ops.batchnorm.train_forward(x, weight, bias, eps, mask)
        if mask is not None:
            if x.numel() and running_mean is not None and running_var is not None:
                # the masked count is data, not a number traced code can read
                selected = torch.broadcast_to(mask, _kernels.reduced_shape(x)).ne(0).sum()
                _kernels.update_running_counted(running_mean, running_var, mean, var, momentum, selected)
            return y
        count = _kernels.values_per_channel(x)
        if count and running_mean is not None and running_var is not None:
            torch.ops.batchnorm.update_running(running_mean, running_var, mean, var, momentum, count)
        return y
    assert running_mean is not None
    assert running_var is not None
    y, _ = torch.ops.batchnorm.infer_forward(x, weight, bias, running_mean, running_var, eps)
    return y
