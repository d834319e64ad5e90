"""Triton conv2d kernels (twobp.kernels.conv) against float64 torch autograd.

Runs the real kernels on CPU through Triton's interpreter, in fp32 and fp16 (the interpreter
cannot compute bf16). Shapes are tiny and odd, since the interpreter is slow: N=1..3, C and O
around 3..18, H, W 5..9, so the channel loops run 1-2 chunks and every tile has a ragged edge.
Outputs are written into views of NaN-filled buffers: elements a kernel forgets stay NaN, and
writes outside the view show in the guard. dW starts from non-zero values (it accumulates).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import twobp  # noqa: E402
from checks import assert_close  # noqa: E402
from twobp.kernels.conv import conv2d_dw, conv2d_dx, conv2d_flops, conv2d_fwd, conv2d_output_size  # noqa: E402
from twobp.ops.conv import Conv2dOp  # noqa: E402

DTYPES = [torch.float32, torch.float16]

# (N, C, H, W, O, KH, KW, stride, padding, dilation); padding may be per side ((top, bottom), (left, right)).
CASES = {
    "3x3-s1-p1": (2, 3, 7, 7, 5, 3, 3, 1, 1, 1),
    "1x1-s2": (2, 3, 9, 9, 5, 1, 1, 2, 0, 1),
    "2x3-p1-d2": (2, 3, 8, 9, 5, 2, 3, 1, 1, 2),
    "3x3-s2-p1": (2, 3, 9, 8, 5, 3, 3, 2, 1, 1),
    "3x3-s3-p2-d2": (1, 3, 9, 9, 5, 3, 3, 3, 2, 2),
    "3x2-mixed-asym": (1, 4, 8, 9, 5, 3, 2, (2, 1), ((0, 1), (2, 1)), (1, 2)),
    "17to18-channels": (1, 17, 5, 6, 18, 3, 3, 1, 1, 1),  # two channel chunks and two out tiles
    "1x1-s1-flat": (2, 6, 4, 8, 5, 1, 1, 1, 0, 1),  # dW walks x and dy as flat pixel runs
    "3x3-16x16-flat": (2, 3, 16, 16, 4, 3, 3, 1, 1, 1),  # dW walks dy as 16x16 flat runs, x gathered
}
CASE_IDS = list(CASES)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _sides(padding):
    if isinstance(padding, tuple) and isinstance(padding[0], tuple):
        return padding
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph), (pw, pw)


def _reference(x, w, b, dy, stride, padding, dilation):
    """float64 autograd of F.conv2d (asymmetric padding through F.pad): y, dx, dW, db."""
    (top, bottom), (left, right) = _sides(padding)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y = F.conv2d(F.pad(x64, (left, right, top, bottom)), w64, b64, stride=stride, dilation=dilation)
    if dy is not None:
        y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, (b64.grad if b64 is not None else None)


def _make(case, dtype, seed, bias=True):
    n, c, h, w, o, kh, kw, stride, padding, dilation = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, n, c, h, w, dtype=dtype)
    wt = _randn(gen, o, c, kh, kw, dtype=dtype)
    b = _randn(gen, o, dtype=dtype) if bias else None
    oh, ow = conv2d_output_size((h, w), (kh, kw), stride=stride, padding=padding, dilation=dilation)
    dy = _randn(gen, n, o, oh, ow, dtype=dtype)
    return x, wt, b, dy, dict(stride=stride, padding=padding, dilation=dilation)


def _guarded(shape, dtype):
    """A NaN buffer with a view of ``shape`` strictly inside it (every dim offset and padded)."""
    buf = torch.full(tuple(s + 3 for s in shape), float("nan"), dtype=dtype)
    return buf, buf[1:shape[0] + 1, 2:shape[1] + 2, 1:shape[2] + 1, 2:shape[3] + 2]


def _assert_guard_intact(buf, shape, name):
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[1:shape[0] + 1, 2:shape[1] + 2, 1:shape[2] + 1, 2:shape[3] + 2] = False
    written = ~torch.isnan(buf[outside])
    assert not written.any(), f"{name}: {int(written.sum())} elements written outside the view"


# ----------------------------------------------------------------------------------------
# forward and dX (p1)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASE_IDS)
def test_fwd_matches_float64(case, dtype):
    bias = CASE_IDS.index(case) % 2 == 0  # bias on for half the cases (both paths covered)
    x, w, b, _, geo = _make(case, dtype, seed=10 + CASE_IDS.index(case), bias=bias)
    y64, _, _, _ = _reference(x, w, b, None, **geo)
    buf, out = _guarded(y64.shape, dtype)

    y = conv2d_fwd(x, w, b, out=out, **geo)

    assert y is out
    assert_close(y, y64, dtype, name=f"y {case}")
    _assert_guard_intact(buf, y64.shape, "y")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fwd_bias_on_off_and_allocation(bias):
    x, w, b, _, geo = _make("3x3-s2-p1", torch.float32, seed=3, bias=bias)
    y = conv2d_fwd(x, w, b, **geo)
    assert y.is_contiguous() and y.dtype == torch.float32
    assert_close(y, _reference(x, w, b, None, **geo)[0], name="y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASE_IDS)
def test_dx_matches_float64(case, dtype):
    x, w, b, dy, geo = _make(case, dtype, seed=20 + CASE_IDS.index(case))
    _, dx64, _, _ = _reference(x, w, b, dy, **geo)
    buf, out = _guarded(x.shape, dtype)

    dx = conv2d_dx(dy, w, input_shape=x.shape, out=out, **geo)

    assert dx is out
    assert_close(dx, dx64, dtype, name=f"dx {case}")
    _assert_guard_intact(buf, x.shape, "dx")


def test_fwd_and_dx_read_any_strides():
    """channels-last x, a permuted weight view, an expanded (stride-0) dy: read in place."""
    x, w, b, dy, geo = _make("2x3-p1-d2", torch.float32, seed=5)
    x_cl = x.to(memory_format=torch.channels_last)
    w_view = w.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # same values, other strides
    b_view = torch.stack([b, b], 1)[:, 1]  # stride 2
    assert w_view.stride() != w.stride() and b_view.stride() == (2,)
    dy_exp = dy[:, :, :1, :1].expand_as(dy)  # what sum().backward() hands down
    y64, _, _, _ = _reference(x, w, b, None, **geo)
    _, dx64, _, _ = _reference(x, w, b, dy_exp.contiguous(), **geo)

    assert_close(conv2d_fwd(x_cl, w_view, b_view, **geo), y64, name="y from strided inputs")
    assert_close(conv2d_dx(dy_exp, w_view, input_shape=x.shape, **geo), dx64, name="dx from expanded dy")


# ----------------------------------------------------------------------------------------
# dW, db (p2)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                              (torch.float16, torch.float16)], ids=["fp32", "fp16-fp32grad", "fp16"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_dw_accumulates_into_running_grads(case, dtype, grad_dtype):
    i = CASE_IDS.index(case)
    bias = i % 3 != 1
    split = 1 + 2 * (i % 2)  # 1: in-place accumulation; 3: workspace + reduction kernel
    x, w, b, dy, geo = _make(case, dtype, seed=30 + i, bias=bias)
    _, _, dw64, db64 = _reference(x, w, b, dy, **geo)
    gen = torch.Generator().manual_seed(99)
    dweight = _randn(gen, *w.shape, dtype=grad_dtype)  # non-zero: p2 accumulates
    dbias = _randn(gen, w.shape[0], dtype=grad_dtype) if bias else None
    start_w = dweight.double()
    start_b = dbias.double() if bias else None

    conv2d_dw(x, dy, dweight, dbias, split=split, **geo)

    assert_close(dweight, start_w + dw64, grad_dtype, name=f"dW {case} split={split}", scale=2)
    if bias:
        assert_close(dbias, start_b + db64, grad_dtype, name=f"db {case} split={split}", scale=2)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dw_batched_equals_sum_of_micro_batches(dtype, split):
    """k micro-batches of different batch sizes in one launch == the sum of k launches == float64."""
    case = "3x3-s2-p1"
    _, c, h, w, o, kh, kw, stride, padding, dilation = CASES[case]
    geo = dict(stride=stride, padding=padding, dilation=dilation)
    oh, ow = conv2d_output_size((h, w), (kh, kw), **geo)
    gen = torch.Generator().manual_seed(40 + split)
    wt = _randn(gen, o, c, kh, kw, dtype=dtype)
    xs = [_randn(gen, nb, c, h, w, dtype=dtype) for nb in (1, 3, 2)]
    dys = [_randn(gen, nb, o, oh, ow, dtype=dtype) for nb in (1, 3, 2)]
    start = _randn(gen, o, c, kh, kw, dtype=torch.float32)
    start_b = _randn(gen, o, dtype=torch.float32)

    batched_w, batched_b = start.clone(), start_b.clone()
    conv2d_dw(xs, dys, batched_w, batched_b, split=split, **geo)
    looped_w, looped_b = start.clone(), start_b.clone()
    expect_w, expect_b = start.double(), start_b.double()
    for xi, dyi in zip(xs, dys):
        conv2d_dw(xi, dyi, looped_w, looped_b, split=split, **geo)
        _, _, dw64, db64 = _reference(xi, wt, start_b, dyi, **geo)
        expect_w, expect_b = expect_w + dw64, expect_b + db64

    assert_close(batched_w, looped_w.double(), torch.float32, name="dW batched vs looped")
    assert_close(batched_b, looped_b.double(), torch.float32, name="db batched vs looped")
    assert_close(batched_w, expect_w, torch.float32, name="dW batched vs float64")
    assert_close(batched_b, expect_b, torch.float32, name="db batched vs float64")


def test_dw_workspace_and_outputs_are_fully_written(monkeypatch):
    """Every allocation the launchers make starts as NaN: an unwritten workspace element would
    poison dW; y and dx would keep NaN."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    x, w, b, dy, geo = _make("17to18-channels", torch.float32, seed=50)
    y64, dx64, dw64, db64 = _reference(x, w, b, dy, **geo)
    assert_close(conv2d_fwd(x, w, b, **geo), y64, name="y")
    assert_close(conv2d_dx(dy, w, input_shape=x.shape, **geo), dx64, name="dx")
    for split in (2, 5):
        dweight = torch.zeros_like(w)
        dbias = torch.zeros_like(b)
        conv2d_dw([x, x[:0], x], [dy, dy[:0], dy], dweight, dbias, split=split, **geo)
        assert_close(dweight, 2 * dw64, name=f"dW split={split}")
        assert_close(dbias, 2 * db64, name=f"db split={split}")


def test_dw_reads_channels_last_micro_batches_and_strided_grads():
    x, w, b, dy, geo = _make("2x3-p1-d2", torch.float32, seed=60)
    _, _, dw64, db64 = _reference(x, w, b, dy, **geo)
    xs = [x.to(memory_format=torch.channels_last)] * 2
    dweight = torch.zeros(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1)  # [O, C, KH, KW] view
    dbias = torch.zeros(2 * w.shape[0])[::2]
    conv2d_dw(xs, [dy, dy], dweight, dbias, **geo)
    assert_close(dweight, 2 * dw64, name="dW")
    assert_close(dbias, 2 * db64, name="db")


# ----------------------------------------------------------------------------------------
# padding 'same' / 'valid' through the op
# ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("padding,kernel,dilation", [
    ("same", (3, 3), (1, 1)),
    ("same", (2, 4), (1, 1)),  # even kernel: torch pads one more below / right
    ("same", (2, 3), (3, 2)),  # even dilated extent on one axis
    ("valid", (2, 3), (1, 2)),
], ids=["same-3x3", "same-2x4", "same-2x3-d32", "valid-2x3-d12"])
def test_op_string_padding_matches_torch(padding, kernel, dilation):
    gen = torch.Generator().manual_seed(70)
    x = _randn(gen, 2, 3, 7, 8, dtype=torch.float32)
    w = _randn(gen, 5, 3, *kernel, dtype=torch.float32)
    b = _randn(gen, 5, dtype=torch.float32)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y64 = F.conv2d(x64, w64, b64, padding=padding, dilation=dilation)
    dy = _randn(gen, *y64.shape, dtype=torch.float32)
    y64.backward(dy.double())

    op = Conv2dOp(1, padding, dilation)
    with twobp.use_backend("triton"):
        y, p1, p2 = op.forward((x,), (w, b), save_p1=True, save_p2=True)
        (dx,) = op.input_grads(dy, p1, (w, b), (True,))
        dweight, dbias = torch.zeros_like(w), torch.zeros_like(b)
        op.param_grads([dy], [p2], [dweight, dbias])
    assert_close(y, y64.detach(), name="y")
    assert_close(dx, x64.grad, name="dx")
    assert_close(dweight, w64.grad, name="dW")
    assert_close(dbias, b64.grad, name="db")


# ----------------------------------------------------------------------------------------
# edges, accounting, errors
# ----------------------------------------------------------------------------------------


def test_empty_batches_and_channels():
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    assert conv2d_fwd(torch.empty(0, 3, 6, 6), w, b, padding=1).shape == (0, 4, 6, 6)
    assert conv2d_dx(torch.empty(0, 4, 6, 6), w, input_shape=(0, 3, 6, 6), padding=1).shape == (0, 3, 6, 6)
    y = conv2d_fwd(torch.empty(2, 0, 5, 5), torch.empty(4, 0, 3, 3), b)  # no in channels: y = b
    assert torch.equal(y, b.view(1, 4, 1, 1).expand(2, 4, 3, 3))
    dx = conv2d_dx(torch.randn(2, 0, 3, 3), torch.empty(0, 3, 3, 3), input_shape=(2, 3, 5, 5))
    assert torch.equal(dx, torch.zeros(2, 3, 5, 5))
    dw, db = torch.ones(4, 3, 3, 3), torch.ones(4)
    conv2d_dw([torch.empty(0, 3, 5, 5)], [torch.empty(0, 4, 3, 3)], dw, db)
    assert torch.equal(dw, torch.ones(4, 3, 3, 3)) and torch.equal(db, torch.ones(4))


def test_flops_and_output_size():
    assert conv2d_flops(8, 64, 64, 56, 56, 3, 3) == 2 * 8 * 56 * 56 * 64 * 64 * 9
    assert conv2d_output_size((224, 224), (7, 7), stride=2, padding=3, dilation=1) == (112, 112)
    assert conv2d_output_size((7, 8), (2, 4), stride=1, padding=((0, 1), (1, 2)), dilation=1) == (7, 8)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


_GEO = dict(stride=1, padding=1, dilation=1)
BAD_CALLS = [
    (lambda: conv2d_fwd(_t(2, 4, 5, 5), _t(3, 2, 3, 3), **_GEO), ValueError, r"groups=2.*groups must be 1"),
    (lambda: conv2d_fwd(_t(4, 5, 5), _t(3, 4, 3, 3), **_GEO), ValueError, r"x must be 4-D.*unsqueeze"),
    (lambda: conv2d_fwd(_t(1, 3, 5, 5), _t(2, 3, 3, 3), stride=1, padding="same", dilation=1), TypeError,
     r"resolve 'same'"),
    (lambda: conv2d_fwd(_t(1, 3, 5, 5), _t(2, 3, 3, 3), stride=0, padding=0, dilation=1), ValueError,
     r"stride must be >= 1"),
    (lambda: conv2d_fwd(_t(1, 3, 5, 5), _t(2, 3, 3, 3), stride=1, padding=-1, dilation=1), ValueError,
     r"padding must be >= 0"),
    (lambda: conv2d_fwd(_t(1, 3, 2, 5), _t(2, 3, 3, 3), stride=1, padding=0, dilation=1), ValueError,
     r"smaller than the dilated kernel"),
    (lambda: conv2d_fwd(_t(1, 3, 5, 5), _t(2, 3, 3, 3, dtype=torch.float16), **_GEO), TypeError,
     r"weight has dtype torch.float16 but x has torch.float32"),
    (lambda: conv2d_fwd(_t(1, 3, 5, 5), _t(2, 3, 3, 3), _t(3), **_GEO), ValueError, r"bias has shape \(3,\)"),
    (lambda: conv2d_fwd(_t(1, 3, 5, 5).long(), _t(2, 3, 3, 3), **_GEO), TypeError, r"x has dtype torch.int64"),
    (lambda: conv2d_fwd(_t(1, 3, 5, 5), _t(2, 3, 3, 3), out=_t(1, 2, 4, 5), **_GEO), ValueError,
     r"out has shape \(1, 2, 4, 5\), expected \(1, 2, 5, 5\)"),
    (lambda: conv2d_dx(_t(1, 2, 4, 4), _t(2, 3, 3, 3), input_shape=(1, 3, 5, 5), **_GEO), ValueError,
     r"dy has shape \(1, 2, 4, 4\), expected \(1, 2, 5, 5\)"),
    (lambda: conv2d_dx(_t(1, 2, 5, 5), _t(2, 3, 3, 3), input_shape=(1, 3, 5), **_GEO), ValueError,
     r"input_shape must be 4"),
    (lambda: conv2d_dw(_t(1, 3, 5, 5), _t(1, 2, 5, 5), _t(2, 3, 3, 3, dtype=torch.float16), None, **_GEO),
     TypeError, r"dweight has dtype torch.float16"),
    (lambda: conv2d_dw([_t(1, 3, 5, 5)], [], _t(2, 3, 3, 3), None, **_GEO), ValueError, r"1 micro-batches but dy has 0"),
    (lambda: conv2d_dw([], [], _t(2, 3, 3, 3), None, **_GEO), ValueError, r"empty sequences"),
    (lambda: conv2d_dw(_t(1, 3, 5, 5), [_t(1, 2, 5, 5)], _t(2, 3, 3, 3), None, **_GEO), TypeError,
     r"both be tensors or both be sequences"),
    (lambda: conv2d_dw([_t(1, 3, 5, 5), _t(1, 3, 6, 6)], [_t(1, 2, 5, 5), _t(1, 2, 6, 6)], _t(2, 3, 3, 3), None,
                       **_GEO), ValueError, r"batch size only"),
    (lambda: conv2d_dw([_t(2, 3, 5, 5), _t(2, 3, 5, 5).to(memory_format=torch.channels_last)],
                       [_t(2, 2, 5, 5), _t(2, 2, 5, 5)], _t(2, 3, 3, 3), None, **_GEO), ValueError,
     r"one set of strides.*contiguous"),
    (lambda: conv2d_dw(_t(1, 3, 5, 5), _t(1, 2, 5, 5), _t(2, 3, 3, 3), _t(3), **_GEO), ValueError,
     r"dbias has shape \(3,\)"),
    (lambda: conv2d_dw(_t(1, 3, 5, 5), _t(1, 2, 5, 5), _t(2, 3, 3, 3), None, split=0, **_GEO), ValueError,
     r"split must be a positive int"),
    (lambda: Conv2dOp(1, 0, 1, groups=2), NotImplementedError, r"groups=2"),
    (lambda: Conv2dOp(2, "same", 1), ValueError, r"padding='same' is not supported for strided"),
    (lambda: Conv2dOp(1, "full", 1), ValueError, r"'same' or 'valid'"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[f"bad{i}" for i in range(len(BAD_CALLS))])
def test_bad_inputs_raise_with_the_fix(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("case,expect", [("1x1-s1-flat", (True, True)), ("3x3-16x16-flat", (True, False)),
                                         ("3x3-s1-p1", (False, False)), ("1x1-s2", (False, False))])
def test_dw_flat_pixel_walk_is_chosen_where_it_applies(case, expect):
    """The image-by-image pixel walk (vector loads) is taken for contiguous dy whose OH·OW is a
    multiple of 16, and for x only in a 1x1 stride-1 unpadded conv; the cases above run both."""
    from twobp.kernels.conv import _dw_flat_layout

    n, c, h, w, o, kh, kw, stride, padding, dilation = CASES[case]
    oh, ow = conv2d_output_size((h, w), (kh, kw), stride=stride, padding=padding, dilation=dilation)
    x = torch.empty(n, c, h, w)
    dy = torch.empty(n, o, oh, ow)
    pads = (padding, padding) if isinstance(padding, int) else padding
    got = _dw_flat_layout(x.stride(), dy.stride(), (h, w), (oh, ow), (kh, kw), (stride, stride), pads)
    assert got == expect
    # channels-last dy is never flat
    assert _dw_flat_layout(x.stride(), dy.contiguous(memory_format=torch.channels_last).stride(), (h, w),
                           (oh, ow), (kh, kw), (stride, stride), pads)[0] is False or oh * ow == 1
