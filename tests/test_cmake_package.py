"""The C++ CMake package that the wheel carries, and ``python -m batchnorm --cmakedir``.

CI also builds examples/cpp against it (``.ci/run``); here: the command, and that the
package is complete (config, version and targets files, the library, the headers).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from batchnorm._cmake import cmake_dir


def test_cmakedir_prints_the_package_directory():
    out = subprocess.run(
        [sys.executable, "-m", "batchnorm", "--cmakedir"], check=True, capture_output=True, text=True
    ).stdout
    assert Path(out.strip()) == cmake_dir()


def test_the_package_is_complete():
    d = cmake_dir()
    for name in ("batchnormConfig.cmake", "batchnormConfigVersion.cmake", "batchnormTargets.cmake"):
        assert (d / name).is_file(), name
    lib = d.parent.parent  # <prefix>/lib/cmake/batchnorm -> <prefix>/lib
    assert (lib / "libbatchnorm.a").is_file()
    include = lib.parent / "include" / "batchnorm"
    for header in ("batchnorm.hpp", "functional.hpp", "layer.hpp", "runtime.hpp", "types.hpp", "export.hpp"):
        assert (include / header).is_file(), header
    assert "find_dependency(OpenMP" in (d / "batchnormConfig.cmake").read_text()
