"""The PyTorch-style layers on NumPy arrays: ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``."""

from ._layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]
