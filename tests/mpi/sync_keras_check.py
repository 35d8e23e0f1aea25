"""Run under mpiexec (any number of ranks): the Keras-style SyncBatchNormalization on R
processes against the single-process BatchNormalization(fused=False) on the
concatenated batch.

    OMP_NUM_THREADS=1 mpiexec -n 3 python tests/mpi/sync_keras_check.py

Every rank builds the same global batches from fixed seeds and takes its own rows (the
splits are uneven, and with 3 or more ranks one rank gets no rows at all). Checked to
1e-6 after several steps (one of them an inference call): outputs, dx, every weight
(moving statistics, renorm's), and the per-rank gamma/beta gradients summed over ranks;
for axis ints and lists, center/scale off, renorm, adjustment, mask and float64. Also:
one rank's error reaches the others as PeerError (no hang) and changes nothing, an empty
global batch is a ValueError everywhere, and precise_statistics pools over ranks. Any
failure aborts all ranks with a non-zero exit status. Prints one "ok" line on rank 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi_common import RANK, SIZE, close, comm, expect_error, my_rows, run, splits, summed

import batchnorm as bn
from batchnorm.distributed import _mpi
from layer_state import same_weights


def adjust(shape: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.array([1.5, 0.5, 2.0, 1.0]), np.array([0.1, -0.2, 0.0, 0.3])


def check_training(shape: tuple[int, ...], dtype: str, use_mask: bool = False, **kwargs: Any) -> None:
    what = f"{shape} {dtype} mask={use_mask} {kwargs}"
    rng = np.random.default_rng(1234)
    sync = bn.SyncBatchNormalization(momentum=0.8, dtype=dtype, **kwargs)
    ref = bn.BatchNormalization(momentum=0.8, dtype=dtype, fused=False, **kwargs)
    assert sync.comm is None  # COMM_WORLD, looked up at the training call
    rows = my_rows(shape[0])
    for step in range(5):
        scale = rng.uniform(0.5, 3.0, shape[1:])
        x = (rng.normal(size=shape) * scale + 5.0).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        mask = (rng.uniform(size=shape[:-1]) > 0.3) if use_mask else None
        if step == 0:
            same_weights(rng, shape, ref, sync)
        train = step != 2
        y = sync(x[rows], training=train, mask=None if mask is None else mask[rows])
        y_ref = ref(x, training=train, mask=mask)
        close(y, y_ref[rows], f"y, step {step}, {what}")
        dx = sync.backward(dy[rows])
        dx_ref = ref.backward(dy)
        close(dx, dx_ref[rows], f"dx, step {step}, {what}")
        assert sorted(sync.grads) == sorted(ref.grads), what
        for k in ref.grads:
            close(summed(sync.grads[k]), ref.grads[k], f"summed {k} grad, step {step}, {what}")
        for name, a, b in zip(ref.weight_names, sync.get_weights(), ref.get_weights(), strict=True):
            close(a, b, f"{name}, step {step}, {what}")
    # Every rank holds the same moving statistics, bit for bit.
    gathered = comm.allgather(sync.get_weights())
    assert all(all(np.array_equal(a, b) for a, b in zip(g, gathered[0], strict=True)) for g in gathered)


def check_errors() -> None:
    x = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
    # Not built yet, and one rank's input cannot be cast: its own error, PeerError elsewhere.
    layer = bn.SyncBatchNormalization()
    bad: Any = np.array([["a", "b", "c"]] * 4) if RANK == SIZE - 1 else x
    expect_error(lambda: layer(bad, training=True), "real numeric" if RANK == SIZE - 1 else "another process failed")
    layer(x, training=True)
    layer.backward(x)
    before = layer.get_weights()
    # A wrong feature size on one rank.
    bad = np.zeros((4, 2), np.float32) if RANK == SIZE - 1 else x
    expect_error(lambda: layer(bad, training=True), "incompatible" if RANK == SIZE - 1 else "another process failed")
    # A mask of the wrong shape on rank 0.
    m = np.ones(3 if RANK == 0 else 4, bool)
    expect_error(lambda: layer(x, training=True, mask=m), "mask of shape" if RANK == 0 else "another process failed")
    # An empty global batch: a ValueError on every rank.
    expect_error(lambda: layer(x[:0], training=True), "empty batch", ValueError)
    for a, b in zip(layer.get_weights(), before, strict=True):
        assert np.array_equal(a, b), "a failed call changed the weights"
    # A bad dy on rank 0 in backward: its error there, PeerError elsewhere.
    layer(x, training=True)
    bad_dy = x[:1] if RANK == 0 else x
    expect_error(lambda: layer.backward(bad_dy), "dy has shape" if RANK == 0 else "another process failed")
    # Inference communicates nothing: one rank alone may call it.
    if RANK == 0:
        layer(x, training=False)
        layer.backward(x)
    comm.Barrier()


def check_precise() -> None:
    rng = np.random.default_rng(7)
    batches = [rng.normal(3.0, 2.0, size=(n, 4, 5)) for n in (7, 10, 4)]
    layer = bn.SyncBatchNormalization(axis=1, dtype="float64")
    with bn.precise_statistics(layer):
        for x in batches:
            layer(x[my_rows(len(x))], training=True)
            assert np.array_equal(layer.moving_mean, np.zeros(4))  # untouched inside the block
    every = np.concatenate(batches)
    np.testing.assert_allclose(layer.moving_mean, every.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, every.var(axis=(0, 2)), rtol=1e-12)


def main() -> None:
    check_training((13, 5), "float32")
    check_training((13, 4, 3, 3), "float32", axis=1)
    check_training((13, 3, 3, 4), "float64", axis=-1)
    check_training((11, 4, 3, 5), "float32", axis=[1, 3])
    check_training((12, 6), "float32", center=False, scale=False)
    check_training((12, 6), "float32", center=False)
    check_training((12, 2, 6), "float64", renorm=True, renorm_clipping={"rmax": 1.2, "rmin": 0.9, "dmax": 0.1})
    check_training((10, 3, 4), "float64", adjustment=adjust)
    check_training((10, 3, 4), "float32", renorm=True, adjustment=adjust)
    check_training((14, 5, 4), "float64", use_mask=True)
    check_training((14, 5, 4), "float32", use_mask=True, renorm=True)
    check_errors()
    check_precise()
    # One all-reduce in forward, one in backward (none on one process).
    calls = []
    real = _mpi._allreduce_triples, _mpi._allreduce_flagged

    def count_triples(*a: Any) -> Any:
        calls.append("forward")
        return real[0](*a)

    def count_sums(*a: Any) -> Any:
        calls.append("backward")
        return real[1](*a)

    _mpi._allreduce_triples, _mpi._allreduce_flagged = count_triples, count_sums  # type: ignore[assignment]
    try:
        layer = bn.SyncBatchNormalization(renorm=True)
        x = np.ones((3, 2), np.float32)
        layer(x, training=True, mask=np.ones(3))
        layer.backward(x)
    finally:
        _mpi._allreduce_triples, _mpi._allreduce_flagged = real
    assert calls == (["forward", "backward"] if SIZE > 1 else []), calls


if __name__ == "__main__":
    run(main, f"sync_keras_check: ok on {SIZE} ranks (row splits {splits(13)})")
