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
