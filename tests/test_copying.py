"""copy.deepcopy and pickle of every layer and optimizer: the copy carries the whole state
(weights, statistics, counters, gradients, the last call for backward, the optimizer's
slots) and behaves exactly as the original does, bit for bit, through further training
steps; the two share no state.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import optimizers
from layer_state import LAYER_KINDS, input_dtype, input_shape, make_layer, training_call

COPIERS: dict[str, Callable[[Any], Any]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
}
OPTIMIZERS = {
    "SGD": lambda: optimizers.SGD(0.1, momentum=0.9),
    "Adam": lambda: optimizers.Adam(0.01),
    "RMSprop": lambda: optimizers.RMSprop(0.01, centered=True),
}


def _state(layer: Any) -> list[np.ndarray]:
    if isinstance(layer, bn.BatchNormalization):
        return layer.get_weights()
    return list(layer.state_dict().values())


def _run(layer: Any, opt: Any, kind: str) -> list[np.ndarray]:
    """Everything a user sees of the next steps: backward of the last call, two training
    steps with an optimizer step each, an inference call, the final state."""
    rng = np.random.default_rng(7)
    shape, dtype = input_shape(kind), input_dtype(kind)
    seen = [layer.backward(rng.standard_normal(shape).astype(dtype))]
    for _ in range(2):
        seen.append(training_call(layer, rng.normal(0.5, 2.0, shape).astype(dtype)))
        seen.append(layer.backward(rng.standard_normal(shape).astype(dtype)))
        seen.extend(layer.grads.values())
        opt.step(layer)
    x = rng.normal(size=shape).astype(dtype)
    if isinstance(layer, bn.BatchNormalization):
        seen.append(layer(x, training=False))
    else:
        seen.append(layer.eval()(x))
    seen.extend(_state(layer))
    seen.extend(np.array(opt.iterations(layer, name)) for name in layer.grads)
    return seen


def _flat(values: list[Any]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for v in values:
        out.extend(_flat(list(v)) if isinstance(v, tuple) else [np.asarray(v)])
    return out


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("how", COPIERS)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_copy_behaves_as_the_original(kind, how, opt_name):
    layer, opt = make_layer(kind), OPTIMIZERS[opt_name]()
    opt.step(layer)  # the optimizer has slots for this layer
    if how == "pickle" and kind == "keras-adjustment":  # its config holds a lambda, as pickle says
        with pytest.raises((pickle.PicklingError, AttributeError)):
            COPIERS[how]((layer, opt))
        return
    copied, copied_opt = COPIERS[how]((layer, opt))
    assert type(copied) is type(layer)
    assert repr(copied) == repr(layer)
    # The copy first: if it shared an array with the original, the original's run would differ.
    theirs = _flat(_run(copied, copied_opt, kind))
    ours = _flat(_run(layer, opt, kind))
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        assert a.dtype == b.dtype, i
        assert a.shape == b.shape, i
        assert a.tobytes() == b.tobytes(), f"value {i}: {a} != {b}"


@pytest.mark.parametrize("how", COPIERS)
def test_an_optimizer_copied_alone_keeps_no_state_for_the_original_layer(how):
    layer, opt = make_layer("torch2d"), optimizers.Adam()
    opt.step(layer)
    copied = COPIERS[how](opt)
    assert opt.iterations(layer, "weight") == 1
    assert copied.iterations(layer, "weight") == 0  # its state belongs to a copy of the layer nobody holds
    assert copied.get_config() == opt.get_config()


def test_copies_of_layers_without_weak_references_keep_their_state():
    class Plain:  # __slots__: not weak-referenceable, so the optimizer holds it strongly
        __slots__ = ("grads", "w")

        def __init__(self) -> None:
            self.w, self.grads = np.ones(3), {"w": np.full(3, 0.5)}

        @property
        def trainable_parameters(self) -> dict[str, np.ndarray]:
            return {"w": self.w}

    layer, opt = Plain(), optimizers.Adam(0.1)
    opt.step(layer)
    copied_layer, copied_opt = copy.deepcopy((layer, opt))
    opt.step(layer)
    copied_opt.step(copied_layer)  # Adam's second step: differs from a first one if the slots were lost
    np.testing.assert_array_equal(copied_layer.w, layer.w)
    fresh_layer, fresh = copy.deepcopy(layer), optimizers.Adam(0.1)
    fresh_layer.w[...] = copied_layer.w
    fresh.step(fresh_layer)
    copied_opt.step(copied_layer)
    assert not np.array_equal(fresh_layer.w, copied_layer.w)


def test_a_copy_made_inside_precise_statistics_is_not_part_of_the_block():
    layer = make_layer("torch2d")
    with bn.precise_statistics(layer):
        training_call(layer, np.ones(input_shape("torch2d"), np.float32))
        copied = copy.deepcopy(layer)
    assert copied._precise_stats is None
    before = copied.running_mean.copy()
    training_call(copied, np.full(input_shape("torch2d"), 3.0, np.float32))
    assert not np.array_equal(copied.running_mean, before)  # a normal momentum update


# ---- synchronized layers and their communicator ----------------------------------------------------


def _comm_world() -> Any:
    MPI = pytest.importorskip("mpi4py.MPI")
    return MPI.COMM_WORLD


@pytest.mark.parametrize(
    "make", [lambda comm: bn.SyncBatchNorm(3, comm=comm), lambda comm: bn.SyncBatchNormalization(comm=comm)]
)
def test_sync_layer_copies_and_the_communicator(make):
    world = _comm_world()
    derived = world.Dup()
    try:
        layer = make(derived)
        copied = copy.deepcopy(layer)
        assert copied.comm is derived  # shared: a process resource, not state
        with pytest.raises(TypeError, match=r"cannot pickle a Sync\w+ whose comm is .*mpi4py pickles only"):
            pickle.dumps(layer)
        layer.comm = world  # a predefined communicator pickles as the loading process's own
        assert pickle.loads(pickle.dumps(layer)).comm == world
        layer.comm = None
        assert pickle.loads(pickle.dumps(layer)).comm is None
    finally:
        derived.Free()
