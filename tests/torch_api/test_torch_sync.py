"""batchnorm.torch.SyncBatchNorm over gloo (2 and 3 ranks on 127.0.0.1, started here)
against torch's batch norm run once, in float64, on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch without torch.distributed", allow_module_level=True)

from torch_cases import MaskedReference  # noqa: E402

import batchnorm.torch as bnt  # noqa: E402 - only once torch is known to be there

WORKER = Path(__file__).parent / "sync_worker.py"
STEPS = 2
BATCH = 8
SPLITS = {2: [[3, 5], [0, 8]], 3: [[5, 0, 3], [2, 3, 3]]}  # uneven, and a rank with nothing


def make_case(name: str, shape: tuple[int, ...], splits: list[int], **kw: object) -> dict:
    g = torch.Generator().manual_seed(len(name) * 1000 + sum(shape))
    dtype = kw.pop("dtype", torch.float32)
    offset = kw.pop("offset", 100.0)  # a large mean: E[x^2] - E[x]^2 would lose it; the merged M2 keeps it
    c = shape[1]
    xs = [(torch.randn(shape, generator=g) * (1 + k) + offset).to(dtype) for k in range(STEPS)]
    case = {
        "name": name,
        "channels": c,
        "splits": splits,
        "xs": xs,
        "dys": [torch.randn(shape, generator=g).to(dtype) for _ in range(STEPS)],
        "weight": torch.rand(c, generator=g) + 0.5,
        "bias": torch.randn(c, generator=g),
        "momentum": 0.1,
        "affine": True,
        "track": True,
        "channels_last": False,
    }
    case.update(kw)
    return case


def cases(world: int) -> list[dict]:
    uneven, other = SPLITS[world]
    n = BATCH
    return [
        make_case("nchw_f32", (n, 4, 5, 6), uneven),
        make_case("channels_last_f32", (n, 4, 5, 6), other, channels_last=True),
        make_case("nchw_bf16", (n, 4, 5, 6), other, dtype=torch.bfloat16),
        make_case("channels_last_bf16", (n, 4, 5, 6), uneven, dtype=torch.bfloat16, channels_last=True),
        make_case("nc_f32", (n, 6), uneven),
        make_case("ncl_f32_cumulative", (n, 3, 7), other, momentum=None),
        make_case("ncl_f64_no_affine_no_stats", (n, 3, 7), uneven, dtype=torch.float64, affine=False, track=False),
        # the global batch has one value per channel: every rank raises, no buffer moves
        make_case("one_value", (1, 5), [0] * (world - 1) + [1]),
        # rank 0 fails its first call: every rank raises, the second step runs normally
        make_case("peer_fails", (n, 4, 3, 3), uneven, bad=(0, 0)),
        # rank 0's first backward fails: every rank's backward raises, the second step runs normally
        make_case("peer_fails_backward", (n, 4, 3, 3), uneven, bad_backward=(0, 0)),
        # (a conv's weight gradient on inputs near 100 is ill-conditioned in float32, even in torch)
        make_case("ddp", (n, 2, 3, 3), uneven, offset=0.0, state=ddp_model().state_dict()),
        # masks: uneven masked counts, and in the second step rank 0's mask selects nothing
        make_case("masked_ncl_f32", (n, 3, 7), uneven, masks=masks((n, 7), uneven)),
        make_case("masked_channels_last", (n, 4, 5, 6), other, channels_last=True, masks=masks((n, 5, 6), other)),
        # (a few values per channel: x - mean near 100 would be ill-conditioned in float32, even in torch)
        make_case("masked_nc_cumulative", (n, 6), uneven, momentum=None, offset=0.0, masks=masks((n,), uneven)),
        # a global mask that selects nothing: every rank raises, no buffer moves
        make_case("masked_nothing", (n, 3, 7), uneven, masks=[torch.zeros(n, 7, dtype=torch.bool)] * STEPS),
    ]


def masks(shape: tuple[int, ...], splits: list[int]) -> list[torch.Tensor]:
    """A random mask per step; in the last step, rank 0's rows select nothing."""
    g = torch.Generator().manual_seed(sum(shape))
    out = [torch.rand(shape, generator=g) < 0.6 for _ in range(STEPS)]
    out[-1][: splits[0]] = False
    return out


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def run(request, tmp_path_factory) -> tuple[int, list[dict], list[dict]]:
    """Every case on `world` gloo ranks: (world, the cases, each rank's results)."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"sync{world}")
    all_cases = cases(world)
    torch.save(all_cases, tmp / "cases.pt")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp / "cases.pt"), str(tmp)],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return world, all_cases, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def masked_reference(case: dict) -> dict:
    """Masked batch norm by its definition in float64 on the whole batch of each step."""
    ref = MaskedReference(case["channels"], case["momentum"], weight=case["weight"], bias=case["bias"])
    out: dict = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for x_all, dy, mask in zip(case["xs"], case["dys"], case["masks"], strict=True):
        x = x_all.double().requires_grad_()
        y = ref(x, mask)
        y.backward(dy.double())
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["dweight"].append(ref.weight.grad)
        out["dbias"].append(ref.bias.grad)
        ref.weight.grad = ref.bias.grad = None
    out["running_mean"], out["running_var"] = ref.running_mean, ref.running_var
    out["num_batches_tracked"] = ref.num_batches_tracked
    keep = [1, -1] + [1] * (case["xs"][0].dim() - 2)
    scale = (ref.weight.detach() / torch.sqrt(ref.running_var + 1e-5)).view(keep)
    out["eval"] = (case["xs"][0].double() - ref.running_mean.view(keep)) * scale + ref.bias.detach().view(keep)
    return out


def reference(case: dict, steps: list[int]) -> dict:
    """torch's batch norm in float64 on the whole batch of each step in `steps`."""
    if "masks" in case:
        return masked_reference(case)
    cls = torch.nn.BatchNorm1d if case["xs"][0].dim() < 4 else torch.nn.BatchNorm2d
    m = cls(case["channels"], momentum=case["momentum"], affine=case["affine"], track_running_stats=case["track"])
    m = m.double()
    if case["affine"]:
        with torch.no_grad():
            m.weight.copy_(case["weight"])
            m.bias.copy_(case["bias"])
    out: dict = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for step in steps:
        x = case["xs"][step].double().requires_grad_()
        y = m(x)
        y.backward(case["dys"][step].double())
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        if case["affine"]:
            out["dweight"].append(m.weight.grad.clone())
            out["dbias"].append(m.bias.grad.clone())
            m.weight.grad = m.bias.grad = None
    if case["track"]:
        out["running_mean"], out["running_var"] = m.running_mean, m.running_var
        out["num_batches_tracked"] = int(m.num_batches_tracked)
        m.eval()
        out["eval"] = m(case["xs"][0].double()).detach()
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Equal to rounding in `dtype`, relative to the size of the values."""
    rel = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=rel * max(scale, 1.0), msg=what)


CASE_NAMES = [c["name"] for c in cases(2)]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sync_equals_one_process(run, name):
    world, all_cases, results = run
    case = next(c for c in all_cases if c["name"] == name)
    ranks = [r[name] for r in results]
    dtype = case["xs"][0].dtype
    bad = case.get("bad")
    if name == "ddp":
        model = ddp_model().double()
        x = case["xs"][0].double()
        y = model(x)
        y.backward(case["dys"][0].double())
        assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), dtype, "y")
        for r in ranks:  # DDP averages: the mean over ranks of the gradients, world * mean = one process's
            for k, p in model.named_parameters():
                assert_close(world * r["grads"][k].double(), p.grad, dtype, f"gradient of {k}")
        return
    if name == "one_value":
        for r in ranks:
            assert r["errors"] == ["ValueError: Expected more than 1 value per channel when training, "
                                   f"got 1 value per channel over all {world} ranks"] * STEPS  # fmt: skip
            assert torch.equal(r["running_mean"], torch.zeros(case["channels"]))
            assert torch.equal(r["running_var"], torch.ones(case["channels"]))
            assert r["num_batches_tracked"] == 0
        return
    if name == "masked_nothing":
        for r in ranks:
            assert r["errors"] == ["ValueError: Expected more than 1 value per channel when training, "
                                   f"got 0 selected by the mask over all {world} ranks"] * STEPS  # fmt: skip
            assert torch.equal(r["running_mean"], torch.zeros(case["channels"]))
            assert r["num_batches_tracked"] == 0
        return
    steps = [s for s in range(STEPS) if bad is None or s != bad[0]]
    for failed, what in ((bad, "should contain"), (case.get("bad_backward"), "backward_sums failed")):
        if failed is not None:
            step, bad_rank = failed
            for r, got in enumerate(ranks):
                error = got["errors"][step]
                assert error is not None
                assert (what in error) == (r == bad_rank), error
                assert ("another rank failed" in error) == (r != bad_rank), error
    want = reference(case, steps)
    for k in range(len(steps)):
        assert_close(torch.cat([r["y"][k] for r in ranks]), want["y"][k], dtype, f"y, step {k}")
        if ranks[0]["dx"][k] is None:  # a failed backward: the gradients were not written
            continue
        assert_close(torch.cat([r["dx"][k] for r in ranks]), want["dx"][k], dtype, f"dx, step {k}")
        if case["affine"]:
            for g in ("dweight", "dbias"):
                # per-rank gradients; their sum is the one-process gradient (statistics dtype)
                total = sum(r[g][k].double() for r in ranks)
                assert_close(total, want[g][k], torch.float32 if dtype != torch.float64 else dtype, f"{g}, step {k}")
    for r, got in enumerate(ranks):
        if case["channels_last"] and got["y"][0].numel():
            assert got["channels_last"], f"rank {r}: output not channels_last"
        if case["track"]:
            sdt = torch.float64 if dtype == torch.float64 else torch.float32
            assert got["num_batches_tracked"] == want["num_batches_tracked"]
            assert_close(got["running_mean"], want["running_mean"], sdt, f"running_mean, rank {r}")
            assert_close(got["running_var"], want["running_var"], sdt, f"running_var, rank {r}")
            start = sum(case["splits"][:r])
            assert_close(got["eval"], want["eval"][start : start + case["splits"][r]], dtype, f"eval, rank {r}")
    # every rank normalized with bitwise the same statistics: its running statistics agree
    if case["track"]:
        for got in ranks[1:]:
            assert torch.equal(got["running_mean"], ranks[0]["running_mean"])
            assert torch.equal(got["running_var"], ranks[0]["running_var"])


def test_without_process_group_it_is_a_plain_batch_norm():
    assert not dist.is_initialized()
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, 4).requires_grad_()
    ours, theirs = bnt.SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
    assert isinstance(ours, torch.nn.SyncBatchNorm)
    y = ours(x)
    (dx,) = torch.autograd.grad(y, x, y.detach())
    y_ref = theirs(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, y_ref.detach())
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 1
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_checks_as_torch():
    m = bnt.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        m(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        bnt.SyncBatchNorm(0)(torch.randn(2, 0))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3))
    assert int(m.num_batches_tracked) == 0


def test_convert_sync_gives_it_with_the_same_tensors():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2))
    weight = model[1].weight
    out = bnt.convert(model, sync=True)
    assert type(out[1]) is bnt.SyncBatchNorm
    assert out[1].weight is weight
