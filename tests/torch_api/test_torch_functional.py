"""batchnorm.torch.batch_norm against torch.nn.functional.batch_norm on every layout and
dtype: output (values and strides), input/weight/bias gradients and running statistics."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_cases import LOW, channel_tensors, close, make  # noqa: E402

import batchnorm.torch as bnt  # noqa: E402 - only once torch is known to be there

F = torch.nn.functional
SHAPES = {"NC": (6, 5), "NCL": (4, 5, 7), "NCHW": (3, 5, 4, 6), "NCDHW": (2, 5, 3, 4, 3)}
LAYOUTS = {
    "NC": ("contiguous",),
    "NCL": ("contiguous", "every-other", "transposed"),
    "NCHW": ("contiguous", "channels_last", "every-other", "transposed"),
    "NCDHW": ("contiguous", "channels_last", "every-other"),
}
CASES = [(s, lay) for s, lays in LAYOUTS.items() for lay in lays]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def run(fn, x, params, training, grad_out, momentum=0.1):
    """fn's output, its gradients in (x, weight, bias) and the running statistics after the call."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    w, b, rm, rv = (t.clone() for t in params)
    w.requires_grad_()
    b.requires_grad_()
    y = fn(x, rm, rv, w, b, training, momentum, 1e-5)
    grads = torch.autograd.grad(y, (x, w, b), grad_out)
    return y, grads, (rm, rv)


def compare(x, params, training, momentum=0.1):
    """Ours against torch: dtypes and memory formats those of torch in x's dtype, values
    those of torch in float64 on the same (rounded) values, to a few roundings. (In 16 bits
    torch's own CPU kernel rounds intermediate sums, so it is not the reference for values.)"""
    grad_out = make(tuple(x.shape), x.dtype, seed=7, layout="contiguous")
    y0, g0, r0 = run(F.batch_norm, x, params, training, grad_out, momentum)
    y1, g1, r1 = run(bnt.batch_norm, x, params, training, grad_out, momentum)
    y64, g64, r64 = run(F.batch_norm, x.double(), [t.double() for t in params], training, grad_out.double(), momentum)
    assert y1.stride() == y0.stride()  # torch's memory format
    assert g1[0].stride() == g0[0].stride()
    for ours, theirs in zip((y1, *g1, *r1), (y0, *g0, *r0), strict=True):
        assert ours.dtype == theirs.dtype
    close(y1, y64)
    close(g1[0], g64[0], ulps=8)
    for ours, exact in zip(g1[1:] + r1, g64[1:] + r64, strict=True):
        close(ours, exact, ulps=16)  # sums over the batch: their float32 rounding grows with it


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_equals_torch_on_every_layout_and_dtype(shape, layout, dtype, training):
    x = make(SHAPES[shape], dtype, seed=1, layout=layout)
    compare(x, channel_tensors(5, dtype, seed=2), training)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mixed_16_bit_input_with_float32_parameters(dtype, layout, training):
    x = make(SHAPES["NCHW"], dtype, seed=3, layout=layout)
    compare(x, channel_tensors(5, torch.float32, seed=4), training)


def test_momentum_none_is_not_a_functional_argument_but_zero_momentum_keeps_the_statistics():
    x = make(SHAPES["NCHW"], torch.float32, seed=5)
    compare(x, channel_tensors(5, torch.float32, seed=6), True, momentum=0.0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_parameters_or_running_statistics(training):
    x = make(SHAPES["NCL"], torch.float32, seed=8)
    _, _, rm, rv = channel_tensors(5, torch.float32, seed=9)
    stats = (None, None) if training else (rm, rv)
    exact = F.batch_norm(x.double(), *(None if t is None else t.double() for t in stats), training=training)
    close(bnt.batch_norm(x, *stats, training=training), exact)


def test_empty_batch_gives_an_empty_output_and_keeps_the_running_statistics():
    x = torch.zeros(0, 5, 4)
    _, _, rm, rv = channel_tensors(5, torch.float32, seed=10)
    before = rm.clone(), rv.clone()
    y = bnt.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, before[0])
    assert torch.equal(rv, before[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_parameters_and_running_statistics(training):
    """Per-channel tensors that are views with a stride: read, and in training updated in
    place (through a copy, written back), as torch's."""
    x = make((4, 5, 7), torch.float32, seed=11, layout="contiguous")

    def strided():
        return [torch.stack([t, t]).t().reshape(-1)[::2] for t in channel_tensors(5, torch.float32, seed=12)]

    theirs, ours = strided(), strided()
    assert not ours[2].is_contiguous()
    y0 = F.batch_norm(x, theirs[2], theirs[3], theirs[0], theirs[1], training, 0.3, 1e-5)
    y1 = bnt.batch_norm(x, ours[2], ours[3], ours[0], ours[1], training, 0.3, 1e-5)
    close(y1, y0)
    for a, b in zip(ours[2:], theirs[2:], strict=True):
        assert a.stride() == (2,)
        close(a, b)


def test_large_mean_is_stable():
    """Data of mean 1e4 and std 1e-2 in float32: torch's CPU kernel is stable too."""
    g = torch.Generator().manual_seed(11)
    x = (1e4 + 1e-2 * torch.randn(64, 3, 16, generator=g, dtype=torch.float64)).float()
    rm, rv = torch.zeros(3), torch.ones(3)
    bnt.batch_norm(x, rm, rv, training=True, momentum=1.0)
    exact = x.double().var(dim=(0, 2), unbiased=True)
    assert torch.allclose(rv.double(), exact, rtol=1e-5, atol=0)


BAD = {
    "eval without running_mean": ({"running_mean": None, "running_var": None}, RuntimeError),
    "running_mean size": ({"running_mean": torch.zeros(4)}, RuntimeError),
    "running_var size": ({"running_var": torch.ones(4)}, RuntimeError),
    "weight size": ({"weight": torch.ones(4)}, RuntimeError),
    "bias size": ({"bias": torch.ones(4)}, RuntimeError),
    "one of the running statistics": ({"running_var": None, "training": True}, ValueError),
    "zero eps in training": ({"eps": 0.0, "training": True}, ValueError),
    "negative eps": ({"eps": -1.0}, ValueError),
}


@pytest.mark.parametrize("case", BAD)
def test_errors_are_torchs(case):
    change, error = BAD[case]
    args = {
        "input": make((4, 3, 5), torch.float32, seed=12),
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
    }
    args.update(change)
    with pytest.raises(error) as theirs:
        F.batch_norm(**args)
    with pytest.raises(error) as ours:
        bnt.batch_norm(**args)
    assert str(ours.value) == str(theirs.value)


def test_one_value_per_channel_in_training_is_torchs_value_error():
    x = torch.ones(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bnt.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
    bnt.batch_norm(x, torch.zeros(3), torch.ones(3), training=False)  # eval takes it


def test_a_tensor_off_the_cpu_is_refused_with_its_device():
    x = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="meta"):
        bnt.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="weight is on meta"):
        bnt.batch_norm(torch.ones(4, 3), None, None, torch.ones(3, device="meta"), training=True)
