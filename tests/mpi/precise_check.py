"""Run under mpiexec (any number of ranks): bn.precise_statistics on a SyncBatchNorm pools
the values of every process, so each rank ends with the statistics of all ranks' batches
concatenated (one all-reduce per layer when the block ends).

    OMP_NUM_THREADS=1 mpiexec -n 2 python tests/mpi/precise_check.py

Every rank builds the same global batches from a fixed seed and takes its own (uneven)
rows. Prints "precise ok on R ranks" on rank 0; any failure aborts all ranks.
"""

from __future__ import annotations

import numpy as np
from mpi_common import RANK, SIZE, comm, run

import batchnorm as bn


def main() -> None:
    rng = np.random.default_rng(7)
    batches = [rng.normal(3.0, 2.0, size=(n, 4, 5)) for n in (7, 10, 4)]
    layer = bn.SyncBatchNorm(4, dtype="float64", comm=comm)
    mine = []
    with bn.precise_statistics(layer):
        for x in batches:
            bounds = np.linspace(0, len(x), SIZE + 1).astype(int)
            rows = x[bounds[RANK] : bounds[RANK + 1]]
            mine.append(rows)
            layer(rows)
            np.testing.assert_array_equal(layer.running_mean, 0)  # untouched inside the block
    every = np.concatenate(batches)
    np.testing.assert_allclose(layer.running_mean, every.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_var, every.var(axis=(0, 2), ddof=1), rtol=1e-12)
    assert int(layer.num_batches_tracked) == len(batches)


if __name__ == "__main__":
    run(main, f"precise ok on {SIZE} ranks")
