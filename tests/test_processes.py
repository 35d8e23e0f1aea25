"""Processes and signals: forked children, the scratch memory of one call, Ctrl-C.

Each case runs a script in a fresh interpreter with a time limit, so a hang fails the test
instead of stalling the suite.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TIMEOUT = 120  # seconds: far above what each script needs (a few seconds), far below a hang


def run(script: str, timeout: float = TIMEOUT) -> str:
    """Runs `script` in a new interpreter; returns its stdout, failing on error or timeout.
    On timeout the whole process group goes, forked children included."""
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"the script did not finish within {timeout} s (a hang)")
    assert proc.returncode == 0, err
    return out


# A multi-threaded call in the parent starts OpenMP's thread pool; the children then call
# every function several times, each big enough to use two threads in the parent.
FORK_SETUP = """
    import numpy as np
    import batchnorm as bn

    bn.set_num_threads(2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 32, 32, 32)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def calls(_=None):
        y, st = bn.forward(x, axis=1)
        dx, dg, db = bn.backward(dy, x, st, axis=1)
        m, v = bn.moments(x.reshape(-1, 32), axis=1)
        z = bn.normalize(x, st.mean, st.variance, axis=1)
        return [y, st.mean, st.variance, dx, dg, db, m, v, z, bn.get_num_threads()]

    bn.forward(x, axis=1)  # two threads: the pool now exists
    bn.set_num_threads(1)  # what a forked child computes: the serial results, bit for bit
    expected = calls()
    bn.set_num_threads(2)
    two = calls()
    assert two[-1] == 2

    def same(got):
        for a, b in zip(got[:-1], expected[:-1]):
            np.testing.assert_array_equal(a, b)
        assert got[-1] == 1, got[-1]
"""


def test_fork_pool_children_work():
    run(
        FORK_SETUP
        + """
    import multiprocessing as mp
    with mp.get_context("fork").Pool(2) as pool:
        for got in pool.map(calls, range(6)):
            same(got)
    calls()  # the parent keeps its threads
    assert bn.get_num_threads() == 2
    print("ok")
    """
    )


def test_fork_child_of_child_works():
    run(
        FORK_SETUP
        + """
    import os
    pid = os.fork()
    if pid == 0:
        try:
            same(calls())
            pid2 = os.fork()
            if pid2 == 0:
                same(calls())
                os._exit(0)
            os._exit(os.waitpid(pid2, 0)[1] != 0)
        except BaseException:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    """
    )


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_fork_torch_dataloader_workers():
    run(
        FORK_SETUP
        + """
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Forwards(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            y, st = bn.forward(x, axis=1)
            return torch.from_numpy(y[i]), torch.from_numpy(st.mean), bn.get_num_threads()

    # torch sets one OpenMP thread in its workers; a worker that asks for two again must not hang
    loader = DataLoader(
        Forwards(),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        worker_init_fn=lambda _: bn.set_num_threads(2),
    )
    for i, (y, mean, threads) in enumerate(loader):
        np.testing.assert_array_equal(y.numpy(), expected[0][i])
        np.testing.assert_array_equal(mean.numpy(), expected[1])
        assert threads == 1
    print("ok")
    """
    )


def peak_growth_script(call: str, threads: int) -> str:
    """Prints the growth of the peak resident memory over one `call` (on inputs already in
    memory; `out` not yet touched), in bytes, and the input's size."""
    return f"""
    import resource
    import numpy as np
    import batchnorm as bn

    bn.set_num_threads({threads})
    x = np.ones((2, 20_000_000), np.float32)
    dy = np.ones_like(x)
    out = np.empty_like(x)
    bn.backward(dy[:, :8], x[:, :8], bn.forward(x[:, :8], axis=1)[1], axis=1)  # first allocations made
    stats = bn.BatchStats(*(np.ones(x.shape[1], np.float32) for _ in range(3)), 2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    {call}
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(after - before, x.nbytes)
    """


@pytest.mark.parametrize(
    "call",
    [
        "bn.moments(x, axis=1)",
        "bn.forward(x, axis=1, out=out)",
        "bn.backward(dy, x, stats, axis=1, out=out)",
    ],
)
def test_scratch_memory_does_not_grow_with_threads(call):
    """Wide channels-last data with two rows: eight threads once kept partial sums for every
    thread and channel (3 GiB for this 76 MiB input). Now the scratch is a few values per
    channel (statistics, coefficients), the same for any thread count."""
    one, nbytes = map(int, run(peak_growth_script(call, 1)).split())
    eight, _ = map(int, run(peak_growth_script(call, 8)).split())
    assert eight <= one + (32 << 20), (one / 2**20, eight / 2**20)
    channels = nbytes // 8
    assert one <= nbytes + channels * 100, one / 2**20  # out, then under 100 bytes per channel


@pytest.mark.parametrize("shape", [(3, 50_001), (2, 2**22 + 3)], ids=["cached", "streamed"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_wide_rows_split_by_channels_match_one_thread(dtype, shape, rng, restore_threads):
    """Few rows of many channels (also outputs large enough to be streamed): threads take
    channel ranges (the memory-bounded split); results agree with the single-threaded ones
    and the float64 reference."""
    import batchnorm as bn

    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    results = []
    for threads in (1, 2):
        bn.set_num_threads(threads)
        y, st = bn.forward(x, axis=1, activation="relu")
        dx, dgamma, dbeta = bn.backward(dy, x, st, axis=1, activation="relu")
        results.append([*bn.moments(x, axis=1), y, st.mean, st.variance, dx, dgamma, dbeta])
    rtol = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]  # the thread count changes rounding only
    for one, two in zip(*results, strict=True):
        np.testing.assert_allclose(two, one, rtol=rtol, atol=rtol)
    x64 = x.astype(np.float64)
    mean, var = bn.moments(x, axis=1)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=1e-6, atol=1e-6)


# A multi-second call on a broadcast input (2^35 values, no memory): channels last (rows) or
# first (runs). About 4 s at 2 threads here, so that a faster machine still takes well over
# the 1.3 s the test allows. The child reports how long the call ran after the parent's SIGINT.
INTERRUPTED_CALL = """
    import signal
    import sys
    import time
    import numpy as np
    import batchnorm as bn

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive session
    bn.set_num_threads({threads})
    x = {x}
    t = time.perf_counter()
    expected = bn.moments(x[: x.shape[0] // 64], axis=1)  # 1/64 of the work
    full = (time.perf_counter() - t) * 64
    print(full, flush=True)
    try:
        bn.moments(x, axis=1)
    except KeyboardInterrupt:
        print(time.perf_counter(), flush=True)
    else:
        sys.exit("not interrupted")
    for got, want in zip(bn.moments(x[: x.shape[0] // 64], axis=1), expected):  # still works
        np.testing.assert_array_equal(got, want)
"""
BROADCASTS = {
    "rows": "np.broadcast_to(np.linspace(0, 1, 2**16, dtype=np.float32), (2**19, 2**16))",
    "runs": "np.broadcast_to(np.linspace(0, 1, 2**22, dtype=np.float32).reshape(4, 2**20), (2**13, 4, 2**20))",
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", BROADCASTS)
def test_ctrl_c_stops_a_long_call(layout, threads):
    import time

    script = textwrap.dedent(INTERRUPTED_CALL.format(threads=threads, x=BROADCASTS[layout]))
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            full = float(proc.stdout.readline())  # the long call starts now
            time.sleep(0.3)
            sent = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            stopped = float(proc.stdout.readline() or "inf")
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    # perf_counter is CLOCK_MONOTONIC on Linux: one clock for both processes
    assert stopped - sent < 1.0, (stopped - sent, full)
    assert full > 2.0, full  # the call would have gone on for seconds


def test_interrupted_layer_and_functional_calls_change_nothing_else():
    """A signal handler's exception (here from a timer, 20 ms into each call) stops forward,
    backward and a layer's training call; the layer's state and the inputs are unchanged,
    and the next calls give the results of an uninterrupted library."""
    run(
        """
    import signal
    import numpy as np
    import batchnorm as bn

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    signal.signal(signal.SIGALRM, stop)
    bn.set_num_threads(2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2**9, 64, 2**11)).astype(np.float32)  # 256 MiB
    dy = rng.standard_normal(x.shape).astype(np.float32)
    copies = x.copy(), dy.copy()
    layer = bn.BatchNorm1d(64)
    state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    _, stats = bn.forward(x[:8], axis=1)
    calls = {
        "forward": lambda: bn.forward(x, axis=1, out=np.empty_like(x)),
        "backward": lambda: bn.backward(dy, x, stats, axis=1),
        "layer": lambda: layer(x),
    }
    for name, call in calls.items():
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        try:
            call()
        except Stop:
            pass
        else:
            raise AssertionError(f"{name} was not interrupted")
    signal.setitimer(signal.ITIMER_REAL, 0)
    np.testing.assert_array_equal(x, copies[0])
    np.testing.assert_array_equal(dy, copies[1])
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    fresh = bn.BatchNorm1d(64)
    np.testing.assert_array_equal(layer(x[:64]), fresh(x[:64]))
    np.testing.assert_array_equal(layer.running_mean, fresh.running_mean)
    """
    )


def test_ctrl_c_in_a_child_forked_from_another_thread():
    """After a fork from a thread other than the main one, that thread is the child's main
    thread, where Python runs signal handlers: a long call there stops too."""
    run(
        """
    import os
    import signal
    import threading
    import time
    import numpy as np
    import batchnorm as bn

    x = np.broadcast_to(np.ones(2**16, np.float32), (2**18, 2**16))  # seconds of work
    status = []

    def fork_and_wait():
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
            t = time.perf_counter()
            try:
                bn.moments(x, axis=1)
            except KeyboardInterrupt:
                os._exit(0 if time.perf_counter() - t < 1.5 else 2)
            os._exit(1)
        status.append(os.waitpid(pid, 0)[1])

    thread = threading.Thread(target=fork_and_wait)
    thread.start()
    thread.join()
    assert status == [0], status
    """
    )
