"""Property tests (hypothesis): identities batch normalization must satisfy for any shape,
feature axes, layout and dtype."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm as bn
import reference as ref
from reference import ALL_DTYPES, F64, HALF_DTYPES

SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow])  # examples and deadline: conftest profiles


@st.composite
def problems(
    draw, dtypes=ALL_DTYPES, min_count=1, layouts=("c", "f", "transposed", "channels_last", "step", "negative")
):
    """(x, axis): random ndim 2..5, sizes 1..9, non-empty feature axes (not all axes
    when min_count > 1), dtype and memory layout; data with per-channel offsets."""
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim - 1, unique=True))
    count = int(np.prod([shape[d] for d in range(ndim) if d not in axes]))
    if count < min_count:
        shape = tuple(s if d in axes else max(s, min_count) for d, s in enumerate(shape))
    signed = [a - ndim if draw(st.booleans()) else a for a in axes]
    axis = signed[0] if len(signed) == 1 and draw(st.booleans()) else tuple(signed)
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    loc = draw(st.sampled_from([0.0, 3.0, -50.0]))
    x = ref.random_data(rng, shape, dtype, axis, loc=loc, scale=2.0)
    x = ref.make_layout(x, draw(st.sampled_from(layouts)))
    return x, axis, rng


def _red(x, axis):
    return ref.reduced_axes(axis, x.ndim)


def _rtol(dtype):
    return {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-5}.get(np.dtype(dtype), 2e-2)


@SETTINGS
@given(problems(min_count=2))
def test_normalized_output_has_zero_mean_and_shrunk_variance(problem):
    x, axis, _ = problem
    eps = 1e-3
    y, _ = bn.forward(x, axis=axis, epsilon=eps)
    yd = y.astype(np.float64)
    red = _red(x, axis)
    b = ref.bcast_shape(x.shape, axis)
    var = ref.moments_ref(x, axis)[1].reshape(b)
    tol = _rtol(x.dtype)
    # Per channel: mean(y) ~ 0 and var(y) ~ var / (var + eps).
    np.testing.assert_allclose(yd.mean(axis=red, keepdims=True), 0, atol=tol * 4)
    np.testing.assert_allclose(yd.var(axis=red, keepdims=True), var / (var + eps), rtol=tol * 4, atol=tol * 4)


@SETTINGS
@given(problems())
def test_forward_equals_normalize_with_its_moments(problem):
    x, axis, rng = problem
    kept = ref.kept_shape(x.shape, axis)
    gamma, beta = ref.random_params(rng, kept, x.dtype)
    act = "relu" if rng.random() < 0.5 else None
    y, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=1e-3, activation=act)
    mean, var = bn.moments(x, axis=axis)
    np.testing.assert_array_equal(stats.mean, mean)
    np.testing.assert_array_equal(stats.variance, var)
    yn = bn.normalize(x, mean, var, gamma, beta, axis=axis, epsilon=1e-3, activation=act)
    scale = float(np.max(np.abs(y.astype(np.float64)))) if y.size else 1.0
    if x.dtype in HALF_DTYPES:  # both round the same float32 value; it may differ in its last bit
        ref.assert_close16(yn, y.astype(np.float64), x.dtype, scale=scale, extra_rtol=1e-5)
    else:
        ref.assert_close(yn, y, rtol=_rtol(x.dtype) / 10, scale=scale)


@SETTINGS
@given(problems(dtypes=(np.float64, np.float32)), st.floats(0.1, 10), st.booleans(), st.floats(-100, 100))
def test_affine_equivariance(problem, s, negate, t):
    """forward(s*x + t, eps*s^2) == sign(s) * forward(x, eps) and
    forward(x, gamma, beta) == gamma * forward(x) + beta."""
    x, axis, rng = problem
    s = -s if negate else s
    eps = 1e-3
    xd = x.astype(np.float64)
    x2 = (s * xd + t).astype(x.dtype)
    y1, _ = bn.forward(x, axis=axis, epsilon=eps)
    y2, _ = bn.forward(x2, axis=axis, epsilon=eps * s * s)
    # The reference of the transformed (and re-rounded) data is the honest comparison for
    # float32; for float64 the identity itself holds to rounding.
    r2 = ref.forward_ref(x2, axis=axis, epsilon=eps * s * s).y
    ref.assert_output_close(y2, r2, x.dtype, atol=ref.mean_rounding_atol(x2, axis=axis, epsilon=eps * s * s))
    if x.dtype == F64:
        ref.assert_close(y2, np.sign(s) * y1, rtol=1e-9, name="equivariance")
    kept = ref.kept_shape(x.shape, axis)
    gamma, beta = ref.random_params(rng, kept, x.dtype)
    y3, _ = bn.forward(x, gamma, beta, axis=axis, epsilon=eps)
    b = ref.bcast_shape(x.shape, axis)
    ref.assert_close(y3, gamma.reshape(b) * y1.astype(np.float64) + beta.reshape(b), rtol=_rtol(x.dtype))


@SETTINGS
@given(problems(min_count=2))
def test_backward_dx_sums_to_zero_per_channel(problem):
    """With per-channel constant gamma and no activation, sum(dx) = 0 and dbeta = sum(dy)."""
    x, axis, rng = problem
    kept = ref.kept_shape(x.shape, axis)
    gamma = ref.random_params(rng, kept, x.dtype)[0]
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    _, stats = bn.forward(x, gamma, axis=axis)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, axis=axis)
    red = _red(x, axis)
    dxd = dx.astype(np.float64)
    sums = dxd.sum(axis=red)
    r = ref.forward_ref(x, axis=axis)
    dyd = dy.astype(np.float64)
    a = np.abs(gamma) * r.inv_std
    mag = np.abs(dxd).sum(axis=red) + a * np.abs(dyd).sum(axis=red)
    # What rounding the mean to the statistics dtype costs: count * |k2| * ulp(mean)/2,
    # k2 = -gamma * inv_std^2 * mean(dy * x_hat).
    b = ref.bcast_shape(x.shape, axis)
    k2 = a * r.inv_std * np.abs((dyd * r.x_hat).mean(axis=red, keepdims=True)).reshape(kept)
    half_ulp = 2.0**-53 if x.dtype == F64 else 2.0**-24
    cond = r.count * k2 * np.abs(r.mean) * half_ulp * 2
    tol = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6}.get(x.dtype, 1e-2)
    assert np.all(np.abs(sums) <= tol * mag + cond + 1e-30), (sums, mag, cond)
    np.testing.assert_allclose(dbeta, dy.astype(np.float64).sum(axis=red).reshape(kept), rtol=1e-6, atol=1e-5)
    assert b == ref.bcast_shape(x.shape, axis)
    # and dgamma = sum(dy * x_hat)
    want = (dyd * r.x_hat).sum(axis=red).reshape(kept)
    dg_atol = ref.backward_rounding_atol(dy, x, gamma, axis=axis)[1]
    np.testing.assert_allclose(dgamma, want, rtol=1e-5, atol=1e-5 * np.sqrt(r.count) * 4 + dg_atol)


@SETTINGS
@given(problems(min_count=2, dtypes=(np.float64,)))
def test_backward_dx_orthogonal_to_x_hat_without_epsilon(problem):
    """With epsilon = 0 the gradient is orthogonal to x_hat in each channel."""
    x, axis, rng = problem
    red = _red(x, axis)
    if np.any(x.var(axis=red) < 1e-6):
        return
    dy = rng.standard_normal(x.shape)
    _, stats = bn.forward(x, axis=axis, epsilon=0.0)
    dx, _, _ = bn.backward(dy, x, stats, axis=axis)
    x_hat = ref.forward_ref(x, axis=axis, epsilon=0.0).x_hat
    dots = (dx * x_hat).sum(axis=red)
    mag = (np.abs(dx) * np.abs(x_hat)).sum(axis=red) + np.abs(dy * x_hat).sum(axis=red) * stats.inv_std
    assert np.all(np.abs(dots) <= 1e-10 * mag)


@SETTINGS
@given(problems())
def test_layout_does_not_change_results(problem):
    """The same values in C order give the same statistics and outputs (to rounding of
    the summation order)."""
    x, axis, _ = problem
    xc = np.ascontiguousarray(x)
    m1, v1 = bn.moments(x, axis=axis)
    m2, v2 = bn.moments(xc, axis=axis)
    rmean = ref.moments_ref(x, axis)[0]
    rtol = 1e-12 if x.dtype == F64 else 1e-6
    scale = float(np.max(np.abs(rmean)) + np.sqrt(np.max(v2)))
    ref.assert_close(m1, m2, rtol=rtol, scale=scale)
    ref.assert_close(v1, v2, rtol=rtol)
    y1, _ = bn.forward(x, axis=axis)
    y2, _ = bn.forward(xc, axis=axis)
    if x.dtype in HALF_DTYPES:
        ref.assert_close16(y1, y2.astype(np.float64), x.dtype, extra_rtol=1e-5)
    else:
        ref.assert_close(y1, y2, rtol=10 * rtol)


@SETTINGS
@given(problems(), st.floats(-1e4, 1e4, allow_subnormal=False))
def test_constant_channels_have_exact_moments(problem, c):
    """A channel of equal values: mean exactly that value, variance exactly 0, y = beta."""
    x, axis, rng = problem
    const = np.full(x.shape, c).astype(x.dtype)
    mean, var = bn.moments(const, axis=axis)
    np.testing.assert_array_equal(mean, np.full(mean.shape, const.flat[0].astype(np.float64)))
    np.testing.assert_array_equal(var, 0)
    kept = ref.kept_shape(x.shape, axis)
    beta = ref.random_params(rng, kept, x.dtype)[1]
    y, _ = bn.forward(const, None, beta, axis=axis)
    b = ref.bcast_shape(x.shape, axis)
    np.testing.assert_array_equal(
        y.astype(np.float64), np.broadcast_to(beta.reshape(b), x.shape).astype(x.dtype).astype(np.float64)
    )


@SETTINGS
@given(problems(min_count=2))
def test_moments_ignore_the_order_of_the_batch(problem):
    x, axis, rng = problem
    red = _red(x, axis)
    perm_axis = red[0]
    shuffled = np.take(x, rng.permutation(x.shape[perm_axis]), axis=perm_axis)
    m1, v1 = bn.moments(x, axis=axis)
    m2, v2 = bn.moments(shuffled, axis=axis)
    rtol = 1e-12 if x.dtype == F64 else 1e-6
    scale = float(np.max(np.abs(m1)) + np.sqrt(np.max(v1)))
    ref.assert_close(m2, m1, rtol=rtol, scale=scale)
    ref.assert_close(v2, v1, rtol=rtol)


@SETTINGS
@given(problems())
def test_every_api_agrees_with_reference(problem):
    """The reference comparison of test_functional, on random problems (far-from-zero
    data included: allowances for the rounding of the stored mean are added)."""
    x, axis, rng = problem
    dtype = x.dtype
    kept = ref.kept_shape(x.shape, axis)
    gamma, beta = ref.random_params(rng, kept, dtype)
    relu = bool(rng.random() < 0.5)
    if relu and ref.relu_margin(x, gamma, beta, axis=axis) <= ref.relu_margin_needed(dtype):
        relu = False
    act = "relu" if relu else None
    y, stats = bn.forward(x, gamma, beta, axis=axis, activation=act)
    r = ref.forward_ref(x, gamma, beta, axis=axis, relu=relu)
    ref.assert_output_close(y, r.y, dtype, name="y", atol=ref.mean_rounding_atol(x, gamma, axis=axis))
    ref.assert_stats_close(stats.variance, r.var, dtype, name="variance")
    assert stats.count == r.count
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=axis, activation=act)
    rdx, rdg, rdb = ref.backward_ref(dy, x, gamma, beta, axis=axis, relu=relu)
    dx_atol, dg_atol = ref.backward_rounding_atol(dy, x, gamma, axis=axis)
    ref.assert_output_close(dx, rdx, dtype, name="dx", scale=ref.dx_scale(dy, x, gamma, axis=axis), atol=dx_atol)
    gs = float(np.abs(dy.astype(np.float64)).max()) * r.count
    rtol = 1e-12 if dtype == F64 else 1e-6
    ref.assert_close(dgamma, rdg, rtol=rtol, name="dgamma", scale=gs, atol=dg_atol)
    ref.assert_close(dbeta, rdb, rtol=rtol, name="dbeta", scale=gs)
