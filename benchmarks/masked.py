"""Time a masked training step (forward + backward) on padded sequences beside the unmasked
step, and beside masked batch norm written with torch ops (what people write today: the
mask multiplied in, sums, autograd).

    python benchmarks/masked.py                        # (64, 256, 128), about 30% padding
    python benchmarks/masked.py --shape 32 512 256 --padding 0.5 --repeats 40

Every row is a training step on the same (N, C, L) float32 batch, axis 1, mask (N, L) true
on each sequence's first `length` positions (lengths drawn so that the padded share is
about --padding):

- numpy: bn.forward + bn.backward, masked and unmasked;
- batchnorm.torch: BatchNorm1d(x, mask=) and BatchNorm1d(x), with autograd;
- torch ops: the masked batch norm below, with autograd, and torch.nn.BatchNorm1d unmasked.

Each repetition runs every row once, in turn, and a copy of x's bytes next to it; the
table gives medians, each row's time over the copy's, and ratios taken per repetition.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

import batchnorm as bn


def torch_ops_masked(x, mask, weight, bias, *, running_mean, running_var, momentum=0.1, eps=1e-5):
    """Masked batch norm in torch ops: statistics over the positions where mask (N, L) is true."""
    import torch

    m = mask.unsqueeze(1).to(x.dtype)
    count = m.sum() * 1.0
    mean = (x * m).sum(dim=(0, 2), keepdim=True) / count
    centred = (x - mean) * m
    var = (centred * centred).sum(dim=(0, 2), keepdim=True) / count
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.flatten(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.flatten() * (count / (count - 1)), alpha=momentum)
    y = (x - mean) * torch.rsqrt(var + eps)
    return y * weight[None, :, None] + bias[None, :, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 256, 128], metavar=("N", "C", "L"))
    parser.add_argument("--padding", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    n, c, length = args.shape
    threads = args.threads or bn.get_num_threads()
    bn.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, length), dtype=np.float32) * 2 + 1
    dy = rng.standard_normal((n, c, length), dtype=np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    lengths = rng.integers(max(1, int(length * (1 - 2 * args.padding))), length + 1, n)
    mask = np.arange(length)[None, :] < lengths[:, None]
    padded = 1 - mask.mean()

    rows: dict[str, Callable[[], object]] = {}

    def numpy_step(masked: bool) -> Callable[[], object]:
        m = mask if masked else None

        def step() -> None:
            _, stats = bn.forward(x, gamma, beta, axis=1, epsilon=1e-5, mask=m)
            bn.backward(dy, x, stats, gamma, beta, axis=1, mask=m)

        return step

    rows["numpy masked"] = numpy_step(True)
    rows["numpy unmasked"] = numpy_step(False)
    try:
        import torch

        import batchnorm.torch as bnt
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        xt = torch.from_numpy(x).requires_grad_()
        dyt, mt = torch.from_numpy(dy), torch.from_numpy(mask)
        ours, theirs = bnt.BatchNorm1d(c), torch.nn.BatchNorm1d(c)
        w = torch.nn.Parameter(torch.from_numpy(gamma.copy()))
        b = torch.nn.Parameter(torch.from_numpy(beta.copy()))
        rm, rv = torch.zeros(c), torch.ones(c)

        def module_step(module: torch.nn.Module, masked: bool) -> Callable[[], object]:
            def step() -> None:
                y = module(xt, mask=mt) if masked else module(xt)
                torch.autograd.grad(y, (xt, module.weight, module.bias), dyt)

            return step

        try:
            ours(xt, mask=mt)
            rows["batchnorm.torch masked"] = module_step(ours, True)
        except TypeError:
            print("batchnorm.torch.BatchNorm1d takes no mask here: its rows are left out")
        rows["batchnorm.torch unmasked"] = module_step(ours, False)

        def ops_step() -> None:
            y = torch_ops_masked(xt, mt, w, b, running_mean=rm, running_var=rv)
            torch.autograd.grad(y, (xt, w, b), dyt)

        rows["torch ops masked"] = ops_step
        rows["torch.nn unmasked"] = module_step(theirs, False)

    src, dst = np.empty_like(x), np.empty_like(x)
    src[...] = x

    def copy() -> None:
        np.copyto(dst, src)

    for f in [*rows.values(), copy]:  # warm up
        f(), f()
    times: dict[str, list[float]] = {k: [] for k in [*rows, "copy"]}
    for _ in range(args.repeats):
        for name, f in [*rows.items(), ("copy", copy)]:
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)

    def ratio(a: str, b: str) -> float:
        return statistics.median(p / q for p, q in zip(times[a], times[b], strict=True))

    isa = bn.info()["simd"]
    print(f"(N, C, L) = {tuple(args.shape)} float32, axis 1, {padded:.0%} padded; {threads} threads, {isa}")
    print(f"medians of {args.repeats} repetitions; copy of x: {statistics.median(times['copy']) * 1e6:.0f} µs")
    print(f"{'step (forward + backward)':<28}{'µs':>9}{'/ copy':>9}")
    for name in rows:
        print(f"{name:<28}{statistics.median(times[name]) * 1e6:>9.0f}{ratio(name, 'copy'):>9.2f}")
    print()
    print(f"numpy masked / unmasked: {ratio('numpy masked', 'numpy unmasked'):.2f}")
    if "batchnorm.torch masked" in rows:
        print(f"batchnorm.torch masked / unmasked: {ratio('batchnorm.torch masked', 'batchnorm.torch unmasked'):.2f}")
        print(f"torch ops masked / batchnorm.torch masked: {ratio('torch ops masked', 'batchnorm.torch masked'):.2f}")
    if "torch ops masked" in rows:
        print(f"torch ops masked / numpy masked: {ratio('torch ops masked', 'numpy masked'):.2f}")


if __name__ == "__main__":
    main()
