"""``python -m batchnorm bench --resnet``: a ResNet-50 end to end, torch's batch norm against
``batchnorm.torch.convert(model)``.

The network is defined here (torchvision is not needed): bottleneck blocks [3, 4, 6, 3],
conv -> BN -> ReLU, 1000 classes. The converted model is a deep copy of the first, so both
start from the same weights. For each variant (eager, then ``torch.compile`` of each model)
and mode, both models are warmed up (compiling on the first call), then called in turn
(ours, torch's, torch's, ours, ...) with ``--gap`` of sleep before each call at 2+ threads:

- **train-step**: SGD with momentum, ``zero_grad``, forward, cross-entropy, backward, step;
- **eval**: the forward in eval mode under ``torch.no_grad()``.

It runs in a worker process with the allocator settings of the other benchmarks, at the
largest of ``--threads``. Before timing, the two models' logits (training mode) are compared.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import sys
import time
from typing import Any

from .bench import (
    BenchError,
    CheckError,
    _close,
    _fmt,
    _fmt_time,
    _median,
    _Worker,
    _worker_env,
    machine_info,
    text_table,
)
from .bench_cases import set_threads, turns, worker_main

SUBJECTS = ("batchnorm", "torch")  # the order of the calls in the first repetition
# The two models' logits may differ by float32 rounding through 53 batch norms.
TOLERANCE = 1e-3


def resnet50(num_classes: int = 1000) -> Any:
    """ResNet-50 (v1.5: the stride in the 3x3 convolution) with torch.nn.BatchNorm2d."""
    nn: Any = importlib.import_module("torch.nn")

    def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[Any]:
        return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]

    class Bottleneck(nn.Module):  # type: ignore[misc]
        def __init__(self, c_in: int, width: int, stride: int) -> None:
            super().__init__()
            c_out = 4 * width
            self.body = nn.Sequential(
                *conv_bn(c_in, width, 1),
                nn.ReLU(inplace=True),
                *conv_bn(width, width, 3, stride),
                nn.ReLU(inplace=True),
                *conv_bn(width, c_out, 1),
            )
            changed = stride != 1 or c_in != c_out
            self.shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if changed else nn.Identity()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Any) -> Any:
            return self.relu(self.body(x) + self.shortcut(x))

    layers = [*conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(blocks):
            layers.append(Bottleneck(c_in, width, 2 if block == 0 and stage > 0 else 1))
            c_in = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def converted(model: Any) -> Any:
    """Ours: batchnorm.torch.convert of a deep copy (the same weights, tensors of its own)."""
    bnt: Any = importlib.import_module("batchnorm.torch")
    return bnt.convert(copy.deepcopy(model))


def _calls(model: Any, net: Any, x: Any, target: Any) -> dict[str, Any]:
    """The two modes of one model; `net` is the model or its compiled form."""
    torch: Any = importlib.import_module("torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()
        return loss

    def infer() -> Any:
        with torch.no_grad():
            return net(x)

    return {"train-step": train_step, "eval": infer}


def run_resnet(request: dict[str, Any]) -> dict[str, Any]:
    """Times both models in each variant and mode, interleaved, in this process."""
    torch: Any = importlib.import_module("torch")
    threads, gap = request["threads"], request["gap_s"] if request["threads"] > 1 else 0.0
    set_threads("torch", threads)
    torch.manual_seed(request["seed"])
    theirs = resnet50()
    models = {"batchnorm": converted(theirs), "torch": theirs}
    x = torch.randn(request["batch"], 3, request["size"], request["size"])
    target = torch.randint(0, 1000, (request["batch"],))

    with torch.no_grad():  # in training mode: every batch norm normalizes with the batch's statistics
        outputs = {name: m.train()(x) for name, m in models.items()}
    want = outputs["torch"].double()
    error = float((outputs["batchnorm"].double() - want).abs().max() / want.abs().max())
    if not error <= TOLERANCE:
        raise CheckError(f"ResNet-50: the converted model's logits are off by {error:.3g} (tolerance {TOLERANCE})")

    rows = []
    for compiled in (False, True) if request["compile"] else (False,):
        calls = {name: _calls(m, torch.compile(m) if compiled else m, x, target) for name, m in models.items()}
        for mode in request["modes"]:
            for m in models.values():
                m.train(mode == "train-step")
            subjects: dict[str, Any] = {name: {"times_s": []} for name in SUBJECTS}
            for name in SUBJECTS:  # the first calls compile; then settle
                t0 = time.perf_counter()
                calls[name][mode]()
                subjects[name]["first_call_s"] = time.perf_counter() - t0
                for _ in range(request["warmup"]):
                    calls[name][mode]()
            for r in range(request["repeats"]):
                for name in (SUBJECTS[k] for k in turns(r, len(SUBJECTS))):
                    time.sleep(gap)
                    t0 = time.perf_counter()
                    calls[name][mode]()
                    subjects[name]["times_s"].append(time.perf_counter() - t0)
            rows.append({"mode": mode, "compiled": compiled, "subjects": subjects})
    return {"check": {"output": "training-mode logits", "error": error, "tolerance": TOLERANCE}, "rows": rows}


def worker() -> None:
    """The worker process's entry point."""
    worker_main(run_resnet)


def summarize(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Medians and the step-time ratio (torch's time / ours) per variant and mode."""
    results = []
    for row in answer["rows"]:
        subjects = {name: {**t, "median_ms": _median(t["times_s"]) * 1e3} for name, t in row["subjects"].items()}
        ratio = subjects["torch"]["median_ms"] / subjects["batchnorm"]["median_ms"]
        results.append({**row, "subjects": subjects, "speedup_torch": ratio})
    return results


def format_table(report: dict[str, Any]) -> str:
    meta, options = report["meta"], report["meta"]["options"]
    info = meta["batchnorm"]
    lines = [
        f"batchnorm {info['version']}: ISA {info['simd']}, OpenMP {'on' if info['openmp'] else 'off'}; "
        f"PyTorch {meta['versions'].get('torch')}; CPU {meta['cpu']}, {meta['logical_cpus']} logical CPUs",
        f"ResNet-50, batch {options['batch']} at {options['size']}x{options['size']}, {options['threads']} threads; "
        f"medians of {options['repeats']} calls each after {options['warmup']} warm-up, called in turn; "
        f"{options['gap_ms']:g} ms sleep before each call at 2+ threads; load average "
        f"{_fmt((meta.get('load_average') or [None])[0], '.2f')} at start",
        f"torch = torch.nn.BatchNorm2d, batchnorm = batchnorm.torch.convert of a deep copy; logits agree "
        f"to {report['check']['error']:.2g}; x torch = torch's median time / ours; first = the first call "
        "(with compilation)",
        "",
    ]
    rows = [
        (
            "compiled" if e["compiled"] else "eager",
            e["mode"],
            _fmt_time(e["subjects"]["batchnorm"]["median_ms"]),
            _fmt_time(e["subjects"]["torch"]["median_ms"]),
            _fmt(e["speedup_torch"], ".3f"),
            f"{e['subjects']['batchnorm']['first_call_s']:.1f} s",
            f"{e['subjects']['torch']['first_call_s']:.1f} s",
        )
        for e in report["results"]
    ]
    columns = [("variant", "<"), ("mode", "<"), ("batchnorm", ">"), ("torch", ">"), ("x torch", ">")]
    columns += [("first batchnorm", ">"), ("first torch", ">")]
    return "\n".join(lines + text_table(columns, rows))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if importlib.util.find_spec("torch") is None:
        raise BenchError("--resnet needs PyTorch: pip install torch")
    if args.resnet_batch * (args.resnet_size // 32) ** 2 < 8:  # the last stage is size/32 square
        raise BenchError(
            "--resnet-batch x (--resnet-size / 32)^2 must be >= 8: with fewer values per channel in the last "
            "stage, training-mode batch norm divides by a spread of a few values and rounding decides the logits"
        )
    modes = [m.strip() for m in (args.modes or "train-step,eval").split(",") if m.strip()]
    if not modes or set(modes) - {"train-step", "eval"}:
        raise BenchError(f"--modes takes a comma-separated subset of train-step,eval, got {args.modes!r}")
    request = {
        "batch": args.resnet_batch,
        "size": args.resnet_size,
        "threads": max(args.threads),
        "modes": modes,
        "compile": not args.no_compile,
        # A step takes seconds: 5 calls of each after 1 warm-up keep a default run within minutes.
        "repeats": args.repeats if args.repeats is not None else 2 if args.quick else 5,
        "warmup": args.warmup if args.warmup is not None else 1,
        "gap_s": args.gap / 1e3,
        "seed": args.seed,
    }
    if request["repeats"] < 1 or request["warmup"] < 0 or args.gap < 0:
        raise BenchError("--repeats must be >= 1, --warmup and --gap >= 0")
    meta = machine_info()
    meta["options"] = {**request, "gap_ms": args.gap}
    meta["command"] = " ".join(["python -m batchnorm bench", *sys.argv[1:]]) if sys.argv else None
    if not args.quiet:
        print("ResNet-50: building, checking, compiling and timing both models", file=sys.stderr, flush=True)
    started = time.perf_counter()
    process = _Worker("resnet", list(SUBJECTS), "inherited", _worker_env({}), "bench_resnet:worker")
    try:
        answer = process.run(request)
    finally:
        _close(process)
    meta["seconds"] = time.perf_counter() - started
    return {"meta": meta, "check": answer["check"], "results": summarize(answer)}
