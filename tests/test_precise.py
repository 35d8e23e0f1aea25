"""bn.precise_statistics: inside the block training calls give their usual outputs and
gradients and leave the moving statistics alone; on exit the moving statistics are those
of all the values seen (the batches concatenated), with each layer's estimator."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from mpi_launch import run_mpi

SIZES = (7, 12, 3, 9)  # uneven batches: pooling must weight them by their sizes


def batches(rng: np.random.Generator, shape: tuple[int, ...], dtype=np.float32) -> list[np.ndarray]:
    """Batches whose channels have different offsets and scales, drifting from batch to batch."""
    c = shape[0]
    out = []
    for i, n in enumerate(SIZES):
        x = rng.normal(size=(n, *shape)) * rng.uniform(0.5, 3.0, c).reshape((c,) + (1,) * (len(shape) - 1))
        out.append((x + 10.0 + i).astype(dtype))
    return out


def channels_first_stats(xs: list[np.ndarray], ddof: int) -> tuple[np.ndarray, np.ndarray]:
    every = np.concatenate(xs).astype(np.float64)
    axes = (0, *range(2, every.ndim))
    return every.mean(axis=axes), every.var(axis=axes, ddof=ddof)


# ----------------------------------------------------------------------------- PyTorch-style
TORCH_KINDS = [
    (bn.BatchNorm1d, (4,)),
    (bn.BatchNorm1d, (4, 6)),
    (bn.BatchNorm2d, (4, 3, 5)),
    (bn.BatchNorm3d, (4, 2, 3, 2)),
]


@pytest.mark.parametrize(("cls", "shape"), TORCH_KINDS)
def test_torch_pooled_unbiased_and_batches_counted(rng, cls, shape):
    xs = batches(rng, shape)
    layer = cls(4)
    layer(xs[0] * 0.1)  # one ordinary step first: running stats and num_batches_tracked move
    before_mean, before_var = layer.running_mean.copy(), layer.running_var.copy()
    with bn.precise_statistics(layer) as ps:
        for x in xs:
            layer(x)
            np.testing.assert_array_equal(layer.running_mean, before_mean)  # untouched inside
            np.testing.assert_array_equal(layer.running_var, before_var)
            assert int(layer.num_batches_tracked) == 1
    mean, var = channels_first_stats(xs, ddof=1)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-5)
    assert int(layer.num_batches_tracked) == 1 + len(xs)
    assert ps.batches == [len(xs)]
    per_channel = sum(x.size for x in xs) // 4
    np.testing.assert_array_equal(ps.counts[0], per_channel)


def test_torch_float64_exact(rng):
    xs = batches(rng, (3, 4), np.float64)
    layer = bn.BatchNorm1d(3, dtype="float64")
    with bn.precise_statistics([layer]):
        for x in xs:
            layer(x)
    mean, var = channels_first_stats(xs, ddof=1)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_outputs_and_gradients_are_the_usual_training_ones(rng, momentum):
    xs = batches(rng, (4, 5))
    inside, outside = bn.BatchNorm1d(4, momentum=momentum), bn.BatchNorm1d(4, momentum=momentum)
    for m in (inside, outside):
        m.weight = np.linspace(0.5, 2.0, 4)
        m.bias = np.linspace(-1.0, 1.0, 4)
    with bn.precise_statistics(inside):
        for x in xs:
            y_in = inside(x)
            y_out = outside(x)
            np.testing.assert_array_equal(y_in, y_out)
            dy = rng.normal(size=x.shape).astype(np.float32)
            np.testing.assert_array_equal(inside.backward(dy), outside.backward(dy))
            np.testing.assert_array_equal(inside.grads["weight"], outside.grads["weight"])
            np.testing.assert_array_equal(inside.grads["bias"], outside.grads["bias"])


def test_torch_eval_calls_are_not_counted(rng):
    xs = batches(rng, (4,))
    layer = bn.BatchNorm1d(4).eval()
    with bn.precise_statistics(layer) as ps:
        for x in xs:
            layer(x)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert int(layer.num_batches_tracked) == 0
    assert ps.batches == [0]


def test_torch_empty_batch_counts_as_a_batch(rng):
    xs = batches(rng, (4,))
    layer = bn.BatchNorm1d(4)
    with bn.precise_statistics(layer):
        layer(np.zeros((0, 4), np.float32))
        for x in xs:
            layer(x)
    mean, var = channels_first_stats(xs, ddof=1)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-5)
    assert int(layer.num_batches_tracked) == len(xs) + 1


def test_torch_against_update_bn(rng):
    """torch's update_bn counts batches the same way; with equal batch sizes its running
    mean (the mean of the batch means) is the pooled mean too. (Its running_var is the mean
    of per-batch unbiased variances, not the pooled variance, so it is not compared.)"""
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import update_bn

    xs = [rng.normal(5.0, 2.0, size=(8, 3, 4, 4)) for _ in range(5)]
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    update_bn([torch.from_numpy(x) for x in xs], theirs)
    ours = bn.BatchNorm2d(3, dtype="float64")
    with bn.precise_statistics(ours):
        for x in xs:
            ours(x)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == len(xs)
    np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------- Keras-style
def keras_stats(xs: list[np.ndarray], axes: tuple[int, ...], ddof: int) -> tuple[np.ndarray, np.ndarray]:
    every = np.concatenate(xs).astype(np.float64)
    red = tuple(i for i in range(every.ndim) if i not in axes)
    return every.mean(axis=red), every.var(axis=red, ddof=ddof)


@pytest.mark.parametrize(
    ("kw", "shape", "axes", "ddof"),
    [
        ({}, (5,), (1,), 0),  # Dense input: non-fused, biased
        ({}, (3, 4, 5), (3,), 1),  # NHWC, fused path: unbiased (tf-keras's quirk)
        ({"axis": 1}, (5, 3, 4), (1,), 1),  # NCHW, fused path
        ({"fused": False}, (3, 4, 5), (3,), 0),  # 4-D, non-fused: biased
        ({"axis": -1}, (6, 5), (2,), 0),  # 3-D input: non-fused
    ],
)
def test_keras_pooled_with_the_layer_estimator(rng, kw, shape, axes, ddof):
    xs = [np.moveaxis(x, 1, -1) if axes[0] != 1 and len(shape) > 1 else x for x in batches(rng, shape)]
    layer = bn.BatchNormalization(**kw)
    with bn.precise_statistics(layer):  # built inside the block by its first call
        for x in xs:
            layer(x, training=True)
            np.testing.assert_array_equal(layer.moving_mean, 0)
            np.testing.assert_array_equal(layer.moving_variance, 1)
    assert layer.fused == (ddof == 1)
    mean, var = keras_stats(xs, axes, ddof)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-5)


def test_keras_axis_list_keepdims_shape(rng):
    xs = [rng.normal(3.0, 2.0, size=(n, 2, 3, 4)).astype(np.float32) for n in SIZES]
    layer = bn.BatchNormalization(axis=[1, 3])
    with bn.precise_statistics(layer):
        for x in xs:
            layer(x, training=True)
    every = np.concatenate(xs).astype(np.float64)
    assert layer.moving_mean.shape == (1, 2, 1, 4)
    np.testing.assert_allclose(layer.moving_mean, every.mean(axis=(0, 2), keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, every.var(axis=(0, 2), keepdims=True), rtol=1e-5)


def test_keras_ghost_batches_pool_all_values(rng):
    xs = [rng.normal(3.0, 2.0, size=(n, 3)).astype(np.float32) for n in (8, 12, 4)]
    layer = bn.BatchNormalization(virtual_batch_size=4)
    with bn.precise_statistics(layer):
        for x in xs:
            layer(x, training=True)
    every = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean.reshape(-1), every.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.reshape(-1), every.var(axis=0), rtol=1e-5)


def test_keras_mask_pools_the_unmasked_values(rng):
    xs = [rng.normal(3.0, 2.0, size=(n, 5, 3)).astype(np.float32) for n in (4, 6)]
    masks = [rng.random(x.shape[:2]) < 0.6 for x in xs]
    layer = bn.BatchNormalization()
    with bn.precise_statistics(layer) as ps:
        for x, m in zip(xs, masks, strict=True):
            layer(x, training=True, mask=m)
    kept = np.concatenate([x[m] for x, m in zip(xs, masks, strict=True)]).astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean, kept.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, kept.var(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(ps.counts[0], len(kept))


def test_keras_renorm_sets_moving_stddev(rng):
    xs = [rng.normal(3.0, 2.0, size=(n, 3)).astype(np.float32) for n in SIZES]
    layer = bn.BatchNormalization(renorm=True)
    layer.build((None, 3))
    renorm_mean = layer.renorm_mean.copy()
    with bn.precise_statistics(layer):
        for x in xs:
            layer(x, training=True)
    _, var = keras_stats(xs, (1,), 0)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_stddev, np.sqrt(var + layer.epsilon), rtol=1e-5)
    np.testing.assert_array_equal(layer.renorm_mean, renorm_mean)


def test_keras_outputs_and_gradients_are_the_usual_training_ones(rng):
    xs = [np.moveaxis(x, 1, -1) for x in batches(rng, (4, 3, 3))]
    inside, outside = bn.BatchNormalization(), bn.BatchNormalization()
    with bn.precise_statistics(inside):
        for x in xs:
            np.testing.assert_array_equal(inside(x, training=True), outside(x, training=True))
            dy = rng.normal(size=x.shape).astype(np.float32)
            np.testing.assert_array_equal(inside.backward(dy), outside.backward(dy))
            np.testing.assert_array_equal(inside.grads["gamma"], outside.grads["gamma"])
            # inference calls inside the block use the (unchanged) moving statistics
            np.testing.assert_array_equal(inside(x), bn.BatchNormalization()(x))


def test_keras_trainable_false_is_inference(rng):
    layer = bn.BatchNormalization(trainable=False)
    with bn.precise_statistics(layer) as ps:
        layer(rng.normal(size=(5, 3)), training=True)
    np.testing.assert_array_equal(layer.moving_mean, 0)
    assert ps.batches == [0]


# ----------------------------------------------------------------------------- several layers, errors
def test_several_layers_of_both_kinds(rng):
    a, b = bn.BatchNormalization(), bn.BatchNorm1d(3)
    xs = [rng.normal(2.0, 3.0, size=(n, 3)).astype(np.float32) for n in SIZES]
    with bn.precise_statistics([a, b, a]) as ps:  # a repeated layer counts once
        for x in xs:
            b(a(x, training=True) * 2.0 + 1.0)
    assert ps.batches == [len(xs), len(xs)]
    every = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(a.moving_mean, every.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(b.running_mean, 1.0, atol=1e-5)  # 2 * normalized + 1
    np.testing.assert_allclose(b.running_var, 4.0 * len(every) / (len(every) - 1), rtol=1e-3)


def test_an_exception_in_the_block_commits_nothing(rng):
    layer = bn.BatchNorm1d(3)
    x = rng.normal(size=(5, 3)).astype(np.float32)

    def block() -> None:
        with bn.precise_statistics(layer):
            layer(x)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        block()
    np.testing.assert_array_equal(layer.running_mean, 0)
    assert int(layer.num_batches_tracked) == 0
    layer(rng.normal(size=(5, 3)).astype(np.float32))  # back to the usual moving update
    assert int(layer.num_batches_tracked) == 1
    assert np.all(layer.running_mean != 0)


def test_no_batches_changes_nothing():
    k, t = bn.BatchNormalization(), bn.BatchNorm2d(2)
    with bn.precise_statistics([k, t]):
        pass
    assert not k.built
    np.testing.assert_array_equal(t.running_var, 1)
    assert int(t.num_batches_tracked) == 0


def test_errors():
    layer = bn.BatchNorm1d(3)
    with pytest.raises(TypeError, match="batch-norm layer"):
        bn.precise_statistics(object())
    with pytest.raises(TypeError, match="batch-norm layers of this package"):
        bn.precise_statistics([layer, "x"])
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bn.precise_statistics(bn.BatchNorm1d(3, track_running_stats=False))
    with (
        bn.precise_statistics(layer),
        pytest.raises(RuntimeError, match="already inside"),
        bn.precise_statistics([bn.BatchNorm1d(3), layer]),
    ):
        pass
    ctx = bn.precise_statistics(layer)
    with ctx, pytest.raises(RuntimeError, match="already active"), ctx:
        pass
    # everything detached again: an ordinary training call moves the statistics
    layer(np.arange(6.0, dtype=np.float32).reshape(2, 3))
    assert int(layer.num_batches_tracked) == 1


def test_sync_batchnorm_pools_over_processes():
    """tests/mpi/precise_check.py under mpiexec with 2 ranks (skipped without MPI)."""
    assert "precise ok on 2 ranks" in run_mpi("precise_check.py", 2)
