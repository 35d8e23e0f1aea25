"""bn.optimizers against tf-keras's optimizers (golden files), and the optimizer protocol."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from keras_golden import assert_close, case_names, load, weight_list

OPTIMIZER_CASES = case_names("optimizer")


@pytest.mark.parametrize("name", OPTIMIZER_CASES)
def test_matches_tf_keras(name):
    meta, arrays = load(name)
    layer = bn.BatchNormalization(**meta["kwargs"])
    layer.build(meta["shape"])
    layer.set_weights(weight_list(arrays, "w_init_"))
    spec = meta["optimizer"]
    opt = getattr(bn.optimizers, spec["class"])(**spec.get("args", {}))
    for key, value in opt.get_config().items():  # same hyperparameters (and defaults) as tf-keras's
        assert meta["optimizer_config"][key] == pytest.approx(value, rel=1e-6), key
    for i in range(meta["steps"]):
        layer(arrays[f"x{i}"], training=True)
        layer.backward(arrays[f"dy{i}"])
        opt.step(layer)
        for j, (ours, theirs) in enumerate(zip(layer.get_weights(), weight_list(arrays, f"w{i}_"), strict=True)):
            assert_close(ours, theirs, 1e-5, f"{name} step {i}: weight {j} ({layer.weight_names[j]})")
    for key in layer.trainable_parameters:
        assert opt.iterations(layer, key) == meta["steps"]


class TorchLike:
    """A stand-in for a PyTorch-style layer: parameters "weight" and "bias", no regularizers."""

    def __init__(self, n: int) -> None:
        self.weight = np.ones(n, np.float32)
        self.bias = np.zeros(n, np.float32)
        self.grads: dict[str, np.ndarray] = {}

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}


@pytest.mark.parametrize("opt_cls", [bn.optimizers.SGD, bn.optimizers.RMSprop, bn.optimizers.Adam])
def test_protocol_other_names_and_in_place(opt_cls):
    m = TorchLike(3)
    w_before = m.weight
    m.grads = {"weight": np.array([1.0, -1.0, 0.0], np.float32), "bias": np.array([0.5, 0.5, 0.5], np.float32)}
    opt_cls().step(m)
    assert m.weight is w_before  # updated in place: the layer keeps its arrays
    assert m.weight[0] < 1.0 < m.weight[1]
    assert m.weight[2] == 1.0
    assert np.all(m.bias < 0)


def test_step_count_per_parameter():
    m = TorchLike(2)
    opt = bn.optimizers.Adam(learning_rate=0.1)
    m.grads = {"weight": np.ones(2, np.float32)}
    opt.step(m)
    opt.step(m)
    m.grads = {"weight": np.ones(2, np.float32), "bias": np.ones(2, np.float32)}
    opt.step(m)
    assert opt.iterations(m, "weight") == 3
    assert opt.iterations(m, "bias") == 1
    # The bias's first update is a first Adam step (bias-corrected): exactly -lr * sign(g).
    np.testing.assert_allclose(m.bias, [-0.1, -0.1], rtol=1e-5)


def test_state_is_per_layer():
    a, b = TorchLike(2), TorchLike(2)
    opt = bn.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    for layer in (a, b):
        layer.grads = {"weight": np.ones(2, np.float32)}
    opt.step(a)
    opt.step(a)
    opt.step([b])
    np.testing.assert_allclose(b.weight, 1 - 0.1, rtol=1e-6)  # b's first step: no momentum from a's
    np.testing.assert_allclose(a.weight, 1 - 0.1 - (0.1 + 0.09), rtol=1e-6)


def test_bad_gradient_changes_nothing():
    m = TorchLike(3)
    opt = bn.optimizers.Adam()
    m.grads = {"weight": np.ones(3, np.float32), "bias": np.ones(4, np.float32)}
    before = (m.weight.copy(), m.bias.copy())
    with pytest.raises(ValueError, match="bias"):
        opt.step(m)
    np.testing.assert_array_equal(m.weight, before[0])
    np.testing.assert_array_equal(m.bias, before[1])
    assert opt.iterations(m, "weight") == 0


def test_missing_protocol_is_a_type_error():
    with pytest.raises(TypeError, match="trainable_parameters"):
        bn.optimizers.SGD().step(object())


class GradsOnly:
    """Parameters found through the gradients' names (as with a PyTorch-style layer)."""

    def __init__(self) -> None:
        self.weight = np.ones(2, np.float32)
        self.bias = np.zeros(2, np.float32)
        self.grads = {"weight": np.ones(2, np.float32)}


def test_parameters_found_by_gradient_names():
    m = GradsOnly()
    bn.optimizers.SGD(learning_rate=0.5).step(m)
    np.testing.assert_allclose(m.weight, 0.5)
    np.testing.assert_array_equal(m.bias, 0.0)
    m.grads = {"scale": np.ones(2, np.float32)}
    with pytest.raises(TypeError, match="scale"):
        bn.optimizers.SGD().step(m)


def test_steps_pytorch_style_layers():
    if not hasattr(bn, "BatchNorm2d"):
        pytest.skip("no PyTorch-style layers in this build")
    m = bn.BatchNorm2d(3)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    m(x)
    m.backward(x)
    grads = {k: v.copy() for k, v in m.grads.items()}
    w0 = m.weight.copy()
    bn.optimizers.SGD(learning_rate=0.1).step(m)
    np.testing.assert_allclose(m.weight, w0 - 0.1 * grads["weight"], rtol=1e-6)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: bn.optimizers.SGD(learning_rate=-1), "learning_rate"),
        (lambda: bn.optimizers.SGD(momentum=1.5), "momentum"),
        (lambda: bn.optimizers.RMSprop(rho=-0.1), "rho"),
        (lambda: bn.optimizers.Adam(beta_1=2.0), "beta_1"),
        (lambda: bn.optimizers.Adam(epsilon=float("nan")), "epsilon"),
    ],
)
def test_bad_hyperparameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_frozen_layer_is_not_updated():
    layer = bn.BatchNormalization()
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    layer(x, training=True)
    layer.backward(np.ones_like(x))
    layer.trainable = False
    before = layer.get_weights()
    bn.optimizers.SGD(learning_rate=1.0).step(layer)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_regularizer_gradient_and_constraint_applied():
    layer = bn.BatchNormalization(gamma_regularizer=bn.regularizers.L2(0.5), beta_constraint="non_neg")
    layer.build((4, 2))
    layer.set_weights([np.array([1.0, 2.0]), np.array([0.05, 0.3]), np.zeros(2), np.ones(2)])
    layer.grads = {"gamma": np.zeros(2, np.float32), "beta": np.array([1.0, 1.0], np.float32)}
    bn.optimizers.SGD(learning_rate=0.1).step(layer)
    np.testing.assert_allclose(layer.gamma, [1.0 - 0.1 * 1.0, 2.0 - 0.1 * 2.0], rtol=1e-6)  # d/dw 0.5*w^2*... = w
    np.testing.assert_allclose(layer.beta, [0.0, 0.2], rtol=1e-6, atol=1e-7)  # 0.05-0.1 < 0 -> 0
