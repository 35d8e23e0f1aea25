"""python -m batchnorm bench --torch and --resnet: they run on tiny settings, their table and
JSON have the promised structure, the subjects are interleaved and checked, and a wrong
result stops the run. No assertion here is about speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")

from batchnorm.tools import bench as _bench  # noqa: E402
from batchnorm.tools import bench_cases as _bench_cases  # noqa: E402
from batchnorm.tools import bench_resnet as _bench_resnet  # noqa: E402
from batchnorm.tools import bench_torch as _bench_torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"quick-nchw", "quick-nhwc", "quick-ncl", "tiny-16x64"}


@pytest.fixture
def restore_torch_threads(restore_threads):
    """The module runs set torch's thread count as well as the library's."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(args: list[str], tmp_path: Path) -> tuple[str, dict]:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "batchnorm", "bench", "--quiet", "--gap", "1", "--json", str(out), *args]
    env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_MAX_ISA"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def modules_run(tmp_path_factory):
    args = ["--torch", "--quick", "--repeats", "2", "--warmup", "1", "--threads", "1,2", "--shapes", ",".join(SHAPES)]
    return _run(args, tmp_path_factory.mktemp("bench_torch"))


def test_modules_table(modules_run):
    table, report = modules_run
    assert "torch.nn.BatchNorm*d" in table
    assert "model bytes: train-step 8B, eval 2B" in table
    assert "threads = 1" in table
    assert "threads = 2" in table
    headers = [line.split() for line in table.splitlines() if line.startswith("shape ")]
    assert len(headers) == 2
    for column in ("batchnorm", "lim", "torch", "x"):
        assert column in headers[0]
    assert "numpy" not in headers[0]
    assert "ort" not in headers[0]
    rows = [line.split() for line in table.splitlines() if line.split()[:1] and line.split()[0] in SHAPES]
    assert len(rows) == len(report["results"])
    assert {(r[1], r[3]) for r in rows} == {
        (layout, mode) for layout in ("NCHW", "NHWC", "NCL", "NC") for mode in _bench_cases.MODULE_MODES
    }


def test_modules_json(modules_run):
    _, report = modules_run
    options = report["meta"]["options"]
    assert options["modules"]
    assert options["dtypes"] == ["float32", "bfloat16"]
    assert options["modes"] == list(_bench_cases.MODULE_MODES)
    combos = {(e["shape"]["name"], e["dtype"], e["mode"], e["threads"]) for e in report["results"]}
    assert combos == {
        (s, d, m, t) for s in SHAPES for d in ("float32", "bfloat16") for m in _bench_cases.MODULE_MODES for t in (1, 2)
    }
    for e in report["results"]:
        assert e["model_bytes"] == {"train-step": 8, "eval": 2}[e["mode"]] * e["bytes"]
        assert set(e["subjects"]) == {"batchnorm", "torch"}
        ours, theirs = e["subjects"]["batchnorm"], e["subjects"]["torch"]
        for timed in (ours, theirs):
            assert len(timed["times_s"]) == 2
            assert timed["median_ms"] == pytest.approx(1e3 * float(np.median(timed["times_s"])))
        if e["shape"]["kind"] == "large":
            # One copy per repetition, next to both subjects' calls: the same limit for both.
            assert ours["copy_ordinary_s"] == theirs["copy_ordinary_s"]
            assert ours["copy_nontemporal_s"] == theirs["copy_nontemporal_s"]
            assert ours["limit_gbs"] == pytest.approx(theirs["limit_gbs"])
            assert e["speedup_torch"] == pytest.approx(ours["fraction"] / theirs["fraction"])
            assert e["speedup_torch"] == pytest.approx(theirs["median_ms"] / ours["median_ms"])
        else:
            assert "fraction" not in ours
            assert e["speedup_torch"] == pytest.approx(theirs["median_ms"] / ours["median_ms"])


def test_modules_every_result_was_checked(modules_run):
    _, report = modules_run
    expected = {"train-step": {"y", "dx", "dgamma", "dbeta"}, "eval": {"y"}}
    for e in report["results"]:
        for subject, timed in e["subjects"].items():
            checks = timed["checks"]
            assert {c["output"] for c in checks} == expected[e["mode"]]
            for c in checks:  # ours to a few roundings; torch's to the looser tolerance
                assert 0 <= c["error"] <= c["tolerance"] == _bench_cases.tolerance_for(subject, e["dtype"])
                if subject == "batchnorm":
                    assert c["tolerance"] == _bench_cases.TOLERANCE[e["dtype"]]


def _request(dims, axis, **extra):
    shape = _bench_cases.Shape("t", dims, axis, "large")
    request = {
        "shape": shape.to_json(),
        "dtype": "float32",
        "modes": list(_bench_cases.MODULE_MODES),
        "threads": [1],
        "repeats": 2,
        "warmup": 0,
        "footprint_bytes": 0,
        "seed": 3,
    }
    return {**request, **extra}


@pytest.mark.parametrize(
    ("dims", "axis", "module"), [((4, 6, 5), 1, "BatchNorm1d"), ((2, 3, 4, 5, 6), 1, "BatchNorm3d")]
)
def test_module_kind_follows_the_rank(dims, axis, module, restore_torch_threads):
    data = _bench_cases.case_data(_request(dims, axis))
    theirs = _bench_torch.make_module("torch", data)
    ours = _bench_torch.make_module("batchnorm", data)
    assert type(theirs) is getattr(torch.nn, module)
    assert isinstance(ours, getattr(torch.nn, module))
    assert type(ours).__module__.startswith("batchnorm.torch")
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name))
        assert getattr(ours, name) is not getattr(theirs, name)  # a deep copy: each trains its own
    answer = _bench_torch.run_module_case(_request(dims, axis))
    assert [row["mode"] for row in answer["rows"]] == list(_bench_cases.MODULE_MODES)


def test_a_wrong_result_stops_the_run(monkeypatch, restore_torch_threads):
    """Ours with its weight off by 0.1%: the train-step check against float64 catches it."""
    right = _bench_torch.make_module

    def off(subject, data):
        module = right(subject, data)
        if subject == "batchnorm":
            with torch.no_grad():
                module.weight.mul_(1 + 1e-3)
        return module

    monkeypatch.setattr(_bench_torch, "make_module", off)
    with pytest.raises(_bench.CheckError, match=r"batchnorm train-step float32: output 'y' is off"):
        _bench_torch.run_module_case(_request((4, 8, 6, 6), 1))


def test_calls_are_interleaved_after_shared_copies(monkeypatch):
    """Ours, torch's, torch's, ours, ...: each as often first after the copies, each call on a
    buffer of its own, so neither reads what the other left in cache."""
    data = _bench_cases.case_data(_request((4, 8, 6, 6), 1, min_buffers=6))
    assert data.count == 6
    order, copied = [], []
    source = {id(a): j for j, a in enumerate(data.x)}
    monkeypatch.setattr(_bench_cases, "_copy_memory", lambda: lambda src, dst, nt: copied.append(source[id(src)]))
    calls = [lambda i, k=k: order.append((k, i)) for k in "ab"]
    timings, _, lasts = _bench_cases.time_subjects(calls, data, repeats=3, warmup=2, with_copy=True)
    warm = timings[0]["warmup_calls"]
    assert warm >= 2
    turns = [[0, 1], [1, 0]]
    assert order == [("ab"[j], (2 * r + j) % 6) for r in range(warm + 3) for j in turns[r % 2]]
    assert lasts == [(2 * (warm + 2) + j) % 6 for j in range(2)]
    used = [{i for _, i in order[2 * r : 2 * r + 4]} for r in range(warm + 3)]  # this repetition's and the next's
    assert all(not set(copied[2 * r : 2 * r + 2]) & used[r] for r in range(warm + 3))
    with pytest.raises(_bench.BenchError, match="at least 6 rotating buffers"):
        _bench_cases.time_subjects(
            calls, _bench_cases.case_data(_request((4, 8, 6, 6), 1)), repeats=1, warmup=0, with_copy=True
        )
    for timing in timings:
        assert len(timing["times_s"]) == 3
        assert timing["copy_ordinary_s"] is timings[0]["copy_ordinary_s"]
    tiny, _, _ = _bench_cases.time_subjects(calls, data, repeats=2, warmup=0, with_copy=False)
    assert [len(t["times_s"]) for t in tiny] == [2, 2]


def test_bad_options_exit_with_a_message(capsys):
    from batchnorm.__main__ import main

    assert main(["bench", "--torch", "--quick", "--modes", "inference"]) == 2
    assert "train-step,eval" in capsys.readouterr().err
    assert main(["bench", "--resnet", "--resnet-batch", "1", "--resnet-size", "64"]) == 2
    assert "--resnet-size" in capsys.readouterr().err
    assert main(["bench", "--resnet", "--modes", "backward"]) == 2
    assert "train-step,eval" in capsys.readouterr().err
    assert main(["bench", "--resnet", "--png", "chart.png"]) == 2
    assert "--png" in capsys.readouterr().err


def test_resnet50_is_resnet50():
    model = _bench_resnet.resnet50()
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(torch.nn.BatchNorm2d) == kinds.count(torch.nn.Conv2d) == 53
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50
    out = model.eval()(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 1000)


def test_resnet_run(tmp_path):
    args = ["--resnet", "--resnet-batch", "2", "--resnet-size", "64", "--repeats", "2", "--warmup", "0"]
    table, report = _run([*args, "--threads", "1", "--no-compile"], tmp_path)
    assert "ResNet-50, batch 2 at 64x64, 1 threads" in table
    assert report["meta"]["options"]["compile"] is False
    assert 0 <= report["check"]["error"] <= report["check"]["tolerance"]
    assert [(e["compiled"], e["mode"]) for e in report["results"]] == [(False, "train-step"), (False, "eval")]
    rows = [line.split() for line in table.splitlines() if line.startswith("eager ")]
    assert [r[1] for r in rows] == ["train-step", "eval"]
    for e in report["results"]:
        ours, theirs = e["subjects"]["batchnorm"], e["subjects"]["torch"]
        assert len(ours["times_s"]) == len(theirs["times_s"]) == 2
        assert ours["first_call_s"] > 0
        assert e["speedup_torch"] == pytest.approx(theirs["median_ms"] / ours["median_ms"])


def test_rounds_of_a_row_neither_could_run():
    """Training on one value per channel is n/a for both modules; --rounds still picks a round."""
    rows = [{"speedup_torch": None, "subjects": {"batchnorm": {"unsupported": "ValueError"}}} for _ in range(3)]
    assert _bench._median_round(rows)["round"] in {0, 1, 2}


def test_resnet_models_are_checked(monkeypatch, restore_torch_threads):
    """A converted model whose first batch norm's bias is off by 0.1 (before a ReLU, so the next
    batch norm does not normalize it away): the run stops."""
    right = _bench_resnet.converted

    def off(model):
        ours = right(model)
        with torch.no_grad():
            ours[1].bias.add_(0.1)
        return ours

    request = {"batch": 2, "size": 64, "threads": 1, "modes": [], "compile": False, "seed": 0}
    request = {**request, "repeats": 1, "warmup": 0, "gap_s": 0.0}
    assert _bench_resnet.run_resnet(request)["check"]["error"] <= _bench_resnet.TOLERANCE
    monkeypatch.setattr(_bench_resnet, "converted", off)
    with pytest.raises(_bench.CheckError, match="logits are off"):
        _bench_resnet.run_resnet(request)


# Dynamo and inductor warn about their own imports and about graph breaks: not the bench's to fix.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resnet_compiled_variant(monkeypatch, restore_torch_threads):
    """The compiled half of the run, on a conv -> BN -> ReLU model small enough to compile in seconds."""

    def small(num_classes=1000):
        nn = torch.nn
        layers = [nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    monkeypatch.setattr(_bench_resnet, "resnet50", small)
    request = {"batch": 2, "size": 64, "threads": 1, "modes": ["train-step", "eval"], "compile": True, "seed": 0}
    answer = _bench_resnet.run_resnet({**request, "repeats": 2, "warmup": 1, "gap_s": 0.0})
    assert [(r["compiled"], r["mode"]) for r in answer["rows"]] == [
        (compiled, mode) for compiled in (False, True) for mode in ("train-step", "eval")
    ]
    for row in answer["rows"]:
        assert set(row["subjects"]) == {"batchnorm", "torch"}
        assert all(len(t["times_s"]) == 2 for t in row["subjects"].values())
