# Type stubs of the compiled module batchnorm._core (private; see batchnorm/__init__.py).
from collections.abc import Sequence
from typing import Any, TypeAlias, overload

import numpy as np

__version__: str

# The data and per-channel arguments below take NumPy arrays, or CPU torch tensors once
# use_torch has been called (batchnorm.torch); outputs allocated here are NumPy arrays.
_Buffer: TypeAlias = np.ndarray | Any

def use_torch(
    tensor: type, float16: object, bfloat16: object, float32: object, float64: object, strided: object, int64: object
) -> None: ...
def count_batch(counter: Any) -> None: ...
def update_running(
    running_mean: _Buffer, running_var: _Buffer, mean: _Buffer, variance: _Buffer, factor: float, count: int
) -> None: ...
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
# A mask has x's dtype and x's shape without its feature axes.
@overload
def moments(x: _Buffer, axes: Sequence[int], mean: _Buffer, variance: _Buffer, mask: _Buffer | None = None) -> int: ...
@overload
def moments(
    x: _Buffer, axes: Sequence[int], mean: None = None, variance: None = None, mask: _Buffer | None = None
) -> tuple[np.ndarray, np.ndarray]: ...
def partial_moments(
    x: _Buffer, axes: Sequence[int], mean: _Buffer, m2: _Buffer, mask: _Buffer | None = None
) -> int: ...
def normalize(
    x: _Buffer,
    out: _Buffer,
    axes: Sequence[int],
    mean: _Buffer | None,
    variance: _Buffer | None,
    gamma: _Buffer | None,
    beta: _Buffer | None,
    epsilon: float,
    relu: bool,
    inv_std: _Buffer | None = None,
) -> None: ...
def merge_moments(
    count_a: _Buffer, mean_a: _Buffer, m2_a: _Buffer, count_b: _Buffer, mean_b: _Buffer, m2_b: _Buffer
) -> None: ...
@overload
def forward(
    x: _Buffer,
    out: _Buffer,
    axes: Sequence[int],
    gamma: _Buffer | None,
    beta: _Buffer | None,
    epsilon: float,
    relu: bool,
    mean: _Buffer,
    variance: _Buffer,
    inv_std: _Buffer,
    mask: _Buffer | None = None,
) -> int: ...
@overload
def forward(
    x: _Buffer,
    out: _Buffer,
    axes: Sequence[int],
    gamma: _Buffer | None,
    beta: _Buffer | None,
    epsilon: float,
    relu: bool,
    mean: None = None,
    variance: None = None,
    inv_std: None = None,
    mask: _Buffer | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]: ...
def train_forward(
    x: Any,
    out: Any,
    gamma: Any | None,
    beta: Any | None,
    epsilon: float,
    mask: Any | None,
    running_mean: Any | None,
    running_var: Any | None,
    factor: float,
    counter: Any | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]: ...
@overload
def backward(
    dy: _Buffer,
    x: _Buffer,
    out: _Buffer,
    axes: Sequence[int],
    mean: _Buffer | None,
    inv_std: np.ndarray,
    gamma: _Buffer | None,
    beta: _Buffer | None,
    relu: bool,
    dgamma: None,
    dbeta: None,
    fixed_statistics: bool = False,
    mask: _Buffer | None = None,
) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def backward(
    dy: _Buffer,
    x: _Buffer,
    out: _Buffer,
    axes: Sequence[int],
    mean: _Buffer | None,
    inv_std: _Buffer | None,
    gamma: _Buffer | None,
    beta: _Buffer | None,
    relu: bool,
    dgamma: _Buffer,
    dbeta: _Buffer,
    fixed_statistics: bool = False,
    mask: _Buffer | None = None,
) -> None: ...
def parameter_gradients(
    inv_std: _Buffer, sum_dy: _Buffer, sum_dy_xc: _Buffer, dgamma: _Buffer, dbeta: _Buffer
) -> None: ...
def backward_sums(
    dy: _Buffer,
    x: _Buffer,
    axes: Sequence[int],
    mean: _Buffer | None,
    inv_std: _Buffer | None,
    gamma: _Buffer | None,
    beta: _Buffer | None,
    relu: bool,
    sum_dy: _Buffer,
    sum_dy_xc: _Buffer,
) -> None: ...
def backward_apply(
    dy: _Buffer,
    x: _Buffer,
    out: _Buffer,
    axes: Sequence[int],
    mean: _Buffer | None,
    inv_std: _Buffer | None,
    gamma: _Buffer | None,
    beta: _Buffer | None,
    relu: bool,
    sum_dy: _Buffer,
    sum_dy_xc: _Buffer,
    count: float,
    fixed_statistics: bool = False,
    mask: _Buffer | None = None,
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
