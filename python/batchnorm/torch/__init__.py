"""batchnorm's kernels inside PyTorch: CPU tensors, autograd and drop-in modules.

    import batchnorm.torch as bnt
    y = bnt.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    model = bnt.convert(model)        # every torch.nn.BatchNorm*d becomes ours, same tensors

Needs PyTorch (``pip install "batchnorm[torch]"``).
"""

try:
    import torch as _torch  # noqa: F401 - fails here, with the extra named, rather than deep inside
except ImportError as error:
    raise ImportError(
        f"batchnorm.torch needs PyTorch, which could not be imported ({error}); "
        'install it with pip install "batchnorm[torch]"'
    ) from error

from ._functional import batch_norm
from ._modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert, revert
from ._sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm", "convert", "revert"]
