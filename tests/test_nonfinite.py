"""NaN and Inf (docs/reliability.md, "NaN/Inf"): they propagate per channel as IEEE
arithmetic does, never across channels, with no hang or crash - in the functional API
and in every layer (training, inference, backward, moving/running statistics).

The property tested: batch norm is per channel, so planting non-finite (or huge, or
subnormal) values in some channels must leave every other channel's results *bit for
bit* as they are when those channels hold ordinary numbers instead; and a channel that
holds a NaN gets NaN statistics and NaN outputs. (test_numerics.py checks the
functional API's non-finite channels against the float64 reference; this file adds
parameters, layouts, the layers and their state.)
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from layer_state import LAYER_KINDS, make_layer, train_input, training_call
from reference import BF16, F16, F32, F64

BAD = {
    "nan": np.nan,
    "inf": np.inf,
    "-inf": -np.inf,
}


def _finfo(dtype: np.dtype) -> Any:
    return ml_dtypes.finfo(dtype) if dtype == BF16 else np.finfo(dtype)


def _huge(dtype: np.dtype) -> float:
    """Half the largest finite value: its square, and the variance, overflow the dtype."""
    return float(_finfo(dtype).max) / 2


def _plant(x: np.ndarray, axis_c: int, channel: int, value: float, where: str) -> np.ndarray:
    """x with `value` at one place (or everywhere) in one channel along axis_c."""
    y = x.copy()
    sel = [slice(None)] * x.ndim
    sel[axis_c] = channel
    part = y[tuple(sel)]
    if where == "all":
        part[...] = value
    else:  # (part is a view; reshape(-1) could be a copy)
        part[np.unravel_index(0 if where == "first" else part.size // 2, part.shape)] = value
    assert (y != x).any() or np.isnan(value)
    return y


def _others(a: np.ndarray, axis_c: int, channel: int) -> np.ndarray:
    return np.delete(np.asarray(a), channel, axis=axis_c)


def _bits(a: Any) -> bytes:
    return np.ascontiguousarray(a).tobytes()


# ---- the functional API -------------------------------------------------------------------

CASES = [  # (shape, axis, layout)
    ((16, 5), -1, "c"),
    ((4096, 12), -1, "c"),  # threaded rows
    ((6, 5, 40, 40), 1, "c"),  # threaded channels-first
    ((6, 5, 9, 7), 1, "channels_last"),
    ((7, 5, 11), 1, "negative"),
    ((9, 5, 13), 1, "step"),
]


def _all_functions(x: np.ndarray, dy: np.ndarray, gamma, beta, axis) -> dict[str, np.ndarray]:
    mean, var = bn.moments(x, axis=axis)
    y, st = bn.forward(x, gamma, beta, axis=axis, epsilon=1e-3, activation="relu")
    dx, dg, db = bn.backward(dy, x, st, gamma, beta, axis=axis, activation="relu")
    y2, st2 = bn.forward(x, gamma, beta, axis=axis, epsilon=1e-3)
    dx2, dg2, db2 = bn.backward(dy, x, st2, gamma, beta, axis=axis)
    yn = bn.normalize(x, mean, var, gamma, beta, axis=axis, epsilon=1e-3)
    return {"mean": mean, "var": var, "y": y, "inv_std": st.inv_std, "dx": dx, "dgamma": dg, "dbeta": db,
            "y2": y2, "dx2": dx2, "dgamma2": dg2, "dbeta2": db2, "normalize": yn}  # fmt: skip


PER_CHANNEL = ("mean", "var", "inv_std", "dgamma", "dbeta", "dgamma2", "dbeta2")


@pytest.mark.parametrize(("shape", "axis", "layout"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("what", ["nan", "inf", "-inf", "huge", "subnormal", "nan-everywhere", "inf-everywhere"])
def test_functional_bad_values_stay_in_their_channel(shape, axis, layout, dtype, what, rng, restore_threads):
    bn.set_num_threads(2)
    c_axis = ref.canon_axes(axis, len(shape))[0]
    x = ref.random_data(rng, shape, dtype, axis)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = ref.random_params(rng, ref.kept_shape(shape, axis), dtype)
    channel = 2
    value = {"huge": _huge(dtype), "subnormal": float(_finfo(dtype).smallest_subnormal)}.get(
        what, BAD.get(what.split("-")[0] if what.endswith("everywhere") else what, 0.0)
    )
    where = "all" if what.endswith("everywhere") else "middle"
    bad_x = _plant(x, c_axis, channel, value, where)
    clean = _all_functions(ref.make_layout(x, layout), ref.make_layout(dy, layout), gamma, beta, axis)
    got = _all_functions(ref.make_layout(bad_x, layout), ref.make_layout(dy, layout), gamma, beta, axis)
    for k, v in got.items():
        per_channel = k in PER_CHANNEL
        ax = 0 if per_channel else c_axis
        assert _bits(_others(v, ax, channel)) == _bits(_others(clean[k], ax, channel)), f"{k}: other channels changed"
    if what.startswith("nan") or what.startswith("inf") or what == "-inf":
        # IEEE: a NaN or an infinity makes the channel's variance NaN, hence y and dx
        assert np.isnan(got["var"][channel])
        assert np.isnan(got["inv_std"][channel])
        for k in ("y", "y2", "dx", "dx2", "normalize"):
            sel = [slice(None)] * len(shape)
            sel[c_axis] = channel
            assert np.isnan(got[k][tuple(sel)].astype(np.float64)).all(), k
        if what.startswith("nan"):
            assert np.isnan(got["mean"][channel])


@pytest.mark.parametrize("param", ["gamma", "beta", "mean", "variance", "dy"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_functional_bad_parameters_stay_in_their_channel(param, value, rng):
    shape, axis = (64, 6, 10), 1
    x = ref.random_data(rng, shape, F32, axis)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = ref.random_params(rng, (6,), F32)
    mean, var = bn.moments(x, axis=axis)
    args = {"gamma": gamma, "beta": beta, "mean": mean, "variance": var, "dy": dy}
    bad = {k: v.copy() for k, v in args.items()}
    if param == "dy":
        bad["dy"][3, 4, 5] = value
    else:
        bad[param][4] = value

    def run(a: dict[str, np.ndarray]) -> list[np.ndarray]:
        yn = bn.normalize(x, a["mean"], a["variance"], a["gamma"], a["beta"], axis=axis)
        y, st = bn.forward(x, a["gamma"], a["beta"], axis=axis, activation="relu")
        dx, dg, db = bn.backward(a["dy"], x, st, a["gamma"], a["beta"], axis=axis, activation="relu")
        dx_lin, dg_lin, db_lin = bn.backward(a["dy"], x, st, a["gamma"], a["beta"], axis=axis)
        return [yn, y, dx, dg, db, dx_lin, dg_lin, db_lin]

    clean, got = run(args), run(bad)
    for i, (g, c) in enumerate(zip(got, clean, strict=True)):
        ax = 0 if g.ndim == 1 else axis
        assert _bits(_others(g, ax, 4)) == _bits(_others(c, ax, 4)), f"output {i}: other channels changed"
    if param != "dy" and not (param == "variance" and value == np.inf):  # inv_std = 1/sqrt(inf) = 0: y = beta
        assert not np.isfinite(got[0][:, 4]).any(), "normalize did not propagate the bad parameter"
    if param == "dy":  # (with the ReLU, a bad dy where the unit is off is dropped, as torch's threshold_backward)
        assert not np.isfinite(got[5][:, 4]).any()
        assert not np.isfinite(got[6][4])
        assert not np.isfinite(got[7][4])


# ---- the layers ---------------------------------------------------------------------------------


def _channel_axis(layer: Any, ndim: int) -> int:
    """The (first) channel axis of the layer's inputs."""
    if isinstance(layer, bn.BatchNormalization):
        return (layer.axis[0] if isinstance(layer.axis, list) else layer.axis) % ndim
    return 1


def _state(layer: Any) -> list[np.ndarray]:
    if isinstance(layer, bn.BatchNormalization):
        return layer.get_weights()
    return [v for k, v in layer.state_dict().items() if k != "num_batches_tracked"]


def _param_channel_axis(w: np.ndarray, x_ndim: int, c_axis: int) -> int:
    """The axis of a weight array along which the input's axis c_axis runs: 0 for (C,)
    weights, c_axis for Keras keepdims weights, c_axis + 1 for virtual-batch ones."""
    return 0 if w.ndim == 1 else c_axis + (w.ndim - x_ndim)


# The layers' per-channel bookkeeping is NumPy, which warns where IEEE arithmetic makes a
# NaN from an infinity (inf - inf in a moving average); the results are the IEEE ones.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("what", ["nan", "inf", "huge"])
def test_layers_keep_bad_values_in_their_channel(kind, what):
    """Train twice, backward, optimizer step, then infer - with a bad value in channel 1
    of the first batch: channel 1 goes NaN (for nan/inf) in the outputs, and non-finite in
    the moving statistics; channels 0 and 2 are bit for bit those of a clean run."""
    from batchnorm import optimizers

    x = train_input(kind)
    huge = 3e4 if kind == "keras-float16" else 1e38  # inputs are cast to the layer's dtype
    value = {"nan": np.nan, "inf": np.inf, "huge": huge}[what]

    def run(poison: bool) -> tuple[list[np.ndarray], Any]:
        layer = make_layer(kind, trained=False)
        opt = optimizers.SGD(learning_rate=0.1, momentum=0.5)
        c_axis = _channel_axis(layer, x.ndim)
        outs = []
        for step in range(2):
            xi = x * (1 + step)
            if poison and step == 0:
                xi = _plant(xi, c_axis, 1, value, "middle")
            y = training_call(layer, xi)
            dx = layer.backward(np.cos(y).astype(y.dtype))
            opt.step(layer)
            outs += [y, dx]
        if isinstance(layer, bn.BatchNormalization):
            outs.append(layer(x, training=False))
        else:
            layer.eval()
            outs.append(layer(x))
        return outs, layer, c_axis

    clean, clean_layer, c_axis = run(False)
    got, layer, _ = run(True)
    for i, (g, c) in enumerate(zip(got, clean, strict=True)):
        assert _bits(_others(g, c_axis, 1)) == _bits(_others(c, c_axis, 1)), f"output {i}: other channels changed"
    for g, c in zip(_state(layer), _state(clean_layer), strict=True):
        ax = _param_channel_axis(c, x.ndim, c_axis)
        assert _bits(_others(g, ax, 1)) == _bits(_others(c, ax, 1)), "state of other channels changed"
    if what in ("nan", "inf"):
        sel = [slice(None)] * x.ndim
        sel[c_axis] = 1
        nan = np.isnan(got[0][tuple(sel)].astype(np.float64))
        # (axis [1, 3]: x[:, 1] holds 5 channels, one poisoned; virtual batches: one poisoned)
        assert nan.any() if kind in ("keras-axes", "keras-vbs") else nan.all(), "the poisoned channel's y is not NaN"
        moving = layer.moving_mean if isinstance(layer, bn.BatchNormalization) else layer.running_mean
        if moving is not None:
            assert not np.isfinite(moving).all(), "the poisoned channel's moving statistics are finite"


@pytest.mark.parametrize("kind", ["keras", "keras-renorm", "torch2d", "torch2d-cumulative", "sync"])
@pytest.mark.parametrize("which", ["gamma", "moving_variance"])
def test_layer_with_a_nan_parameter_infers_nan_in_that_channel_only(kind, which):
    layer = make_layer(kind)
    x = train_input(kind, seed=3)
    keras = isinstance(layer, bn.BatchNormalization)
    c_axis = _channel_axis(layer, x.ndim)

    def infer() -> np.ndarray:
        if keras:
            return layer(x, training=False)
        layer.eval()
        return layer(x)

    clean = infer()
    if keras:
        w = getattr(layer, which)
        w.reshape(-1)[1] = np.nan
    else:
        w = layer.weight if which == "gamma" else layer.running_var
        w[1] = np.nan
    got = infer()
    assert _bits(_others(got, c_axis, 1)) == _bits(_others(clean, c_axis, 1))
    sel = [slice(None)] * x.ndim
    sel[c_axis] = 1
    assert np.isnan(got[tuple(sel)]).all()
