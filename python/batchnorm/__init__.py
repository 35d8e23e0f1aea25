"""batchnorm: batch normalization for the CPU.

A C++ core (SIMD chosen at run time, OpenMP threads) under a small NumPy API::

    import batchnorm as bn
    y, stats = bn.forward(x, gamma, beta, axis=1, epsilon=1e-5)      # training pass
    dx, dgamma, dbeta = bn.backward(dy, x, stats, gamma, axis=1)      # its gradient
    y = bn.normalize(x, mean, variance, gamma, beta, axis=1)          # inference pass
    mean, variance = bn.moments(x, axis=1)                            # statistics only

See ``bn.info()`` for the instruction set and threads in use.
"""

import sys

try:  # the compiled core, first: everything else needs it
    from ._openmp import share_torch_runtime

    share_torch_runtime()  # before the core loads: its OpenMP calls then bind to torch's runtime
    from ._core import __version__
except ImportError as error:
    raise ImportError(
        f"batchnorm could not load its compiled core, batchnorm._core ({error}). The core is built "
        "when the package is installed: install batchnorm for this Python "
        f"({sys.executable}, {sys.version.split()[0]}) with pip ('pip install batchnorm', or "
        "'pip install .' in a source checkout), and import it from there, not from a source "
        "tree without a build."
    ) from error

from . import optimizers
from ._fold import fold_conv, fold_dense
from ._functional import BatchStats, backward, forward, moments, normalize
from ._precise import precise_statistics
from ._runtime import get_num_threads, info, set_num_threads
from .distributed import PeerError
from .keras import BatchNormalization, SyncBatchNormalization, constraints, initializers, regularizers
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm

# `import batchnorm.initializers` (and the other two) as before they moved into batchnorm.keras
sys.modules[__name__ + ".constraints"] = constraints
sys.modules[__name__ + ".initializers"] = initializers
sys.modules[__name__ + ".regularizers"] = regularizers

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormalization",
    "BatchStats",
    "PeerError",
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
