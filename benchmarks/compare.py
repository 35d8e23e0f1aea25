"""Two benchmark reports side by side: how fast each row of the second is against the first.

    python -m batchnorm bench --rounds 3 --json before.json     # on the old build
    python -m batchnorm bench --rounds 3 --json after.json      # on the new one, right after
    python benchmarks/compare.py before.json after.json [--below 0.97]

For each row both reports hold (shape, dtype, mode, threads), it prints batchnorm's fraction
of the copy limit in each report's median round, their ratio (after/before; below 1 is
slower), and the ratio of the median over the rounds. Tiny shapes, which have no limit,
compare calls per second. Rows whose median-round ratio is under --below are marked.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any


def _speed(entry: dict[str, Any]) -> float:
    ours = entry["subjects"]["batchnorm"]
    return float(ours["fraction"]) if "fraction" in ours else 1.0 / float(ours["median_ms"])


def _rows(path: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    return {(e["shape"]["name"], e["dtype"], e["mode"], e["threads"]): e for e in report["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--below", type=float, default=0.97, help="mark rows slower than this ratio (default 0.97)")
    args = parser.parse_args()
    before, after = _rows(args.before), _rows(args.after)
    print(f"{'shape':<17}{'dtype':<10}{'mode':<11}{'thr':>3} {'before':>8} {'after':>8} {'ratio':>7} {'rounds':>7}")
    marked = 0
    for key in (k for k in before if k in after):
        b, a = before[key], after[key]
        ratio = _speed(a) / _speed(b)
        med = [statistics.median(_speed(r) for r in e.get("rounds", [e])) for e in (b, a)]
        flag = "  <" if ratio < args.below else ""
        marked += bool(flag)
        name, dtype, mode, threads = key
        print(
            f"{name:<17}{dtype:<10}{mode:<11}{threads:>3} {_speed(b):>8.3g} {_speed(a):>8.3g} {ratio:>7.3f}"
            f" {med[1] / med[0]:>7.3f}{flag}"
        )
    print(f"{marked} rows below {args.below}")


if __name__ == "__main__":
    main()
