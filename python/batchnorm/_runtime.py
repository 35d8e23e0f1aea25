"""Threads, the instruction set in use, and build information."""

from __future__ import annotations

import numbers
from typing import Any

from . import _core


def get_num_threads() -> int:
    """Threads the kernels use for large inputs (small ones run on the calling thread).

    Starts from OpenMP's default (``OMP_NUM_THREADS``, else the core count); follows
    :func:`set_num_threads` and, until the next ``set_num_threads``, threadpoolctl's
    limits.
    """
    return int(_core.get_num_threads())


def set_num_threads(n: int) -> None:
    """Use ``n >= 1`` threads from now on, in every thread that calls the library."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads takes an int, got {type(n).__name__}")
    if n > 2**31 - 1:
        raise ValueError(f"set_num_threads takes n <= 2**31 - 1, got {n}")
    _core.set_num_threads(int(n))


def info() -> dict[str, Any]:
    """What this installation runs with.

    Keys: ``version``; ``simd`` (the instruction set chosen at run time: ``"avx512"``,
    ``"avx2"`` or ``"baseline"``); ``simd_supported`` (those this CPU can run, best
    first); ``simd_compiled``; ``max_isa`` (the ``BATCHNORM_MAX_ISA`` cap that choice
    obeyed, read once like the choice itself, or None);
    ``openmp``; ``threads``; ``compiler``.
    """
    return {
        "version": _core.__version__,
        "simd": _core.active_isa(),
        "simd_supported": list(_core.supported_isas()),
        "simd_compiled": list(_core.compiled_isas()),
        "max_isa": _core.max_isa() or None,
        "openmp": bool(_core.has_openmp()),
        "threads": get_num_threads(),
        "compiler": _core.compiler(),
    }
