"""Shared fixtures. The tests import the installed package (`import batchnorm as bn`)
and the float64 reference in tests/reference.py."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import batchnorm as bn

# Property tests: modest by default (the whole suite runs in about a minute); run
# `pytest --hypothesis-profile=thorough tests/test_properties.py` for a deeper search.
settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=2000, derandomize=False)
settings.load_profile("default")


@pytest.fixture
def restore_threads():
    """Puts the library's thread count back as it was after the test."""
    before = bn.get_num_threads()
    yield before
    bn.set_num_threads(before)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id, so every test case has its own fixed data."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def pytest_configure(config):
    # hypothesis imports mypy_extensions while it reports a failing example; its
    # DeprecationWarning must not turn a test failure into an INTERNALERROR under
    # filterwarnings=error.
    config.addinivalue_line("filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
