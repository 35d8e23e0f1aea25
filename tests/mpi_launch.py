"""Runs a script of tests/mpi under mpiexec, for the tests of the synchronized layers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def mpiexec() -> str | None:
    """The mpiexec next to this Python (the mpich wheel's), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def run_mpi(script: str, ranks: int) -> str:
    """tests/mpi/<script> on `ranks` processes (skipped without mpi4py or an mpiexec);
    fails unless every rank exits 0. Returns the standard output."""
    pytest.importorskip("mpi4py")
    launcher = mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec (pip install mpich)")
    result = subprocess.run(
        [launcher, "-n", str(ranks), sys.executable, str(Path(__file__).parent / "mpi" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # 2 cores: one thread per process
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout
