# Type stubs of the compiled module batchnorm._core (private; see batchnorm/__init__.py).
from collections.abc import Sequence
from typing import overload

import numpy as np

__version__: str

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def compiled_isas() -> list[str]: ...
def supported_isas() -> list[str]: ...
def active_isa() -> str: ...
def max_isa() -> str: ...
def compiler() -> str: ...
def has_openmp() -> bool: ...
def copy_memory(src: np.ndarray, dst: np.ndarray, nontemporal: bool) -> None: ...
def feature_axes(axis: object, ndim: int) -> tuple[int, ...]: ...

# moments and forward allocate the statistics outputs left None and then return them.
@overload
def moments(x: np.ndarray, axes: Sequence[int], mean: np.ndarray, variance: np.ndarray) -> int: ...
@overload
def moments(
    x: np.ndarray, axes: Sequence[int], mean: None = None, variance: None = None
) -> tuple[np.ndarray, np.ndarray]: ...
def partial_moments(x: np.ndarray, axes: Sequence[int], mean: np.ndarray, m2: np.ndarray) -> int: ...
def normalize(
    x: np.ndarray,
    out: np.ndarray,
    axes: Sequence[int],
    mean: np.ndarray | None,
    variance: np.ndarray | None,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    epsilon: float,
    relu: bool,
    inv_std: np.ndarray | None = None,
) -> None: ...
def merge_moments(
    count_a: np.ndarray, mean_a: np.ndarray, m2_a: np.ndarray, count_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray
) -> None: ...
@overload
def forward(
    x: np.ndarray,
    out: np.ndarray,
    axes: Sequence[int],
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    epsilon: float,
    relu: bool,
    mean: np.ndarray,
    variance: np.ndarray,
    inv_std: np.ndarray,
) -> int: ...
@overload
def forward(
    x: np.ndarray,
    out: np.ndarray,
    axes: Sequence[int],
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    epsilon: float,
    relu: bool,
    mean: None = None,
    variance: None = None,
    inv_std: None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]: ...
def backward(
    dy: np.ndarray,
    x: np.ndarray,
    out: np.ndarray,
    axes: Sequence[int],
    mean: np.ndarray | None,
    inv_std: np.ndarray | None,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    relu: bool,
    dgamma: np.ndarray,
    dbeta: np.ndarray,
    fixed_statistics: bool = False,
) -> None: ...
def backward_sums(
    dy: np.ndarray,
    x: np.ndarray,
    axes: Sequence[int],
    mean: np.ndarray | None,
    inv_std: np.ndarray | None,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    relu: bool,
    sum_dy: np.ndarray,
    sum_dy_xc: np.ndarray,
) -> None: ...
def backward_apply(
    dy: np.ndarray,
    x: np.ndarray,
    out: np.ndarray,
    axes: Sequence[int],
    mean: np.ndarray | None,
    inv_std: np.ndarray | None,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    relu: bool,
    sum_dy: np.ndarray,
    sum_dy_xc: np.ndarray,
    count: int,
    fixed_statistics: bool = False,
) -> None: ...

# The functional API's fast path (python/src/register_fast_path.cpp): the public function's
# arguments as given; None unless they are in the form the general path hands to the core.
def fast_moments(x: object, axis: object) -> tuple[np.ndarray, np.ndarray] | None: ...
def fast_normalize(
    x: object,
    mean: object,
    variance: object,
    gamma: object,
    beta: object,
    axis: object,
    epsilon: object,
    activation: object,
    out: object,
) -> np.ndarray | None: ...
def fast_forward(
    x: object, gamma: object, beta: object, axis: object, epsilon: object, activation: object, out: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None: ...
def fast_backward(
    dy: object,
    x: object,
    mean: object,
    inv_std: object,
    gamma: object,
    beta: object,
    axis: object,
    activation: object,
    out: object,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None: ...
