"""The core's passes on CPU torch tensors: read and written in place, whatever the strides.

The bindings take tensors directly (their data pointer, shape and strides) once
``_core.use_torch`` has been told torch's types, so no tensor goes through NumPy
(which has no bfloat16). Per-channel tensors are passed contiguous, in the core's
statistics type (float64 for float64 input, else float32) or, for 16-bit input, as
float16/bfloat16 tensors, which the bindings convert (and round back into, for outputs)
far more cheaply than torch's ``.to()``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .. import _core, _ghost
from ..nn._layers import check_masked_count

_core.use_torch(torch.Tensor, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.strided, torch.int64)

# Per-channel statistics: tensors where torch sees them (the ops' outputs), NumPy arrays
# on the eager path, where the core allocates them: torch.empty costs about a microsecond,
# as much as the kernels of a small batch.
Stat = torch.Tensor | np.ndarray

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}

AXES = (1,)  # the channel axis of every layout torch's batch norm takes (NC, NCL, NCHW, NCDHW)


def follow_torch_threads() -> None:
    """Run with torch's thread count (torch.set_num_threads), which both share one OpenMP pool."""
    n = torch.get_num_threads()
    if _core.get_num_threads() != n:
        _core.set_num_threads(n)


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_HALF = (torch.float16, torch.bfloat16)


def takes(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the core reads (or writes) per-channel tensor t as it is, for statistics dtype dtype."""
    return (t.dtype == dtype or (dtype == torch.float32 and t.dtype in _HALF)) and t.is_contiguous()


def channels(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A per-channel tensor as the core reads it (the same tensor when it already is one)."""
    if t is None or takes(t, dtype):
        return t
    return t.detach().to(dtype).contiguous()


_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def empty_output(x: torch.Tensor) -> torch.Tensor:
    """An output shaped and laid out as torch's batch norm lays out its own."""
    if not x.is_contiguous():  # (the common case skips the layout lookup)
        last = _LAST.get(x.dim())
        if last is not None and x.is_contiguous(memory_format=last):
            return torch.empty_like(x, memory_format=last)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def values_per_channel(x: torch.Tensor) -> int:
    n = x.numel()
    return n // x.shape[1] if n else x.shape[0] * math.prod(x.shape[2:])  # C == 0: still N * spatial


_MASK_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def reduced_shape(x: torch.Tensor) -> tuple[int, ...]:
    """x's shape without the channel axis: the shape of a mask."""
    return (x.shape[0], *x.shape[2:])


def mask_for(x: torch.Tensor, mask: Any) -> torch.Tensor | None:
    """A mask (bool, or 0/1 integers) as the core reads it: x's dtype (a copy of the mask's
    own size, never of x's), broadcast without a copy to x's shape without the channel axis."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        if mask.dtype not in _MASK_INTS:
            raise TypeError(f"mask must be a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0 and 1 (or be boolean)")
    if not mask.is_cpu:
        raise ValueError(f"batchnorm.torch runs on CPU tensors; mask is on {mask.device}")
    reduced = reduced_shape(x)
    try:
        m: torch.Tensor = mask.detach().to(x.dtype).expand(reduced)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to {reduced}, "
            "the shape of the input without its channel axis"
        ) from None
    return m


def batch_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y normalized with the batch's statistics; the batch mean, inv_std and (biased)
    variance. With a mask (as ``mask_for`` takes it) the statistics are those of the
    positions it selects."""
    m = mask_for(x, mask)
    follow_torch_threads()
    sdt = stat_dtype(x)
    c = x.shape[1]
    y = empty_output(x)
    if x.numel() == 0:  # torch: an empty output, statistics (0, 1)
        return y, torch.zeros(c, dtype=sdt), torch.ones(c, dtype=sdt), torch.zeros(c, dtype=sdt)
    if m is not None:  # torch's rule for the selected positions, before anything is computed
        check_masked_count(int(torch.count_nonzero(m)), tuple(x.shape))
    mean, inv_std, var = torch.empty(c, dtype=sdt), torch.empty(c, dtype=sdt), torch.empty(c, dtype=sdt)
    _core.forward(x, y, AXES, channels(weight, sdt), channels(bias, sdt), eps, False, mean, var, inv_std, m)
    return y, mean, inv_std, var


def train_forward(  # noqa: PLR0917 - the order of torch's batch_norm arguments
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    mask: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stat, Stat]:
    """The eager training call: y, and the batch mean and inv_std as NumPy arrays (the core
    allocates them). After a pass that succeeded, the running statistics (if given) move
    toward the batch's (with a mask converted by ``mask_for``: the masked statistics,
    unbiased by the masked count) and ``counter`` (num_batches_tracked, if given) advances."""
    follow_torch_threads()
    sdt = stat_dtype(x)
    y = empty_output(x)
    if x.numel() == 0:  # torch: an empty output, statistics (0, 1), the running ones untouched
        if counter is not None:
            _core.count_batch(counter)
        c = x.shape[1]
        return y, torch.zeros(c, dtype=sdt), torch.ones(c, dtype=sdt)
    if mask is not None:  # torch's rule for the selected positions, before anything is computed
        check_masked_count(int(torch.count_nonzero(mask)), tuple(x.shape))
    w, b = channels(weight, sdt), channels(bias, sdt)
    if running_mean is None or running_var is None or (takes(running_mean, sdt) and takes(running_var, sdt)):
        mean, _, inv_std, _ = _core.train_forward(x, y, w, b, eps, mask, running_mean, running_var, momentum, counter)
        return y, mean, inv_std
    # buffers of another dtype, or strided: update_running's copy
    mean, var, inv_std, count = _core.train_forward(x, y, w, b, eps, mask, None, None, 0.0, None)
    if count:
        update_running(running_mean, running_var, mean, var, momentum, count)
    if counter is not None:
        _core.count_batch(counter)
    return y, mean, inv_std


def update_running_counted(  # noqa: PLR0917 - update_running's order
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    factor: float,
    count: torch.Tensor,
) -> None:
    """update_running with the count a tensor (a masked count, which traced code cannot
    read as a number): torch ops, in float64, rounded once into the buffers."""
    with torch.no_grad():
        n = count.double()
        unbiased = var.double() * (n / (n - 1))
        running_mean.copy_(running_mean.double() * (1 - factor) + mean.double() * factor)
        running_var.copy_(running_var.double() * (1 - factor) + unbiased * factor)


def update_running(  # noqa: PLR0917 - the order of torch's batch_norm arguments
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: Stat,
    var: Stat,
    factor: float,
    count: int,
) -> None:
    """running = (1 - factor) * running + factor * batch (variance unbiased), in place."""
    sdt = torch.float64 if mean.itemsize == 8 else torch.float32  # a tensor or a NumPy array
    if takes(running_mean, sdt) and takes(running_var, sdt):  # 16-bit ones: updated in float, rounded once
        _core.update_running(running_mean, running_var, mean, var, float(factor), count)
        return
    # buffers of another dtype or strided: the same rule through a float32/64 copy, written back once
    rm, rv = running_mean.detach().to(sdt).contiguous(), running_var.detach().to(sdt).contiguous()
    _core.update_running(rm, rv, mean, var, float(factor), count)
    with torch.no_grad():
        running_mean.copy_(rm)
        running_var.copy_(rv)


def ghost_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    chunk: int,
    *,
    numpy: bool = False,
) -> tuple[torch.Tensor, Stat, Stat, Stat]:
    """batch_forward over ghost batches of `chunk` samples: mean, inv_std and variance per
    chunk, (chunks, C)."""
    follow_torch_threads()
    sdt = stat_dtype(x)
    ch = _ghost.chunks(x.shape[0], chunk)
    shape = (ch.number, x.shape[1])
    y = empty_output(x)
    if x.numel() == 0:  # torch: an empty output, statistics (0, 1)
        return y, torch.zeros(shape, dtype=sdt), torch.ones(shape, dtype=sdt), torch.zeros(shape, dtype=sdt)
    mean: Stat
    inv_std: Stat
    var: Stat
    if numpy:
        mean, inv_std, var = (np.empty(shape, _NUMPY[sdt]) for _ in range(3))
    else:
        mean, inv_std, var = (torch.empty(shape, dtype=sdt) for _ in range(3))
    _ghost.forward(x, y, channels(weight, sdt), channels(bias, sdt), eps, ch, mean, var, inv_std)
    return y, mean, inv_std, var


def ghost_train_forward(  # noqa: PLR0917 - the order of torch's batch_norm arguments
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    factors: list[float],
    eps: float,
    chunk: int,
    *,
    numpy: bool = False,
) -> tuple[torch.Tensor, Stat, Stat]:
    """train_forward over ghost batches: the running statistics move once per chunk, in order,
    chunk i with weight factors[i]."""
    y, mean, inv_std, var = ghost_forward(x, weight, bias, eps, chunk, numpy=numpy)
    if x.numel() and running_mean is not None and running_var is not None:  # torch skips empty batches
        update_running_chunks(running_mean, running_var, mean, var, factors, chunk_counts(x, chunk))
    return y, mean, inv_std


def chunk_counts(x: torch.Tensor, chunk: int) -> list[int]:
    """Values per channel of each ghost batch of x."""
    return _ghost.chunks(x.shape[0], chunk).values(_ghost.values_per_sample(x))


def update_running_chunks(  # noqa: PLR0917 - update_running's order
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: Stat,
    var: Stat,
    factors: list[float],
    counts: list[int],
) -> None:
    """update_running once per row of mean and var (chunk i: factors[i], counts[i] values),
    in closed form: float64, rounded once."""
    unbiased = _ghost.unbiased(var, counts)
    new_mean = _ghost.running_after(running_mean.detach().double().numpy(), np.asarray(mean), factors)
    new_var = _ghost.running_after(running_var.detach().double().numpy(), unbiased, factors)
    with torch.no_grad():
        running_mean.copy_(torch.from_numpy(new_mean))
        running_var.copy_(torch.from_numpy(new_var))


def infer_forward(  # noqa: PLR0917 - the order of torch's batch_norm arguments
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    *,
    numpy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Stat]:
    """y normalized with the running statistics; also the mean and inv_std it used."""
    sdt = stat_dtype(x)
    inv_std = np.empty(x.shape[1], _NUMPY[sdt]) if numpy else torch.empty(x.shape[1], dtype=sdt)
    y, mean = normalize(x, weight, bias, running_mean, running_var, eps, inv_std)
    return y, mean, inv_std


def normalize(  # noqa: PLR0917 - the order of torch's batch_norm arguments
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    inv_std: Stat | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y normalized with the running statistics, and the running mean as the core read it;
    inv_std (if given) receives the per-channel factor, which only a gradient needs."""
    follow_torch_threads()
    sdt = stat_dtype(x)
    mean, var = channels(running_mean, sdt), channels(running_var, sdt)
    assert mean is not None
    assert var is not None
    y = empty_output(x)
    _core.normalize(x, y, AXES, mean, var, channels(weight, sdt), channels(bias, sdt), eps, False, inv_std)
    return y, mean


def backward(  # noqa: PLR0917 - the order of torch's batch_norm arguments
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: Stat,
    inv_std: Stat,
    weight: torch.Tensor | None,
    fixed_statistics: bool,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight, dbias (statistics dtype) of a pass that used mean and inv_std (with a
    mask converted by ``mask_for``: the pass's masked statistics)."""
    follow_torch_threads()
    dx = empty_output(x)
    sdt = stat_dtype(x)
    if x.numel() == 0:
        return dx, torch.zeros(x.shape[1], dtype=sdt), torch.zeros(x.shape[1], dtype=sdt)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    gamma = channels(weight, sdt)
    half = weight is not None and weight.dtype in _HALF and sdt == torch.float32  # rounded to it by the core
    if isinstance(inv_std, np.ndarray) and not half:  # the eager path: NumPy arrays the core allocates
        dweight, dbias = _core.backward(
            dy, x, dx, AXES, mean, inv_std, gamma, None, False, None, None, fixed_statistics, mask
        )
        return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)
    dtype = weight.dtype if half else sdt  # type: ignore[union-attr]
    grads = torch.empty(x.shape[1], dtype=dtype), torch.empty(x.shape[1], dtype=dtype)
    _core.backward(dy, x, dx, AXES, mean, inv_std, gamma, None, False, *grads, fixed_statistics, mask)
    return dx, *grads


def ghost_backward(  # noqa: PLR0917 - backward's order
    dy: torch.Tensor, x: torch.Tensor, mean: Stat, inv_std: Stat, weight: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """backward of a ghost_forward pass: dx, and dweight, dbias summed over the chunks."""
    follow_torch_threads()
    sdt = stat_dtype(x)
    ch = _ghost.chunks(x.shape[0], chunk)
    dx = empty_output(x)
    dweights, dbiases = np.zeros((ch.number, x.shape[1]), _NUMPY[sdt]), np.zeros((ch.number, x.shape[1]), _NUMPY[sdt])
    if x.numel():
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        _ghost.backward(dy, x, dx, mean, inv_std, channels(weight, sdt), ch, dweights, dbiases)
    dweight, dbias = (torch.from_numpy(g.sum(0, dtype=np.float64).astype(_NUMPY[sdt])) for g in (dweights, dbiases))
    return dx, dweight, dbias


def param_grads(
    need: tuple[bool, ...], dweight: torch.Tensor, dbias: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weight and bias gradients autograd asked for (need[1], need[2]), in the
    parameters' dtype (the statistics dtype's where there is no weight)."""
    to = dweight.dtype if weight is None else weight.dtype
    return (
        (dweight if dweight.dtype == to else dweight.to(to)) if need[1] else None,
        (dbias if dbias.dtype == to else dbias.to(to)) if need[2] else None,
    )
