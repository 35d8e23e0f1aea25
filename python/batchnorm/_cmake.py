"""Where the wheel keeps batchnorm's C++ CMake package (``python -m batchnorm --cmakedir``)."""

from __future__ import annotations

import argparse
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def cmake_dir() -> Path:
    """The directory of ``batchnormConfig.cmake`` inside the installed package.

    A C++ project builds against the pip-installed library with
    ``cmake -Dbatchnorm_DIR="$(python -m batchnorm --cmakedir)"`` and
    ``find_package(batchnorm CONFIG REQUIRED)``. Raises FileNotFoundError when this
    installation has no CMake package (e.g. an import from the source tree).
    """
    here = Path(__file__).resolve().parent
    # Beside this file in a wheel install; in site-packages when an editable install runs
    # the Python files from the source tree.
    roots = [here, *(Path(sysconfig.get_path(k)) / "batchnorm" for k in ("platlib", "purelib"))]
    candidates = [root / "lib" / "cmake" / "batchnorm" for root in roots]
    for path in candidates:
        if (path / "batchnormConfig.cmake").is_file():
            return path
    raise FileNotFoundError(f"no CMake package in this installation of batchnorm (looked in {candidates[0]})")


class PrintCMakeDir(argparse.Action):
    """``--cmakedir``: prints cmake_dir() and exits, like ``--version`` (no subcommand needed)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the directory of the C++ CMake package and exit")

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        try:
            print(cmake_dir())
        except FileNotFoundError as e:
            parser.exit(1, f"{parser.prog}: {e}\n")
        parser.exit(0)
