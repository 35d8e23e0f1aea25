"""The functional API's fast path (``_core.fast_*``) is invisible: same results, same errors.

Each case calls one public function twice on fresh, identical arguments: as is, and with
the fast path switched off (``_core.fast_*`` returning None, so the general Python path
runs). The two calls must give the same outcome: the same exception type and message, or
results with the same dtypes, shapes, strides, flags, bytes and identity (``out`` returned
as ``out``), and every argument array holding the same bytes afterwards. Each case also
says whether the fast path takes it, so the borderline inputs on both sides of its
acceptance test (python/src/register_fast_path.cpp) are each checked to be where they
are meant to be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import batchnorm as bn
from batchnorm import _core
from reference import BF16

FAST = ("fast_moments", "fast_normalize", "fast_forward", "fast_backward")
N, C = 6, 5


def _data(shape: tuple[int, ...] = (N, C), dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _param(value: float = 1.0, dtype: Any = np.float32, c: int = C, seed: int = 1) -> np.ndarray:
    return (value + 0.1 * np.random.default_rng(seed).normal(size=c)).astype(dtype)


def _unaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf[1:].data, a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


F64_PARAMS = {k: _param(v, np.float64) for k, v in {"mean": 0.0, "variance": 1.0, "gamma": 1.0, "beta": 0.0}.items()}


class Sub(np.ndarray):
    pass


class Str(str):
    __slots__ = ()


# Each factory returns (function, positional args, keyword args), fresh on every call.
Case = Callable[[], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]


def norm(x: Any = None, c: int | None = None, **kw: Any) -> Case:
    """normalize(x, mean, variance, gamma, beta) with overrides; a callable override gets x."""

    def make() -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        xx = _data() if x is None else x()
        if c is None:
            shape = np.shape(xx)
            cc = shape[-1] if shape else 1
        else:
            cc = c
        args = {"mean": _param(0.0, c=cc), "variance": _param(1.0, c=cc), "gamma": _param(1.0, c=cc, seed=2)}
        args["beta"] = _param(0.0, c=cc, seed=3)
        kwargs: dict[str, Any] = {}
        for k, v in kw.items():
            value = v(xx) if callable(v) else v
            (args if k in args else kwargs)[k] = value
        return bn.normalize, (xx, args["mean"], args["variance"], args["gamma"], args["beta"]), kwargs

    return make


def fwd(x: Any = None, c: int | None = None, **kw: Any) -> Case:
    """forward(x, gamma=, beta=) with overrides; a callable override gets x."""

    def make() -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        xx = _data() if x is None else x()
        cc = xx.shape[-1] if c is None else c
        kwargs: dict[str, Any] = {"gamma": _param(1.0, c=cc, seed=2), "beta": _param(0.0, c=cc, seed=3)}
        for k, v in kw.items():
            kwargs[k] = v(xx) if callable(v) else v
        return bn.forward, (xx,), kwargs

    return make


def bwd(dy: Any = None, x: Any = None, stats: Any = None, **kw: Any) -> Case:
    """backward(dy, x, stats, gamma=, beta=) with overrides; dy(x), stats(stats), others (x, dy)."""

    def make() -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        xx = _data() if x is None else x()
        dd = _data(seed=5) if dy is None else dy(xx)
        c = xx.shape[-1]
        st = bn.forward(np.asarray(xx), _param(1.0, c=c, seed=2), _param(0.0, c=c, seed=3))[1]
        kwargs: dict[str, Any] = {"gamma": _param(1.0, c=c, seed=2), "beta": _param(0.0, c=c, seed=3)}
        for k, v in kw.items():
            kwargs[k] = v(xx, dd) if callable(v) else v
        return bn.backward, (dd, xx, st if stats is None else stats(st)), kwargs

    return make


def mom(x: Any = None, **kw: Any) -> Case:
    """moments(x, **kw)."""

    def make() -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        return bn.moments, (_data() if x is None else x(),), kw

    return make


def gamma_aliases_out() -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """gamma is a row of out: read while out is written, by either path alike (no copy)."""
    x, out = _data(), np.ones((N, C), np.float32)
    return bn.normalize, (x, _param(0.0), _param(1.0), out[2], out[3]), {"out": out}


# (id, case, whether the fast path takes it)
CASES: list[tuple[str, Case, bool]] = [
    # normalize: taken
    ("normalize", norm(), True),
    ("normalize-out", norm(out=np.zeros_like), True),
    ("normalize-in-place", norm(out=lambda x: x), True),
    ("normalize-no-affine", norm(gamma=None, beta=None), True),
    ("normalize-relu", norm(activation="relu"), True),
    ("normalize-axis-0", norm(x=lambda: _data((C, N)), c=C, axis=0), True),
    ("normalize-3d-axis-1", norm(x=lambda: _data((2, C, 3)), c=C, axis=1), True),
    ("normalize-1d", norm(x=lambda: _data((C,)), axis=0), True),
    ("normalize-float64", norm(x=lambda: _data(dtype=np.float64), **F64_PARAMS), True),
    ("normalize-float16", norm(x=lambda: _data(dtype=np.float16)), True),
    ("normalize-bfloat16", norm(x=lambda: _data(dtype=BF16)), True),
    ("normalize-keepdims-gamma", norm(gamma=lambda x: _param().reshape(1, C)), True),
    ("normalize-0d-gamma", norm(x=lambda: _data((N, 1)), gamma=lambda x: np.array(1.5, np.float32)), True),
    ("normalize-gamma-aliases-out", gamma_aliases_out, True),
    ("normalize-negative-epsilon", norm(epsilon=-1.0), True),
    ("normalize-nan-epsilon", norm(epsilon=float("nan")), True),
    ("normalize-inf-variance", norm(variance=lambda x: np.full(C, np.inf, np.float32)), True),
    ("normalize-x-rows-of-one", norm(x=lambda: _data((1, C))), True),
    # normalize: general path
    ("normalize-noncontiguous-gamma", norm(gamma=lambda x: _param(c=2 * C)[::2]), False),
    ("normalize-float64-gamma", norm(gamma=lambda x: _param(dtype=np.float64)), False),
    ("normalize-float16-mean", norm(mean=lambda x: _param(0.0, dtype=np.float16)), False),
    ("normalize-int-gamma", norm(gamma=lambda x: np.arange(C)), False),
    ("normalize-complex-gamma", norm(gamma=lambda x: np.ones(C, np.complex64)), False),
    ("normalize-list-gamma", norm(gamma=[1.0] * C), False),
    ("normalize-big-endian-gamma", norm(gamma=lambda x: _param().astype(">f4")), False),
    ("normalize-unaligned-gamma", norm(gamma=lambda x: _unaligned(_param())), False),
    ("normalize-subclass-gamma", norm(gamma=lambda x: _param().view(Sub)), False),
    ("normalize-metadata-gamma", norm(gamma=lambda x: _param().astype(np.dtype(np.float32, metadata={"a": 1}))), False),
    ("normalize-wrong-size-gamma", norm(gamma=lambda x: _param(c=C + 1)), False),
    ("normalize-wrong-size-mean", norm(mean=lambda x: _param(c=C - 1)), False),
    ("normalize-none-mean", norm(mean=None), False),
    ("normalize-x-list", norm(x=lambda: _data().tolist()), False),
    ("normalize-x-noncontiguous", norm(x=lambda: _data((N, 2 * C))[:, ::2]), False),
    ("normalize-x-fortran", norm(x=lambda: np.asfortranarray(_data())), False),
    ("normalize-x-unaligned", norm(x=lambda: _unaligned(_data())), False),
    ("normalize-x-subclass", norm(x=lambda: _data().view(Sub)), False),
    ("normalize-x-empty", norm(x=lambda: _data((0, C))), False),
    ("normalize-x-int", norm(x=lambda: np.ones((N, C), np.int32)), False),
    ("normalize-x-big-endian", norm(x=lambda: _data().astype(">f4")), False),
    ("normalize-x-void-2-bytes", norm(x=lambda: _data(dtype=BF16).view("V2")), False),
    ("normalize-x-struct-2-bytes", norm(x=lambda: _data(dtype=BF16).view([("a", "u1"), ("b", "u1")])), False),
    ("normalize-x-0d", norm(x=lambda: np.float32(1.0)), False),
    ("normalize-axis-np-integer", norm(axis=np.int64(-1)), False),
    ("normalize-axis-tuple", norm(axis=(1,)), False),
    ("normalize-axis-list", norm(axis=[-1]), False),
    ("normalize-axis-bool", norm(axis=True), False),
    ("normalize-axis-out-of-range", norm(axis=2), False),
    ("normalize-axis-huge", norm(axis=2**70), False),
    ("normalize-axis-float", norm(axis=1.0), False),
    ("normalize-epsilon-int", norm(epsilon=0), False),
    ("normalize-epsilon-huge-int", norm(epsilon=10**400), False),
    ("normalize-epsilon-np-float64", norm(epsilon=np.float64(1e-3)), False),
    ("normalize-epsilon-bool", norm(epsilon=True), False),
    ("normalize-epsilon-str", norm(epsilon="0.1"), False),
    ("normalize-activation-str-subclass", norm(activation=Str("relu")), False),
    ("normalize-activation-bad", norm(activation="RELU"), False),
    ("normalize-activation-relu-nul", norm(activation="relu\0"), False),
    ("normalize-out-overlapping-x", norm(x=lambda: _data((N + 1, C))[:N], out=lambda x: x.base[1:]), False),
    ("normalize-out-next-to-x", norm(x=lambda: _data((2 * N, C))[:N], out=lambda x: x.base[N:]), True),
    ("normalize-out-view-of-x", norm(out=lambda x: x[...]), False),
    ("normalize-out-read-only", norm(out=lambda x: np.broadcast_to(np.zeros(C, np.float32), x.shape)), False),
    ("normalize-out-read-only-flag", norm(out=lambda x: _read_only(np.zeros_like(x))), False),
    ("normalize-out-a-view", norm(out=lambda x: np.zeros((N + 1, C), np.float32)[1:]), True),
    ("normalize-out-wrong-dtype", norm(out=lambda x: np.zeros(x.shape, np.float64)), False),
    ("normalize-out-wrong-shape", norm(out=lambda x: np.zeros((N + 1, C), np.float32)), False),
    ("normalize-out-fortran", norm(out=lambda x: np.zeros(x.shape, np.float32, order="F")), False),
    ("normalize-out-subclass", norm(out=lambda x: np.zeros_like(x).view(Sub)), False),
    (
        "normalize-out-self-overlapping",
        norm(out=lambda x: as_strided(np.zeros(N + C, np.float32), x.shape, (4, 4))),
        False,
    ),
    ("normalize-out-list", norm(out=lambda x: x.tolist()), False),
    ("normalize-out-unaligned", norm(out=_unaligned), True),
    # forward
    ("forward", fwd(), True),
    ("forward-out", fwd(out=np.zeros_like), True),
    ("forward-in-place", fwd(out=lambda x: x), True),
    ("forward-relu", fwd(activation="relu", gamma=None), True),
    ("forward-float16", fwd(x=lambda: _data(dtype=np.float16)), True),
    ("forward-bfloat16", fwd(x=lambda: _data(dtype=BF16)), True),
    ("forward-float64", fwd(x=lambda: _data(dtype=np.float64), gamma=_param(dtype=np.float64), beta=None), True),
    ("forward-one-row", fwd(x=lambda: _data((1, C))), True),
    ("forward-3d-axis-1", fwd(x=lambda: _data((2, C, 3)), c=C, axis=1), True),
    ("forward-negative-epsilon", fwd(epsilon=-1e-3), True),
    ("forward-float32-params-for-float64", fwd(x=lambda: _data(dtype=np.float64)), False),
    ("forward-empty-batch", fwd(x=lambda: _data((0, C))), False),
    ("forward-no-channels", fwd(x=lambda: _data((N, 0)), gamma=None, beta=None), False),
    ("forward-1d", fwd(x=lambda: _data((C,)), axis=0), False),
    ("forward-axis-tuple", fwd(axis=(-1,)), False),
    ("forward-noncontiguous-beta", fwd(beta=lambda x: _param(c=2 * C)[::2]), False),
    ("forward-out-overlapping-x", fwd(x=lambda: _data((N + 2, C))[2:], out=lambda x: x.base[:N]), False),
    ("forward-out-read-only", fwd(out=lambda x: np.frombuffer(bytes(x.nbytes), np.float32).reshape(x.shape)), False),
    ("forward-bad-activation", fwd(activation="tanh"), False),
    ("forward-x-int", fwd(x=lambda: np.ones((N, C), np.int64)), False),
    # backward
    ("backward", bwd(), True),
    ("backward-out", bwd(out=lambda x, dy: np.zeros_like(x)), True),
    ("backward-out-is-dy", bwd(out=lambda x, dy: dy), True),
    ("backward-out-is-x", bwd(out=lambda x, dy: x), True),
    ("backward-relu", bwd(activation="relu"), True),
    ("backward-no-affine", bwd(gamma=None, beta=None), True),
    ("backward-float16", bwd(x=lambda: _data(dtype=np.float16), dy=lambda x: _data(dtype=np.float16, seed=5)), True),
    ("backward-bfloat16", bwd(x=lambda: _data(dtype=BF16), dy=lambda x: _data(dtype=BF16, seed=5)), True),
    ("backward-dy-is-x", bwd(dy=lambda x: x), True),
    ("backward-dy-dtype-mismatch", bwd(dy=lambda x: _data(dtype=np.float16, seed=5)), True),
    ("backward-dy-shape-mismatch", bwd(dy=lambda x: _data((N + 1, C), seed=5)), False),
    ("backward-dy-list", bwd(dy=lambda x: _data(seed=5).tolist()), False),
    ("backward-dy-noncontiguous", bwd(dy=lambda x: _data((N, 2 * C), seed=5)[:, ::2]), False),
    ("backward-out-overlapping-dy", bwd(out=lambda x, dy: dy[::-1]), False),
    ("backward-out-view-of-dy", bwd(out=lambda x, dy: dy.view()), False),
    ("backward-stats-tuple", bwd(stats=tuple), False),
    ("backward-stats-lists", bwd(stats=lambda s: bn.BatchStats(*(v.tolist() for v in s[:3]), s.count)), False),
    ("backward-stats-float64", bwd(stats=lambda s: s._replace(mean=s.mean.astype(np.float64))), False),
    ("backward-stats-wrong-size", bwd(stats=lambda s: s._replace(inv_std=s.inv_std[:-1])), False),
    ("backward-stats-none", bwd(stats=lambda s: None), False),
    ("backward-axis-np-integer", bwd(axis=np.intp(1)), False),
    # moments
    ("moments", mom(), True),
    ("moments-axis-0", mom(axis=0), True),
    ("moments-float64", mom(x=lambda: _data(dtype=np.float64)), True),
    ("moments-bfloat16", mom(x=lambda: _data(dtype=BF16)), True),
    ("moments-axis-tuple", mom(axis=(0, 1)), False),
    ("moments-empty-batch", mom(x=lambda: _data((0, C))), False),
    ("moments-1d", mom(x=lambda: _data((C,)), axis=0), False),
]


def _describe(value: Any, inputs: list[Any]) -> Any:
    """What a caller can observe of a result, with arrays that are inputs named by position."""
    if isinstance(value, tuple):
        return (type(value).__name__, [_describe(v, inputs) for v in value])
    if isinstance(value, np.ndarray):
        same = [i for i, a in enumerate(inputs) if a is value]
        flags = {k: value.flags[k] for k in ("C_CONTIGUOUS", "F_CONTIGUOUS", "OWNDATA", "WRITEABLE", "ALIGNED")}
        return (
            "array",
            type(value),
            value.dtype,
            value.shape,
            value.strides,
            flags,
            value.tobytes(),
            same,
            value.base is None,
        )
    return (type(value), value)


def _contents(value: Any) -> Any:
    if isinstance(value, tuple):  # BatchStats
        return [_contents(v) for v in value]
    return value.tobytes() if isinstance(value, np.ndarray) else None


def _outcome(case: Case, made: Callable[[], object] = lambda: None) -> Any:
    f, args, kwargs = case()
    made()  # the arguments are made (backward's stats by a call of forward)
    inputs = [*args, *kwargs.values()]
    try:
        result: Any = ("returned", _describe(f(*args, **kwargs), inputs))
    except Exception as e:  # any exception: its type and message are the outcome
        result = ("raised", type(e), str(e))
    return result, [_contents(a) for a in inputs]


@pytest.mark.parametrize(("case", "taken"), [pytest.param(c, t, id=i) for i, c, t in CASES])
def test_fast_path_is_invisible(case: Case, taken: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    took = []
    for name in FAST:
        real = getattr(_core, name)

        def spy(*args: Any, _real: Any = real) -> Any:
            try:
                r = _real(*args)
            except Exception:  # raised by the core call it made (it never raises on its own)
                took.append(True)
                raise
            took.append(r is not None)
            return r

        monkeypatch.setattr(_core, name, spy)
    with np.errstate(all="ignore"):
        fast = _outcome(case, took.clear)
    assert took in ([], [taken]), took  # backward with stats that are not BatchStats never asks
    assert any(took) == taken
    for name in FAST:
        monkeypatch.setattr(_core, name, lambda *args: None)
    with np.errstate(all="ignore"):
        general = _outcome(case)
    assert fast == general


def test_fast_path_returns_none_for_an_error_it_leaves_to_the_general_path() -> None:
    x = _data()
    assert _core.fast_normalize(x, _param(), _param(), None, None, 5, 1e-3, None, None) is None
    with pytest.raises(ValueError, match="axis 5 is out of range"):
        bn.normalize(x, _param(), _param(), axis=5)


def test_bfloat16_is_known_by_its_dtype_not_by_its_size() -> None:
    """The bindings remember the bfloat16 dtype object; other 2-byte dtypes stay rejected."""
    x = _data(dtype=BF16)
    bn.normalize(x, _param(0.0), _param(1.0))
    others = [("V2", "|V2"), ([("a", "u1"), ("b", "u1")], "[('a', 'u1'), ('b', 'u1')]"), (np.int16, "int16")]
    for dtype, shown in others:
        message = f"x must be a float16, bfloat16, float32 or float64 array; got dtype {shown}"
        with pytest.raises(TypeError) as info:
            bn.normalize(x.view(dtype), _param(0.0), _param(1.0))
        assert str(info.value) == message
    bn.normalize(x, _param(0.0), _param(1.0))
