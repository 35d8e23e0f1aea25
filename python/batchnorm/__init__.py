"""batchnorm: batch normalization for the CPU.

A C++ core (SIMD chosen at run time, OpenMP threads) under a small NumPy API::

    import batchnorm as bn
    y, stats = bn.forward(x, gamma, beta, axis=1, epsilon=1e-5)      # training pass
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, axis=1)      # its gradient
    y = bn.normalize(x, mean, variance, gamma, beta, axis=1)          # inference pass
    mean, variance = bn.moments(x, axis=1)                            # statistics only

See ``bn.info()`` for the instruction set and threads in use.
"""

try:  # the compiled core, first: everything else needs it
    from ._core import __version__
except ImportError as error:
    import sys

    raise ImportError(
        f"batchnorm could not load its compiled core, batchnorm._core ({error}). The core is built "
        "when the package is installed: install batchnorm for this Python "
        f"({sys.executable}, {sys.version.split()[0]}) with pip ('pip install batchnorm', or "
        "'pip install .' in a source checkout), and import it from there, not from a source "
        "tree without a build."
    ) from error

from . import constraints, initializers, optimizers, regularizers
from ._fold import fold_conv, fold_dense
from ._functional import BatchStats, backward, forward, moments, normalize
from ._keras import BatchNormalization
from ._precise import precise_statistics
from ._runtime import get_num_threads, info, set_num_threads
from ._sync import SyncBatchNorm
from ._sync_keras import SyncBatchNormalization
from ._torch import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormalization",
    "BatchStats",
    "SyncBatchNorm",
    "SyncBatchNormalization",
    "__version__",
    "backward",
    "constraints",
    "fold_conv",
    "fold_dense",
    "forward",
    "get_num_threads",
    "info",
    "initializers",
    "moments",
    "normalize",
    "optimizers",
    "precise_statistics",
    "regularizers",
    "set_num_threads",
]
