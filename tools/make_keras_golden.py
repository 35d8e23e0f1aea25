"""Writes tests/golden/keras/*.npz: what tf-keras 2 itself computes, for the Keras-layer tests.

Needs TensorFlow and tf-keras, which the package and its tests do not (CI only reads the
files this writes). In a separate virtual environment:

    python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu && /tmp/tfenv/bin/pip install --no-deps tf-keras
    /tmp/tfenv/bin/python tools/make_keras_golden.py          # from the repository root

Each layer case file holds ``meta`` (JSON: constructor arguments, the steps, tf-keras's
get_config(), weight names, versions) and, per step ``i``: the input ``x{i}`` (and
``mask{i}``), the upstream gradient ``dy{i}``, tf-keras's output ``y{i}``, the
gradients from ``tf.GradientTape`` of ``sum(y * dy)`` (``dx{i}``, ``dgamma{i}``,
``dbeta{i}``) and the weights after the step (``w{i}_{j}``, get_weights() order);
``w_init_{j}`` are the weights set before the first step, ``losses`` the regularization
losses then. Optimizer case files add the optimizer and record the weights after each
``apply_gradients`` of the tape's gradients of ``sum(y * dy) + sum(layer.losses)``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # plain Eigen kernels: reproducible numbers

import numpy as np
import tensorflow as tf
import tf_keras as keras

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "keras"


def plain(o: Any) -> Any:
    """tf-keras configs hold DictWrapper/ListWrapper and NumPy scalars; make them JSON."""
    if hasattr(o, "items"):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)) or type(o).__name__ == "ListWrapper":
        return [plain(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    return o


def random_weights(layer: Any, rng: np.random.Generator) -> list[np.ndarray]:
    """Non-default starting weights (so that every weight matters), by variable name."""
    out = []
    for w in layer.weights:
        shape, dtype = tuple(w.shape), w.dtype.as_numpy_dtype
        key = w.name.split("/")[-1].split(":")[0]
        if key == "gamma":
            a = rng.uniform(0.5, 1.5, shape)
        elif key in ("beta", "moving_mean", "renorm_mean"):
            a = rng.normal(0.0, 0.5, shape)
        elif key == "moving_variance":
            a = rng.uniform(0.5, 2.0, shape)
        else:  # moving_stddev, renorm_stddev
            a = rng.uniform(0.7, 1.5, shape)
        out.append(np.asarray(a, dtype=dtype))
    return out


def data(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: str, loc: float = 0.0, scale: float = 1.0
) -> np.ndarray:
    x = rng.normal(0.0, 1.0, shape) * rng.uniform(0.5, 3.0) * scale + rng.uniform(-2.0, 2.0) + loc
    return x.astype(tf.as_dtype(dtype).as_numpy_dtype)


def adjustment_fn(spec: dict[str, Any] | None) -> Any:
    if spec is None:
        return None
    scale = tf.constant(spec["scale"], tf.float32)
    bias = tf.constant(spec["bias"], tf.float32)
    seen: list[Any] = spec.setdefault("seen_shapes", [])

    def adjustment(shape: Any) -> tuple[Any, Any]:
        seen.append([int(s) for s in shape.numpy()])
        return scale, bias

    return adjustment


def run_layer_case(name: str, case: dict[str, Any], seed: int) -> None:
    rng = np.random.default_rng(seed)
    kwargs = dict(case.get("kwargs", {}))
    dtype = kwargs.get("dtype", "float32")
    adj = case.get("adjustment")
    layer = keras.layers.BatchNormalization(**kwargs, adjustment=adjustment_fn(adj))
    shape = tuple(case["shape"])
    layer.build(shape)
    arrays: dict[str, np.ndarray] = {}
    if case.get("random_init", True):
        w0 = random_weights(layer, rng)
        layer.set_weights(w0)
    for j, w in enumerate(layer.get_weights()):
        arrays[f"w_init_{j}"] = w
    arrays["losses"] = np.array([float(v) for v in layer.losses], np.float64)
    steps = []
    for i, step in enumerate(case["steps"]):
        if "set_trainable" in step:
            layer.trainable = step["set_trainable"]
        xshape = tuple(step.get("shape", shape))
        x = data(rng, xshape, dtype, **case.get("data", {}))
        dy = data(rng, xshape, dtype)
        mask = None
        if step.get("mask"):
            mask = rng.uniform(size=xshape[:-1]) < 0.7
            mask.flat[0] = True
            arrays[f"mask{i}"] = mask
        xt = tf.constant(x)
        params = [v for v in (layer.gamma, layer.beta) if v is not None]
        with tf.GradientTape() as tape:
            tape.watch(xt)
            for v in params:
                tape.watch(v)
            y = layer(xt, training=step["training"], mask=None if mask is None else tf.constant(mask))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(tf.constant(dy), tf.float32))
        grads = tape.gradient(loss, [xt, *params])
        arrays[f"x{i}"] = x
        arrays[f"dy{i}"] = dy
        arrays[f"y{i}"] = y.numpy()
        arrays[f"dx{i}"] = grads[0].numpy()
        k = 1
        for key, v in (("dgamma", layer.gamma), ("dbeta", layer.beta)):
            if v is not None:
                arrays[f"{key}{i}"] = grads[k].numpy()
                k += 1
        for j, w in enumerate(layer.get_weights()):
            arrays[f"w{i}_{j}"] = w
        steps.append({k2: v2 for k2, v2 in step.items() if k2 != "shape"} | {"shape": list(xshape)})
    meta = {
        "kind": "layer",
        "kwargs": kwargs,
        "adjustment": None if adj is None else {"scale": adj["scale"], "bias": adj["bias"]},
        "adjustment_shapes": None if adj is None else adj["seen_shapes"],
        "shape": list(shape),
        "random_init": case.get("random_init", True),
        "steps": steps,
        "config": plain(layer.get_config()),
        "weight_names": [w.name for w in layer.weights],
        "trainable_count": len(layer.trainable_weights),
        "fused": bool(layer.fused),
        "versions": {"tensorflow": tf.__version__, "tf_keras": keras.__version__},
    }
    save(name, meta, arrays)


def make_optimizer(spec: dict[str, Any]) -> Any:
    kind = spec["class"]
    args = dict(spec.get("args", {}))
    cls = {"SGD": keras.optimizers.SGD, "RMSprop": keras.optimizers.RMSprop, "Adam": keras.optimizers.Adam}[kind]
    return cls(**args, jit_compile=False)


def run_optimizer_case(name: str, case: dict[str, Any], seed: int) -> None:
    rng = np.random.default_rng(seed)
    kwargs = dict(case.get("kwargs", {}))
    layer = keras.layers.BatchNormalization(**kwargs)
    shape = tuple(case["shape"])
    layer.build(shape)
    w0 = random_weights(layer, rng)
    layer.set_weights(w0)
    opt = make_optimizer(case["optimizer"])
    arrays: dict[str, np.ndarray] = {f"w_init_{j}": w for j, w in enumerate(layer.get_weights())}
    for i in range(case["steps"]):
        x = data(rng, shape, "float32")
        dy = data(rng, shape, "float32")
        with tf.GradientTape() as tape:
            y = layer(tf.constant(x), training=True)
            loss = tf.reduce_sum(y * dy) + tf.add_n([*layer.losses, tf.constant(0.0)])
        variables = layer.trainable_weights
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables, strict=True))
        arrays[f"x{i}"] = x
        arrays[f"dy{i}"] = dy
        for j, w in enumerate(layer.get_weights()):
            arrays[f"w{i}_{j}"] = w
    meta = {
        "kind": "optimizer",
        "kwargs": kwargs,
        "shape": list(shape),
        "steps": case["steps"],
        "optimizer": case["optimizer"],
        "optimizer_config": plain({k: v for k, v in opt.get_config().items() if k != "learning_rate"})
        | {"learning_rate": float(opt.learning_rate.numpy())},
        "versions": {"tensorflow": tf.__version__, "tf_keras": keras.__version__},
    }
    save(name, meta, arrays)


def save(name: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # NumPy cannot read bfloat16 back without pickling its dtype: store those values as float32 (exact).
    arrays = {k: a.astype(np.float32) if a.dtype == tf.bfloat16.as_numpy_dtype else a for k, a in arrays.items()}
    np.savez_compressed(OUT / f"{name}.npz", meta=np.array(json.dumps(meta)), **arrays)


T, F, N = True, False, None


def steps(*modes: Any, **extra: Any) -> list[dict[str, Any]]:
    return [{"training": m} | extra for m in modes]


LAYER_CASES: dict[str, dict[str, Any]] = {
    # plain 2-D (non-fused, biased moving variance), every mode of `training`
    "dense_default": {"shape": [6, 3], "steps": steps(T, T, T, F, N)},
    "dense_defaults_untouched": {"shape": [5, 4], "random_init": False, "steps": steps(T, N)},
    "dense_momentum_eps": {"kwargs": {"momentum": 0.5, "epsilon": 0.1}, "shape": [7, 2], "steps": steps(T, T, F)},
    "dense_momentum_0": {"kwargs": {"momentum": 0.0}, "shape": [4, 3], "steps": steps(T, T)},
    "dense_momentum_1": {"kwargs": {"momentum": 1.0}, "shape": [4, 3], "steps": steps(T, F)},
    "dense_no_center_no_scale": {"kwargs": {"center": False, "scale": False}, "shape": [6, 3], "steps": steps(T, T, F)},
    "dense_no_scale": {"kwargs": {"scale": False}, "shape": [6, 3], "steps": steps(T, F)},
    "dense_no_center": {"kwargs": {"center": False}, "shape": [6, 3], "steps": steps(T, F)},
    "dense_axis0": {"kwargs": {"axis": 0}, "shape": [3, 5], "steps": steps(T, F)},
    "dense_one_row": {"shape": [1, 3], "steps": steps(T, T)},
    "dense_initializers": {
        "kwargs": {
            "beta_initializer": "constant",
            "gamma_initializer": {"class_name": "Constant", "config": {"value": 1.5}},
            "moving_mean_initializer": "ones",
            "moving_variance_initializer": {"class_name": "Constant", "config": {"value": 2.0}},
        },
        "shape": [5, 3],
        "random_init": False,
        "steps": steps(F, T),
    },
    "dense_regularizers": {
        "kwargs": {
            "gamma_regularizer": {"class_name": "L2", "config": {"l2": 0.5}},
            "beta_regularizer": "l1",
            "gamma_constraint": "non_neg",
            "beta_constraint": {"class_name": "MaxNorm", "config": {"max_value": 3, "axis": 0}},
        },
        "shape": [5, 3],
        "steps": steps(T),
    },
    "dense_l1_l2": {"kwargs": {"beta_regularizer": "l1_l2"}, "shape": [5, 3], "steps": steps(T)},
    # 3-D: channels last and first (non-fused)
    "seq_channels_last": {"shape": [3, 4, 5], "steps": steps(T, T, F)},
    "seq_axis1": {"kwargs": {"axis": 1}, "shape": [3, 4, 5], "steps": steps(T, T, F)},
    # fused: 4-D/5-D with the channel axis first or last -> unbiased moving variance
    "conv_nhwc_fused": {"shape": [3, 2, 2, 4], "steps": steps(T, T, T, F, N)},
    "conv_nhwc_fused_true": {"kwargs": {"fused": True}, "shape": [2, 3, 2, 3], "steps": steps(T, F)},
    "conv_nhwc_unfused": {"kwargs": {"fused": False}, "shape": [3, 2, 2, 4], "steps": steps(T, T, F)},
    "conv_nchw_fused": {"kwargs": {"axis": 1, "fused": True}, "shape": [3, 4, 2, 2], "steps": steps(T, T, F)},
    "conv_nchw_default": {"kwargs": {"axis": -3}, "shape": [3, 4, 2, 2], "steps": steps(T, F)},
    "conv_axis2": {"kwargs": {"axis": 2}, "shape": [2, 3, 4, 2], "steps": steps(T, T, F)},
    "conv_tiny_eps_fused": {"kwargs": {"epsilon": 1e-10, "momentum": 0.5}, "shape": [2, 2, 2, 3], "steps": steps(T, F)},
    "conv_no_center_scale_fused": {
        "kwargs": {"center": False, "scale": False, "momentum": 0.7},
        "shape": [2, 2, 3, 3],
        "steps": steps(T, F),
    },
    "conv5d_ndhwc_fused": {"shape": [2, 2, 2, 2, 3], "steps": steps(T, T, F)},
    "conv5d_ncdhw_fused": {"kwargs": {"axis": 1}, "shape": [2, 3, 2, 2, 2], "steps": steps(T, F)},
    "conv5d_axis3_unfused": {"kwargs": {"axis": 3}, "shape": [2, 2, 2, 3, 2], "steps": steps(T, F)},
    "conv_one_value_per_channel": {"kwargs": {"momentum": 0.9}, "shape": [1, 1, 1, 3], "steps": steps(T, T)},
    # axis lists: keepdims parameter shapes, non-fused
    "axis_list_1_3": {"kwargs": {"axis": [1, 3]}, "shape": [4, 2, 3, 5], "steps": steps(T, T, F)},
    "axis_list_neg": {"kwargs": {"axis": [-1, -2]}, "shape": [3, 4, 2], "steps": steps(T, F)},
    "axis_list_single": {"kwargs": {"axis": [1]}, "shape": [5, 3], "steps": steps(T, F)},
    # renorm
    "renorm_clipped": {
        "kwargs": {
            "renorm": True,
            "renorm_clipping": {"rmax": 1.2, "rmin": 0.8, "dmax": 0.3},
            "momentum": 0.9,
            "renorm_momentum": 0.8,
        },
        "shape": [8, 3],
        "steps": steps(T, T, T, F),
    },
    "renorm_unclipped": {"kwargs": {"renorm": True}, "shape": [3, 2, 2, 3], "steps": steps(T, T, F)},
    "renorm_rmax_only": {
        "kwargs": {"renorm": True, "renorm_clipping": {"rmax": 1.1}, "momentum": 0.5},
        "shape": [6, 2],
        "steps": steps(T, T, F),
    },
    "renorm_no_scale": {
        "kwargs": {"renorm": True, "scale": False, "renorm_clipping": {"dmax": 0.2}},
        "shape": [6, 3],
        "steps": steps(T, F),
    },
    "renorm_no_center": {"kwargs": {"renorm": True, "center": False}, "shape": [6, 3], "steps": steps(T, F)},
    "renorm_axis1": {
        "kwargs": {"renorm": True, "axis": 1, "momentum": 0.8},
        "shape": [3, 2, 4],
        "steps": steps(T, T, F),
    },
    "renorm_fresh": {
        "kwargs": {"renorm": True, "momentum": 0.6},
        "shape": [5, 2],
        "random_init": False,
        "steps": steps(T, T),
    },
    # virtual_batch_size (ghost batches, strided membership)
    "vbs_dense": {"kwargs": {"virtual_batch_size": 2}, "shape": [8, 3], "steps": steps(T, T, F)},
    "vbs_dense_infer_any_batch": {
        "kwargs": {"virtual_batch_size": 3},
        "shape": [6, 2],
        "steps": [{"training": True}, {"training": False, "shape": [5, 2]}, {"training": None, "shape": [4, 2]}],
    },
    "vbs_equals_batch": {"kwargs": {"virtual_batch_size": 6, "momentum": 0.5}, "shape": [6, 3], "steps": steps(T, F)},
    "vbs_conv": {"kwargs": {"virtual_batch_size": 2, "momentum": 0.8}, "shape": [4, 2, 2, 3], "steps": steps(T, T, F)},
    "vbs_axis1": {"kwargs": {"virtual_batch_size": 2, "axis": 1}, "shape": [6, 3, 2], "steps": steps(T, F)},
    "vbs_renorm": {
        "kwargs": {"virtual_batch_size": 4, "renorm": True, "renorm_clipping": {"rmax": 1.3, "dmax": 0.4}},
        "shape": [8, 3],
        "steps": steps(T, T, F),
    },
    # adjustment
    "adjustment": {
        "shape": [6, 2],
        "adjustment": {"scale": [2.0, 3.0], "bias": [0.5, -1.0]},
        "steps": steps(T, T, F, N),
    },
    "adjustment_renorm": {
        "kwargs": {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7}},
        "shape": [6, 3],
        "adjustment": {"scale": [1.1, 0.9, 1.0], "bias": [0.1, -0.2, 0.0]},
        "steps": steps(T, T, F),
    },
    "adjustment_conv": {
        "kwargs": {"center": False},
        "shape": [3, 2, 2, 2],
        "adjustment": {"scale": [0.8, 1.2], "bias": [0.3, -0.3]},
        "steps": steps(T, F),
    },
    # mask (weighted moments, channels last)
    "mask_seq": {"shape": [2, 4, 3], "steps": steps(T, T, F, mask=True)},
    "mask_4d_unfused": {
        "kwargs": {"fused": False, "momentum": 0.8},
        "shape": [2, 3, 2, 2],
        "steps": steps(T, T, mask=True),
    },
    "mask_renorm": {"kwargs": {"renorm": True, "momentum": 0.7}, "shape": [3, 4, 2], "steps": steps(T, T, mask=True)},
    # dtypes
    "float16_dense": {"kwargs": {"dtype": "float16"}, "shape": [6, 3], "steps": steps(T, T, F)},
    "float16_conv_fused": {"kwargs": {"dtype": "float16"}, "shape": [3, 2, 2, 3], "steps": steps(T, T, F)},
    "float16_large_values": {
        "kwargs": {"dtype": "float16", "momentum": 0.0},
        "shape": [8, 2],
        "data": {"loc": 200.0, "scale": 150.0},
        "steps": steps(T, F),
    },
    "bfloat16_dense": {"kwargs": {"dtype": "bfloat16"}, "shape": [6, 3], "steps": steps(T, F)},
    "float64_dense": {"kwargs": {"dtype": "float64"}, "shape": [6, 3], "steps": steps(T, T, F)},
    "float64_conv_unfused": {"kwargs": {"dtype": "float64"}, "shape": [3, 2, 2, 3], "steps": steps(T, F)},
    # trainable=False: inference even with training=True, frozen statistics
    "trainable_false": {"kwargs": {"trainable": False}, "shape": [5, 3], "steps": steps(T, F)},
    "trainable_set_later": {
        "shape": [3, 2, 2, 3],
        "steps": [
            {"training": True},
            {"training": True, "set_trainable": False},
            {"training": True, "set_trainable": True},
        ],
    },
    "named": {"kwargs": {"name": "bn_custom", "momentum": 0.95}, "shape": [4, 2], "steps": steps(T)},
}

OPTIMIZER_CASES: dict[str, dict[str, Any]] = {
    "opt_sgd_default": {
        "optimizer": {"class": "SGD"},
        "kwargs": {"gamma_regularizer": {"class_name": "L2", "config": {"l2": 0.1}}},
    },
    "opt_sgd_momentum": {"optimizer": {"class": "SGD", "args": {"learning_rate": 0.05, "momentum": 0.5}}},
    "opt_sgd_nesterov": {
        "optimizer": {"class": "SGD", "args": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}},
        "kwargs": {"beta_constraint": "non_neg", "beta_regularizer": "l1"},
    },
    "opt_rmsprop_default": {"optimizer": {"class": "RMSprop"}},
    "opt_rmsprop_centered_momentum": {
        "optimizer": {
            "class": "RMSprop",
            "args": {"learning_rate": 0.01, "rho": 0.8, "momentum": 0.5, "centered": True},
        },
        "kwargs": {"gamma_constraint": {"class_name": "MaxNorm", "config": {"max_value": 1.5, "axis": 0}}},
    },
    "opt_rmsprop_centered": {"optimizer": {"class": "RMSprop", "args": {"learning_rate": 0.02, "centered": True}}},
    "opt_adam_default": {"optimizer": {"class": "Adam"}, "kwargs": {"gamma_regularizer": "l2"}},
    "opt_adam_amsgrad": {
        "optimizer": {"class": "Adam", "args": {"learning_rate": 0.05, "beta_1": 0.8, "beta_2": 0.9, "amsgrad": True}},
        "kwargs": {
            "beta_regularizer": "l1_l2",
            "gamma_constraint": {
                "class_name": "MinMaxNorm",
                "config": {"min_value": 0.5, "max_value": 1.2, "rate": 0.7},
            },
        },
    },
    "opt_adam_unit_norm": {
        "optimizer": {"class": "Adam", "args": {"learning_rate": 0.1, "epsilon": 1e-3}},
        "kwargs": {"gamma_constraint": "unit_norm", "center": False},
    },
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.npz"):
        old.unlink()
    for seed, (name, case) in enumerate(LAYER_CASES.items()):
        run_layer_case(name, case, 1000 + seed)
    for seed, (name, case) in enumerate(OPTIMIZER_CASES.items()):
        run_optimizer_case(name, {"shape": [6, 3], "steps": 4} | case, 2000 + seed)
    total = sum(p.stat().st_size for p in OUT.glob("*.npz"))
    print(f"wrote {len(LAYER_CASES) + len(OPTIMIZER_CASES)} files, {total / 1024:.0f} KiB, to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
