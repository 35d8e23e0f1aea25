"""One OpenMP runtime with PyTorch, in either import order.

PyTorch's wheel ships its own libgomp and loads it globally. Ours (the system's for a source
build, a renamed copy in the manylinux wheel) is loaded with the core. If the core loads
first, the process runs two OpenMP runtimes, each with its own idle workers; those spin after
every parallel region, on the cores the other runtime's region needs, and a conv -> batch
norm training step at 2 threads then stalls (docs/packaging.md has the measurement). Loading
torch's runtime globally before the core, as importing torch first would, binds the core's
OpenMP calls to it: one pool of threads for both. torch itself is not imported.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path


def share_torch_runtime() -> None:
    """Load an installed PyTorch's libgomp globally, unless torch is imported already (its
    runtime is then global) or not installed; nothing if it cannot be loaded."""
    if "torch" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("torch")  # finds the package, runs none of it
    except (ImportError, ValueError):
        return
    for location in (spec.submodule_search_locations or []) if spec else []:
        for lib in sorted(Path(location, "lib").glob("libgomp*.so*")):
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return
