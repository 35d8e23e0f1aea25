"""Time a batchnorm.torch.SyncBatchNorm training step (forward + backward) over gloo beside
the plain module on the same per-rank batch.

    python benchmarks/torch_sync_step.py                        # 2 ranks, 8x64x56x56 per rank
    python benchmarks/torch_sync_step.py --ranks 3 --shape 16 256 28 28 --repeats 50

It starts the ranks itself on 127.0.0.1 (one torch thread each). Each step starts after a
barrier, so the ranks contend for memory bandwidth as in training. Per step it records on
every rank: torch.nn.BatchNorm2d, batchnorm.torch.BatchNorm2d and SyncBatchNorm
(forward + backward, no barrier inside), and the two collectives of a synchronized step
alone (all_gather of a (3, C) float64 tensor, all_reduce of 2C + 1 float64) after a
barrier. It prints medians over the steps of the slowest rank, and the time inside the
collectives of the synchronized step of the rank that arrived there last.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def worker(shape: list[int], repeats: int) -> None:
    import torch
    import torch.distributed as dist

    import batchnorm.torch as bnt

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    c = shape[1]
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    modules = {"torch": torch.nn.BatchNorm2d(c), "plain": bnt.BatchNorm2d(c), "sync": bnt.SyncBatchNorm(c)}

    inside = [0.0]  # time inside the collectives of the synchronized step

    def timed(f):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                inside[0] += time.perf_counter() - t

        return wrapper

    dist.all_gather = timed(dist.all_gather)
    dist.all_reduce = timed(dist.all_reduce)

    def step(m: torch.nn.Module) -> float:
        dist.barrier()
        t = time.perf_counter()
        torch.autograd.grad(m(x), x, dy)
        return time.perf_counter() - t

    def collectives() -> float:
        stats, sums = torch.zeros(3, c, dtype=torch.float64), torch.zeros(2 * c + 1, dtype=torch.float64)
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
        dist.barrier()
        t = time.perf_counter()
        dist.all_gather(parts, stats)
        dist.all_reduce(sums)
        return time.perf_counter() - t

    for m in modules.values():  # warm up
        step(m)
        step(m)
    times: dict[str, list[float]] = {k: [] for k in [*modules, "inside", "collectives"]}
    for _ in range(repeats):
        for k, m in modules.items():
            inside[0] = 0.0
            times[k].append(step(m))
        times["inside"].append(inside[0])
        times["collectives"].append(collectives())
    every: list[dict[str, list[float]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, times)
    if dist.get_rank() == 0:
        slowest = {k: [max(r[k][i] for r in every) for i in range(repeats)] for k in times}
        # inside the collectives: the rank that arrived last (the others also wait there for it)
        slowest["inside"] = [min(r["inside"][i] for r in every) for i in range(repeats)]
        print(json.dumps({k: sorted(v)[repeats // 2] for k, v in slowest.items()}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=4, default=[8, 64, 56, 56], metavar=("N", "C", "H", "W"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.shape, a.repeats)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"}
    env |= {"WORLD_SIZE": str(a.ranks), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--repeats", str(a.repeats), "--shape", *map(str, a.shape)]
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True) for r in range(a.ranks)
    ]
    out = procs[0].communicate()[0]
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit("a rank failed")
    ms = {k: 1e3 * v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    shape = "x".join(map(str, a.shape))
    print(f"float32 NCHW {shape} per rank, {a.ranks} gloo ranks on 127.0.0.1, 1 thread each, {os.cpu_count()} CPUs,")
    print(f"medians of {a.repeats} steps (forward + backward) of the slowest rank")
    print(f"{'torch.nn.BatchNorm2d':>22} {'bnt.BatchNorm2d':>16} {'bnt.SyncBatchNorm':>18} {'sync/plain':>11} "
          f"{'in collectives':>15} {'collectives alone':>18}")  # fmt: skip
    print(f"{ms['torch']:>20.2f}ms {ms['plain']:>14.2f}ms {ms['sync']:>16.2f}ms {ms['sync'] / ms['plain']:>10.2f}x "
          f"{ms['inside']:>13.3f}ms {ms['collectives']:>16.3f}ms")  # fmt: skip


if __name__ == "__main__":
    main()
