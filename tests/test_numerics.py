"""The numerical bars: stable variance far from zero, 16-bit inputs
without overflow, thread-count independence and bitwise reproducibility, and IEEE
propagation of NaN/Inf confined to their channel."""

from __future__ import annotations

import math

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from reference import BF16, F16, F32, F64

# ---- variance far from zero ------------------------------------------------------------

# (shape, axis, layout): channels-first, channels-last, a channels-last view of NCHW, and a
# strided case; some large enough to be split between threads.
FAR_CASES = [
    ((64, 8), -1, "c"),
    ((1000, 8), 0, "c"),
    ((4, 6, 50, 41), 1, "c"),
    ((4, 6, 50, 41), 1, "channels_last"),
    ((8, 16, 32, 32), 1, "c"),
    ((8, 16, 32, 32), 1, "channels_last"),
    ((30, 7, 9), (0, 2), "f"),
    ((3, 70000), 0, "c"),
]


def _far_data(rng, shape, axis, layout, ratio):
    """float32 data with mean/std = ratio in every channel (std 1e-3..1e3 per channel)."""
    b = ref.bcast_shape(shape, axis)
    std = 10.0 ** rng.uniform(-3, 3, size=b)
    sign = rng.choice([-1.0, 1.0], size=b)
    x = (sign * ratio * std + std * rng.standard_normal(shape)).astype(np.float32)
    return ref.make_layout(x, layout)


@pytest.mark.parametrize(("shape", "axis", "layout"), FAR_CASES, ids=str)
@pytest.mark.parametrize(("ratio", "bar"), [(1e4, 1e-5), (1e6, 2e-3)], ids=["1e4", "1e6"])
def test_float32_variance_far_from_zero(shape, axis, layout, ratio, bar, rng, restore_threads):
    x = _far_data(rng, shape, axis, layout, ratio)
    rmean, rvar = ref.moments_ref(x, axis)  # float64, from the same float32 values
    assert np.all(rvar > 0)
    for threads in (1, 2):
        bn.set_num_threads(threads)
        mean, var = bn.moments(x, axis=axis)
        _, stats = bn.forward(x, axis=axis, epsilon=0.0)
        for name, v in (("moments", var), ("forward", stats.variance)):
            rel = np.abs(v.astype(np.float64) - rvar) / rvar
            assert rel.max() <= bar, f"{name} variance relative error {rel.max():.3g} > {bar} ({threads} threads)"
        np.testing.assert_allclose(mean, rmean, rtol=1e-6)
        np.testing.assert_allclose(stats.inv_std, 1 / np.sqrt(rvar), rtol=max(bar, 1e-6))


def test_naive_formula_would_fail_the_variance_bar(rng):
    """The 1e4 case is a real test: E[x^2] - E[x]^2 in float32 misses it by far."""
    x = _far_data(rng, (4096, 4), -1, "c", 1e4)
    rvar = ref.moments_ref(x, -1)[1]
    naive = (x * x).mean(axis=0, dtype=np.float32) - x.mean(axis=0, dtype=np.float32) ** 2
    assert np.max(np.abs(naive - rvar) / rvar) > 1e-2
    var = bn.moments(x, axis=-1)[1]
    assert np.max(np.abs(var - rvar) / rvar) <= 1e-5


@pytest.mark.parametrize("layout", ["c", "channels_last"])
def test_float32_outputs_far_from_zero(layout, rng):
    """y and dx for mean/std = 1e4: within the error the float32 statistics imply
    (the mean, rounded to float32, is known to |mean| * 2**-24)."""
    shape, axis = (8, 5, 20, 20), 1
    x = _far_data(rng, shape, axis, layout, 1e4)
    gamma, beta = ref.random_params(rng, (5,), F32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=0.0)
    r = ref.forward_ref(x, gamma, beta, axis=axis, epsilon=0.0)
    ref.assert_close(y, r.y, rtol=1e-5, atol=ref.mean_rounding_atol(x, gamma, axis=axis, epsilon=0.0), name="y")
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=axis)
    rdx, rdg, rdb = ref.backward_ref(dy, x, gamma, beta, axis=axis, epsilon=0.0)
    dx_atol, dg_atol = ref.backward_rounding_atol(dy, x, gamma, axis=axis, epsilon=0.0)
    # The variance carries a relative error up to ~1e-5 here (the bar), so inv_std does too.
    ref.assert_close(dx, rdx, rtol=3e-5, scale=ref.dx_scale(dy, x, gamma, axis=axis, epsilon=0.0), atol=dx_atol)
    ref.assert_close(dgamma, rdg, rtol=3e-5, scale=float(np.abs(rdg).max()), atol=dg_atol)
    ref.assert_close(dbeta, rdb, rtol=1e-6, scale=float(np.abs(rdb).max()))


# ---- 16-bit inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), [((2048, 3), -1), ((4, 3, 33, 17), 1), ((40, 3), 0)], ids=str)
def test_float16_squares_overflowing_float16(shape, axis, rng):
    """float16 values of 300..60000: their squares (and sums) overflow float16 (65504)."""
    x = rng.uniform(300, 60000, size=shape).astype(np.float16)
    x.flat[::7] *= -1
    assert np.isfinite(x).all()
    mean, var = bn.moments(x, axis=axis)
    y, stats = bn.forward(x, axis=axis, epsilon=1e-3)
    r = ref.forward_ref(x, axis=axis, epsilon=1e-3)
    for a in (mean, var, stats.mean, stats.variance, stats.inv_std, y):
        assert np.isfinite(a.astype(np.float64)).all()
    assert var.dtype == F32
    np.testing.assert_allclose(mean, r.mean, rtol=1e-6, atol=1e-6 * float(np.sqrt(r.var.max())))
    np.testing.assert_allclose(var, r.var, rtol=1e-6)
    np.testing.assert_allclose(stats.inv_std, r.inv_std, rtol=1e-6)
    ref.assert_close16(y, r.y, F16)
    dy = rng.uniform(-1000, 1000, size=shape).astype(np.float16)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, axis=axis)
    rdx, rdg, rdb = ref.backward_ref(dy, x, axis=axis)
    assert np.isfinite(dx.astype(np.float64)).all()
    ref.assert_close16(dx, rdx, F16, scale=ref.dx_scale(dy, x, axis=axis))
    np.testing.assert_allclose(dbeta, rdb, rtol=1e-6, atol=1e-6 * np.abs(rdb).max())
    np.testing.assert_allclose(dgamma, rdg, rtol=1e-6, atol=1e-6 * np.abs(rdg).max())


def test_bfloat16_sums_of_squares_beyond_float32_range(rng):
    """bfloat16 data of magnitude ~1e18: the variance (~1e36) fits in float32, the sum of
    squares over 4096 values (~1e40) would not."""
    x = (rng.uniform(-3e18, 3e18, size=(4096, 2))).astype(BF16)
    mean, var = bn.moments(x, axis=-1)
    rmean, rvar = ref.moments_ref(x, -1)
    assert np.isfinite(var).all()
    np.testing.assert_allclose(var, rvar, rtol=1e-6)
    np.testing.assert_allclose(mean, rmean, rtol=1e-6, atol=1e-6 * np.sqrt(rvar.max()))
    y, _ = bn.forward(x, axis=-1, epsilon=0.0)
    ref.assert_close16(y, ref.forward_ref(x, axis=-1, epsilon=0.0).y, BF16)


# ---- threads -------------------------------------------------------------------------------

# >= 2**17 elements, so the kernels split them among threads: channels-first NCHW (runs
# longer than a piece, too), channels-last rows, a channels-last view of NCHW, and C = 1.
THREAD_CASES = [
    ((32, 16, 16, 16), 1, "c"),
    ((2, 3, 256, 256), 1, "c"),
    ((8, 1, 128, 128), 1, "c"),
    ((2048, 64), -1, "c"),
    ((32, 16, 16, 16), 1, "channels_last"),
    ((64, 33, 65), (0, 2), "f"),
]


def _run_all(x, gamma, beta, dy, axis):
    mean, var = bn.moments(x, axis=axis)
    y, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=1e-5, activation="relu")
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=axis, activation="relu")
    yn = bn.normalize(x, mean, var, gamma, beta, axis=axis, epsilon=1e-5)
    return {
        "mean": mean,
        "var": var,
        "y": y,
        "inv_std": stats.inv_std,
        "dx": dx,
        "dgamma": dgamma,
        "dbeta": dbeta,
        "normalize": yn,
    }


@pytest.mark.parametrize(("shape", "axis", "layout"), THREAD_CASES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_thread_count_changes_only_rounding(shape, axis, layout, dtype, rng, restore_threads):
    assert np.prod(shape) >= 2**17
    kept = ref.kept_shape(shape, axis)
    # An offset far from zero, so that summation order shows in the last bits.
    x = ref.make_layout(ref.random_data(rng, shape, dtype, axis, loc=100.0, scale=1.0), layout)
    gamma, beta = ref.random_params(rng, kept, dtype)
    dy = ref.make_layout(rng.standard_normal(shape).astype(dtype), layout)
    results = {}
    for n in (1, 2, 3):
        bn.set_num_threads(n)
        assert bn.get_num_threads() == n
        first = _run_all(x, gamma, beta, dy, axis)
        for _ in range(2):  # bitwise reproducible at a fixed thread count
            again = _run_all(x, gamma, beta, dy, axis)
            for k, v in first.items():
                assert v.tobytes() == again[k].tobytes(), f"{k} not reproducible with {n} threads"
        results[n] = first
    rtol = 1e-6 if dtype == F32 else 1e-12
    for n in (2, 3):
        for k, v in results[n].items():
            one = results[1][k].astype(np.float64)
            # y, dx: errors relative to the largest value of the array (they cancel near 0),
            # plus what a last-bit change of the float32 mean (~100) moves them by.
            if k in ("y", "dx", "normalize"):
                scale = float(np.abs(one).max())
                atol = ref.mean_rounding_atol(x, gamma, axis=axis) * (1 if k != "dx" else float(np.abs(dy).max()) * 10)
            else:
                scale, atol = float(np.abs(one).max()), 0.0
            ref.assert_close(v, one, rtol=rtol, scale=scale, atol=atol, name=f"{k}: {n} vs 1 threads")
    # and the results are right
    r = ref.forward_ref(x, gamma, beta, axis=axis, epsilon=1e-5)
    ref.assert_stats_close(results[3]["var"], r.var, dtype)


def test_threaded_results_match_reference(rng, restore_threads):
    """A big channels-last array split over 3 threads: right answer, not just consistent."""
    bn.set_num_threads(3)
    shape, axis = (4096, 48), -1
    x = ref.random_data(rng, shape, F32, axis)
    gamma, beta = ref.random_params(rng, (48,), F32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, stats = bn.forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=axis)
    r = ref.forward_ref(x, gamma, beta, axis=axis)
    rdx, rdg, rdb = ref.backward_ref(dy, x, gamma, beta, axis=axis)
    ref.assert_output_close(y, r.y, F32)
    ref.assert_stats_close(stats.variance, r.var, F32)
    ref.assert_output_close(dx, rdx, F32, scale=ref.dx_scale(dy, x, gamma, axis=axis))
    ref.assert_stats_close(dgamma, rdg, F32, scale=float(np.abs(rdg).max()))
    ref.assert_stats_close(dbeta, rdb, F32, scale=float(np.abs(rdb).max()))


# ---- NaN / Inf -----------------------------------------------------------------------------

NONFINITE_CASES = [
    ((6, 5), -1),  # channels-last rows
    ((4, 5, 7), 1),  # channels-first runs
    ((4, 5, 64, 64), 1),  # channels-first, threaded
    ((4096, 40), -1),  # channels-last, threaded
]


@pytest.mark.parametrize(("shape", "axis"), NONFINITE_CASES, ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["first", "middle"])
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=["f32", "f64", "f16", "bf16"])
def test_nonfinite_values_stay_in_their_channel(shape, axis, bad, where, dtype, rng, restore_threads):
    bn.set_num_threads(2)
    x = ref.random_data(rng, shape, dtype, axis)
    kept = ref.kept_shape(shape, axis)
    channel = 2
    chan_axis = ref.canon_axes(axis, len(shape))[0]
    # index of one value of channel 2: its first value in memory, or one in the middle
    idx = [0 if where == "first" else s // 2 for s in shape]
    idx[chan_axis] = channel
    x[tuple(idx)] = bad
    mean, var = bn.moments(x, axis=axis)
    y, stats = bn.forward(x, axis=axis)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, axis=axis)

    good = np.ones(kept, bool)
    good[channel] = False
    sel = [slice(None)] * len(shape)
    sel[chan_axis] = channel
    sel = tuple(sel)
    # The channel with the bad value: IEEE arithmetic (numpy's float64 mean gives +-inf
    # for one infinity, nan for nan; a variance involving inf - inf is nan).
    with np.errstate(invalid="ignore"):
        want_mean = np.mean(x[sel].astype(np.float64))
    assert np.isnan(var[channel])
    if np.isnan(want_mean):
        assert np.isnan(mean[channel])
        assert np.isnan(stats.mean[channel])
    else:
        assert mean[channel] == want_mean
        assert stats.mean[channel] == want_mean
    assert np.isnan(y[sel].astype(np.float64)).all()
    assert np.isnan(dx[sel].astype(np.float64)).all()
    assert np.isnan(dgamma[channel])
    # The other channels: finite and right.
    xg = np.delete(x.astype(np.float64), channel, axis=chan_axis)
    dyg = np.delete(dy.astype(np.float64), channel, axis=chan_axis)
    r = ref.forward_ref(xg, axis=axis)
    rdx, rdg, rdb = ref.backward_ref(dyg, xg, axis=axis)
    ref.assert_stats_close(var[good], r.var, dtype, name="variance")
    ref.assert_stats_close(mean[good], r.mean, dtype, name="mean", scale=10.0)
    ref.assert_output_close(np.delete(y, channel, axis=chan_axis), r.y, dtype, name="y")
    ref.assert_output_close(np.delete(dx, channel, axis=chan_axis), rdx, dtype, name="dx", scale=ref.dx_scale(dyg, xg))
    ref.assert_stats_close(dbeta[good], rdb, dtype, name="dbeta", scale=float(np.abs(rdb).max()))
    ref.assert_stats_close(dgamma[good], rdg, dtype, name="dgamma", scale=float(np.abs(rdg).max()))
    ref.assert_stats_close(dbeta[channel], dy[sel].astype(np.float64).sum(), dtype, scale=float(np.abs(rdb).max()))


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=["f32", "f64", "f16"])
def test_nonfinite_dy_stays_in_its_channel(dtype, rng):
    shape, axis = (5, 4, 9), 1
    x = ref.random_data(rng, shape, dtype, axis)
    dy = rng.standard_normal(shape).astype(dtype)
    dy[1, 3, 4] = np.nan
    _, stats = bn.forward(x, axis=axis)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, axis=axis)
    assert np.isnan(dx[:, 3].astype(np.float64)).all()
    assert np.isnan(dgamma[3])
    assert np.isnan(dbeta[3])
    assert np.isfinite(dx[:, :3].astype(np.float64)).all()
    rdx, _, _ = ref.backward_ref(dy[:, :3], x[:, :3], axis=axis)
    ref.assert_output_close(dx[:, :3], rdx, dtype, scale=ref.dx_scale(dy[:, :3], x[:, :3], axis=axis))


def test_nan_passes_through_normalize_and_relu():
    """normalize with NaN in x: NaN out (ReLU keeps NaN, as IEEE max and PyTorch do)."""
    x = np.array([[1.0, np.nan], [2.0, 3.0]], np.float32)
    y = bn.normalize(x, [0.0, 0.0], [1.0, 1.0], activation="relu", epsilon=0.0)
    np.testing.assert_array_equal(y[:, 0], [1.0, 2.0])
    assert y[1, 1] == 3.0
    assert np.isnan(y[0, 1])
    y = bn.normalize(x, [0.0, np.nan], [1.0, 1.0], epsilon=0.0)
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, 0]).all()


@pytest.mark.parametrize("layout", ["channels-last", "channels-first", "strided"])
def test_float64_first_value_far_from_the_mean(layout, restore_threads):
    """The shifted sums use a channel's first value as the shift; a first value 100 standard
    deviations from the mean would cost M2 about (100)^2 ulps of the sums' rounding. Such a
    channel is summed again around its mean: the variance is as exact as float64 allows."""
    rng = np.random.default_rng(7)
    x = rng.normal(100.0, 1.0, (60000, 3))
    x[0] = 0.0  # the first value of every channel, 100 standard deviations out
    axis = 1
    if layout == "channels-first":
        x, axis = np.ascontiguousarray(x.T).reshape(3, 200, 300).transpose(1, 0, 2), 1
    elif layout == "strided":
        big = np.zeros((60000, 3, 2))
        big[..., 0] = x
        x = big[..., 0]
    channels = np.moveaxis(x, axis, -1).reshape(-1, 3).T
    exact = [math.fsum((c - math.fsum(c) / c.size) ** 2) / c.size for c in channels]  # two exact sums
    for threads in (1, 2):
        bn.set_num_threads(threads)
        np.testing.assert_allclose(bn.moments(x, axis)[1], exact, rtol=1e-13)
