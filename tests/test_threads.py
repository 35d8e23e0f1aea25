"""Python threads (docs/reliability.md, "Threads").

* The functional API is stateless and releases the GIL in its kernels: N threads calling
  it at once get the serial results, bit for bit.
* Layers: one layer per thread gives the serial results bit for bit; one layer shared
  between threads keeps a consistent state - every training call's update is applied
  whole (the layers hold a lock around reading and committing their state), no update is
  lost, a concurrent reader (get_weights / state_dict) never sees half of one, and a
  concurrent set_weights / load_state_dict is seen by a call whole or not at all.
* The GIL is released while a kernel runs: another Python thread makes progress during
  the call (shown without timing: with the switch interval at 1000 s, the only way the
  other thread can run is a voluntary release).
* Results do not depend on bn.set_num_threads beyond rounding.

STRESS (env BATCHNORM_STRESS, default 1) multiplies the iterations of the stress tests.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from batchnorm import optimizers
from layer_state import make_layer, train_input, training_call
from reference import BF16, F16, F32, F64

STRESS = int(os.environ.get("BATCHNORM_STRESS", "1"))
N_THREADS = 6


def run_threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    """Runs target(i) for i < n on n threads started together; returns their results,
    re-raising the first exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class Countdown:
    """``with countdown:`` around each of n workers' work; sets `event` when the last one
    leaves, also by an exception (so a failing worker cannot leave a reader spinning)."""

    def __init__(self, n: int, event: threading.Event) -> None:
        self._left = n
        self._lock = threading.Lock()
        self._event = event

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._event.set()


def same_bits(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return bool(a == b)


# ---- the functional API: concurrent == serial, bitwise ----------------------------------------

# (shape, axis, dtype, layout): small and threaded sizes, every layout family.
FUNCTIONAL_CASES = [
    ((64, 24), -1, F32, "c"),
    ((4096, 40), -1, F32, "c"),  # channels-last rows split between OpenMP threads
    ((8, 6, 32, 32), 1, F32, "c"),  # channels-first runs
    ((8, 6, 32, 32), 1, F32, "channels_last"),
    ((6, 5, 7, 9), (1, 3), F64, "negative"),
    ((12, 7, 40), 1, F16, "step"),
    ((600, 33), 0, BF16, "f"),
]


def _functional_work(case: tuple, seed: int) -> Callable[[], Any]:
    shape, axis, dtype, layout = case
    rng = np.random.default_rng(seed)
    x = ref.make_layout(ref.random_data(rng, shape, dtype, axis, loc=10.0), layout)
    dy = ref.make_layout(rng.standard_normal(shape).astype(dtype), layout)
    gamma, beta = ref.random_params(rng, ref.kept_shape(shape, axis), dtype)

    def work() -> Any:
        mean, var = bn.moments(x, axis=axis)
        y, st = bn.forward(x, gamma, beta, axis=axis, epsilon=1e-4, activation="relu")
        dx, dg, db = bn.backward(dy, x, st, gamma, beta, axis=axis, activation="relu")
        yn = bn.normalize(x, mean, var, gamma, beta, axis=axis, epsilon=1e-4)
        out = np.empty_like(x)
        bn.forward(x, axis=axis, out=out)
        return mean, var, y, tuple(st[:3]), st.count, dx, dg, db, yn, out

    return work


@pytest.mark.parametrize("threads", [1, 2], ids=lambda n: f"omp{n}")
def test_functional_calls_in_threads_equal_serial_calls(threads, restore_threads):
    bn.set_num_threads(threads)
    works = [_functional_work(case, seed) for seed, case in enumerate(FUNCTIONAL_CASES)]
    serial = [w() for w in works]
    rounds = 2 * STRESS

    def target(i: int) -> list[bool]:
        # Thread i runs every case, starting at case i, so different cases overlap in time.
        ok = []
        for r in range(rounds):
            for k in range(len(works)):
                j = (i + k + r) % len(works)
                ok.append(same_bits(works[j](), serial[j]))
        return ok

    results = run_threads(N_THREADS, target)
    assert all(all(r) for r in results)


# ---- separate layers in threads == the same layers serially, bitwise -----------------------


def _train_steps(kind: str, seed: int, steps: int) -> Any:
    """A layer trained `steps` times (forward, backward, Adam step) on seeded data; returns
    everything it ends with."""
    layer = make_layer(kind, trained=False)
    opt = optimizers.Adam(learning_rate=0.01)
    rng = np.random.default_rng(seed)
    ys = []
    for _ in range(steps):
        x = train_input(kind, seed=int(rng.integers(1 << 30)))
        y = training_call(layer, x)
        dx = layer.backward(np.sin(y).astype(np.float32))
        opt.step(layer)
        ys.append((y, dx))
    state = layer.get_weights() if hasattr(layer, "get_weights") else layer.state_dict()
    return ys, state, layer.grads


LAYER_KINDS = ["keras", "keras-renorm", "keras-vbs", "keras-fused", "torch2d", "torch2d-cumulative", "sync"]


def test_separate_layers_in_threads_equal_serial_layers():
    steps = 5 * STRESS
    jobs = [(kind, seed) for seed, kind in enumerate(LAYER_KINDS)]
    serial = [_train_steps(kind, seed, steps) for kind, seed in jobs]
    concurrent = run_threads(len(jobs), lambda i: _train_steps(*jobs[i], steps))
    for (kind, _), a, b in zip(jobs, serial, concurrent, strict=True):
        assert same_bits(a, b), kind


# ---- one layer shared between threads ---------------------------------------------------------


@pytest.fixture
def fast_switching():
    """Python threads switch every microsecond (instead of 5 ms): many more interleavings."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.mark.parametrize("kind", ["keras", "keras-renorm", "keras-vbs", "torch2d", "torch2d-cumulative", "sync"])
def test_shared_layer_applies_every_update_whole(kind, fast_switching):
    """Threads train one layer on the same batch while a reader takes snapshots. The
    moving statistics after k identical updates are a known sequence s_k: the end state
    is s_total (no update lost), and every snapshot is some s_k whole (never half of one).

    (Without the layers' lock, this fails in most runs: see docs/reliability.md.)"""
    for _ in range(4 * STRESS):
        _shared_layer_run(kind)


def _shared_layer_run(kind: str) -> None:
    calls_per_thread = 8
    x = train_input(kind)
    # the sequence of states, serially
    serial = make_layer(kind, trained=False)
    expected = [_stats_of(serial)]
    for _ in range(N_THREADS * calls_per_thread):
        training_call(serial, x)
        expected.append(_stats_of(serial))
    known = {_key(s): k for k, s in enumerate(expected)}
    assert len(known) == len(expected), "the serial sequence repeats a state"

    shared = make_layer(kind, trained=False)
    training_call(shared, x)  # build it before the threads (a Keras layer builds on its first call)
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while True:  # at least once, and until the writers are done
            finished = stop.is_set()
            k = known.get(_key(_stats_of(shared)))
            assert k is not None, "a snapshot that is no state of the serial sequence: a torn update"
            seen.append(k)
            if finished:
                return

    # thread 0 reads; threads 1..N-1 make the N * calls_per_thread - 1 other calls
    per_writer = [calls_per_thread] * (N_THREADS - 1)
    per_writer[0] += N_THREADS * calls_per_thread - 1 - sum(per_writer)
    writers = Countdown(N_THREADS - 1, stop)

    def target(i: int) -> None:
        if i == 0:
            reader()
            return
        with writers:
            for _ in range(per_writer[i - 1]):
                training_call(shared, x)

    run_threads(N_THREADS, target)
    end = known.get(_key(_stats_of(shared)))
    assert end == len(expected) - 1, f"end state is s_{end}, expected s_{len(expected) - 1}: updates were lost"
    assert seen, "the reader saw nothing"
    assert seen == sorted(seen), "the reader saw the state go backwards"


def _stats_of(layer: Any) -> dict[str, np.ndarray]:
    """A consistent snapshot through the public, locked accessors."""
    if isinstance(layer, bn.BatchNormalization):
        return dict(enumerate(layer.get_weights()))  # type: ignore[arg-type]
    return dict(layer.state_dict())


def _key(state: dict[Any, np.ndarray]) -> bytes:
    return b"|".join(np.ascontiguousarray(v).tobytes() for v in state.values())


@pytest.mark.parametrize("kind", ["keras", "torch2d", "sync"])
def test_calls_see_a_concurrent_weight_load_whole_or_not_at_all(kind, fast_switching):
    """While one thread alternates the parameters between two sets A and B (set_weights /
    load_state_dict), the others' inference outputs are exactly the A output or exactly
    the B output, never a mix of A's gamma with B's beta."""
    layer = make_layer(kind)
    x = train_input(kind, seed=5)
    if isinstance(layer, bn.BatchNormalization):
        ws = layer.get_weights()
        a = [w.copy() for w in ws]
        b = [w + (i + 1) * 0.5 for i, w in enumerate(ws)]

        def load(p: Any) -> None:
            layer.set_weights(p)

        def infer() -> np.ndarray:
            return layer(x, training=False)
    else:
        sd = layer.state_dict()
        a = dict(sd)
        b = {
            k: (v + (i + 1) * 0.5).astype(v.dtype) if k != "num_batches_tracked" else v
            for i, (k, v) in enumerate(sd.items())
        }
        layer.eval()

        def load(p: Any) -> None:
            layer.load_state_dict(p)

        def infer() -> np.ndarray:
            return layer(x)

    load(a)
    out_a = infer()
    load(b)
    out_b = infer()
    assert not np.array_equal(out_a, out_b)
    stop = threading.Event()
    callers = Countdown(N_THREADS - 1, stop)

    def target(i: int) -> int:
        if i == 0:
            n = 0
            while not stop.is_set() or n == 0:
                load(a if n % 2 == 0 else b)
                n += 1
            return n
        with callers:
            for _ in range(20 * STRESS):
                y = infer()
                assert np.array_equal(y, out_a) or np.array_equal(y, out_b), "a call saw half of a weight load"
        return 0

    loads = run_threads(N_THREADS, target)[0]
    assert loads > 0


@pytest.mark.parametrize("kind", ["keras", "torch2d"])
def test_calls_see_a_concurrent_optimizer_step_whole_or_not_at_all(kind, fast_switching):
    """While one thread makes K optimizer steps (fixed gradients), the others' inference
    outputs are exactly those of the layer after some k <= K steps: never gamma of step k
    with beta of step k - 1 (the optimizer commits under the layer's lock).

    (Without that lock, one run in three fails; five runs are made.)"""
    for _ in range(5 * STRESS):
        _optimizer_race(kind)


def _optimizer_race(kind: str) -> None:
    steps = 100
    x = train_input(kind, seed=5)

    def fresh() -> Any:
        layer = make_layer(kind)
        layer.grads = {k: np.full_like(v, 0.25 * (i + 1)) for i, (k, v) in enumerate(layer.grads.items())}
        if not isinstance(layer, bn.BatchNormalization):
            layer.eval()
        return layer

    def infer(layer: Any) -> np.ndarray:
        return layer(x, training=False) if isinstance(layer, bn.BatchNormalization) else layer(x)

    serial, opt = fresh(), optimizers.SGD(learning_rate=0.01)
    expected = {infer(serial).tobytes()}
    for _ in range(steps):
        opt.step(serial)
        expected.add(infer(serial).tobytes())
    assert len(expected) == steps + 1

    shared, opt = fresh(), optimizers.SGD(learning_rate=0.01)
    stepped = threading.Event()

    def target(i: int) -> int:
        if i == 0:
            with Countdown(1, stepped):
                for _ in range(steps):
                    opt.step(shared)
            return 0
        n = 0
        # Call the layer for as long as the steps go on, up to a bound: readers that keep
        # the layer's lock busy can starve the stepping thread (seconds, not milliseconds).
        while (not stepped.is_set() or n == 0) and n < 1000:
            assert infer(shared).tobytes() in expected, "a call saw half of an optimizer step"
            n += 1
        return n

    assert sum(run_threads(N_THREADS, target)) > 0
    assert infer(shared).tobytes() == infer(serial).tobytes()


def test_forward_backward_pairs_under_a_caller_lock():
    """The documented rule for backward on a shared layer: backward differentiates the
    layer's last call, whichever thread made it, so a thread that needs the gradient of its
    own call holds a lock of its own around the pair. Then every pair equals the serial pair."""
    kind = "torch2d"
    layer = make_layer(kind)
    pair_lock = threading.Lock()
    xs = [train_input(kind, seed=100 + i) for i in range(N_THREADS)]
    dys = [np.cos(x) for x in xs]

    def pair(i: int) -> tuple[np.ndarray, np.ndarray]:
        with pair_lock:
            y = layer(xs[i])
            return y, layer.backward(dys[i])

    results = run_threads(N_THREADS, pair)
    # The running statistics moved between pairs, but the outputs of a training call do not
    # depend on them, so each pair equals the same pair on a fresh layer.
    for i, (y, dx) in enumerate(results):
        fresh = make_layer(kind)
        assert same_bits((y, dx), (fresh(xs[i]), fresh.backward(dys[i])))


# ---- the GIL is released while a kernel runs ---------------------------------------------------


def progress_during(call: Callable[[], Any]) -> int:
    """How many times the main thread advanced a counter while `call` ran on another thread.

    The switch interval is set to 1000 s, so a thread running Python code (or C code that
    holds the GIL) is never asked to give the GIL up: the main thread can advance only if
    `call` releases the GIL itself. The main thread's loop gives the GIL up at every turn
    (time.sleep(0)), so the worker gets going immediately.
    """
    counter = [0]
    delta: list[int] = []
    finished = threading.Event()

    def worker() -> None:
        before = counter[0]
        call()
        delta.append(counter[0] - before)
        finished.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        while not finished.is_set():
            counter[0] += 1
            time.sleep(0)
        t.join()
    finally:
        sys.setswitchinterval(old)
    return delta[0]


@functools.cache
def _big() -> tuple[np.ndarray, bn.BatchStats]:
    """128 MiB of float32: a kernel long enough to see the other thread run."""
    x = np.random.default_rng(3).random((1 << 21, 16), np.float32)  # any finite data; no float64 draws to convert
    return x, bn.forward(x)[1]


_GIL_CALLS: dict[str, Callable[[np.ndarray, bn.BatchStats], Any]] = {
    "moments": lambda x, st: bn.moments(x),
    "normalize": lambda x, st: bn.normalize(x, st.mean, st.variance),
    "forward": lambda x, st: bn.forward(x),
    "backward": lambda x, st: bn.backward(x, x, st),
    "keras-layer": lambda x, st: bn.BatchNormalization()(x, training=True),
    "torch-layer": lambda x, st: bn.BatchNorm1d(16)(x),
}


@pytest.mark.skipif(not getattr(sys, "_is_gil_enabled", lambda: True)(), reason="no GIL in this build")
def test_the_probe_sees_no_progress_while_the_gil_is_held():
    """The control: pure Python work and a GIL-holding builtin let the main thread do nothing."""
    assert progress_during(lambda: sum(range(3_000_000))) == 0
    assert progress_during(lambda: sorted(range(2_000_000, 0, -1))) == 0
    assert progress_during(lambda: time.sleep(0.05)) > 0  # and a release is seen


@pytest.mark.parametrize("name", list(_GIL_CALLS))
def test_kernels_release_the_gil(name, restore_threads):
    bn.set_num_threads(1)  # one OpenMP thread: the kernel is long, and the main thread has a core
    x, st = _big()
    assert progress_during(lambda: _GIL_CALLS[name](x, st)) > 0


# ---- thread count: rounding only -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["keras", "keras-renorm", "keras-vbs", "torch2d", "sync"])
def test_layers_depend_on_set_num_threads_only_by_rounding(kind, restore_threads):
    """Five training steps of a layer on inputs big enough to be split between threads,
    with 1, 2, 3, 8 and 64 threads: the same to float32 rounding (1e-6 relative), and
    bitwise the same when repeated with the same count."""
    shape = {"keras": (8192, 24), "keras-renorm": (8192, 24), "keras-vbs": (8192, 24)}.get(kind, (32, 8, 32, 32))
    rng = np.random.default_rng(9)
    xs = [rng.normal(50.0, 2.0, shape).astype(np.float32) for _ in range(5)]

    def run() -> list[np.ndarray]:
        layer = bn.BatchNormalization(**_KERAS_KW.get(kind, {})) if kind.startswith("keras") else _torch(kind, shape[1])
        outs = []
        for x in xs:
            y = training_call(layer, x)
            outs += [y, layer.backward(np.tanh(y))]
        state = layer.get_weights() if kind.startswith("keras") else list(layer.state_dict().values())
        grads = list(layer.grads.values())
        return [*outs, *state, *grads]

    results = {}
    for n in (1, 2, 3, 8, 64):
        bn.set_num_threads(n)
        results[n] = run()
        assert same_bits(run(), results[n]), f"not reproducible with {n} threads"
    for n in (2, 3, 8, 64):
        for k, (a, b) in enumerate(zip(results[n], results[1], strict=True)):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            scale = float(np.max(np.abs(b64))) if b.size else 1.0
            err = float(np.max(np.abs(a64 - b64))) if b.size else 0.0
            assert err <= 2e-6 * scale + 1e-30, f"array {k}: {n} threads vs 1 differ by {err:.3g} (scale {scale:.3g})"


_KERAS_KW: dict[str, dict[str, Any]] = {
    "keras": {"momentum": 0.5},
    "keras-renorm": {"momentum": 0.5, "renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 2.0}},
    "keras-vbs": {"momentum": 0.5, "virtual_batch_size": 2048},
}


def _torch(kind: str, channels: int) -> Any:
    return bn.SyncBatchNorm(channels) if kind == "sync" else bn.BatchNorm2d(channels)
