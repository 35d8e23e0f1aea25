"""The bad-input table: every public function and layer, every misuse, and the messages
that name it.

ONE table, ``ROWS``: each row is (id, callable, arguments, expected exception type,
message regex), at least one per (entry point, misuse); it is the inventory
``docs/reliability.md`` counts. tests/error_rows.py runs a row: the exception type, the
message, and nothing changed (layers, argument arrays, the thread count). Rows where a crash
is conceivable (odd strides, huge shapes, overlapping or aliasing ``out=``) are
``isolated``: they run in a child Python, so a segfault fails that row alone.

The table reaches everything through the public names (``bn.*``), and a message that rows
of several sections expect is one constant below, so a moved module or a reworded message
is one line here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import batchnorm as bn
from batchnorm import optimizers
from error_rows import File, Layer, Row, check_row, run_isolated
from layer_state import make_layer
from reference import BF16

# Messages of one check each that rows of several sections expect.
X_DTYPE = r"must be a float16, bfloat16, float32 or float64 array; got dtype {}"
NO_FEATURE_AXIS = r"at least one feature axis"
EMPTY_BATCH = r"empty batch"
EPSILON = r"epsilon must be a finite number >= 0"
MOMENTUM = r"momentum must be in \[0, 1\]"

ROWS: list[Row] = []


def row(
    id: str, exc: type[BaseException], match: str, call: Callable[..., Any] | str, *args: Any, **kwargs: Any
) -> Row:
    r = Row(id, call, args, kwargs, exc, match)
    ROWS.append(r)
    return r


def isolated(r: Row) -> None:
    ROWS[ROWS.index(r)] = dataclasses.replace(r, isolated=True)


# ---- shared arguments (a row never writes them: checked after each row) ----------------------

_rng = np.random.default_rng(2024)
X = _rng.normal(1.0, 2.0, (8, 3)).astype(np.float32)  # (batch, channels)
X4 = _rng.normal(1.0, 2.0, (4, 3, 2, 2)).astype(np.float32)
DY = _rng.standard_normal((8, 3)).astype(np.float32)
ST = bn.forward(X)[1]
ZEROS3, ONES3 = np.zeros(3, np.float32), np.ones(3, np.float32)
OUT = np.zeros((8, 3), np.float32)
OUT_RO = np.zeros((8, 3), np.float32)
OUT_RO.flags.writeable = False
# out aliasing x: x is BUF[:24]; a shifted window, a reversed view, a column-reversed view.
BUF = np.arange(30, dtype=np.float32)
XB = BUF[:24].reshape(8, 3)
STB = bn.forward(XB)[1]
OUT_SHIFTED = BUF[3:27].reshape(8, 3)
OUT_SHIFTED_1 = BUF[1:25].reshape(8, 3)  # by one element, not a whole row
OUT_REVERSED = XB[::-1]
OUT_COLS_REVERSED = XB[:, ::-1]
DYB = np.zeros(30, np.float32)
DY_WINDOW = DYB[:24].reshape(8, 3)
OUT_OVER_DY = DYB[2:26].reshape(8, 3)
# out whose own elements alias each other: a zero stride, or rows two elements apart.
OUT_ZERO_STRIDE = as_strided(np.zeros(3, np.float32), shape=(8, 3), strides=(0, 4), writeable=True)
OUT_SELF_OVERLAP = as_strided(np.zeros(40, np.float32), shape=(8, 3), strides=(8, 4), writeable=True)
# out with strides that are not whole elements, and out at an odd address.
OUT_ODD_STRIDES = as_strided(np.zeros(64, np.float32), shape=(8, 3), strides=(8, 2), writeable=True)
OUT_MISALIGNED = np.ndarray((8, 3), np.float32, buffer=bytearray(4 * 24 + 1), offset=1)
# huge zero-stride inputs (no memory behind them)
HUGE_EMPTY = np.broadcast_to(np.float32(1.0), (0, 2**40))
HUGE_ROWS = np.broadcast_to(np.float32(1.0), (2**40, 3))


def _as(dtype: Any, a: np.ndarray = X) -> np.ndarray:
    return a.astype(dtype)


OBJ = np.empty((8, 3), object)
OBJ[...] = 1.0
# x of other dtypes: (label, array, expected message)
# x of dtypes that are not floating point, or not supported: (label, array)
BAD_X = [(np.dtype(d).name, _as(d)) for d in (np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128)]
BAD_X += [("object", OBJ), ("str", _as("U4"))]
if np.dtype(np.longdouble).itemsize > 8:
    BAD_X.append(("longdouble", _as(np.longdouble)))
X_IN_PLACE = X.copy()  # out= x in rows whose call fails


def _shape(a: np.ndarray) -> str:
    """The regex of a shape as messages print it."""
    return re.escape(str(a.shape))


# ---- the functional API ------------------------------------------------------------------------


def _normalize(x: Any, **kw: Any) -> Any:
    """normalize with valid per-channel arrays for a (., 3) x."""
    return bn.normalize(x, ZEROS3, ONES3, **kw)


def _backward(x: Any, **kw: Any) -> Any:
    """backward with dy = x and the statistics of X."""
    return bn.backward(x, x, ST, **kw)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "moments": bn.moments,
    "normalize": _normalize,
    "forward": bn.forward,
    "backward": _backward,
}
WITH_OUT = ("normalize", "forward", "backward")

for name, fn in FUNCTIONS.items():
    # wrong ndim
    row(f"{name}/ndim-0", ValueError, r"at least (1 dimension|2 dimensions).*ndim 0", fn, np.float32(1.0))
    if name != "normalize":
        row(f"{name}/ndim-1", ValueError, r"at least 2 dimensions \(a batch axis and a feature axis\)", fn, X[0])
    for label, value in [("None", None), ("str", "ab"), ("dict", {})]:  # not arrays: a wrong type, not a wrong ndim
        row(f"{name}/x-not-an-array-{label}", TypeError, r"x must be a float16, bfloat16, float32 or float64 array",
            fn, value)  # fmt: skip
    # axes
    for label, axis, bad in [("out-of-range", 2, 2), ("negative-out-of-range", -3, -3), ("huge", 2**64, 2**64),
                             ("100", 100, 100), ("out-of-range-in-tuple", (0, 2), 2),
                             ("negative-out-of-range-in-tuple", (-3,), -3)]:  # fmt: skip
        row(f"{name}/axis-{label}", ValueError, rf"axis {bad} is out of range for an array of ndim 2", fn, X, axis=axis)
    for label, axis, bad in [("", (3, -1), -1), ("-twice", (1, 1), 1), ("-as-negative", (1, -3), -3),
                             ("-of-three", (0, 2, -4), -4)]:  # fmt: skip
        row(f"{name}/axis-repeated{label}", ValueError, rf"axis {bad} is repeated in the feature axes", fn, X4,
            axis=axis)  # fmt: skip
    row(f"{name}/axis-empty", ValueError, NO_FEATURE_AXIS, fn, X, axis=())
    for label, axis in [("float", 1.0), ("bool", True), ("str", "1"), ("None", None), ("float-in-tuple", (1.0,)),
                        ("str-in-tuple", (1, "2")), ("bool-in-tuple", (True,)), ("object", object())]:  # fmt: skip
        row(f"{name}/axis-{label}", TypeError, r"axis must be an int or a tuple of ints", fn, X4, axis=axis)
    # dtypes of x
    for label, bad in BAD_X:
        row(f"{name}/x-{label}", TypeError, X_DTYPE.format(bad.dtype), fn, bad)
    for label, bad in [("big-endian-f4", _as(">f4")), ("big-endian-f8", _as(">f8")), ("big-endian-f2", _as(">f2"))]:
        row(f"{name}/x-{label}", TypeError, r"big-endian", fn, bad)

# per-channel arrays of the wrong size, or of a type that is not a real number
_PARAMS = {"mean": ZEROS3, "variance": ONES3, "gamma": ONES3, "beta": ZEROS3}
for which in _PARAMS:
    for label, bad, exc, msg in [
        ("size-2", np.ones(2, np.float32), ValueError, rf"{which} has 2 elements; expected 3 \(one per channel\)"),
        ("size-4", np.ones((2, 2)), ValueError, rf"{which} has 4 elements; expected 3"),
        ("size-4-flat", np.ones(4, np.float32), ValueError, rf"{which} has 4 elements; expected 3"),
        ("size-1", np.ones(1, np.float32), ValueError, rf"{which} has 1 elements; expected 3"),
        ("size-0", np.ones(0), ValueError, rf"{which} has 0 elements; expected 3"),
        ("complex", np.ones(3, np.complex64), TypeError, rf"{which} must be a real numeric array.*complex64"),
        ("object", np.array([1.0, None, 2.0], object), TypeError, rf"{which} must be a real numeric array.*object"),
        ("str", np.array(["1", "2", "3"]), TypeError, rf"{which} must be a real numeric array.*<U1"),
    ]:
        row(f"normalize/{which}-{label}", exc, msg, bn.normalize, X, **{**_PARAMS, which: bad})
        if which in ("gamma", "beta"):
            row(f"forward/{which}-{label}", exc, msg, bn.forward, X, **{which: bad})
            row(f"backward/{which}-{label}", exc, msg, bn.backward, DY, X, ST, **{which: bad})
# (4, 3, 2, 2) with feature axes (1, 3): 6 channels, so 3 values (one per axis-1 entry) are too few
row("normalize/mean-size-of-one-feature-axis", ValueError, r"mean has 3 elements; expected 6", bn.normalize, X4,
    ZEROS3, np.ones(6), axis=(1, 3))  # fmt: skip
for which in ("mean", "inv_std"):
    row(f"backward/stats.{which}-size-5", ValueError, rf"stats\.{which} has 5 elements; expected 3", bn.backward, DY, X,
        ST._replace(**{which: np.ones(5, np.float32)}))  # fmt: skip
    row(f"backward/stats.{which}-complex", TypeError, rf"stats\.{which} must be a real numeric", bn.backward, DY, X,
        ST._replace(**{which: np.ones(3, np.complex128)}))  # fmt: skip
row("backward/stats-of-another-shape", ValueError, r"stats\.(mean|inv_std) has 5 elements; expected 3", bn.backward,
    DY, X, bn.forward(np.ones((8, 5), np.float32))[1])  # fmt: skip
for label, stats in [("None", None), ("tuple", tuple(ST)), ("dict", ST._asdict()), ("str", "stats"), ("array", ZEROS3)]:
    row(f"backward/stats-{label}", TypeError, r"stats must be the BatchStats that forward\(\) returned", bn.backward,
        DY, X, stats)  # fmt: skip

# x and dy that do not match
for label, dy in [("float64", _as(np.float64, DY)), ("float16", _as(np.float16, DY)), ("bfloat16", _as(BF16, DY))]:
    row(f"backward/dy-{label}-x-float32", TypeError, rf"dy has dtype {label}; expected float32", bn.backward, dy, X, ST)
row("backward/dy-int32", TypeError, r"dy must be a float16.*got dtype int32", bn.backward, _as(np.int32, DY), X, ST)
for label, dy in [("dy-shape", DY[:4]), ("dy-transposed", DY.T), ("dy-shape-extra-dim", DY[..., None])]:
    row(f"backward/{label}", ValueError, rf"dy has shape {_shape(dy)}; expected \(8, 3\)", bn.backward, dy, X,
        ST)  # fmt: skip
row("backward/dy-flat", ValueError, r"dy must have at least 2 dimensions", bn.backward, DY.reshape(-1), X, ST)

# empty batch (statistics need values); statistics of nothing, even when huge
for label, x, axis in [("rows", np.ones((0, 3), np.float32), -1), ("axis-1", np.ones((2, 0, 3), np.float32), (0, 2)),
                       ("channels-first", np.ones((0, 3, 4), np.float32), 1),
                       ("axis-0", np.ones((3, 0), np.float32), 0)]:  # fmt: skip
    row(f"moments/empty-batch-{label}", ValueError, r"moments of an " + EMPTY_BATCH, bn.moments, x, axis=axis)
    row(f"forward/empty-batch-{label}", ValueError, r"training on an " + EMPTY_BATCH, bn.forward, x, axis=axis)
isolated(row("moments/empty-batch-huge-channels", ValueError, r"moments of an " + EMPTY_BATCH, bn.moments, HUGE_EMPTY))
isolated(row("forward/empty-batch-huge-channels", ValueError, r"training on an " + EMPTY_BATCH, bn.forward, HUGE_EMPTY))

# out=
_OUT_CALLS: dict[str, Callable[..., Any]] = {
    "normalize": lambda x, **kw: bn.normalize(x, ZEROS3, ONES3, **kw),
    "forward": lambda x, **kw: bn.forward(x, **kw),  # noqa: PLW0108 - a function of its own, named below
    "backward": lambda x, **kw: bn.backward(x, x, STB if x is XB else ST, **kw),
}
_OUT_FNS: dict[str, Callable[..., Any]] = {}
for name, call in _OUT_CALLS.items():
    call.__name__ = call.__qualname__ = name
    _OUT_FNS[name] = call
for name, fn in _OUT_FNS.items():
    row(f"{name}/out-read-only", ValueError, r"out is read-only", fn, X, out=OUT_RO)
    row(f"{name}/out-broadcast", ValueError, r"out is read-only", fn, X, out=np.broadcast_to(np.float32(0), (8, 3)))
    for label, out in [
        ("", OUT.T),
        ("-flat", OUT.reshape(-1)),
        ("-channels", OUT[:, :2]),
        ("-extra-dim", OUT[..., None]),
    ]:
        row(f"{name}/out-shape{label}", ValueError, rf"out has shape {_shape(out)}; expected \(8, 3\)", fn, X, out=out)
    for label, dtype in [("float64", np.float64), ("float16", np.float16), ("bfloat16", BF16)]:
        row(f"{name}/out-{label}", TypeError, rf"out has dtype {label}; expected float32", fn, X, out=_as(dtype, OUT))
    row(f"{name}/out-int32", TypeError, r"out must be a float16.*got dtype int32", fn, X, out=_as(np.int32, OUT))
    for label, out in [("list", OUT.tolist()), ("str", "out"), ("float", 1.0)]:
        row(f"{name}/out-{label}", TypeError, rf"out must be a NumPy array, got {label}", fn, X, out=out)
    for label, out in [("shifted", OUT_SHIFTED), ("shifted-1", OUT_SHIFTED_1), ("reversed", OUT_REVERSED),
                       ("columns-reversed", OUT_COLS_REVERSED)]:  # fmt: skip
        isolated(row(f"{name}/out-overlaps-x-{label}", ValueError, r"out overlaps an input", fn, XB, out=out))
    isolated(row(f"{name}/out-zero-stride", ValueError, r"zero stride|overlaps itself", fn, X, out=OUT_ZERO_STRIDE))
    isolated(row(f"{name}/out-overlaps-itself", ValueError, r"out overlaps itself", fn, X, out=OUT_SELF_OVERLAP))
    isolated(row(f"{name}/out-odd-strides", ValueError, r"strides that are not whole elements|overlaps itself", fn,
                 X, out=OUT_ODD_STRIDES))  # fmt: skip
    isolated(row(f"{name}/out-misaligned", ValueError, r"out is not aligned", fn, X, out=OUT_MISALIGNED))
    isolated(row(f"{name}/out-shape-huge-x", ValueError, r"out has shape \(8, 3\); expected \(1099511627776, 3\)",
                 fn, HUGE_ROWS, out=OUT))  # fmt: skip
isolated(row("backward/out-overlaps-dy", ValueError, r"out overlaps an input", bn.backward, DY_WINDOW, X, ST,
             out=OUT_OVER_DY))  # fmt: skip
isolated(row("backward/dy-shape-huge", ValueError, r"dy has shape \(1099511627776, 3\)", bn.backward, HUGE_ROWS, X, ST))

# epsilon, activation
for name in ("normalize", "forward"):
    fn = FUNCTIONS[name]
    for label, eps in [("negative", -1e-3), ("nan", float("nan")), ("inf", float("inf")), ("-inf", -float("inf")),
                       ("huge-int", 10**400)]:  # fmt: skip
        row(f"{name}/epsilon-{label}", ValueError, EPSILON, fn, X, epsilon=eps)
    for label, eps in [("str", "1e-3"), ("complex", 1e-3j)]:
        row(f"{name}/epsilon-{label}", TypeError, rf"epsilon must be a real number, got {label}", fn, X, epsilon=eps)
for name, fn in FUNCTIONS.items():
    acts = [("", "gelu"), ("-tanh", "tanh"), ("-ReLU", "ReLU"), ("-empty", ""), ("-int", 1), ("-list", ["relu"])]
    for label, act in acts if name != "moments" else []:
        row(f"{name}/activation{label}", ValueError, rf"activation must be None or 'relu', got {re.escape(repr(act))}",
            fn, X, activation=act)  # fmt: skip
# a failed call with out= x leaves x as it was (checked after every row)
row("forward/in-place-epsilon", ValueError, EPSILON, bn.forward, X_IN_PLACE, epsilon=-1.0, out=X_IN_PLACE)
row("forward/in-place-gamma-size-2", ValueError, r"gamma has 2 elements", bn.forward, X_IN_PLACE, np.ones(2),
    out=X_IN_PLACE)  # fmt: skip
row("normalize/in-place-activation", ValueError, r"activation must be None or 'relu'", _normalize, X_IN_PLACE,
    activation="gelu", out=X_IN_PLACE)  # fmt: skip

# threads (the thread count is checked unchanged after every row)
for label, n, exc, msg in [
    ("zero", 0, ValueError, r"n >= 1"),
    ("negative", -4, ValueError, r"n >= 1"),
    ("int-min", -(2**31), ValueError, r"n >= 1"),
    ("huge", 2**40, ValueError, r"n <= 2\*\*31 - 1"),
    ("str", "2", TypeError, r"set_num_threads takes an int, got str"),
    ("float", 2.0, TypeError, r"set_num_threads takes an int, got float"),
    ("float-fraction", 1.5, TypeError, r"set_num_threads takes an int, got float"),
    ("None", None, TypeError, r"set_num_threads takes an int, got NoneType"),
    ("bool", True, TypeError, r"set_num_threads takes an int, got bool"),
    ("numpy-float", np.float64(2), TypeError, r"set_num_threads takes an int, got (numpy\.)?float64"),
]:
    row(f"set_num_threads/{label}", exc, msg, bn.set_num_threads, n)


# masks (moments, forward, backward): x is (8, 3) with axis -1, so a mask is shaped (8,)
_MASK_FUNCTIONS = {
    "moments": lambda mask: bn.moments(X, -1, mask=mask),
    "forward": lambda mask: bn.forward(X, mask=mask),
    "backward": lambda mask: bn.backward(DY, X, ST, mask=mask),
}
for name, fn in _MASK_FUNCTIONS.items():
    for label, error, pattern, mask in [
        ("shape", ValueError, r"mask of shape \(5,\) does not broadcast to \(8,\)", np.ones(5, bool)),
        ("per-channel", ValueError, r"mask of shape \(8, 3\) does not broadcast to \(8,\)", np.ones((8, 3), bool)),
        (
            "float",
            TypeError,
            r"mask must be a boolean \(or 0/1 integer\) array, got dtype float32",
            np.ones(8, np.float32),
        ),
        ("str", TypeError, r"mask must be a boolean \(or 0/1 integer\) array", "ab"),
        ("not-0-1", ValueError, r"mask must hold only 0 and 1", np.full(8, 2)),
        ("selects-nothing", ValueError, r"the mask selects nothing", np.zeros(8, bool)),
    ]:
        row(f"{name}/mask-{label}", error, pattern, fn, mask)


# ---- the Keras-style layer ---------------------------------------------------------------------

K = bn.BatchNormalization
for label, kwargs, exc, msg in [
    ("momentum-above-1", {"momentum": 1.5}, ValueError, MOMENTUM + r".*got 1\.5"),
    ("momentum-negative", {"momentum": -0.1}, ValueError, MOMENTUM),
    ("momentum-nan", {"momentum": float("nan")}, ValueError, MOMENTUM + r".*nan"),
    ("momentum-inf", {"momentum": float("inf")}, ValueError, MOMENTUM + r".*inf"),
    ("momentum-str", {"momentum": "0.9"}, TypeError, r"momentum must be a real number"),
    ("renorm-momentum-above-1", {"renorm": True, "renorm_momentum": 2.0}, ValueError, r"renorm_momentum must be in"),
    ("epsilon-negative", {"epsilon": -1e-3}, ValueError, EPSILON),
    ("epsilon-nan", {"epsilon": float("nan")}, ValueError, EPSILON),
    ("epsilon-inf", {"epsilon": float("inf")}, ValueError, EPSILON),
    ("epsilon-huge-int", {"epsilon": 10**400}, ValueError, EPSILON),
    ("epsilon-str", {"epsilon": "0.001"}, TypeError, r"epsilon must be a real number"),
    ("axis-str", {"axis": "x"}, TypeError, r"argument 'axis'"),
    ("axis-empty", {"axis": []}, ValueError, NO_FEATURE_AXIS),
    ("renorm-clipping-key", {"renorm": True, "renorm_clipping": {"rmax": 2, "foo": 1}}, ValueError, r"invalid keys"),
    (
        "renorm-clipping-rmax-below-rmin",
        {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2}},
        ValueError,
        r"rmax \(0\.5\) must be >= rmin \(2\.0\)",
    ),
    ("renorm-clipping-dmax", {"renorm": True, "renorm_clipping": {"dmax": -1}}, ValueError, r"dmax must be >= 0"),
    (
        "renorm-clipping-nan",
        {"renorm": True, "renorm_clipping": {"rmax": float("nan")}},
        ValueError,
        r"'rmax'\] is NaN",
    ),
    ("renorm-clipping-list", {"renorm": True, "renorm_clipping": [1]}, TypeError, r"renorm_clipping must be a dict"),
    ("renorm-clipping-str", {"renorm": True, "renorm_clipping": {"rmax": "2"}}, TypeError, r"'rmax'\] must be a real"),
    ("vbs-zero", {"virtual_batch_size": 0}, ValueError, r"virtual_batch_size` must be a positive integer"),
    ("vbs-negative", {"virtual_batch_size": -2}, ValueError, r"virtual_batch_size` must be a positive integer"),
    ("vbs-float", {"virtual_batch_size": 2.5}, TypeError, r"virtual_batch_size must be a positive int"),
    ("vbs-bool", {"virtual_batch_size": True}, TypeError, r"virtual_batch_size must be a positive int"),
    ("dtype-int32", {"dtype": "int32"}, TypeError, r"dtype must be float16, bfloat16, float32 or float64"),
    ("dtype-complex", {"dtype": np.complex64}, TypeError, r"dtype must be float16, bfloat16, float32 or float64"),
    ("dtype-big-endian", {"dtype": ">f4"}, TypeError, r"dtype must be float16, bfloat16, float32 or float64"),
    ("fused-renorm", {"fused": True, "renorm": True}, ValueError, r"`fused=True` and `renorm=True`"),
    ("fused-float64", {"fused": True, "dtype": "float64"}, ValueError, r"float16, bfloat16, or float32"),
    ("name-int", {"name": 3}, TypeError, r"name must be a string"),
    ("adjustment-not-callable", {"adjustment": 3}, TypeError, r"adjustment must be a callable"),
]:
    row(f"BatchNormalization/init-{label}", exc, msg, K, **kwargs)
row(
    "BatchNormalization/from_config-unknown-key",
    TypeError,
    r"unexpected keyword argument 'foo'",
    K.from_config,
    {"foo": 1},
)
row(
    "BatchNormalization/from_config-synchronized",
    ValueError,
    r"synchronized=True",
    K.from_config,
    {"synchronized": True},
)

_c = np.ones((8, 3), np.complex64)
for kind in ("keras", "keras-renorm", "keras-vbs", "keras-float16", "keras-sync"):
    L = Layer(kind)
    row(f"{kind}/call-ndim-1", ValueError, r"expected ndim=2, found ndim=1", "__call__", L, X[0], training=True)
    row(f"{kind}/call-ndim-3", ValueError, r"expected ndim=2, found ndim=3", "__call__", L, X[None], training=True)
    for label, training in (("call", True), ("infer", False)):
        row(f"{kind}/{label}-channels", ValueError, r"expected axis 1 of input shape to have value 3", "__call__", L,
            np.ones((8, 4), np.float32), training=training)  # fmt: skip
    row(
        f"{kind}/call-complex",
        TypeError,
        r"inputs must be a real numeric array; got dtype complex64",
        "__call__",
        L,
        _c,
        training=True,
    )
    row(f"{kind}/call-object", TypeError, r"got dtype object", "__call__", L, OBJ, training=True)
    row(f"{kind}/call-str", TypeError, r"got dtype <U4", "__call__", L, _as("U4"), training=True)
    row(
        f"{kind}/call-empty-batch",
        ValueError,
        EMPTY_BATCH,
        "__call__",
        L,
        np.ones((0, 3), np.float32),
        training=True,
    )
    row(f"{kind}/backward-dy-shape", ValueError, r"dy has shape \(4, 3\); expected \(8, 3\)", "backward", L, DY[:4])
    row(
        f"{kind}/backward-dy-complex",
        TypeError,
        r"dy must be a real numeric array; got dtype complex64",
        "backward",
        L,
        _c,
    )
    row(
        f"{kind}/backward-dy-object",
        TypeError,
        r"dy must be a real numeric array; got dtype object",
        "backward",
        L,
        OBJ,
    )
    row(
        f"{kind}/backward-before-forward",
        RuntimeError,
        r"backward\(\) called before any forward",
        "backward",
        Layer(kind, trained=False),
        DY,
    )
    row(
        f"{kind}/backward-built-never-called",
        RuntimeError,
        r"before any forward",
        "backward",
        Layer(kind, trained=False, build=(8, 3)),
        DY,
    )
    n = len(make_layer(kind).weights)
    row(
        f"{kind}/set_weights-too-few",
        ValueError,
        rf"weight list of length {n - 1}, but the layer was expecting {n}",
        "set_weights",
        L,
        [ONES3] * (n - 1),
    )
    row(
        f"{kind}/set_weights-too-many",
        ValueError,
        rf"length {n + 1}, but the layer was expecting {n}",
        "set_weights",
        L,
        [ONES3] * (n + 1),
    )
    shape = make_layer(kind).weights[0].shape
    row(
        f"{kind}/set_weights-shape",
        ValueError,
        r"weight shape .* is not compatible with provided weight shape \(4,\)",
        "set_weights",
        L,
        [np.ones(shape)] * (n - 1) + [np.ones(4)],
    )
    row(
        f"{kind}/set_weights-complex",
        TypeError,
        r"must be a real numeric array, got dtype complex128",
        "set_weights",
        L,
        [np.ones(shape, complex)] * n,
    )
    row(
        f"{kind}/set_weights-str",
        TypeError,
        r"must be a real numeric array, got dtype <U1",
        "set_weights",
        L,
        [np.full(shape, "1")] * n,
    )
row(
    "keras/set_weights-unbuilt",
    ValueError,
    r"expecting 0 weights\. The layer is not built yet",
    "set_weights",
    Layer("keras", trained=False),
    [ONES3] * 4,
)
row(
    "keras-axes/set_weights-shape",
    ValueError,
    r"weight shape \(1, 3, 1, 5\) is not compatible .* \(3, 5\)",
    "set_weights",
    Layer("keras-axes"),
    [np.ones((3, 5))] * 4,
)
for label, error, pattern, mask in [
    ("shape", ValueError, r"mask of shape \(5,\) does not match", np.ones(5, bool)),
    ("complex", TypeError, r"mask must be a boolean or numeric array", np.ones(8, complex)),
]:
    row(f"keras/mask-{label}", error, pattern, "__call__", Layer("keras"), X, training=True, mask=mask)
row(
    "keras-vbs/call-batch-not-divisible",
    ValueError,
    r"virtual_batch_size=4 does not divide the batch size 6",
    "__call__",
    Layer("keras-vbs"),
    X[:6],
    training=True,
)
row(
    "keras-vbs/unbuilt-batch-not-divisible",
    ValueError,
    r"virtual_batch_size=4 does not divide the batch size 6",
    "__call__",
    Layer("keras-vbs", trained=False),
    X[:6],
    training=True,
)
row(
    "keras-vbs/mask",
    ValueError,
    r"mask cannot be used with `virtual_batch_size`",
    "__call__",
    Layer("keras-vbs"),
    X,
    training=True,
    mask=np.ones(8),
)
row(
    "keras-axes/call-dims",
    ValueError,
    r"expected axis 3 of input shape to have value 5",
    "__call__",
    Layer("keras-axes"),
    np.ones((4, 3, 2, 4), np.float32),
    training=True,
)
row(
    "keras-adjustment/adjustment-shape",
    ValueError,
    r"does not broadcast to the per-channel shape",
    "__call__",
    Layer("keras", init={"adjustment": lambda s: (np.ones((8, 3)), 0.0)}, build=(8, 3)),
    X,
    training=True,
)
row(
    "keras-adjustment/save",
    ValueError,
    r"`adjustment` callable cannot be saved",
    "save",
    Layer("keras-adjustment"),
    os.devnull,
)
for label, kwargs, shape, msg in [
    ("ndim-1", {}, (3,), r"at least 2 dimensions"),
    ("axis-out-of-range", {"axis": 3}, (8, 3), r"Invalid value for `axis` argument"),
    ("axis-repeated", {"axis": [1, -1]}, (8, 3), r"Duplicate axis"),
    ("vbs-axis-0", {"virtual_batch_size": 2, "axis": 0}, (8, 3), r"axis cannot include 0"),
    ("fused-rank", {"fused": True}, (8, 3), r"only support 4D or 5D input"),
    ("undefined-feature-dim", {}, (8, None), r"undefined `axis` dimension"),
]:
    row(f"keras/build-{label}", ValueError, msg, "build", Layer("keras", init=kwargs), shape)
    if None not in shape:
        row(
            f"keras/first-call-{label}",
            ValueError,
            msg,
            "__call__",
            Layer("keras", init=kwargs),
            np.ones(shape, np.float32),
            training=True,
        )
row(
    "keras/first-call-complex", TypeError, r"real numeric", "__call__", Layer("keras", trained=False), _c, training=True
)
row(
    "keras/first-call-empty-batch",
    ValueError,
    EMPTY_BATCH,
    "__call__",
    Layer("keras", trained=False),
    np.ones((0, 3), np.float32),
    training=True,
)


row("SyncBatchNormalization/init-fused", ValueError, r"`fused` argument cannot be True", bn.SyncBatchNormalization,
    fused=True)  # fmt: skip
row("SyncBatchNormalization/init-vbs", ValueError, r"does not support `virtual_batch_size`", bn.SyncBatchNormalization,
    virtual_batch_size=2)  # fmt: skip
row("SyncBatchNormalization/init-momentum", ValueError, MOMENTUM, bn.SyncBatchNormalization,
    momentum=2.0)  # fmt: skip
COMM = r"comm must be an mpi4py communicator or None"
row("SyncBatchNormalization/init-comm-int", TypeError, COMM, bn.SyncBatchNormalization, comm=42)
row("SyncBatchNorm/init-comm-str", TypeError, COMM, bn.SyncBatchNorm, 3, comm="bogus")
row("SyncBatchNorm/convert-comm-str", TypeError, COMM, bn.SyncBatchNorm.convert_sync_batchnorm, Layer("torch2d"),
    comm="bogus")  # fmt: skip


_LOAD_MESSAGES = {
    "weights-missing": r"holds weights \[\]; the layer has",
    "weight-shape": r"weight 'gamma' has shape \(4,\)",
    "input-shape-huge": r"weight 'gamma' has shape \(3,\)",
    "compressed": r"entry 'config.npy' is compressed",
}
for name in [
    "empty", "truncated-head", "truncated-half", "truncated-tail", "corrupt", "text", "foreign", "config-only",
    "bad-json", "meta-not-a-dict", "config-not-a-dict", "config-numbers", "other-class", "other-format",
    "config-bad-value", "config-unknown-key", "input-shape-str", "weights-missing", "weight-shape", "weight-str",
    "weight-complex", "npy", "input-shape-huge", "compressed",
]:  # fmt: skip
    row(
        f"BatchNormalization.load/{name}",
        ValueError,
        _LOAD_MESSAGES.get(name, r"is not a BatchNormalization file"),
        K.load,
        File(name),
    )


# ---- the PyTorch-style layers and SyncBatchNorm -----------------------------------------------

TORCH = {"BatchNorm1d": bn.BatchNorm1d, "BatchNorm2d": bn.BatchNorm2d, "BatchNorm3d": bn.BatchNorm3d,
         "SyncBatchNorm": bn.SyncBatchNorm}  # fmt: skip
TORCH_LAYER = {"BatchNorm1d": "torch1d", "BatchNorm2d": "torch2d", "BatchNorm3d": "torch3d", "SyncBatchNorm": "sync"}
TORCH_X = {
    "BatchNorm1d": X,
    "BatchNorm2d": X4,
    "BatchNorm3d": _rng.normal(size=(2, 3, 2, 2, 2)).astype(np.float32),
    "SyncBatchNorm": X4,
}
TORCH_BAD_NDIM = {
    "BatchNorm1d": [(X4, r"expected 2D or 3D input \(got 4D input\)"), (X[0], r"got 1D input")],
    "BatchNorm2d": [(X4[0], r"expected 4D input \(got 3D input\)"), (X4[..., None], r"got 5D input")],
    "BatchNorm3d": [(X4, r"expected 5D input \(got 4D input\)")],
    "SyncBatchNorm": [(X[0], r"expected at least 2D input \(got 1D input\)")],
}


for cname in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):  # ghost batches
    for label, value, error in [("zero", 0, ValueError), ("negative", -1, ValueError), ("float", 2.5, TypeError),
                                ("bool", True, TypeError)]:  # fmt: skip
        row(f"{cname}/init-vbs-{label}", error, r"virtual_batch_size must be a positive int or None", TORCH[cname], 3,
            virtual_batch_size=value)  # fmt: skip
row("BatchNorm1d/vbs-with-mask", ValueError, r"virtual_batch_size cannot be combined with a mask",
    lambda: bn.BatchNorm1d(3, virtual_batch_size=4)(X, mask=np.ones(8, bool)))  # fmt: skip
row("SyncBatchNorm/init-vbs", ValueError, r"SyncBatchNorm does not support virtual_batch_size", bn.SyncBatchNorm, 3,
    virtual_batch_size=2)  # fmt: skip


def _set(**attrs: Any) -> Callable[[Any], None]:
    def setup(layer: Any) -> None:
        for k, v in attrs.items():
            setattr(layer, k, v)

    return setup


for cname, cls in TORCH.items():
    kind = TORCH_LAYER[cname]
    L = Layer(kind)
    x = TORCH_X[cname]
    for label, kwargs, exc, msg in [
        ("num-features-negative", {"num_features": -1}, ValueError, r"num_features must be non-negative"),
        ("num-features-float", {"num_features": 2.5}, TypeError, r"num_features must be an int"),
        ("eps-str", {"num_features": 3, "eps": "1e-5"}, TypeError, r"eps must be a real number"),
        ("momentum-str", {"num_features": 3, "momentum": "0.1"}, TypeError, r"momentum must be a real number or None"),
        ("eps-huge-int", {"num_features": 3, "eps": 10**400}, ValueError, r"eps must be representable as a float"),
        ("momentum-huge-int", {"num_features": 3, "momentum": 10**400}, ValueError, r"momentum must be represent"),
        ("dtype-int32", {"num_features": 3, "dtype": "int32"}, TypeError, r"dtype must be float16, bfloat16, float32"),
        ("dtype-complex", {"num_features": 3, "dtype": np.complex64}, TypeError, r"dtype must be float16, bfloat16"),
        ("dtype-big-endian", {"num_features": 3, "dtype": ">f4"}, TypeError, r"big-endian"),
    ]:
        row(f"{cname}/init-{label}", exc, msg, cls, **kwargs)
    for bad, msg in TORCH_BAD_NDIM[cname]:
        row(f"{cname}/call-ndim-{bad.ndim}", ValueError, msg, "__call__", L, bad)
    reduced = (x.shape[0], *x.shape[2:])  # a mask's shape: x's without the channel axis
    one = np.zeros(reduced, bool)
    one.flat[0] = True
    for label, mask, msg in [
        ("one", one, r"got 1 selected by the mask"),
        ("none", np.zeros(reduced, bool), r"got 0 selected by the mask"),
        ("shape", np.ones((x.shape[0] + 1, *x.shape[2:]), bool), r"mask of shape"),
    ]:
        row(f"{cname}/call-mask-selects-{label}", ValueError, msg, "__call__", L, x, mask=mask)
    row(
        f"{cname}/call-channels",
        RuntimeError,
        r"running_mean should contain 4 elements not 3",
        "__call__",
        L,
        np.ones((8, 4, *x.shape[2:]), np.float32),
    )
    row(
        f"{cname}/eval-channels",
        RuntimeError,
        r"running_mean should contain 4 elements not 3",
        "__call__",
        Layer(kind, setup=lambda layer: layer.eval()),
        np.ones((8, 4, *x.shape[2:]), np.float32),
    )
    for label, dtype in [("int32", np.int32), ("bool", np.bool_), ("complex64", np.complex64), ("object", object)]:
        row(
            f"{cname}/call-{label}",
            TypeError,
            rf"expected a floating-point input .*got {np.dtype(dtype)}",
            "__call__",
            L,
            x.astype(dtype),
        )
    row(f"{cname}/call-big-endian", TypeError, r"big-endian", "__call__", L, x.astype(">f4"))
    row(f"{cname}/call-float64", RuntimeError, r"mixed dtype \(CPU\)", "__call__", L, x.astype(np.float64))
    row(
        f"{cname}/call-one-value-per-channel",
        ValueError,
        r"Expected more than 1 value per channel when training",
        "__call__",
        L,
        x[:1, :, :1, :1] if x.ndim == 4 else np.ones((1, 3, *(1,) * (x.ndim - 2)), np.float32),
    )
    row(
        f"{cname}/train-eps-zero",
        ValueError,
        r"eps must be positive during training, but got 0\.0",
        "__call__",
        Layer(kind, setup=_set(eps=0.0)),
        x,
    )
    row(
        f"{cname}/eval-eps-negative",
        ValueError,
        r"eps must be non-negative, but got -1\.0",
        "__call__",
        Layer(kind, setup=lambda layer: (setattr(layer, "eps", -1.0), layer.eval())),
        x,
    )
    row(
        f"{cname}/train-eps-nan",
        ValueError,
        r"eps.*(finite|positive).*nan",
        "__call__",
        Layer(kind, setup=_set(eps=float("nan"))),
        x,
    )
    row(
        f"{cname}/train-eps-inf",
        ValueError,
        EPSILON,
        "__call__",
        Layer(kind, setup=_set(eps=float("inf"))),
        x,
    )
    row(
        f"{cname}/eval-eps-inf",
        ValueError,
        EPSILON,
        "__call__",
        Layer(kind, setup=lambda layer: (setattr(layer, "eps", float("inf")), layer.eval())),
        x,
    )
    row(f"{cname}/train-mode-str", ValueError, r"training mode is expected to be boolean", "train", L, "yes")
    row(
        f"{cname}/backward-before-forward",
        RuntimeError,
        r"backward\(\) called before any forward",
        "backward",
        Layer(kind, trained=False),
        x,
    )
    y_shape = x.shape
    row(
        f"{cname}/backward-dy-shape",
        ValueError,
        r"dy has shape .*; expected",
        "backward",
        L,
        np.ones((1, *y_shape[1:]), np.float32),
    )
    for label, dtype in [("int32", np.int32), ("complex64", np.complex64), ("object", object)]:
        row(
            f"{cname}/backward-dy-{label}",
            TypeError,
            rf"dy must be a floating-point array, got {np.dtype(dtype)}",
            "backward",
            L,
            np.ones(y_shape, dtype),
        )
    # parameters and buffers set to values of the wrong shape, or that the layer does not have
    for attr in ("weight", "bias", "running_mean", "running_var"):
        row(
            f"{cname}/set-{attr}-shape",
            ValueError,
            rf"{attr} must have shape \(3,\), got \(4,\)",
            setattr,
            L,
            attr,
            np.ones(4),
        )
        row(
            f"{cname}/set-{attr}-2d",
            ValueError,
            rf"{attr} must have shape \(3,\), got \(1, 3\)",
            setattr,
            L,
            attr,
            np.ones((1, 3)),
        )
        row(f"{cname}/set-{attr}-none", ValueError, rf"{attr} cannot be set to None", setattr, L, attr, None)
        for label, value in [("nones", [None] * 3), ("numeric-str", np.array(["1", "2", "3"])), ("complex", [1j] * 3)]:
            row(f"{cname}/set-{attr}-{label}", TypeError, rf"{attr} must be a real numeric array", setattr, L, attr,
                value)  # fmt: skip
    row(
        f"{cname}/set-num_batches_tracked-shape",
        ValueError,
        r"num_batches_tracked must be a scalar",
        setattr,
        L,
        "num_batches_tracked",
        [1, 2],
    )
    for label, value, exc, msg in [("nan", float("nan"), ValueError, "a non-negative whole number"),
                                   ("negative", -1, ValueError, "a non-negative whole number"),
                                   ("fraction", 2.5, ValueError, "a non-negative whole number"),
                                   ("none", None, TypeError, "a real numeric array"),
                                   ("str", "3", TypeError, "a real numeric array")]:  # fmt: skip
        row(f"{cname}/set-num_batches_tracked-{label}", exc, f"num_batches_tracked must be {msg}", setattr, L,
            "num_batches_tracked", value)  # fmt: skip
    # load_state_dict
    sd = make_layer(kind).state_dict()
    for label, bad_sd, strict, msg in [
        (
            "missing",
            {k: v for k, v in sd.items() if k != "running_var"},
            True,
            r'Missing key\(s\) in state_dict: "running_var"',
        ),
        ("unexpected", {**sd, "extra": np.ones(3)}, True, r'Unexpected key\(s\) in state_dict: "extra"'),
        (
            "shape",
            {**sd, "running_var": np.ones(4)},
            True,
            r"size mismatch for running_var: copying a param with shape "
            r"torch\.Size\(\[4\]\) from checkpoint, the shape in current model is torch\.Size\(\[3\]\)",
        ),
        ("shape-not-strict", {**sd, "weight": np.ones((3, 1))}, False, r"size mismatch for weight"),
        ("counter-shape", {**sd, "num_batches_tracked": np.ones(2)}, True, r"size mismatch for num_batches_tracked"),
        ("value-str", {**sd, "bias": np.array(["a", "b", "c"])}, True, r'While copying the parameter named "bias"'),
        ("value-numeric-str", {**sd, "bias": np.array(["1", "2", "3"])}, True, r"bias must be a real numeric"),
        ("value-complex", {**sd, "weight": np.ones(3, complex)}, True, r"weight must be a real numeric array"),
        ("value-nones", {**sd, "running_mean": np.array([None] * 3)}, True, r"running_mean must be a real numeric"),
        ("counter-nan", {**sd, "num_batches_tracked": np.array(np.nan)}, True, r"non-negative whole number"),
        ("counter-negative", {**sd, "num_batches_tracked": np.array(-4)}, True, r"non-negative whole number"),
        ("all-wrong", {"weight": np.ones(5)}, True, r"Missing key.*\n.*size mismatch for weight"),
    ]:
        row(f"{cname}/load_state_dict-{label}", RuntimeError, msg, "load_state_dict", L, bad_sd, strict=strict)
    row(
        f"{cname}/load_state_dict-list",
        TypeError,
        r"Expected state_dict to be dict-like",
        "load_state_dict",
        L,
        list(sd.items()),
    )
for kind, attr in [("torch2d-noaffine", "weight"), ("torch2d-noaffine", "bias"), ("torch2d-notrack", "running_mean"),
                   ("torch2d-notrack", "running_var")]:  # fmt: skip
    row(f"{kind}/set-{attr}", ValueError, rf"this layer has no {attr}", setattr, Layer(kind), attr, np.ones(3))
row(
    "torch2d-notrack/set-num_batches_tracked",
    ValueError,
    r"no num_batches_tracked",
    setattr,
    Layer("torch2d-notrack"),
    "num_batches_tracked",
    3,
)
row(
    "torch2d-noaffine/load_state_dict-weight",
    RuntimeError,
    r'Unexpected key\(s\) in state_dict: "weight"',
    "load_state_dict",
    Layer("torch2d-noaffine"),
    {**make_layer("torch2d").state_dict()},
)
row(
    "torch2d-cumulative/call-channels",
    RuntimeError,
    r"running_mean should contain",
    "__call__",
    Layer("torch2d-cumulative"),
    np.ones((4, 5, 2, 2), np.float32),
)
row(
    "torch2d-notrack/call-channels",
    RuntimeError,
    r"weight should contain 5 elements not 3",
    "__call__",
    Layer("torch2d-notrack"),
    np.ones((4, 5, 2, 2), np.float32),
)
row(
    "sync/zero-channels",
    ValueError,
    r"SyncBatchNorm number of input channels should be non-zero",
    "__call__",
    Layer("sync"),
    np.ones((4, 0, 2), np.float32),
)
row(
    "SyncBatchNorm/convert-keras-layer",
    TypeError,
    r"expected a BatchNorm1d/2d/3d layer, got BatchNormalization",
    bn.SyncBatchNorm.convert_sync_batchnorm,
    Layer("keras"),
)


# ---- folding into the previous layer, precise statistics ----------------------------------------

_K34 = np.ones((4, 3), np.float32)  # a Dense kernel (in=4, out=3) for a 3-channel layer
for label, call, args, kwargs, exc, msg in [
    ("fold_dense/kernel-3d", bn.fold_dense, (np.ones((4, 3, 1)), None, Layer("keras")), {}, ValueError,
     r"kernel must be 2-D \(\(in, out\)\), got shape \(4, 3, 1\)"),
    ("fold_dense/layout", bn.fold_dense, (_K34, None, Layer("keras")), {"layout": "xy"}, ValueError,
     r"layout must be 'io'"),
    ("fold_dense/kernel-complex", bn.fold_dense, (_K34.astype(complex), None, Layer("keras")), {}, TypeError,
     r"kernel must be a real numeric array, got dtype complex128"),
    ("fold_dense/kernel-channels", bn.fold_dense, (np.ones((3, 5)), None, Layer("keras")), {}, ValueError,
     r"normalizes 3 channels but the kernel has 5 output channels"),
    ("fold_dense/kernel-oi-channels", bn.fold_dense, (_K34, None, Layer("torch1d")), {"layout": "oi"}, ValueError,
     r"normalizes 3 channels but the kernel has 4 output channels"),
    ("fold_dense/bias-shape", bn.fold_dense, (_K34, np.ones(4), Layer("keras")), {}, ValueError,
     r"bias has shape \(4,\); expected \(3,\)"),
    ("fold_dense/bias-str", bn.fold_dense, (_K34, np.array(["a"] * 3), Layer("keras")), {}, TypeError,
     r"bias must be a real numeric array"),
    ("fold_dense/not-a-layer", bn.fold_dense, (_K34, None, object()), {}, TypeError, r"expected a batch-norm layer"),
    ("fold_dense/unbuilt", bn.fold_dense, (_K34, None, Layer("keras", trained=False)), {}, ValueError,
     r"is not built"),
    ("fold_dense/no-running-stats", bn.fold_dense, (_K34, None, Layer("torch2d-notrack")), {}, ValueError,
     r"has no running statistics"),
    ("fold_conv/weight-2d", bn.fold_conv, (np.ones((3, 4)), None, Layer("torch2d")), {}, ValueError,
     r"at least 3 dimensions"),
    ("fold_conv/layout", bn.fold_conv, (np.ones((3, 4, 1, 1)), None, Layer("torch2d")), {"layout": "NCHW"},
     ValueError, r"layout must be 'OIHW'"),
    ("fold_conv/channels", bn.fold_conv, (np.ones((3, 4, 1, 1)), None, Layer("torch2d")), {"layout": "HWIO"},
     ValueError, r"normalizes 3 channels but the weight has 1 output channels"),
]:  # fmt: skip
    row(label, exc, msg, call, *args, **kwargs)


def _nested_precise(layer: Any) -> None:
    with bn.precise_statistics(layer):
        bn.precise_statistics(layer).__enter__()


for kind in ("keras", "torch2d", "sync"):
    row(f"precise_statistics/nested-{kind}", RuntimeError, r"already inside another precise_statistics block",
        _nested_precise, Layer(kind))  # fmt: skip
row("precise_statistics/str", TypeError, r"takes a batch-norm layer .* or an iterable of them, got str",
    bn.precise_statistics, "layer")  # fmt: skip
row("precise_statistics/not-a-layer", TypeError, r"expected batch-norm layers of this package, got object",
    bn.precise_statistics, [Layer("keras"), object()])  # fmt: skip
row("precise_statistics/no-running-stats", ValueError, r"has no running statistics", bn.precise_statistics,
    [Layer("torch2d-notrack")])  # fmt: skip


# ---- optimizers --------------------------------------------------------------------------------

for label, make, exc, msg in [
    ("SGD-learning-rate", lambda: optimizers.SGD(learning_rate=-0.1), ValueError, r"learning_rate must be in"),
    ("SGD-learning-rate-str", lambda: optimizers.SGD(learning_rate="0.1"), TypeError, r"learning_rate must be a real"),
    ("SGD-momentum", lambda: optimizers.SGD(momentum=1.5), ValueError, r"momentum must be in \[0\.0, 1\.0\]"),
    ("RMSprop-rho", lambda: optimizers.RMSprop(rho=-0.5), ValueError, r"rho must be in \[0\.0, 1\.0\]"),
    ("Adam-beta_1", lambda: optimizers.Adam(beta_1=1.5), ValueError, r"beta_1 must be in"),
    ("Adam-epsilon-nan", lambda: optimizers.Adam(epsilon=float("nan")), ValueError, r"epsilon must be in"),
]:
    row(f"optimizers/{label}", exc, msg, make)


def _bad_grads(layer: Any) -> None:
    key = "gamma" if isinstance(layer, bn.BatchNormalization) else "weight"
    layer.grads = {**layer.grads, key: np.ones(5, np.float32)}


def _object_grads(layer: Any) -> None:
    key = "gamma" if isinstance(layer, bn.BatchNormalization) else "weight"
    layer.grads = {**layer.grads, key: np.array([None] * 3)}


for kind in ("keras", "keras-renorm", "torch2d", "sync"):
    for opt in (optimizers.SGD(momentum=0.9), optimizers.Adam()):
        row(
            f"{kind}/{type(opt).__name__}-step-grad-shape",
            ValueError,
            r"gradient of '(gamma|weight)' has shape \(5,\)",
            opt.step,
            Layer(kind, setup=_bad_grads),
        )
        row(f"{kind}/{type(opt).__name__}-step-grad-objects", TypeError,
            r"gradient of '(gamma|weight)' must be a real numeric array, got dtype object", opt.step,
            Layer(kind, setup=_object_grads))  # fmt: skip


def _object_initializer(shape: Any, dtype: Any = None) -> np.ndarray:
    return np.array([None] * shape[0])


for label, init in [("object", _object_initializer), ("str", lambda shape, dtype=None: np.full(shape, "1"))]:
    row(f"keras/build-initializer-{label}", TypeError, r"an initializer's result must be a real numeric array",
        "build", Layer("keras", init={"gamma_initializer": init}), (None, 3))  # fmt: skip


if os.environ.get("BATCHNORM_TEST_CRASH_ROW"):  # for test_a_crashing_row_fails_alone only
    import ctypes

    isolated(row("selftest/segfault", ValueError, "", ctypes.string_at, 0))


# ---- running the table --------------------------------------------------------------------------


_ISOLATED_RESULTS: dict[str, str | None] = {}


def test_row_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(r: Row, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    if not r.isolated:
        check_row(r, tmp_path)
        return
    if not _ISOLATED_RESULTS:  # all isolated rows in one go, once per session
        ids = [i.id for i in ROWS if i.isolated]
        _ISOLATED_RESULTS.update(run_isolated(ids, tmp_path_factory.mktemp("isolated")))
    failure = _ISOLATED_RESULTS[r.id]
    assert failure is None, f"{r.id} (in a child process): {failure}"


def test_a_crashing_row_fails_alone(tmp_path: Path) -> None:
    """The harness itself: a row that segfaults is reported as such, and the rows after it
    still run (in a new child)."""
    env = {**os.environ, "BATCHNORM_TEST_CRASH_ROW": "1"}
    after = next(r.id for r in ROWS if r.isolated)
    results = run_isolated(["selftest/segfault", after], tmp_path, env)
    assert results["selftest/segfault"] is not None
    assert "signal 11" in results["selftest/segfault"] or "signal 6" in results["selftest/segfault"]
    assert results[after] is None
