"""tf-keras's rounding of hyperparameters, reproduced bit for bit.

Without TensorFlow the reference is a float64 derivation of what tf-keras computes. Its
ops on float32 tensors are IEEE float32 operations; a float32 op on float32 operands
equals the float64 op rounded to float32 (the float64 sum, difference, product, quotient
or square root of two float32 values is exact or rounds at most once below float32's
half-ulp, so the second rounding cannot change the result). So ``r(d(a) op d(b))`` below,
with ``r`` = float32 rounding and ``d`` = widening, is exactly tf's float32 ``a op b``.
The sources of the constants, in tf-keras's update_step:

* ``lr = tf.cast(self.learning_rate, variable.dtype)``: the learning rate is a float32
  variable, so ``r(lr)`` - for a float64 variable too, then widened;
* ``(1 - self.beta_1)``, ``(1 - self.beta_2)``, ``self.epsilon``: Python floats (the
  difference taken in double), converted to the variable's dtype once when they meet a
  tensor: ``r(1.0 - beta_2)``, not ``r(1) - r(beta_2)``;
* ``tf.cast(self.beta_2, dtype) ** t``: at t = 1 simply ``r(beta_2)``;
* BatchNormalization's moving averages: ``decay = tf.convert_to_tensor(1.0 - momentum)``
  is a float32 tensor, cast to the variable's dtype: ``d(r(1.0 - momentum))`` for float64.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import optimizers

r, d = np.float32, np.float64


class _Params:
    """The smallest object the optimizers update: one parameter and its gradient."""

    def __init__(self, w: np.ndarray) -> None:
        self.w = w.copy()
        self.grads: dict[str, np.ndarray] = {}

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        return {"w": self.w}


def _gradients(dtype: type, steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.normal(0, 2, 64).astype(dtype) for _ in range(steps)]


def _adam_float32_reference(w0: np.ndarray, grads: list[np.ndarray], lr: float, b1: float, b2: float, eps: float):
    """tf-keras's Adam on a float32 variable, op by op in float64 with float32 rounding:
    (w after the first step, m and v after every step)."""
    one_minus_b1, one_minus_b2 = d(r(1.0 - b1)), d(r(1.0 - b2))
    m = np.zeros_like(w0, np.float64)
    v = np.zeros_like(w0, np.float64)
    ms, vs, w1 = [], [], None
    for t, g32 in enumerate(grads, 1):
        g = d(g32)
        m = d(r(m + d(r(d(r(g - m)) * one_minus_b1))))
        v = d(r(v + d(r(d(r(d(r(g * g)) - v)) * one_minus_b2))))
        ms.append(r(m))
        vs.append(r(v))
        if t == 1:  # beta powers are r(beta) exactly at t = 1
            # alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
            root = d(r(math.sqrt(d(r(1.0 - d(r(b2)))))))
            alpha = d(r(d(r(d(r(lr)) * root)) / d(r(1.0 - d(r(b1))))))
            # variable.assign_sub((m * alpha) / (tf.sqrt(v) + self.epsilon))
            step = d(r(d(r(m * alpha)) / d(r(d(r(np.sqrt(v))) + d(r(eps))))))
            w1 = r(d(w0) - step)
    return w1, ms, vs


@pytest.mark.parametrize("b2", [0.999, 0.99, 0.9999])
def test_adam_float32_matches_tf_keras_op_by_op(b2):
    lr, b1, eps = 0.001, 0.9, 1e-7
    w0 = np.random.default_rng(0).normal(size=64).astype(np.float32)
    grads = _gradients(np.float32, 3)
    w1, ms, vs = _adam_float32_reference(w0, grads, lr, b1, b2, eps)
    layer, opt = _Params(w0), optimizers.Adam(lr, beta_1=b1, beta_2=b2, epsilon=eps)
    for t, g in enumerate(grads):
        layer.grads = {"w": g}
        opt.step(layer)
        slot = opt._state[layer]["w"]
        np.testing.assert_array_equal(slot.arrays["m"], ms[t])
        np.testing.assert_array_equal(slot.arrays["v"], vs[t])  # r(1) - r(b2) was off by up to 4.7e-5 relative
        if t == 0:
            np.testing.assert_array_equal(layer.w, w1)


def test_adam_float64_rounds_only_the_learning_rate_to_float32():
    lr, b1, b2, eps = 0.001, 0.9, 0.999, 1e-7
    w0 = np.random.default_rng(1).normal(size=64)
    (g,) = _gradients(np.float64, 1)
    m, v = g * (1.0 - b1), (g * g) * (1.0 - b2)  # 0 + (g - 0) * (1 - b): float64 throughout
    alpha = d(r(lr)) * math.sqrt(1.0 - b2) / (1.0 - b1)
    want = w0 - (m * alpha) / (np.sqrt(v) + eps)
    layer, opt = _Params(w0), optimizers.Adam(lr, beta_1=b1, beta_2=b2, epsilon=eps)
    layer.grads = {"w": g}
    opt.step(layer)
    np.testing.assert_array_equal(layer.w, want)
    exact = w0 - (m * (lr * math.sqrt(1.0 - b2) / (1.0 - b1))) / (np.sqrt(v) + eps)
    assert not np.array_equal(layer.w, exact)  # the test tells the two roundings apart


@pytest.mark.parametrize("opt_cls", [optimizers.SGD, optimizers.RMSprop])
def test_sgd_and_rmsprop_float64_use_the_float32_learning_rate(opt_cls):
    w0 = np.random.default_rng(2).normal(size=64)
    (g,) = _gradients(np.float64, 1)
    runs = {}
    for lr in (0.1, float(r(0.1))):  # the rate and its float32 rounding give the same step
        layer = _Params(w0)
        layer.grads = {"w": g}
        opt_cls(lr).step(layer)
        runs[lr] = layer.w
    np.testing.assert_array_equal(runs[0.1], runs[float(r(0.1))])
    if opt_cls is optimizers.SGD:
        np.testing.assert_array_equal(runs[0.1], w0 + -g * d(r(0.1)))  # variable.assign_add(-gradient * lr)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_keras_moving_average_decay_is_rounded_to_float32_first(dtype):
    momentum = 0.99
    layer = bn.BatchNormalization(momentum=momentum, dtype=dtype)
    x = np.array([[1.0], [3.0]], dtype)  # batch mean exactly 2, variance exactly 1
    layer(x, training=True)
    pdt = np.dtype(layer.param_dtype).type  # float32 variables for float16 (as tf-keras)
    decay = pdt(r(1.0 - momentum))
    want_mean = pdt(0) - (pdt(0) - pdt(2.0)) * decay
    want_var = pdt(1) - (pdt(1) - pdt(1.0)) * decay
    np.testing.assert_array_equal(layer.moving_mean, [want_mean])
    np.testing.assert_array_equal(layer.moving_variance, [want_var])
    if dtype == "float64":
        assert layer.moving_mean[0] != 2.0 * (1.0 - momentum)  # the exact decay gives another value


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow")
def test_adam_matches_tf_keras_itself():  # pragma: no cover - only where TensorFlow is installed
    import tensorflow as tf

    w0 = np.random.default_rng(0).normal(size=64).astype(np.float32)
    grads = _gradients(np.float32, 3)
    var = tf.Variable(w0)
    tf_opt = tf.keras.optimizers.Adam(0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    layer, opt = _Params(w0), optimizers.Adam(0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    for g in grads:
        tf_opt.apply_gradients([(tf.constant(g), var)])
        layer.grads = {"w": g}
        opt.step(layer)
        np.testing.assert_array_equal(layer.w, var.numpy())
