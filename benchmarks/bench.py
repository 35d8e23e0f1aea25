"""The benchmark from a source checkout: ``python benchmarks/bench.py [options]``.

The same code as ``python -m batchnorm bench`` (batchnorm/_bench.py, in the installed
package), reading the shapes from shapes.txt beside this script unless ``--quick``, ``--torch``,
``--resnet`` or ``--shapes-file`` says otherwise. ``--help`` lists the options; docs/performance.md
explains the measurements.
"""

from __future__ import annotations

import sys
from pathlib import Path

from batchnorm.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    own_table = {"--quick", "--torch", "--resnet"} & set(args)  # --torch has its own shapes
    if not own_table and not any(a.startswith("--shapes-file") for a in args):
        args = ["--shapes-file", str(Path(__file__).with_name("shapes.txt")), *args]
    sys.exit(main(["bench", *args]))
