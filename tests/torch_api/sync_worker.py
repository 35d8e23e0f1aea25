"""One gloo rank of tests/torch_api/test_torch_sync.py: runs every case on this rank's slice.

    python sync_worker.py CASES OUT      # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment

CASES (torch.save) holds a list of cases, each with the global batches of every step and
how they are split over the ranks; OUT/rank<R>.pt receives, per case, this rank's outputs,
gradients and buffers, or the error a call raised.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

import batchnorm.torch as bnt
from batchnorm import _core


@contextlib.contextmanager
def failing_backward_sums():
    """The core's backward_sums raises on this rank (a backward that fails on one rank only)."""

    def fail(*args: object) -> None:
        raise RuntimeError("backward_sums failed on this rank")

    saved = _core.backward_sums
    _core.backward_sums = fail
    try:
        yield
    finally:
        _core.backward_sums = saved


def local_slice(t: torch.Tensor, splits: list[int], rank: int) -> torch.Tensor:
    start = sum(splits[:rank])
    return t[start : start + splits[rank]]


def layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def run_case(case: dict, rank: int) -> dict:
    torch.manual_seed(0)
    m = bnt.SyncBatchNorm(
        case["channels"], momentum=case["momentum"], affine=case["affine"], track_running_stats=case["track"]
    )
    if case["affine"]:
        with torch.no_grad():
            m.weight.copy_(case["weight"])
            m.bias.copy_(case["bias"])
    out: dict = {"y": [], "dx": [], "dweight": [], "dbias": [], "errors": []}
    for step, (x_all, dy_all) in enumerate(zip(case["xs"], case["dys"], strict=True)):
        x = layout(local_slice(x_all, case["splits"], rank), case["channels_last"])
        dy = layout(local_slice(dy_all, case["splits"], rank), case["channels_last"])
        if (step, rank) == case.get("bad"):  # this rank's call fails: one channel too many
            x = torch.cat([x, x[:, :1]], 1)
        x.requires_grad_()
        masks = case.get("masks")  # masked cases: each step's mask, (N, *spatial), sliced as x
        try:
            y = m(x) if masks is None else m(x, mask=local_slice(masks[step], case["splits"], rank))
        except (ValueError, RuntimeError) as error:
            out["errors"].append(f"{type(error).__name__}: {error}")
            continue
        out["errors"].append(None)
        out["y"].append(y.detach())
        failing = (step, rank) == case.get("bad_backward")
        try:
            with failing_backward_sums() if failing else contextlib.nullcontext():
                y.backward(dy)
        except RuntimeError as error:
            out["errors"][-1] = f"backward {type(error).__name__}: {error}"
            for k in ("dx", "dweight", "dbias"):
                out[k].append(None)
            continue
        out["dx"].append(x.grad)
        out["channels_last"] = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        if case["affine"]:
            out["dweight"].append(m.weight.grad.clone())
            out["dbias"].append(m.bias.grad.clone())
            m.weight.grad = m.bias.grad = None
    if case["track"]:
        out["running_mean"] = m.running_mean.clone()
        out["running_var"] = m.running_var.clone()
        out["num_batches_tracked"] = int(m.num_batches_tracked)
    # eval (no collective): the plain batch norm, with the running statistics when tracked
    m.eval()
    x = local_slice(case["xs"][0], case["splits"], rank)
    out["eval"] = m(x).detach() if case["track"] else None
    return out


def run_ddp(case: dict, rank: int) -> dict:
    """A conv -> SyncBatchNorm model under DistributedDataParallel (which averages gradients)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(case["channels"], 2, 1), bnt.SyncBatchNorm(2))
    model.load_state_dict(case["state"])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x = local_slice(case["xs"][0], case["splits"], rank)
    y = ddp(x)
    y.backward(local_slice(case["dys"][0], case["splits"], rank))
    return {"y": y.detach(), "grads": {k: p.grad for k, p in model.named_parameters()}}


def main() -> None:
    cases_file, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)  # one thread per rank on a small machine
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cases = torch.load(cases_file)
    results = {case["name"]: (run_ddp if "state" in case else run_case)(case, rank) for case in cases}
    # Every rank past its last collective before any tears the group down: a rank that closed
    # its gloo pairs while a peer still used them once aborted ("terminate called without an
    # active exception").
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
