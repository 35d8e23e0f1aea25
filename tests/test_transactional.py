"""Transactional state (docs/reliability.md): a layer method that raises changes nothing.

Fault injection: every call the layer code makes to a NumPy function, a kernel of the
C++ core or the MPI helpers is a fault point. For each layer kind and each method, the
method is first run once to count its fault points; then, for every k, a fresh layer
runs the method with the k-th call raising ``InjectedFault`` (as a failed allocation, a
kernel error or a peer's failure would), and must re-raise it and be bit for bit
unchanged (``layer_state.snapshot``: weights, moving/running statistics, counters, the
built flag, grads, the saved last call, configuration). Afterwards the layer must still
work, and give what a layer that never saw the failed call gives.

Not fault points: ndarray methods and operators (``a.astype``, ``a + b``) - they are not
module functions - so the commit steps written with them (``a[...] = b``) are checked by
reading, not by injection (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _core, _functional, _precise, optimizers
from batchnorm.distributed import _mpi
from batchnorm.keras import _build as _keras_build
from batchnorm.keras import _layer as _keras
from batchnorm.keras import _step as _keras_step
from batchnorm.keras import _sync as _sync_keras
from batchnorm.keras import _weights as _keras_weights
from batchnorm.nn import _layers as _torch
from batchnorm.nn import _sync
from layer_state import LAYER_KINDS, assert_same_state, make_layer, snapshot, train_input, training_call


class InjectedFault(Exception):
    """The failure a fault point raises."""


class Injector:
    """Counts calls through the patched modules; the `fail_at`-th one raises."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.calls: list[str] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def faulty(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if len(self.calls) == self.fail_at:
                raise InjectedFault(f"injected fault at call {self.fail_at}: {name}")
            return fn(*args, **kwargs)

        return faulty


class FaultyModule(types.ModuleType):
    """A stand-in for a module whose functions go through an Injector (types, classes and
    submodules are passed through unchanged, so isinstance checks and np.errstate work)."""

    def __init__(self, module: types.ModuleType, injector: Injector, label: str) -> None:
        super().__init__(module.__name__)
        self._module = module
        self._injector = injector
        self._label = label

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._module, name)
        if callable(attr) and not isinstance(attr, type):
            return self._injector.wrap(f"{self._label}.{name}", attr)
        return attr


# The modules of the layer code, and the module globals through which they call out.
_PATCHED = [
    (_keras, ("np", "_core")),
    (_keras_build, ("np",)),
    (_keras_step, ("np",)),
    (_keras_weights, ("np",)),
    (_sync_keras, ("np", "_core", "_mpi")),
    (_torch, ("np", "_core")),
    (_sync, ("np", "_core", "_mpi")),
    (_functional, ("np", "_core")),
    (_precise, ("np", "_core", "_mpi")),
    (optimizers, ("np",)),
]
_REAL = {"np": np, "_core": _core, "_mpi": _mpi}


@contextlib.contextmanager
def injecting(injector: Injector) -> Iterator[Injector]:
    saved = []
    try:
        for module, names in _PATCHED:
            for name in names:
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
                    setattr(module, name, FaultyModule(_REAL[name], injector, name))
        yield injector
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


# ---- what is run ---------------------------------------------------------------------------------


def _is_keras(layer: Any) -> bool:
    return isinstance(layer, bn.BatchNormalization)


def _dy(layer: Any, kind: str) -> np.ndarray:
    x = train_input(kind, seed=11)
    return np.cos(x).astype(x.dtype)


def _train(layer: Any, kind: str) -> Any:
    return training_call(layer, train_input(kind, seed=7))


def _first_call(layer: Any, kind: str) -> Any:
    return _train(layer, kind)


def _infer(layer: Any, kind: str) -> Any:
    x = train_input(kind, seed=7)
    if _is_keras(layer):
        return layer(x, training=False)
    layer.eval()  # (a mode switch, not state the call changes: set before the snapshot below)
    return layer(x)


def _train_backward(layer: Any, kind: str) -> Any:
    return layer.backward(_dy(layer, kind))


def _train_mask(layer: Any, kind: str) -> Any:
    x = train_input(kind, seed=7)
    mask = np.arange(x.shape[0] * int(np.prod(x.shape[1:-1]))).reshape(x.shape[:-1]) % 3 != 0
    return layer(x, training=True, mask=mask)


def _set_weights(layer: Any, kind: str) -> Any:
    if _is_keras(layer):
        return layer.set_weights([w + 0.25 for w in layer.get_weights()])
    sd = layer.state_dict()
    return layer.load_state_dict({k: v + 1 for k, v in sd.items()})


def _sgd(layer: Any, kind: str) -> Any:
    return optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True).step(layer)


def _adam(layer: Any, kind: str) -> Any:
    opt = optimizers.Adam(learning_rate=0.1, amsgrad=True)
    return opt.step(layer)


def _rmsprop(layer: Any, kind: str) -> Any:
    return optimizers.RMSprop(learning_rate=0.1, momentum=0.5, centered=True).step(layer)


def _precise_block(layer: Any, kind: str) -> Any:
    with bn.precise_statistics(layer):
        training_call(layer, train_input(kind, seed=7))
        training_call(layer, train_input(kind, seed=8))


# method -> (run, prepare): prepare(layer) runs before the snapshot (it may set a mode)
METHODS: dict[str, tuple[Callable[[Any, str], Any], Callable[[Any], Any] | None]] = {
    "train": (_train, None),
    "first-call": (_first_call, None),  # on a fresh, unbuilt layer
    "infer": (_infer, lambda layer: None if _is_keras(layer) else layer.eval()),
    "backward-after-train": (_train_backward, None),
    "backward-after-infer": (_train_backward, None),
    "train-mask": (_train_mask, None),
    "set-weights": (_set_weights, None),
    "sgd-step": (_sgd, None),
    "adam-step": (_adam, None),
    "rmsprop-step": (_rmsprop, None),
    "precise-statistics": (_precise_block, None),
}


def _fresh(kind: str, method: str) -> Any:
    layer = make_layer(kind, trained=method != "first-call")
    if method == "backward-after-infer":
        _infer(layer, kind)
    prepare = METHODS[method][1]
    if prepare is not None:
        prepare(layer)
    return layer


def _applies(kind: str, method: str) -> bool:
    if method.endswith("-step") and kind in ("keras-nocenter-noscale", "torch2d-noaffine"):
        return False  # nothing to update
    if method == "precise-statistics" and kind == "torch2d-notrack":
        return False  # nothing to compute (precise_statistics refuses the layer)
    if method == "train-mask":  # the Keras mask: not on the fused path (ignored there, with a warning)
        return kind in ("keras", "keras-axes", "keras-renorm", "keras-float16", "keras-sync", "keras-adjustment")
    return True


CASES = [(kind, method) for kind in LAYER_KINDS for method in METHODS if _applies(kind, method)]


def _outputs(layer: Any, kind: str) -> list[np.ndarray]:
    """A training step after the method: how the layer behaves from its state."""
    y = training_call(layer, train_input(kind, seed=9))
    dx = layer.backward(_dy(layer, kind))
    state = layer.get_weights() if _is_keras(layer) else list(layer.state_dict().values())
    return [y, dx, *state]


@pytest.mark.parametrize(("kind", "method"), CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_every_fault_leaves_the_layer_unchanged(kind, method):
    run = METHODS[method][0]
    # count the fault points of a successful call
    layer = _fresh(kind, method)
    with injecting(Injector()) as counter:
        run(layer, kind)
    points = len(counter.calls)
    assert points > 0
    expected_after = _outputs(_fresh(kind, method), kind)
    # A precise_statistics block makes two training calls: when the second fails, the
    # first has rightly set the saved last call; the statistics must be untouched.
    ignore = ("layer._last", "layer._saved") if method == "precise-statistics" else ()
    for k in range(1, points + 1):
        layer = _fresh(kind, method)
        before = _state(layer, ignore)
        with injecting(Injector(fail_at=k)) as inj, pytest.raises(Exception) as info:  # noqa: PT011
            run(layer, kind)
        where = inj.calls[k - 1]
        assert _caused_by_fault(info.value), f"fault at call {k} ({where}) became {info.value!r}"
        try:
            assert_same_state(before, _state(layer, ignore))
        except AssertionError as e:
            raise AssertionError(f"a fault at call {k} of {points} ({where}) changed the layer: {e}") from None
        if k in (1, points // 2, points):  # still works, as if the failed call had not happened
            got = _outputs(layer, kind)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(got, expected_after, strict=True)), where


def _state(layer: Any, ignore: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in snapshot(layer).items() if not k.startswith(ignore)}


def _caused_by_fault(e: BaseException | None) -> bool:
    """The injected fault itself, or an error reporting it (load_state_dict, as torch's,
    collects what went wrong while copying into one RuntimeError)."""
    while e is not None:
        if isinstance(e, InjectedFault) or "injected fault at call" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", [k for k in LAYER_KINDS if k.startswith("keras")])
def test_floating_point_errors_raised_by_numpy_leave_the_layer_unchanged(kind):
    """With np.errstate(all="raise"), a training call on data with an infinity fails in
    the layer's NumPy arithmetic (FloatingPointError): the layer is unchanged."""
    layer = make_layer(kind)
    layer(np.full(train_input(kind).shape, np.inf, np.float32), training=True)  # moving mean: inf
    before = snapshot(layer)
    x = train_input(kind)
    x[(0,) * x.ndim] = np.inf
    with np.errstate(all="raise"), pytest.raises(FloatingPointError):
        layer(x, training=True)
    assert_same_state(before, snapshot(layer))
