"""Bindings of the compiled module that the layers call directly: normalize's inv_std output,
merge_moments (Chan's merge of per-channel partials), and the core's epsilon message."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from batchnorm import _core
from reference import BF16

EPS = 1e-3


def _stat_dtype(dtype: Any) -> Any:
    return np.float64 if dtype == np.float64 else np.float32


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64], ids=str)
@pytest.mark.parametrize(("shape", "axes"), [((6, 4, 5), [1]), ((7, 9), [1]), ((0, 4), [1])], ids=str)
def test_normalize_inv_std_is_forwards(rng: np.random.Generator, dtype: Any, shape: tuple, axes: list) -> None:
    x = (3 + 2 * rng.standard_normal(shape)).astype(dtype)
    sdt = _stat_dtype(dtype)
    c = shape[axes[0]]
    mean, var, inv = (np.empty(c, sdt) for _ in range(3))
    if x.size:
        _core.forward(x, np.empty_like(x), axes, None, None, EPS, False, mean, var, inv)
    else:  # forward refuses an empty batch; normalize takes given statistics
        mean[:], var[:] = 0.5, 2.0
        inv[:] = 1 / np.sqrt(np.float64(2.0) + EPS)
    got = np.full(c, -1, sdt)
    _core.normalize(x, np.empty_like(x), axes, mean, var, None, None, EPS, False, inv_std=got)
    # What normalize used: 1/sqrt(variance + eps) of the stored variance, rounded as forward's.
    np.testing.assert_array_equal(got, (1 / np.sqrt(var.astype(np.float64) + EPS)).astype(sdt))
    if sdt == np.float64:
        np.testing.assert_array_equal(got, inv)
    else:  # forward rounds from the unrounded variance
        np.testing.assert_allclose(got, inv, rtol=3e-7)


def test_normalize_inv_std_none_and_errors() -> None:
    x = np.ones((4, 3), np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    _core.normalize(x, np.empty_like(x), [1], mean, var, None, None, EPS, False)  # optional
    with pytest.raises(TypeError, match="inv_std must be a C-contiguous float32 array"):
        _core.normalize(x, np.empty_like(x), [1], mean, var, None, None, EPS, False, inv_std=np.empty(3))
    with pytest.raises(ValueError, match="inv_std has 2 elements; expected 3"):
        _core.normalize(x, np.empty_like(x), [1], mean, var, None, None, EPS, False, inv_std=np.empty(2, np.float32))
    read_only = np.empty(3, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="inv_std is read-only"):
        _core.normalize(x, np.empty_like(x), [1], mean, var, None, None, EPS, False, inv_std=read_only)


def _partials(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = np.full(x.shape[1], float(x.shape[0]))
    mean = x.mean(axis=0) if x.size else np.zeros(x.shape[1])
    m2 = ((x - mean) ** 2).sum(axis=0)
    return count, mean, m2


@pytest.mark.parametrize("sizes", [(5, 7), (1, 1), (0, 6), (6, 0), (1000, 3)], ids=str)
def test_merge_moments_is_chans_merge(rng: np.random.Generator, sizes: tuple[int, int]) -> None:
    c = 4
    xa = 1e3 + rng.standard_normal((sizes[0], c)) * np.arange(1, c + 1)
    xb = 1e3 + 0.5 + rng.standard_normal((sizes[1], c))
    a, b = _partials(xa), _partials(xb)
    b_before = [v.copy() for v in b]
    _core.merge_moments(*a, *b)
    whole = np.concatenate([xa, xb])
    np.testing.assert_array_equal(a[0], float(len(whole)))
    np.testing.assert_allclose(a[1], whole.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(a[2], ((whole - whole.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-10, atol=1e-12)
    for before, after in zip(b_before, b, strict=True):
        np.testing.assert_array_equal(before, after)  # b is only read


def test_merge_moments_checks_its_arrays() -> None:
    a = [np.zeros(3) for _ in range(3)]
    b = [np.ones(3) for _ in range(3)]
    with pytest.raises(TypeError, match="mean_b must be a C-contiguous float64 array"):
        _core.merge_moments(*a, b[0], np.ones(3, np.float32), b[2])
    with pytest.raises(ValueError, match="m2_b has 2 elements; expected 3"):
        _core.merge_moments(*a, b[0], b[1], np.ones(2))
    with pytest.raises(ValueError, match="count_a must be 1-D"):
        _core.merge_moments(np.zeros((3, 1)), *a[1:], *b)
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="m2_a is read-only"):
        _core.merge_moments(a[0], a[1], read_only, *b)


@pytest.mark.parametrize("epsilon", [-1e-9, -0.1, -1 / 3, -5e-324, float("nan"), float("inf"), -1e300], ids=repr)
def test_epsilon_error_prints_the_value_as_python_does(epsilon: float) -> None:
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=re.escape(f"epsilon must be a finite number >= 0, got {epsilon!r}") + "$"):
        _core.normalize(
            x, np.empty_like(x), [1], np.zeros(3, np.float32), np.ones(3, np.float32), None, None, epsilon, False
        )


@pytest.mark.parametrize("sdt", [np.float32, np.float64], ids=str)
def test_parameter_gradients_are_backwards(rng: np.random.Generator, sdt: Any) -> None:
    """The synchronized layers' own dgamma and dbeta: backward's, from backward_sums' sums."""
    x = (3 + 2 * rng.standard_normal((6, 4, 5))).astype(sdt)
    dy = rng.standard_normal(x.shape).astype(sdt)
    mean, _, inv, _ = _core.forward(x, np.empty_like(x), [1], None, None, EPS, False)
    want = np.empty(4, sdt), np.empty(4, sdt)
    _core.backward(dy, x, np.empty_like(x), [1], mean, inv, None, None, False, *want)
    sums = np.empty(4), np.empty(4)
    _core.backward_sums(dy, x, [1], mean, inv, None, None, False, *sums)
    got = np.empty(4, sdt), np.empty(4, sdt)
    _core.parameter_gradients(inv, *sums, *got)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # inv_std 0 (a variance beyond the range): dgamma 0, whatever the sum of products holds
    dgamma, dbeta = np.empty(2, sdt), np.empty(2, sdt)
    _core.parameter_gradients(np.zeros(2, sdt), np.array([2.0, -3.0]), np.array([np.inf, np.nan]), dgamma, dbeta)
    np.testing.assert_array_equal(dgamma, [0, 0])
    np.testing.assert_array_equal(dbeta, [2, -3])
