"""BatchNorm1d/2d/3d and (single-process) SyncBatchNorm against torch.nn 2.13 modules:
outputs, gradients, running statistics over several steps, errors and state dicts."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.distributed import _mpi

torch = pytest.importorskip("torch")

KINDS = {
    "1d-NC": (bn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
    "1d-NCL": (bn.BatchNorm1d, torch.nn.BatchNorm1d, (5, 4, 7)),
    "2d": (bn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 4, 5, 3)),
    "3d": (bn.BatchNorm3d, torch.nn.BatchNorm3d, (3, 4, 2, 3, 4)),
}
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


def pair(kind: str, dtype: str = "float32", **kw):
    ours, theirs, shape = KINDS[kind]
    return ours(4, dtype=dtype, **kw), theirs(4, dtype=TORCH_DTYPE[dtype], **kw), shape


def set_params(m, t, rng) -> None:
    """Non-trivial weight and bias, the same in both modules."""
    if t.weight is None:
        return
    w = rng.normal(1.0, 0.5, t.num_features)
    b = rng.normal(0.0, 0.5, t.num_features)
    m.weight, m.bias = w, b
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(w))
        t.bias.copy_(torch.from_numpy(b))


def batch(rng, shape, dtype="float32", offset=3.0):
    scale = rng.uniform(0.5, 4.0, shape[1]).reshape(1, shape[1], *[1] * (len(shape) - 2))
    return (rng.normal(size=shape) * scale + offset).astype(dtype)


def assert_close(ours, theirs, tol, what=""):
    theirs = theirs.detach().to(torch.float64).numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, rtol=tol, atol=tol, err_msg=what)


def step_both(m, t, x, dy, tol):
    """One call and its backward on both modules; compares y, dx and the gradients."""
    xt = torch.from_numpy(x).requires_grad_()
    yt = t(xt)
    yt.backward(torch.from_numpy(dy))
    y = m(x)
    dx = m.backward(dy)
    assert y.dtype == x.dtype
    assert y.shape == x.shape
    assert_close(y, yt, tol, "y")
    assert_close(dx, xt.grad, tol, "dx")
    if t.weight is not None:
        assert set(m.grads) == {"weight", "bias"}
        assert m.grads["weight"].dtype == m.dtype
        assert_close(m.grads["weight"], t.weight.grad, tol * 10, "weight grad")
        assert_close(m.grads["bias"], t.bias.grad, tol * 10, "bias grad")
        t.weight.grad = None
        t.bias.grad = None
    else:
        assert m.grads == {}


def assert_same_state(m, t, tol):
    for name in ("weight", "bias", "running_mean", "running_var"):
        ours, theirs = getattr(m, name), getattr(t, name)
        assert (ours is None) == (theirs is None), name
        if ours is not None:
            assert ours.shape == tuple(theirs.shape)
            assert_close(ours, theirs, tol, name)
    if t.num_batches_tracked is None:
        assert m.num_batches_tracked is None
    else:
        assert m.num_batches_tracked.dtype == np.int64
        assert m.num_batches_tracked.shape == ()
        assert int(m.num_batches_tracked) == int(t.num_batches_tracked)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("momentum", [0.1, 0.25, None])
@pytest.mark.parametrize(("affine", "track"), [(True, True), (False, True), (True, False), (False, False)])
def test_steps_match_torch(kind, momentum, affine, track, rng):
    m, t, shape = pair(kind, momentum=momentum, affine=affine, track_running_stats=track)
    set_params(m, t, rng)
    for step, mode in enumerate(["train", "train", "eval", "train", "eval", "train"]):
        assert m.train(mode == "train") is m
        t.train(mode == "train")
        assert m.training == t.training
        x = batch(rng, shape, offset=step)
        step_both(m, t, x, rng.normal(size=shape).astype(np.float32), 2e-5)
        assert_same_state(m, t, 2e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_float64_matches_torch(kind, rng):
    m, t, shape = pair(kind, "float64")
    set_params(m, t, rng)
    for mode in ["train", "train", "eval"]:
        m.train(mode == "train")
        t.train(mode == "train")
        step_both(m, t, batch(rng, shape, "float64"), rng.normal(size=shape), 1e-12)
        assert_same_state(m, t, 1e-13)
    assert m.running_var.dtype == np.float64


def test_half_precision_matches_torch(rng):
    # float16 input into a float32 layer (torch's mixed mode), and a float16 layer.
    for layer_dtype in ("float32", "float16"):
        m, t, shape = pair("2d", layer_dtype)
        for mode in ["train", "eval"]:
            m.train(mode == "train")
            t.train(mode == "train")
            x = batch(rng, shape, "float16")
            y = m(x)
            yt = t(torch.from_numpy(x))
            assert y.dtype == np.float16
            assert_close(y, yt, 1e-2, f"{layer_dtype} {mode}")
            assert_same_state(m, t, 1e-3)
        assert m.running_mean.dtype == np.dtype(layer_dtype)


def test_bfloat16_input(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    m, t, shape = pair("2d")
    x = batch(rng, shape).astype(ml_dtypes.bfloat16)
    y = m(x)
    yt = t(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16))
    assert y.dtype == x.dtype
    assert_close(y.astype(np.float32), yt.float(), 5e-2)
    assert_same_state(m, t, 1e-2)


def test_momentum_none_is_a_cumulative_average():
    # torch: momentum None averages over num_batches_tracked, so the first batch's factor is 1.
    m = bn.BatchNorm1d(1, momentum=None)
    m(np.array([[1.0], [3.0]], np.float32))
    m(np.array([[2.0], [6.0]], np.float32))
    np.testing.assert_allclose(m.running_mean, [3.0])
    np.testing.assert_allclose(m.running_var, [5.0])
    assert int(m.num_batches_tracked) == 2
    m = bn.BatchNorm1d(1, momentum=0.25)
    m(np.array([[1.0], [3.0]], np.float32))
    np.testing.assert_allclose(m.running_mean, [0.5])
    np.testing.assert_allclose(m.running_var, [1.25])


def test_momentum_none_after_loading_a_counter(rng):
    m, t, shape = pair("2d", momentum=None)
    sd = t.state_dict()
    sd["num_batches_tracked"] = torch.tensor(9)
    t.load_state_dict(sd)
    m.load_state_dict(sd)
    step_both(m, t, batch(rng, shape), rng.normal(size=shape).astype(np.float32), 2e-5)
    assert_same_state(m, t, 1e-6)


def test_channels_last_runs_on_the_callers_buffer(rng, monkeypatch):
    m, t, shape = pair("2d")
    set_params(m, t, rng)
    xt = torch.from_numpy(batch(rng, shape)).to(memory_format=torch.channels_last).requires_grad_()
    x = xt.detach().numpy()  # NCHW shape, NHWC strides
    assert not x.flags.c_contiguous
    assert x.strides[1] == x.itemsize
    seen = []
    for name in ("forward", "normalize", "backward"):
        real = getattr(bn._core, name)

        def spy(*args, _real=real, _x_at=int(name == "backward"), **kw):
            seen.append(args[_x_at])  # backward(dy, x, ...); the others (x, ...)
            return _real(*args, **kw)

        monkeypatch.setattr(bn._core, name, spy)
    dyt = torch.randn(shape).to(memory_format=torch.channels_last)
    dy = dyt.numpy()
    for mode in ["train", "eval"]:
        m.train(mode == "train")
        t.train(mode == "train")
        xt.grad = None
        yt = t(xt)
        yt.backward(dyt)
        y = m(x)
        dx = m.backward(dy)
        assert y.strides == x.strides  # the output keeps the layout, as torch's does
        assert dx.strides == x.strides
        assert_close(y, yt, 2e-5)
        assert_close(dx, xt.grad, 2e-5)
    assert len(seen) == 4
    assert all(s is x for s in seen), "the core got the caller's array itself, not a copy"
    assert_same_state(m, t, 1e-6)


def test_empty_batch_as_torch(rng):
    m, t, _ = pair("2d")
    for _ in range(2):
        x = np.zeros((0, 4, 3, 3), np.float32)
        step_both(m, t, x, x, 1e-7)
        assert_same_state(m, t, 0)  # statistics untouched, num_batches_tracked advanced
    assert int(m.num_batches_tracked) == 2


def raises_like_torch(ours, theirs):
    """Both raise the same exception type with the same message."""
    with pytest.raises(Exception) as expected:  # noqa: PT011 - whatever torch raises
        theirs()
    with pytest.raises(type(expected.value)) as got:
        ours()
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("1d-NC", (4,)), ("1d-NC", (2, 4, 3, 3)), ("2d", (2, 4, 3)), ("2d", (2, 4, 1, 1, 1)), ("3d", (2, 4, 3, 3))],
)
def test_input_rank_errors(kind, shape):
    m, t, _ = pair(kind)
    x = np.ones(shape, np.float32)
    raises_like_torch(lambda: m(x), lambda: t(torch.from_numpy(x)))


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)])
def test_one_value_per_channel_in_training(shape):
    ours = (
        bn.SyncBatchNorm(4)
        if len(shape) == 2
        else {3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}[len(shape)](4)
    )
    theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[
        len(shape)
    ](4)
    x = np.ones(shape, np.float32)
    before = ours.state_dict()
    raises_like_torch(lambda: ours(x), lambda: theirs(torch.from_numpy(x)))
    # Unlike torch, which has already advanced num_batches_tracked: nothing changed.
    for k, v in ours.state_dict().items():
        assert np.array_equal(v, before[k]), k
    # Fine in eval mode; an error again with batch statistics in eval.
    assert ours.eval()(x).shape == shape
    no_stats = bn.BatchNorm1d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        no_stats(np.ones((1, 4), np.float32))


@pytest.mark.parametrize(
    ("eps", "mode", "track"),
    [(0, "train", True), (0.0, "train", True), (-1e-3, "eval", True), (0, "eval", False), (-1, "train", True)],
)
def test_eps_errors(eps, mode, track):
    m = bn.BatchNorm2d(4, eps=eps, track_running_stats=track).train(mode == "train")
    t = torch.nn.BatchNorm2d(4, eps=eps, track_running_stats=track).train(mode == "train")
    x = np.ones((2, 4, 2, 2), np.float32)
    raises_like_torch(lambda: m(x), lambda: t(torch.from_numpy(x)))


def test_eps_zero_in_eval_is_allowed(rng):
    m, t, shape = pair("2d", eps=0)
    m.eval()
    t.eval()
    x = batch(rng, shape)
    assert_close(m(x), t(torch.from_numpy(x)), 1e-6)


@pytest.mark.parametrize(
    ("kw", "mode", "x_dtype", "channels"),
    [
        ({}, "train", "float32", 3),
        ({}, "eval", "float32", 5),
        ({"track_running_stats": False}, "train", "float32", 3),
        ({"affine": False, "track_running_stats": False}, "train", "float32", 3),
        ({}, "train", "float64", 4),
        ({"affine": False}, "eval", "float64", 4),
        ({"track_running_stats": False}, "train", "float64", 4),
        ({"dtype": "float64"}, "train", "float32", 4),
        ({"dtype": "float64"}, "train", "float16", 4),
        ({"dtype": "float16"}, "eval", "float32", 4),
    ],
)
def test_channel_and_dtype_errors(kw, mode, x_dtype, channels):
    layer_dtype = kw.pop("dtype", "float32")
    m = bn.BatchNorm2d(4, dtype=layer_dtype, **kw).train(mode == "train")
    t = torch.nn.BatchNorm2d(4, dtype=TORCH_DTYPE[layer_dtype], **kw).train(mode == "train")
    x = np.ones((2, channels, 2, 2), x_dtype)
    x[0] = 2
    try:
        yt = t(torch.from_numpy(x))
    except RuntimeError:
        raises_like_torch(lambda: m(x), lambda: t(torch.from_numpy(x)))
    else:  # allowed by torch (no parameters or buffers to disagree with): same result
        assert_close(m(x), yt, 1e-6)


def test_other_errors():
    m = bn.BatchNorm2d(3)
    raises_like_torch(lambda: m.train("yes"), lambda: torch.nn.BatchNorm2d(3).train("yes"))
    with pytest.raises(RuntimeError, match="before any forward"):
        m.backward(np.ones((2, 3, 2, 2), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        m(np.ones((2, 3, 2, 2), np.int32))
    m(np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
    with pytest.raises(ValueError, match="dy has shape"):
        m.backward(np.ones((2, 3, 2), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        bn.BatchNorm2d(3, dtype="int32")
    with pytest.raises(TypeError, match="num_features"):
        bn.BatchNorm2d(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        m.weight = np.ones(4)
    with pytest.raises(ValueError, match="no weight"):
        bn.BatchNorm2d(3, affine=False).weight = np.ones(3)


def test_backward_after_eval_uses_the_running_statistics(rng):
    m, t, shape = pair("2d")
    set_params(m, t, rng)
    for _ in range(3):
        m(batch(rng, shape))
        t(torch.from_numpy(batch(rng, shape)))
    m.load_state_dict(t.state_dict())
    m.eval()
    t.eval()
    x = batch(rng, shape)
    dy = rng.normal(size=shape).astype(np.float32)
    step_both(m, t, x, dy, 1e-5)
    inv_std = 1 / np.sqrt(m.running_var.astype(np.float64) + m.eps)
    np.testing.assert_allclose(m.backward(dy), dy * (m.weight * inv_std)[:, None, None], rtol=1e-6)


def test_repeated_backward_and_dy_dtype(rng):
    m = bn.BatchNorm2d(4)
    x = batch(rng, (3, 4, 2, 2))
    m(x)
    dy = rng.normal(size=x.shape)
    first = m.backward(dy)  # float64 dy is cast to the input's dtype
    assert first.dtype == np.float32
    np.testing.assert_array_equal(m.backward(dy.astype(np.float32)), first)


@pytest.mark.parametrize(("affine", "track"), [(True, True), (False, True), (True, False), (False, False)])
def test_state_dict_keys_and_round_trips(affine, track, rng):
    m, t, shape = pair("2d", affine=affine, track_running_stats=track)
    assert list(m.state_dict()) == list(t.state_dict())
    # torch -> ours: train torch, load its state dict (tensors) strictly.
    set_params(m, t, rng)
    for _ in range(3):
        t(torch.from_numpy(batch(rng, shape)))
    assert repr(m.load_state_dict(t.state_dict())) == repr(t.load_state_dict(t.state_dict()))
    assert_same_state(m, t, 0)
    # ours -> torch: train ours, hand NumPy arrays to torch.
    for _ in range(2):
        m(batch(rng, shape))
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    assert_same_state(m, t, 0)
    # And the two compute the same from there.
    m.eval()
    t.eval()
    x = batch(rng, shape)
    assert_close(m(x), t(torch.from_numpy(x)), 1e-6)
    for v in m.state_dict().values():
        assert isinstance(v, np.ndarray)


def test_state_dict_values_are_copies():
    m = bn.BatchNorm1d(3)
    sd = m.state_dict()
    sd["running_mean"][:] = 7
    assert np.all(m.running_mean == 0)
    m2 = bn.BatchNorm1d(3)
    m2.load_state_dict(sd)
    sd["running_mean"][:] = 8
    assert np.all(m2.running_mean == 7)


def full_sd(**over):
    sd = {
        "weight": np.ones(3),
        "bias": np.zeros(3),
        "running_mean": np.zeros(3),
        "running_var": np.ones(3),
        "num_batches_tracked": np.array(4),
    }
    sd.update(over)
    return {k: v for k, v in sd.items() if v is not None}


@pytest.mark.parametrize(
    "sd",
    [
        full_sd(weight=np.ones(4), foo=np.ones(1), running_mean=None, running_var=None),
        full_sd(weight=np.ones((3, 1)), num_batches_tracked=np.array([7, 8])),
        full_sd(bias=None),
        full_sd(extra=np.ones(3)),
    ],
    ids=["missing-unexpected-size", "sizes", "missing", "unexpected"],
)
@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_errors_as_torch(sd, strict):
    m = bn.BatchNorm2d(3)
    m(np.random.default_rng(0).normal(size=(2, 3, 2, 2)).astype(np.float32))
    before = m.state_dict()
    t = torch.nn.BatchNorm2d(3)
    tsd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    try:
        expected = t.load_state_dict(tsd, strict=strict)
    except RuntimeError:
        raises_like_torch(lambda: m.load_state_dict(sd, strict=strict), lambda: t.load_state_dict(tsd, strict=strict))
        for k, v in m.state_dict().items():  # unlike torch, nothing was loaded
            assert np.array_equal(v, before[k]), k
    else:
        got = m.load_state_dict(sd, strict=strict)
        assert got.missing_keys == expected.missing_keys
        assert got.unexpected_keys == expected.unexpected_keys
        assert repr(got) == repr(expected)


def test_load_state_dict_versions_and_counter():
    m = bn.BatchNorm2d(3)
    t = torch.nn.BatchNorm2d(3)
    m.num_batches_tracked = 5
    # A plain dict (no _metadata version) may omit num_batches_tracked: it is kept.
    m.load_state_dict(full_sd(num_batches_tracked=None))
    assert int(m.num_batches_tracked) == 5
    # torch's state dict says version 2: then it is missing, in both.
    sd = t.state_dict()
    del sd["num_batches_tracked"]
    raises_like_torch(lambda: m.load_state_dict(sd), lambda: t.load_state_dict(sd))
    # A 1-element counter loads into the 0-d one; values are cast (float64 -> float32).
    m.load_state_dict(full_sd(num_batches_tracked=np.array([7]), weight=np.full(3, 0.1)))
    assert m.num_batches_tracked.shape == ()
    assert int(m.num_batches_tracked) == 7
    assert m.weight.dtype == np.float32
    np.testing.assert_array_equal(m.weight, np.float32(0.1))
    raises_like_torch(lambda: m.load_state_dict([1]), lambda: t.load_state_dict([1]))
    # In-place loading: references to the arrays see the new values, as with torch tensors.
    ref = m.running_mean
    m.load_state_dict(full_sd(running_mean=np.full(3, 2.0)))
    assert np.all(ref == 2.0)


def test_load_bfloat16_tensors():
    t = torch.nn.BatchNorm1d(3, dtype=torch.bfloat16)
    with torch.no_grad():
        t.weight.fill_(1.5)
    m = bn.BatchNorm1d(3)
    m.load_state_dict(t.state_dict())
    np.testing.assert_array_equal(m.weight, 1.5)


def test_state_is_unchanged_by_a_failed_call(rng):
    m = bn.BatchNorm2d(4, momentum=None)
    m(batch(rng, (2, 4, 2, 2)))
    before = m.state_dict()
    for bad in [np.ones((2, 3, 2, 2), np.float32), np.ones((2, 4, 2, 2)), np.ones((1, 4, 1, 1), np.float32)]:
        with pytest.raises((RuntimeError, ValueError)):
            m(bad)
    for k, v in m.state_dict().items():
        assert np.array_equal(v, before[k]), k


def test_concurrent_training_calls_are_all_counted(rng):
    m = bn.BatchNorm2d(8, momentum=None)
    x = batch(rng, (16, 8, 8, 8))
    calls = 25

    def work():
        for _ in range(calls):
            m(x)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert int(m.num_batches_tracked) == 4 * calls
    # Every call saw the same batch: the cumulative average is that batch's statistics.
    expected_var = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(m.running_var, expected_var, rtol=1e-5)


def test_attributes_and_repr():
    m = bn.BatchNorm3d(5, eps=1e-3, momentum=None)
    assert repr(m) == "BatchNorm3d(5, eps=0.001, momentum=None, affine=True, track_running_stats=True)"
    assert repr(bn.BatchNorm1d(2, dtype="float64")).endswith("dtype=float64)")
    assert m.weight.dtype == np.float32
    np.testing.assert_array_equal(m.weight, 1)
    np.testing.assert_array_equal(m.bias, 0)
    np.testing.assert_array_equal(m.running_var, 1)
    assert m.num_batches_tracked.dtype == np.int64
    assert m.num_batches_tracked.shape == ()
    off = bn.BatchNorm2d(5, affine=False, track_running_stats=False)
    assert off.weight is None
    assert off.running_mean is None
    assert off.num_batches_tracked is None
    assert bn.BatchNorm2d(2, dtype=torch.float64).dtype == np.float64
    m.weight = torch.full((5,), 2.0)
    np.testing.assert_array_equal(m.weight, 2)
    m.running_mean = np.ones(5)
    m.reset_parameters()
    np.testing.assert_array_equal(m.weight, 1)
    np.testing.assert_array_equal(m.running_mean, 0)
    assert m.forward is not None
    x = np.ones((2, 5, 1, 1, 2), np.float32)
    np.testing.assert_array_equal(m.forward(x), m.eval()(x))


def test_optimizer_steps_the_weight_and_bias_like_torch_sgd(rng):
    optimizers = pytest.importorskip("batchnorm.optimizers")
    m, t, shape = pair("2d")
    assert bn.BatchNorm2d(4, affine=False).trainable_parameters == {}
    opt = optimizers.SGD(learning_rate=0.1)
    topt = torch.optim.SGD(t.parameters(), lr=0.1)
    for _ in range(3):
        x = batch(rng, shape)
        dy = rng.normal(size=shape).astype(np.float32)
        t(torch.from_numpy(x)).backward(torch.from_numpy(dy))
        topt.step()
        topt.zero_grad()
        m(x)
        m.backward(dy)
        opt.step(m)
        assert_same_state(m, t, 1e-5)


# ---- SyncBatchNorm in one process (the MPI runs are in test_sync.py)


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 3), (3, 4, 2, 2), (2, 4, 2, 2, 2), (2, 4, 1, 2, 2, 2)])
def test_sync_without_peers_is_the_plain_layer(shape, rng):
    m = bn.SyncBatchNorm(4, momentum=None)
    t = torch.nn.SyncBatchNorm(4, momentum=None)
    for mode in ["train", "train", "eval"]:
        m.train(mode == "train")
        t.train(mode == "train")
        step_both(m, t, batch(rng, shape), rng.normal(size=shape).astype(np.float32), 2e-5)
        assert_same_state(m, t, 1e-6)


def test_sync_errors_as_torch():
    m = bn.SyncBatchNorm(3)
    t = torch.nn.SyncBatchNorm(3)
    for shape in [(3,), (2, 0, 3)]:
        x = np.ones(shape, np.float32)
        raises_like_torch(lambda x=x: m(x), lambda x=x: t(torch.from_numpy(x)))


def test_convert_sync_batchnorm(rng):
    plain = bn.BatchNorm2d(4, momentum=0.3)
    plain(batch(rng, (3, 4, 2, 2)))
    sync = bn.SyncBatchNorm.convert_sync_batchnorm(plain.eval())
    assert isinstance(sync, bn.SyncBatchNorm)
    assert not sync.training
    assert sync.momentum == 0.3
    for k, v in plain.state_dict().items():
        np.testing.assert_array_equal(sync.state_dict()[k], v)
    x = batch(rng, (3, 4, 2, 2))
    np.testing.assert_array_equal(sync(x), plain(x))
    with pytest.raises(TypeError):
        bn.SyncBatchNorm.convert_sync_batchnorm(object())  # type: ignore[arg-type]


def test_merge_moments_is_chan_et_al(rng):
    parts = [rng.normal(1e3, 1.0, (n, 3)) for n in (5, 0, 1, 17)]
    count, mean, m2 = np.zeros(3), np.zeros(3), np.zeros(3)
    for p in parts:
        pm = p.mean(axis=0) if len(p) else np.zeros(3)
        count, mean, m2 = _mpi.merge_moments((count, mean, m2), (np.full(3, len(p)), pm, ((p - pm) ** 2).sum(axis=0)))
    full = np.concatenate(parts)
    np.testing.assert_array_equal(count, len(full))
    np.testing.assert_allclose(mean, full.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(m2 / count, full.var(axis=0), rtol=1e-10)
    failed = _mpi.merge_moments((np.array([-1.0]), np.zeros(1), np.zeros(1)), (np.ones(1), np.ones(1), np.zeros(1)))
    assert failed[0][0] == -1
