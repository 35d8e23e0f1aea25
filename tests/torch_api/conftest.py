"""Fixtures of the batchnorm.torch tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after: compiles of the same code objects count
    toward its recompile limit across the whole pytest run."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
