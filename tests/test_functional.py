"""moments / normalize / forward / backward against the float64 reference (tests/reference.py)
over shapes, feature axes, memory layouts and dtypes, and the output rules of SPEC §3."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from reference import ALL_DTYPES, BF16, F16, F32, F64

# (shape, axis): ndim 2..5, sizes 1, odd sizes, channel counts not multiples of 16, more
# channels than a kernel block (512) in a row, runs longer than a block, and an array big
# enough to be split between threads.
CASES = [
    ((5, 3), -1),
    ((5, 3), 0),
    ((1, 17), 1),
    ((17, 1), -1),
    ((1, 1), 0),
    ((257, 33), -1),
    ((33, 257), 0),
    ((9, 1030), 1),
    ((4, 3, 17), 1),
    ((4, 3, 17), (0, 2)),
    ((3, 5, 1100), 1),
    ((2, 33, 5, 7), 1),
    ((2, 33, 5, 7), (1, 3)),
    ((2, 33, 5, 7), (-1, -2)),
    ((6, 3, 4, 5), (0,)),
    ((2, 1, 1, 3), 1),
    ((3, 2, 5, 4, 3), 1),
    ((3, 2, 5, 4, 3), -1),
    ((3, 2, 5, 4, 3), (1, 4)),
    ((8, 19, 33, 31), 1),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in CASES]
LAYOUTS = ["c", "f", "transposed", "channels_last", "step", "negative"]
DTYPES = list(ALL_DTYPES)
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]

case = pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
layout = pytest.mark.parametrize("layout", LAYOUTS)
dtype = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)


def _data(rng, shape, dtype, axis, layout="c"):
    return ref.make_layout(ref.random_data(rng, shape, dtype, axis), layout)


def _params(rng, shape, axis, dtype):
    return ref.random_params(rng, ref.kept_shape(shape, axis), dtype)


# ---- moments ----------------------------------------------------------------------------


@case
@layout
@dtype
def test_moments(shape, axis, layout, dtype, rng):
    x = _data(rng, shape, dtype, axis, layout)
    mean, var = bn.moments(x, axis=axis)
    rmean, rvar = ref.moments_ref(x, axis)
    kept = ref.kept_shape(shape, axis)
    assert mean.shape == kept
    assert var.shape == kept
    ref.assert_stats_close(mean, rmean, dtype, name="mean", scale=float(np.max(np.abs(rmean)) + np.max(rvar) ** 0.5))
    ref.assert_stats_close(var, rvar, dtype, name="variance")


# ---- forward ----------------------------------------------------------------------------


@case
@layout
@dtype
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_forward(shape, axis, layout, dtype, affine, rng):
    x = _data(rng, shape, dtype, axis, layout)
    gamma, beta = _params(rng, shape, axis, dtype) if affine else (None, None)
    eps = 1e-3
    y, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=eps)
    r = ref.forward_ref(x, gamma, beta, axis=axis, epsilon=eps)
    assert isinstance(stats, bn.BatchStats)
    assert y.shape == x.shape
    assert type(stats.count) is int
    assert stats.count == r.count
    for name in ("mean", "variance", "inv_std"):
        assert getattr(stats, name).shape == ref.kept_shape(shape, axis), name
    ref.assert_stats_close(stats.mean, r.mean, dtype, name="mean", scale=float(np.max(np.abs(r.mean)) + 1))
    ref.assert_stats_close(stats.variance, r.var, dtype, name="variance")
    ref.assert_stats_close(stats.inv_std, r.inv_std, dtype, name="inv_std")
    ref.assert_output_close(y, r.y, dtype, name="y")


@pytest.mark.parametrize(
    ("shape", "axis"), [((7, 3), -1), ((4, 33, 5), 1), ((2, 5, 3, 17), (1, 3)), ((9, 1030), 1)], ids=str
)
@pytest.mark.parametrize("layout", ["c", "channels_last", "negative"])
@dtype
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_forward_relu(shape, axis, layout, dtype, affine, rng):
    x = _data(rng, shape, dtype, axis, layout)
    gamma, beta = _params(rng, shape, axis, dtype) if affine else (None, None)
    y, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=1e-4, activation="relu")
    r = ref.forward_ref(x, gamma, beta, axis=axis, epsilon=1e-4, relu=True)
    ref.assert_output_close(y, r.y, dtype, name="y")
    assert (y.astype(np.float64) >= 0).all()
    ref.assert_stats_close(stats.variance, r.var, dtype, name="variance")


# ---- normalize --------------------------------------------------------------------------


@case
@pytest.mark.parametrize("layout", ["c", "f", "channels_last", "step", "negative"])
@dtype
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_normalize(shape, axis, layout, dtype, relu, rng):
    x = _data(rng, shape, dtype, axis, layout)
    kept = ref.kept_shape(shape, axis)
    sd = ref.stat_dtype(dtype)
    rmean, rvar = ref.moments_ref(x, axis)
    # Statistics other than the batch's own (as moving averages would be).
    mean = (rmean + 0.3 * rng.standard_normal(kept)).astype(sd)
    var = (rvar * (0.5 + rng.random(kept)) + 0.1).astype(sd)
    gamma, beta = _params(rng, shape, axis, dtype)
    eps = 1e-2
    y = bn.normalize(x, mean, var, gamma, beta, axis=axis, epsilon=eps, activation="relu" if relu else None)
    want = ref.normalize_ref(x, mean, var, gamma, beta, axis=axis, epsilon=eps, relu=relu)
    assert y.shape == x.shape
    ref.assert_output_close(y, want, dtype, name="y")


@pytest.mark.parametrize("axis", [0, -1])
@dtype
def test_normalize_1d(axis, dtype, rng):
    x = (3 + rng.standard_normal(37)).astype(dtype)
    sd = ref.stat_dtype(dtype)
    mean = rng.standard_normal(37).astype(sd)
    var = (0.5 + rng.random(37)).astype(sd)
    gamma, beta = ref.random_params(rng, (37,), dtype)
    y = bn.normalize(x, mean, var, gamma, beta, axis=axis, epsilon=1e-3)
    assert y.shape == (37,)
    want = (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + 1e-3) * gamma + beta
    ref.assert_output_close(y, want, dtype, name="y")
    y0 = bn.normalize(x, mean, var, axis=axis)
    ref.assert_output_close(y0, (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + 1e-3), dtype)


def test_normalize_1d_default_arguments_match_formula():
    x = np.array([1.0, 2.0, 4.0])
    y = bn.normalize(x, [0.0, 1.0, 2.0], [1.0, 4.0, 0.0])
    np.testing.assert_allclose(y, [1 / np.sqrt(1.001), 1 / np.sqrt(4.001), 2 / np.sqrt(0.001)], rtol=1e-14)


# ---- backward ---------------------------------------------------------------------------


@case
@layout
@dtype
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_backward(shape, axis, layout, dtype, relu, rng):
    eps = 1e-3
    affine = rng.random() < 0.7

    def make(_):
        x = _data(rng, shape, dtype, axis, layout)
        gamma, beta = _params(rng, shape, axis, dtype) if affine else (None, None)
        return x, gamma, beta

    x, gamma, beta = ref.relu_safe(make, dtype, axis=axis, epsilon=eps) if relu else make(0)
    act = "relu" if relu else None
    # dy in another layout than x half of the time (a general strided plan).
    dy_layout = layout if rng.random() < 0.5 else "c"
    dy = ref.make_layout(rng.standard_normal(shape).astype(dtype), dy_layout)
    _, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=eps, activation=act)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=axis, activation=act)
    rdx, rdg, rdb = ref.backward_ref(dy, x, gamma, beta, axis=axis, epsilon=eps, relu=relu)
    kept = ref.kept_shape(shape, axis)
    assert dx.shape == x.shape
    assert dgamma.shape == kept
    assert dbeta.shape == kept
    scale = ref.dx_scale(dy, x, gamma, axis=axis, epsilon=eps)
    ref.assert_output_close(dx, rdx, dtype, name="dx", scale=scale)
    # dgamma/dbeta: sums of many terms, rounded once to the stats dtype; their error is
    # relative to the sum of magnitudes.
    count = ref.forward_ref(x, axis=axis).count
    gscale = float(np.max(np.abs(ref.f64(dy)))) * count**0.5 * 3
    rtol = 1e-12 if dtype == F64 else 1e-6
    ref.assert_stats_close(dgamma, rdg, dtype, name="dgamma", rtol=rtol, scale=gscale)
    ref.assert_stats_close(dbeta, rdb, dtype, name="dbeta", rtol=rtol, scale=gscale)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_backward_mixed_layouts(dtype, rng):
    """x, dy and out each in their own memory order."""
    shape, axis = (6, 19, 5, 3), 1
    x = ref.make_layout(ref.random_data(rng, shape, dtype, axis), "channels_last")
    dy = ref.make_layout(rng.standard_normal(shape).astype(dtype), "f")
    out = ref.make_layout(np.zeros(shape, dtype), "negative")
    gamma, beta = _params(rng, shape, axis, dtype)
    _, stats = bn.forward(x, gamma, beta, axis=axis)
    dx, _, _ = bn.backward(dy, x, stats, gamma, beta, axis=axis, out=out)
    assert dx is out
    rdx, _, _ = ref.backward_ref(dy, x, gamma, beta, axis=axis)
    ref.assert_output_close(dx, rdx, dtype, name="dx")
    # in place into a dy whose layout differs from x's
    dx, _, _ = bn.backward(dy, x, stats, gamma, beta, axis=axis, out=dy)
    assert dx is dy
    ref.assert_output_close(dy, rdx, dtype, name="dx in dy")


# ---- dtypes and shapes of the outputs (SPEC §3) ------------------------------------------


@dtype
@pytest.mark.parametrize(
    ("shape", "axis", "kept"),
    [
        ((4, 5), -1, (5,)),
        ((4, 5, 6), 1, (5,)),
        ((2, 3, 4, 5), (3, 1), (3, 5)),
        ((2, 3, 4, 5), (-1, -2), (4, 5)),
        ((2, 3, 4, 5), (0,), (2,)),
        ((2, 3, 4, 5, 6), (4, 0, 2), (2, 4, 6)),
    ],
    ids=str,
)
def test_output_dtypes_and_shapes(dtype, shape, axis, kept, rng):
    x = ref.random_data(rng, shape, dtype, axis)
    sd = F64 if dtype == F64 else F32
    mean, var = bn.moments(x, axis=axis)
    y, stats = bn.forward(x, axis=axis)
    yn = bn.normalize(x, mean, var, axis=axis)
    dx, dgamma, dbeta = bn.backward(x, x, stats, axis=axis)
    for a in (mean, var, stats.mean, stats.variance, stats.inv_std, dgamma, dbeta):
        assert isinstance(a, np.ndarray)
        assert a.dtype == sd
        assert a.shape == kept
    for a in (y, yn, dx):
        assert a.dtype == dtype
        assert a.shape == shape
    assert type(stats.count) is int
    assert stats.count == x.size // int(np.prod(kept))
    # The kept axes are sorted: channel [i, j] is x's (sorted axis 0 index i, ...).
    r = ref.moments_ref(x, axis)
    ref.assert_stats_close(mean, r[0], dtype, scale=float(np.max(np.abs(r[0])) + 1))


def test_batchstats_is_a_namedtuple_of_the_documented_fields(rng):
    x = rng.standard_normal((6, 4))
    _, stats = bn.forward(x)
    mean, variance, inv_std, count = stats
    assert stats._fields == ("mean", "variance", "inv_std", "count")
    assert mean is stats.mean
    assert variance is stats.variance
    assert inv_std is stats.inv_std
    assert count == 6
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(variance + 1e-3), rtol=1e-14)


@dtype
def test_per_channel_inputs_accept_any_shape_with_c_elements(dtype, rng):
    shape, axis = (3, 4, 5, 6), (1, 3)
    x = ref.random_data(rng, shape, dtype, axis)
    gamma, beta = _params(rng, shape, axis, dtype)  # (4, 6)
    y_flat, st = bn.forward(x, gamma.ravel(), beta.ravel(), axis=axis)
    y_kd, _ = bn.forward(x, gamma.reshape(1, 4, 1, 6), beta.reshape(1, 4, 1, 6), axis=axis)
    y_list, _ = bn.forward(x, gamma.ravel().tolist(), beta.ravel().tolist(), axis=axis)
    y_64, _ = bn.forward(x, gamma.astype(np.float64), beta.astype(np.float64), axis=axis)
    bits = f"u{x.itemsize}"
    for other in (y_kd, y_list):
        np.testing.assert_array_equal(other.view(bits), y_flat.view(bits))
    if dtype == F64:
        np.testing.assert_array_equal(y_64, y_flat)
    r = ref.forward_ref(x, gamma, beta, axis=axis)
    ref.assert_output_close(y_flat, r.y, dtype)
    # moments -> keepdims -> normalize; backward with keepdims stats and gamma.
    mean, var = bn.moments(x, axis=axis)
    yn = bn.normalize(x, mean.reshape(1, 4, 1, 6), var.reshape(1, 4, 1, 6), gamma.reshape(1, 4, 1, 6), beta, axis=axis)
    ref.assert_output_close(yn, r.y, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    kd = bn.BatchStats(st.mean.reshape(1, 4, 1, 6), st.variance, st.inv_std.reshape(1, 4, 1, 6), st.count)
    dx1, dg1, db1 = bn.backward(dy, x, st, gamma, beta, axis=axis)
    dx2, dg2, db2 = bn.backward(dy, x, kd, gamma.reshape(4, 1, 6), beta, axis=axis)
    np.testing.assert_array_equal(dx1.view(bits), dx2.view(bits))
    np.testing.assert_array_equal(dg1, dg2)
    np.testing.assert_array_equal(db1, db2)
    assert dg2.shape == (4, 6)


@dtype
def test_gamma_beta_none_means_one_and_zero(dtype, rng):
    shape, axis = (16, 5, 7), 1
    x = ref.random_data(rng, shape, dtype, axis)
    sd = ref.stat_dtype(dtype)
    ones, zeros = np.ones(5, sd), np.zeros(5, sd)
    y0, _ = bn.forward(x, axis=axis)
    y1, _ = bn.forward(x, ones, zeros, axis=axis)
    bits = f"u{x.itemsize}"
    np.testing.assert_array_equal(y0.view(bits), y1.view(bits))
    ref.assert_output_close(y0, ref.forward_ref(x, axis=axis).y, dtype)
    yg, _ = bn.forward(x, ones * 2, None, axis=axis)
    ref.assert_output_close(yg, ref.forward_ref(x, ones * 2, axis=axis).y, dtype)
    yb, _ = bn.forward(x, None, zeros + 1, axis=axis)
    ref.assert_output_close(yb, ref.forward_ref(x, None, zeros + 1, axis=axis).y, dtype)
    mean, var = bn.moments(x, axis=axis)
    yn = bn.normalize(x, mean, var, axis=axis)
    ref.assert_output_close(yn, ref.normalize_ref(x, mean, var, axis=axis), dtype)


@dtype
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_dgamma_dbeta_returned_without_gamma_beta(dtype, relu, rng):
    shape, axis = (40, 6), -1
    act = "relu" if relu else None
    x, _, _ = ref.relu_safe(lambda _: (ref.random_data(rng, shape, dtype, axis), None, None), dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    _, stats = bn.forward(x, axis=axis, activation=act)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, axis=axis, activation=act)
    rdx, rdg, rdb = ref.backward_ref(dy, x, axis=axis, relu=relu)
    assert dgamma.shape == (6,)
    assert dbeta.shape == (6,)
    ref.assert_stats_close(dgamma, rdg, dtype, rtol=1e-6 if dtype != F64 else 1e-12, scale=10.0)
    ref.assert_stats_close(dbeta, rdb, dtype, rtol=1e-6 if dtype != F64 else 1e-12, scale=10.0)
    ref.assert_output_close(dx, rdx, dtype, scale=ref.dx_scale(dy, x, axis=axis))


@dtype
def test_relu_backward_uses_beta_and_gamma_sign(dtype, rng):
    """The mask is gamma*x_hat + beta > 0: beta shifts it and a negative gamma flips it."""
    shape, axis = (64, 4), -1
    sd = ref.stat_dtype(dtype)
    gamma = np.array([1.0, -1.0, 2.0, -0.5], sd)
    beta = np.array([0.5, 0.25, -1.0, 0.0], sd)
    x, _, _ = ref.relu_safe(lambda _: (ref.random_data(rng, shape, dtype, axis), gamma, beta), dtype)
    dy = np.ones(shape, dtype)
    _, stats = bn.forward(x, gamma, beta, activation="relu")
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, activation="relu")
    r = ref.forward_ref(x, gamma, beta, relu=True)
    np.testing.assert_array_equal(dbeta, (r.pre > 0).sum(axis=0))
    rdx, rdg, _ = ref.backward_ref(dy, x, gamma, beta, relu=True)
    ref.assert_output_close(dx, rdx, dtype, scale=ref.dx_scale(dy, x, gamma))
    ref.assert_stats_close(dgamma, rdg, dtype, scale=64.0)


def kink_data(rng, dtype, n=4096, channels=8):
    """Values whose pre-activation (gamma = beta = 1, epsilon = 0) lies within a few ulps
    of zero for about a quarter of them: x = -(1 + d) and 1 + d, |d| <= 1e-6."""
    d = rng.uniform(-1e-6, 1e-6, size=(n // 2, channels))
    return np.concatenate([-(1 + d), 1 + d[::-1]]).astype(dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["rows", "runs", "strided"])
def test_relu_mask_of_backward_is_the_forwards(dtype, layout, rng):
    """backward rebuilds the ReLU mask bit for bit: with dy = 1, dbeta counts y > 0 exactly,
    even where the pre-activation is a rounding error away from zero."""
    x = kink_data(rng, dtype)
    axis = -1
    if layout == "runs":  # channels-first: each channel contiguous
        x, axis = np.ascontiguousarray(x.T), 0
    elif layout == "strided":
        x = ref.make_layout(x, "step")
    ones = np.ones(x.shape[axis], ref.stat_dtype(dtype))
    y, stats = bn.forward(x, ones, ones, axis=axis, epsilon=0.0, activation="relu")
    near = (y > 0) & (y < 1e-4)
    assert near.sum() > 100  # the test does probe the kink
    _, _, dbeta = bn.backward(np.ones_like(x), x, stats, ones, ones, axis=axis, activation="relu")
    np.testing.assert_array_equal(dbeta, (y > 0).sum(axis=1 - (axis % 2)))


# ---- out= and in place ------------------------------------------------------------------

INPLACE_LAYOUTS = ["c", "channels_last", "negative", "transposed"]


@dtype
@pytest.mark.parametrize("layout", INPLACE_LAYOUTS)
def test_normalize_out_and_in_place(dtype, layout, rng):
    shape, axis = (5, 7, 4, 3), 1
    x = _data(rng, shape, dtype, axis, layout)
    x0 = x.copy()
    sd = ref.stat_dtype(dtype)
    mean = rng.standard_normal(7).astype(sd)
    var = (1 + rng.random(7)).astype(sd)
    gamma, beta = _params(rng, shape, axis, dtype)
    want = ref.normalize_ref(x0, mean, var, gamma, beta, axis=axis, relu=True)
    out = np.full(shape, 7, dtype)
    y = bn.normalize(x, mean, var, gamma, beta, axis=axis, activation="relu", out=out)
    assert y is out
    ref.assert_output_close(out, want, dtype)
    np.testing.assert_array_equal(x.view(f"u{x.itemsize}"), x0.view(f"u{x.itemsize}"))  # x untouched
    y = bn.normalize(x, mean, var, gamma, beta, axis=axis, activation="relu", out=x)
    assert y is x
    ref.assert_output_close(x, want, dtype)
    np.testing.assert_array_equal(x.view(f"u{x.itemsize}"), out.view(f"u{x.itemsize}"))


@dtype
@pytest.mark.parametrize("layout", INPLACE_LAYOUTS)
@pytest.mark.parametrize("shape", [(6, 7, 4, 3), (2, 9, 64, 64)], ids=["small", "threaded"])
def test_forward_out_and_in_place(dtype, layout, shape, rng):
    axis = 1
    x = _data(rng, shape, dtype, axis, layout)
    x0 = x.copy()
    gamma, beta = _params(rng, shape, axis, dtype)
    r = ref.forward_ref(x0, gamma, beta, axis=axis)
    out = ref.make_layout(np.zeros(shape, dtype), "f")  # out need not share x's layout
    y, st_out = bn.forward(x, gamma, beta, axis=axis, out=out)
    assert y is out
    ref.assert_output_close(out, r.y, dtype)
    y, st_in = bn.forward(x, gamma, beta, axis=axis, out=x)
    assert y is x
    ref.assert_output_close(x, r.y, dtype)
    # Statistics are those of the input, not of the overwritten values. (Not necessarily
    # bitwise those of the out= call: out's layout may change the summation order.)
    for st in (st_out, st_in):
        ref.assert_stats_close(st.mean, r.mean, dtype, scale=5.0)
        ref.assert_stats_close(st.variance, r.var, dtype)
        ref.assert_stats_close(st.inv_std, r.inv_std, dtype)


@dtype
@pytest.mark.parametrize("layout", INPLACE_LAYOUTS)
@pytest.mark.parametrize("target", ["out", "dy", "x"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_backward_out_and_in_place(dtype, layout, target, relu, rng):
    shape, axis = (6, 5, 4, 9), 1
    act = "relu" if relu else None

    def make(_):
        x = _data(rng, shape, dtype, axis, layout)
        return (x, *_params(rng, shape, axis, dtype))

    x, gamma, beta = ref.relu_safe(make, dtype, axis=axis) if relu else make(0)
    dy = ref.make_layout(rng.standard_normal(shape).astype(dtype), layout)
    _, stats = bn.forward(x, gamma, beta, axis=axis, activation=act)
    rdx, rdg, rdb = ref.backward_ref(dy, x, gamma, beta, axis=axis, relu=relu)
    x0, dy0 = x.copy(), dy.copy()
    out = {"out": np.empty(shape, dtype), "dy": dy, "x": x}[target]
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=axis, activation=act, out=out)
    assert dx is out
    ref.assert_output_close(dx, rdx, dtype, scale=ref.dx_scale(dy0, x0, gamma, axis=axis))
    ref.assert_stats_close(dgamma, rdg, dtype, scale=50.0)
    ref.assert_stats_close(dbeta, rdb, dtype, scale=50.0)
    bits = f"u{x.itemsize}"
    if target != "x":
        np.testing.assert_array_equal(x.view(bits), x0.view(bits))
    if target != "dy":
        np.testing.assert_array_equal(dy.view(bits), dy0.view(bits))


# ---- special inputs ----------------------------------------------------------------------


@dtype
def test_moments_of_broadcast_zero_stride_inputs(dtype, rng):
    row = (rng.standard_normal(5) * 3).astype(dtype)
    x = np.broadcast_to(row, (11, 5))  # stride 0 along the batch axis
    assert x.strides[0] == 0
    mean, var = bn.moments(x, axis=-1)
    np.testing.assert_array_equal(mean, row.astype(mean.dtype))
    np.testing.assert_array_equal(var, np.zeros(5))

    col = (2 + rng.standard_normal(13)).astype(dtype)
    x = np.broadcast_to(col[:, None], (13, 6))  # stride 0 along the channel axis
    mean, var = bn.moments(x, axis=1)
    rmean, rvar = ref.moments_ref(x, 1)
    ref.assert_stats_close(mean, rmean, dtype, scale=3.0)
    ref.assert_stats_close(var, rvar, dtype)
    assert np.all(mean == mean[0])
    assert np.all(var == var[0])

    x4 = np.broadcast_to((2 + rng.standard_normal((1, 3, 1, 7))).astype(dtype), (4, 3, 5, 7))
    for axis in (1, (1, 3), 0):
        mean, var = bn.moments(x4, axis=axis)
        rmean, rvar = ref.moments_ref(x4, axis)
        ref.assert_stats_close(mean, rmean, dtype, scale=5.0)
        ref.assert_stats_close(var, rvar, dtype, scale=5.0)


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=["f32", "f64", "f16"])
def test_forward_backward_of_broadcast_inputs(dtype, rng):
    """Read-only zero-stride x and dy are fine as inputs (dy = ones: the gradient of sum(y))."""
    x = np.broadcast_to((rng.standard_normal((9, 1)) * 2).astype(dtype), (9, 4))
    y, stats = bn.forward(x, axis=-1)
    r = ref.forward_ref(x, axis=-1)
    ref.assert_output_close(y, r.y, dtype)
    dy = np.broadcast_to(np.ones((), dtype), (9, 4))
    dx, dgamma, dbeta = bn.backward(dy, x, stats, axis=-1)
    rdx, rdg, _ = ref.backward_ref(dy, x, axis=-1)
    ref.assert_output_close(dx, rdx, dtype, scale=ref.dx_scale(dy, x))
    np.testing.assert_array_equal(dbeta, np.full(4, 9.0))
    ref.assert_stats_close(dgamma, rdg, dtype, scale=9.0)


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=["f32", "f64", "f16"])
def test_torch_channels_last_view(dtype, rng):
    torch = pytest.importorskip("torch")
    shape = (3, 21, 6, 5)
    t = torch.from_numpy(ref.random_data(rng, shape, dtype, 1)).contiguous(memory_format=torch.channels_last)
    x = t.numpy()
    assert x.shape == shape
    assert x.strides == tuple(x.itemsize * s for s in (21 * 6 * 5, 1, 5 * 21, 21))  # NHWC in memory
    gamma, beta = _params(rng, shape, 1, dtype)
    dy = torch.randn(shape, dtype=t.dtype).contiguous(memory_format=torch.channels_last).numpy()
    mean, var = bn.moments(x, axis=1)
    y, stats = bn.forward(x, gamma, beta, axis=1, epsilon=1e-5)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=1)
    r = ref.forward_ref(x, gamma, beta, axis=1, epsilon=1e-5)
    rdx, rdg, rdb = ref.backward_ref(dy, x, gamma, beta, axis=1, epsilon=1e-5)
    ref.assert_stats_close(mean, r.mean, dtype, scale=5.0)
    ref.assert_stats_close(var, r.var, dtype)
    ref.assert_output_close(y, r.y, dtype)
    ref.assert_output_close(dx, rdx, dtype, scale=ref.dx_scale(dy, x, gamma, axis=1, epsilon=1e-5))
    ref.assert_stats_close(dgamma, rdg, dtype, scale=100.0)
    ref.assert_stats_close(dbeta, rdb, dtype, scale=100.0)


def test_array_likes_and_axis_spellings(rng):
    x = rng.standard_normal((6, 3, 4))
    base = bn.moments(x, axis=(1,))
    for axis in (1, -2, np.int64(1), [1], (np.int32(-2),)):
        m, v = bn.moments(x, axis=axis)
        np.testing.assert_array_equal(m, base[0])
        np.testing.assert_array_equal(v, base[1])
    m, v = bn.moments(x.tolist(), axis=1)  # nested lists: float64
    assert m.dtype == F64
    np.testing.assert_allclose(m, base[0], rtol=1e-15)
    y, _ = bn.forward(x.tolist(), axis=1)
    ref.assert_output_close(y, ref.forward_ref(x, axis=1).y, F64)


def test_unaligned_and_non_element_strides(rng):
    """Float32 values at odd byte offsets (packed structured arrays, frombuffer): correct."""
    rec = np.zeros((50, 3), dtype=[("a", "<f4"), ("b", "<i2")])  # itemsize 6: field 'a' strides 18, 6
    rec["a"] = ref.random_data(rng, (50, 3), F32, -1)
    x = rec["a"]
    mean, var = bn.moments(x, axis=-1)
    rmean, rvar = ref.moments_ref(x, -1)
    ref.assert_stats_close(mean, rmean, F32, scale=5.0)
    ref.assert_stats_close(var, rvar, F32)
    buf = bytearray(1 + 4 * 60)
    xb = np.frombuffer(buf, dtype=np.float32, offset=1).reshape(20, 3)
    xb[...] = x[:20]
    y, _ = bn.forward(xb, axis=-1)
    ref.assert_output_close(y, ref.forward_ref(xb, axis=-1).y, F32)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_half_precision_rounds_to_nearest(dtype):
    """y of exactly representable inputs: the float32 result rounded to nearest (even)."""
    x = np.array([[-3.0], [-1.0], [1.0], [3.0]], dtype)  # mean 0, variance 5
    y, stats = bn.forward(x, epsilon=0.0)
    want = np.array([-3, -1, 1, 3], np.float64).reshape(4, 1) / np.sqrt(5.0)
    ref.assert_close16(y, want, dtype)
    assert stats.variance.dtype == F32
    assert stats.variance[0] == 5.0
    assert stats.mean[0] == 0.0
