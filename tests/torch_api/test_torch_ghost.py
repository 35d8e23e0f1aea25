"""Ghost batches (virtual_batch_size) of batchnorm.torch's modules against torch's chunk loop,
torch.cat([bn(c) for c in x.split(k)]) with torch.nn.BatchNorm*d run in float64: outputs,
gradients, running statistics and num_batches_tracked over several steps; eval; errors;
the ops (opcheck, gradcheck) and torch.compile(fullgraph=True)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402 - counts graphs, keeps them
from torch_cases import channel_tensors, close, close_models, make  # noqa: E402

import batchnorm.torch as bnt  # noqa: E402 - only once torch is known to be there

OPS = torch.ops.batchnorm
OURS = {2: bnt.BatchNorm1d, 3: bnt.BatchNorm1d, 4: bnt.BatchNorm2d, 5: bnt.BatchNorm3d}
THEIRS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def pair(shape, dtype, k, seed=0, **kw):
    """Ours with virtual_batch_size=k in dtype, torch's in float64, the same parameters."""
    c = shape[1]
    ours = OURS[len(shape)](c, dtype=dtype, virtual_batch_size=k, **kw)
    theirs = THEIRS[len(shape)](c, dtype=torch.float64, **kw)
    if ours.weight is not None:
        w, b, _, _ = channel_tensors(c, torch.float64, seed)
        with torch.no_grad():
            ours.weight.copy_(w)
            ours.bias.copy_(b)
            theirs.weight.copy_(w)
            theirs.bias.copy_(b)
    return ours, theirs


def step(ours, theirs, x, k, dy):
    """One training step of both; ours' x and dy, the loop's on float64 copies of them."""
    for m in (ours, theirs):
        m.zero_grad(set_to_none=True)
    xa = x.detach().clone().requires_grad_()
    y = ours(xa)
    y.backward(dy)
    xb = x.detach().double().requires_grad_()
    y_ref = torch.cat([theirs(c) for c in xb.split(k)])
    y_ref.backward(dy.double())
    return y, xa.grad, y_ref, xb.grad


def check_state(ours, theirs, ulps):
    if ours.weight is not None:
        close(ours.weight.grad, theirs.weight.grad, ulps=16 * ulps)
        close(ours.bias.grad, theirs.bias.grad, ulps=16 * ulps)
    if ours.track_running_stats:
        close(ours.running_mean, theirs.running_mean, ulps=4 * ulps)
        close(ours.running_var, theirs.running_var, ulps=4 * ulps)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


CASES = [  # shape, chunk, layout
    ((40, 6), 8, "contiguous"),  # (N, C), chunks of equal size
    ((43, 6), 8, "contiguous"),  # a smaller last chunk
    ((13, 5, 7), 4, "contiguous"),  # (N, C, L)
    ((13, 5, 7), 4, "every-other"),  # a strided view
    ((10, 4, 5, 6), 3, "contiguous"),  # NCHW
    ((10, 4, 5, 6), 3, "channels_last"),
    ((9, 3, 2, 3, 4), 4, "channels_last"),  # NCDHW, channels_last_3d
    ((6, 3, 4, 5), 1, "transposed"),  # one sample per chunk, in a view
]


@pytest.mark.parametrize(("shape", "k", "layout"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_torch_chunk_loop(shape, k, layout, dtype, momentum):
    ours, theirs = pair(shape, dtype, k, momentum=momentum)
    for seed in range(3):
        x = make(shape, dtype, seed=10 + seed, layout=layout)
        dy = make(shape, dtype, seed=20 + seed, layout=layout)
        y, dx, y_ref, dx_ref = step(ours, theirs, x, k, dy)
        close(y, y_ref, ulps=32)  # torch's own float64 loop rounds too
        close(dx, dx_ref, ulps=64)
        assert y.stride() == y_ref.to(dtype).stride() or layout in ("every-other", "transposed")
        check_state(ours, theirs, ulps=8)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_16_bit_input_with_float32_parameters(layout):
    shape, k = (12, 3, 4, 5), 5
    ours, theirs = pair(shape, torch.float32, k)
    x = make(shape, torch.bfloat16, seed=1, layout=layout)
    dy = make(shape, torch.bfloat16, seed=2, layout=layout)
    y, dx, y_ref, dx_ref = step(ours, theirs, x, k, dy)
    assert y.dtype == dx.dtype == torch.bfloat16
    close(y, y_ref, ulps=8)
    close(dx, dx_ref, ulps=32)
    close(ours.running_mean, theirs.running_mean, ulps=2**16)  # float32 buffers from bfloat16 data: float32's eps
    assert ours.num_batches_tracked.item() == 3


@pytest.mark.parametrize(("affine", "track"), [(False, True), (True, False), (False, False)])
def test_without_affine_or_running_statistics(affine, track):
    shape, k = (14, 3, 5), 4
    ours, theirs = pair(shape, torch.float64, k, affine=affine, track_running_stats=track)
    x, dy = make(shape, torch.float64, seed=3), make(shape, torch.float64, seed=4)
    y, dx, y_ref, dx_ref = step(ours, theirs, x, k, dy)
    close(y, y_ref, ulps=8)
    close(dx, dx_ref, ulps=32)
    check_state(ours, theirs, ulps=8)


def test_eval_and_a_batch_of_one_chunk_are_the_plain_module():
    shape = (12, 4, 3)
    ghost, _ = pair(shape, torch.float64, 4)
    plain = copy.deepcopy(ghost)
    plain.virtual_batch_size = None
    x = make(shape, torch.float64, seed=5)
    ghost(x)
    plain(x)  # different running statistics from here on; copy them over
    plain.load_state_dict(ghost.state_dict())
    ghost.eval()
    plain.eval()
    assert torch.equal(ghost(x), plain(x))
    ghost.train()
    plain.train()
    small = x[:4]  # N <= k: one chunk
    assert torch.equal(ghost(small), plain(small))
    assert ghost.num_batches_tracked.item() == plain.num_batches_tracked.item()


def test_a_chunk_of_one_value_per_channel_raises_and_changes_nothing():
    ours, theirs = pair((9, 3), torch.float64, 4)  # chunks 4, 4, 1
    before = copy.deepcopy(ours.state_dict())
    x = make((9, 3), torch.float64, seed=6)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size "):
        ours(x)
    with pytest.raises(ValueError, match=r"torch.Size\(\[1, 3\]\)"):  # torch's words for the last chunk
        torch.cat([theirs(c) for c in x.split(4)])
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_virtual_batch_size_must_be_a_positive_int(bad):
    with pytest.raises((TypeError, ValueError), match="virtual_batch_size"):
        bnt.BatchNorm1d(3, virtual_batch_size=bad)


def test_sync_batch_norm_refuses_virtual_batch_size():
    with pytest.raises(ValueError, match="SyncBatchNorm does not support virtual_batch_size"):
        bnt.SyncBatchNorm(3, virtual_batch_size=4)
    m = bnt.SyncBatchNorm(3)
    m.virtual_batch_size = 4
    with pytest.raises(ValueError, match="SyncBatchNorm does not support virtual_batch_size"):
        m(torch.randn(8, 3))


def test_attribute_survives_copies_and_shows_in_repr():
    m = bnt.BatchNorm2d(3, virtual_batch_size=16)
    assert "virtual_batch_size=16" in repr(m)
    assert copy.deepcopy(m).virtual_batch_size == 16
    assert list(m.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    assert bnt.convert(torch.nn.BatchNorm2d(3)).virtual_batch_size is None
    assert "virtual_batch_size" not in repr(bnt.BatchNorm2d(3))


def test_no_grad_path_and_eager_autograd_agree():
    shape, k = (11, 4, 6), 3
    a, _ = pair(shape, torch.float64, k)
    b = copy.deepcopy(a)
    x = make(shape, torch.float64, seed=7)
    with torch.no_grad():
        y_no_grad = a(x)
    y = b(x.clone().requires_grad_())
    assert torch.equal(y_no_grad, y.detach())
    assert torch.equal(a.running_var, b.running_var)


def test_second_order_gradients_raise():
    m = bnt.BatchNorm1d(3, virtual_batch_size=2, dtype=torch.float64)
    x = make((6, 3), torch.float64, seed=8).requires_grad_()

    def second_order():  # eager raises in the first grad
        (dx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        torch.autograd.grad(dx.sum(), x)

    with pytest.raises(RuntimeError, match="no second-order gradients"):
        second_order()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_passes_for_the_ghost_ops(layout):
    x = make((7, 4, 3, 5), torch.float64, seed=9, layout=layout)
    dy = make((7, 4, 3, 5), torch.float64, seed=10, layout=layout)
    w, b, rm, rv = channel_tensors(4, torch.float64, seed=11)
    _, mean, inv_std, var = OPS.ghost_forward(x, w, b, 1e-5, 3)
    assert mean.shape == (3, 4)
    x.requires_grad_()
    w.requires_grad_()
    cases = [
        (OPS.ghost_forward, (x, w, b, 1e-5, 3)),
        (OPS.ghost_forward, (x, None, None, 1e-5, 2)),
        (OPS.ghost_backward, (dy, x.detach(), mean, inv_std, w.detach(), 3)),
        (OPS.update_running_chunks, (rm.clone(), rv.clone(), mean, var, [0.1, 0.1, 0.1], [45, 45, 15])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_gradcheck_in_float64(path):
    from batchnorm.torch import _ops
    from batchnorm.torch._functional import ghost_batch_norm

    x = make((7, 3, 4), torch.float64, seed=12)
    w, b, rm, rv = channel_tensors(3, torch.float64, seed=13)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        if path == "eager":
            return ghost_batch_norm(x, rm.clone(), rv.clone(), w, b, [0.1] * 3, 1e-5, 3)
        return _ops.batch_norm(x, rm.clone(), rv.clone(), w, b, True, [0.1] * 3, 1e-5, 3)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("layout", "dynamic"), [("contiguous", None), ("channels_last", None), ("contiguous", True)])
def test_compiled_ghost_batches_match_eager(layout, dynamic):
    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), bnt.BatchNorm2d(8, virtual_batch_size=4), torch.nn.ReLU()
    )
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True, dynamic=dynamic)
    x = make((10, 3, 6, 6), torch.float32, seed=14, layout=layout)
    outputs = [model(x) for model in (eager, compiled)]
    for y in outputs:
        y.square().sum().backward()
    close(outputs[1], outputs[0], ulps=16)
    graphs = [str(g.graph) for g in counter.graphs if "batchnorm" in str(g.graph)]
    assert len(graphs) == 1  # one graph (fullgraph: no graph break; dynamic shapes add an empty one)
    graph = graphs[0]
    assert "batchnorm.ghost_forward" in graph
    assert "batchnorm.update_running_chunks" in graph
    close_models(compiled_model, eager)
    assert compiled_model[1].num_batches_tracked.item() == 3
