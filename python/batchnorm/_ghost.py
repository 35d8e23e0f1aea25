"""Ghost batches for the PyTorch-style layers: ``virtual_batch_size=k``.

A training call gives what ``torch.cat([bn(c) for c in x.split(k)])`` gives: each chunk of k
samples (the last may be smaller) normalized with its own statistics, the running
statistics and ``num_batches_tracked`` updated once per chunk, in order.

It takes two calls of the core, whatever the number of chunks. A batch (N, C, *S) with
N = G*k + r is viewed, without a copy, as (G, k, C, *S) with feature axes (0, 2): the
statistics over those axes are the G chunks' own, (G, C), from one reduce pass, and one
elementwise pass normalizes every chunk (the core runs such a view as rows of channels in
G groups, or as runs of each chunk's channels). The r samples left over, if any, are the
second call. The core reads per-channel arrays contiguous, so gamma and beta are tiled to
(G, C): G*C values, 1/k of the input. The running statistics take the chunks' statistics
through the per-chunk recurrence in closed form (float64, rounded once).

Everything here takes NumPy arrays and CPU torch tensors alike (both slice and reshape the
same way, and the core reads both).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _core

AXES = (1,)  # the channel axis of the layers' layouts
GHOST_AXES = (0, 2)  # chunk and channel axes of the (G, k, C, *S) view


def check_size(value: Any) -> int | None:
    """virtual_batch_size as the layers take it: None or a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"virtual_batch_size must be a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"virtual_batch_size must be a positive int or None, got {value}")
    return int(value)


def chunk_of(virtual_batch_size: int | None, training: bool, batch: int, mask: Any = None) -> int | None:
    """The chunk size of a call, or None for a plain pass: in eval ghost batches change
    nothing, and a batch of at most one chunk is that chunk's plain pass."""
    if virtual_batch_size is not None and mask is not None:
        raise ValueError("virtual_batch_size cannot be combined with a mask")
    if virtual_batch_size is None or not training or batch <= virtual_batch_size:
        return None
    return virtual_batch_size


class Chunks(NamedTuple):
    """N = full * size + rest samples: `full` chunks of `size`, then one of `rest` (if any)."""

    full: int
    size: int
    rest: int

    @property
    def number(self) -> int:
        return self.full + (self.rest > 0)

    def values(self, per_sample: int) -> list[int]:
        """Values per channel of each chunk (plain Python: torch.compile traces it)."""
        return [self.size * per_sample] * self.full + ([self.rest * per_sample] if self.rest else [])


def chunks(batch: int, size: int) -> Chunks:
    return Chunks(batch // size, size, batch % size)  # not divmod: torch.compile traces // and %


def smallest(x: Any, size: int) -> Any:
    """The last chunk of x, the smallest one (torch's checks of one chunk judge it)."""
    n = x.shape[0]
    return x[n - ((n - 1) % size + 1) :] if n else x


def _split(a: Any, ch: Chunks) -> Any:
    """The full chunks of a as (G, k, ...): a view (splitting an axis never copies)."""
    return a[: ch.full * ch.size].reshape(ch.full, ch.size, *a.shape[1:])


def _tile(p: Any, times: int) -> Any:
    """A per-channel array repeated for every chunk, contiguous (G*C values)."""
    if p is None:
        return None
    if isinstance(p, np.ndarray):
        return np.tile(p.reshape(-1), times)
    return p.detach().reshape(-1).repeat(times)


def forward(  # noqa: PLR0917 - the core's forward arguments
    x: Any, y: Any, gamma: Any, beta: Any, eps: float, ch: Chunks, mean: Any, var: Any, inv_std: Any
) -> None:
    """y and the (chunks, C) statistics of every chunk of a training pass (x holds values)."""
    g = ch.full
    if g:
        _core.forward(
            _split(x, ch), _split(y, ch), GHOST_AXES, _tile(gamma, g), _tile(beta, g), eps, False,
            mean[:g], var[:g], inv_std[:g],
        )  # fmt: skip
    if ch.rest:
        start = g * ch.size
        _core.forward(x[start:], y[start:], AXES, gamma, beta, eps, False, mean[g], var[g], inv_std[g])


def backward(  # noqa: PLR0917 - the core's backward arguments
    dy: Any, x: Any, dx: Any, mean: Any, inv_std: Any, gamma: Any, ch: Chunks, dgamma: Any, dbeta: Any
) -> None:
    """dx and the (chunks, C) weight and bias gradients of every chunk (x holds values)."""
    g = ch.full
    if g:
        _core.backward(
            _split(dy, ch), _split(x, ch), _split(dx, ch), GHOST_AXES, mean[:g], inv_std[:g], _tile(gamma, g),
            None, False, dgamma[:g], dbeta[:g],
        )  # fmt: skip
    if ch.rest:
        start = g * ch.size
        _core.backward(
            dy[start:], x[start:], dx[start:], AXES, mean[g], inv_std[g], gamma, None, False, dgamma[g], dbeta[g]
        )


def factors(momentum: float | None, tracked: int, n: int) -> list[float]:
    """The weight of each of n batches in the running statistics, as n calls give them
    (momentum, or 1/(batches so far + 1) for momentum=None, the cumulative average)."""
    if momentum is not None:
        return [float(momentum)] * n
    return [1.0 / float(tracked + 1 + i) for i in range(n)]


def unbiased(var: Any, values: list[int]) -> np.ndarray:
    """Per-chunk biased variances (chunks, C) made unbiased with each chunk's count, float64
    (NaN for a count of 1, as torch)."""
    bessel = np.array([n / (n - 1) if n > 1 else np.nan for n in values])
    out: np.ndarray = np.asarray(var, dtype=np.float64) * bessel.reshape(-1, 1)
    return out


def running_after(running: np.ndarray, batch: np.ndarray, weights: list[float]) -> np.ndarray:
    """running after n updates r = (1 - f_i) * r + f_i * batch[i], in closed form, float64:
    prod(1 - f) * r + sum_i f_i * prod_{j > i}(1 - f_j) * batch[i]."""
    f = np.asarray(weights, dtype=np.float64)
    keep = 1.0 - f
    later = np.append(np.cumprod(keep[::-1])[::-1][1:], 1.0)  # prod_{j > i} (1 - f_j)
    out: np.ndarray = np.prod(keep) * np.asarray(running, dtype=np.float64) + np.dot(f * later, batch)
    return out


def values_per_sample(x: Any) -> int:
    return math.prod(x.shape[2:])
