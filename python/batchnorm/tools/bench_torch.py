"""The worker side of ``python -m batchnorm bench --torch``: batchnorm.torch's modules against
torch.nn.BatchNorm1d/2d/3d, both in this process, interleaved call by call.

Per (shape, dtype, mode, thread count), each subject is a module made by torch
(``torch.nn.BatchNorm*d`` with the case's weight, bias and running statistics) and, for
ours, the same module after ``batchnorm.torch.convert`` of a deep copy: equal weights, the
public way in. The modes:

- **train-step**: ``y = m(x); y.backward(g)`` with a fixed ``g``, the gradients set to
  None around each call (model bytes 3B + 5B: a training forward and a backward);
- **eval**: ``m(x)`` in eval mode under ``torch.no_grad()`` (2B).

x and g are tensors over the case's rotating NumPy buffers (NHWC data as a channels_last
view, bfloat16 through a bit view); the timing, the copies next to each repetition and the
float64 checks are bench_cases'.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import numpy as np

from .bench_cases import (
    Call,
    CaseData,
    Outputs,
    case_data,
    check_outputs,
    from_torch,
    set_threads,
    time_subjects,
    to_torch,
    worker_main,
)

SUBJECTS = ("batchnorm", "torch")  # the order of the calls in the first repetition
_MODULES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def make_module(subject: str, data: CaseData) -> Any:
    """torch's batch-norm module for the case's rank, holding the case's parameters; for
    ``subject == "batchnorm"`` the same after batchnorm.torch.convert of a deep copy."""
    torch: Any = importlib.import_module("torch")
    module = getattr(torch.nn, _MODULES[len(data.shape.dims)])(data.shape.channels, eps=1e-5)
    with torch.no_grad():
        for name, value in (
            ("weight", data.gamma),
            ("bias", data.beta),
            ("running_mean", data.running_mean),
            ("running_var", data.running_var),
        ):
            getattr(module, name).copy_(torch.from_numpy(value))
    if subject == "batchnorm":
        bnt: Any = importlib.import_module("batchnorm.torch")
        module = bnt.convert(copy.deepcopy(module))
    return module


def _module_subject(subject: str, mode: str, data: CaseData) -> tuple[Call, Outputs]:
    torch: Any = importlib.import_module("torch")
    axis = data.shape.axis
    module = make_module(subject, data)
    if mode == "eval":
        module.eval()
        xs = [to_torch(a, axis) for a in data.x]

        def infer(i: int) -> Any:
            with torch.no_grad():
                return module(xs[i])

        return infer, lambda r, i: {"y": from_torch(r, axis)}
    module.train()
    xs = [to_torch(a, axis).requires_grad_() for a in data.x]
    gs = [to_torch(a, axis) for a in data.dy]
    weight, bias = module.weight, module.bias

    def step(i: int) -> Any:
        x = xs[i]
        weight.grad = bias.grad = None
        y = module(x)
        y.backward(gs[i])
        dx, x.grad = x.grad, None  # no buffer keeps a gradient: memory stays one step's
        return y, dx, weight.grad, bias.grad

    def step_outputs(r: Any, i: int) -> dict[str, np.ndarray]:
        y, dx, dweight, dbias = r
        return {
            "y": from_torch(y, axis),
            "dx": from_torch(dx, axis),
            "dgamma": dweight.double().numpy(),
            "dbeta": dbias.double().numpy(),
        }

    return step, step_outputs


def run_module_case(request: dict[str, Any]) -> dict[str, Any]:
    """Times ours and torch's modules on one (shape, dtype), interleaved; checks both."""
    data = case_data({**request, "min_buffers": 2 * len(SUBJECTS) + 2})  # each call its own buffer
    dtype = data.dtype_name
    rows = []
    for mode in request["modes"]:
        for threads in request["threads"]:
            set_threads("torch", threads)
            subjects: dict[str, Any] = {}
            timed: dict[str, tuple[Call, Outputs]] = {}
            for subject in SUBJECTS:
                try:
                    call, outputs = _module_subject(subject, mode, data)
                    call(0)
                except Exception as e:  # e.g. training on one value per channel: n/a, not a failure
                    subjects[subject] = {"unsupported": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
                    continue
                timed[subject] = (call, outputs)
            if timed:
                timings, results, lasts = time_subjects(
                    [call for call, _ in timed.values()],
                    data,
                    repeats=request["repeats"],
                    warmup=request["warmup"],
                    with_copy=data.shape.kind != "tiny",
                    gap=request.get("gap_s", 0.0) if threads > 1 else 0.0,
                )
                for (subject, (_, outputs)), timing, result, last in zip(
                    timed.items(), timings, results, lasts, strict=True
                ):
                    want = data.reference("forward" if mode == "train-step" else "inference", last)
                    if mode == "train-step":
                        want = {**want, **data.reference("backward", last)}
                    timing["checks"] = check_outputs(subject, mode, dtype, outputs(result, last), want)
                    subjects[subject] = timing
            rows.append({"mode": mode, "threads": threads, "subjects": {s: subjects[s] for s in SUBJECTS}})
    return {"buffers": data.count, "bytes": data.nbytes, "rows": rows}


def main() -> None:
    """The worker process's entry point."""
    worker_main(run_module_case)
