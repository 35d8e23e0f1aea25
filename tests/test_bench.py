"""The benchmark (python -m batchnorm bench): it runs, its table and JSON have the promised
structure, and the correctness checks ran and can fail. No assertion here is about speed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batchnorm.tools import bench as _bench
from batchnorm.tools import bench_cases as _bench_cases

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_ONNXRUNTIME = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
HAS_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One smoke run of the command line on the quick shapes, with its JSON report.

    Without PyTorch, whose import in two more worker processes would double the time;
    test_torch_is_timed_and_checked runs the same case code with torch in this process.
    """
    out = tmp_path_factory.mktemp("bench") / "report.json"
    dtypes = "float32,bfloat16" if HAS_ML_DTYPES else "float32,float16"
    cmd = [
        sys.executable,
        "-m",
        "batchnorm",
        "bench",
        "--quick",
        "--quiet",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--gap",
        "1",
    ]
    cmd += ["--threads", "1,2", "--dtypes", dtypes, "--shapes", "quick-dense,tiny", "--json", str(out), "--no-torch"]
    env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_MAX_ISA"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_table_has_header_and_every_row(quick_run):
    table, report = quick_run
    info = report["meta"]["batchnorm"]
    assert f"ISA {info['simd']}" in table
    assert report["meta"]["cpu"] in table
    assert "threads = 2" in table
    assert "threads = 1" in table
    for column in ("batchnorm", "lim", "torch", "x torch", "numpy", "x numpy", "copy GB/s"):
        assert column in table
    rows = [line for line in table.splitlines() if line.startswith(("quick-", "tiny-"))]
    assert len(rows) == len(report["results"])


def test_json_structure(quick_run):
    _, report = quick_run
    meta = report["meta"]
    assert set(meta["options"]["threads"]) == {1, 2}
    assert meta["batchnorm"]["simd"] in meta["batchnorm"]["simd_supported"]
    assert "numpy" in meta["versions"]
    dtypes = meta["options"]["dtypes"]
    names = {"quick-dense", "tiny-16x64"}
    combos = {(e["shape"]["name"], e["dtype"], e["mode"], e["threads"]) for e in report["results"]}
    assert combos == {(n, d, m, t) for n in names for d in dtypes for m in _bench_cases.MODES for t in (1, 2)}
    for e in report["results"]:
        assert e["model_bytes"] == _bench_cases.MODE_BYTES[e["mode"]] * e["bytes"]
        ours = e["subjects"]["batchnorm"]
        assert set(ours["policies"]) == {"inherited", "passive"}
        assert ours["policy"] in ours["policies"]
        assert len(ours["times_s"]) == 2
        assert ours["median_ms"] > 0
        if e["shape"]["kind"] == "large":
            assert e["buffers"] >= 4
            assert len(ours["copy_ordinary_s"]) == len(ours["copy_nontemporal_s"]) == 2
            assert ours["fraction"] > 0
            assert ours["limit_gbs"] >= max(ours["copy_ordinary_gbs"], ours["copy_nontemporal_gbs"]) * (1 - 1e-9)
        else:
            assert "fraction" not in ours
            assert ours["calls_per_rep"] >= 1
        assert ("numpy" in e["subjects"]) == (e["dtype"] == "float32")
        assert "torch" not in e["subjects"]
        assert ("onnxruntime" in e["subjects"]) == HAS_ONNXRUNTIME
        if HAS_ONNXRUNTIME and e["mode"] != "backward" and e["dtype"] != "bfloat16":
            assert e["speedup_onnxruntime"] > 0
        if e["dtype"] == "float32":
            assert e["speedup_numpy"] > 0


def test_every_timed_result_was_checked(quick_run):
    _, report = quick_run
    expected_outputs = {"inference": {"y"}, "forward": {"y"}, "backward": {"dx", "dgamma", "dbeta"}}
    for e in report["results"]:
        for name, result in e["subjects"].items():
            for policy, timed in result["policies"].items():
                if "unsupported" in timed:
                    assert name in _bench_cases.PEERS
                    assert e["mode"] == "backward" or e["dtype"] == "bfloat16" or name == "torch", timed
                    continue
                checks = timed["checks"]
                assert expected_outputs[e["mode"]] <= {c["output"] for c in checks}, (name, policy, e["mode"])
                tolerance = _bench_cases.tolerance_for(name, e["dtype"])
                for c in checks:
                    assert 0 <= c["error"] <= c["tolerance"] == tolerance


def test_shapes_file_is_the_builtin_table():
    in_repo = _bench.parse_shapes((ROOT / "benchmarks" / "shapes.txt").read_text())
    assert in_repo == _bench.parse_shapes(_bench.DEFAULT_SHAPES)
    dims = {(s.dims, s.axis) for s in in_repo}
    for nchw in ((32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7)):
        assert (nchw, 1) in dims
        assert ((nchw[0], nchw[2], nchw[3], nchw[1]), -1) in dims
    assert {((4096, 1024), -1), ((256, 4096), -1), ((1, 64), -1), ((16, 64), -1)} <= dims


@pytest.mark.parametrize(
    "line",
    ["a 4x8 1", "a 4x8 1 huge", "a 4xq 1 large", "a 8 0 large", "a 4x8 2 large", "a 4x0 1 large"],
)
def test_bad_shape_lines_are_rejected(line):
    with pytest.raises(_bench.BenchError, match="shapes line 1"):
        _bench.parse_shapes(line)


def test_shape_filters():
    shapes = _bench.parse_shapes(_bench.DEFAULT_SHAPES)
    assert [s.name for s in _bench.select_shapes(shapes, "r50-*-nhwc,tiny-1x64")] == [
        "r50-112-nhwc",
        "r50-56-nhwc",
        "r50-28-nhwc",
        "r50-7-nhwc",
        "tiny-1x64",
    ]
    with pytest.raises(_bench.BenchError, match="no shape matches"):
        _bench.select_shapes(shapes, "nothing")


def _request(subjects, **extra):
    shape = _bench_cases.Shape("t", (4, 8, 16, 16), 1, "large")
    request = {
        "shape": shape.to_json(),
        "dtype": "float32",
        "modes": ["inference", "backward"],
        "threads": [1],
        "repeats": 1,
        "warmup": 0,
        "footprint_bytes": 0,
        "seed": 1,
        "subjects": subjects,
    }
    request.update(extra)
    return request


def test_a_wrong_result_stops_the_run(monkeypatch):
    """The worker's case runner, in this process, with an implementation that is off."""
    right = _bench_cases._SUBJECTS["batchnorm"]

    def off_by_a_little(mode, data, threads):
        call, outputs = right(mode, data, threads)
        return call, lambda r, i: {k: v * (1 + 1e-3) for k, v in outputs(r, i).items()}

    monkeypatch.setitem(_bench_cases._SUBJECTS, "batchnorm", off_by_a_little)
    with pytest.raises(_bench.CheckError, match=r"batchnorm inference float32: output 'y' is off"):
        _bench_cases.run_case(_request(["batchnorm"]))


def test_run_case_in_process():
    answer = _bench_cases.run_case(_request(["batchnorm", "numpy"]))
    assert answer["buffers"] == 4  # the minimum for the copy to stay off the timed buffers
    assert answer["bytes"] == 4 * 8 * 16 * 16 * 4
    assert [(r["mode"], r["threads"]) for r in answer["rows"]] == [("inference", 1), ("backward", 1)]
    for row in answer["rows"]:
        assert set(row["subjects"]) == {"batchnorm", "numpy"}


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16" if HAS_ML_DTYPES else "float16"])
@pytest.mark.parametrize(("dims", "axis"), [((4, 8, 16, 16), 1), ((4, 16, 16, 8), -1), ((1, 64), -1)])
def test_torch_is_timed_and_checked(dims, axis, dtype, restore_threads):
    shape = _bench_cases.Shape("t", dims, axis, "tiny" if dims == (1, 64) else "large")
    request = _request(["torch"], shape=shape.to_json(), dtype=dtype, modes=list(_bench_cases.MODES))
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    try:
        answer = _bench_cases.run_case(request)
    finally:
        torch.set_num_threads(threads)
    for row in answer["rows"]:
        result = row["subjects"]["torch"]
        if dims == (1, 64) and row["mode"] == "forward":  # PyTorch refuses training on one value per channel
            assert result["unsupported"].startswith("ValueError")
            continue
        assert len(result["times_s"]) == 1
        assert result["checks"]
        assert all(c["error"] <= c["tolerance"] for c in result["checks"])


@pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="needs onnxruntime and onnx")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("dims", "axis"), [((4, 8, 16, 16), 1), ((4, 16, 16, 8), -1), ((16, 64), -1)])
def test_onnxruntime_is_timed_and_checked(dims, axis, dtype, threads, restore_threads):
    """Inference and training forward (with the batch mean and variance) against the float64
    reference; its backward is reported as unsupported."""
    shape = _bench_cases.Shape("t", dims, axis, "tiny" if dims == (16, 64) else "large")
    request = _request(
        ["onnxruntime"], shape=shape.to_json(), dtype=dtype, modes=list(_bench_cases.MODES), threads=[threads]
    )
    answer = _bench_cases.run_case(request)
    results = {row["mode"]: row["subjects"]["onnxruntime"] for row in answer["rows"]}
    assert results["backward"]["unsupported"].startswith("NotImplementedError")
    for mode, outputs in (("inference", {"y"}), ("forward", {"y", "mean", "variance"})):
        assert len(results[mode]["times_s"]) == 1
        assert {c["output"] for c in results[mode]["checks"]} == outputs
        assert all(c["error"] <= c["tolerance"] for c in results[mode]["checks"])


@pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="needs onnxruntime and onnx")
def test_onnxruntime_without_a_kernel_is_unsupported():
    """bfloat16 has no CPU kernel in ONNX Runtime: a row says so instead of stopping the run."""
    pytest.importorskip("ml_dtypes")
    answer = _bench_cases.run_case(_request(["onnxruntime"], dtype="bfloat16", modes=["inference"]))
    assert "NOT_IMPLEMENTED" in answer["rows"][0]["subjects"]["onnxruntime"]["unsupported"]


def test_check_outputs_measures_relative_error():
    want = {"y": np.array([1.0, -2.0, 4.0])}
    checks = _bench_cases.check_outputs("s", "inference", "float32", {"y": np.array([1.0, -2.0, 4.0002])}, want)
    assert checks == [{"output": "y", "error": pytest.approx(5e-5), "tolerance": 1e-4}]
    with pytest.raises(_bench.CheckError):
        _bench_cases.check_outputs("s", "inference", "float32", {"y": np.array([1.0, np.nan, 4.0])}, want)


def test_summary_arithmetic():
    """Fraction of the limit and speed-ups from made-up timings (no clock involved)."""
    nbytes = 1000
    timing = {"times_s": [2.0, 1.0, 3.0], "copy_ordinary_s": [1.0, 2.0, 2.0], "copy_nontemporal_s": [4.0, 0.5, 2.0]}
    s = _bench._summarize(timing, 2 * nbytes, nbytes)
    assert s["median_ms"] == 2000.0
    assert s["limit_gbs"] == pytest.approx(2 * nbytes / 0.5 / 1e9)  # the best copy of the window
    assert s["fraction"] == pytest.approx((2 * nbytes / 2.0) / (2 * nbytes / 0.5))
    other = {**s, "fraction": s["fraction"] / 3}
    assert _bench._speedup(s, other) == pytest.approx(3.0)
    assert _bench._speedup({"median_ms": 1.0}, {"median_ms": 5.0}) == 5.0  # tiny shapes: per-call times
    assert _bench._speedup(s, {"unsupported": "x"}) is None


def test_a_disturbed_window_takes_the_best_copy_of_the_case():
    nbytes = 1000
    quiet = {"times_s": [1.0], "copy_ordinary_s": [0.1], "copy_nontemporal_s": [0.05]}  # 40 kB/s
    slowed = {"times_s": [1.0], "copy_ordinary_s": [1.0], "copy_nontemporal_s": [0.5]}  # 4 kB/s
    measured = {
        name: {"inherited": _bench._summarize(t, 2 * nbytes, nbytes)} for name, t in (("a", quiet), ("b", slowed))
    }
    _bench._repair_disturbed_limits(measured, 2 * nbytes)
    a, b = measured["a"]["inherited"], measured["b"]["inherited"]
    assert "limit_disturbed_gbs" not in a
    assert b["limit_disturbed_gbs"] == pytest.approx(4e-6)
    assert b["limit_gbs"] == a["limit_gbs"] == pytest.approx(40e-6)
    assert b["fraction"] == pytest.approx(a["fraction"])


def test_resummarize_reproduces_the_report(quick_run):
    _, report = quick_run
    again = _bench.resummarize(report)
    for old, new in zip(report["results"], again["results"], strict=True):
        assert new["speedup_numpy"] == pytest.approx(old["speedup_numpy"])
        assert new["subjects"]["batchnorm"]["median_ms"] == old["subjects"]["batchnorm"]["median_ms"]


def test_a_row_of_several_rounds_is_their_median_round():
    rows = [{"speedup_torch": v, "subjects": {}, "name": k} for k, v in enumerate([1.2, 0.8, 1.0])]
    chosen = _bench._median_round(rows)
    assert chosen["name"] == chosen["round"] == 2
    assert chosen["speedup_torch_rounds"] == [1.2, 0.8, 1.0]
    assert chosen["rounds"] == rows
    even = [{"speedup_torch": v, "subjects": {}, "name": k} for k, v in enumerate([1.0, 3.0, 2.0, 4.0])]
    assert _bench._median_round(even)["name"] == 2  # the lower median
    assert _bench._median_round(rows[:1]) is rows[0]  # one round: the row unchanged
    no_torch = [{"speedup_torch": None, "subjects": {"batchnorm": {"fraction": f}}, "name": f} for f in (0.9, 0.5, 0.7)]
    assert _bench._median_round(no_torch)["name"] == 0.7


def test_rounds_survive_resummarize_and_show_in_the_table(quick_run):
    """A report whose every row has a second round with batchnorm twice as slow: the lower
    median of two rounds is the slow one, and the table gains the rounds column."""
    _, report = quick_run

    def slowed(e):
        ours = e["subjects"]["batchnorm"]
        policies = {p: {**t, "times_s": [2 * v for v in t["times_s"]]} for p, t in ours["policies"].items()}
        return {**e, "subjects": {**e["subjects"], "batchnorm": {**ours, "policies": policies}}}

    two = {
        **report,
        "meta": {**report["meta"], "options": {**report["meta"]["options"], "rounds": 2}},
        "results": [{**e, "rounds": [e, slowed(e)]} for e in report["results"]],
    }
    again = _bench.resummarize(two)
    for old, new in zip(report["results"], again["results"], strict=True):
        assert new["round"] == 1
        assert new["subjects"]["batchnorm"]["median_ms"] == pytest.approx(2 * old["subjects"]["batchnorm"]["median_ms"])
        assert len(new["rounds"]) == 2
    table = _bench.format_table(again)
    assert "2 rounds over the whole list" in table
    headers = [line for line in table.splitlines() if line.startswith("shape ")]
    assert len(headers) == 2
    assert all(line.split().index("rounds") == line.split().index("x") + 2 for line in headers)  # after "x torch"


def test_bad_options_exit_with_a_message(capsys):
    from batchnorm.__main__ import main

    assert main(["bench", "--quick", "--dtypes", "float8"]) == 2
    assert "unknown dtypes" in capsys.readouterr().err
    assert main(["bench", "--quick", "--modes", "sideways"]) == 2
    assert "--modes" in capsys.readouterr().err
    assert main(["bench", "--quick", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def test_png_needs_matplotlib(tmp_path, capsys):
    if importlib.util.find_spec("matplotlib") is not None:
        report = {
            "meta": {"batchnorm": {"version": "0", "simd": "x"}, "cpu": "cpu"},
            "results": [
                {
                    "shape": {"name": "s", "kind": "large"},
                    "dtype": "float32",
                    "mode": m,
                    "threads": 1,
                    "subjects": {"batchnorm": {"fraction": 0.5}},
                }
                for m in _bench_cases.MODES
            ],
        }
        _bench.save_png(report, str(tmp_path / "chart.png"))
        assert (tmp_path / "chart.png").stat().st_size > 0
    else:
        with pytest.raises(_bench.BenchError, match="pip install matplotlib"):
            _bench._matplotlib()


def test_wrapper_script_reads_the_shapes_file_beside_it(tmp_path):
    (tmp_path / "bench.py").write_text((ROOT / "benchmarks" / "bench.py").read_text())
    (tmp_path / "shapes.txt").write_text("only-this-one  2x3  -1  tiny\n")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "bench.py"), "--shapes", "nothing"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "no shape matches 'nothing'; shapes: only-this-one" in proc.stderr
