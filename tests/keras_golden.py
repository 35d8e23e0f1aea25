"""Reading tests/golden/keras/*.npz, the numbers tf-keras 2.21 computed (tools/make_keras_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

import batchnorm as bn

GOLDEN = Path(__file__).resolve().parent / "golden" / "keras"


def case_names(kind: str) -> list[str]:
    names = []
    for p in sorted(GOLDEN.glob("*.npz")):
        with np.load(p, allow_pickle=False) as f:
            if json.loads(str(f["meta"][()]))["kind"] == kind:
                names.append(p.stem)
    return names


def load(name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as f:
        meta = json.loads(str(f["meta"][()]))
        arrays = {k: np.array(f[k]) for k in f.files if k != "meta"}
    return meta, arrays


def weight_list(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    out = []
    j = 0
    while f"{prefix}{j}" in arrays:
        out.append(arrays[f"{prefix}{j}"])
        j += 1
    return out


def adjustment(spec: dict[str, Any] | None, seen: list[list[int]] | None = None) -> Any:
    if spec is None:
        return None
    scale = np.array(spec["scale"], np.float32)
    bias = np.array(spec["bias"], np.float32)

    def fn(shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if seen is not None:
            seen.append([int(s) for s in shape])
        return scale, bias

    return fn


def make_layer(meta: dict[str, Any], seen: list[list[int]] | None = None) -> bn.BatchNormalization:
    return bn.BatchNormalization(**meta["kwargs"], adjustment=adjustment(meta.get("adjustment"), seen))


def tolerance(dtype: str) -> float:
    return {"float16": 2e-3, "bfloat16": 1.6e-2}.get(dtype, 1e-5)


def assert_close(actual: Any, expected: np.ndarray, rtol: float, what: str, scale: float = 0.0) -> None:
    """Equal to rtol relative, elementwise, with rtol of the array's largest value (or of
    ``scale``, the size of the terms that cancel into it) as the absolute floor."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
    scale = max(scale, float(np.max(np.abs(e))) if e.size else 0.0)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * max(scale, 1e-30), err_msg=what)
