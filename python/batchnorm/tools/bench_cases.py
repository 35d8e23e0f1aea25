"""The worker side of ``python -m batchnorm bench``: one (shape, dtype) case in this process.

A worker process (see bench.py) reads one JSON request per line on stdin and answers with
one JSON line: it builds the rotating input buffers, times each requested implementation
in each mode and thread count with a copy of the same bytes next to each repetition, and
checks one result of each against a float64 reference. Nothing here prints or decides
what the numbers mean; bench.py does that.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MODES = ("inference", "forward", "backward")
MODULE_MODES = ("train-step", "eval")  # bench --torch: a module's forward + backward, and its eval call
# Multiples of B, the bytes of x; a training step is a forward and a backward.
MODE_BYTES = {"inference": 2, "forward": 3, "backward": 5, "train-step": 3 + 5, "eval": 2}
DTYPES = ("float32", "float16", "bfloat16")
EPSILON = 1e-5
# Largest error accepted in the checks, relative to the largest magnitude of each output:
# a few roundings of the dtype. Plain NumPy sums float32 channels-last data row after row
# (400 000 rows for ResNet-50's first layer), which costs it more digits, ONNX
# Runtime's batch variance was off by 1.4e-4 there, and torch's weight gradient of a
# channels_last float32 training step by 3.8e-4: all get 1e-3 (LOOSE_TOLERANCE).
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
LOOSE_TOLERANCE = 1e-3
LOOSE_SUBJECTS = ("numpy", "onnxruntime", "torch")


def tolerance_for(subject: str, dtype: str) -> float:
    """The check's tolerance for one implementation's outputs in one dtype."""
    return max(TOLERANCE[dtype], LOOSE_TOLERANCE) if subject in LOOSE_SUBJECTS else TOLERANCE[dtype]


class BenchError(RuntimeError):
    """The benchmark could not run as asked."""


class CheckError(BenchError):
    """An implementation's result did not match the float64 reference."""


# ---- shapes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    dims: tuple[int, ...]
    axis: int
    kind: str  # "large" or "tiny"

    @property
    def label(self) -> str:
        return "x".join(map(str, self.dims))

    @property
    def layout(self) -> str:
        if len(self.dims) == 4:
            return "NCHW" if self.axis % 4 == 1 else "NHWC" if self.axis % 4 == 3 else f"axis={self.axis}"
        if len(self.dims) == 2 and self.axis % 2 == 1:
            return "NC"
        if len(self.dims) == 3 and self.axis % 3 in (1, 2):
            return "NCL" if self.axis % 3 == 1 else "NLC"
        return f"axis={self.axis}"

    @property
    def channels(self) -> int:
        return self.dims[self.axis]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dims": list(self.dims), "axis": self.axis, "kind": self.kind}


# ---- dtypes and data ------------------------------------------------------------------------


def _numpy_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)  # type: ignore[no-any-return]
    return np.dtype(name)


def available_dtypes() -> list[str]:
    """float32 and float16 always; bfloat16 when ml_dtypes is installed."""
    names = ["float32", "float16"]
    if importlib.util.find_spec("ml_dtypes") is not None:
        names.append("bfloat16")
    return names


def _param_shape(shape: Shape) -> tuple[int, ...]:
    """Per-channel arrays broadcast against x."""
    out = [1] * len(shape.dims)
    out[shape.axis] = shape.channels
    return tuple(out)


def _reduce_axes(shape: Shape) -> tuple[int, ...]:
    return tuple(a for a in range(len(shape.dims)) if a != shape.axis % len(shape.dims))


class CaseData:
    """Inputs of one (shape, dtype): ``count`` rotating buffers of x, dy and outputs.

    Buffer i holds ``base * (1 + i/20) + i/10`` for a per-channel-shifted and scaled normal
    sample ``base`` (so channels differ and a mix-up is caught by the checks), rounded to
    the dtype. Per-channel parameters are float32.
    """

    def __init__(self, shape: Shape, dtype: str, count: int, seed: int) -> None:
        self.shape = shape
        self.dtype_name = dtype
        self.dtype = _numpy_dtype(dtype)
        self.count = count
        rng = np.random.default_rng(seed)
        c = shape.channels
        pshape = _param_shape(shape)
        self.gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
        self.beta = rng.uniform(-0.5, 0.5, c).astype(np.float32)
        offset = rng.uniform(-1.0, 1.0, c).astype(np.float32)
        scale = rng.uniform(0.5, 2.0, c).astype(np.float32)
        # Inference statistics: close to the data's, not equal (they are moving averages).
        self.running_mean = (offset + rng.uniform(-0.1, 0.1, c)).astype(np.float32)
        self.running_var = (scale**2 * rng.uniform(0.8, 1.2, c)).astype(np.float32)
        base = rng.standard_normal(shape.dims, dtype=np.float32)
        base *= scale.reshape(pshape)
        base += offset.reshape(pshape)
        self.x = [self._variant(base, i) for i in range(count)]
        del base
        self.out = [np.ones_like(self.x[0]) for _ in range(count)]  # written once: no page faults when timed
        self._rng = rng  # dy's sample comes next from it, when a backward first asks for dy
        self._stats: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._references: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def _variant(self, base: np.ndarray, i: int) -> np.ndarray:
        v = base * np.float32(1 + i / 20)
        v += np.float32(i / 10)
        return v if self.dtype == np.float32 else v.astype(self.dtype)

    @functools.cached_property
    def dy(self) -> list[np.ndarray]:
        """The upstream gradients, made on first use (only backward reads them)."""
        base = self._rng.standard_normal(self.shape.dims, dtype=np.float32)
        return [self._variant(base, i) for i in range(self.count)]

    @property
    def nbytes(self) -> int:
        return int(self.x[0].nbytes)

    def stats(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch mean, variance and inv_std of buffer i (float32, from the library's moments)."""
        if i not in self._stats:
            import batchnorm as bn

            mean, var = bn.moments(self.x[i], axis=self.shape.axis)
            inv_std = (1.0 / np.sqrt(var.astype(np.float64) + EPSILON)).astype(np.float32)
            self._stats[i] = (mean, var, inv_std)
        return self._stats[i]

    def reference(self, mode: str, i: int) -> dict[str, np.ndarray]:
        """The float64 result of `mode` on buffer i."""
        key = (mode, i)
        if key not in self._references:
            self._references.clear()  # one at a time: they are large
            self._references[key] = _reference(self, mode, i)
        return self._references[key]


def _reference(data: CaseData, mode: str, i: int) -> dict[str, np.ndarray]:
    shape = data.shape
    pshape = _param_shape(shape)
    red = _reduce_axes(shape)
    x = data.x[i].astype(np.float64)
    gamma = data.gamma.astype(np.float64).reshape(pshape)
    beta = data.beta.astype(np.float64).reshape(pshape)
    if mode == "inference":
        inv = 1.0 / np.sqrt(data.running_var.astype(np.float64).reshape(pshape) + EPSILON)
        x -= data.running_mean.astype(np.float64).reshape(pshape)
        x *= inv * gamma
        x += beta
        return {"y": x}
    mean = x.mean(axis=red, keepdims=True)
    x -= mean
    var = np.mean(x * x, axis=red, keepdims=True)
    x *= 1.0 / np.sqrt(var + EPSILON)  # x_hat
    if mode == "forward":
        out = {"mean": mean.reshape(-1), "variance": var.reshape(-1)}
        x *= gamma
        x += beta
        out["y"] = x
        return out
    dy = data.dy[i].astype(np.float64)
    count = x.size // shape.channels
    dbeta = dy.sum(axis=red, keepdims=True)
    dgamma = np.sum(dy * x, axis=red, keepdims=True)
    # dx = gamma * inv_std / M * (M * dy - sum(dy) - x_hat * sum(dy * x_hat))
    dx = dy * count
    dx -= dbeta
    x *= dgamma
    dx -= x
    dx *= gamma / np.sqrt(var + EPSILON) / count
    return {"dx": dx, "dgamma": dgamma.reshape(-1), "dbeta": dbeta.reshape(-1)}


# ---- the implementations --------------------------------------------------------------------
#
# A subject is made per (mode, thread count; the thread count is set beforehand by
# set_threads for the libraries that take it per call) as a pair of functions: call(i) runs
# the pass on buffer i and returns whatever holds its result; outputs(result, i) turns that
# into float64 arrays named like the reference's (in x's layout), for the check.

Call = Callable[[int], Any]
Outputs = Callable[[Any, int], dict[str, np.ndarray]]


def _batchnorm_subject(mode: str, data: CaseData, threads: int) -> tuple[Call, Outputs]:
    import batchnorm as bn

    axis, gamma, beta = data.shape.axis, data.gamma, data.beta
    x, out = data.x, data.out
    if mode == "inference":
        mean, var = data.running_mean, data.running_var

        def infer(i: int) -> Any:
            return bn.normalize(x[i], mean, var, gamma, beta, axis=axis, epsilon=EPSILON, out=out[i])

        return infer, lambda r, i: {"y": r.astype(np.float64)}
    if mode == "forward":

        def forward(i: int) -> Any:
            return bn.forward(x[i], gamma, beta, axis=axis, epsilon=EPSILON, out=out[i])

        def forward_outputs(r: Any, i: int) -> dict[str, np.ndarray]:
            y, stats = r
            return {"y": y.astype(np.float64), "mean": stats.mean.astype(np.float64), "variance": stats.variance}

        return forward, forward_outputs
    dy, count = data.dy, data.x[0].size // data.shape.channels
    stats = [bn.BatchStats(*data.stats(i), count) for i in range(data.count)]

    def backward(i: int) -> Any:
        return bn.backward(dy[i], x[i], stats[i], gamma, axis=axis, out=out[i])

    def backward_outputs(r: Any, i: int) -> dict[str, np.ndarray]:
        dx, dgamma, dbeta = r
        return {"dx": dx.astype(np.float64), "dgamma": dgamma, "dbeta": dbeta}

    return backward, backward_outputs


def _numpy_subject(mode: str, data: CaseData, threads: int) -> tuple[Call, Outputs]:
    """Plain float32 NumPy: the obvious expressions, writing the result into out=."""
    pshape = _param_shape(data.shape)
    red = _reduce_axes(data.shape)
    gamma = data.gamma.reshape(pshape)
    beta = data.beta.reshape(pshape)
    x, out = data.x, data.out
    if mode == "inference":
        scale = (data.gamma / np.sqrt(data.running_var + np.float32(EPSILON))).reshape(pshape)
        shift = beta - data.running_mean.reshape(pshape) * scale

        def infer(i: int) -> Any:
            np.multiply(x[i], scale, out=out[i])
            return np.add(out[i], shift, out=out[i])

        return infer, lambda r, i: {"y": r.astype(np.float64)}
    if mode == "forward":

        def forward(i: int) -> Any:
            mean = x[i].mean(axis=red, keepdims=True)
            centered = x[i] - mean
            var = np.mean(centered * centered, axis=red, keepdims=True)
            np.multiply(centered, gamma / np.sqrt(var + np.float32(EPSILON)), out=out[i])
            return np.add(out[i], beta, out=out[i]), mean, var

        def forward_outputs(r: Any, i: int) -> dict[str, np.ndarray]:
            y, mean, var = r
            return {"y": y.astype(np.float64), "mean": mean.reshape(-1), "variance": var.reshape(-1)}

        return forward, forward_outputs
    dy, count = data.dy, data.x[0].size // data.shape.channels
    stats = [(m.reshape(pshape), s.reshape(pshape)) for m, _, s in (data.stats(i) for i in range(data.count))]

    def backward(i: int) -> Any:
        mean, inv_std = stats[i]
        x_hat = (x[i] - mean) * inv_std
        dbeta = dy[i].sum(axis=red, keepdims=True)
        dgamma = np.sum(dy[i] * x_hat, axis=red, keepdims=True)
        dx = np.multiply(gamma * inv_std / np.float32(count), count * dy[i] - dbeta - x_hat * dgamma, out=out[i])
        return dx, dgamma, dbeta

    def backward_outputs(r: Any, i: int) -> dict[str, np.ndarray]:
        dx, dgamma, dbeta = r
        return {"dx": dx.astype(np.float64), "dgamma": dgamma.reshape(-1), "dbeta": dbeta.reshape(-1)}

    return backward, backward_outputs


def to_torch(a: np.ndarray, axis: int) -> Any:
    """A tensor sharing a's memory (bfloat16 through a bit view), channels moved to dim 1 as
    a view: channels-last data stays channels-last."""
    torch: Any = importlib.import_module("torch")
    t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16) if a.dtype.name == "bfloat16" else torch.from_numpy(a)
    return torch.movedim(t, axis % a.ndim, 1)


def from_torch(t: Any, axis: int) -> np.ndarray:
    """The inverse of to_torch, as float64 for the checks."""
    torch: Any = importlib.import_module("torch")
    return np.asarray(torch.movedim(t.detach(), 1, axis % t.dim()).to(torch.float64).numpy())


def _torch_subject(mode: str, data: CaseData, threads: int) -> tuple[Call, Outputs]:
    torch: Any = importlib.import_module("torch")
    functional: Any = importlib.import_module("torch.nn.functional")
    axis = data.shape.axis
    x = [to_torch(a, axis) for a in data.x]
    gamma, beta = torch.from_numpy(data.gamma), torch.from_numpy(data.beta)
    if mode == "inference":
        mean, var = torch.from_numpy(data.running_mean), torch.from_numpy(data.running_var)

        def infer(i: int) -> Any:
            return functional.batch_norm(x[i], mean, var, gamma, beta, False, 0.0, EPSILON)

        return infer, lambda r, i: {"y": from_torch(r, axis)}
    if mode == "forward":

        def forward(i: int) -> Any:
            return functional.batch_norm(x[i], None, None, gamma, beta, True, 0.0, EPSILON)

        return forward, lambda r, i: {"y": from_torch(r, axis)}
    dy = [to_torch(a, axis) for a in data.dy]
    stats = [(torch.from_numpy(m), torch.from_numpy(s)) for m, _, s in (data.stats(i) for i in range(data.count))]
    native_backward = torch.ops.aten.native_batch_norm_backward

    def backward(i: int) -> Any:
        mean, inv_std = stats[i]
        return native_backward(dy[i], x[i], gamma, None, None, mean, inv_std, True, EPSILON, [True, True, True])

    def backward_outputs(r: Any, i: int) -> dict[str, np.ndarray]:
        dx, dgamma, dbeta = r
        return {"dx": from_torch(dx, axis), "dgamma": dgamma.double().numpy(), "dbeta": dbeta.double().numpy()}

    return backward, backward_outputs


def _onnxruntime_subject(mode: str, data: CaseData, threads: int) -> tuple[Call, Outputs]:
    """ONNX Runtime's CPU BatchNormalization (opset 15) in a one-node model, run on bound
    buffers (IOBinding: inputs and outputs in place, as ours write into out=).

    Inference, and the training forward with ``training_mode=1`` and momentum 0, so that its
    running-statistics outputs are the batch mean and variance (checked too). ONNX takes the
    channels on axis 1; channels-last x is given as its (rows, C) view, which is the same
    normalization. The inference package has no gradient for it: backward is unsupported.
    Its intra-op pool has `threads` threads, and does not spin in the PASSIVE worker.
    """
    if mode == "backward":
        raise NotImplementedError("onnxruntime has no BatchNormalization gradient outside its training builds")
    ort: Any = importlib.import_module("onnxruntime")
    onnx: Any = importlib.import_module("onnx")
    helper, tensor = onnx.helper, onnx.TensorProto
    dims, axis, c = data.shape.dims, data.shape.axis % len(data.shape.dims), data.shape.channels
    if axis == len(dims) - 1:
        view: tuple[int, ...] = (math.prod(dims) // c, c)
    elif axis == 1:
        view = dims
    else:
        raise NotImplementedError("ONNX BatchNormalization takes the channels on axis 1 or, as (rows, C), last")
    element = {"float32": tensor.FLOAT, "float16": tensor.FLOAT16, "bfloat16": tensor.BFLOAT16}[data.dtype_name]
    training = mode == "forward"
    params = ("scale", "B", "input_mean", "input_var")
    outs = ["y", "running_mean", "running_var"] if training else ["y"]
    graph = helper.make_graph(
        [
            helper.make_node(
                "BatchNormalization",
                ["x", *params],
                outs,
                epsilon=EPSILON,
                momentum=0.0,
                training_mode=int(training),
            )
        ],
        "batch_norm",
        [helper.make_tensor_value_info("x", element, list(view))]
        + [helper.make_tensor_value_info(n, tensor.FLOAT, [c]) for n in params],
        [helper.make_tensor_value_info("y", element, list(view))]
        + [helper.make_tensor_value_info(n, tensor.FLOAT, [c]) for n in outs[1:]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = (data.gamma, data.beta, data.running_mean, data.running_var)
    statistics = [(np.zeros(c, np.float32), np.zeros(c, np.float32)) for _ in range(data.count)]
    bindings = []
    for i in range(data.count):
        binding = session.io_binding()
        binding.bind_cpu_input("x", data.x[i].reshape(view))
        for name, value in zip(params, values, strict=True):
            binding.bind_cpu_input(name, value)
        y = data.out[i]
        binding.bind_output("y", "cpu", 0, data.dtype, list(view), y.ctypes.data)
        if training:
            for name, value in zip(outs[1:], statistics[i], strict=True):
                binding.bind_output(name, "cpu", 0, np.float32, [c], value.ctypes.data)
        bindings.append(binding)

    def call(i: int) -> Any:
        session.run_with_iobinding(bindings[i])
        return i

    def outputs(r: Any, i: int) -> dict[str, np.ndarray]:
        got = {"y": data.out[i].astype(np.float64)}
        if training:
            got["mean"], got["variance"] = (s.astype(np.float64) for s in statistics[i])
        return got

    return call, outputs


_SUBJECTS: dict[str, Callable[[str, CaseData, int], tuple[Call, Outputs]]] = {
    "batchnorm": _batchnorm_subject,
    "numpy": _numpy_subject,
    "torch": _torch_subject,
    "onnxruntime": _onnxruntime_subject,
}
# Libraries measured against: what they cannot do is reported as unsupported, not an error.
PEERS = ("torch", "onnxruntime")


def check_outputs(
    subject: str, mode: str, dtype: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    """Compares each output with the reference; raises CheckError on a mismatch.

    The error of an output is ``max|got - want| / max|want|`` (NaN counts as a mismatch).
    """
    tolerance = tolerance_for(subject, dtype)
    checks = []
    for name, value in got.items():
        expected = want[name]
        actual = np.asarray(value, np.float64).reshape(expected.shape)
        scale = float(np.max(np.abs(expected))) or 1.0
        error = float(np.max(np.abs(actual - expected))) / scale
        checks.append({"output": name, "error": error, "tolerance": tolerance})
        if not error <= tolerance:
            raise CheckError(
                f"{subject} {mode} {dtype}: output {name!r} is off by {error:.3g} of its largest magnitude "
                f"(tolerance {tolerance:g}) against the float64 reference"
            )
    return checks


# ---- timing ---------------------------------------------------------------------------------


def _copy_memory() -> Callable[[np.ndarray, np.ndarray, bool], None]:
    from .. import _core

    return _core.copy_memory


def turns(r: int, n: int) -> list[int]:
    """The order of n interleaved subjects in repetition r: forwards, then backwards."""
    return list(range(n)) if r % 2 == 0 else list(reversed(range(n)))


def time_subjects(
    calls: Sequence[Call],
    data: CaseData,
    *,
    repeats: int,
    warmup: int,
    with_copy: bool,
    gap: float = 0.0,
    min_rep_seconds: float = 2e-3,
) -> tuple[list[dict[str, Any]], list[Any], list[int]]:
    """Median-ready timings of each of `calls` over the rotating buffers, interleaved:
    every repetition runs each call in turn, so that two subjects compared in one process
    see the same minutes of the machine, first in the given order and then in reverse
    (a, b, b, a, a, b, ...), so that each is as often the first after the copies, which
    leave the caches full of lines still to be written back.

    With `with_copy`, each repetition is one call of each, each on a buffer of its own
    (none reads data the one before left in cache), preceded by an ordinary and a
    non-temporal copy of x's bytes between two buffers the calls do not touch in this
    repetition or the next (every call's timing lists the same copies). `gap` seconds of
    sleep come before the copies and before each call: after a parallel region, libgomp's
    idle threads spin for several milliseconds (about 8 ms here) before they sleep, and
    in a process that holds two OpenMP runtimes (PyTorch's and ours, whose copy is the
    yardstick) the spinning threads of one would steal the cores from the other. Without
    `with_copy`, a repetition is as many calls on buffer 0 as take about
    `min_rep_seconds` (per-call overhead of tiny inputs). Returns each call's timings,
    last result and the buffer that result came from.
    """
    count = data.count
    clock = time.perf_counter
    results: list[Any] = [None] * len(calls)
    if not with_copy:
        # Warm-up and calibration, each bounded in calls and in time (a call that waits
        # for a descheduled thread can take milliseconds on a busy machine).
        per_rep = []
        for k, call in enumerate(calls):
            t0 = clock()
            for _ in range(max(warmup, 1) * 10):
                results[k] = call(0)
                if clock() - t0 > 0.1:
                    break
            done, t0 = 0, clock()
            while done < 10 and (done == 0 or clock() - t0 < min_rep_seconds):
                results[k] = call(0)
                done += 1
            per_call = max((clock() - t0) / done, 1e-8)
            per_rep.append(max(1, min(100_000, int(min_rep_seconds / per_call))))
        times: list[list[float]] = [[] for _ in calls]
        for r in range(repeats):
            for k in turns(r, len(calls)):
                t0 = clock()
                for _ in range(per_rep[k]):
                    results[k] = calls[k](0)
                times[k].append((clock() - t0) / per_rep[k])
        timings = [{"times_s": t, "calls_per_rep": n} for t, n in zip(times, per_rep, strict=True)]
        return timings, results, [0] * len(calls)

    n = len(calls)
    if count < 2 * n + 2:
        raise BenchError(f"the copy next to each repetition of {n} calls needs at least {2 * n + 2} rotating buffers")
    copy = _copy_memory()
    x, out = data.x, data.out

    def buffer(r: int, k: int) -> int:
        return (r * n + k) % count

    def repetition(r: int) -> tuple[float, float, list[float]]:
        a = buffer(r, max(2 * n, count // 2))  # past this repetition's buffers and the next one's
        b = (a + 1) % count
        time.sleep(gap)
        t0 = clock()
        copy(x[a], out[a], False)
        t1 = clock()
        copy(x[b], out[b], True)
        t2 = clock()
        elapsed = [0.0] * n
        for k in turns(r, n):
            time.sleep(gap)
            t3 = clock()
            results[k] = calls[k](buffer(r, k))
            elapsed[k] = clock() - t3
        return t1 - t0, t2 - t1, elapsed

    def settling(seen: list[float]) -> bool:
        return len(seen) < max(warmup, 30) and seen[-1] > 1.25 * min(seen) and sum(seen) < 10

    # Warm-up until the calls settle (at least `warmup` of them): a library that allocates
    # its outputs takes a few calls before the process's heap recycles them.
    seen: list[list[float]] = [[] for _ in calls]
    while len(seen[0]) < max(warmup, 1) or any(settling(s) for s in seen):
        for s, e in zip(seen, repetition(len(seen[0]))[2], strict=True):
            s.append(e)
    start = len(seen[0])
    times = [[] for _ in calls]
    ordinary, nontemporal = [], []
    for r in range(start, start + repeats):
        t_ordinary, t_nontemporal, elapsed = repetition(r)
        ordinary.append(t_ordinary)
        nontemporal.append(t_nontemporal)
        for t, e in zip(times, elapsed, strict=True):
            t.append(e)
    last = [buffer(start + repeats - 1, k) for k in range(n)]
    timings = [
        {
            "times_s": t,
            "calls_per_rep": 1,
            "warmup_calls": start,
            "copy_ordinary_s": ordinary,
            "copy_nontemporal_s": nontemporal,
        }
        for t in times
    ]
    return timings, results, last


def set_threads(subject: str, threads: int) -> None:
    import batchnorm as bn

    bn.set_num_threads(threads)  # also the copy's threads
    if subject == "torch":
        importlib.import_module("torch").set_num_threads(threads)


def case_data(request: dict[str, Any]) -> CaseData:
    """The rotating buffers of a request's (shape, dtype): enough to span its footprint."""
    shape = Shape(**{**request["shape"], "dims": tuple(request["shape"]["dims"])})
    nbytes = math.prod(shape.dims) * _numpy_dtype(request["dtype"]).itemsize
    least = request.get("min_buffers", 4)  # for the copy to stay off the timed buffers
    count = 1 if shape.kind == "tiny" else max(least, math.ceil(request["footprint_bytes"] / nbytes))
    count = min(count, max(least, request.get("max_buffers", 4096)))
    return CaseData(shape, request["dtype"], count, request["seed"])


def run_case(request: dict[str, Any]) -> dict[str, Any]:
    """Times the requested subjects on one (shape, dtype) in this process."""
    data = case_data(request)
    shape, dtype, count, nbytes = data.shape, data.dtype_name, data.count, data.nbytes
    tiny = shape.kind == "tiny"
    rows = []
    for mode in request["modes"]:
        for threads in request["threads"]:
            row: dict[str, Any] = {"mode": mode, "threads": threads, "subjects": {}}
            for subject in request["subjects"]:
                if subject == "numpy" and dtype != "float32":
                    continue
                set_threads(subject, threads)
                try:
                    call, outputs = _SUBJECTS[subject](mode, data, threads)
                    call(0)
                except Exception as e:
                    if subject not in PEERS:
                        raise
                    row["subjects"][subject] = {"unsupported": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
                    continue
                (timing,), (result,), (last,) = time_subjects(
                    [call],
                    data,
                    repeats=request["repeats"],
                    warmup=request["warmup"],
                    with_copy=not tiny,
                    gap=request.get("gap_s", 0.0) if threads > 1 else 0.0,
                )
                timing["checks"] = check_outputs(
                    subject, mode, dtype, outputs(result, last), data.reference(mode, last)
                )
                row["subjects"][subject] = timing
                del result
            rows.append(row)
    return {"buffers": count, "bytes": nbytes, "rows": rows}


# ---- the worker process ------------------------------------------------------------------


def _release_memory() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def worker_main(run: Callable[[dict[str, Any]], dict[str, Any]] = run_case) -> None:
    """A worker: reads one JSON request per line on stdin, answers one JSON line each (run's)."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the channel
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"ok": True, **run(request)}
        except CheckError as e:
            answer = {"ok": False, "check_failed": True, "error": str(e)}
        except Exception as e:
            answer = {"ok": False, "check_failed": False, "error": f"{e}\n{traceback.format_exc()}"}
        _release_memory()
        channel.write(json.dumps(answer) + "\n")
        channel.flush()
