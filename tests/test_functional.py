"""moments / normalize / forward / backward against the float64 reference (tests/reference.py),
one test per (plan kind, layout feature), and the output rules of the functional API.

The core sorts every call into one of three plans (cpp/src/plan.cpp): channels_last (rows
of contiguous channels), channels_first (contiguous runs of one channel) or strided. CASES
lists, for each plan kind, the layout features that reach it: C and Fortran order, sliced
and transposed views, negative and zero strides, several feature axes, size-1 dimensions,
out= and in place, and sizes that cross a kernel block or are split between threads. Every
test checks that its arrays do get the plan its case names (reference.plan_kind), so no
case covers a plan by chance. Each case takes one dtype per function, turning through all
four along the cases of a plan kind (test_every_dtype_meets_every_plan_kind_in_every_function).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from reference import ALL_DTYPES, BF16, F16, F32, F64

DTYPES = (F16, BF16, F32, F64)
DTYPE_IDS = {F16: "f16", BF16: "bf16", F32: "f32", F64: "f64"}
dtype = pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[DTYPE_IDS[d] for d in ALL_DTYPES])

FUNCTIONS = ("moments", "normalize", "forward", "backward")
WITH_OUT = FUNCTIONS[1:]


@dataclasses.dataclass(frozen=True)
class Case:
    """x of `shape` (feature axes `axis`) in memory as reference.make_layout(layout) puts it,
    with zero strides on the `broadcast` axes (digits); the output is new (out None), x or
    dy itself (in place), or out= in that layout."""

    kind: str  # the plan the core makes for x and the output (and dy, when it is laid out like x)
    feature: str
    shape: tuple[int, ...]
    axis: int | tuple[int, ...]
    layout: str = "c"
    broadcast: str = ""
    out: str | None = None
    functions: tuple[str, ...] = FUNCTIONS


CL, CF, S = "channels_last", "channels_first", "strided"
CASES = [
    # channels_last: rows of contiguous channels
    Case(CL, "c-wide-rows", (9, 1030), 1),  # more channels than a kernel block (512) in a row
    Case(CL, "f", (33, 257), 0, "f"),
    Case(CL, "sliced-rows", (257, 33), -1, "step:0"),
    Case(CL, "transposed-nhwc", (2, 33, 5, 7), 1, "channels_last"),
    Case(CL, "negative-batch", (4, 3, 17), 2, "negative:01"),
    Case(CL, "zero-stride-batch", (6, 4, 9), -1, broadcast="1", out="c"),
    Case(CL, "feature-axes", (2, 33, 5, 7), (-1, -2)),
    Case(CL, "size-1-dims", (5, 1, 1, 19), -1),
    Case(CL, "one-row", (1, 17), 1),
    Case(CL, "ndim-5", (3, 2, 5, 4, 3), -1),
    Case(CL, "out", (7, 3, 40), -1, out="window:2", functions=WITH_OUT),
    Case(CL, "in-place", (5, 7, 4, 3), 1, "channels_last", out="x", functions=WITH_OUT),
    Case(CL, "in-place-dy", (6, 5, 4, 9), 1, "channels_last", out="dy", functions=("backward",)),
    Case(CL, "threaded", (8, 19, 33, 31), 1, "channels_last"),
    Case(CL, "threaded-in-place", (2, 9, 64, 64), 1, "channels_last", out="x", functions=WITH_OUT),
    # channels_first: contiguous runs of one channel
    Case(CF, "c-long-runs", (3, 5, 1100), 1),  # runs longer than a kernel block
    Case(CF, "f", (257, 33), -1, "f"),
    Case(CF, "f-many-channels", (9, 1030), 1, "f"),  # more channels than a kernel block, short runs
    Case(CF, "sliced-runs", (2, 33, 5, 10), 1, "window:3"),
    Case(CF, "transposed-one-run", (7, 4, 300), 1, "order:102"),  # each channel one run of 2100
    Case(CF, "negative-batch", (4, 3, 17), 1, "negative:0"),
    Case(CF, "zero-stride-batch", (4, 3, 5, 7), 1, broadcast="0", out="c"),
    Case(CF, "feature-axes", (4, 3, 17), (0, 1)),
    Case(CF, "feature-axes-f", (2, 33, 5, 7), (1, 3), "f"),
    Case(CF, "size-1-dims", (2, 1, 1, 3), 1),  # one channel: no channel dimension at all
    Case(CF, "one-channel", (17, 1), -1),
    Case(CF, "ndim-5", (3, 2, 5, 4, 3), 1),
    Case(CF, "out", (6, 3, 4, 5), (0,), out="negative:1", functions=WITH_OUT),
    Case(CF, "in-place", (6, 7, 4, 3), 1, out="x", functions=WITH_OUT),
    Case(CF, "in-place-dy-negative", (6, 5, 4, 9), 1, "negative", out="dy", functions=("backward",)),
    Case(CF, "threaded", (8, 19, 33, 31), 1),
    Case(CF, "threaded-in-place", (2, 9, 64, 64), 1, out="x", functions=WITH_OUT),
    # strided: anything else
    Case(S, "c-feature-axes", (4, 3, 17), (0, 2)),
    Case(S, "f-feature-axes", (2, 33, 5, 7), (0, 2), "f"),
    Case(S, "sliced", (12, 7, 40), 1, "step"),
    Case(S, "transposed", (2, 33, 5, 7), (1, 3), "order:2031"),
    Case(S, "negative", (257, 33), -1, "negative"),
    Case(S, "negative-many-channels", (9, 1030), 1, "negative"),
    Case(S, "zero-stride", (2, 3, 4, 5), (1, 3), broadcast="0"),
    Case(S, "feature-axes-ndim-5", (3, 2, 5, 4, 3), (1, 4)),
    Case(S, "size-1-dims", (1, 1), 0),
    Case(S, "size-1-dims-sliced", (7, 1, 1, 5), 0, "step"),
    Case(S, "out-mixed-layouts", (6, 19, 5, 3), 1, "channels_last", out="negative", functions=WITH_OUT),
    Case(S, "out-f", (4, 33, 5), 1, out="f", functions=WITH_OUT),
    Case(S, "in-place", (5, 7, 4, 3), 1, "step", out="x", functions=WITH_OUT),
    Case(S, "in-place-dy", (6, 5, 4, 9), 1, "step", out="dy", functions=("backward",)),
    Case(S, "threaded", (8, 19, 33, 31), 1, "step"),
    Case(S, "threaded-in-place", (2, 9, 64, 64), 1, "step", out="x", functions=WITH_OUT),
]


def cases_of(function: str) -> list:
    """pytest params (case, dtype) of a function: the dtype turns through DTYPES along each
    plan kind's cases, starting one further for each function, so that across the four
    functions each feature meets several dtypes."""
    start = FUNCTIONS.index(function)
    out = []
    for kind in (CL, CF, S):
        mine = [c for c in CASES if c.kind == kind and function in c.functions]
        for i, c in enumerate(mine):
            d = DTYPES[(start + i) % len(DTYPES)]
            out.append(pytest.param(c, d, id=f"{kind}-{c.feature}-{DTYPE_IDS[d]}"))
    return out


def cases(function: str):
    return pytest.mark.parametrize(("case", "dtype"), cases_of(function))


affine_relu = pytest.mark.parametrize(
    ("affine", "relu"),
    list(itertools.product([False, True], [False, True])),
    ids=["plain-linear", "plain-relu", "affine-linear", "affine-relu"],
)


def _x(case: Case, dtype, rng) -> np.ndarray:
    shape = tuple(1 if str(d) in case.broadcast else s for d, s in enumerate(case.shape))
    x = ref.make_layout(ref.random_data(rng, shape, dtype, case.axis), case.layout)
    return np.broadcast_to(x, case.shape) if case.broadcast else x


def _dy_like(x: np.ndarray, case: Case, rng) -> np.ndarray:
    """dy in x's layout (zero strides included)."""
    shape = tuple(1 if str(d) in case.broadcast else s for d, s in enumerate(case.shape))
    dy = ref.make_layout(rng.standard_normal(shape).astype(x.dtype), case.layout)
    return np.broadcast_to(dy, case.shape) if case.broadcast else dy


def _out(case: Case, like: dict[str, np.ndarray]) -> np.ndarray | None:
    """The out= argument: None, an input itself, or a new array (of 7s) in case.out's layout."""
    if case.out is None or case.out in like:
        return None if case.out is None else like[case.out]
    x = like["x"]
    return ref.make_layout(np.full(x.shape, 7, x.dtype), case.out)


def _params(rng, case: Case, dtype, on: bool):
    if not on:
        return None, None
    return ref.random_params(rng, ref.kept_shape(case.shape, case.axis), dtype)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.itemsize}")


# ---- moments ----------------------------------------------------------------------------


@cases("moments")
def test_moments(case, dtype, rng):
    x = _x(case, dtype, rng)
    assert ref.plan_kind(case.axis, x) == case.kind
    mean, var = bn.moments(x, axis=case.axis)
    rmean, rvar = ref.moments_ref(x, case.axis)
    kept = ref.kept_shape(case.shape, case.axis)
    assert mean.shape == kept
    assert var.shape == kept
    scale = float(np.max(np.abs(rmean)) + np.max(rvar) ** 0.5)
    ref.assert_stats_close(mean, rmean, dtype, name="mean", scale=scale)
    ref.assert_stats_close(var, rvar, dtype, name="variance")


# ---- normalize --------------------------------------------------------------------------


@cases("normalize")
@affine_relu
def test_normalize(case, dtype, affine, relu, rng):
    x = _x(case, dtype, rng)
    x0 = x.copy()
    kept = ref.kept_shape(case.shape, case.axis)
    sd = ref.stat_dtype(dtype)
    rmean, rvar = ref.moments_ref(x, case.axis)
    # Statistics other than the batch's own (as moving averages would be).
    mean = (rmean + 0.3 * rng.standard_normal(kept)).astype(sd)
    var = (rvar * (0.5 + rng.random(kept)) + 0.1).astype(sd)
    gamma, beta = _params(rng, case, dtype, affine)
    act, eps = ("relu" if relu else None), 1e-2
    want = ref.normalize_ref(x0, mean, var, gamma, beta, axis=case.axis, epsilon=eps, relu=relu)
    # Elementwise results do not depend on the plan: those of a C-contiguous copy, bit for bit.
    y_c = bn.normalize(np.ascontiguousarray(x), mean, var, gamma, beta, axis=case.axis, epsilon=eps, activation=act)
    out = _out(case, {"x": x})
    y = bn.normalize(x, mean, var, gamma, beta, axis=case.axis, epsilon=eps, activation=act, out=out)
    assert out is None or y is out
    assert ref.plan_kind(case.axis, x, y) == case.kind
    assert y.shape == x.shape
    ref.assert_output_close(y, want, dtype, name="y")
    np.testing.assert_array_equal(_bits(y), _bits(y_c))
    if case.out != "x":
        np.testing.assert_array_equal(_bits(x), _bits(x0))


# ---- forward ----------------------------------------------------------------------------


@cases("forward")
@affine_relu
def test_forward(case, dtype, affine, relu, rng):
    x = _x(case, dtype, rng)
    x0 = x.copy()
    gamma, beta = _params(rng, case, dtype, affine)
    act, eps = ("relu" if relu else None), 1e-3
    r = ref.forward_ref(x0, gamma, beta, axis=case.axis, epsilon=eps, relu=relu)
    out = _out(case, {"x": x})
    y, stats = bn.forward(x, gamma, beta, axis=case.axis, epsilon=eps, activation=act, out=out)
    assert out is None or y is out
    assert ref.plan_kind(case.axis, x, y) == case.kind
    assert isinstance(stats, bn.BatchStats)
    assert y.shape == x.shape
    assert type(stats.count) is int
    assert stats.count == r.count
    for name in ("mean", "variance", "inv_std"):
        assert getattr(stats, name).shape == ref.kept_shape(case.shape, case.axis), name
    # The statistics are those of the input, also in place (not of the overwritten values).
    ref.assert_stats_close(stats.mean, r.mean, dtype, name="mean", scale=float(np.max(np.abs(r.mean)) + 1))
    ref.assert_stats_close(stats.variance, r.var, dtype, name="variance")
    ref.assert_stats_close(stats.inv_std, r.inv_std, dtype, name="inv_std")
    ref.assert_output_close(y, r.y, dtype, name="y")
    if relu:
        assert (y.astype(np.float64) >= 0).all()
    if case.out != "x":
        np.testing.assert_array_equal(_bits(x), _bits(x0))


# ---- backward ---------------------------------------------------------------------------


@cases("backward")
@affine_relu
@pytest.mark.parametrize("dy_layout", ["like-x", "c"], ids=["dy-like-x", "dy-c"])
def test_backward(case, dtype, affine, relu, dy_layout, rng):
    eps = 1e-3
    act = "relu" if relu else None

    def make(_):
        x = _x(case, dtype, rng)
        return (x, *_params(rng, case, dtype, affine))

    x, gamma, beta = ref.relu_safe(make, dtype, axis=case.axis, epsilon=eps) if relu else make(0)
    # dy like x keeps the case's plan; a C-contiguous dy beside another x makes a mixed one.
    dy = _dy_like(x, case, rng) if dy_layout == "like-x" else rng.standard_normal(case.shape).astype(dtype)
    x0, dy0 = x.copy(), dy.copy()
    _, stats = bn.forward(x, gamma, beta, axis=case.axis, epsilon=eps, activation=act)
    rdx, rdg, rdb = ref.backward_ref(dy0, x0, gamma, beta, axis=case.axis, epsilon=eps, relu=relu)
    out = _out(case, {"x": x, "dy": dy})
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=case.axis, activation=act, out=out)
    assert out is None or dx is out
    if dy_layout == "like-x":
        assert ref.plan_kind(case.axis, x, dy, dx) == case.kind
    kept = ref.kept_shape(case.shape, case.axis)
    assert dx.shape == x.shape
    assert dgamma.shape == kept
    assert dbeta.shape == kept
    ref.assert_output_close(dx, rdx, dtype, name="dx", scale=ref.dx_scale(dy0, x0, gamma, axis=case.axis, epsilon=eps))
    # dgamma/dbeta: sums of many terms, rounded once to the stats dtype; their error is
    # relative to the sum of magnitudes.
    count = ref.forward_ref(x0, axis=case.axis).count
    gscale = float(np.max(np.abs(ref.f64(dy0)))) * count**0.5 * 3
    rtol = 1e-12 if dtype == F64 else 1e-6
    ref.assert_stats_close(dgamma, rdg, dtype, name="dgamma", rtol=rtol, scale=gscale)
    ref.assert_stats_close(dbeta, rdb, dtype, name="dbeta", rtol=rtol, scale=gscale)
    if case.out != "x":
        np.testing.assert_array_equal(_bits(x), _bits(x0))
    if case.out != "dy":
        np.testing.assert_array_equal(_bits(dy), _bits(dy0))


def test_every_dtype_meets_every_plan_kind_in_every_function():
    for function in FUNCTIONS:
        seen = {(p.values[0].kind, p.values[1]) for p in cases_of(function)}
        assert seen == set(itertools.product((CL, CF, S), DTYPES)), function


@pytest.mark.parametrize(
    ("shape", "axis", "strides", "kind"),
    [
        ((2, 3, 4, 5), 1, None, CF),
        ((2, 4, 5, 3), -1, None, CL),
        ((2, 3, 4, 5), 1, (60, 1, 15, 3), CL),
        ((4, 3), 1, (-3, 1), CL),
        ((2, 3, 4, 5), 1, (60, 20, -5, -1), CF),
        ((4, 3), 1, (3, -1), S),
        ((5, 3), 1, (0, 1), CL),
        ((3, 5), 0, (5, 0), S),
        ((2, 3, 4), 1, (0, 4, 1), CF),
        ((1, 3, 1, 5), 1, (999, 5, -7, 1), CF),
        ((4, 1, 6), 1, None, CF),
        ((1, 7), 1, None, CL),
        ((2, 3, 4), 0, (12, 8, 2), S),
        ((2, 3, 4, 5), (1, 3), None, S),
        ((2, 3, 4, 5), (1, 2), None, CF),
        ((2, 3, 4, 5), (2, 3), None, CL),
    ],
    ids=str,
)
def test_plan_kind_follows_the_core(shape, axis, strides, kind):
    """reference.plan_kind on the cases of cpp/tests/test_plan.cpp (strides in elements)."""
    base = np.zeros(4096, np.float32)
    start = base[2048:]
    x = (
        np.lib.stride_tricks.as_strided(start, shape, tuple(4 * s for s in strides))
        if strides
        else start[: np.prod(shape)].reshape(shape)
    )
    assert ref.plan_kind(axis, x) == kind


# ---- 1-d normalize ----------------------------------------------------------------------


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


# ---- dtypes and shapes of the outputs -----------------------------------------------------


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
    gamma, beta = ref.random_params(rng, ref.kept_shape(shape, axis), dtype)  # (4, 6)
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


def test_integer_bool_and_big_endian_per_channel_arrays_are_converted(rng):
    """As NumPy converts them (exactly, for these values): the same bits as their float32 copies."""
    x = rng.standard_normal((16, 3)).astype(np.float32)
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([1.0, 4.0, 0.25])
    want = bn.normalize(x, mean.astype(np.float32), var.astype(np.float32), np.ones(3, np.float32), axis=1)
    np.testing.assert_array_equal(
        bn.normalize(x, mean.astype(">f4"), var.astype(">f8"), np.ones(3, bool), axis=1), want
    )
    got = bn.normalize(x, np.array([0, -1, 2], np.int8), np.array([1, 4, 1], np.uint16), axis=1)
    np.testing.assert_array_equal(got, bn.normalize(x, np.float32([0, -1, 2]), np.float32([1, 4, 1]), axis=1))


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
@pytest.mark.parametrize("kind", [CL, CF, S])
def test_relu_mask_of_backward_is_the_forwards(dtype, kind, rng):
    """backward rebuilds the ReLU mask bit for bit: with dy = 1, dbeta counts y > 0 exactly,
    even where the pre-activation is a rounding error away from zero."""
    x = kink_data(rng, dtype)
    axis = -1
    if kind == CF:  # each channel contiguous
        x, axis = np.ascontiguousarray(x.T), 0
    elif kind == S:
        x = ref.make_layout(x, "step")
    ones = np.ones(x.shape[axis], ref.stat_dtype(dtype))
    y, stats = bn.forward(x, ones, ones, axis=axis, epsilon=0.0, activation="relu")
    assert ref.plan_kind(axis, x, y) == kind
    near = (y > 0) & (y < 1e-4)
    assert near.sum() > 100  # the test does probe the kink
    _, _, dbeta = bn.backward(np.ones_like(x), x, stats, ones, ones, axis=axis, activation="relu")
    np.testing.assert_array_equal(dbeta, (y > 0).sum(axis=1 - (axis % 2)))


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
    gamma, beta = ref.random_params(rng, ref.kept_shape(shape, 1), dtype)
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


# ---- empty batches, zero channels, epsilon 0 ---------------------------------------------


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


def test_zero_epsilon_is_allowed():
    y, _ = bn.forward(np.arange(24, dtype=np.float32).reshape(4, 6), epsilon=0.0)
    assert np.isfinite(y).all()
