"""backward against central finite differences of forward, and against torch autograd."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from reference import F32, F64

# ---- finite differences (float64) ---------------------------------------------------------

FD_CASES = [((5, 3), -1), ((4, 3, 2), 1), ((3, 2, 2, 3), (1, 3)), ((2, 3, 4), (0, 2))]


def _loss(x, gamma, beta, w, axis, eps, act):
    y, _ = bn.forward(x, gamma, beta, axis=axis, epsilon=eps, activation=act)
    return float(np.sum(y * w))


def _numeric_grad(f, a, h):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize(("shape", "axis"), FD_CASES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_backward_matches_finite_differences(shape, axis, relu, rng):
    eps, h = 1e-2, 1e-6
    act = "relu" if relu else None
    kept = ref.kept_shape(shape, axis)

    def make(_):
        x = ref.random_data(rng, shape, F64, axis)
        return (x, *ref.random_params(rng, kept, F64))

    x, gamma, beta = make(0)
    if relu:  # keep every value far from the kink compared to the step h
        for attempt in range(200):
            if ref.relu_margin(x, gamma, beta, axis=axis, epsilon=eps) > 1e-2:
                break
            x, gamma, beta = make(attempt)
        else:
            pytest.fail("no data away from the ReLU kink")
    w = rng.standard_normal(shape)
    _, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=eps, activation=act)
    dx, dgamma, dbeta = bn.backward(w, x, stats, gamma, beta, axis=axis, activation=act)

    def f():
        return _loss(x, gamma, beta, w, axis, eps, act)

    for name, got, arg in (("dx", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta)):
        num = _numeric_grad(f, arg, h)
        np.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(num).max()), err_msg=name)
    if relu:  # the ReLU actually cut something off, so its mask was exercised
        y, _ = bn.forward(x, gamma, beta, axis=axis, epsilon=eps, activation=act)
        assert (y == 0).any()
        assert (y > 0).any()


def test_finite_differences_without_gamma_beta(rng):
    shape, axis, eps = (6, 4), 0, 1e-3
    x = ref.random_data(rng, shape, F64, axis)
    w = rng.standard_normal(shape)
    _, stats = bn.forward(x, axis=axis, epsilon=eps)
    dx, dgamma, dbeta = bn.backward(w, x, stats, axis=axis)
    num = _numeric_grad(lambda: _loss(x, None, None, w, axis, eps, None), x, 1e-6)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-7)
    # With gamma = 1, beta = 0: the gradient for gamma and beta at that point.
    ones, zeros = np.ones(6), np.zeros(6)
    num_g = _numeric_grad(lambda: _loss(x, ones, zeros, w, axis, eps, None), ones, 1e-6)
    num_b = _numeric_grad(lambda: _loss(x, ones, zeros, w, axis, eps, None), zeros, 1e-6)
    np.testing.assert_allclose(dgamma, num_g, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, num_b, rtol=1e-6, atol=1e-8)


# ---- torch autograd -----------------------------------------------------------------------


def _torch_reference(torch, x, dy, gamma, beta, axis, eps, relu):
    """y, dx, dgamma, dbeta from torch.nn.functional.batch_norm (training=True) and autograd,
    with the feature axes flattened into torch's channel axis of a 2-D (M, C) view."""
    nd = x.ndim
    kept = ref.canon_axes(axis, nd)
    red = ref.reduced_axes(axis, nd)
    perm = red + kept
    C = int(np.prod([x.shape[a] for a in kept]))
    dt = torch.float64 if x.dtype == F64 else torch.float32
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(dt).requires_grad_(True)
    w = torch.from_numpy(np.ones(C) if gamma is None else np.ravel(gamma)).to(dt).requires_grad_(True)
    b = torch.from_numpy(np.zeros(C) if beta is None else np.ravel(beta)).to(dt).requires_grad_(True)
    x2 = xt.permute(perm).reshape(-1, C)
    y2 = torch.nn.functional.batch_norm(x2, None, None, w, b, training=True, momentum=0.1, eps=eps)
    if relu:
        y2 = torch.relu(y2)
    inv = np.argsort(perm)
    y = y2.reshape([x.shape[a] for a in perm]).permute(*inv.tolist())
    y.backward(torch.from_numpy(np.ascontiguousarray(dy)).to(dt))
    kshape = ref.kept_shape(x.shape, axis)
    return (
        y.detach().numpy(),
        xt.grad.numpy(),
        w.grad.numpy().reshape(kshape),
        b.grad.numpy().reshape(kshape),
    )


TORCH_CASES = [((16, 5), -1), ((8, 6, 7, 5), 1), ((4, 6, 3, 17), (1, 3)), ((3, 4, 5), (0, 2)), ((7, 3, 9), -1)]


@pytest.mark.parametrize(("shape", "axis"), TORCH_CASES, ids=str)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_matches_torch_autograd(shape, axis, dtype, relu, affine, rng):
    torch = pytest.importorskip("torch")
    eps = 1e-5
    kept = ref.kept_shape(shape, axis)

    def make(_):
        x = ref.random_data(rng, shape, dtype, axis)
        return (x, *ref.random_params(rng, kept, dtype)) if affine else (x, None, None)

    x, gamma, beta = ref.relu_safe(make, dtype, axis=axis, epsilon=eps) if relu else make(0)
    dy = rng.standard_normal(shape).astype(dtype)
    act = "relu" if relu else None
    y, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=eps, activation=act)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=axis, activation=act)
    ty, tdx, tdg, tdb = _torch_reference(torch, x, dy, gamma, beta, axis, eps, relu)
    rtol = 1e-10 if dtype == F64 else 1e-5
    ref.assert_close(y, ty, rtol=rtol, name="y")
    ref.assert_close(dx, tdx, rtol=rtol, scale=ref.dx_scale(dy, x, gamma, axis=axis, epsilon=eps), name="dx")
    ref.assert_close(dgamma, tdg, rtol=rtol, name="dgamma")
    ref.assert_close(dbeta, tdb, rtol=rtol, name="dbeta")


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_matches_torch_nchw_directly(dtype, rng):
    """The natural use: NCHW with channel axis 1, straight into batch_norm (no reshaping)."""
    torch = pytest.importorskip("torch")
    shape, eps = (4, 7, 6, 5), 1e-5
    x = ref.random_data(rng, shape, dtype, 1)
    gamma, beta = ref.random_params(rng, (7,), dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    xt = torch.from_numpy(x).requires_grad_(True)
    w = torch.from_numpy(gamma).requires_grad_(True)
    b = torch.from_numpy(beta).requires_grad_(True)
    yt = torch.nn.functional.batch_norm(xt, None, None, w, b, training=True, eps=eps)
    yt.backward(torch.from_numpy(dy))
    y, stats = bn.forward(x, gamma, beta, axis=1, epsilon=eps)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=1)
    rtol = 1e-10 if dtype == F64 else 1e-5
    ref.assert_close(y, yt.detach().numpy(), rtol=rtol, name="y")
    ref.assert_close(dx, xt.grad.numpy(), rtol=rtol, scale=ref.dx_scale(dy, x, gamma, axis=1, epsilon=eps), name="dx")
    ref.assert_close(dgamma, w.grad.numpy(), rtol=rtol, name="dgamma")
    ref.assert_close(dbeta, b.grad.numpy(), rtol=rtol, name="dbeta")
    # torch's saved batch variance is the biased one we return.
    np.testing.assert_allclose(stats.variance, x.astype(np.float64).var(axis=(0, 2, 3)), rtol=rtol)


# ---- exact zeros ----------------------------------------------------------------------------


@pytest.mark.parametrize("dt", ref.ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "axis"), [((1, 70), 1), ((1, 70, 1, 1), 1), ((1, 1, 70), -1), ((1, 70, 2, 2), (1, 2, 3))], ids=str
)
@pytest.mark.parametrize("act", [None, "relu"])
def test_one_value_per_channel_gives_exact_zero_dx(dt, shape, axis, act, rng):
    """With one value per channel x_hat is 0 and dy equals its mean, so the exact dx is 0;
    it must come out as 0, not as the rounding of gamma*inv_std*dy (large at a small epsilon)."""
    x = (rng.standard_normal(shape) * 5 + 3).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    gamma, beta = ref.random_params(rng, ref.kept_shape(shape, axis), ref.stat_dtype(dt))
    _, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=1e-8, activation=act)
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=axis, activation=act)
    assert np.count_nonzero(dx.astype(np.float64)) == 0
    assert np.count_nonzero(dgamma) == 0  # x_hat is exactly 0
    assert np.any(dbeta)  # the sums themselves are not zero
