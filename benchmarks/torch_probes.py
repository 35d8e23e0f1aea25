"""Small probes behind docs/torch.md (a few seconds each; noisy on a shared machine):

    python benchmarks/torch_probes.py calls     # per-call cost: a 16x64 BatchNorm1d step and eval, ours vs torch's
                                                # (and vs an autograd node that computes nothing)
    python benchmarks/torch_probes.py threads   # a conv -> BN -> ReLU training loop at 1 and 2 threads
    python benchmarks/torch_probes.py threads batchnorm-first   # the same, batchnorm imported before torch

Interleaved rounds, medians. The bench (python -m batchnorm bench) is the measurement of record.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

if sys.argv[2:] == ["batchnorm-first"]:  # its OpenMP runtime loads before torch's (see docs/torch.md, Threads)
    import batchnorm  # noqa: F401

import torch

import batchnorm.torch as bnt


def median_us(fns: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Each fn's median time per call in µs, the fns run alternately round by round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


class _Nothing(torch.autograd.Function):
    """An autograd node that computes nothing: what any Python-level node costs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, weight = ctx.saved_tensors
        return torch.empty_like(dy), torch.empty_like(weight), torch.empty_like(weight)


class _Floor(torch.nn.BatchNorm1d):
    """torch's module with _Nothing in place of the batch norm: the floor of a Python node."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        y: torch.Tensor = _Nothing.apply(input, self.weight, self.bias)  # type: ignore[no-untyped-call]
        return y


def calls() -> None:
    x, dy = torch.randn(16, 64, requires_grad=True), torch.randn(16, 64)
    modules = {"torch": torch.nn.BatchNorm1d(64), "ours": bnt.BatchNorm1d(64), "floor": _Floor(64)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for m in modules.values():
            m.train()
        step = median_us({k: (lambda m=m: m(x).backward(dy)) for k, m in modules.items()}, 200, 15)
        for m in modules.values():
            m.eval()
        evals = median_us({k: (lambda m=m: m(x)) for k, m in modules.items()}, 200, 15)
        with torch.no_grad():
            no_grad = median_us({k: (lambda m=m: m(x)) for k, m in modules.items()}, 200, 15)
        for name, t in (("train step", step), ("eval", evals), ("eval, no_grad", no_grad)):
            print(
                f"{threads} thread(s) {name:14s} torch {t['torch']:6.1f} us  ours {t['ours']:6.1f} us"
                f"  ours/torch {t['ours'] / t['torch']:.2f}  (a node computing nothing: {t['floor']:6.1f} us)"
            )


def threads() -> None:
    def model(bn: type) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), bn(32), torch.nn.ReLU())

    x = torch.randn(16, 16, 28, 28)
    models = {"torch": model(torch.nn.BatchNorm2d), "ours": model(bnt.BatchNorm2d)}

    def step(m: torch.nn.Module) -> None:
        m.zero_grad()
        m(x).sum().backward()

    def cpu_per_wall(m: torch.nn.Module) -> float:
        """Processor time over wall time of 20 steps: beyond the thread count, threads spin or contend."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(20):
            step(m)
        return (time.process_time() - cpu) / (time.perf_counter() - wall)

    with open("/proc/self/maps") as maps:
        gomp = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in maps if "libgomp" in line})
    print(f"OpenMP runtimes mapped: {', '.join(gomp) or 'none'}")
    for n in (1, 2):
        torch.set_num_threads(n)
        t = median_us({k: (lambda m=m: step(m)) for k, m in models.items()}, 5, 15)
        tasks = len(os.listdir("/proc/self/task"))
        busy = {k: cpu_per_wall(m) for k, m in models.items()}
        print(
            f"{n} thread(s): step torch {t['torch'] / 1e3:.2f} ms  ours {t['ours'] / 1e3:.2f} ms"
            f"  ours/torch {t['ours'] / t['torch']:.2f}  (OS threads in the process: {tasks};"
            f" busy processors: torch {busy['torch']:.2f}, ours {busy['ours']:.2f})"
        )


if __name__ == "__main__":
    {"calls": calls, "threads": threads}[sys.argv[1]]()
