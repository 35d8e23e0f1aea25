"""``python -m batchnorm bench``: speed of the three passes as ratios measured in one run.

What is timed, per shape x mode x dtype x thread count:

- **batchnorm**: ``normalize`` (inference), ``forward`` (training forward), ``backward``,
  writing into preallocated outputs (``out=``), so the time is the pass itself;
- **numpy**: a plain float32 NumPy implementation of the same pass;
- **torch**: ``torch.nn.functional.batch_norm`` (eval / training) and
  ``torch.ops.aten.native_batch_norm_backward``, once with the inherited OpenMP wait
  policy and once with ``OMP_WAIT_POLICY=PASSIVE``; the faster of the two is compared;
- **onnxruntime**: ONNX Runtime's CPU ``BatchNormalization`` in a one-node model, on bound
  buffers, for inference and the training forward (``training_mode=1``; it has no backward
  outside its training builds), once with a spinning and once with a non-spinning pool;
- **copy**: next to every repetition, a parallel copy of the same number of bytes with the
  library's threads (``_core.copy_memory``), once with ordinary and once with
  non-temporal stores: the bandwidth a single streaming pass can reach at that moment.

The byte model gives the minimum traffic of a pass if nothing stays in cache (B = bytes
of x): inference 2B, training forward 3B, backward 5B. The *fraction of the limit* is
``(model bytes / median time) / (best copy bandwidth next to those repetitions)`` with
``copy bandwidth = 2 * bytes / time``. Each implementation is divided by copies timed
within the same few seconds, so the memory bandwidth's drift over minutes cancels out,
and speed-ups over PyTorch and NumPy are ratios of those fractions (for tiny shapes, of
median per-call times).

Every implementation runs in a worker process of its own (torch's OpenMP runtime and
ours never spin against each other, and the two wait policies need two processes). In
the workers, glibc keeps freed memory (``GLIBC_TUNABLES`` malloc.mmap_max=0 and a huge
trim threshold), as a caching allocator would: outputs that PyTorch and NumPy allocate
per call then cost no page faults, only the pass. Inputs rotate over as many buffers as
it takes to pass ``--footprint`` MiB of x (default 512 MiB, above every L3 size this
machine reports), so every call starts with its data in memory, not in cache.

Each implementation's result is checked once per case against a float64 NumPy
reference, outside the timed region; a mismatch stops the run with an error.

``--torch`` compares batchnorm.torch's modules with torch's in one worker (bench_torch.py)
through the same run loop, copies, summaries and table; ``--resnet`` times a ResNet-50 end
to end (bench_resnet.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from . import _args
from .bench_cases import (
    DTYPES,
    MODE_BYTES,
    MODES,
    MODULE_MODES,
    BenchError,
    CheckError,
    Shape,
    available_dtypes,
)

__all__ = ["BenchError", "CheckError", "Options", "Shape", "format_table", "main", "parse_shapes", "run"]

MODE_LABEL = {
    "inference": "infer",
    "forward": "train-fwd",
    "backward": "backward",
    "train-step": "train-step",
    "eval": "eval",
}
_MIB = 1 << 20

# The shapes of the full run; benchmarks/shapes.txt holds the same table (a test checks).
# kind "large": bandwidth-bound, timed with a copy next to each repetition;
# kind "tiny": per-call overhead, many calls per repetition, no copy and no fraction.
DEFAULT_SHAPES = """\
# name            shape            axis  kind
r50-112-nchw      32x64x112x112    1     large
r50-56-nchw       32x256x56x56     1     large
r50-28-nchw       32x512x28x28     1     large
r50-7-nchw        32x2048x7x7      1     large
r50-112-nhwc      32x112x112x64    -1    large
r50-56-nhwc       32x56x56x256     -1    large
r50-28-nhwc       32x28x28x512     -1    large
r50-7-nhwc        32x7x7x2048      -1    large
dense-4096x1024   4096x1024        -1    large
dense-256x4096    256x4096         -1    large
seq-64x256x128    64x256x128       1     large
seq-64x128x256    64x128x256       -1    large
seq-512x64x32     512x64x32        1     large
seq-512x32x64     512x32x64        -1    large
small-8x256x14    8x256x14x14      1     large
tiny-1x64         1x64             -1    tiny
tiny-16x64        16x64            -1    tiny
"""

QUICK_SHAPES = """\
# name            shape            axis  kind
quick-nchw        4x16x32x32       1     large
quick-nhwc        4x32x32x16       -1    large
quick-dense       512x64           -1    large
tiny-16x64        16x64            -1    tiny
"""

# bench --torch adds the first stage of ResNet-50 (64 channels at 56x56) and a sequence batch
# (N, C, L) for BatchNorm1d.
TORCH_SHAPES = (
    DEFAULT_SHAPES
    + """\
r50-56x64-nchw    32x64x56x56      1     large
r50-56x64-nhwc    32x56x56x64      -1    large
seq-ncl           32x256x1024      1     large
"""
)
TORCH_QUICK_SHAPES = (
    QUICK_SHAPES
    + """\
quick-ncl         4x16x64          1     large
"""
)


# ---- shapes ---------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[Shape]:
    """Shapes from a table: ``name  NxCxHxW  axis  kind`` per line, ``#`` starts a comment."""
    shapes = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 4:
            raise BenchError(f"shapes line {number}: expected 'name shape axis kind', got {raw!r}")
        name, dims_text, axis_text, kind = fields
        try:
            dims = tuple(int(d) for d in dims_text.lower().split("x"))
            axis = int(axis_text)
        except ValueError:
            raise BenchError(f"shapes line {number}: bad shape or axis in {raw!r}") from None
        if len(dims) < 2 or min(dims) < 1 or not -len(dims) <= axis < len(dims):
            raise BenchError(f"shapes line {number}: shape {dims_text} with axis {axis} is not a batch of channels")
        if kind not in ("large", "tiny"):
            raise BenchError(f"shapes line {number}: kind must be 'large' or 'tiny', got {kind!r}")
        shapes.append(Shape(name, dims, axis, kind))
    return shapes


def select_shapes(shapes: list[Shape], patterns: str | None) -> list[Shape]:
    """The shapes whose names match any comma-separated pattern (fnmatch, or a substring)."""
    if not patterns:
        return shapes
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in shapes if any(fnmatch.fnmatch(s.name, p) or p in s.name for p in wanted)]
    if not chosen:
        raise BenchError(f"no shape matches {patterns!r}; shapes: {', '.join(s.name for s in shapes)}")
    return chosen


# ---- worker processes -----------------------------------------------------------------------

# Freed memory stays in the process (no mmap for large blocks, no trimming), so outputs a
# library allocates per call are recycled without page faults, as a caching allocator does.
_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4611686018427387904"


class _Worker:
    def __init__(
        self, name: str, subjects: list[str], policy: str, env: dict[str, str], entry: str = "bench_cases:worker_main"
    ) -> None:
        self.name = name
        self.subjects = subjects
        self.policy = policy
        module, function = entry.split(":")  # a function of batchnorm.tools that serves requests
        code = f"from batchnorm.tools.{module} import {function}; {function}()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(json.dumps({**request, "subjects": self.subjects}) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise BenchError(f"the {self.name} worker died (exit code {self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if not answer.pop("ok"):
            kind = CheckError if answer["check_failed"] else BenchError
            raise kind(f"[{self.name} worker] {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def _worker_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    tunables = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{tunables}:{_MALLOC_TUNABLES}" if tunables else _MALLOC_TUNABLES
    env.update(extra)
    return env


# ---- the run --------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    shapes: list[Shape]
    modes: tuple[str, ...] = MODES
    dtypes: tuple[str, ...] = ("float32",)
    threads: tuple[int, ...] = (1, 2)
    repeats: int = 11
    warmup: int = 2
    footprint_mib: float = 512.0
    gap_ms: float = 12.0
    numpy: bool = True
    torch: bool = True
    onnxruntime: bool = True
    seed: int = 0
    progress: bool = True
    rounds: int = 1
    modules: bool = False  # bench --torch: batchnorm.torch's modules against torch's, in one process


def _median(values: Sequence[float] | np.ndarray) -> float:
    return float(np.median(np.asarray(values, np.float64)))


def _summarize(timing: dict[str, Any], model_bytes: int, nbytes: int) -> dict[str, Any]:
    """Medians from one subject's timings: ms and the fraction of the limit.

    The limit is the best copy bandwidth among the copies timed next to this subject's
    repetitions (both kinds of stores): a copy can be slowed down by other processes or
    a late thread, never sped up, and the window of a few seconds is too short for the
    memory bandwidth to drift. ``fraction_paired`` is the median of the per-repetition
    ratios instead, for comparison.
    """
    if "unsupported" in timing:
        return timing
    times = np.asarray(timing["times_s"], np.float64)
    summary = {**timing, "median_ms": _median(times) * 1e3}
    if "copy_ordinary_s" in timing:
        ordinary = np.asarray(timing["copy_ordinary_s"], np.float64)
        nontemporal = np.asarray(timing["copy_nontemporal_s"], np.float64)
        fastest = np.minimum(ordinary, nontemporal)
        limit = 2 * nbytes / float(fastest.min())
        summary["limit_gbs"] = limit / 1e9
        summary["fraction"] = model_bytes / _median(times) / limit
        summary["fraction_paired"] = _median((model_bytes / times) / (2 * nbytes / fastest))
        summary["copy_ordinary_gbs"] = 2 * nbytes / float(ordinary.min()) / 1e9
        summary["copy_nontemporal_gbs"] = 2 * nbytes / float(nontemporal.min()) / 1e9
    return summary


def _speedup(ours: dict[str, Any] | None, other: dict[str, Any] | None) -> float | None:
    """How many times faster `ours` is: a ratio of fractions of the limit where both have
    one (each normalized by its own adjacent copies), else of median times."""
    if not ours or not other or "median_ms" not in ours or "median_ms" not in other:
        return None
    if "fraction" in ours and "fraction" in other:
        return float(ours["fraction"] / other["fraction"])
    return float(other["median_ms"] / ours["median_ms"])


def machine_info() -> dict[str, Any]:
    import batchnorm as bn

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    caches = {}
    for level, name in ((2, "L2"), (3, "L3")):
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/sys/devices/system/cpu/cpu0/cache/index{level}/size", encoding="utf-8") as f,
        ):
            caches[f"{name}_sysfs_kib"] = int(f.read().strip().rstrip("K"))
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):  # glibc's CPUID answer
            answer = subprocess.run(
                ["getconf", f"LEVEL{level}_CACHE_SIZE"], capture_output=True, text=True, timeout=10, check=True
            )
            caches[f"{name}_getconf_kib"] = int(answer.stdout.strip()) // 1024
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for module in ("torch", "onnxruntime", "onnx", "ml_dtypes", "matplotlib"):
        if importlib.util.find_spec(module) is not None:
            with contextlib.suppress(Exception):
                versions[module] = str(importlib.import_module(module).__version__)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "batchnorm": bn.info(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "caches": caches,
        "versions": versions,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_average": list(load) if load else None,
    }


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _workers(options: Options, dtypes: Sequence[str]) -> Iterator[list[_Worker]]:
    """One process per (implementation, OpenMP wait policy): the inherited policy and PASSIVE.

    The module comparison (bench --torch) has one process, both subjects in it, called in
    turn with --gap before each call; its wait policy is the environment's."""
    if options.modules:
        worker = _Worker("torch-modules", ["batchnorm", "torch"], "inherited", _worker_env({}), "bench_torch:main")
        try:
            yield [worker]
        finally:
            _close(worker)
        return
    ours = ["batchnorm"] + (["numpy"] if options.numpy and "float32" in dtypes else [])
    plan = [("batchnorm", ours, "inherited"), ("batchnorm-passive", ["batchnorm"], "passive")]
    if options.torch:
        plan += [("torch", ["torch"], "inherited"), ("torch-passive", ["torch"], "passive")]
    if options.onnxruntime:
        plan += [("onnxruntime", ["onnxruntime"], "inherited"), ("onnxruntime-passive", ["onnxruntime"], "passive")]
    workers: list[_Worker] = []
    try:
        for name, subjects, policy in plan:
            extra = {"OMP_WAIT_POLICY": "PASSIVE"} if policy == "passive" else {}
            workers.append(_Worker(name, subjects, policy, _worker_env(extra)))
        yield workers
    finally:
        for w in workers:
            _close(w)


def _close(worker: _Worker) -> None:
    with contextlib.suppress(Exception):
        worker.close()
    if worker.process.poll() is None:
        worker.process.kill()


def _check_dtypes(dtypes: tuple[str, ...]) -> None:
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        raise BenchError(f"unknown dtypes {sorted(unknown)}; choose from {', '.join(DTYPES)}")
    missing = set(dtypes) - set(available_dtypes())
    if missing:
        raise BenchError(f"dtypes {sorted(missing)} need ml_dtypes: pip install ml_dtypes")


def run(options: Options) -> dict[str, Any]:
    """Runs the benchmark; returns the report (meta + one entry per shape/dtype/mode/threads)."""
    _check_dtypes(options.dtypes)
    if options.modules and importlib.util.find_spec("torch") is None:
        raise BenchError("--torch needs PyTorch: pip install torch")
    if options.torch and importlib.util.find_spec("torch") is None:
        options = dataclasses.replace(options, torch=False)
    if options.onnxruntime and not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx")):
        options = dataclasses.replace(options, onnxruntime=False)
    meta = machine_info()
    meta["options"] = {
        "modes": list(options.modes),
        "dtypes": list(options.dtypes),
        "threads": list(options.threads),
        "repeats": options.repeats,
        "warmup": options.warmup,
        "footprint_mib": options.footprint_mib,
        "gap_ms": options.gap_ms,
        "numpy": options.numpy,
        "torch": options.torch,
        "onnxruntime": options.onnxruntime,
        "seed": options.seed,
        "rounds": options.rounds,
        "modules": options.modules,
    }
    meta["command"] = " ".join(["python -m batchnorm bench", *sys.argv[1:]]) if sys.argv else None
    rounds: list[list[dict[str, Any]]] = []
    started = time.perf_counter()
    with _workers(options, options.dtypes) as workers:
        cases = [(s, d) for s in options.shapes for d in options.dtypes]
        for round_number in range(1, options.rounds + 1):
            entries = []
            prefix = f"[round {round_number}/{options.rounds}] " if options.rounds > 1 else ""
            for number, (shape, dtype) in enumerate(cases, 1):
                request = {
                    "shape": shape.to_json(),
                    "dtype": dtype,
                    "modes": list(options.modes),
                    "threads": list(options.threads),
                    "repeats": options.repeats,
                    "warmup": options.warmup,
                    "footprint_bytes": int(options.footprint_mib * _MIB),
                    "gap_s": options.gap_ms / 1e3,
                    "seed": options.seed,
                }
                answers = []
                case_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                for w in workers:
                    _progress(options.progress, f"{prefix}[{number}/{len(cases)}] {shape.name} {dtype}: {w.name}")
                    answers.append((w.policy, w.run(request)))
                for entry in _merge(shape, dtype, answers):
                    entries.append({**entry, "load_average": case_load})
            rounds.append(entries)
    meta["seconds"] = time.perf_counter() - started
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta["load_average_end"] = list(load) if load else None
    return {"meta": meta, "results": [_median_round(list(same)) for same in zip(*rounds, strict=True)]}


def _best(policies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary of the faster policy, with every policy's summary under "policies"."""
    timed = {p: t for p, t in policies.items() if "median_ms" in t}
    if not timed:
        return {"unsupported": next(iter(policies.values()))["unsupported"], "policies": policies}
    best = max(timed, key=lambda p: timed[p].get("fraction", 1.0 / timed[p]["median_ms"]))
    return {**timed[best], "policy": best, "policies": policies}


# A window whose best copy stays under this share of the best copy of the other windows
# of the same case (same minute, same threads) was disturbed throughout: every one of its
# copies waited for a descheduled thread. Its limit is replaced by the case's best.
DISTURBED_WINDOW = 0.5


def _repair_disturbed_limits(measured: dict[str, dict[str, dict[str, Any]]], model_bytes: int) -> None:
    summaries = [t for policies in measured.values() for t in policies.values() if "limit_gbs" in t]
    if not summaries:
        return
    best = max(t["limit_gbs"] for t in summaries)
    for t in summaries:
        if t["limit_gbs"] < DISTURBED_WINDOW * best:
            t["limit_disturbed_gbs"] = t["limit_gbs"]
            t["limit_gbs"] = best
            t["fraction"] = model_bytes / (t["median_ms"] / 1e3) / (best * 1e9)


def _entry(
    shape: dict[str, Any], dtype: str, *, mode: str, threads: int, nbytes: int, buffers: int, measured: dict[str, Any]
) -> dict[str, Any]:
    """One row of the report from each implementation's summaries under each wait policy."""
    model_bytes = MODE_BYTES[mode] * nbytes
    _repair_disturbed_limits(measured, model_bytes)
    subjects = {name: _best(policies) for name, policies in measured.items()}
    ours = subjects["batchnorm"]
    return {
        "shape": shape,
        "layout": Shape(shape["name"], tuple(shape["dims"]), shape["axis"], shape["kind"]).layout,
        "dtype": dtype,
        "mode": mode,
        "threads": threads,
        "bytes": nbytes,
        "model_bytes": model_bytes,
        "buffers": buffers,
        "subjects": subjects,
        "speedup_torch": _speedup(ours, subjects.get("torch")),
        "speedup_onnxruntime": _speedup(ours, subjects.get("onnxruntime")),
        "speedup_numpy": _speedup(ours, subjects.get("numpy")),
    }


def _merge(shape: Shape, dtype: str, answers: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per (mode, threads) from the workers' answers on one (shape, dtype)."""
    first = answers[0][1]
    nbytes = first["bytes"]
    entries = []
    for index, row in enumerate(first["rows"]):
        model_bytes = MODE_BYTES[row["mode"]] * nbytes
        measured: dict[str, dict[str, dict[str, Any]]] = {}
        for policy, answer in answers:
            for name, timing in answer["rows"][index]["subjects"].items():
                measured.setdefault(name, {})[policy] = _summarize(timing, model_bytes, nbytes)
        entries.append(
            _entry(
                shape.to_json(),
                dtype,
                mode=row["mode"],
                threads=row["threads"],
                nbytes=nbytes,
                buffers=first["buffers"],
                measured=measured,
            )
        )
    return entries


def _round_key(entry: dict[str, Any]) -> float:
    """What the rounds of one row are ranked by: the speed-up over PyTorch, else our fraction
    of the limit, else our speed (tiny shapes without PyTorch)."""
    if entry.get("speedup_torch") is not None:
        return float(entry["speedup_torch"])
    ours = entry["subjects"]["batchnorm"]
    if "fraction" in ours:
        return float(ours["fraction"])
    return 1.0 / ours["median_ms"] if "median_ms" in ours else 0.0  # 0: it could not run


def _median_round(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from its rounds: the round with the median speed-up over PyTorch (the lower
    median for an even count), so every figure in the row comes from one round; the rounds
    are kept under "rounds", and "speedup_torch_rounds" lists each round's speed-up."""
    if len(entries) == 1:
        return entries[0]
    order = sorted(range(len(entries)), key=lambda k: _round_key(entries[k]))
    chosen = order[(len(entries) - 1) // 2]
    return {
        **entries[chosen],
        "round": chosen,
        "rounds": entries,
        "speedup_torch_rounds": [e.get("speedup_torch") for e in entries],
    }


def resummarize(report: dict[str, Any]) -> dict[str, Any]:
    """The report recomputed from the raw timings it holds (after a change of the summary rules)."""
    return {**report, "results": [_resummarize_row(e) for e in report["results"]]}


def _resummarize_row(e: dict[str, Any]) -> dict[str, Any]:
    if "rounds" in e:
        return _median_round([_resummarize_row(r) for r in e["rounds"]])
    measured = {
        name: {
            policy: _summarize(
                {k: v for k, v in t.items() if k in _RAW_KEYS}, MODE_BYTES[e["mode"]] * e["bytes"], e["bytes"]
            )
            for policy, t in subject["policies"].items()
        }
        for name, subject in e["subjects"].items()
    }
    entry = _entry(
        e["shape"],
        e["dtype"],
        mode=e["mode"],
        threads=e["threads"],
        nbytes=e["bytes"],
        buffers=e["buffers"],
        measured=measured,
    )
    return {**entry, "load_average": e.get("load_average")}


_RAW_KEYS = (
    "times_s",
    "calls_per_rep",
    "warmup_calls",
    "copy_ordinary_s",
    "copy_nontemporal_s",
    "checks",
    "unsupported",
)


# ---- output ---------------------------------------------------------------------------------


def _fmt_time(ms: float | None, per_call: bool = False) -> str:
    """A time in us, ms: us below 0.1 ms, and below 10 ms for `per_call` (tiny shapes' cost per call)."""
    if ms is None:
        return "-"
    if per_call and ms < 10:
        return f"{ms * 1e3:.1f} us"
    if ms < 0.1:
        return f"{ms * 1e3:.2f} us"
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _span(values: list[float | None] | None) -> str:
    """The lowest and highest of the rounds' values: "0.87-1.10"."""
    known = [v for v in values or [] if v is not None]
    return f"{min(known):.2f}-{max(known):.2f}" if known else "-"


def header(report: dict[str, Any]) -> str:
    meta = report["meta"]
    info = meta["batchnorm"]
    v = meta["versions"]
    caches = meta["caches"]
    l3 = [f"{caches[k] // 1024} MiB ({k.split('_')[1]})" for k in ("L3_sysfs_kib", "L3_getconf_kib") if k in caches]
    opts = meta["options"]
    load, end = meta.get("load_average"), meta.get("load_average_end")
    rounds = opts.get("rounds", 1)
    lines = [
        f"batchnorm {info['version']}: ISA {info['simd']} (CPU supports {', '.join(info['simd_supported'])}), "
        f"OpenMP {'on' if info['openmp'] else 'off'}, {info['compiler']}",
        f"CPU {meta['cpu']}, {meta['logical_cpus']} logical CPUs, L3 reported {' / '.join(l3) or 'unknown'}",
        "Python {}, NumPy {}, PyTorch {}, ONNX Runtime {}, ml_dtypes {}".format(
            v["python"],
            v["numpy"],
            v.get("torch", "not installed"),
            v.get("onnxruntime", "not installed"),
            v.get("ml_dtypes", "not installed"),
        ),
        f"threads {', '.join(map(str, opts['threads']))}; medians of {opts['repeats']} repetitions after "
        f"{opts['warmup']} warm-up; inputs rotate over >= {opts['footprint_mib']:g} MiB of x; "
        f"{opts['gap_ms']:g} ms sleep before copies and calls at 2+ threads; OMP_WAIT_POLICY "
        f"{meta['omp_wait_policy']}; load average {_fmt(load[0] if load else None, '.2f')} at start, "
        f"{_fmt(end[0] if end else None, '.2f')} at end",
        (
            "batchnorm.torch's module (convert of a deep copy) against torch.nn.BatchNorm*d, in one process, "
            "called in turn (reversed every other repetition) after the same copies; "
            "train-step: y = m(x); y.backward(g); eval: m(x) under no_grad"
            if opts.get("modules")
            else ""
        ),
        "lim = (model bytes / median time) / best copy bandwidth (ordinary or non-temporal stores, "
        "same threads) timed next to the repetitions; model bytes: "
        + ", ".join(f"{MODE_LABEL[m]} {MODE_BYTES[m]}B" for m in opts.get("modes", MODES)),
        "wp = the faster OpenMP wait policy (i inherited, p PASSIVE); x torch, x ort, x numpy = times faster "
        "than PyTorch, ONNX Runtime, plain NumPy; * = every copy next to it was slowed, the limit is the "
        "case's best copy; n/a = the library cannot do it",
        (
            f"{rounds} rounds over the whole list; each row is the round with the median x torch, "
            "and 'rounds' gives the lowest and highest x torch of the rounds"
            if rounds > 1
            else ""
        ),
    ]
    return "\n".join(line for line in lines if line)


def format_table(report: dict[str, Any]) -> str:
    """The results as a plain-text table, grouped by thread count."""
    columns = (
        ("shape", "<"),
        ("layout", "<"),
        ("dtype", "<"),
        ("mode", "<"),
        ("batchnorm", ">"),
        ("lim", ">"),
        ("wp", "<"),
        ("torch", ">"),
        ("lim", ">"),
        ("wp", "<"),
        ("x torch", ">"),
        ("rounds", ">"),
        ("ort", ">"),
        ("x ort", ">"),
        ("numpy", ">"),
        ("x numpy", ">"),
        ("copy GB/s ord/nt", ">"),
    )
    out = [header(report)]
    results = report["results"]
    with_rounds = any("rounds" in e for e in results)
    with_ort = any("onnxruntime" in e["subjects"] for e in results)
    with_numpy = any("numpy" in e["subjects"] for e in results)
    hidden = (
        ({"rounds"} if not with_rounds else set())
        | ({"ort", "x ort"} if not with_ort else set())
        | ({"numpy", "x numpy"} if not with_numpy else set())
    )
    for threads in sorted({e["threads"] for e in results}, reverse=True):
        rows: list[tuple[str, ...]] = []
        for e in (e for e in results if e["threads"] == threads):
            ours, torch, ort, numpy = (e["subjects"].get(k, {}) for k in ("batchnorm", "torch", "onnxruntime", "numpy"))
            tiny = e["shape"]["kind"] == "tiny"
            copy = (
                f"{ours['copy_ordinary_gbs']:.0f}/{ours['copy_nontemporal_gbs']:.0f}"
                if "copy_ordinary_gbs" in ours
                else "-"
            )
            rows.append(
                (
                    e["shape"]["name"],
                    e["layout"],
                    e["dtype"],
                    MODE_LABEL[e["mode"]],
                    "n/a" if "unsupported" in ours else _fmt_time(ours.get("median_ms"), tiny),
                    _fmt(ours.get("fraction"), ".2f") + ("*" if "limit_disturbed_gbs" in ours else ""),
                    ours.get("policy", "-")[:1],
                    "n/a" if "unsupported" in torch else _fmt_time(torch.get("median_ms"), tiny),
                    _fmt(torch.get("fraction"), ".2f") + ("*" if "limit_disturbed_gbs" in torch else ""),
                    torch.get("policy", "-")[:1],
                    _fmt(e["speedup_torch"], ".2f"),
                    _span(e.get("speedup_torch_rounds")),
                    "n/a" if "unsupported" in ort else _fmt_time(ort.get("median_ms"), tiny),
                    _fmt(e.get("speedup_onnxruntime"), ".2f"),
                    _fmt_time(numpy.get("median_ms"), tiny),
                    _fmt(e["speedup_numpy"], ".1f"),
                    copy,
                )
            )
        keep = [k for k, c in enumerate(columns) if c[0] not in hidden]
        out.append("")
        out.append(f"threads = {threads}")
        out.extend(text_table([columns[k] for k in keep], [tuple(r[k] for k in keep) for r in rows]))
    return "\n".join(out)


def text_table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table: (title, alignment '<' or '>') per column, a rule, the rows."""
    widths = [max(len(c[0]), *(len(r[k]) for r in rows)) for k, c in enumerate(columns)]
    lines = ["  ".join(f"{c[0]:{c[1]}{w}}" for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(f"{v:{c[1]}{w}}" for v, c, w in zip(r, columns, widths, strict=True)) for r in rows)
    return lines


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise BenchError("--png needs matplotlib: pip install matplotlib") from None


def save_png(report: dict[str, Any], path: str) -> None:
    """A bar chart of the fraction of the limit per shape: one panel per (threads, mode)."""
    plt = _matplotlib()
    results = [e for e in report["results"] if e["shape"]["kind"] == "large"]
    if not results:
        raise BenchError("no bandwidth-bound shape in the results: nothing to chart")
    threads_list = sorted({e["threads"] for e in results}, reverse=True)
    modes = list(dict.fromkeys(e["mode"] for e in results))
    names = list(dict.fromkeys(e["shape"]["name"] for e in results))
    series = [
        (subject, dtype)
        for subject in ("batchnorm", "torch", "onnxruntime", "numpy")
        for dtype in dict.fromkeys(e["dtype"] for e in results)
        if any(
            subject in e["subjects"] and "fraction" in e["subjects"][subject] and e["dtype"] == dtype for e in results
        )
    ]
    fig, axes = plt.subplots(
        len(threads_list), len(modes), figsize=(5.5 * len(modes), 3.6 * len(threads_list)), squeeze=False
    )
    width = 0.8 / max(len(series), 1)
    for row, threads in enumerate(threads_list):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            for k, (subject, dtype) in enumerate(series):
                values = []
                for name in names:
                    match = [
                        e
                        for e in results
                        if e["threads"] == threads
                        and e["mode"] == mode
                        and e["dtype"] == dtype
                        and e["shape"]["name"] == name
                    ]
                    values.append(match[0]["subjects"].get(subject, {}).get("fraction", 0.0) if match else 0.0)
                ax.bar(np.arange(len(names)) + k * width, values, width, label=f"{subject} {dtype}")
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_title(f"{MODE_LABEL[mode]}, {threads} thread{'s' if threads > 1 else ''}")
            ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("fraction of copy limit")
    handles, labels = axes[0][0].get_legend_handles_labels()  # below the panels, clear of the bars
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    info = report["meta"]["batchnorm"]
    fig.suptitle(f"batchnorm {info['version']} ({info['simd']}) vs a copy of the same bytes, {report['meta']['cpu']}")
    fig.tight_layout(rect=(0, 0.05 + 0.02 * ((len(labels) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=110, format="png")  # saved under `path` exactly, as checked before the run
    plt.close(fig)


# ---- command line ---------------------------------------------------------------------------


MAX_THREADS = 1024  # more is a typo: OpenMP would try to start them all
MAX_SHAPES_FILE = 1 << 20  # bytes of a shapes table (the built-in one is a few KB)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected integers from 1 to {MAX_THREADS}, got {text!r}")
    return values


def _read_shapes_file(path: str) -> list[Shape]:
    """The shapes table in `path`; an unreadable, binary or oversized file is a BenchError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SHAPES_FILE + 1)
    except OSError as e:
        raise BenchError(f"--shapes-file {path!r}: {e.strerror or e}") from None
    if len(data) > MAX_SHAPES_FILE:
        raise BenchError(f"--shapes-file {path!r} is larger than {MAX_SHAPES_FILE} bytes: not a shapes table")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BenchError(f"--shapes-file {path!r} is not a text file") from None
    return parse_shapes(text)


def _check_memory(shapes: list[Shape]) -> None:
    """Refuses a shape whose float32 x alone would take more than a quarter of the memory:
    a run holds several buffers of it (x, dy, outputs)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound known
        return
    for s in shapes:
        need = math.prod(s.dims) * 4
        if need > total // 4:
            raise BenchError(
                f"shape {s.name} ({s.label}) needs {need / 2**30:.1f} GiB per float32 buffer; "
                f"this machine has {total / 2**30:.1f} GiB"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few small shapes and 3 repetitions (CI smoke run)")
    parser.add_argument("--shapes", help="comma-separated name patterns to keep, e.g. 'r50-*-nchw,tiny*'")
    parser.add_argument(
        "--shapes-file", help="a shapes table (name shape axis kind per line) instead of the built-in one"
    )
    parser.add_argument(
        "--modes",
        help=f"comma-separated subset of {','.join(MODES)} (with --torch: of {','.join(MODULE_MODES)}; default all)",
    )
    parser.add_argument(
        "--dtypes",
        help="comma-separated: float32,float16,bfloat16 (default: all available, with --torch float32,bfloat16; "
        "bfloat16 needs ml_dtypes)",
    )
    parser.add_argument("--threads", type=_int_list, default=(1, 2), help="comma-separated thread counts (default 1,2)")
    parser.add_argument(
        "--repeats", type=int, help="timed repetitions per case; the median is reported (default 11; --resnet 5)"
    )
    parser.add_argument("--warmup", type=int, help="untimed repetitions first (default 2; --resnet 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole list N times; each row is the round with the median speed-up over PyTorch (default 1)",
    )
    parser.add_argument(
        "--footprint", type=_args.number(0.0), help="MiB of x the rotating input buffers span (default 512)"
    )
    parser.add_argument(
        "--gap",
        type=_args.number(0.0),
        default=12.0,
        metavar="MS",
        help="sleep before each copy and each timed call at 2+ threads, so that no spinning OpenMP "
        "thread is left over from the step before (default 12 ms; libgomp spins about 8 ms)",
    )
    parser.add_argument(
        "--torch",
        action="store_true",
        help="instead: batchnorm.torch's BatchNorm1d/2d/3d against torch.nn's, training step and eval, "
        "interleaved in one process (the bench's shapes and ResNet-50's 32x64x56x56; --quick: small ones)",
    )
    parser.add_argument(
        "--resnet",
        action="store_true",
        help="instead: a ResNet-50 training step (SGD) and inference, torch's batch norm against "
        "batchnorm.torch.convert(model), eager and torch.compile, at the largest --threads "
        "(--modes train-step,eval, --repeats, --warmup, --gap, --seed, --json apply)",
    )
    parser.add_argument("--resnet-batch", type=int, default=16, metavar="N", help="ResNet-50 batch size (default 16)")
    parser.add_argument("--resnet-size", type=int, default=112, metavar="PX", help="ResNet-50 image side (default 112)")
    parser.add_argument("--no-compile", action="store_true", help="ResNet-50: eager only, no torch.compile")
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--no-onnxruntime", action="store_true", help="do not time ONNX Runtime")
    parser.add_argument("--no-numpy", action="store_true", help="do not time the NumPy implementation")
    parser.add_argument(
        "--json", metavar="PATH", type=_args.writable, help="save the full report (every timing) as JSON"
    )
    parser.add_argument(
        "--png", metavar="PATH", type=_args.writable, help="save a bar chart of the fractions of the limit (matplotlib)"
    )
    parser.add_argument("--seed", type=_args.integer("--seed", 0, 2**63 - 1), default=0, help="seed of the input data")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def options_from_args(args: argparse.Namespace) -> Options:
    modules = bool(args.torch)
    if args.shapes_file:
        table = _read_shapes_file(args.shapes_file)
    elif modules:
        table = parse_shapes(TORCH_QUICK_SHAPES if args.quick else TORCH_SHAPES)
    else:
        table = parse_shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    allowed = MODULE_MODES if modules else MODES
    modes = tuple(m.strip() for m in (args.modes or ",".join(allowed)).split(",") if m.strip())
    if not modes or set(modes) - set(allowed):
        raise BenchError(f"--modes takes a comma-separated subset of {','.join(allowed)}, got {args.modes!r}")
    default_dtypes = [d for d in available_dtypes() if not modules or d != "float16"]
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip()) if args.dtypes else tuple(default_dtypes)
    repeats = args.repeats if args.repeats is not None else 3 if args.quick else 11
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    footprint = args.footprint if args.footprint is not None else 8.0 if args.quick else 512.0
    if repeats < 1 or args.rounds < 1 or warmup < 0 or footprint < 0 or args.gap < 0:
        raise BenchError("--repeats and --rounds must be >= 1, --warmup, --footprint and --gap >= 0")
    _check_dtypes(dtypes)
    if args.png:
        _matplotlib()  # before the run, not after it
    shapes = select_shapes(table, args.shapes)
    _check_memory(shapes)
    return Options(
        shapes=shapes,
        modes=modes,
        dtypes=dtypes,
        threads=args.threads,
        repeats=repeats,
        warmup=warmup,
        footprint_mib=footprint,
        gap_ms=args.gap,
        numpy=not (args.no_numpy or modules),
        torch=not args.no_torch or modules,
        onnxruntime=not (args.no_onnxruntime or modules),
        seed=args.seed,
        progress=not args.quiet,
        rounds=args.rounds,
        modules=modules,
    )


def main(args: argparse.Namespace, stream: IO[str] | None = None, options: Options | None = None) -> int:
    """``python -m batchnorm bench``: runs, prints the table, saves JSON/PNG if asked
    (``options``: ``options_from_args(args)``, if already made)."""
    stream = stream or sys.stdout
    table = format_table
    try:
        if args.resnet:
            from . import bench_resnet  # it builds on this module

            if args.png:
                raise BenchError("--png charts fractions of the copy limit, which --resnet does not measure")
            report, table = bench_resnet.run(args), bench_resnet.format_table
        else:
            options = options or options_from_args(args)
            report = run(options)
    except CheckError as e:
        print(f"bench: CHECK FAILED: {e}", file=sys.stderr)
        return 1
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    print(table(report), file=stream)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    if args.png:
        save_png(report, args.png)
    return 0
