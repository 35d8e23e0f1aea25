"""bn.fold_dense / bn.fold_conv: the folded layer equals dense/conv followed by the
batch-norm layer in inference, for both layer kinds and all layouts; and equals torch's
fuse_linear_bn_eval / fuse_conv_bn_eval where torch is installed."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import batchnorm as bn


# ----------------------------------------------------------------------------- helpers
def trained_keras(c: int, rng: np.random.Generator, shape: tuple[int, ...], **kw) -> bn.BatchNormalization:
    """A built Keras-style layer with non-trivial gamma, beta and moving statistics."""
    layer = bn.BatchNormalization(**kw)
    layer.build(shape)
    values = {
        "gamma": rng.normal(1.0, 0.5, c),
        "beta": rng.normal(0.0, 0.5, c),
        "moving_mean": rng.normal(0.0, 2.0, c),
        "moving_variance": rng.uniform(0.2, 3.0, c),
        "moving_stddev": rng.uniform(0.5, 2.0, c),
        "renorm_mean": rng.normal(0.0, 1.0, c),
        "renorm_stddev": rng.uniform(0.5, 2.0, c),
    }
    keys = [n.split("/")[-1].removesuffix(":0") for n in layer.weight_names]
    layer.set_weights([values[k].reshape(w.shape) for k, w in zip(keys, layer.weights, strict=True)])
    return layer


def trained_torch(cls, c: int, rng: np.random.Generator, **kw):
    layer = cls(c, **kw)
    if layer.affine:
        layer.weight = rng.normal(1.0, 0.5, c)
        layer.bias = rng.normal(0.0, 0.5, c)
    layer.running_mean = rng.normal(0.0, 2.0, c)
    layer.running_var = rng.uniform(0.2, 3.0, c)
    return layer.eval()


def apply(layer, z: np.ndarray) -> np.ndarray:
    """The layer's inference pass."""
    return layer(z, training=False) if isinstance(layer, bn.BatchNormalization) else layer(z)


def conv_nchw(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Valid cross-correlation, stride 1: x (N, C, *S), w (O, C, *K) -> (N, O, *S')."""
    k = w.shape[2:]
    spatial = tuple(range(2, x.ndim))
    win = sliding_window_view(x, k, axis=spatial)  # (N, C, *S', *K)
    sub = "".join("hwd"[: len(k)])
    ker = "".join("ijk"[: len(k)])
    y = np.einsum(f"nc{sub}{ker},oc{ker}->no{sub}", win, w)
    return y if b is None else y + b.reshape((1, -1) + (1,) * len(k))


def conv_nhwc(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Valid cross-correlation, stride 1: x (N, *S, C), w (*K, C, O) -> (N, *S', O)."""
    k = w.shape[:-2]
    spatial = tuple(range(1, x.ndim - 1))
    win = sliding_window_view(x, k, axis=spatial)  # (N, *S', C, *K)
    sub = "".join("hwd"[: len(k)])
    ker = "".join("ijk"[: len(k)])
    y = np.einsum(f"n{sub}c{ker},{ker}co->n{sub}o", win, w)
    return y if b is None else y + b


# ----------------------------------------------------------------------------- dense
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_keras_io(rng, scale, center, with_bias):
    n_in, n_out = 7, 5
    layer = trained_keras(n_out, rng, (None, n_out), scale=scale, center=center, dtype="float64")
    kernel = rng.normal(size=(n_in, n_out))
    bias = rng.normal(size=n_out) if with_bias else None
    x = rng.normal(size=(11, n_in))
    k2, b2 = bn.fold_dense(kernel, bias, layer)  # layout "io" is the default
    z = x @ kernel + (0 if bias is None else bias)
    np.testing.assert_allclose(x @ k2 + b2, apply(layer, z), rtol=1e-12, atol=1e-12)
    assert k2.shape == kernel.shape
    assert b2.shape == (n_out,)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_torch_oi(rng, affine, with_bias):
    n_in, n_out = 6, 4
    layer = trained_torch(bn.BatchNorm1d, n_out, rng, affine=affine, dtype="float64")
    weight = rng.normal(size=(n_out, n_in))
    bias = rng.normal(size=n_out) if with_bias else None
    x = rng.normal(size=(9, n_in))
    w2, b2 = bn.fold_dense(weight, bias, layer, layout="oi")
    z = x @ weight.T + (0 if bias is None else bias)
    np.testing.assert_allclose(x @ w2.T + b2, apply(layer, z), rtol=1e-12, atol=1e-12)


def test_dense_either_layer_kind_either_layout(rng):
    """A torch-style layer after a Keras kernel, and the other way round."""
    kernel = rng.normal(size=(6, 4))
    x = rng.normal(size=(5, 6))
    for layer in (
        trained_torch(bn.BatchNorm1d, 4, rng, dtype="float64"),
        trained_keras(4, rng, (None, 4), dtype="float64"),
    ):
        k_io, b_io = bn.fold_dense(kernel, None, layer, layout="io")
        k_oi, b_oi = bn.fold_dense(kernel.T, None, layer, layout="oi")
        np.testing.assert_allclose(k_oi, k_io.T, rtol=1e-15)
        np.testing.assert_array_equal(b_oi, b_io)
        np.testing.assert_allclose(x @ k_io + b_io, apply(layer, x @ kernel), rtol=1e-12, atol=1e-12)


def test_dense_float32_keeps_dtype(rng):
    layer = trained_keras(8, rng, (None, 8))
    kernel = rng.normal(size=(3, 8)).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    k2, b2 = bn.fold_dense(kernel, bias, layer)
    assert k2.dtype == np.float32
    assert b2.dtype == np.float32
    np.testing.assert_allclose(x @ k2 + b2, apply(layer, x @ kernel + bias), rtol=1e-5, atol=1e-5)
    k3, b3 = bn.fold_dense(kernel, None, layer)
    assert b3.dtype == np.float32  # bias=None: the kernel's dtype
    np.testing.assert_allclose(k3, k2)


def test_dense_keras_renorm_layer_folds_its_moving_statistics(rng):
    """A renorm layer's inference pass uses moving_mean/moving_variance, like any other."""
    layer = trained_keras(4, rng, (None, 4), renorm=True, dtype="float64")
    kernel = rng.normal(size=(3, 4))
    x = rng.normal(size=(6, 3))
    k2, b2 = bn.fold_dense(kernel, None, layer)
    np.testing.assert_allclose(x @ k2 + b2, apply(layer, x @ kernel), rtol=1e-12, atol=1e-12)


def test_dense_after_training(rng):
    """Statistics that came from training calls (not set by hand)."""
    layer = bn.BatchNormalization(momentum=0.5)
    kernel = rng.normal(size=(10, 6)).astype(np.float32)
    for _ in range(5):
        layer(rng.normal(2.0, 3.0, size=(32, 10)).astype(np.float32) @ kernel, training=True)
    x = rng.normal(size=(8, 10)).astype(np.float32)
    k2, b2 = bn.fold_dense(kernel, None, layer)
    np.testing.assert_allclose(x @ k2 + b2, layer(x @ kernel), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- conv
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_oihw_torch(rng, affine, with_bias):
    c_in, c_out = 3, 5
    layer = trained_torch(bn.BatchNorm2d, c_out, rng, affine=affine, dtype="float64")
    weight = rng.normal(size=(c_out, c_in, 3, 2))
    bias = rng.normal(size=c_out) if with_bias else None
    x = rng.normal(size=(2, c_in, 6, 5))
    w2, b2 = bn.fold_conv(weight, bias, layer)  # layout "OIHW" is the default
    assert w2.shape == weight.shape
    np.testing.assert_allclose(conv_nchw(x, w2, b2), apply(layer, conv_nchw(x, weight, bias)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_hwio_keras(rng, scale, center, with_bias):
    c_in, c_out = 4, 3
    layer = trained_keras(c_out, rng, (None, 5, 5, c_out), scale=scale, center=center, dtype="float64")
    weight = rng.normal(size=(2, 3, c_in, c_out))
    bias = rng.normal(size=c_out) if with_bias else None
    x = rng.normal(size=(2, 6, 7, c_in))
    w2, b2 = bn.fold_conv(weight, bias, layer, layout="HWIO")
    np.testing.assert_allclose(conv_nhwc(x, w2, b2), apply(layer, conv_nhwc(x, weight, bias)), rtol=1e-12, atol=1e-12)


def test_conv_keras_channels_first_layer_after_oihw(rng):
    layer = trained_keras(4, rng, (None, 4, 5, 5), axis=1, dtype="float64")
    weight = rng.normal(size=(4, 2, 3, 3))
    x = rng.normal(size=(3, 2, 7, 7))
    w2, b2 = bn.fold_conv(weight, None, layer, layout="OIHW")
    np.testing.assert_allclose(conv_nchw(x, w2, b2), apply(layer, conv_nchw(x, weight, None)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("cls", "k"), [(bn.BatchNorm1d, (3,)), (bn.BatchNorm3d, (2, 2, 3))])
def test_conv_1d_and_3d(rng, cls, k):
    layer = trained_torch(cls, 3, rng, dtype="float64")
    weight = rng.normal(size=(3, 2, *k))
    bias = rng.normal(size=3)
    x = rng.normal(size=(2, 2, *(s + 3 for s in k)))
    w2, b2 = bn.fold_conv(weight, bias, layer)
    np.testing.assert_allclose(conv_nchw(x, w2, b2), apply(layer, conv_nchw(x, weight, bias)), rtol=1e-12, atol=1e-12)
    keras = trained_keras(3, rng, (None, *(s + 1 for s in k), 3), dtype="float64")
    w_hwio = np.moveaxis(weight, (0, 1), (-1, -2))
    xh = np.moveaxis(x, 1, -1)
    w3, b3 = bn.fold_conv(w_hwio, bias, keras, layout="HWIO")
    np.testing.assert_allclose(conv_nhwc(xh, w3, b3), apply(keras, conv_nhwc(xh, w_hwio, bias)), rtol=1e-12, atol=1e-12)


def test_conv_float32_layer_after_training(rng):
    layer = bn.BatchNorm2d(4)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    for _ in range(4):
        layer(conv_nchw(rng.normal(1.0, 2.0, size=(4, 3, 8, 8)).astype(np.float32), weight, None))
    layer.eval()
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    w2, b2 = bn.fold_conv(weight, None, layer)
    assert w2.dtype == np.float32
    np.testing.assert_allclose(conv_nchw(x, w2, b2), layer(conv_nchw(x, weight, None)), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors
def test_errors(rng):
    layer = trained_torch(bn.BatchNorm2d, 4, rng)
    with pytest.raises(ValueError, match="layout"):
        bn.fold_conv(np.ones((4, 3, 3, 3)), None, layer, layout="NCHW")
    with pytest.raises(ValueError, match="layout"):
        bn.fold_dense(np.ones((3, 4)), None, layer, layout="OI")
    with pytest.raises(ValueError, match="4 channels but the kernel has 5"):
        bn.fold_dense(np.ones((3, 5)), None, layer)
    with pytest.raises(ValueError, match="check the layout"):
        bn.fold_conv(np.ones((3, 3, 2, 4)), None, layer, layout="OIHW")
    with pytest.raises(ValueError, match="bias has shape"):
        bn.fold_dense(np.ones((3, 4)), np.ones(3), layer)
    with pytest.raises(ValueError, match="2-D"):
        bn.fold_dense(np.ones((3, 4, 1)), None, layer)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        bn.fold_conv(np.ones((4, 3)), None, layer)
    with pytest.raises(TypeError, match="batch-norm layer"):
        bn.fold_dense(np.ones((3, 4)), None, object())
    with pytest.raises(TypeError, match="real numeric"):
        bn.fold_dense(np.array([["a"] * 4]), None, layer)
    with pytest.raises(ValueError, match="not built"):
        bn.fold_dense(np.ones((3, 4)), None, bn.BatchNormalization())
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bn.fold_dense(np.ones((3, 4)), None, bn.BatchNorm1d(4, track_running_stats=False))


def test_integer_weights_become_float64(rng):
    layer = trained_torch(bn.BatchNorm1d, 2, rng)
    k2, b2 = bn.fold_dense(np.ones((3, 2), np.int32), None, layer)
    assert k2.dtype == np.float64
    assert b2.dtype == np.float64


# ----------------------------------------------------------------------------- against torch
def test_against_torch_fuse_functions(rng):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    torch.manual_seed(0)
    ours = trained_torch(bn.BatchNorm2d, 6, rng, dtype="float64")
    conv = torch.nn.Conv2d(3, 6, 3, dtype=torch.float64).eval()
    theirs = torch.nn.BatchNorm2d(6, dtype=torch.float64).eval()
    theirs.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in ours.state_dict().items()})
    fused = fuse_conv_bn_eval(conv, theirs)
    w2, b2 = bn.fold_conv(conv.weight, conv.bias, ours)  # torch tensors are accepted
    np.testing.assert_allclose(w2, fused.weight.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b2, fused.bias.detach().numpy(), rtol=1e-12, atol=1e-14)
    # Keras-style layer with the same numbers, HWIO kernel
    keras = trained_keras(6, rng, (None, 4, 4, 6), dtype="float64", epsilon=1e-5)
    keras.set_weights([ours.weight, ours.bias, ours.running_mean, ours.running_var])
    w3, b3 = bn.fold_conv(conv.weight.detach().numpy().transpose(2, 3, 1, 0), conv.bias, keras, layout="HWIO")
    np.testing.assert_allclose(w3.transpose(3, 2, 0, 1), fused.weight.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b3, fused.bias.detach().numpy(), rtol=1e-12, atol=1e-14)

    lin = torch.nn.Linear(5, 6, bias=False, dtype=torch.float64).eval()
    fused_lin = fuse_linear_bn_eval(lin, theirs)
    w4, b4 = bn.fold_dense(lin.weight, None, ours, layout="oi")
    np.testing.assert_allclose(w4, fused_lin.weight.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b4, fused_lin.bias.detach().numpy(), rtol=1e-12, atol=1e-14)
    # float32, as most models are
    conv32 = torch.nn.Conv2d(3, 6, 3).eval()
    bn32 = torch.nn.BatchNorm2d(6).eval()
    bn32.load_state_dict({k: torch.from_numpy(np.asarray(v)).to(torch.float32 if v.ndim else torch.int64)
                          for k, v in ours.state_dict().items()})  # fmt: skip
    ours32 = bn.BatchNorm2d(6)
    ours32.load_state_dict(bn32.state_dict())
    fused32 = fuse_conv_bn_eval(conv32, bn32)
    w5, b5 = bn.fold_conv(conv32.weight, conv32.bias, ours32.eval())
    assert w5.dtype == np.float32
    np.testing.assert_allclose(w5, fused32.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b5, fused32.bias.detach().numpy(), rtol=1e-6, atol=1e-6)
