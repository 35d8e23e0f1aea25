"""Argument types of the command line: each refuses a bad value with argparse's one-line
error, before any work starts."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Callable


def number(low: float, high: float = math.inf, *, open_low: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] ((low, high] with open_low): nan and inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if open_low else value >= low
        if not (math.isfinite(value) and above and value <= high):
            bound = f"> {low:g}" if open_low else f">= {low:g}"
            bound += "" if high == math.inf else f" and <= {high:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    return parse


def integer(name: str, low: int, high: int) -> Callable[[str], int]:
    """An int in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{name} must be <= {high}, got {value}")
        return value

    return parse


def writable(path: str) -> str:
    """A file path that can be written now, so that a run does not fail only at its end: opened
    for appending (which changes nothing) and removed again if it did not exist."""
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory")
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: {e.strerror or e}") from None
    if not existed:
        with contextlib.suppress(OSError):
            os.remove(path)
    return path
