"""bn.BatchNormalization against tf-keras 2 (golden files), small fixtures worked out by hand from tf-keras's
algorithms, errors, state."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

import batchnorm as bn
from keras_golden import assert_close, case_names, load, make_layer, tolerance, weight_list

LAYER_CASES = case_names("layer")


def test_golden_files_present():
    assert len(LAYER_CASES) >= 40
    assert len(case_names("optimizer")) >= 9  # the optimizers' cases (tests/test_optimizers.py)


# --------------------------------------------------------------------------- golden
@pytest.mark.parametrize("name", LAYER_CASES)
def test_matches_tf_keras(name):
    meta, arrays = load(name)
    dtype = meta["kwargs"].get("dtype", "float32")
    tol = tolerance(dtype)
    seen: list[list[int]] = []
    layer = make_layer(meta, seen)
    layer.build(meta["shape"])
    w_init = weight_list(arrays, "w_init_")
    assert [w.shape for w in layer.get_weights()] == [w.shape for w in w_init]
    if not meta["random_init"]:  # the initializers' own values
        for ours, theirs in zip(layer.get_weights(), w_init, strict=True):
            assert_close(ours, theirs, 1e-7, f"{name}: initial weight")
    layer.set_weights(w_init)
    assert_close(np.array([float(v) for v in layer.losses]), arrays["losses"], 1e-6, f"{name}: losses")
    for i, step in enumerate(meta["steps"]):
        if "set_trainable" in step:
            layer.trainable = step["set_trainable"]
        x = arrays[f"x{i}"]
        mask = arrays.get(f"mask{i}")
        y = layer(x, training=step["training"], mask=mask)
        assert y.dtype == layer.compute_dtype
        assert_close(y, arrays[f"y{i}"], tol, f"{name} step {i}: y")
        dy = arrays[f"dy{i}"]
        dx = layer.backward(dy)
        terms = 0.0
        if not np.any(arrays[f"dx{i}"]):  # one value per channel: dx = a*dy - a*dy, exactly 0 in tf-keras
            gamma = 1.0 if layer.gamma is None else float(np.max(np.abs(layer.gamma)))
            terms = float(np.max(np.abs(dy.astype(np.float64)))) * gamma / np.sqrt(layer.epsilon)
        assert_close(dx, arrays[f"dx{i}"], tol, f"{name} step {i}: dx", scale=terms)
        for key in ("gamma", "beta"):
            if f"d{key}{i}" in arrays:
                assert_close(layer.grads[key], arrays[f"d{key}{i}"], tol, f"{name} step {i}: d{key}")
            else:
                assert key not in layer.grads
        for j, (ours, theirs) in enumerate(zip(layer.get_weights(), weight_list(arrays, f"w{i}_"), strict=True)):
            assert ours.dtype == theirs.dtype
            assert_close(ours, theirs, 1e-5, f"{name} step {i}: weight {j} ({layer.weight_names[j]})")
    assert layer.fused == meta["fused"]
    assert len(layer.trainable_weights) == meta["trainable_count"]
    assert [n.split("/")[-1] for n in layer.weight_names] == [n.split("/")[-1] for n in meta["weight_names"]]
    if meta.get("adjustment_shapes") is not None:
        assert seen == meta["adjustment_shapes"]
    _check_config(layer, meta)


def _check_config(layer: bn.BatchNormalization, meta: dict) -> None:
    ours = layer.get_config()
    theirs = dict(meta["config"])
    assert list(ours) == list(theirs)
    if "name" not in meta["kwargs"]:
        theirs["name"] = ours["name"]  # tf-keras numbers its default names per process
    if "virtual_batch_size" in theirs:
        # tf-keras reports the axes shifted by the ghost-batch dimension it inserted; ours are the user's.
        theirs["axis"] = [a - 1 for a in theirs["axis"]]
    assert ours == theirs


# --------------------------------------------------------------------------- hand-worked fixtures
def test_renorm_fixture():
    layer = bn.BatchNormalization(
        momentum=0.8, renorm=True, renorm_momentum=0.9, renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}
    )
    x = np.array([[1], [2], [3], [6]], np.float32)
    layer.build(x.shape)
    layer.set_weights([[2.0], [0.5], [1.0], [4.0], [2.0], [2.0], [1.5]])
    y = layer(x, training=True)
    np.testing.assert_allclose(y.ravel(), [-1.166667, 0.166667, 1.5, 5.5], rtol=1e-5, atol=1e-6)
    w = dict(zip([n.split("/")[-1][:-2] for n in layer.weight_names], layer.get_weights(), strict=True))
    np.testing.assert_allclose(w["renorm_mean"], [2.1], rtol=1e-6)
    np.testing.assert_allclose(w["renorm_stddev"], [1.5371096], rtol=1e-6)
    np.testing.assert_allclose(w["moving_mean"], [1.4], rtol=1e-6)
    np.testing.assert_allclose(w["moving_stddev"], [1.9742192], rtol=1e-6)
    np.testing.assert_allclose(w["moving_variance"], [3.8965416], rtol=1e-6)
    dx = layer.backward(np.array([[1], [-2], [0.5], [3]], np.float32))
    np.testing.assert_allclose(dx.ravel(), [2.213797, -2.643102, -0.166667, 0.595972], rtol=1e-5, atol=1e-6)
    # r, d constants: dgamma = r*sum(g*x_hat) + d*sum(g), dbeta = sum(g)
    np.testing.assert_allclose(layer.grads["beta"], [2.5], rtol=1e-6)
    # inference: plain BN with moving_mean / moving_variance
    y_inf = layer(x, training=False)
    np.testing.assert_allclose(y_inf, 2.0 * (x - 1.4) / np.sqrt(3.8965416 + 1e-3) + 0.5, rtol=1e-5)


def test_ghost_batch_fixture():
    layer = bn.BatchNormalization(momentum=0.0, virtual_batch_size=3)
    x = np.array([[0], [1], [2], [10], [11], [12]], np.float32)
    y = layer(x, training=True)
    np.testing.assert_allclose(
        y.ravel(), [-0.9057332, -1.3934355, -0.4877025, 0.4877026, 1.3934356, 0.9057331], rtol=1e-5
    )
    assert layer.gamma.shape == (1, 1, 1)
    np.testing.assert_allclose(layer.moving_mean.ravel(), [6.0], rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.ravel(), [22.88889], rtol=1e-6)  # not 25.6667
    # inference takes any batch size
    assert layer(x[:5], training=False).shape == (5, 1)


def test_ghost_batch_equal_to_batch_is_plain_bn(rng):
    x = rng.normal(size=(6, 4)).astype(np.float32)
    a = bn.BatchNormalization(virtual_batch_size=6, momentum=0.5)
    b = bn.BatchNormalization(momentum=0.5)
    np.testing.assert_allclose(a(x, training=True), b(x, training=True), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.moving_variance.ravel(), b.moving_variance, rtol=1e-6)


def test_fused_variance_fixture():
    x = np.array([[[[1]]], [[[3]]]], np.float32)
    for fused, expected in ((None, 2.0), (True, 2.0), (False, 1.0)):
        layer = bn.BatchNormalization(momentum=0.0, fused=fused)
        y = layer(x, training=True)
        np.testing.assert_allclose(y.ravel(), [-1, 1] / np.sqrt(1 + 1e-3), rtol=1e-6)  # biased in the output
        assert layer.moving_variance.tolist() == [expected]
        assert layer.fused is (fused is not False)
    # not fused: 2-D input, axis list, axis in the middle, float64, renorm, ghost batches, adjustment
    for kwargs, shape in [
        ({}, (2, 1)),
        ({"axis": [1, 3]}, (2, 1, 1, 1)),
        ({"axis": 2}, (2, 1, 1, 1)),
        ({"dtype": "float64"}, (2, 1, 1, 1)),
        ({"virtual_batch_size": 2}, (2, 1, 1, 1)),
        ({"adjustment": lambda s: (1.0, 0.0)}, (2, 1, 1, 1)),
    ]:
        layer = bn.BatchNormalization(momentum=0.0, **kwargs)
        layer(np.array([1.0, 3.0]).reshape(shape), training=True)
        assert layer.fused is False
        np.testing.assert_allclose(layer.moving_variance.ravel(), [1.0])


def test_one_value_per_channel_gives_beta_and_zero_variance():
    layer = bn.BatchNormalization(beta_initializer=bn.initializers.Constant(0.25))
    y = layer(np.array([[5.0, -3.0]], np.float32), training=True)
    np.testing.assert_allclose(y, 0.25)
    np.testing.assert_allclose(layer.moving_variance, 0.99)


# --------------------------------------------------------------------------- modes
def test_training_none_and_false_are_inference(rng):
    x = rng.normal(size=(5, 3)).astype(np.float32)
    layer = bn.BatchNormalization()
    for training in (None, False, 0):
        np.testing.assert_allclose(layer(x, training=training), x / np.sqrt(1 + 1e-3), rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean, 0)


@pytest.mark.parametrize("later", [False, True])
def test_trainable_false_forces_inference_and_freezes(rng, later):
    x = rng.normal(2.0, 3.0, size=(6, 3)).astype(np.float32)
    layer = bn.BatchNormalization(trainable=not later and False)
    layer.build(x.shape)
    layer.trainable = False
    y = layer(x, training=True)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean, 0)
    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) == 4
    dx = layer.backward(np.ones_like(x))  # inference gradient: gamma/sqrt(var + eps)
    np.testing.assert_allclose(dx, 1 / np.sqrt(1 + 1e-3), rtol=1e-6)
    layer.trainable = True
    layer(x, training=True)
    assert np.all(layer.moving_mean != 0)


def test_weights_and_losses():
    layer = bn.BatchNormalization(gamma_regularizer=bn.regularizers.L2(0.5), beta_regularizer="l1", name="bnx")
    assert layer.weights == []
    assert layer.losses == []
    layer.build((2, 3))
    assert layer.weight_names == ["bnx/gamma:0", "bnx/beta:0", "bnx/moving_mean:0", "bnx/moving_variance:0"]
    assert [w.shape for w in layer.weights] == [(3,)] * 4
    assert layer.trainable_weights[0] is layer.gamma
    assert layer.trainable_weights[1] is layer.beta
    assert layer.non_trainable_weights[0] is layer.moving_mean
    assert layer.losses == [pytest.approx(1.5), 0.0]  # L2(0.5) on ones(3): 0.5 * 3 = 1.5
    assert layer.losses[0].dtype == np.float32
    r = bn.BatchNormalization(renorm=True, center=False, scale=False)
    r.build((2, 5, 4))
    assert [n.split("/")[-1] for n in r.weight_names] == [
        "moving_mean:0",
        "moving_variance:0",
        "moving_stddev:0",
        "renorm_mean:0",
        "renorm_stddev:0",
    ]
    assert r.trainable_weights == []
    assert r.gamma is None
    assert r.beta is None


def test_parameter_shapes():
    cases = [
        ({}, (4, 3), (3,)),
        ({"axis": 1}, (4, 3, 5), (3,)),
        ({"axis": [1, 3]}, (4, 2, 3, 5), (1, 2, 1, 5)),
        ({"axis": [-1]}, (4, 3), (3,)),
        ({"virtual_batch_size": 2}, (4, 3), (1, 1, 3)),
        ({"virtual_batch_size": 2}, (4, 2, 2, 3), (1, 1, 1, 1, 3)),
        ({"virtual_batch_size": 2, "axis": 1}, (4, 3, 2), (1, 1, 3, 1)),
    ]
    for kwargs, shape, param in cases:
        layer = bn.BatchNormalization(**kwargs)
        x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        layer(x, training=True)
        assert [w.shape for w in layer.weights] == [param] * 4, kwargs
        layer.backward(np.ones_like(x))
        assert layer.grads["gamma"].shape == param


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtypes(dtype, rng):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    layer = bn.BatchNormalization(dtype=dtype)
    x = rng.normal(300.0, 200.0, size=(8, 3))  # squares overflow float16: statistics stay float32
    y = layer(x, training=True)
    assert str(y.dtype) == dtype
    expected_param = "float64" if dtype == "float64" else "float32"
    assert all(str(w.dtype) == expected_param for w in layer.weights)
    assert np.all(np.isfinite(layer.moving_variance))
    xc = x.astype(y.dtype).astype(np.float64)
    np.testing.assert_allclose(layer.moving_variance, 0.99 + 0.01 * xc.var(axis=0), rtol=1e-5)
    dx = layer.backward(np.ones_like(x))
    assert dx.dtype == y.dtype


def test_inputs_are_cast_to_the_layer_dtype():
    layer = bn.BatchNormalization()
    y = layer(np.arange(12).reshape(4, 3), training=True)  # integers
    assert y.dtype == np.float32
    assert layer(np.ones((2, 3), np.float64)).dtype == np.float32
    with pytest.raises(TypeError, match="numeric"):
        layer(np.array([["a", "b", "c"]]))


def test_mask_is_ignored_with_a_warning_on_the_fused_path(rng):
    x = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
    a, b = bn.BatchNormalization(), bn.BatchNormalization()
    with pytest.warns(UserWarning, match="Masking is not supported with `fused=True`"):
        ya = a(x, training=True, mask=np.zeros((2, 2, 2), bool))
    np.testing.assert_array_equal(ya, b(x, training=True))


def test_mask_weights_only_the_unmasked_positions(rng):
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 1]], bool)
    layer = bn.BatchNormalization(momentum=0.0)
    y = layer(x, training=True, mask=mask)
    sel = x[mask].astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean, sel.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, sel.var(axis=0), rtol=1e-5)
    np.testing.assert_allclose(y, (x - sel.mean(0)) / np.sqrt(sel.var(0) + 1e-3), rtol=1e-5, atol=1e-5)


def test_threads_sharing_a_layer_lose_no_update(rng):
    x = rng.normal(1.0, 2.0, size=(64, 8)).astype(np.float32)
    shared = bn.BatchNormalization(momentum=0.9)
    serial = bn.BatchNormalization(momentum=0.9)
    n_threads, n_calls = 4, 10

    def work():
        for _ in range(n_calls):
            shared(x, training=True)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(n_threads * n_calls):
        serial(x, training=True)
    np.testing.assert_array_equal(shared.moving_mean, serial.moving_mean)
    np.testing.assert_array_equal(shared.moving_variance, serial.moving_variance)


# --------------------------------------------------------------------------- errors leave state unchanged
def snapshot(layer: bn.BatchNormalization) -> dict:
    return {
        "built": layer.built,
        "weights": [w.copy() for w in layer.weights],
        "grads": {k: v.copy() for k, v in layer.grads.items()},
        "fused": layer.fused,
        "axis": copy.deepcopy(layer.axis),
        "trainable": layer.trainable,
        "last": layer._last,
    }


def assert_unchanged(layer: bn.BatchNormalization, before: dict) -> None:
    after = snapshot(layer)
    assert after["built"] == before["built"]
    assert after["fused"] == before["fused"]
    assert after["axis"] == before["axis"]
    assert after["trainable"] == before["trainable"]
    assert after["last"] is before["last"]
    assert len(after["weights"]) == len(before["weights"])
    for a, b in zip(after["weights"], before["weights"], strict=True):
        assert a.tobytes() == b.tobytes()
    assert after["grads"].keys() == before["grads"].keys()
    for k in after["grads"]:
        assert after["grads"][k].tobytes() == before["grads"][k].tobytes()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"renorm": True, "renorm_momentum": 2.0}, ValueError, "renorm_momentum"),
        ({"epsilon": -1e-3}, ValueError, "epsilon"),
        ({"epsilon": float("nan")}, ValueError, "epsilon"),
        ({"epsilon": float("inf")}, ValueError, "epsilon"),
        ({"axis": "x"}, TypeError, "axis"),
        ({"axis": 1.0}, TypeError, "axis"),
        ({"renorm": True, "renorm_clipping": {"rmax": 2, "foo": 1}}, ValueError, "invalid keys for `renorm_clipping`"),
        ({"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2}}, ValueError, "rmax"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1}}, ValueError, "dmax"),
        ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
        ({"virtual_batch_size": 2.5}, TypeError, "virtual_batch_size"),
        ({"virtual_batch_size": 2, "adjustment": lambda s: (1, 0)}, ValueError, "adjustment"),
        ({"fused": True, "renorm": True}, ValueError, "renorm=True"),
        ({"fused": True, "axis": [1, 3]}, ValueError, "axis is 1 or 3"),
        ({"fused": True, "axis": 2}, ValueError, "axis is 1 or 3"),
        ({"fused": True, "virtual_batch_size": 2}, ValueError, "virtual_batch_size"),
        ({"fused": True, "adjustment": lambda s: (1, 0)}, ValueError, "adjustment"),
        ({"fused": True, "dtype": "float64"}, ValueError, "float16, bfloat16, or float32"),
        ({"dtype": "int32"}, TypeError, "dtype"),
        ({"gamma_initializer": "nope"}, ValueError, "Unknown initializer"),
        ({"beta_regularizer": "l3"}, ValueError, "Unknown regularizer"),
        ({"gamma_constraint": 42}, ValueError, "constraint"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bn.BatchNormalization(**kwargs)


def _trained(kwargs: dict, shape: tuple, rng) -> bn.BatchNormalization:
    layer = bn.BatchNormalization(**kwargs)
    x = rng.normal(size=shape).astype(np.float32)
    layer(x, training=True)
    layer.backward(np.ones_like(x))
    return layer


@pytest.mark.parametrize(
    ("kwargs", "build_shape", "call", "exc", "match"),
    [
        # first call fails while building: the layer stays unbuilt
        ({"fused": True}, None, lambda layer: layer(np.ones((4, 3)), training=True), ValueError, "4D or 5D"),
        ({"axis": -4}, None, lambda layer: layer(np.ones((2, 2, 2, 2))), ValueError, "Unsupported axis"),
        ({"axis": 3}, None, lambda layer: layer(np.ones((4, 3))), ValueError, "Invalid value for `axis`"),
        ({"axis": [1, -1]}, None, lambda layer: layer(np.ones((4, 3))), ValueError, "Duplicate axis"),
        ({"virtual_batch_size": 2, "axis": 0}, None, lambda layer: layer(np.ones((4, 3))), ValueError, "axis cannot"),
        ({"virtual_batch_size": 4}, None, lambda layer: layer(np.ones((6, 3)), training=True), ValueError, "divide"),
        ({}, None, lambda layer: layer(np.ones(3)), ValueError, "at least 2 dimensions"),
        ({}, None, lambda layer: layer(np.ones((0, 3)), training=True), ValueError, "empty"),
        # built (and trained) layers
        ({"virtual_batch_size": 4}, (8, 3), lambda layer: layer(np.ones((6, 3)), training=True), ValueError, "divide"),
        ({}, (8, 3), lambda layer: layer(np.ones((8, 4)), training=True), ValueError, "expected axis 1"),
        ({}, (8, 3), lambda layer: layer(np.ones((8, 3, 1)), training=True), ValueError, "expected ndim=2"),
        ({}, (8, 3), lambda layer: layer.backward(np.ones((7, 3))), ValueError, "dy has shape"),
        ({}, (8, 3), lambda layer: layer.set_weights([np.ones(3)] * 3), ValueError, "length 3"),
        ({}, (8, 3), lambda layer: layer.set_weights([np.ones(3)] * 3 + [np.ones(4)]), ValueError, "shape"),
        ({}, (8, 3), lambda layer: layer.set_weights([np.ones((1, 3))] * 4), ValueError, "shape"),
        ({}, (2, 4, 3), lambda layer: layer(np.ones((2, 4, 3)), training=True, mask=np.ones(5)), ValueError, "mask"),
        ({"virtual_batch_size": 2}, (4, 3), lambda layer: layer(np.ones((4, 3)), True, np.ones(4)), ValueError, "mask"),
        (
            {"adjustment": lambda s: (np.ones((5, 3)), 0.0)},
            (5, 3),
            lambda layer: layer(np.ones((5, 3)), training=True),
            ValueError,
            "per-channel",
        ),
    ],
)
def test_call_errors_leave_state_unchanged(kwargs, build_shape, call, exc, match, rng):
    if build_shape is None:
        layer = bn.BatchNormalization(**kwargs)
    elif "adjustment" in kwargs:
        layer = bn.BatchNormalization(**kwargs)
        layer.build(build_shape)
    else:
        layer = _trained(kwargs, build_shape, rng)
    before = snapshot(layer)
    with pytest.raises(exc, match=match):
        call(layer)
    assert_unchanged(layer, before)


def test_backward_before_forward():
    layer = bn.BatchNormalization()
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((2, 3)))
    layer.build((2, 3))
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((2, 3)))


def test_set_weights_before_build():
    layer = bn.BatchNormalization()
    layer.set_weights([])
    with pytest.raises(ValueError, match="not built"):
        layer.set_weights([np.ones(3)] * 4)
    assert not layer.built


def test_set_weights_accepts_lists_and_casts():
    layer = bn.BatchNormalization(dtype="float16")
    layer.build((2, 2))
    gamma = layer.gamma
    layer.set_weights([[1.5, 2.0], np.array([0, 1], np.float64), (0.0, 0.0), [1, 1]])
    assert layer.gamma is gamma
    assert layer.gamma.dtype == np.float32
    np.testing.assert_array_equal(layer.gamma, [1.5, 2.0])


# --------------------------------------------------------------------------- config, save, load
def test_get_config_from_config_round_trip():
    layer = bn.BatchNormalization(
        axis=[1, 2],
        momentum=0.9,
        epsilon=1e-4,
        gamma_initializer=bn.initializers.RandomNormal(1.0, 0.1, seed=3),
        gamma_regularizer="l2",
        beta_constraint=bn.constraints.MaxNorm(1.5),
        renorm=True,
        renorm_clipping={"rmax": 2.0},
        renorm_momentum=0.95,
        dtype="float64",
        trainable=False,
        name="bn_rt",
    )
    cfg = layer.get_config()
    assert cfg["gamma_regularizer"] == {
        "module": "keras.regularizers",
        "class_name": "L2",
        "config": {"l2": 0.009999999776482582},
        "registered_name": None,
    }
    clone = bn.BatchNormalization.from_config(cfg)
    assert clone.get_config() == cfg
    assert "fused" not in cfg
    assert "synchronized" not in cfg


def test_from_config_takes_tf_keras_configs():
    meta, _ = load("dense_regularizers")
    layer = bn.BatchNormalization.from_config(meta["config"])
    assert layer.get_config() == meta["config"]
    meta, _ = load("vbs_renorm")
    cfg = dict(meta["config"]) | {"axis": -1}
    layer = bn.BatchNormalization.from_config(cfg)
    assert layer.virtual_batch_size == 4
    assert layer.renorm_clipping == {"rmax": 1.3, "dmax": 0.4}


def test_adjustment_is_left_out_of_the_config(caplog):
    layer = bn.BatchNormalization(adjustment=lambda s: (1.0, 0.0))
    assert "adjustment" not in layer.get_config()
    assert "cannot be serialized" in caplog.text
    with pytest.raises(ValueError, match="adjustment"):
        layer.save("unused.npz")


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({}, None),
        ({}, (6, 3)),
        ({"fused": False, "momentum": 0.9}, (2, 2, 2, 3)),
        ({"axis": [1, 3], "center": False}, (3, 2, 2, 4)),
        ({"renorm": True, "renorm_clipping": {"rmin": 0.5}, "scale": False}, (6, 2)),
        ({"virtual_batch_size": 2, "gamma_regularizer": "l1_l2", "beta_constraint": "unit_norm"}, (4, 3)),
        ({"dtype": "float16", "trainable": False, "name": "half"}, (3, 2, 2, 2)),
        ({"dtype": "float64", "axis": 1}, (3, 4, 2)),
        ({"dtype": "mixed_float16"}, (4, 2)),
    ],
)
def test_save_load_round_trip(kwargs, shape, tmp_path, rng):
    layer = bn.BatchNormalization(**kwargs)
    if shape is not None:
        x = rng.normal(size=shape)
        for _ in range(2):
            layer(x, training=True)
    path = tmp_path / "layer.npz"
    layer.save(path)
    loaded = bn.BatchNormalization.load(path)
    assert loaded.get_config() == layer.get_config()
    assert loaded.built == layer.built
    assert loaded.fused == layer.fused
    assert loaded.dtype == layer.dtype
    assert loaded.trainable == layer.trainable
    assert loaded.weight_names == layer.weight_names
    for a, b in zip(loaded.get_weights(), layer.get_weights(), strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    if shape is not None:
        x = rng.normal(size=shape)
        np.testing.assert_array_equal(loaded(x, training=True), layer(x, training=True))
        np.testing.assert_array_equal(loaded.moving_variance, layer.moving_variance)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, config=np.array("{}"), meta=np.array('{"class": "Other"}'))
    with pytest.raises(ValueError, match="not a BatchNormalization file"):
        bn.BatchNormalization.load(path)


def test_default_names_count_up():
    a, b = bn.BatchNormalization(), bn.BatchNormalization()
    assert a.name.startswith("batch_normalization")
    assert b.name != a.name
