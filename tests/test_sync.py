"""SyncBatchNorm over MPI: runs tests/mpi/sync_check.py under mpiexec with 2 and 3 ranks
(uneven batches, one rank empty with 3) and checks it against the single-process layer
on the concatenated batch. Skipped without mpi4py or an mpiexec."""

from __future__ import annotations

import pytest

from mpi_launch import run_mpi

pytest.importorskip("mpi4py")


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batchnorm_equals_single_process(ranks):
    assert f"ok on {ranks} ranks" in run_mpi("sync_check.py", ranks)


def test_single_process_communicator():
    """With COMM_SELF (or COMM_WORLD of one process) the layer is the plain one, and the
    collectives work as identities."""
    import numpy as np
    from mpi4py import MPI

    import batchnorm as bn
    from batchnorm.distributed import _mpi

    assert _mpi.active_comm(MPI.COMM_SELF) is None
    counts, mean, m2 = _mpi.allreduce_moments(MPI.COMM_SELF, 4, np.arange(3.0), np.ones(3))
    np.testing.assert_array_equal(m2, 1)
    np.testing.assert_array_equal(counts, 4)
    np.testing.assert_array_equal(mean, np.arange(3.0))
    (s,) = _mpi.allreduce_sum(MPI.COMM_SELF, np.ones((2, 2)))
    np.testing.assert_array_equal(s, 1)
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    sync = bn.SyncBatchNorm(3, comm=MPI.COMM_SELF)
    plain = bn.BatchNorm1d(3)
    np.testing.assert_array_equal(sync(x), plain(x))
    np.testing.assert_array_equal(sync.backward(x), plain.backward(x))
    np.testing.assert_array_equal(sync.running_var, plain.running_var)
