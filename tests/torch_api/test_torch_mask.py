"""m(x, mask=) of the PyTorch-style layers (bn.BatchNorm*d on NumPy arrays, batchnorm.torch's
modules on the eager path and through the ops) against masked batch norm by its definition
in float64 (torch_cases.MaskedReference): outputs, dx, weight and bias gradients, running
statistics and num_batches_tracked over several steps; eval; errors; opcheck, gradcheck and
torch.compile(fullgraph=True)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402 - counts graphs, keeps them
from torch_cases import MaskedReference, channel_tensors, close, close_models, make  # noqa: E402

import batchnorm as bn  # noqa: E402
import batchnorm.torch as bnt  # noqa: E402 - only once torch is known to be there
from batchnorm.torch import _ops  # noqa: E402

OPS = torch.ops.batchnorm
OURS = {2: bnt.BatchNorm1d, 3: bnt.BatchNorm1d, 4: bnt.BatchNorm2d, 5: bnt.BatchNorm3d}
NUMPY = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}

# (x's shape, the mask's shape, x's layout)
CASES = [
    ((5, 4, 9), (5, 9), "contiguous"),  # NCL, padded sequences
    ((5, 4, 3, 6), (5, 3, 6), "channels_last"),  # NCHW in channels_last memory
    ((7, 4), (7,), "contiguous"),  # (N, C) with one value per sample
    ((5, 4, 9), (9,), "contiguous"),  # broadcast over the batch
    ((5, 4, 9), (5, 1), "every-other"),  # broadcast over the length; a strided view
]


def make_mask(shape, seed, kind="bool"):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < 0.6
    m.view(-1)[:3] = True  # a few selected positions whatever the draw
    return m if kind == "bool" else m.to(torch.uint8)


def run_torch(m, x, dy, mask, path):
    """One training step of batchnorm.torch module m: y, dx (None without autograd)."""
    if path == "no_grad":
        with torch.no_grad():
            return m(x, mask=mask), None
    xa = x.detach().clone().requires_grad_()
    if path == "eager":
        y = m(xa, mask=mask)
    else:  # the ops, as torch.compile runs them
        rm, rv = m.running_mean, m.running_var
        factor = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked + 1)
        y = _ops.batch_norm(xa, rm, rv, m.weight, m.bias, True, factor, m.eps, None, mask)
        m.num_batches_tracked.add_(1)
    y.backward(dy)
    return y, xa.grad


def check_steps(impl, shape, mshape, layout, dtype, momentum, kind="bool"):
    c = shape[1]
    w, b, _, _ = channel_tensors(c, torch.float64, seed=1)
    ref = MaskedReference(c, momentum, weight=w, bias=b)
    if impl == "numpy":
        m = NUMPY[len(shape)](c, momentum=momentum, dtype=str(dtype).removeprefix("torch."))
        m.weight, m.bias = w.numpy(), b.numpy()
    else:
        m = OURS[len(shape)](c, momentum=momentum, dtype=dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
    big = 1 if dtype == torch.float32 else 2**10  # float64 against float64: sums of ~50 terms, not one rounding
    for step in range(3):
        x = make(shape, dtype, seed=10 + step, layout=layout)
        dy = make(shape, dtype, seed=20 + step)
        mask = make_mask(mshape, seed=30 + step, kind=kind)
        if impl == "numpy":
            y = torch.from_numpy(m(x.numpy(), mask=mask.numpy()))
            dx = torch.from_numpy(m.backward(dy.numpy()))
            dweight, dbias = (torch.from_numpy(m.grads[k]) for k in ("weight", "bias"))
            buffers = (m.running_mean, m.running_var, m.num_batches_tracked)
            rm, rv, nbt = (torch.from_numpy(np.asarray(a)) for a in buffers)
        else:
            m.zero_grad(set_to_none=True)
            y, dx = run_torch(m, x, dy, mask, impl)
            dweight, dbias = m.weight.grad, m.bias.grad
            rm, rv, nbt = m.running_mean, m.running_var, m.num_batches_tracked
        xr = x.double().requires_grad_()
        y_ref = ref(xr, mask)
        y_ref.backward(dy.double())
        close(y, y_ref.detach(), ulps=16 * big)
        if dx is not None:
            close(dx, xr.grad, ulps=64 * big)
            close(dweight, ref.weight.grad, ulps=64 * big)
            close(dbias, ref.bias.grad, ulps=64 * big)
        ref.weight.grad = ref.bias.grad = None
        close(rm, ref.running_mean, ulps=16 * big)
        close(rv, ref.running_var, ulps=16 * big)
        assert int(nbt) == ref.num_batches_tracked
        if impl != "numpy" and layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["eager", "no_grad", "ops", "numpy"])
@pytest.mark.parametrize(("shape", "mshape", "layout"), CASES)
def test_equals_the_definition(impl, shape, mshape, layout):
    check_steps(impl, shape, mshape, layout, torch.float32, 0.1)


@pytest.mark.parametrize("impl", ["eager", "ops", "numpy"])
@pytest.mark.parametrize("kind", ["bool", "uint8"])
def test_float64_cumulative_average_and_0_1_masks(impl, kind):
    check_steps(impl, (6, 3, 8), (6, 8), "contiguous", torch.float64, None, kind)


@pytest.mark.parametrize("impl", ["torch", "numpy"])
def test_eval_ignores_the_mask(impl):
    x = make((4, 3, 5), torch.float32, seed=2)
    mask = make_mask((4, 5), seed=3)
    if impl == "numpy":
        m = bn.BatchNorm1d(3)
        m(x.numpy(), mask=mask.numpy())
        m.eval()
        np.testing.assert_array_equal(m(x.numpy(), mask=mask.numpy()), m(x.numpy()))
        return
    m = bnt.BatchNorm1d(3)
    m(x, mask=mask)
    m.eval()
    assert torch.equal(m(x, mask=mask), m(x))


def state(m):
    if isinstance(m, torch.nn.Module):
        return {k: v.clone() for k, v in m.state_dict().items()}
    return {k: np.array(v, copy=True) for k, v in m.state_dict().items()}


def assert_same_state(before, after):
    for k in before:
        assert (before[k] == after[k]).all(), k


@pytest.mark.parametrize("impl", ["torch", "ops", "numpy"])
@pytest.mark.parametrize("selected", [0, 1])
def test_a_mask_of_fewer_than_two_positions_raises_and_changes_nothing(impl, selected):
    x = make((4, 3, 5), torch.float32, seed=4)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, 2] = selected == 1
    m = (bn.BatchNorm1d if impl == "numpy" else bnt.BatchNorm1d)(3)
    if impl == "numpy":
        m(x.numpy(), mask=make_mask((4, 5), 5).numpy())
        call = lambda: m(x.numpy(), mask=mask.numpy())  # noqa: E731
    else:
        m(x, mask=make_mask((4, 5), 5))
        run = torch.compile(m, fullgraph=True, backend="eager") if impl == "ops" else m
        call = lambda: run(x.requires_grad_(), mask=mask)  # noqa: E731
    before = state(m)
    with pytest.raises(ValueError, match=f"more than 1 value per channel when training, got {selected} selected"):
        call()
    assert_same_state(before, state(m))


@pytest.mark.parametrize("impl", ["torch", "numpy"])
def test_bad_masks(impl):
    x = make((4, 3, 5), torch.float32, seed=6)
    ghost = (bn.BatchNorm1d if impl == "numpy" else bnt.BatchNorm1d)(3, virtual_batch_size=2)
    m = (bn.BatchNorm1d if impl == "numpy" else bnt.BatchNorm1d)(3)
    conv = (lambda t: t.numpy()) if impl == "numpy" else (lambda t: t)
    bad = [
        (torch.ones(4, 3, 5, dtype=torch.bool), ValueError, "broadcast"),  # with the channel axis
        (torch.ones(5, 4, dtype=torch.bool), ValueError, "broadcast"),
        (torch.ones(4, 5), TypeError, "bool"),  # float
        (torch.full((4, 5), 2, dtype=torch.uint8), ValueError, "only 0 and 1"),
    ]
    for mask, error, words in bad:
        with pytest.raises(error, match=words):
            m(conv(x), mask=conv(mask))
        m.eval()  # where the mask changes nothing, a bad one is refused all the same
        with pytest.raises(error, match=words):
            m(conv(x), mask=conv(mask))
        m.train()
    with pytest.raises(ValueError, match="virtual_batch_size cannot be combined with a mask"):
        ghost(conv(x), mask=conv(torch.ones(4, 5, dtype=torch.bool)))
    assert int(m.num_batches_tracked) == 0


def test_functional_batch_norm_takes_a_mask():
    x = make((4, 3, 5), torch.float64, seed=7).requires_grad_()
    mask = make_mask((4, 5), seed=8)
    w, b, rm, rv = channel_tensors(3, torch.float64, seed=9)
    ref = MaskedReference(3, 0.1, weight=w, bias=b)
    ref.running_mean, ref.running_var = rm.clone(), rv.clone()
    y = bnt.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, mask=mask)
    y_ref = ref(x.detach().requires_grad_(), mask)
    close(y, y_ref.detach(), ulps=2**10)
    close(rm, ref.running_mean, ulps=2**10)
    close(rv, ref.running_var, ulps=2**10)


def test_masked_ops_pass_opcheck_and_gradcheck():
    x = make((5, 3, 4, 2), torch.float64, seed=11, layout="channels_last")
    dy = make((5, 3, 4, 2), torch.float64, seed=12)
    mask = make_mask((5, 4, 2), seed=13)
    w, b, _, _ = channel_tensors(3, torch.float64, seed=14)
    _, mean, inv_std, _ = OPS.train_forward(x, w, b, 1e-5, mask)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    for op, args in (
        (OPS.train_forward, (x, w, b, 1e-5, mask)),
        (OPS.train_forward, (x, None, None, 1e-5, mask.to(torch.uint8))),
        (OPS.backward, (dy, x.detach(), mean, inv_std, w.detach(), False, mask)),
    ):
        torch.library.opcheck(op, args)

    def f(x, w, b):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        return _ops.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, None, mask)

    assert torch.autograd.gradcheck(f, (x, w, b))


class Net(torch.nn.Module):
    """conv or linear -> BatchNorm(mask) -> ReLU."""

    def __init__(self, kind):
        super().__init__()
        self.first = torch.nn.Conv1d(3, 6, 3, padding=1) if kind == "conv" else torch.nn.Linear(3, 6)
        self.bn = bnt.BatchNorm1d(6)

    def forward(self, x, mask):
        return torch.relu(self.bn(self.first(x), mask=mask))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("kind", "shape", "mshape"), [("conv", (6, 3, 10), (6, 10)), ("linear", (12, 3), (12,))])
def test_compiled_training_step_matches_eager(kind, shape, mshape):
    torch.manual_seed(0)
    eager = Net(kind)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    x = make(shape, torch.float32, seed=15)
    mask = make_mask(mshape, seed=16)
    outputs = [model(x, mask) for model in (eager, compiled)]
    for y in outputs:
        y.square().sum().backward()
    close(outputs[1], outputs[0], ulps=16)
    graphs = [str(g.graph) for g in counter.graphs if "batchnorm" in str(g.graph)]
    assert len(graphs) == 1
    assert "batchnorm.train_forward" in graphs[0]
    close_models(compiled_model, eager)
    assert compiled_model.bn.num_batches_tracked.item() == 1


def test_the_numpy_layers_make_no_copy_of_x():
    """A masked training step allocates its outputs (y, dx) and the mask's size, never a
    copy of x (tracemalloc sees NumPy's allocations)."""
    import tracemalloc

    x = make((32, 64, 128), torch.float32, seed=17).numpy()
    mask = make_mask((32, 128), seed=18).numpy()
    m = bn.BatchNorm1d(64)
    tracemalloc.start()
    try:
        y = m(x, mask=mask)
        dx = m.backward(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * x.nbytes + x.nbytes // 8  # y and dx, and the mask's size
    assert y.shape == dx.shape == x.shape
