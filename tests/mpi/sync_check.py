"""Run under mpiexec (any number of ranks): SyncBatchNorm on R processes against the
single-process layer on the concatenated batch.

    OMP_NUM_THREADS=1 mpiexec -n 3 python tests/mpi/sync_check.py

Every rank builds the same global batches from fixed seeds and takes its own rows (the
splits are uneven, and with 3 or more ranks one rank gets no rows at all). Checked to
1e-6: outputs, dx, running statistics and num_batches_tracked after several training
steps (momentum 0.1 and None), eval outputs, and the per-rank weight/bias gradients
summed over ranks. Also: the errors of one rank reach the others (no hang), a global
batch of one value per channel is a ValueError everywhere, and state is unchanged by a
failed call. Any failure aborts all ranks with a non-zero exit status. Prints one "ok"
line on rank 0 at the end.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI
from mpi_common import RANK, SIZE, close, comm, expect_error, my_rows, run, splits, summed

import batchnorm as bn
from batchnorm.distributed import _mpi


def check_training(shape: tuple[int, ...], dtype: str, momentum: float | None, affine: bool, layout: str) -> None:
    c = shape[1]
    rng = np.random.default_rng(1234)
    sync = bn.SyncBatchNorm(c, momentum=momentum, affine=affine, dtype=dtype)
    ref = bn.SyncBatchNorm(c, momentum=momentum, affine=affine, dtype=dtype, comm=MPI.COMM_SELF)  # = plain layer
    if affine:
        w = rng.normal(1.0, 0.3, c)
        b = rng.normal(0.0, 0.3, c)
        sync.weight, sync.bias, ref.weight, ref.bias = w, b, w, b
    for step in range(4):
        x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, c).reshape(1, c, *[1] * (len(shape) - 2)) + 5.0).astype(
            dtype
        )
        dy = rng.normal(size=shape).astype(dtype)
        if layout == "channels_last":  # NCHW shape, NHWC strides: a view of a channels_last tensor
            x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        rows = my_rows(shape[0])
        train = step != 2
        sync.train(train)
        ref.train(train)
        y = sync(x[rows])
        y_ref = ref(x)
        close(y, y_ref[rows], f"y, step {step}, {shape} {dtype} {layout}")
        dx = sync.backward(dy[rows])
        dx_ref = ref.backward(dy)
        close(dx, dx_ref[rows], f"dx, step {step}")
        if layout == "channels_last" and x[rows].size:
            assert y.strides == x[rows].strides, "the output keeps the channels-last layout"
        if affine:
            close(summed(sync.grads["weight"]), ref.grads["weight"], f"summed weight grad, step {step}")
            close(summed(sync.grads["bias"]), ref.grads["bias"], f"summed bias grad, step {step}")
        close(sync.running_mean, ref.running_mean, f"running_mean, step {step}")
        close(sync.running_var, ref.running_var, f"running_var, step {step}")
        assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked)  # type: ignore[arg-type]
    # All ranks hold the same running statistics, bit for bit.
    gathered = comm.allgather(sync.running_var)
    assert all(np.array_equal(g, gathered[0]) for g in gathered)


def check_against_torch() -> None:
    """The synchronized layer against torch.nn.BatchNorm2d on the whole batch."""
    try:
        import torch
    except ImportError:
        return
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, (9, 4, 5, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    t = torch.nn.BatchNorm2d(4)
    sync = bn.SyncBatchNorm(4)
    rows = my_rows(9)
    xt = torch.from_numpy(x).requires_grad_()
    yt = t(xt)
    yt.backward(torch.from_numpy(dy))
    close(sync(x[rows]), yt.detach().numpy()[rows], "y vs torch")
    close(sync.backward(dy[rows]), xt.grad.numpy()[rows], "dx vs torch")
    close(summed(sync.grads["weight"]), t.weight.grad.numpy(), "weight grad vs torch")
    close(sync.running_var, t.running_var.numpy(), "running_var vs torch")


def check_errors() -> None:
    c = 3
    layer = bn.SyncBatchNorm(c)
    x = np.random.default_rng(3).normal(size=(4, c, 2)).astype(np.float32)
    layer(x)
    before = layer.state_dict()
    # One rank passes a wrong channel count: it gets torch's error, the others PeerError.
    bad = x[:, :2] if RANK == SIZE - 1 else x
    expect_error(lambda: layer(bad), "running_mean should contain" if RANK == SIZE - 1 else "another process failed")
    # One value per channel over all ranks: a ValueError on every rank.
    one = x[:1, :, :1] if RANK == 0 else x[:0, :, :1]
    expect_error(lambda: layer(one), "Expected more than 1 value per channel", ValueError)
    for k, v in layer.state_dict().items():
        assert np.array_equal(v, before[k]), f"{k} changed by a failed call"
    # A bad dy on one rank in backward: its error there, PeerError elsewhere.
    layer(x)
    bad_dy = x[:1] if RANK == 0 else x
    expect_error(lambda: layer.backward(bad_dy), "dy has shape" if RANK == 0 else "another process failed")
    # Every rank empty: an empty output, statistics untouched, the counter advances.
    n = int(layer.num_batches_tracked)  # type: ignore[arg-type]
    mean = layer.running_mean.copy()  # type: ignore[union-attr]
    y = layer(x[:0])
    assert y.shape == x[:0].shape
    assert int(layer.num_batches_tracked) == n + 1  # type: ignore[arg-type]
    assert np.array_equal(layer.running_mean, mean)
    assert layer.backward(x[:0]).shape == x[:0].shape


def check_collectives() -> None:
    """allreduce_moments / allreduce_sum against NumPy on the gathered data."""
    rng = np.random.default_rng(11)
    data = [rng.normal(10.0, 2.0, (n, 6)) for n in splits(50)]
    mine = data[RANK]
    mean = mine.mean(axis=0) if len(mine) else np.zeros(6)
    m2 = ((mine - mean) ** 2).sum(axis=0)
    counts, gmean, gm2 = _mpi.allreduce_moments(comm, len(mine), mean, m2)
    full = np.concatenate(data)
    assert np.all(counts == 50)
    np.testing.assert_allclose(gmean, full.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(gm2, ((full - full.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-12)
    (total,) = _mpi.allreduce_sum(comm, np.full((2, 3), RANK + 1.0))
    assert np.all(total == SIZE * (SIZE + 1) / 2)
    assert (gmean == comm.bcast(gmean)).all(), "every rank has the same statistics"


def check_masked(shape: tuple[int, ...], dtype: str, layout: str) -> None:
    """m(x, mask=): the masked counts of all ranks are merged, so the sync layer on R ranks
    equals the plain masked layer on the whole batch, also when one rank's mask selects
    nothing (its rows, or rank 0's in the second step); a global mask that selects
    nothing raises on every rank and changes nothing."""
    c = shape[1]
    rng = np.random.default_rng(99)
    sync = bn.SyncBatchNorm(c, dtype=dtype)
    ref = bn.SyncBatchNorm(c, dtype=dtype, comm=MPI.COMM_SELF)  # = plain layer
    w, b = rng.normal(1.0, 0.3, c), rng.normal(0.0, 0.3, c)
    sync.weight, sync.bias, ref.weight, ref.bias = w, b, w, b
    rows = my_rows(shape[0])
    for step in range(3):
        x = (rng.normal(size=shape) * 2 + 3).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        if layout == "channels_last":
            x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        mask = rng.random((shape[0], *shape[2:])) < 0.6
        if step == 1:
            mask[my_rows_of(0, shape[0])] = False
        y = sync(x[rows], mask=mask[rows])
        close(y, ref(x, mask=mask)[rows], f"masked y, step {step}, {shape} {layout}")
        close(sync.backward(dy[rows]), ref.backward(dy)[rows], f"masked dx, step {step}")
        close(summed(sync.grads["weight"]), ref.grads["weight"], f"masked weight grad, step {step}")
        close(summed(sync.grads["bias"]), ref.grads["bias"], f"masked bias grad, step {step}")
        close(sync.running_mean, ref.running_mean, f"masked running_mean, step {step}")
        close(sync.running_var, ref.running_var, f"masked running_var, step {step}")
    before = sync.state_dict()
    nothing = np.zeros((shape[0], *shape[2:]), bool)
    expect_error(lambda: sync(x[rows], mask=nothing[rows]), f"got 0 selected by the mask over all {SIZE}", ValueError)
    for k, v in sync.state_dict().items():
        assert (v == before[k]).all(), k


def my_rows_of(rank: int, n: int) -> slice:
    s = splits(n)
    return slice(sum(s[:rank]), sum(s[: rank + 1]))


def main() -> None:
    check_collectives()
    check_masked((13, 3, 7), "float32", "contiguous")
    check_masked((13, 4, 3, 3), "float64", "channels_last")
    check_masked((11, 5), "float32", "contiguous")
    for shape, dtype, layout in [
        ((13, 4, 3, 3), "float32", "contiguous"),
        ((13, 4, 3, 3), "float32", "channels_last"),
        ((11, 5), "float64", "contiguous"),
        ((10, 3, 4), "float32", "contiguous"),
        ((7, 2, 2, 3, 2), "float64", "contiguous"),
    ]:
        for momentum in (0.1, None):
            check_training(shape, dtype, momentum, True, layout)
    check_training((12, 6, 2, 2), "float32", 0.1, False, "contiguous")
    check_against_torch()
    check_errors()


if __name__ == "__main__":
    run(main, f"sync_check: ok on {SIZE} ranks (row splits {splits(13)})")
