"""A first look at batchnorm: one training step and one inference step of a batch-norm
layer on NCHW data, checked against a plain float64 NumPy computation."""

import numpy as np

import batchnorm as bn

rng = np.random.default_rng(0)
x = rng.normal(5.0, 3.0, size=(32, 64, 28, 28)).astype(np.float32)  # N, C, H, W
gamma = rng.uniform(0.5, 1.5, 64).astype(np.float32)
beta = rng.normal(0.0, 0.1, 64).astype(np.float32)

# Training: normalize with the batch's own statistics (channel axis 1), ReLU fused.
y, stats = bn.forward(x, gamma, beta, axis=1, epsilon=1e-5, activation="relu")
dy = rng.normal(size=x.shape).astype(np.float32)
dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, beta, axis=1, activation="relu")

# Inference: normalize with fixed statistics (here: the batch's).
y_inf = bn.normalize(x, stats.mean, stats.variance, gamma, beta, axis=1, epsilon=1e-5)

# The same in float64 NumPy.
x64 = x.astype(np.float64)
mean = x64.mean(axis=(0, 2, 3), keepdims=True)
var = x64.var(axis=(0, 2, 3), keepdims=True)
ref = (x64 - mean) / np.sqrt(var + 1e-5) * gamma[:, None, None] + beta[:, None, None]

print("batchnorm", bn.__version__, "| SIMD:", bn.info()["simd"], "| threads:", bn.get_num_threads())
print(f"x: {x.shape} {x.dtype}; {stats.count} values per channel")
print(f"max |y_inference - float64 reference|      = {np.abs(y_inf - ref).max():.2e}")
print(f"max |y_train - relu(float64 reference)|    = {np.abs(y - np.maximum(ref, 0)).max():.2e}")
print(f"batch mean, channel 0: {stats.mean[0]:.6f} (float64: {mean.ravel()[0]:.6f})")
print(f"dgamma[:3] = {dgamma[:3]}, dbeta[:3] = {dbeta[:3]}")
