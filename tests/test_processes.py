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
