"""Folding a trained batch-norm layer into the preceding Dense/Linear or convolution.

In inference a batch-norm layer is a per-channel affine map ``z -> s*z + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean*s`` (its frozen moving statistics).
After a layer ``z = W x + b`` whose output channel ``o`` feeds batch-norm channel ``o``,
the pair is one layer with ``W'[o] = s[o] * W[o]`` and ``b'[o] = (b[o] - mean[o]) * s[o]
+ beta[o]``: the batch-norm layer can be dropped at inference.

Both layer kinds are accepted: the Keras-style ``BatchNormalization`` (gamma, beta,
moving_mean, moving_variance, epsilon; ``scale=False``/``center=False`` mean gamma 1 and
beta 0) and the PyTorch-style ``BatchNorm1d/2d/3d`` (weight, bias, running_mean,
running_var, eps; ``affine=False`` means weight 1 and bias 0). The arithmetic is float64;
the results have the dtype of the weights passed in (float64 for integer weights).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["fold_conv", "fold_dense"]

_DENSE_LAYOUTS = ("io", "oi")
_CONV_LAYOUTS = ("OIHW", "HWIO")


def _array(value: Any, name: str) -> np.ndarray:
    """A NumPy array from an array-like or a (CPU) torch tensor, without importing torch."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    a = np.asarray(value)
    if a.dtype.kind not in "biuf" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a


def _out_dtype(a: np.ndarray) -> np.dtype[Any]:
    return a.dtype if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else np.dtype(np.float64)


def _vector(value: Any, channels: int, what: str) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64)
    if a.size != channels:
        raise ValueError(f"the layer's {what} has {a.size} values; expected one per channel ({channels})")
    return a.reshape(channels)


def inference_affine(layer: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale s, mean, beta) in float64 of a layer's inference pass ``y = (x - mean)*s + beta``.

    Raises TypeError for an object that is no batch-norm layer and ValueError for a layer
    that has no frozen statistics (unbuilt Keras layer, ``track_running_stats=False``).
    """
    if hasattr(layer, "moving_mean") and hasattr(layer, "epsilon"):  # Keras-style
        if layer.moving_mean is None or layer.moving_variance is None:
            raise ValueError(
                f"{layer!r} is not built: it has no moving statistics yet (call it on data, or build(input_shape))"
            )
        mean = np.asarray(layer.moving_mean, np.float64).ravel()
        var = np.asarray(layer.moving_variance, np.float64).ravel()
        gamma, beta, eps = layer.gamma, layer.beta, float(layer.epsilon)
    elif hasattr(layer, "running_mean") and hasattr(layer, "eps"):  # PyTorch-style
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError(
                f"{layer!r} has no running statistics (track_running_stats=False): in inference it normalizes "
                "with the statistics of each batch, which cannot be folded into weights"
            )
        mean = _array(layer.running_mean, "running_mean").astype(np.float64).ravel()
        var = _array(layer.running_var, "running_var").astype(np.float64).ravel()
        gamma, beta, eps = layer.weight, layer.bias, float(layer.eps)
    else:
        raise TypeError(
            f"expected a batch-norm layer (bn.BatchNormalization or bn.BatchNorm1d/2d/3d), got {type(layer).__name__}"
        )
    c = mean.size
    g = np.ones(c) if gamma is None else _vector(_array(gamma, "gamma"), c, "gamma")
    b = np.zeros(c) if beta is None else _vector(_array(beta, "beta"), c, "beta")
    var = _vector(var, c, "variance")
    s = g / np.sqrt(var + eps)
    return s, mean, b


def _fold(w: np.ndarray, bias: Any, layer: Any, out_axis: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    s, mean, beta = inference_affine(layer)
    channels = w.shape[out_axis]
    if s.size != channels:
        raise ValueError(
            f"the layer normalizes {s.size} channels but the {what} has {channels} output channels "
            f"(axis {out_axis} of shape {w.shape}); check the layout"
        )
    if bias is None:
        b64 = np.zeros(channels)
        bias_dtype = _out_dtype(w)
    else:
        b = _array(bias, "bias")
        if b.shape != (channels,):
            raise ValueError(f"bias has shape {b.shape}; expected ({channels},), one per output channel")
        b64 = b.astype(np.float64)
        bias_dtype = _out_dtype(b)
    shape = [1] * w.ndim
    shape[out_axis] = channels
    new_w = (w.astype(np.float64) * s.reshape(shape)).astype(_out_dtype(w))
    new_b = ((b64 - mean) * s + beta).astype(bias_dtype)
    return new_w, new_b


def fold_dense(kernel: Any, bias: Any, layer: Any, layout: str = "io") -> tuple[np.ndarray, np.ndarray]:
    """Fold a trained batch-norm layer into the Dense/Linear layer before it.

    ``kernel`` is ``(in, out)`` with ``layout="io"`` (Keras ``Dense``) or ``(out, in)``
    with ``layout="oi"`` (PyTorch ``Linear``); ``bias`` has shape ``(out,)``, or is None
    for no bias (zero). ``layer`` is a ``bn.BatchNormalization`` or ``bn.BatchNorm1d``
    (any batch-norm layer of this package) over the ``out`` features, with the statistics
    it uses in inference. Returns ``(new_kernel, new_bias)`` in the same layout, such that
    ``x @ new_kernel + new_bias`` equals the layer's inference output on ``x @ kernel + bias``.
    """
    if layout not in _DENSE_LAYOUTS:
        raise ValueError(f"layout must be 'io' (Keras Dense kernel) or 'oi' (PyTorch Linear weight), got {layout!r}")
    w = _array(kernel, "kernel")
    if w.ndim != 2:
        raise ValueError(f"kernel must be 2-D ({'(in, out)' if layout == 'io' else '(out, in)'}), got shape {w.shape}")
    return _fold(w, bias, layer, 1 if layout == "io" else 0, "kernel")


def fold_conv(weight: Any, bias: Any, layer: Any, layout: str = "OIHW") -> tuple[np.ndarray, np.ndarray]:
    """Fold a trained batch-norm layer into the convolution before it.

    ``weight`` is ``(out, in, kh, kw)`` with ``layout="OIHW"`` (PyTorch ``Conv2d``) or
    ``(kh, kw, in, out)`` with ``layout="HWIO"`` (Keras ``Conv2D``); 1-D and 3-D kernels
    work the same (``OIW``/``OIDHW``, ``WIO``/``DHWIO``: output channels first or last),
    and so do grouped convolutions (PyTorch's ``in/groups``). ``bias`` has shape
    ``(out,)`` or is None (zero). Returns ``(new_weight, new_bias)`` in the same layout.
    Transposed convolutions and Keras depthwise kernels keep their output channels
    elsewhere: reshape them first.
    """
    if layout not in _CONV_LAYOUTS:
        raise ValueError(f"layout must be 'OIHW' (PyTorch Conv weight) or 'HWIO' (Keras Conv kernel), got {layout!r}")
    w = _array(weight, "weight")
    if w.ndim < 3:
        raise ValueError(f"a convolution weight has at least 3 dimensions ({layout}), got shape {w.shape}")
    return _fold(w, bias, layer, 0 if layout == "OIHW" else w.ndim - 1, "weight")
