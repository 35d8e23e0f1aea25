"""bn.initializers, bn.regularizers, bn.constraints: names, formulas, tf-keras's serialized form."""

from __future__ import annotations

import math

import numpy as np
import pytest

import batchnorm as bn

INIT_NAMES = {
    "zeros": ("Zeros", {}),
    "ones": ("Ones", {}),
    "constant": ("Constant", {"value": 0}),
    "random_normal": ("RandomNormal", {"mean": 0.0, "stddev": 0.05, "seed": None}),
    "random_uniform": ("RandomUniform", {"minval": -0.05, "maxval": 0.05, "seed": None}),
    "truncated_normal": ("TruncatedNormal", {"mean": 0.0, "stddev": 0.05, "seed": None}),
    "glorot_uniform": ("GlorotUniform", {"seed": None}),
    "glorot_normal": ("GlorotNormal", {"seed": None}),
    "he_normal": ("HeNormal", {"seed": None}),
    "he_uniform": ("HeUniform", {"seed": None}),
    "lecun_normal": ("LecunNormal", {"seed": None}),
    "lecun_uniform": ("LecunUniform", {"seed": None}),
    "variance_scaling": (
        "VarianceScaling",
        {"scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal", "seed": None},
    ),
}


def keras_form(family: str, class_name: str, config: dict) -> dict:
    """How tf-keras serializes an initializer, regularizer or constraint."""
    return {"module": f"keras.{family}", "class_name": class_name, "config": config, "registered_name": None}


@pytest.mark.parametrize("name", sorted(INIT_NAMES))
def test_initializer_names_serialize_like_tf_keras(name):
    class_name, config = INIT_NAMES[name]
    init = bn.initializers.get(name)
    assert bn.initializers.serialize(init) == keras_form("initializers", class_name, config)
    again = bn.initializers.get(bn.initializers.serialize(init))
    assert type(again) is type(init)
    assert again.get_config() == init.get_config()
    values = init((4, 5), np.float32)
    assert values.shape == (4, 5)
    assert values.dtype == np.float32


def test_initializer_distributions():
    n = 200_000
    assert np.all(bn.initializers.Constant(1.5)((3,)) == 1.5)
    v = bn.initializers.RandomNormal(1.0, 0.1, seed=1)((n,))
    assert abs(v.mean() - 1.0) < 2e-3
    assert abs(v.std() - 0.1) < 2e-3
    v = bn.initializers.RandomUniform(-1.0, 2.0, seed=2)((n,))
    assert v.min() >= -1.0
    assert v.max() < 2.0
    assert abs(v.mean() - 0.5) < 1e-2
    v = bn.initializers.TruncatedNormal(0.0, 1.0, seed=3)((n,))
    assert np.abs(v).max() <= 2.0
    assert abs(v.std() - 0.8796) < 5e-3
    # glorot_uniform on (fan_in, fan_out) = (50, 30): uniform on +-sqrt(6/80)
    v = bn.initializers.GlorotUniform(seed=4)((50, 30))
    assert np.abs(v).max() <= math.sqrt(6 / 80)
    assert np.abs(v).max() > 0.9 * math.sqrt(6 / 80)
    # he_normal: truncated normal with stddev sqrt(2/fan_in); conv kernel (3,3,16,8): fan_in = 144
    v = bn.initializers.HeNormal(seed=5)((3, 3, 16, 8 * 100))
    assert abs(v.std() - math.sqrt(2 / 144)) < 2e-3
    # a seeded initializer repeats itself, an unseeded one does not
    assert np.array_equal(bn.initializers.HeNormal(seed=5)((4,)), bn.initializers.HeNormal(seed=5)((4,)))
    assert not np.array_equal(bn.initializers.RandomNormal()((8,)), bn.initializers.RandomNormal()((8,)))


def test_layer_initializers_and_callables():
    layer = bn.BatchNormalization(
        gamma_initializer="random_uniform",
        beta_initializer=lambda shape, dtype=None: np.full(shape, 0.5, dtype),
        moving_variance_initializer=bn.initializers.Constant(4.0),
        renorm=True,
    )
    layer.build((3, 6))
    assert layer.gamma.shape == (6,)
    assert np.abs(layer.gamma).max() <= 0.05
    np.testing.assert_array_equal(layer.beta, 0.5)
    np.testing.assert_array_equal(layer.moving_stddev, 2.0)  # sqrt of the moving_variance initializer
    np.testing.assert_array_equal(layer.renorm_stddev, 2.0)
    with pytest.raises(ValueError, match="cannot serialize"):
        layer.get_config()


def test_regularizers():
    w = np.array([1.0, -2.0, 0.0], np.float32)
    l2 = bn.regularizers.get("l2")
    assert l2.l2 == np.float32(0.01)
    assert bn.regularizers.L2(0.5)(np.ones(3, np.float32)) == 1.5
    assert bn.regularizers.L1(0.5)(w) == pytest.approx(1.5)
    both = bn.regularizers.get("l1_l2")
    assert both(w) == pytest.approx(np.float32(0.01) * 3 + np.float32(0.01) * 5)
    np.testing.assert_allclose(both.gradient(w), np.float32(0.01) * np.sign(w) + 2 * np.float32(0.01) * w)
    assert bn.regularizers.L1L2()(w) == 0.0
    assert bn.regularizers.serialize(both) == keras_form(
        "regularizers", "L1L2", {"l1": 0.009999999776482582, "l2": 0.009999999776482582}
    )
    assert bn.regularizers.get({"class_name": "L1", "config": {"l1": 0.25}}).l1 == 0.25
    with pytest.raises(ValueError, match="l1"):
        bn.regularizers.L1(-1.0)
    with pytest.raises(TypeError, match="gradient"):
        bn.regularizers.gradient(lambda w: 0.0, w)


def test_constraints():
    w = np.array([3.0, -4.0], np.float32)
    np.testing.assert_array_equal(bn.constraints.get("non_neg")(w), [3.0, 0.0])
    np.testing.assert_allclose(bn.constraints.get("max_norm")(w), w * 2 / (5 + 1e-7), rtol=1e-6)
    np.testing.assert_allclose(bn.constraints.get("unit_norm")(w), w / 5, rtol=1e-6)
    mm = bn.constraints.MinMaxNorm(min_value=6.0, max_value=8.0, rate=0.5)
    np.testing.assert_allclose(mm(w), w * (0.5 * 6 + 0.5 * 5) / 5, rtol=1e-6)
    for name, class_name, config in [
        ("max_norm", "MaxNorm", {"max_value": 2, "axis": 0}),
        ("min_max_norm", "MinMaxNorm", {"min_value": 0.0, "max_value": 1.0, "rate": 1.0, "axis": 0}),
        ("unit_norm", "UnitNorm", {"axis": 0}),
        ("non_neg", "NonNeg", {}),
    ]:
        c = bn.constraints.get(name)
        assert bn.constraints.serialize(c) == keras_form("constraints", class_name, config)
    assert bn.constraints.get(None) is None
    f = np.abs
    assert bn.constraints.get(f) is f
