"""bn.info(), thread control (set/get, OMP_NUM_THREADS, threadpoolctl) and the run-time
instruction-set choice with its BATCHNORM_MAX_ISA cap, checked in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from reference import BF16, F16, F32, F64


def _run_python(code: str, env_extra: dict[str, str], cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k in ("BATCHNORM_MAX_ISA", "OMP_NUM_THREADS"):
        env.pop(k, None)
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---- info ---------------------------------------------------------------------------------


def test_info_keys_and_types():
    info = bn.info()
    for key in ("version", "simd", "simd_supported", "openmp", "threads", "compiler"):
        assert key in info, key
    assert info["version"] == bn.__version__
    assert isinstance(info["version"], str)
    assert info["version"].count(".") >= 1
    assert isinstance(info["simd"], str)
    assert isinstance(info["simd_supported"], list)
    assert info["simd_supported"], "at least the baseline must be supported"
    assert info["simd"] in info["simd_supported"]
    assert info["simd_supported"][-1] == "baseline"
    assert set(info["simd_supported"]) <= {"avx512", "avx2", "baseline"}
    assert type(info["openmp"]) is bool
    assert type(info["threads"]) is int
    assert info["threads"] >= 1
    assert info["threads"] == bn.get_num_threads()
    assert isinstance(info["compiler"], str)
    assert info["compiler"]


def test_info_is_json_serializable():
    json.dumps(bn.info())


def test_best_isa_is_chosen_without_a_cap():
    if os.environ.get("BATCHNORM_MAX_ISA"):
        pytest.skip("BATCHNORM_MAX_ISA is set for this run")
    info = bn.info()
    assert info["simd"] == info["simd_supported"][0]


# ---- threads ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16])
def test_set_get_round_trip(n, restore_threads):
    bn.set_num_threads(n)
    assert bn.get_num_threads() == n
    assert bn.info()["threads"] == n
    # and a computation with that setting works
    x = np.random.default_rng(n).standard_normal((300, 600)).astype(np.float32)
    y, _ = bn.forward(x)
    ref.assert_output_close(y, ref.forward_ref(x).y, F32)


def test_set_num_threads_applies_to_other_threads(restore_threads):
    bn.set_num_threads(3)
    seen = []
    t = threading.Thread(target=lambda: seen.append(bn.get_num_threads()))
    t.start()
    t.join()
    assert seen == [3]


def test_set_num_threads_from_another_thread_applies_here(restore_threads):
    bn.set_num_threads(2)
    assert bn.get_num_threads() == 2
    t = threading.Thread(target=bn.set_num_threads, args=(3,))
    t.start()
    t.join()
    assert bn.get_num_threads() == 3


def test_concurrent_calls_from_python_threads(restore_threads):
    """The kernels release the GIL: concurrent calls give the sequential, bitwise results."""
    bn.set_num_threads(2)
    rng = np.random.default_rng(7)
    xs = [ref.random_data(rng, (16, 24, 20, 20), F32, 1, loc=50.0) for _ in range(4)]
    dys = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]

    def run(i):
        y, st = bn.forward(xs[i], axis=1)
        dx, dg, db = bn.backward(dys[i], xs[i], st, axis=1)
        return y, st.mean, st.variance, dx, dg, db

    sequential = [run(i) for i in range(4)]
    results: dict[int, list] = {i: [] for i in range(4)}

    def worker(i):
        for _ in range(3):
            results[i].append(run(i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert len(results[i]) == 3
        for got in results[i]:
            for a, b in zip(got, sequential[i], strict=True):
                assert a.tobytes() == b.tobytes()


def test_set_num_threads_accepts_numpy_integers(restore_threads):
    bn.set_num_threads(np.int64(2))
    assert bn.get_num_threads() == 2


@pytest.mark.parametrize("n", ["1", "3"])
def test_omp_num_threads_is_honoured(n, tmp_path):
    proc = _run_python(
        """
        import batchnorm as bn
        print(bn.get_num_threads(), bn.info()["threads"])
        """,
        {"OMP_NUM_THREADS": n},
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [n, n]


def test_threadpoolctl_limits_and_restores(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = bn.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1):
        assert bn.get_num_threads() == 1
    assert bn.get_num_threads() == before
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert bn.get_num_threads() == 1
    assert bn.get_num_threads() == before


def test_threadpoolctl_after_set_num_threads(restore_threads):
    """set_num_threads(3) then threadpool_limits(1): 1 inside, 3 again after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    bn.set_num_threads(3)
    with threadpoolctl.threadpool_limits(limits=1):
        assert bn.get_num_threads() == 1
    assert bn.get_num_threads() == 3


def test_threadpoolctl_sees_the_library_openmp():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not bn.info()["openmp"]:
        pytest.skip("built without OpenMP")
    apis = {d["internal_api"] for d in threadpoolctl.threadpool_info()}
    assert apis & {"openmp"}, apis


# ---- instruction sets -----------------------------------------------------------------------

# Small shapes that reach every kernel shape: channels-last rows (C not a multiple of a
# vector), channels-first runs with vector bodies and tails, a general strided plan.
ISA_CASES = [((37, 45), -1), ((3, 5, 67), 1), ((6, 4, 300), 1), ((4, 6, 5, 3), (1, 3)), ((5, 7, 3), (0, 2))]
ISA_DTYPES = {"float32": F32, "float64": F64, "float16": F16, "bfloat16": BF16}

_CHILD = """
import json, sys
import numpy as np
import ml_dtypes
import batchnorm as bn

dtypes = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
inp = np.load("inputs.npz")
spec = json.load(open("spec.json"))
out = {}
for key, (dtype, axis, relu) in spec.items():
    dt = dtypes[dtype]
    axis = tuple(axis) if isinstance(axis, list) else axis
    x = inp[key + "_x"].astype(dt)
    dy = inp[key + "_dy"].astype(dt)
    gamma, beta = inp[key + "_gamma"], inp[key + "_beta"]
    if dt != np.float64:
        gamma, beta = gamma.astype(np.float32), beta.astype(np.float32)
    act = "relu" if relu else None
    y, st = bn.forward(x, gamma, beta, axis=axis, epsilon=1e-3, activation=act)
    dx, dg, db = bn.backward(dy, x, st, gamma, beta, axis=axis, activation=act)
    m, v = bn.moments(x, axis=axis)
    yn = bn.normalize(x, m, v, gamma, beta, axis=axis, epsilon=1e-3, activation=act)
    for name, a in (("y", y), ("dx", dx), ("dgamma", dg), ("dbeta", db), ("mean", m), ("var", v), ("yn", yn)):
        out[key + "_" + name] = a.astype(np.float64)
# The backward's ReLU mask equals the forward's, bit for bit, also within rounding of 0.
rng = np.random.default_rng(5)
d = rng.uniform(-1e-6, 1e-6, size=(2048, 8))
for dt in (np.float32, np.float64):
    base = np.concatenate([-(1 + d), 1 + d[::-1]]).astype(dt)
    for tag, x, axis in (("rows", base, -1), ("runs", np.ascontiguousarray(base.T), 0)):
        ones = np.ones(8, np.float64 if dt == np.float64 else np.float32)
        y, st = bn.forward(x, ones, ones, axis=axis, epsilon=0.0, activation="relu")
        _, _, db = bn.backward(np.ones_like(x), x, st, ones, ones, axis=axis, activation="relu")
        key = "kink_%s_%s" % (np.dtype(dt).name, tag)
        out[key + "_positive"] = (y > 0).sum(axis=1 - (axis % 2)).astype(np.float64)
        out[key + "_dbeta"] = db.astype(np.float64)
np.savez("outputs.npz", **out)
print(json.dumps(bn.info()))
"""


def _isa_inputs(tmp_path):
    rng = np.random.default_rng(20240611)
    arrays, spec = {}, {}
    for ci, (shape, axis) in enumerate(ISA_CASES):
        kept = ref.kept_shape(shape, axis)
        for name, dt in ISA_DTYPES.items():
            for relu in (False, True):

                def make(_, dt=dt, shape=shape, axis=axis, kept=kept):
                    x = ref.random_data(rng, shape, dt, axis)
                    return (x, *ref.random_params(rng, kept, dt))

                x, gamma, beta = ref.relu_safe(make, dt, axis=axis) if relu else make(0)
                key = f"c{ci}_{name}_{int(relu)}"
                arrays[key + "_x"] = x.astype(np.float64)  # exact for every dtype
                arrays[key + "_dy"] = rng.standard_normal(shape).astype(dt).astype(np.float64)
                arrays[key + "_gamma"] = gamma.astype(np.float64)
                arrays[key + "_beta"] = beta.astype(np.float64)
                spec[key] = (name, list(axis) if isinstance(axis, tuple) else axis, relu)
    np.savez(tmp_path / "inputs.npz", **arrays)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return arrays, spec


def _check_isa_outputs(arrays, spec, outputs, isa):
    for key, (name, axis_spec, relu) in spec.items():
        dt = ISA_DTYPES[name]
        axis = tuple(axis_spec) if isinstance(axis_spec, list) else axis_spec
        x = arrays[key + "_x"].astype(dt)
        dy = arrays[key + "_dy"].astype(dt)
        gamma = arrays[key + "_gamma"].astype(ref.stat_dtype(dt))
        beta = arrays[key + "_beta"].astype(ref.stat_dtype(dt))
        r = ref.forward_ref(x, gamma, beta, axis=axis, relu=relu)
        rdx, rdg, rdb = ref.backward_ref(dy, x, gamma, beta, axis=axis, relu=relu)
        what = f"{isa} {key}"
        ref.assert_output_close(outputs[key + "_y"].astype(dt), r.y, dt, name=f"{what} y")
        ref.assert_output_close(outputs[key + "_yn"].astype(dt), r.y, dt, name=f"{what} normalize")
        ref.assert_output_close(
            outputs[key + "_dx"].astype(dt), rdx, dt, name=f"{what} dx", scale=ref.dx_scale(dy, x, gamma, axis=axis)
        )
        sd = ref.stat_dtype(dt)
        gs = float(np.abs(ref.f64(dy)).max()) * r.count
        ref.assert_stats_close(outputs[key + "_dgamma"].astype(sd), rdg, dt, name=f"{what} dgamma", scale=gs)
        ref.assert_stats_close(outputs[key + "_dbeta"].astype(sd), rdb, dt, name=f"{what} dbeta", scale=gs)
        ref.assert_stats_close(
            outputs[key + "_mean"].astype(sd), r.mean, dt, name=f"{what} mean", scale=float(np.abs(r.mean).max())
        )
        ref.assert_stats_close(outputs[key + "_var"].astype(sd), r.var, dt, name=f"{what} var")


@pytest.mark.parametrize("isa", bn.info()["simd_supported"])
def test_isa_cap_selects_and_computes_correctly(isa, tmp_path):
    arrays, spec = _isa_inputs(tmp_path)
    proc = _run_python(_CHILD, {"BATCHNORM_MAX_ISA": isa}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["simd"] == isa
    assert info["max_isa"] == isa
    with np.load(tmp_path / "outputs.npz") as f:
        outputs = dict(f)
    _check_isa_outputs(arrays, spec, outputs, isa)
    kinks = sorted(k[: -len("_dbeta")] for k in outputs if k.startswith("kink_") and k.endswith("_dbeta"))
    assert len(kinks) == 4
    for k in kinks:
        np.testing.assert_array_equal(outputs[k + "_dbeta"], outputs[k + "_positive"], err_msg=f"{isa} {k}")


@pytest.mark.parametrize("value", ["bogus", "AVX2 ", "sse9"])
def test_invalid_isa_cap_falls_back_to_the_best(value, tmp_path):
    proc = _run_python(
        """
        import json
        import numpy as np
        import batchnorm as bn
        x = np.arange(12.0, dtype=np.float32).reshape(4, 3)
        y, st = bn.forward(x)
        print(json.dumps(bn.info()))
        """,
        {"BATCHNORM_MAX_ISA": value},
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["simd"] == bn.info()["simd_supported"][0]


def test_empty_isa_cap_means_no_cap(tmp_path):
    proc = _run_python(
        "import batchnorm as bn, json; print(json.dumps(bn.info()))", {"BATCHNORM_MAX_ISA": ""}, tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["simd"] == info["simd_supported"][0]
    assert info["max_isa"] is None


@pytest.mark.parametrize(("value", "applied"), [("baseline", "baseline"), ("bogus", None)])
def test_info_reports_the_cap_dispatch_applied(value, applied, tmp_path):
    """max_isa is the cap read with the choice, not what the environment says later."""
    proc = _run_python(
        """
        import json, os
        import numpy as np
        import batchnorm as bn
        bn.forward(np.ones((4, 3), np.float32))
        os.environ["BATCHNORM_MAX_ISA"] = "avx2"
        print(json.dumps(bn.info()))
        """,
        {"BATCHNORM_MAX_ISA": value},
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["max_isa"] == applied
    assert info["simd"] == (applied or info["simd_supported"][0])


def test_a_missing_core_gives_a_friendly_import_error(tmp_path):
    proc = _run_python(
        """
        import sys
        sys.modules["batchnorm._core"] = None  # as if the compiled module could not be loaded
        try:
            import batchnorm
        except ImportError as e:
            print(isinstance(e.__cause__, ImportError))
            print(e)
        """,
        {},
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    cause, message = proc.stdout.split("\n", 1)
    assert cause == "True"  # the original error, chained
    assert "could not load its compiled core, batchnorm._core" in message
    assert "halted; None in sys.modules" in message  # what went wrong, from the original
    assert "pip install" in message
