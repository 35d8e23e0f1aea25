"""Command line: ``python -m batchnorm demo``, ``python -m batchnorm info`` and ``python -m batchnorm bench``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from ._cmake import PrintCMakeDir
from ._runtime import info
from .tools import bench, demo


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's usage and one-line error, returned by main() as exit status 2 (not raised)."""
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    parser = _Parser(prog="python -m batchnorm", description="Batch normalization for the CPU.")
    parser.add_argument("--cmakedir", action=PrintCMakeDir)  # C++ builds: cmake -Dbatchnorm_DIR=...
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser(
        "demo", help="train a small sigmoid network on digits with and without batch norm (the paper's Figure 1)"
    )
    demo.add_arguments(p_demo)
    p_info = sub.add_parser("info", help="version, SIMD level in use, OpenMP threads, compiler")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_bench = sub.add_parser(
        "bench",
        help="time inference, training forward and backward against a memory copy, PyTorch and NumPy; "
        "--torch: batchnorm.torch's modules against torch's; --resnet: a ResNet-50 end to end",
    )
    bench.add_arguments(p_bench)
    args = parser.parse_args(argv)

    if args.command == "demo":
        return demo.main(args)

    if args.command == "bench":
        try:  # every check before any work: a bad argument gets argparse's error
            options = None if args.resnet else bench.options_from_args(args)
        except bench.BenchError as e:
            p_bench.error(str(e))
        return bench.main(args, options=options)

    if args.command == "info":
        details = info()
        if args.json:
            print(json.dumps(details, indent=2))
        else:
            width = max(len(k) for k in details)
            for key, value in details.items():
                shown = ", ".join(value) if isinstance(value, list) else value
                print(f"{key:<{width}}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
