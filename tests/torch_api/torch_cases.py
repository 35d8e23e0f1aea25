"""Helpers shared by the batchnorm.torch tests: tolerances derived from dtypes, random cases."""

from __future__ import annotations

import torch

LOW = (torch.float16, torch.bfloat16)


def close(ours: torch.Tensor | None, exact: torch.Tensor | None, ulps: float = 4.0) -> None:
    """ours == exact (a float64 reference) to a few roundings of ours' dtype, relative to exact's largest value.

    The kernels accumulate in float32 (float64 for float64 data) and round once to the
    result's dtype, so they are off by a few units of that dtype's precision.
    """
    if exact is None:
        assert ours is None
        return
    assert ours is not None
    assert ours.shape == exact.shape
    eps = torch.finfo(ours.dtype).eps
    a, b = ours.double(), exact.double()
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= ulps * eps * scale, f"max |ours - exact| = {err:.3g} > {ulps} eps * {scale:.3g}"


def close_models(ours: torch.nn.Module, exact: torch.nn.Module) -> None:
    """ours' parameter gradients and buffers == exact's (a model run the other way, same dtype)."""
    for a, b in zip(exact.parameters(), ours.parameters(), strict=True):
        close(b.grad, a.grad, ulps=64)
    for (name, a), (_, b) in zip(exact.named_buffers(), ours.named_buffers(), strict=True):
        if a.is_floating_point():
            close(b, a, ulps=16)
        else:
            assert torch.equal(a, b), name


def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int, layout: str = "contiguous") -> torch.Tensor:
    """Random data (mean 1, scale 2) of shape in the given layout: contiguous, channels_last or a strided view."""
    g = torch.Generator().manual_seed(seed)
    if layout == "every-other":  # x[..., ::2]: a view with a stride of 2 in the last axis
        full = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g, dtype=torch.float64)
        return (1 + 2 * full).to(dtype)[..., ::2]
    if layout == "transposed":  # the two last axes swapped: a view, neither contiguous nor channels_last
        full = torch.randn((*shape[:-2], shape[-1], shape[-2]), generator=g, dtype=torch.float64)
        return (1 + 2 * full).to(dtype).transpose(-1, -2)
    x = (1 + 2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def channel_tensors(c: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """weight, bias, running_mean, running_var (positive) of c channels in dtype."""
    g = torch.Generator().manual_seed(seed)
    w, b, rm = (torch.randn(c, generator=g, dtype=torch.float64) for _ in range(3))
    rv = 0.5 + torch.rand(c, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (w, b, rm, rv))


class MaskedReference:
    """Masked batch norm by its definition, in float64 torch ops (autograd gives the
    gradients): statistics of the positions the mask selects, every position normalized
    with them; running statistics by torch's rule, the variance unbiased with the masked
    count. Called with float64 x (requires_grad for dx) and a mask of x's shape without
    the channel axis (or broadcastable to it)."""

    def __init__(self, c: int, momentum: float | None = 0.1, eps: float = 1e-5, weight=None, bias=None) -> None:
        self.momentum, self.eps = momentum, eps
        self.weight = None if weight is None else weight.detach().double().clone().requires_grad_()
        self.bias = None if bias is None else bias.detach().double().clone().requires_grad_()
        self.running_mean = torch.zeros(c, dtype=torch.float64)
        self.running_var = torch.ones(c, dtype=torch.float64)
        self.num_batches_tracked = 0

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = [1, x.shape[1]] + [1] * (x.dim() - 2)
        w = torch.broadcast_to(mask, (x.shape[0], *x.shape[2:])).unsqueeze(1).double()
        red = [d for d in range(x.dim()) if d != 1]
        count = w.sum()
        mean = (w * x).sum(red, keepdim=True) / count
        var = (w * (x - mean) ** 2).sum(red, keepdim=True) / count
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(keep) + self.bias.view(keep)
        f = self.momentum if self.momentum is not None else 1.0 / (self.num_batches_tracked + 1)
        with torch.no_grad():
            self.running_mean = (1 - f) * self.running_mean + f * mean.flatten()
            self.running_var = (1 - f) * self.running_var + f * var.flatten() * (count / (count - 1))
        self.num_batches_tracked += 1
        return y
