"""Masked statistics (``mask=`` of bn.moments/forward/backward) against float64 references
of their definition: statistics over the selected positions, every position normalized
with them, backward the exact gradient of that function (float64 autograd). Layouts,
broadcast and boolean/0-1 masks, every dtype, each instruction set, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from reference import ALL_DTYPES, F64, HALF_DTYPES

torch = pytest.importorskip("torch")


def _full_mask(mask: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """The mask as float64 weights broadcast to x's shape (feature axes inserted)."""
    reduced = tuple(n for i, n in enumerate(shape) if i not in axes)
    m = np.broadcast_to(np.asarray(mask), reduced).astype(np.float64)
    return np.broadcast_to(np.expand_dims(m, axes), shape)


def masked_reference(x, dy, mask, gamma, beta, axes, epsilon, relu=False):
    """float64 mean, variance, y, dx, dgamma, dbeta of masked batch norm, by autograd."""
    w = torch.tensor(np.ascontiguousarray(_full_mask(mask, x.shape, axes)))
    red = [i for i in range(x.ndim) if i not in axes]
    keep = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    xt = torch.tensor(ref.f64(x), requires_grad=True)
    g = torch.tensor(ref.f64(gamma).reshape(keep), requires_grad=True)
    b = torch.tensor(ref.f64(beta).reshape(keep), requires_grad=True)
    total = w.sum(dim=red, keepdim=True)
    mean = (w * xt).sum(dim=red, keepdim=True) / total
    var = (w * (xt - mean) ** 2).sum(dim=red, keepdim=True) / total
    y = (xt - mean) / torch.sqrt(var + epsilon) * g + b
    if relu:
        y = torch.relu(y)
    y.backward(torch.tensor(ref.f64(dy)))
    flat = [mean.detach().numpy().reshape(-1), var.detach().numpy().reshape(-1)]
    grads = [xt.grad.numpy(), g.grad.numpy().reshape(-1), b.grad.numpy().reshape(-1)]
    return (*flat, y.detach().numpy(), *grads)


# (shape, axis, mask shape, layout of x and dy)
CASES = [
    ((4, 6, 33), 1, (4, 33), "c"),  # NCL, channels first
    ((4, 33, 6), -1, (4, 33), "c"),  # NLC, channels last
    ((5, 7), 1, (5,), "c"),  # (N, C)
    ((4, 6, 33), 1, (4, 33), "step"),  # strided views
    ((4, 6, 33), 1, (4, 33), "channels_last"),  # NCL shape, NLC strides
    ((4, 6, 33), 1, (33,), "c"),  # one mask broadcast over the batch
    ((4, 33, 6), -1, (4, 1), "c"),  # one value per sample, broadcast over the length
    ((3, 4, 5, 6), (1, 3), (3, 5), "c"),  # two feature axes
    ((2, 8, 2048), 1, (2, 2048), "c"),  # channel blocks
    ((4, 5000), 1, (4,), "c"),  # few values per channel
]


def _mask(rng, shape, kind):
    m = rng.random(shape) < 0.7
    m.flat[:3] = True  # at least three values per channel: the statistics are not ill-conditioned
    return {"bool": m, "uint8": m.astype(np.uint8), "int": m.astype(np.int64)}[kind]


def check_case(shape, axis, mshape, layout, dtype, kind="bool", relu=False, seed=0):
    rng = np.random.default_rng(seed)
    axes = ref.canon_axes(axis, len(shape))
    kept = ref.kept_shape(shape, axis)
    x = ref.make_layout(ref.random_data(rng, shape, dtype, axis), layout)
    dy = ref.make_layout(ref.random_data(rng, shape, dtype, axis, loc=0.1, scale=1.0), layout)
    gamma, beta = ref.random_params(rng, kept, dtype)
    mask = _mask(rng, mshape, kind)
    eps = 1e-3
    y, stats = bn.forward(x, gamma, beta, axis=axis, epsilon=eps, mask=mask, activation="relu" if relu else None)
    dx, dgamma, dbeta = bn.backward(
        dy, x, stats, gamma, beta, axis=axis, mask=mask, activation="relu" if relu else None
    )
    mean, var = bn.moments(x, axis, mask=mask)
    rmean, rvar, ry, rdx, rdg, rdb = masked_reference(x, dy, mask, gamma, beta, axes, eps, relu)
    what = f"{shape} axis={axis} mask={mshape} {layout} {np.dtype(dtype).name} {kind}"
    assert stats.count == int(np.count_nonzero(_full_mask(mask, shape, axes))) // int(np.prod(kept))
    for got in (stats.mean, mean):
        ref.assert_stats_close(got.reshape(-1), rmean, dtype, name=f"{what} mean", scale=float(np.abs(rmean).max()))
    for got in (stats.variance, var):
        ref.assert_stats_close(got.reshape(-1), rvar, dtype, name=f"{what} variance")
    scale = float(np.abs(ry).max())
    ref.assert_output_close(y, ry, dtype, name=f"{what} y", scale=scale, atol=_half_atol(dtype, scale))
    dscale = float(np.abs(rdx).max()) + float(np.abs(ref.f64(dy)).max() * np.abs(ref.f64(gamma)).max() / np.sqrt(eps))
    ref.assert_output_close(dx, rdx, dtype, name=f"{what} dx", scale=dscale * 1e-2, atol=_half_atol(dtype, dscale))
    gscale = float(np.abs(ref.f64(dy)).max()) * x.size / max(1, np.prod(kept))
    ref.assert_stats_close(dgamma.reshape(-1), rdg, dtype, name=f"{what} dgamma", scale=gscale)
    ref.assert_stats_close(dbeta.reshape(-1), rdb, dtype, name=f"{what} dbeta", scale=gscale)


def _half_atol(dtype, scale: float) -> float:
    # 16-bit data: the float32 compute type's roundings on the scale of the terms
    return 64 * 2.0**-24 * scale if np.dtype(dtype) in HALF_DTYPES else 0.0


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "axis", "mshape", "layout"), CASES)
def test_matches_the_float64_definition(shape, axis, mshape, layout, dtype):
    check_case(shape, axis, mshape, layout, dtype)


@pytest.mark.parametrize("kind", ["uint8", "int"])
def test_zero_one_masks_are_boolean_ones(kind):
    check_case((4, 6, 33), 1, (4, 33), "c", F64, kind=kind)
    check_case((4, 33, 6), -1, (4, 33), "c", np.float32, kind=kind)


def test_fused_relu():
    check_case((4, 6, 33), 1, (4, 33), "c", F64, relu=True)


def test_padding_does_not_enter_the_statistics():
    """A padded batch gives the statistics of its unpadded values, whatever the padding holds."""
    rng = np.random.default_rng(1)
    lengths = [30, 12, 25]
    x = rng.normal(3, 2, (3, 5, 30)).astype(np.float32)
    mask = np.arange(30)[None, :] < np.array(lengths)[:, None]
    x[~np.broadcast_to(mask[:, None, :], x.shape)] = 1e4  # padding far from the data
    kept = np.concatenate([x[i, :, :n] for i, n in enumerate(lengths)], axis=1).astype(np.float64)
    mean, var = bn.moments(x, 1, mask=mask)
    np.testing.assert_allclose(mean, kept.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(var, kept.var(axis=1), rtol=1e-5)
    assert bn.forward(x, axis=1, mask=mask)[1].count == sum(lengths)


def test_ones_equal_no_mask():
    rng = np.random.default_rng(2)
    x = rng.normal(1, 2, (8, 4, 20))
    ones = np.ones((8, 20), bool)
    y, s = bn.forward(x, axis=1)
    ym, sm = bn.forward(x, axis=1, mask=ones)
    np.testing.assert_allclose(sm.mean, s.mean, rtol=1e-13)
    np.testing.assert_allclose(sm.variance, s.variance, rtol=1e-12)
    np.testing.assert_allclose(ym, y, rtol=1e-12, atol=1e-12)
    assert sm.count == s.count
    dy = rng.normal(size=x.shape)
    for got, want in zip(bn.backward(dy, x, sm, axis=1, mask=ones), bn.backward(dy, x, s, axis=1), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_no_copy_of_x():
    """x is read in place: the Python layer allocates the mask's size at most (tracemalloc
    sees NumPy's allocations), never x's."""
    x = np.ones((64, 256, 128), np.float32)
    x[:, :, ::3] = 2.0
    mask = np.ones((64, 128), bool)
    mask[:, 100:] = False
    y, dx = np.empty_like(x), np.empty_like(x)
    tracemalloc.start()
    try:
        _, s = bn.forward(x, axis=1, mask=mask, out=y)
        bn.backward(x, x, s, axis=1, mask=mask, out=dx)
        mean, _ = bn.moments(x, 1, mask=mask)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 16
    assert s.count == 64 * 100
    np.testing.assert_allclose(mean, (2 * 34 + 66) / 100, rtol=1e-6)


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (np.ones((4, 7), bool), ValueError, "does not broadcast"),
        (np.ones((4, 6, 5), bool), ValueError, "does not broadcast"),
        (np.ones((4, 5), np.float32), TypeError, "boolean"),
        (np.full((4, 5), 2, np.uint8), ValueError, "0 and 1"),
        (np.zeros((4, 5), bool), ValueError, "mask selects nothing"),
        ("yes", TypeError, "boolean"),
    ],
)
def test_errors(mask, error, match):
    x = np.ones((4, 6, 5), np.float32)
    stats = bn.forward(x, axis=1)[1]
    for call in (
        lambda: bn.moments(x, 1, mask=mask),
        lambda: bn.forward(x, axis=1, mask=mask),
        lambda: bn.backward(x, x, stats, axis=1, mask=mask),
    ):
        with pytest.raises(error, match=match):
            call()


def test_out_overlapping_the_mask_is_refused():
    x = np.ones((4, 6, 5))
    buf = np.ones((4, 6, 5))
    with pytest.raises(ValueError, match="mask"):
        bn._core.forward(x, buf, (1,), None, None, 1e-3, False, mask=buf[:, 0, :])


_CHILD = """
import sys
sys.path[:0] = [{tests!r}]
import json, numpy as np, batchnorm as bn
from reference import ALL_DTYPES
import test_masked as t
for case in t.CASES:
    for dtype in ALL_DTYPES:
        t.check_case(*case, dtype)
print(json.dumps(bn.info()["simd"]))
"""


@pytest.mark.parametrize("isa", bn.info()["simd_supported"])
def test_each_instruction_set(isa):
    env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_MAX_ISA"}
    env["BATCHNORM_MAX_ISA"] = isa
    code = _CHILD.format(tests=str(Path(__file__).parent))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == isa


def test_float64_reference_is_the_gradient():
    """The reference's dx agrees with central finite differences of its own forward."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 2, 5))
    mask = rng.random((3, 5)) < 0.6
    mask[0, 0] = True
    dy = rng.normal(size=x.shape)
    gamma, beta = np.array([1.3, -0.7]), np.array([0.2, 0.1])
    rdx = masked_reference(x, dy, mask, gamma, beta, (1,), 1e-3)[3]
    h = 1e-6
    for idx in [(0, 0, 0), (1, 1, 3), (2, 0, 4)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fp = float(np.sum(masked_reference(xp, dy, mask, gamma, beta, (1,), 1e-3)[2] * dy))
        fm = float(np.sum(masked_reference(xm, dy, mask, gamma, beta, (1,), 1e-3)[2] * dy))
        assert abs((fp - fm) / (2 * h) - rdx[idx]) < 1e-6
    assert F64 in ALL_DTYPES


# ---- the Keras-style layer's mask runs on the kernels ---------------------------------------


def test_keras_float16_masked_dx_is_rounded_once():
    """A float16 layer's masked dx within two float16 ulps of the float64 gradient, with few
    values per channel and eps = 1e-8 (large a = gamma*inv_std). Rounding a*dy to float16
    before subtracting the statistics' part, as the layer once did, is far off there."""
    rng = np.random.default_rng(5)
    old_ok = True
    for _ in range(20):
        x = rng.normal(0, 1, (3, 2, 4)).astype(np.float16)
        mask = rng.random((3, 2)) < 0.5
        mask[0, 0] = True
        dy = rng.normal(0, 1, x.shape).astype(np.float16)
        layer = bn.BatchNormalization(epsilon=1e-8, dtype="float16", center=False, scale=False)
        layer(x, training=True, mask=mask)
        dx = layer.backward(dy)
        _, var, _, rdx, _, _ = masked_reference(x, dy, mask, np.ones(4), np.zeros(4), (2,), 1e-8)
        a_dy = ref.f64(dy) / np.sqrt(var + 1e-8)  # the layer's a*dy, gamma = 1
        tol = 2 * ref.spacing16(rdx, np.float16) + 1e-5 * float(np.abs(a_dy).max())
        assert np.all(np.abs(ref.f64(dx) - rdx) <= tol)
        old = a_dy.astype(np.float16).astype(np.float64) - (a_dy - rdx)
        old_ok &= bool(np.all(np.abs(old - rdx) <= tol))
    assert not old_ok


def test_keras_mask_takes_the_kernels_where_it_can():
    """A mask that does not vary along the feature axes reaches the kernels; one over the
    last axis of channels-first data (per channel weights) keeps the float64 path; both
    match the float64 definition."""
    rng = np.random.default_rng(6)
    for shape, axis, mshape, on_kernels in [
        ((4, 7, 3), -1, (4, 7), True),
        ((4, 3, 7), 1, (4, 3), False),
        ((4, 3, 7), 1, (4, 1), True),
    ]:
        x = rng.normal(2, 1, shape).astype(np.float32)
        dy = rng.normal(0, 1, shape).astype(np.float32)
        mask = rng.random(mshape) < 0.7
        mask.flat[:2] = True
        layer = bn.BatchNormalization(axis=axis, epsilon=1e-3, fused=False)
        y = layer(x, training=True, mask=mask)
        assert (layer._last.mask is not None) == on_kernels
        dx = layer.backward(dy)
        w = np.broadcast_to(mask[..., None], shape).astype(np.float64)
        red = tuple(i for i in range(3) if i != axis % 3)
        mean = (w * x).sum(axis=red, keepdims=True) / w.sum(axis=red, keepdims=True)
        var = (w * (x - mean) ** 2).sum(axis=red, keepdims=True) / w.sum(axis=red, keepdims=True)
        np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-5, atol=1e-5)
        assert np.isfinite(dx).all()


def test_partials_and_backward_halves_merge_to_the_masked_call():
    """Synchronized layers' building blocks: masked partials of two parts of a batch merged
    with the mask's weight sums, and backward_apply with the total W, equal one masked call."""
    rng = np.random.default_rng(7)
    x = rng.normal(1, 2, (6, 3, 10))
    dy = rng.normal(0, 1, x.shape)
    mask = rng.random((6, 10)) < 0.6
    mask[0, :3] = True
    mask[3:] = False  # the second part selects nothing: count 0, mean 0, M2 0
    _, s = bn.forward(x, axis=1, mask=mask)
    dx, _, _ = bn.backward(dy, x, s, axis=1, mask=mask)
    count, mean, m2 = np.zeros(3), np.zeros(3), np.zeros(3)
    for part in (slice(0, 3), slice(3, 6)):
        w = mask[part].astype(np.float64)
        pm, pq = np.zeros(3), np.zeros(3)
        n = bn._core.partial_moments(x[part], (1,), pm, pq, mask=w)
        assert n == np.count_nonzero(w)
        bn._core.merge_moments(count, mean, m2, np.full(3, w.sum()), pm, pq)
    np.testing.assert_allclose(mean, s.mean, rtol=1e-12)
    np.testing.assert_allclose(m2 / count, s.variance, rtol=1e-12)
    sum_dy, sum_dy_xc = np.zeros(3), np.zeros(3)
    bn._core.backward_sums(dy, x, (1,), s.mean, s.inv_std, None, None, False, sum_dy, sum_dy_xc)
    dx_apply = np.empty_like(x)
    w = mask.astype(np.float64)
    bn._core.backward_apply(dy, x, dx_apply, (1,), s.mean, s.inv_std, None, None, False, sum_dy, sum_dy_xc,
                            float(w.sum()), mask=w)  # fmt: skip
    np.testing.assert_allclose(dx_apply, dx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "mshape"), [((2, 16, 4096), (2, 4096)), ((64, 200, 40), (64, 40))])
def test_thread_counts(shape, mshape, restore_threads):
    """Bitwise the same for a fixed thread count; across thread counts, the same but for the
    rounding of the per-thread partial sums (bitwise on the channel-block schedule, the first
    shape, where each channel is one thread's)."""
    rng = np.random.default_rng(8)
    x = rng.normal(3, 2, shape).astype(np.float32)
    dy = rng.normal(0, 1, shape).astype(np.float32)
    mask = rng.random(mshape) < 0.7

    def run():
        y, s = bn.forward(x, axis=1, mask=mask)
        return (y, s.mean, s.variance, *bn.backward(dy, x, s, axis=1, mask=mask))

    bn.set_num_threads(1)
    one = run()
    bn.set_num_threads(2)
    two, again = run(), run()
    for a, b in zip(two, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(one, two, strict=True):
        if shape[-1] == 4096:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
