"""``batch_norm``: torch.nn.functional.batch_norm on the core, differentiable."""

from __future__ import annotations

from typing import Any

import torch

from .. import _ghost
from . import _kernels, _ops


def _verify(  # noqa: PLR0917 - torch.nn.functional.batch_norm's arguments
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    eps: float,
) -> None:
    """torch's checks, in torch's order and words (a failed call then changes nothing)."""
    if not x.is_cpu:
        raise ValueError(f"batchnorm.torch runs on CPU tensors; input is on {x.device}")
    if training and _kernels.values_per_channel(x) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None:
            if not t.is_cpu:
                raise ValueError(f"batchnorm.torch runs on CPU tensors; {name} is on {t.device}")
            if t.numel() != c:
                raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")


class _BatchNorm(torch.autograd.Function):
    """The eager path: one autograd node around the kernels (cheaper per call than an op)."""

    @staticmethod
    def forward(  # noqa: PLR0917 - autograd passes them positionally
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: Any,
        eps: float,
        chunk: int | None,
        mask: torch.Tensor | None,
        counter: torch.Tensor | None,
    ) -> torch.Tensor:
        if chunk is not None:  # ghost batches: momentum holds the factor of each chunk
            y, mean, inv_std = _kernels.ghost_train_forward(
                x, weight, bias, running_mean, running_var, momentum, eps, chunk, numpy=True
            )
        elif training:
            y, mean, inv_std = _kernels.train_forward(
                x, weight, bias, running_mean, running_var, momentum, eps, mask, counter
            )
        else:
            assert running_mean is not None
            assert running_var is not None
            y, mean, inv_std = _kernels.infer_forward(x, weight, bias, running_mean, running_var, eps, numpy=True)
        # mean and inv_std: NumPy (or the running mean), not tensors autograd must guard; the
        # mask converted (x's dtype, broadcast), no gradient flows to it. One attribute: each costs.
        ctx.state = mean, inv_std, not training, chunk, mask
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradient is not differentiable
            raise RuntimeError(_ops.SECOND_ORDER)
        x, weight = ctx.saved_tensors
        mean, inv_std, fixed, chunk, mask = ctx.state
        if chunk is not None:
            dx, dweight, dbias = _kernels.ghost_backward(dy, x, mean, inv_std, weight, chunk)
        else:
            dx, dweight, dbias = _kernels.backward(dy, x, mean, inv_std, weight, fixed, mask)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, *_kernels.param_grads(need, dweight, dbias, weight), *[None] * 8)


# autograd's C entry point, without Function.apply's Python wrapper, whose only extra work
# (unwrapping torch.func's tensors) does not apply: torch.func transforms are refused anyway,
# and the wrapper costs as much as a small batch's kernels.
_apply = super(torch.autograd.Function, _BatchNorm).apply


def _any_requires_grad(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    return x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)


def _tracing(x: torch.Tensor) -> bool:
    """Whether torch is tracing this call (torch.compile, export, make_fx): the ops' path."""
    return type(x) is not torch.Tensor or torch.compiler.is_compiling()


def batch_norm(  # noqa: PLR0917 - torch.nn.functional.batch_norm's positional signature
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch.nn.functional.batch_norm, on batchnorm's kernels (CPU tensors).

    Differentiable in input, weight and bias; in training the running statistics (if
    given) are updated in place, as torch does. Results equal torch's to rounding.

    ``mask``: a bool (or 0/1 integer) tensor of the input's shape without the channel axis
    (e.g. (N, L) for (N, C, L)), or broadcastable to it. In training the statistics come
    from the positions where it is true and every position is normalized with them; the
    running statistics take the masked mean and the variance unbiased with the masked
    count. With ``training=False`` it is not used (an eager call still checks it).
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, None, mask)


def ghost_batch_norm(  # noqa: PLR0917 - batch_norm's order
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    factors: list[float],
    eps: float,
    chunk: int,
) -> torch.Tensor:
    """A training batch_norm over ghost batches of `chunk` samples (more than one chunk):
    ``torch.cat([batch_norm(c, ..., training=True) for c in input.split(chunk)])``, chunk i
    moving the running statistics with weight factors[i]."""
    return _batch_norm(input, running_mean, running_var, weight, bias, True, factors, eps, chunk)


def _batch_norm(  # noqa: PLR0917 - batch_norm's order
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: Any,
    eps: float,
    chunk: int | None,
    mask: Any = None,
    counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """batch_norm; ghost batches of `chunk` samples (not None); ``counter``
    (num_batches_tracked, if given) advances by one after a pass that succeeded."""
    checked = input if chunk is None else _ghost.smallest(input, chunk)  # torch's checks judge one chunk
    tracing = _tracing(input)
    if mask is not None and not training:  # running statistics: the mask changes nothing
        if not tracing:  # but a bad one is refused all the same, as the NumPy layers do
            _kernels.mask_for(input, mask)
        mask = None
    if tracing:
        _verify(checked, running_mean, running_var, weight, bias, training, eps)
        if mask is not None and not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        y = _ops.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, chunk, mask)
        if counter is not None:
            counter.add_(1)
        return y
    # The eager path runs _verify only where torch may refuse the call for a reason the core
    # does not check (a cheap test first: it costs as much as a small batch's kernels); the
    # core checks devices and sizes before it writes anything, and _verify words its errors.
    # (one value per channel: numel == C, a cheap first test)
    may_refuse = (
        (eps <= 0.0 or checked.numel() == checked.shape[1]) if training else (eps < 0.0 or running_mean is None)
    )
    if may_refuse or (running_mean is None) != (running_var is None):
        _verify(checked, running_mean, running_var, weight, bias, training, eps)
    x = input
    try:
        m = _kernels.mask_for(x, mask)
        if torch.is_grad_enabled() and _any_requires_grad(x, weight, bias):  # one autograd node
            node: torch.Tensor = _apply(  # type: ignore[no-untyped-call]
                x, weight, bias, running_mean, running_var, training, momentum, eps, chunk, m, counter
            )
            return node
        if chunk is not None:
            return _kernels.ghost_train_forward(
                x, weight, bias, running_mean, running_var, momentum, eps, chunk, numpy=True
            )[0]
        if training:
            return _kernels.train_forward(x, weight, bias, running_mean, running_var, momentum, eps, m, counter)[0]
        assert running_mean is not None
        assert running_var is not None
        return _kernels.normalize(x, weight, bias, running_mean, running_var, eps)[0]
    except (TypeError, ValueError, RuntimeError):
        try:  # torch's words, if torch refuses the call too
            _verify(checked, running_mean, running_var, weight, bias, training, eps)
        except (ValueError, RuntimeError) as refused:
            raise refused from None
        raise
