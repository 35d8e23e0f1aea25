"""Misuse of the functional API (SPEC §6, §7): the stated exception type, with a message
that names the problem; never a crash or a silently wrong result."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from reference import BF16

X = np.arange(24, dtype=np.float32).reshape(4, 6)
X4 = np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5)


def _stats(x=X, axis=-1):
    return bn.forward(x, axis=axis)[1]


# Every entry point with a valid call for a given x (and axis), for parametrizing.
def _call_moments(x, axis=-1, **kw):
    return bn.moments(x, axis=axis, **kw)


def _call_normalize(x, axis=-1, **kw):
    try:  # one value per channel where the axis makes sense (it is checked first anyway)
        c = int(np.prod([np.shape(x)[a] for a in ref.canon_axes(axis, np.ndim(x))]))
    except Exception:
        c = 1
    return bn.normalize(x, np.zeros(c, np.float32), np.ones(c, np.float32), axis=axis, **kw)


def _call_forward(x, axis=-1, **kw):
    return bn.forward(x, axis=axis, **kw)


def _call_backward(x, axis=-1, **kw):
    # stats of a valid float32 array of x's shape (stats do not depend on x's dtype here)
    xs = np.asarray(x)
    good = np.ones(xs.shape, np.float32) if xs.ndim >= 2 else np.ones((2, 2), np.float32)
    try:
        stats = bn.forward(good, axis=axis)[1]
    except (ValueError, TypeError):
        stats = bn.forward(np.ones((2, 2), np.float32))[1]
    return bn.backward(x, x, stats, axis=axis, **kw)


ALL = [_call_moments, _call_normalize, _call_forward, _call_backward]
TRAINING = [_call_moments, _call_forward, _call_backward]
ids = ["moments", "normalize", "forward", "backward"]


# ---- ndim ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ALL, ids=ids)
def test_zero_dimensional_input(call):
    with pytest.raises(ValueError, match=r"(?i)dimension.*ndim 0|ndim 0"):
        call(np.float32(1.0), axis=-1)


@pytest.mark.parametrize("call", TRAINING, ids=ids[:1] + ids[2:])
def test_one_dimensional_input_needs_a_batch_axis(call):
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*ndim 1"):
        call(np.ones(5, np.float32), axis=0)


def test_normalize_accepts_1d_but_not_0d():
    assert bn.normalize(np.ones(3, np.float32), np.zeros(3), np.ones(3)).shape == (3,)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        bn.normalize(np.float32(1.0), np.zeros(1), np.ones(1))


# ---- axis ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ALL, ids=ids)
@pytest.mark.parametrize("axis", [2, -3, 100, (0, 2), (-3,)], ids=str)
def test_axis_out_of_range(call, axis):
    with pytest.raises(ValueError, match=r"axis -?\d+ is out of range for an array of ndim 2"):
        call(X, axis=axis)


@pytest.mark.parametrize("call", ALL, ids=ids)
@pytest.mark.parametrize("axis", [(1, 1), (1, -3), (0, 2, -4)], ids=str)
def test_repeated_axis(call, axis):
    with pytest.raises(ValueError, match="repeated"):
        call(X4, axis=axis)


@pytest.mark.parametrize("call", ALL, ids=ids)
@pytest.mark.parametrize("axis", [1.0, "1", None, (1.0,), (1, "2"), True, (True,), object()], ids=repr)
def test_axis_of_wrong_type(call, axis):
    with pytest.raises(TypeError, match="axis must be an int or a tuple of ints"):
        call(X4, axis=axis)


@pytest.mark.parametrize("call", ALL, ids=ids)
def test_no_feature_axis(call):
    with pytest.raises(ValueError, match="at least one feature axis"):
        call(X4, axis=())


# ---- per-channel arrays -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gamma", "beta"])
@pytest.mark.parametrize("size", [5, 7, 1, 0])
def test_forward_parameter_of_wrong_size(which, size):
    with pytest.raises(ValueError, match=rf"{which} has {size} elements; expected 6"):
        bn.forward(X, **{which: np.ones(size, np.float32)})


@pytest.mark.parametrize("which", ["mean", "variance", "gamma", "beta"])
def test_normalize_parameter_of_wrong_size(which):
    args = {"mean": np.zeros(6), "variance": np.ones(6), "gamma": np.ones(6), "beta": np.zeros(6)}
    args[which] = np.ones(4)
    with pytest.raises(ValueError, match=rf"{which} has 4 elements; expected 6"):
        bn.normalize(X, **args)


def test_normalize_per_channel_size_counts_every_feature_axis():
    # axis (1, 3) of (2, 3, 4, 5): 15 channels; a keepdims (1, 3, 1, 5) array is fine,
    # (3,) is not.
    bn.normalize(X4, np.zeros((1, 3, 1, 5)), np.ones((1, 3, 1, 5)), axis=(1, 3))
    with pytest.raises(ValueError, match="mean has 3 elements; expected 15"):
        bn.normalize(X4, np.zeros(3), np.ones(15), axis=(1, 3))


@pytest.mark.parametrize("which", ["gamma", "beta"])
def test_backward_parameter_of_wrong_size(which):
    with pytest.raises(ValueError, match=rf"{which} has 2 elements; expected 6"):
        bn.backward(X, X, _stats(), **{which: np.ones(2, np.float32)})


def test_backward_stats_of_another_shape():
    stats = bn.forward(np.ones((4, 5), np.float32))[1]
    with pytest.raises(ValueError, match=r"stats\.(mean|inv_std) has 5 elements; expected 6"):
        bn.backward(X, X, stats)


@pytest.mark.parametrize(
    "stats",
    [None, (np.zeros(6), np.ones(6), np.ones(6), 4), {"mean": np.zeros(6)}, "stats", np.zeros(6)],
    ids=["None", "tuple", "dict", "str", "array"],
)
def test_backward_stats_not_batchstats(stats):
    with pytest.raises(TypeError, match="stats must be the BatchStats"):
        bn.backward(X, X, stats)


# ---- dtypes -------------------------------------------------------------------------------

BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, ">f4", ">f8", ">f2", "U3"]
if np.dtype(np.longdouble).itemsize > 8:
    BAD_DTYPES.append(np.longdouble)


@pytest.mark.parametrize("call", ALL, ids=ids)
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).str)
def test_non_floating_or_foreign_dtypes(call, dtype):
    x = np.ones((4, 6)).astype(dtype)
    match = (
        "big-endian" if np.dtype(dtype).byteorder == ">" else "must be a float16, bfloat16, float32 or float64 array"
    )
    with pytest.raises(TypeError, match=match):
        call(x)


@pytest.mark.parametrize("call", ALL, ids=ids)
def test_object_arrays(call):
    x = np.empty((4, 6), dtype=object)
    x[...] = 1.0
    with pytest.raises(TypeError, match="dtype object"):
        call(x)


@pytest.mark.parametrize("dy_dtype", [np.float64, np.float16, BF16, np.int32], ids=str)
def test_dy_dtype_differs_from_x(dy_dtype):
    dy = np.ones(X.shape).astype(dy_dtype)
    with pytest.raises(TypeError, match="dtype"):
        bn.backward(dy, X, _stats())


@pytest.mark.parametrize("shape", [(4, 5), (6, 4), (4, 6, 1), (24,)], ids=str)
def test_dy_shape_differs_from_x(shape):
    dy = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=r"dy"):
        bn.backward(dy, X, _stats())


def test_dy_shape_message_names_both_shapes():
    with pytest.raises(ValueError, match=r"dy has shape \(4, 5\); expected \(4, 6\)"):
        bn.backward(np.ones((4, 5), np.float32), X, _stats())


# ---- empty batch -------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), [((0, 6), -1), ((0, 3, 4), 1), ((2, 0, 3), (0, 2)), ((3, 0), 0)], ids=str)
@pytest.mark.parametrize("call", [_call_moments, _call_forward], ids=["moments", "forward"])
def test_empty_batch(call, shape, axis):
    with pytest.raises(ValueError, match="empty batch"):
        call(np.ones(shape, np.float32), axis=axis)


def test_empty_batch_in_inference_is_fine():
    """Only statistics need values: normalize of an empty batch is an empty result."""
    x = np.ones((0, 3), np.float32)
    y = bn.normalize(x, np.zeros(3), np.ones(3))
    assert y.shape == (0, 3)
    assert y.dtype == np.float32


def test_zero_channels_are_fine():
    mean, var = bn.moments(np.ones((4, 0), np.float32), axis=-1)
    assert mean.shape == (0,)
    assert var.shape == (0,)
    y = bn.normalize(np.ones((4, 0), np.float32), np.zeros(0), np.ones(0))
    assert y.shape == (4, 0)
    y, stats = bn.forward(np.ones((4, 0), np.float32))
    assert y.shape == (4, 0)
    assert stats.mean.shape == (0,)
    assert stats.count == 4


def test_backward_of_empty_batch_gives_zero_parameter_gradients():
    x = np.ones((0, 3), np.float32)
    stats = bn.BatchStats(np.zeros(3, np.float32), np.ones(3, np.float32), np.ones(3, np.float32), 0)
    dx, dgamma, dbeta = bn.backward(x, x, stats)
    assert dx.shape == (0, 3)
    np.testing.assert_array_equal(dgamma, np.zeros(3))
    np.testing.assert_array_equal(dbeta, np.zeros(3))


# ---- out= ----------------------------------------------------------------------------------


def _run_with_out(fn, out, x=X):
    if fn == "normalize":
        return bn.normalize(x, np.zeros(6), np.ones(6), out=out)
    if fn == "forward":
        return bn.forward(x, out=out)
    return bn.backward(x, x, _stats(), out=out)


OUT_FNS = ["normalize", "forward", "backward"]


@pytest.mark.parametrize("fn", OUT_FNS)
def test_out_read_only(fn):
    out = np.empty_like(X)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _run_with_out(fn, out)
    with pytest.raises(ValueError, match="read-only"):
        _run_with_out(fn, np.broadcast_to(np.float32(0), X.shape))


@pytest.mark.parametrize("fn", OUT_FNS)
@pytest.mark.parametrize("shape", [(6, 4), (4, 5), (24,), (4, 6, 1)], ids=str)
def test_out_wrong_shape(fn, shape):
    with pytest.raises(ValueError, match=r"out has shape"):
        _run_with_out(fn, np.empty(shape, np.float32))


@pytest.mark.parametrize("fn", OUT_FNS)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, BF16, np.int32], ids=str)
def test_out_wrong_dtype(fn, dtype):
    with pytest.raises(TypeError, match=r"out has dtype"):
        _run_with_out(fn, np.empty(X.shape, dtype))


@pytest.mark.parametrize("fn", OUT_FNS)
@pytest.mark.parametrize("out", [[[0.0] * 6] * 4, "out", 1.0], ids=["list", "str", "float"])
def test_out_not_an_array(fn, out):
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        _run_with_out(fn, out)


@pytest.mark.parametrize("fn", OUT_FNS)
def test_out_partially_overlapping_x(fn):
    buf = np.arange(30, dtype=np.float32)
    x = buf[:24].reshape(4, 6)
    before = x.copy()
    for out in (buf[1:25].reshape(4, 6), buf[6:30].reshape(4, 6), x[::-1], x[:, ::-1]):
        with pytest.raises(ValueError, match="overlaps"):
            _run_with_out(fn, out, x)
    np.testing.assert_array_equal(x, before)  # nothing written


def test_backward_out_overlapping_dy():
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    buf = np.zeros(30, np.float32)
    dy = buf[:24].reshape(4, 6)
    with pytest.raises(ValueError, match="overlaps"):
        bn.backward(dy, x, bn.forward(x)[1], out=buf[3:27].reshape(4, 6))


@pytest.mark.parametrize("fn", OUT_FNS)
def test_out_with_zero_stride(fn):
    """A writeable out whose elements alias each other: refused, not a race."""
    base = np.zeros(6, np.float32)
    out = np.lib.stride_tricks.as_strided(base, shape=(4, 6), strides=(0, 4), writeable=True)
    with pytest.raises(ValueError, match=r"zero stride|overlap"):
        _run_with_out(fn, out)


# ---- epsilon, activation ------------------------------------------------------------------


def _call_with(fn, **kw):
    if fn == "normalize":
        return bn.normalize(X, np.zeros(6), np.ones(6), **kw)
    if fn == "forward":
        return bn.forward(X, **kw)
    return bn.backward(X, X, _stats(), **kw)


@pytest.mark.parametrize("fn", ["normalize", "forward"])
@pytest.mark.parametrize("eps", [-1e-3, -np.inf, np.inf, np.nan], ids=str)
def test_bad_epsilon(fn, eps):
    with pytest.raises(ValueError, match="epsilon"):
        _call_with(fn, epsilon=eps)


@pytest.mark.parametrize("fn", ["normalize", "forward"])
def test_epsilon_of_wrong_type(fn):
    with pytest.raises(TypeError, match="epsilon"):
        _call_with(fn, epsilon="0.1")


def test_zero_epsilon_is_allowed():
    y, _ = bn.forward(X, epsilon=0.0)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("fn", OUT_FNS)
@pytest.mark.parametrize("activation", ["tanh", "ReLU", "", 1, ["relu"]], ids=repr)
def test_bad_activation(fn, activation):
    with pytest.raises(ValueError, match=r"activation must be None or 'relu'"):
        _call_with(fn, activation=activation)


# ---- threads ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, -(2**31)])
def test_set_num_threads_below_one(n, restore_threads):
    with pytest.raises(ValueError, match=r"n >= 1"):
        bn.set_num_threads(n)
    assert bn.get_num_threads() == restore_threads


@pytest.mark.parametrize("n", [1.5, 2.0, "2", None, True, np.float64(2)], ids=repr)
def test_set_num_threads_wrong_type(n, restore_threads):
    with pytest.raises(TypeError, match="set_num_threads takes an int"):
        bn.set_num_threads(n)
    assert bn.get_num_threads() == restore_threads


# ---- a failed call changes nothing ---------------------------------------------------------


def test_failed_in_place_calls_leave_x_untouched():
    x = X.copy()
    with pytest.raises(ValueError, match="epsilon"):
        bn.forward(x, epsilon=-1.0, out=x)
    with pytest.raises(ValueError, match="gamma"):
        bn.forward(x, np.ones(2), out=x)
    with pytest.raises(ValueError, match="activation"):
        bn.normalize(x, np.zeros(6), np.ones(6), activation="gelu", out=x)
    np.testing.assert_array_equal(x, X)
