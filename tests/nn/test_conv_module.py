"""TwoBPConv2d against nn.Conv2d, in normal and split mode, on both backends; store bytes; errors."""

import inspect

import pytest
import torch
from torch import nn

import twobp
from checks import assert_close
from twobp.nn.conv import TwoBPConv2d

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]
# constructor kwargs (besides in/out channels) and the input's (N, H, W)
CONFIGS = {
    "3x3-p1": (dict(kernel_size=3, padding=1), (2, 7, 7)),
    "2x3-s2-d2-nobias": (dict(kernel_size=(2, 3), stride=2, dilation=(1, 2), padding=(1, 0), bias=False), (2, 9, 8)),
    "2x4-same": (dict(kernel_size=(2, 4), padding="same"), (1, 6, 7)),  # torch's asymmetric 'same'
    "1x1-valid-s2": (dict(kernel_size=1, stride=2, padding="valid"), (3, 7, 9)),
}
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def _pair(c, o, kwargs, dtype, seed=0):
    torch.manual_seed(seed)
    ref = nn.Conv2d(c, o, dtype=dtype, **kwargs)
    m = TwoBPConv2d(c, o, dtype=dtype, **kwargs)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _reference_grads(ref, x, dy):
    """float64 autograd on copies of the module's parameters."""
    ref64 = nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel_size, stride=ref.stride, padding=ref.padding,
                      dilation=ref.dilation, bias=ref.bias is not None, dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    y = ref64(x64)
    y.backward(dy.double())
    return y.detach(), x64.grad, ref64.weight.grad, (ref64.bias.grad if ref64.bias is not None else None)


def test_drop_in_for_nn_conv2d():
    kwargs = dict(kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=2)
    ref, m = _pair(3, 5, kwargs, torch.float32)
    assert isinstance(m, nn.Conv2d) and isinstance(m, twobp.TwoBPModule)
    assert list(m.state_dict()) == list(ref.state_dict())
    assert repr(m).replace("TwoBPConv2d", "Conv2d") == repr(ref)
    assert inspect.signature(TwoBPConv2d).parameters.keys() == inspect.signature(nn.Conv2d).parameters.keys()
    torch.manual_seed(3)
    a = nn.Conv2d(3, 5, **kwargs)
    torch.manual_seed(3)
    b = TwoBPConv2d(3, 5, **kwargs)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias), "init must match nn.Conv2d's"
    assert vars(a).keys() == vars(b).keys(), "no extra state: convert() swaps __class__"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [False, True], ids=["normal", "split"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_float64_autograd(config, split, dtype, backend):
    kwargs, (n, h, w) = CONFIGS[config]
    ref, m = _pair(3, 5, kwargs, dtype)
    bias = m.bias is not None
    torch.manual_seed(1)
    x = torch.randn(n, 3, h, w, dtype=dtype).requires_grad_()
    dy = torch.randn(ref(x).shape, dtype=dtype)
    y64, dx64, dw64, db64 = _reference_grads(ref, x, dy)
    with twobp.use_backend(backend):
        if split:
            with twobp.split_backward(microbatch=0):
                y = m(x)
            y.backward(dy)
            assert m.weight.grad is None, "p1 must leave weight.grad untouched"
            assert not bias or m.bias.grad is None
            assert_close(x.grad, dx64, dtype, name="dX after p1")
            twobp.backward_p2(m)
        else:
            y = m(x)
            y.backward(dy)
    assert_close(y, y64, dtype, name="y")
    assert_close(x.grad, dx64, dtype, name="dX")
    assert_close(m.weight.grad, dw64, dtype, name="dW", scale=2)
    if bias:
        assert_close(m.bias.grad, db64, dtype, name="db", scale=2)
    assert twobp.default_store().is_empty()


@pytest.mark.parametrize("backend", BACKENDS)
def test_microbatches_of_different_sizes_accumulate(backend):
    ref, m = _pair(3, 4, dict(kernel_size=3, stride=2, padding=1), torch.float32)
    torch.manual_seed(2)
    xs = [torch.randn(nb, 3, 7, 6) for nb in (1, 3, 2)]
    dys = [torch.randn(nb, 4, 4, 3) for nb in (1, 3, 2)]
    for x, dy in zip(xs, dys):
        ref(x).backward(dy)
    with twobp.use_backend(backend):
        for i, (x, dy) in enumerate(zip(xs, dys)):
            with twobp.split_backward(microbatch=i):
                y = m(x)
            y.backward(dy)
        assert twobp.pending_microbatches(m) == [0, 1, 2]
        twobp.backward_p2(m, microbatches=[1])
        assert twobp.pending_microbatches(m) == [0, 2]
        twobp.backward_p2(m)  # the other two, batched in one launch
    assert_close(m.weight.grad, ref.weight.grad.double(), name="dW")
    assert_close(m.bias.grad, ref.bias.grad.double(), name="db")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_p2_equals_per_microbatch_p2(backend):
    _, a = _pair(3, 4, dict(kernel_size=(2, 3), padding=1), torch.float32)
    _, b = _pair(3, 4, dict(kernel_size=(2, 3), padding=1), torch.float32)
    torch.manual_seed(4)
    data = [(torch.randn(1 + i, 3, 6, 5), torch.randn(1 + i, 4, 7, 5)) for i in range(3)]
    with twobp.use_backend(backend):
        for m, batched in ((a, True), (b, False)):
            for i, (x, dy) in enumerate(data):
                with twobp.split_backward(microbatch=i):
                    y = m(x)
                y.backward(dy)
            twobp.backward_p2(m, batched=batched)
    assert_close(a.weight.grad, b.weight.grad.double(), name="dW batched vs not")
    assert_close(a.bias.grad, b.bias.grad.double(), name="db batched vs not")


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_holds_x_and_dy_which_outweigh_dw(backend):
    """After p1 the store holds exactly x and dy of the conv: for a conv they are larger than dW."""
    _, m = _pair(4, 8, dict(kernel_size=3, padding=1), torch.float32)
    torch.manual_seed(5)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    dy = torch.randn(2, 8, 8, 8)
    store = twobp.default_store()
    with twobp.use_backend(backend):
        with twobp.split_backward(microbatch=0):
            y = m(x)
        assert store.live_bytes == x.nbytes, "before p1: x (the shape stand-in for p1 owns no storage)"
        y.backward(dy)
        assert store.live_bytes == x.nbytes + dy.nbytes, "after p1: x and dy, nothing else"
        assert x.nbytes + dy.nbytes > m.weight.nbytes, "the conv caveat: what p2 keeps outweighs dW"
        assert store.report().entries[0].state == "ready"
        twobp.backward_p2(m)
    assert store.live_bytes == 0 and store.is_empty()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input(backend):
    ref, m = _pair(3, 5, dict(kernel_size=3, padding=1), torch.float32)
    torch.manual_seed(6)
    x = torch.randn(3, 6, 7, requires_grad=True)
    dy = torch.randn(5, 6, 7)
    y64, dx64, dw64, db64 = _reference_grads(ref, x.unsqueeze(0), dy.unsqueeze(0))
    with twobp.use_backend(backend):
        with twobp.split_backward(microbatch=0):
            y = m(x)
        assert y.shape == (5, 6, 7)
        y.backward(dy)
        twobp.backward_p2(m)
    assert_close(y, y64[0], name="y")
    assert_close(x.grad, dx64[0], name="dX")
    assert_close(m.weight.grad, dw64, name="dW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_trainable_bias_and_frozen_input(backend):
    ref, m = _pair(3, 5, dict(kernel_size=3), torch.float32)
    m.weight.requires_grad_(False)
    ref.weight.requires_grad_(False)
    torch.manual_seed(7)
    x = torch.randn(2, 3, 6, 6)  # the first layer: no dX wanted
    dy = torch.randn(2, 5, 4, 4)
    ref(x).backward(dy)
    with twobp.use_backend(backend):
        with twobp.split_backward(microbatch=0):
            y = m(x)
        y.backward(dy)
        assert m.bias.grad is None
        twobp.backward_p2(m)
    assert m.weight.grad is None
    assert_close(m.bias.grad, ref.bias.grad.double(), name="db")


def test_fp16_params_with_fp32_master_grads():
    _, m = _pair(3, 4, dict(kernel_size=3, padding=1), torch.float16)
    if hasattr(m.weight, "grad_dtype"):  # torch >= 2.10 checks .grad's dtype unless told otherwise
        m.weight.grad_dtype = m.bias.grad_dtype = torch.float32
    m.weight.grad = torch.randn(m.weight.shape)  # fp32, not zero
    m.bias.grad = torch.randn(4)
    start_w, start_b = m.weight.grad.double(), m.bias.grad.double()
    ref = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float16)
    ref.load_state_dict(m.state_dict())
    torch.manual_seed(8)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float16)
    dy = torch.randn(2, 4, 5, 5, dtype=torch.float16)
    _, _, dw64, db64 = _reference_grads(ref, x, dy)
    with twobp.use_backend("triton"):
        with twobp.split_backward(microbatch=0):
            y = m(x)
        y.backward(dy)
        twobp.backward_p2(m)
    assert m.weight.grad.dtype == torch.float32
    assert_close(m.weight.grad, start_w + dw64, torch.float32, name="dW fp32 master")
    assert_close(m.bias.grad, start_b + db64, torch.float32, name="db fp32 master")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_keeps_nothing(backend):
    _, m = _pair(3, 5, dict(kernel_size=3), torch.float32)
    with twobp.use_backend(backend), torch.no_grad(), twobp.split_backward(microbatch=0):
        y = m(torch.randn(1, 3, 5, 5))
    assert y.shape == (1, 5, 3, 3) and twobp.default_store().is_empty()


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------


def test_unsupported_configurations_raise_naming_them():
    with pytest.raises(NotImplementedError, match=r"groups=3"):
        TwoBPConv2d(6, 6, 3, groups=3)
    with pytest.raises(NotImplementedError, match=r"padding_mode='reflect'"):
        TwoBPConv2d(3, 6, 3, padding=1, padding_mode="reflect")
    # a module turned into a twin by a class swap (as twobp.convert does) checks at forward
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    depthwise.__class__ = TwoBPConv2d
    with pytest.raises(NotImplementedError, match=r"groups=4"):
        depthwise(torch.randn(1, 4, 5, 5))


def test_bad_inputs_raise_with_the_fix():
    m = TwoBPConv2d(3, 5, 3)
    with pytest.raises(ValueError, match=r"3-D \(unbatched\) or 4-D"):
        m(torch.randn(1, 1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"input has 4 channels.*expected weight \[O, 4, KH, KW\]"):
        m(torch.randn(1, 4, 5, 5))
    with pytest.raises(TypeError, match=r"dtype torch.float16 differs from weight dtype torch.float32"):
        m(torch.randn(1, 3, 5, 5, dtype=torch.float16))
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"smaller than the dilated kernel 3x3"), twobp.use_backend(backend):
            m(torch.randn(1, 3, 2, 2))
