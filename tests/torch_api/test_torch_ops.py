"""The torch.library ops and autograd: opcheck, gradcheck in float64 (eager and through the
ops), no_grad / inference_mode, second-order gradients, and torch.compile(fullgraph=True)
of a conv -> BN -> ReLU model against the same model run eagerly."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402 - counts graphs, keeps them
from torch_cases import channel_tensors, close, close_models, make  # noqa: E402

import batchnorm.torch as bnt  # noqa: E402 - only once torch is known to be there
from batchnorm.torch import _ops  # noqa: E402

OPS = torch.ops.batchnorm


def float64_case(layout: str = "contiguous"):
    x = make((3, 4, 3, 5), torch.float64, seed=1, layout=layout)
    w, b, rm, rv = channel_tensors(4, torch.float64, seed=2)
    return x, w, b, rm, rv


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "every-other"])
def test_opcheck_passes_for_every_op(layout):
    x, w, b, rm, rv = float64_case(layout)
    dy = make(tuple(x.shape), torch.float64, seed=3, layout=layout)
    x.requires_grad_()
    w.requires_grad_()
    cases = [
        (OPS.train_forward, (x, w, b, 1e-5)),
        (OPS.train_forward, (x, None, None, 1e-5)),
        (OPS.infer_forward, (x, w, b, rm, rv, 1e-5)),
        (OPS.backward, (dy, x.detach(), rm, rv.rsqrt(), w.detach(), False)),
        (OPS.backward, (dy, x.detach(), rm, rv.rsqrt(), None, True)),
        (OPS.update_running, (rm.clone(), rv.clone(), rm, rv, 0.1, 45)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_opcheck_in_16_bits_with_float32_parameters():
    x = make((4, 3, 5), torch.bfloat16, seed=4)
    w, b, rm, rv = channel_tensors(3, torch.float32, seed=5)
    torch.library.opcheck(OPS.train_forward, (x, w, b, 1e-5))
    torch.library.opcheck(OPS.infer_forward, (x, w, b, rm, rv, 1e-5))
    torch.library.opcheck(OPS.update_running, (rm.bfloat16(), rv.bfloat16(), rm, rv, 0.5, 20))


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_in_float64(path, training):
    x, w, b, rm, rv = float64_case()
    fn = bnt.batch_norm if path == "eager" else _ops.batch_norm
    inputs = tuple(t.requires_grad_() for t in (x, w, b))

    def f(x, w, b):  # fresh running statistics every call: gradcheck calls it many times
        return fn(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_eager_and_ops_give_the_same_values_and_gradients(path):
    x, w, b, rm, rv = float64_case("channels_last")
    fn = bnt.batch_norm if path == "eager" else _ops.batch_norm
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = fn(x, rm, rv, w, b, True, 0.3, 1e-5)
    grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y) + x.detach())
    rm0, rv0 = channel_tensors(4, torch.float64, seed=2)[2:]
    y_ref = torch.nn.functional.batch_norm(x, rm0, rv0, w, b, True, 0.3, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), torch.ones_like(y) + x.detach())
    for ours, exact in zip((y, *grads, rm, rv), (y_ref, *grads_ref, rm0, rv0), strict=True):
        close(ours, exact, ulps=64)
    assert y.stride() == y_ref.stride()


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_runs_under_no_grad_and_inference_mode(path, mode):
    x, w, b, rm, rv = float64_case()
    w.requires_grad_()
    fn = bnt.batch_norm if path == "eager" else _ops.batch_norm
    rm0, rv0 = rm.clone(), rv.clone()
    expected = torch.nn.functional.batch_norm(x, rm0, rv0, w, b, True, 0.1, 1e-5)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        y = fn(x, rm, rv, w, b, True, 0.1, 1e-5)
        y_eval = fn(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert not y.requires_grad
    close(y, expected.detach(), ulps=64)
    close(rm, rm0, ulps=64)  # the running statistics still move, as torch's do
    close(rv, rv0, ulps=64)
    close(y_eval, torch.nn.functional.batch_norm(x, rm0, rv0, w, b, False).detach(), ulps=64)


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_second_order_gradients_raise_a_clear_error(path):
    x, w, b, rm, rv = float64_case()
    x.requires_grad_()
    fn = bnt.batch_norm if path == "eager" else _ops.batch_norm
    y = fn(x, rm, rv, w, b, True, 0.1, 1e-5)

    def second_order():  # eager raises in the first grad, the ops in the second
        (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        torch.autograd.grad(dx.sum(), x)

    with pytest.raises(RuntimeError, match="no second-order gradients"):
        second_order()


def small_model(bn: type) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bn(8), torch.nn.ReLU())


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
def test_compiled_model_matches_eager_in_a_training_step_and_in_eval():
    eager = small_model(bnt.BatchNorm2d)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    x = make((4, 3, 8, 8), torch.float32, seed=6)
    outputs = [model(x) for model in (eager, compiled)]
    for y in outputs:
        y.square().sum().backward()
    close(outputs[1], outputs[0], ulps=16)
    assert counter.frame_count == 1  # one graph: no graph break
    assert "batchnorm.train_forward" in str(counter.graphs[0].graph)
    assert "batchnorm.update_running" in str(counter.graphs[0].graph)
    close_models(compiled_model, eager)
    assert compiled_model[1].num_batches_tracked.item() == 1
    eager.eval()
    compiled.eval()
    close(compiled(x), eager(x), ulps=16)
    assert "batchnorm.infer_forward" in str(counter.graphs[-1].graph)
