"""Time one synchronized batch-norm training step (forward + backward) against the
unsynchronized one, at several MPI process counts.

    python benchmarks/sync_step.py                       # 1, 2 and 4 ranks, per-rank 8x256x56x56
    python benchmarks/sync_step.py --ranks 1 2 --shape 16 256 56 56 --repeats 30
    python benchmarks/sync_step.py --split               # one 32x256x56x56 batch split across the ranks
    python benchmarks/sync_step.py --latency --ranks 2   # the two all-reduces alone, C = 64, 256, 2048

Without --worker it launches ``mpiexec -n R`` (the one beside this Python, from the
``mpich`` wheel) for each R, with OMP_NUM_THREADS=1 (one thread per rank), and prints a
table. For each of the repeated steps (each starts after a barrier, so the ranks contend
for memory bandwidth as in training) it records on every rank:

- plain: BatchNorm2d forward + backward on the rank's batch (no communication);
- sync:  SyncBatchNorm forward + backward on the same batch (its two all-reduces);
- in all-reduce: the time inside those two all-reduces;
- alone: the same two all-reduces (same O(C) messages) right after a barrier.

and reports medians over the steps of: the slowest rank's plain and sync step (a
data-parallel step waits for its slowest rank anyway), the all-reduce time of the rank
that arrived last (the communication itself; the other ranks also wait for it there),
and the slowest rank's all-reduce alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def worker(shape: list[int], repeats: int, split: bool) -> None:
    import numpy as np
    from mpi4py import MPI

    import batchnorm as bn
    from batchnorm.distributed import _mpi

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    n, c = shape[0], shape[1]
    local_n = (n // size + (rank < n % size)) if split else n
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((local_n, c, *shape[2:]), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)

    collective = [0.0]

    def timed(f):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                collective[0] += time.perf_counter() - t

        return wrapper

    _mpi.allreduce_moments = timed(_mpi.allreduce_moments)  # type: ignore[method-assign]
    _mpi.allreduce_sum = timed(_mpi.allreduce_sum)  # type: ignore[method-assign]

    plain = bn.BatchNorm2d(c)
    sync = bn.SyncBatchNorm(c)

    def step(layer) -> float:
        comm.Barrier()
        t = time.perf_counter()
        layer(x)
        layer.backward(dy)
        return time.perf_counter() - t

    for layer in (plain, sync):  # warm up (page faults, first MPI messages)
        step(layer)
        step(layer)
    times = np.zeros((4, repeats))  # plain, sync, in all-reduce, alone
    for r in range(repeats):
        times[0, r] = step(plain)
        collective[0] = 0.0
        times[1, r] = step(sync)
        times[2, r] = collective[0]
        mean, m2 = np.zeros(c), np.ones(c)
        comm.Barrier()
        t = time.perf_counter()
        _counts, mean, m2 = _mpi.allreduce_moments(comm, local_n, mean, m2)
        _mpi.allreduce_sum(comm, mean, m2)
        times[3, r] = time.perf_counter() - t
    every = np.stack(comm.allgather(times))  # (ranks, 4, repeats)
    if rank == 0:
        slowest, fastest = every.max(axis=0), every.min(axis=0)
        result = {
            "ranks": size,
            "local_shape": list(x.shape),
            "bytes_per_step": (3 * c + 2 * c + 1) * 8,  # forward triples + backward sums + flag
            "plain": float(np.median(slowest[0])),
            "sync": float(np.median(slowest[1])),
            "coll": float(np.median(fastest[2])),
            "pure": float(np.median(slowest[3])),
        }
        print(json.dumps(result), flush=True)


def latency_worker() -> None:
    """The two all-reduces alone, back to back after a barrier, for several channel counts."""
    import numpy as np
    from mpi4py import MPI

    from batchnorm.distributed import _mpi

    comm = MPI.COMM_WORLD

    def median_us(f, n: int = 300) -> float:
        ts = []
        for _ in range(n):
            comm.Barrier()
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return float(np.median(comm.allgather(np.median(ts)))) * 1e6

    for c in (64, 256, 2048):
        mean, m2 = np.zeros(c), np.ones(c)
        fwd = median_us(lambda mean=mean, m2=m2: _mpi.allreduce_moments(comm, 5, mean, m2))
        bwd = median_us(lambda mean=mean, m2=m2: _mpi.allreduce_sum(comm, mean, m2))
        if comm.Get_rank() == 0:
            print(f"{comm.Get_size()} ranks, C = {c:>4}: forward all-reduce {fwd:7.1f} us, backward {bwd:7.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--shape", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"))
    p.add_argument("--split", action="store_true", help="split one batch of --shape across the ranks")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--latency", action="store_true", help="time the two all-reduces alone, C = 64, 256, 2048")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    shape = a.shape or ([32, 256, 56, 56] if a.split else [8, 256, 56, 56])
    if a.worker:
        latency_worker() if a.latency else worker(shape, a.repeats, a.split)
        return
    beside = Path(sys.executable).parent / "mpiexec"
    launcher = str(beside) if beside.exists() else "mpiexec"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if a.latency:
        for r in a.ranks:
            if r > 1:
                cmd = [launcher, "-n", str(r), sys.executable, __file__, "--worker", "--latency"]
                print(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout, end="")
        return
    what = (
        f"one {shape[0]}x{shape[1]}x{shape[2]}x{shape[3]} batch split across the ranks"
        if a.split
        else f"{shape[0]}x{shape[1]}x{shape[2]}x{shape[3]} per rank"
    )
    print(f"float32, {what}, OMP_NUM_THREADS=1, {os.cpu_count()} CPUs, medians of {a.repeats} steps")
    print(
        f"{'ranks':>5} {'local batch':>18} {'plain step':>11} {'sync step':>10} {'overhead':>9} "
        f"{'in all-reduce':>13} {'share':>6} {'all-reduce alone':>16} {'bytes/step':>11}"
    )
    for r in a.ranks:
        cmd = [launcher, "-n", str(r), sys.executable, __file__, "--worker", "--repeats", str(a.repeats), "--shape"]
        cmd += [str(s) for s in shape] + (["--split"] if a.split else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        d = json.loads(out.strip().splitlines()[-1])
        ms = {k: 1e3 * d[k] for k in ("plain", "sync", "coll", "pure")}
        alone = f"{1e3 * ms['pure']:.1f}us" if r > 1 else "-"
        print(
            f"{d['ranks']:>5} {'x'.join(map(str, d['local_shape'])):>18} {ms['plain']:>9.2f}ms {ms['sync']:>8.2f}ms "
            f"{ms['sync'] / ms['plain'] - 1:>8.1%} {ms['coll']:>11.3f}ms {ms['coll'] / ms['sync']:>6.1%} "
            f"{alone:>16} {d['bytes_per_step']:>11}"
        )


if __name__ == "__main__":
    main()
