"""BatchNorm1d/2d/3d against torch.nn.BatchNorm*d (options, several steps, errors, state,
copies) and convert/revert (the same Parameter and buffer objects, flags kept)."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch_cases import close, make  # noqa: E402

import batchnorm as bn  # noqa: E402
import batchnorm.torch as bnt  # noqa: E402 - only once torch is known to be there

KINDS = {
    "1d-NC": (bnt.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
    "1d-NCL": (bnt.BatchNorm1d, torch.nn.BatchNorm1d, (5, 4, 7)),
    "2d": (bnt.BatchNorm2d, torch.nn.BatchNorm2d, (4, 4, 5, 3)),
    "3d": (bnt.BatchNorm3d, torch.nn.BatchNorm3d, (3, 4, 2, 3, 4)),
}
OPTIONS = {
    "default": {},
    "momentum=None": {"momentum": None},
    "affine=False": {"affine": False},
    "no running stats": {"track_running_stats": False},
    "bias=False": {"bias": False},
}


def pair(kind: str, dtype: torch.dtype = torch.float32, **options):
    """Ours and torch's float64 reference, with the same (random) parameters."""
    ours_cls, theirs_cls, shape = KINDS[kind]
    ours = ours_cls(4, dtype=dtype, **options)
    with torch.no_grad():
        for t in ours.parameters():
            t.copy_(make(tuple(t.shape), dtype, seed=t.numel() + len(kind)))
    reference = theirs_cls(4, dtype=dtype, **options)
    reference.load_state_dict(ours.state_dict())
    return ours, reference.double(), shape


def step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    grads = torch.autograd.grad(y, list(module.parameters()), dy) if any(True for _ in module.parameters()) else ()
    return y, dx, grads


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_then_eval_equal_torchs(kind, option):
    ours, reference, shape = pair(kind, **OPTIONS[option])
    for seed in range(3):
        x, dy = make(shape, torch.float32, seed=seed), make(shape, torch.float32, seed=seed + 10)
        for ours_out, exact in zip(step(ours, x, dy), step(reference, x.double(), dy.double()), strict=True):
            if isinstance(exact, tuple):
                for a, b in zip(ours_out, exact, strict=True):
                    close(a, b, ulps=16)
            else:
                close(ours_out, exact, ulps=8)
    assert list(ours.state_dict()) == list(reference.state_dict())
    for name, exact in reference.state_dict().items():
        if exact.is_floating_point():
            close(ours.state_dict()[name], exact, ulps=16)
        else:
            assert torch.equal(ours.state_dict()[name], exact), name
    ours.eval()
    reference.eval()
    x = make(shape, torch.float32, seed=20)
    close(ours(x), reference(x.double()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_16_bit_modules_equal_torchs_in_float64(dtype, layout):
    ours, reference, shape = pair("2d", dtype)
    x, dy = make(shape, dtype, seed=1, layout=layout), make(shape, dtype, seed=2)
    y, dx, grads = step(ours, x, dy)
    y64, dx64, grads64 = step(reference, x.double(), dy.double())
    assert y.dtype == dx.dtype == ours.running_mean.dtype == dtype
    assert y.stride() == x.stride()
    close(y, y64)
    close(dx, dx64, ulps=8)
    for a, b in zip(
        (*grads, ours.running_mean, ours.running_var),
        (*grads64, reference.running_mean, reference.running_var),
        strict=True,
    ):
        close(a, b, ulps=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_16_bit_parameters_are_float32_ones_rounded_once(dtype, training):
    """A 16-bit module's parameters and buffers are read exactly and its parameter gradients
    and running statistics rounded once from float32: bit for bit what a module with the same
    values in float32 gives, rounded to the 16-bit dtype as torch's .to() rounds."""
    ours, _, shape = pair("2d", dtype)
    with torch.no_grad():
        ours.weight.copy_(make((shape[1],), dtype, seed=5))
        ours.bias.copy_(make((shape[1],), dtype, seed=6))
        ours.running_mean.copy_(make((shape[1],), dtype, seed=7))
        ours.running_var.copy_(make((shape[1],), dtype, seed=8).abs() + 0.5)
    wide = copy.deepcopy(ours).float()
    ours.train(training), wide.train(training)
    x, dy = make(shape, dtype, seed=1), make(shape, dtype, seed=2)
    y, dx, grads = step(ours, x, dy)
    y32, dx32, grads32 = step(wide, x, dy)
    assert torch.equal(y, y32)
    assert torch.equal(dx, dx32)
    for a, b in zip(
        (*grads, ours.running_mean, ours.running_var), (*grads32, wide.running_mean, wide.running_var), strict=True
    ):
        assert a.dtype == dtype
        assert torch.equal(a, b.to(dtype))


def test_state_dict_loads_both_ways():
    ours, theirs = bnt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ours(make((4, 3, 2, 2), torch.float32, seed=3))
    theirs.load_state_dict(ours.state_dict())
    ours2 = bnt.BatchNorm2d(3)
    ours2.load_state_dict(theirs.state_dict())
    for name, t in ours.state_dict().items():
        assert torch.equal(ours2.state_dict()[name], t)


ERRORS = {
    "too few dims": ("2d", (4, 4, 5), ValueError),
    "too many dims": ("1d-NC", (4, 4, 5, 3), ValueError),
    "channels": ("2d", (4, 5, 5, 3), RuntimeError),
    "one value per channel": ("1d-NC", (1, 4), ValueError),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_torchs_and_change_no_buffer(case):
    kind, shape, error = ERRORS[case]
    ours_cls, theirs_cls, _ = KINDS[kind]
    ours, theirs = ours_cls(4), theirs_cls(4)
    before = copy.deepcopy(ours.state_dict())
    x = make(shape, torch.float32, seed=4)
    with pytest.raises(error) as expected:
        theirs(x)
    with pytest.raises(error) as got:
        ours(x)
    assert str(got.value) == str(expected.value)
    for name, t in ours.state_dict().items():
        assert torch.equal(t, before[name]), name  # torch has advanced num_batches_tracked; we must not


def test_eval_without_running_statistics_uses_the_batch():
    ours, reference, shape = pair("2d", track_running_stats=False)
    ours.eval()
    reference.eval()
    x = make(shape, torch.float32, seed=5)
    close(ours(x), reference(x.double()))


def test_deepcopy_and_pickle_keep_the_module():
    m = bnt.BatchNorm2d(3, momentum=0.2)
    m(make((4, 3, 2, 2), torch.float32, seed=6))
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buffer, weights_only=False)):
        assert type(copied) is bnt.BatchNorm2d
        assert copied.momentum == 0.2
        for name, t in m.state_dict().items():
            assert torch.equal(copied.state_dict()[name], t)
        x = make((4, 3, 2, 2), torch.float32, seed=7)
        assert torch.equal(copied(x), copy.deepcopy(m)(x))


def model_with_every_kind() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.BatchNorm1d(4, affine=False)),
        torch.nn.Unflatten(2, (2, 2)),
        torch.nn.Unflatten(3, (2, 1)),
        torch.nn.BatchNorm3d(4, momentum=None, track_running_stats=False),
    )


def test_convert_and_revert_keep_the_same_tensors_flags_and_mode():
    model = model_with_every_kind()
    model[1].weight.requires_grad_(False)
    model[2].eval()
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    modes = {name: m.training for name, m in model.named_modules()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = bnt.convert(model)
    assert converted is model  # the root is not a batch norm: kept, its children replaced
    assert [type(m) for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] == [
        bnt.BatchNorm2d,
        bnt.BatchNorm1d,
        bnt.BatchNorm3d,
    ]
    for name, t in [*converted.named_parameters(), *converted.named_buffers()]:
        assert t is tensors[name], name
    assert not converted[1].weight.requires_grad
    assert {name: m.training for name, m in converted.named_modules()} == modes
    assert converted[5].momentum is None
    assert converted[5].track_running_stats is False
    converted(make((4, 3, 2, 2), torch.float32, seed=8)).sum().backward()
    optimizer.step()  # made before convert: still steps the converted model's parameters
    assert converted[0].weight.grad is not None
    reverted = bnt.revert(converted)
    assert [type(m) for m in reverted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] == [
        torch.nn.BatchNorm2d,
        torch.nn.BatchNorm1d,
        torch.nn.BatchNorm3d,
    ]
    for name, t in [*reverted.named_parameters(), *reverted.named_buffers()]:
        assert t is tensors[name], name
    assert {name: m.training for name, m in reverted.named_modules()} == modes


def test_convert_replaces_a_root_batch_norm():
    root = torch.nn.BatchNorm1d(3).eval()
    ours = bnt.convert(root)
    assert type(ours) is bnt.BatchNorm1d
    assert ours is not root
    assert ours.weight is root.weight
    assert ours.running_var is root.running_var
    assert not ours.training
    assert type(bnt.revert(ours)) is torch.nn.BatchNorm1d


@pytest.mark.parametrize("imports", ["batchnorm._core, torch", "torch, batchnorm.torch"])
def test_openmp_runtimes_in_either_import_order(imports):
    """A source build links the system libgomp.so.1, whose SONAME torch's bundled copy
    shares, so whichever is loaded first serves both: one OpenMP library in the process.
    The manylinux wheel bundles its own under a renamed SONAME (docs/packaging.md): then
    the process maps exactly that one and torch's, never a third."""
    code = f"import {imports}; print({{l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l}})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mapped = {str(Path(m).resolve()) for m in eval(out)}
    bundled = sorted((Path(bn.__file__).resolve().parent.parent / "batchnorm.libs").glob("libgomp*"))
    if not bundled:
        assert len(mapped) == 1, mapped
        return
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    torch_own = [m for m in mapped if Path(m).parent == torch_lib]
    assert len(torch_own) == 1, mapped
    assert mapped == {torch_own[0], str(bundled[0].resolve())}, mapped


_ONE_POOL = """
import os, sys
for name in sys.argv[1].split(", "):
    __import__(name)
import numpy as np, torch
import batchnorm as bn
torch.set_num_threads(2)
bn.set_num_threads(2)
before = len(os.listdir("/proc/self/task"))
torch.nn.functional.conv2d(torch.ones(8, 16, 64, 64), torch.ones(16, 16, 3, 3))  # torch's parallel region
bn.forward(np.ones((64, 32, 32, 32), np.float32), axis=1)  # ours, big enough for two threads
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two processors for a second thread")
@pytest.mark.parametrize("imports", ["batchnorm", "torch, batchnorm"])
def test_one_openmp_pool_with_torch_in_either_import_order(imports):
    """batchnorm loads torch's OpenMP runtime before its core (batchnorm/_openmp.py), so its
    parallel regions run on torch's pool: two threads in all at two threads each, not a
    second pool (whose idle workers would spin on the cores torch's regions need)."""
    out = subprocess.run([sys.executable, "-c", _ONE_POOL, imports], capture_output=True, text=True, check=True)
    assert int(out.stdout) == 1, out.stdout  # one worker beside the calling thread
