"""Ghost batches (virtual_batch_size) of the NumPy layers bn.BatchNorm1d/2d/3d against torch's
chunk loop, torch.cat([bn(c) for c in x.split(k)]) with torch.nn modules in float64: outputs,
gradients, running statistics and num_batches_tracked over several steps; eval; errors."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import batchnorm as bn

torch = pytest.importorskip("torch")

OURS = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}
THEIRS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def pair(shape, dtype, k, rng, **kw):
    c = shape[1]
    ours = OURS[len(shape)](c, dtype=dtype, virtual_batch_size=k, **kw)
    theirs = THEIRS[len(shape)](c, dtype=torch.float64, **kw)
    if ours.weight is not None:
        w, b = rng.normal(1.0, 0.5, c), rng.normal(0.0, 0.5, c)
        ours.weight, ours.bias = w, b
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(w))
            theirs.bias.copy_(torch.from_numpy(b))
    return ours, theirs


def data(shape, dtype, rng, layout):
    """Random values (mean 1, scale 2) in dtype; "channels_last": a view of an (N, *S, C) array."""
    if layout == "channels_last":
        full = rng.normal(1.0, 2.0, (shape[0], *shape[2:], shape[1])).astype(dtype)
        return np.moveaxis(full, -1, 1)
    return rng.normal(1.0, 2.0, shape).astype(dtype)


def assert_close(ours, exact, dtype, ulps):
    eps = np.finfo(dtype).eps
    scale = max(float(np.max(np.abs(exact))), 1.0)
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - exact)))
    assert err <= ulps * eps * scale, f"max error {err:.3g} > {ulps} eps * {scale:.3g}"


CASES = [  # shape, chunk, layout
    ((32, 5), 8, "contiguous"),
    ((35, 5), 8, "contiguous"),  # a smaller last chunk
    ((11, 4, 6), 3, "contiguous"),
    ((10, 3, 4, 5), 4, "contiguous"),
    ((10, 3, 4, 5), 4, "channels_last"),
    ((7, 2, 3, 2, 4), 2, "channels_last"),
]


@pytest.mark.parametrize(("shape", "k", "layout"), CASES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("momentum", [0.2, None])
def test_equals_torch_chunk_loop(shape, k, layout, dtype, momentum):
    rng = np.random.default_rng(0)
    ours, theirs = pair(shape, dtype, k, rng, momentum=momentum)
    for _ in range(3):
        x = data(shape, dtype, rng, layout)
        dy = data(shape, dtype, rng, layout)
        y = ours(x)
        dx = ours.backward(dy)
        theirs.zero_grad(set_to_none=True)
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float64)).requires_grad_()
        yt = torch.cat([theirs(c) for c in xt.split(k)])
        yt.backward(torch.from_numpy(np.ascontiguousarray(dy, np.float64)))
        assert y.dtype == dx.dtype == np.dtype(dtype)
        assert_close(y, yt.detach().numpy(), dtype, 32)
        assert_close(dx, xt.grad.numpy(), dtype, 64)
        assert_close(ours.grads["weight"], theirs.weight.grad.numpy(), dtype, 256)
        assert_close(ours.grads["bias"], theirs.bias.grad.numpy(), dtype, 256)
        assert_close(ours.running_mean, theirs.running_mean.numpy(), dtype, 32)
        assert_close(ours.running_var, theirs.running_var.numpy(), dtype, 32)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_without_running_statistics_or_affine():
    rng = np.random.default_rng(1)
    ours, theirs = pair((14, 3, 5), "float64", 4, rng, affine=False, track_running_stats=False)
    x = data((14, 3, 5), "float64", rng, "contiguous")
    y = ours(x)
    yt = torch.cat([theirs(c) for c in torch.from_numpy(x).split(4)])
    assert_close(y, yt.numpy(), "float64", 32)
    assert ours.grads == {}
    ours.backward(np.ones_like(x))
    assert ours.grads == {}


def test_eval_and_one_chunk_are_the_plain_layer():
    rng = np.random.default_rng(2)
    ghost, _ = pair((12, 4, 3), "float64", 4, rng)
    plain = copy.deepcopy(ghost)
    plain.virtual_batch_size = None
    x = data((12, 4, 3), "float64", rng, "contiguous")
    ghost(x)
    plain.load_state_dict(ghost.state_dict())
    ghost.eval()
    plain.eval()
    np.testing.assert_array_equal(ghost(x), plain(x))
    np.testing.assert_array_equal(ghost.backward(x), plain.backward(x))
    ghost.train()
    plain.train()
    np.testing.assert_array_equal(ghost(x[:4]), plain(x[:4]))  # N <= k: one chunk
    np.testing.assert_array_equal(ghost.running_var, plain.running_var)


def test_a_chunk_of_one_value_per_channel_raises_and_changes_nothing():
    m = bn.BatchNorm1d(3, virtual_batch_size=4)
    before = m.state_dict()
    with pytest.raises(ValueError, match=r"got input size torch.Size\(\[1, 3\]\)"):  # torch's words, last chunk
        m(np.random.default_rng(3).normal(size=(9, 3)).astype(np.float32))
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_virtual_batch_size_must_be_a_positive_int(bad):
    with pytest.raises((TypeError, ValueError), match="virtual_batch_size"):
        bn.BatchNorm2d(3, virtual_batch_size=bad)


def test_sync_batch_norm_refuses_virtual_batch_size():
    with pytest.raises(ValueError, match="SyncBatchNorm does not support virtual_batch_size"):
        bn.SyncBatchNorm(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="SyncBatchNorm does not support virtual_batch_size"):
        bn.SyncBatchNorm.convert_sync_batchnorm(bn.BatchNorm1d(3, virtual_batch_size=4))


def test_pickle_copy_and_repr_keep_it():
    m = bn.BatchNorm1d(3, virtual_batch_size=16)
    assert pickle.loads(pickle.dumps(m)).virtual_batch_size == 16
    assert copy.deepcopy(m).virtual_batch_size == 16
    assert "virtual_batch_size=16" in repr(m)
    assert "virtual_batch_size" not in repr(bn.BatchNorm1d(3))
