"""What the mpiexec scripts of this folder share: the communicator, the uneven row split
of a global batch, the tolerance check, and a runner that aborts every rank on a failure
(so that no rank waits for ever in a collective)."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers the tests share

comm = MPI.COMM_WORLD
RANK, SIZE = comm.Get_rank(), comm.Get_size()
TOL = 1e-6


def splits(n: int) -> list[int]:
    """Uneven per-rank row counts summing to n; rank 1 gets none when there are 3+ ranks."""
    if SIZE == 1:
        return [n]
    weights = np.arange(1, SIZE + 1, dtype=float)
    if SIZE >= 3:
        weights[1] = 0
    sizes = np.floor(n * weights / weights.sum()).astype(int)
    sizes[0] += n - sizes.sum()
    return [int(s) for s in sizes]


def my_rows(n: int) -> slice:
    s = splits(n)
    start = sum(s[:RANK])
    return slice(start, start + s[RANK])


def close(a: Any, b: Any, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is None or b is None:
        return
    a64 = np.asarray(a, np.float64)
    b64 = np.asarray(b, np.float64)
    assert a64.shape == b64.shape, f"{what}: shapes {a64.shape} vs {b64.shape}"
    err = np.max(np.abs(a64 - b64) / (1 + np.abs(b64)), initial=0.0)
    assert err <= TOL, f"rank {RANK}: {what}: max error {err:.3g}"


def expect_error(call: Callable[[], Any], text: str, kind: type[Exception] = Exception) -> None:
    try:
        call()
    except kind as e:
        if text not in str(e):
            raise AssertionError(f"rank {RANK}: expected {text!r} in the error, got {e!r}") from e
    else:
        raise AssertionError(f"rank {RANK}: no error, expected {text!r}")


def summed(a: Any) -> np.ndarray:
    """a added over all ranks, in float64."""
    return comm.allreduce(np.asarray(a, np.float64), op=MPI.SUM)  # type: ignore[no-any-return]


def run(main: Callable[[], None], done: str) -> None:
    """main() on every rank, then `done` printed by rank 0; any exception aborts all ranks."""
    try:
        main()
        comm.Barrier()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        comm.Abort(1)
    if RANK == 0:
        print(done, flush=True)
