"""A ghost-batch training step (forward + backward) of batchnorm.torch against the loop people
write today, TabNet's ``torch.cat([bn(c) for c in x.chunk(n)])`` with torch.nn.BatchNorm1d,
and against a plain step (one batch, no chunks) of each:

    python benchmarks/ghost.py                                   # batch 4096, chunks of 128, 512 features
    python benchmarks/ghost.py --threads 1 --rounds 40 --batch 1024 --virtual 64 --features 256

Interleaved rounds (each round times every step once, after a non-temporal copy of x's bytes
by the library's threads: the memory bandwidth of that moment), medians over the rounds. The
input is (batch, features) float32; every step starts with its gradients set to None.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import batchnorm as bn
import batchnorm.torch as bnt
from batchnorm import _core


def steps(batch: int, virtual: int, features: int) -> tuple[dict[str, Callable[[], None]], int]:
    """The timed training steps by name, and the bytes of x."""
    torch.manual_seed(0)
    x = torch.randn(batch, features, requires_grad=True)
    dy = torch.randn(batch, features)
    chunks = -(-batch // virtual)
    ghost = bnt.BatchNorm1d(features, virtual_batch_size=virtual)
    ours = bnt.BatchNorm1d(features)
    theirs_loop = torch.nn.BatchNorm1d(features)
    theirs = torch.nn.BatchNorm1d(features)

    def run(module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            module.zero_grad(set_to_none=True)
            forward(x).backward(dy)

        return step

    return {
        "ours, ghost batches": run(ghost, ghost),
        "torch, chunk loop": run(theirs_loop, lambda t: torch.cat([theirs_loop(c) for c in t.chunk(chunks)])),
        "ours, plain": run(ours, ours),
        "torch, plain": run(theirs, theirs),
    }, x.numel() * x.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--virtual", type=int, default=128, help="virtual batch size (chunk)")
    parser.add_argument("--features", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bn.set_num_threads(args.threads)
    fns, nbytes = steps(args.batch, args.virtual, args.features)
    src, dst = np.ones(nbytes // 4, np.float32), np.zeros(nbytes // 4, np.float32)
    times: dict[str, list[float]] = {name: [] for name in fns}
    bandwidth = []
    for fn in fns.values():  # warm up: allocations, first-call paths
        fn()
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        _core.copy_memory(src, dst, True)
        bandwidth.append(2 * nbytes / (time.perf_counter() - t0))
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"batchnorm {bn.__version__} ({bn.info()['simd']}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()} (torch) / {bn.get_num_threads()} (batchnorm)"
    )
    print(
        f"training step on ({args.batch}, {args.features}) float32, chunks of {args.virtual}; "
        f"{args.rounds} rounds, medians; copy bandwidth {statistics.median(bandwidth) / 1e9:.1f} GB/s"
    )
    for name, t in med.items():
        print(f"  {name:22s} {t * 1e3:8.3f} ms")
    ghost, loop = med["ours, ghost batches"], med["torch, chunk loop"]
    print(f"  torch's loop / ours with ghost batches: {loop / ghost:.2f}x (bar: >= 3)")
    print(f"  torch's loop / torch plain: {loop / med['torch, plain']:.2f}x")
    print(f"  ours with ghost batches / ours plain: {ghost / med['ours, plain']:.2f}x")


if __name__ == "__main__":
    main()
