"""The Keras-style layers: tf-keras 2's ``BatchNormalization`` and ``SyncBatchNormalization``,
with the initializers, regularizers and constraints their arguments name."""

from . import constraints, initializers, regularizers
from ._layer import BatchNormalization
from ._sync import SyncBatchNormalization

__all__ = ["BatchNormalization", "SyncBatchNormalization", "constraints", "initializers", "regularizers"]
