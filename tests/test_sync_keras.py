"""bn.SyncBatchNormalization: the Keras-style synchronized layer.

Single process (no MPI needed): with one process it is BatchNormalization(fused=False),
bit for bit; its arguments, config, save/load and errors. Under MPI: runs
tests/mpi/sync_keras_check.py with mpiexec on 2 and 3 ranks (uneven batches, one rank
empty with 3) against the single-process layer on the concatenated batch (skipped
without mpi4py or an mpiexec).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from layer_state import same_weights
from mpi_launch import run_mpi

CONFIGS: list[tuple[tuple[int, ...], dict[str, Any], bool]] = [
    ((8, 5), {}, False),
    ((6, 4, 3, 3), {"axis": 1}, False),  # 4-D: the plain layer's default would be fused
    ((6, 3, 3, 4), {"dtype": "float64"}, False),
    ((5, 4, 3, 5), {"axis": [1, 3]}, False),
    ((8, 6), {"center": False, "scale": False}, False),
    ((8, 2, 6), {"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.1}}, False),
    ((8, 3, 4), {"adjustment": lambda shape: (np.full(4, 2.0), np.full(4, 0.5))}, False),
    ((8, 5, 4), {}, True),
    ((8, 5, 4), {"renorm": True}, True),
]


class LoneComm:
    """A fake communicator of 2 processes whose peer holds an empty batch: every
    all-reduce returns this process's own contribution (merging an empty partial or
    adding zeros changes nothing). Exercises the synchronized code path in one process."""

    def __init__(self) -> None:
        self.calls = 0

    def Get_size(self) -> int:
        return 2

    def Allreduce(self, send: Any, recv: Any, op: Any = None) -> None:
        self.calls += 1
        s = send[0] if isinstance(send, list) else send
        r = recv[0] if isinstance(recv, list) else recv
        r[...] = s


def run_pair(sync: bn.BatchNormalization, ref: bn.BatchNormalization, shape, use_mask, exact: bool) -> None:
    rng = np.random.default_rng(5)
    check = np.testing.assert_array_equal if exact else _close
    for step in range(4):
        x = (rng.normal(size=shape) * 2 + 3).astype(sync.compute_dtype)
        dy = rng.normal(size=shape)
        mask = rng.uniform(size=shape[:-1]) > 0.3 if use_mask else None
        if step == 0:
            same_weights(rng, shape, ref, sync)
        train = step != 2
        check(sync(x, training=train, mask=mask), ref(x, training=train, mask=mask))
        check(sync.backward(dy), ref.backward(dy))
        assert sorted(sync.grads) == sorted(ref.grads)
        for k in ref.grads:
            check(sync.grads[k], ref.grads[k])
        for a, b in zip(sync.get_weights(), ref.get_weights(), strict=True):
            check(a, b)


def _close(a: Any, b: Any) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "kwargs", "use_mask"), CONFIGS)
def test_one_process_is_the_unfused_layer(shape, kwargs, use_mask):
    """comm=None (COMM_WORLD of this one process, or no mpi4py): bit for bit the plain
    layer with fused=False."""
    run_pair(
        bn.SyncBatchNormalization(momentum=0.8, **kwargs),
        bn.BatchNormalization(momentum=0.8, fused=False, **kwargs),
        shape,
        use_mask,
        exact=True,
    )


@pytest.mark.parametrize(("shape", "kwargs", "use_mask"), CONFIGS)
def test_synchronized_path_with_an_empty_peer(shape, kwargs, use_mask):
    """The synchronized code (partials -> all-reduce -> normalize; sums -> all-reduce ->
    dx) with a peer that has no rows equals the plain layer; one all-reduce per pass."""
    pytest.importorskip("mpi4py")
    comm = LoneComm()
    sync = bn.SyncBatchNormalization(momentum=0.8, comm=comm, **kwargs)
    run_pair(sync, bn.BatchNormalization(momentum=0.8, fused=False, **kwargs), shape, use_mask, exact=False)
    assert comm.calls == 2 * 3  # 3 training steps, one all-reduce each way; inference: none


def test_comm_self_and_moving_variance_biased():
    mpi = pytest.importorskip("mpi4py.MPI")
    x = np.random.default_rng(0).normal(size=(4, 3, 3, 2)).astype(np.float32)
    sync = bn.SyncBatchNormalization(momentum=0.0, comm=mpi.COMM_SELF)
    fused = bn.BatchNormalization(momentum=0.0)  # the plain default on 4-D: fused, unbiased
    np.testing.assert_array_equal(sync(x, training=True), fused(x, training=True))
    assert sync.fused is False
    np.testing.assert_allclose(sync.moving_variance, x.var(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance, x.var(axis=(0, 1, 2), ddof=1), rtol=1e-5)


def test_arguments_config_and_save(tmp_path):
    assert "SyncBatchNormalization" in bn.__all__
    with pytest.raises(ValueError, match="`fused` argument cannot be True for SyncBatchNormalization"):
        bn.SyncBatchNormalization(fused=True)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn.SyncBatchNormalization(virtual_batch_size=2)
    with pytest.raises(TypeError, match="fused"):
        bn.SyncBatchNormalization(fused="yes")  # type: ignore[arg-type]
    assert bn.SyncBatchNormalization(fused=False).fused is False
    layer = bn.SyncBatchNormalization(
        axis=[1, 2], momentum=0.9, epsilon=1e-4, gamma_regularizer="l2", beta_constraint="non_neg", renorm=True
    )
    assert layer.name.startswith("sync_batch_normalization")
    assert repr(layer).startswith("SyncBatchNormalization(")
    cfg = layer.get_config()
    plain = bn.BatchNormalization(
        axis=[1, 2], momentum=0.9, epsilon=1e-4, gamma_regularizer="l2", beta_constraint="non_neg", renorm=True
    ).get_config()
    assert list(cfg) == list(plain)  # tf-keras's keys: no comm, fused or synchronized
    again = bn.SyncBatchNormalization.from_config({**cfg, "synchronized": True})
    assert isinstance(again, bn.SyncBatchNormalization)
    assert again.get_config() == cfg
    with pytest.raises(ValueError, match="use SyncBatchNormalization"):
        bn.BatchNormalization.from_config({**cfg, "synchronized": True})
    x = np.random.default_rng(1).normal(size=(4, 2, 3)).astype(np.float32)
    layer(x, training=True)
    path = tmp_path / "sync.npz"
    layer.save(path)
    loaded = bn.SyncBatchNormalization.load(path)
    assert isinstance(loaded, bn.SyncBatchNormalization)
    assert loaded.get_config() == cfg
    for a, b in zip(loaded.get_weights(), layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded(x), layer(x))
    assert bn.BatchNormalization.load(path).fused is False  # the same file format


def test_failed_call_changes_nothing():
    layer = bn.SyncBatchNormalization(comm=LoneComm() if _has_mpi4py() else None)
    x = np.ones((4, 3), np.float32)
    layer(x, training=True)
    before = layer.get_weights()
    with pytest.raises(ValueError, match="incompatible"):
        layer(np.ones((4, 2), np.float32), training=True)
    with pytest.raises(ValueError, match="empty batch"):
        layer(x[:0], training=True)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_precise_statistics_one_process():
    rng = np.random.default_rng(2)
    batches = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (5, 9)]
    comm = LoneComm() if _has_mpi4py() else None
    layer = bn.SyncBatchNormalization(dtype="float64", comm=comm)
    with bn.precise_statistics(layer):
        for x in batches:
            layer(x, training=True)
    every = np.concatenate(batches)
    np.testing.assert_allclose(layer.moving_mean, every.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, every.var(axis=0), rtol=1e-12)


def _has_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_normalization_equals_single_process(ranks):
    assert f"ok on {ranks} ranks" in run_mpi("sync_keras_check.py", ranks)
