"""Finite data near the largest float: the statistics are the finite or infinite values IEEE
arithmetic allows (a variance beyond the largest double is inf), never NaN, whatever the
layout and thread count. The reference scales by a power of two (exact) so that NumPy's
float64 sums cannot overflow."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _core


def reference(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(a for a in range(x.ndim) if a != axis)
    scale = 2.0 ** -int(np.frexp(np.abs(x).max())[1])  # brings the values below 1
    z = x.astype(np.float64) * scale
    mean = z.mean(axis=axes)
    mean += (z - np.expand_dims(mean, axes)).mean(axis=axes)  # refined once: exact on a constant channel
    var = ((z - np.expand_dims(mean, axes)) ** 2).mean(axis=axes)
    with np.errstate(over="ignore"):
        return mean / scale, var / scale / scale


def check(got: np.ndarray, want: np.ndarray, rtol: float, atol: float = 0.0) -> None:
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=atol)


def hostile(rng, shape, axis, top):
    """Values of magnitude up to `top` in every channel, with the sign flipping, so that
    x - first value overflows; one channel also gets a lone huge value in zeros (only the
    square overflows) and one a constant near the top."""
    x = rng.uniform(-1, 1, shape) * top
    moved = np.moveaxis(x, axis, -1)
    moved.reshape(-1, moved.shape[-1])[:2, 0] = top, -top
    sparse = np.zeros_like(moved[..., 1])
    sparse.reshape(-1)[3] = np.sqrt(top) * 10  # its square overflows, the variance does not
    moved[..., 1] = sparse
    moved[..., 2] = top * 0.9
    return x


LAYOUTS = {
    "single": ((2, 1), 1),
    "channels-last": ((4096, 40), 1),  # threaded when two threads are allowed
    "channels-first": ((16, 40, 32, 32), 1),  # forward takes the channel-block schedule
    "strided": ((64, 40, 3), 1),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_moments_and_forward_do_not_overflow_to_nan(layout, threads, rng, restore_threads):
    bn.set_num_threads(threads)
    shape, axis = LAYOUTS[layout]
    x = np.array([[1e308], [-1e308]]) if layout == "single" else hostile(rng, shape, axis, 1.7e308 / 2)
    mean, var = reference(x, axis)
    near = 1e-14 * np.abs(x).max()  # a mean near 0 is as accurate as the values' magnitude allows
    check(bn.moments(x, axis=axis)[0], mean, 1e-12, near)
    check(bn.moments(x, axis=axis)[1], var, 1e-12)
    partial_mean, partial_m2 = np.zeros(mean.size), np.zeros(mean.size)
    _core.partial_moments(x, [axis], partial_mean, partial_m2)
    check(partial_mean, mean.ravel(), 1e-12, near)
    assert not np.isnan(partial_m2).any()
    y, st = bn.forward(x, axis=axis)
    check(st.mean, mean, 1e-12, near)
    check(st.variance, var, 1e-12)
    assert not np.isnan(st.inv_std).any()
    # y as the stored statistics define it: (x - mean) * inv_std, where x - mean is finite
    want = (x - np.expand_dims(st.mean, tuple(a for a in range(x.ndim) if a != axis))) * np.expand_dims(
        st.inv_std, tuple(a for a in range(x.ndim) if a != axis)
    )
    assert not np.isnan(y).any()
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-300)


def test_float32_near_its_largest_value(rng):
    x = hostile(rng, (4096, 8), 1, 3.4e38).astype(np.float32)
    mean, var = reference(x, 1)
    m, v = bn.moments(x, axis=1)
    check(m, mean.astype(np.float32), 1e-6, 1e-7 * 3.4e38)
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as the library stores it
        check(v, var.astype(np.float32), 1e-6)
    y, st = bn.forward(x, axis=1)
    assert not np.isnan(y).any()
    assert not np.isnan(st.inv_std).any()


def test_channels_with_infinities_keep_ieee_results():
    x = np.array([[1e308, np.inf], [-1e308, 1.0]])
    mean, var = bn.moments(x, axis=1)
    assert mean[0] == 0
    assert var[0] == np.inf
    assert mean[1] == np.inf
    assert np.isnan(var[1])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", [None, "relu"])
def test_float64_spanning_more_than_the_range(layout, threads, act, rng, restore_threads):
    """Values of both signs near the largest double: x - mean overflows, the variance is inf and
    inv_std 0, so every x_hat is 0. Then y is beta, dx and dgamma are 0, dbeta is the sum of
    dy (over the ReLU's mask, which is beta > 0), never NaN; normalize agrees."""
    bn.set_num_threads(threads)
    shape, axis = LAYOUTS[layout]
    x = np.array([[1.7e308], [-1.7e308]]) if layout == "single" else hostile(rng, shape, axis, 1.7e308)
    kept = (shape[axis],)
    gamma, beta = rng.uniform(0.5, 2, kept), rng.standard_normal(kept)
    y, st = bn.forward(x, gamma, beta, axis=axis, activation=act)
    spread = ~np.isfinite(reference(x, axis)[1])  # the channels whose variance is beyond the range
    assert spread.any()
    assert np.all(st.inv_std[spread] == 0)
    others = tuple(a for a in range(x.ndim) if a != axis)
    b = np.expand_dims(np.maximum(beta, 0) if act else beta, others)
    moved = lambda a: np.moveaxis(a, axis, -1)[..., spread]  # noqa: E731
    np.testing.assert_array_equal(moved(y), moved(np.broadcast_to(b, x.shape)))
    assert not np.isnan(y).any()
    y2 = bn.normalize(x, st.mean, st.variance, gamma, beta, axis=axis, epsilon=1e-3, activation=act)
    np.testing.assert_array_equal(moved(y2), moved(y))
    dy = rng.standard_normal(x.shape)
    dx, dgamma, dbeta = bn.backward(dy, x, st, gamma, beta, axis=axis, activation=act)
    assert not np.isnan(dx).any()
    assert not np.isnan(dgamma).any()
    assert np.all(moved(dx) == 0)
    assert np.all(dgamma[spread] == 0)
    live = beta > 0 if act else np.ones_like(beta, bool)
    want_dbeta = np.where(live, dy.sum(axis=others), 0)
    np.testing.assert_allclose(dbeta[spread], want_dbeta[spread], rtol=1e-12, atol=1e-12)
