"""TwoBPLinear against nn.Linear, in normal and split mode, on both backends."""

import pytest
import torch
from torch import nn

import twobp
from checks import assert_close

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]


def _pair(in_f, out_f, bias, dtype, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    m = twobp.TwoBPLinear(in_f, out_f, bias=bias, dtype=dtype)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _reference_grads(ref, x, dy):
    """float64 autograd on copies of the module's parameters."""
    ref64 = nn.Linear(ref.in_features, ref.out_features, bias=ref.bias is not None, dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    y = ref64(x64)
    y.backward(dy.double())
    return y, x64.grad, ref64.weight.grad, (ref64.bias.grad if ref64.bias is not None else None)


def test_drop_in_for_nn_linear():
    ref, m = _pair(13, 7, True, torch.float32)
    assert isinstance(m, nn.Linear)
    assert list(m.state_dict()) == list(ref.state_dict())
    assert repr(m).replace("TwoBPLinear", "Linear") == repr(ref)
    torch.manual_seed(3)
    a, b = nn.Linear(13, 7), twobp.TwoBPLinear(13, 7)
    torch.manual_seed(3)
    a = nn.Linear(13, 7)
    torch.manual_seed(3)
    b = twobp.TwoBPLinear(13, 7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias), "init must match nn.Linear's"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("split", [False, True])
def test_matches_float64_autograd(backend, dtype, bias, split):
    ref, m = _pair(53, 29, bias, dtype)
    torch.manual_seed(1)
    x = torch.randn(37, 53, dtype=dtype).requires_grad_()
    dy = torch.randn(37, 29, dtype=dtype)
    y64, dx64, dw64, db64 = _reference_grads(ref, x, dy)
    with twobp.use_backend(backend):
        if split:
            with twobp.split_backward(microbatch=0):
                y = m(x)
            y.backward(dy)
            assert m.weight.grad is None, "p1 must leave weight.grad untouched"
            assert bias is False or m.bias.grad is None
            assert_close(x.grad, dx64, dtype, name="dX after p1")
            twobp.backward_p2(m)
        else:
            y = m(x)
            y.backward(dy)
    assert_close(y, y64, dtype, name="Y")
    assert_close(x.grad, dx64, dtype, name="dX")
    assert_close(m.weight.grad, dw64, dtype, name="dW", scale=2)
    if bias:
        assert_close(m.bias.grad, db64, dtype, name="db", scale=2)
    assert twobp.default_store().is_empty()


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_input_and_accumulation_over_microbatches(backend):
    ref, m = _pair(11, 6, True, torch.float32)
    torch.manual_seed(2)
    xs = [torch.randn(2, 5 + i, 11) for i in range(3)]
    dys = [torch.randn(2, 5 + i, 6) for i in range(3)]
    for x, dy in zip(xs, dys):
        ref(x).backward(dy)
    with twobp.use_backend(backend):
        for i, (x, dy) in enumerate(zip(xs, dys)):
            with twobp.split_backward(microbatch=i):
                y = m(x)
            assert y.shape == (2, 5 + i, 6)
            y.backward(dy)
        assert twobp.pending_microbatches(m) == [0, 1, 2]
        twobp.backward_p2(m, microbatches=[1])
        assert twobp.pending_microbatches(m) == [0, 2]
        twobp.backward_p2(m)
    assert_close(m.weight.grad, ref.weight.grad.double(), name="dW")
    assert_close(m.bias.grad, ref.bias.grad.double(), name="db")


def test_batched_p2_equals_per_microbatch_p2():
    _, a = _pair(9, 4, True, torch.float32)
    _, b = _pair(9, 4, True, torch.float32)
    torch.manual_seed(4)
    data = [(torch.randn(3 + i, 9), torch.randn(3 + i, 4)) for i in range(4)]
    for m, batched in ((a, True), (b, False)):
        for i, (x, dy) in enumerate(data):
            with twobp.split_backward(microbatch=i):
                y = m(x)
            y.backward(dy)
        twobp.backward_p2(m, batched=batched)
    assert_close(a.weight.grad, b.weight.grad.double(), name="dW batched vs not")
    assert_close(a.bias.grad, b.bias.grad.double(), name="db batched vs not")


def test_p2_accumulates_into_existing_fp32_grad_of_fp16_params():
    _, m = _pair(8, 5, True, torch.float16)
    if hasattr(m.weight, "grad_dtype"):  # torch >= 2.10 checks .grad's dtype unless told otherwise
        m.weight.grad_dtype = m.bias.grad_dtype = torch.float32
    m.weight.grad = torch.randn(5, 8)  # fp32 master gradient, not zero
    m.bias.grad = torch.randn(5)
    start_w, start_b = m.weight.grad.clone(), m.bias.grad.clone()
    torch.manual_seed(5)
    x = torch.randn(6, 8, dtype=torch.float16)
    dy = torch.randn(6, 5, dtype=torch.float16)
    with twobp.split_backward(microbatch=0):
        y = m(x)
    y.backward(dy)
    twobp.backward_p2(m)
    assert m.weight.grad.dtype == torch.float32
    assert_close(m.weight.grad, start_w.double() + dy.double().t() @ x.double(), torch.float16, name="dW")
    assert_close(m.bias.grad, start_b.double() + dy.double().sum(0), torch.float16, name="db")


def test_store_bytes_follow_the_lifetime():
    _, m = _pair(16, 8, True, torch.float32)
    store = twobp.default_store()
    x = torch.randn(10, 16, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        y = m(x)
    # forward: p2 keeps x (p1 of a linear needs only W)
    assert store.live_bytes == x.nbytes
    y.backward(torch.randn(10, 8))
    # after p1: x and dy
    assert store.live_bytes == x.nbytes + 10 * 8 * 4
    assert store.peak_bytes == store.live_bytes
    report = twobp.memory_report()
    assert [(e.microbatch, e.state, e.nbytes) for e in report.entries] == [(0, "ready", store.live_bytes)]
    twobp.backward_p2(m)
    assert store.live_bytes == 0 and store.is_empty()
    assert store.peak_bytes == x.nbytes + 320


def test_shared_storage_counted_once():
    _, a = _pair(6, 6, False, torch.float32)
    _, b = _pair(6, 6, False, torch.float32)
    x = torch.randn(4, 6, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        y = a(x) + b(x)  # both keep the same x
    assert twobp.default_store().live_bytes == x.nbytes
    y.sum().backward()
    twobp.backward_p2(a)
    twobp.backward_p2(b)


def test_no_grad_input_frozen_weight_and_no_grad_mode():
    _, m = _pair(7, 3, True, torch.float32)
    store = twobp.default_store()
    with torch.no_grad(), twobp.split_backward(microbatch=0):
        m(torch.randn(2, 7))
    assert store.is_empty(), "nothing may be stored under no_grad"

    x = torch.randn(4, 7)  # input needs no grad: first layer of a model
    with twobp.split_backward(microbatch=1):
        y = m(x)
    y.sum().backward()
    twobp.backward_p2(m)
    assert_close(m.weight.grad, torch.ones(4, 3).double().t() @ x.double(), name="dW")

    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    x = torch.randn(4, 7, requires_grad=True)
    with twobp.split_backward(microbatch=2):
        y = m(x)
    assert store.is_empty(), "frozen weights queue no p2"
    y.sum().backward()
    assert_close(x.grad, torch.ones(4, 3).double() @ m.weight.double(), name="dX")


def test_bad_input_errors_name_the_fix():
    m = twobp.TwoBPLinear(5, 3)
    with pytest.raises(ValueError, match="in_features=5"):
        m(torch.randn(2, 4))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on meta but weight is on cpu"):
        m(torch.randn(2, 5, device="meta"))
    with pytest.raises(TypeError, match="microbatch must be an int"):
        with twobp.split_backward(microbatch="0"):
            pass


def test_split_protocol_errors():
    m = twobp.TwoBPLinear(5, 3)
    x = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="nothing pending for micro-batch"):
        twobp.backward_p2(m, microbatches=[0])
    with twobp.split_backward(microbatch=0):
        y = m(x)
    with pytest.raises(RuntimeError, match="before its p1"):
        twobp.backward_p2(m, microbatches=[0])
    with pytest.raises(RuntimeError, match="before its p1"):
        twobp.backward_p2(m, microbatches=0)
    y.sum().backward()
    twobp.backward_p2(m, microbatches=[0])
    with pytest.raises(RuntimeError, match="nothing pending"):
        twobp.backward_p2(m, microbatches=[0])


def test_leak_is_reported_at_next_step():
    m = twobp.TwoBPLinear(5, 3)
    store = twobp.default_store()
    with twobp.split_backward(microbatch=7):
        m(torch.randn(2, 5, requires_grad=True)).sum().backward()
    with pytest.raises(twobp.LeakError, match="mb=7"):
        store.begin_step()
    store.clear()
    store.begin_step()


def test_in_place_edit_of_saved_input_is_caught():
    m = twobp.TwoBPLinear(5, 3)
    x = torch.randn(2, 5)
    with twobp.split_backward(microbatch=0):
        y = m(x)
    y.sum().backward()
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        twobp.backward_p2(m)
    twobp.default_store().clear()


def test_backend_switch_dispatches_to_the_kernels(monkeypatch):
    """The triton backend must really launch kernels/linear.py (not fall back silently)."""
    from twobp.kernels import linear as kl

    calls = []
    for name in ("linear_fwd", "linear_dx", "linear_dw"):
        real = getattr(kl, name)
        monkeypatch.setattr(kl, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    m = twobp.TwoBPLinear(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    with twobp.use_backend("triton"):
        with twobp.split_backward(microbatch=0):
            y = m(x)
        y.sum().backward()
        twobp.backward_p2(m)
    assert calls == ["linear_fwd", "linear_dx", "linear_dw"]
    calls.clear()
    with twobp.use_backend("torch"):
        m(x).sum().backward()
    assert calls == []


def test_normal_mode_keeps_autograd_semantics():
    """Outside a split region: retain_graph, autograd.grad on a subset, and in-place checks
    behave as with nn.Linear (torch.distributed.pipelining relies on the first two)."""
    ref, m = _pair(6, 4, True, torch.float32)
    x = torch.randn(3, 6, requires_grad=True)
    y, y_ref = m(x), ref(x)
    dy = torch.randn(3, 4)
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy, retain_graph=True)
    assert m.weight.grad is None
    dw, db = torch.autograd.grad(y, [m.weight, m.bias], dy)
    dw_ref, db_ref = torch.autograd.grad(y_ref, [ref.weight, ref.bias], dy)
    for a, b in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert_close(a, b.double())
    x2 = torch.randn(3, 6)
    y = m(x2)
    x2.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_p2_of_a_module_without_trainable_twobp_weights_is_a_no_op():
    """A pipeline stage of only activations (or frozen twobp layers) owes no p2: naming its
    micro-batches must not raise, while a stage that owes p2 still does."""
    stage = nn.Sequential(nn.Tanh(), twobp.TwoBPLinear(3, 3).requires_grad_(False))
    x = torch.randn(2, 3, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        y = stage(x)
    y.sum().backward()
    assert twobp.backward_p2(stage, microbatches=[0]) == 0
    with pytest.raises(RuntimeError, match="nothing pending"):
        twobp.backward_p2(twobp.TwoBPLinear(3, 3), microbatches=[0])
