"""Outputs that share memory with a per-channel argument, or per-channel outputs that share
memory with the data: refused with a ValueError naming both, nothing written. An output
that lies right next to such an argument in the same buffer is no overlap and gives the
result fresh arrays give."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _core

N, C = 8, 512  # x is (N, C), channels last; one buffer of N*C + 4*C values holds everything


def buffer_views(dtype):
    """out over buf[:N*C] and four per-channel slots: slot k overlaps out at offset k*C
    (k < N), slot N + k lies after it."""
    buf = np.zeros(N * C + 4 * C, dtype)
    return buf, buf[: N * C].reshape(N, C)


def channel_slot(buf, k, values):
    view = buf[k * C : (k + 1) * C]
    view[...] = values
    return view


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def data(request, rng):
    dtype = request.param
    x = rng.standard_normal((N, C)).astype(dtype)
    dy = rng.standard_normal((N, C)).astype(dtype)
    params = {
        "gamma": rng.uniform(0.5, 2, C),
        "beta": rng.standard_normal(C),
        "mean": rng.standard_normal(C),
        "variance": rng.uniform(0.5, 2, C),
    }
    return dtype, x, dy, {k: v.astype(dtype) for k, v in params.items()}


def call(name, x, dy, p, out):
    if name == "forward":
        return bn.forward(x, p["gamma"], p["beta"], out=out)[0]
    if name == "normalize":
        return bn.normalize(x, p["mean"], p["variance"], p["gamma"], p["beta"], out=out)
    stats = bn.BatchStats(p["mean"], p["variance"], 1 / np.sqrt(p["variance"] + 1e-3), N)
    return bn.backward(dy, x, stats, p["gamma"], p["beta"], out=out, activation="relu")[0]


ARGS = {
    "forward": ["gamma", "beta"],
    "normalize": ["gamma", "beta", "mean", "variance"],
    "backward": ["gamma", "beta", "mean", "variance"],  # variance stands for stats.inv_std
}
CASES = [(f, a) for f, args in ARGS.items() for a in args]


@pytest.mark.parametrize(("function", "arg"), CASES)
def test_out_overlapping_a_channel_argument_is_refused(data, function, arg):
    dtype, x, dy, p = data
    buf, out = buffer_views(dtype)
    p = dict(p)
    if function == "backward" and arg == "variance":  # put inv_std itself in out's memory
        inv = channel_slot(buf, 3, 1 / np.sqrt(p["variance"] + 1e-3))
        stats = bn.BatchStats(p["mean"], p["variance"], inv, N)
        before = buf.copy()
        with pytest.raises(ValueError, match="overlaps inv_std"):
            bn.backward(dy, x, stats, p["gamma"], p["beta"], out=out)
    else:
        p[arg] = channel_slot(buf, 3, p[arg])
        before = buf.copy()
        with pytest.raises(ValueError, match=f"out overlaps {arg}"):
            call(function, x, dy, p, out)
    np.testing.assert_array_equal(buf, before)  # nothing written


@pytest.mark.parametrize(("function", "arg"), CASES)
def test_channel_argument_next_to_out_is_used(data, function, arg):
    dtype, x, dy, p = data
    expected = call(function, x, dy, p, None)
    buf, out = buffer_views(dtype)
    p = dict(p)
    p[arg] = channel_slot(buf, N, p[arg])  # the first values after out's last
    got = call(function, x, dy, p, out)
    assert got is out
    np.testing.assert_array_equal(got, expected)


def test_statistics_outputs_overlapping_data_are_refused(rng):
    x = rng.standard_normal((N, C)).astype(np.float32)
    dy = rng.standard_normal((N, C)).astype(np.float32)
    flat = x.reshape(-1)
    fresh = [np.zeros(C, np.float32) for _ in range(3)]
    for k, name in enumerate(["mean", "variance", "inv_std"]):
        outs = list(fresh)
        outs[k] = flat[C : 2 * C]
        before = x.copy()
        with pytest.raises(ValueError, match=f"{name} overlaps x"):
            _core.forward(x, np.empty_like(x), (1,), None, None, 1e-3, False, *outs)
        np.testing.assert_array_equal(x, before)
        if k < 2:
            with pytest.raises(ValueError, match=f"{name} overlaps x"):
                _core.moments(x, (1,), *outs[:2])
            np.testing.assert_array_equal(x, before)
    y = np.empty_like(x)
    with pytest.raises(ValueError, match="out overlaps mean"):
        _core.forward(x, y, (1,), None, None, 1e-3, False, y.reshape(-1)[:C], *fresh[1:])
    with pytest.raises(ValueError, match="mean overlaps variance"):
        _core.forward(x, y, (1,), None, None, 1e-3, False, fresh[0], fresh[0], fresh[2])
    gamma = np.ones(C, np.float32)
    with pytest.raises(ValueError, match="inv_std overlaps gamma"):
        _core.forward(x, y, (1,), gamma, None, 1e-3, False, fresh[0], fresh[1], gamma)
    mean, inv = np.zeros(C, np.float32), np.ones(C, np.float32)
    for name, target in [("x", x), ("dy", dy), ("out", y)]:
        for k, grad in enumerate(["dgamma", "dbeta"]):
            outs = [np.zeros(C, np.float32), np.zeros(C, np.float32)]
            outs[k] = target.reshape(-1)[-C:]
            with pytest.raises(ValueError, match=f"(out overlaps {grad}|{grad} overlaps {name})"):
                _core.backward(dy, x, y, (1,), mean, inv, None, None, False, *outs)
    with pytest.raises(ValueError, match="dgamma overlaps inv_std"):
        _core.backward(dy, x, y, (1,), mean, inv, None, None, False, inv, np.zeros(C, np.float32))
