"""Triton depthwise causal conv1d (twobp.kernels.causal_conv1d) against float64 torch autograd.

Runs the real kernels through Triton's interpreter in fp32 and fp16, on NaN-filled output
buffers; the reference is torch's own conv1d (groups = C, padding K-1, first L outputs) in
float64 under autograd. dx, dW and db are each checked on their own; p2 accumulates over
micro-batches of different shapes into random non-zero gradients, x read as a strided slice.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from checks import assert_close, poison  # noqa: E402
from twobp.kernels import causal_conv1d as K  # noqa: E402
from twobp.ops.causal_conv1d import causal_conv1d_dw_ref, causal_conv1d_dx_ref, causal_conv1d_fwd_ref  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# (batch, L, C, taps): odd lengths and channel counts, L shorter than the kernel, one tap
CASES = [(2, 37, 21, 4), (1, 3, 5, 4), (3, 19, 40, 1), (1, 40, 7, 3)]
CASE_IDS = [f"b{b}-L{L}-C{c}-K{k}" for b, L, c, k in CASES]


@pytest.fixture(autouse=True)
def _nan_empty(monkeypatch):
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return poison(t) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def make(b, L, C, k, dtype, seed):
    """x as the first half of a wider projection (a strided view), W [C, 1, K], bias, dy."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(b, L, 2 * C, generator=g).to(dtype)
    w = (torch.randn(C, 1, k, generator=g) * 0.5).to(dtype)
    bias = torch.randn(C, generator=g).to(dtype)
    dy = torch.randn(b, L, C, generator=g).to(dtype)
    return xz[..., :C], w, bias, dy


def reference(x, w, bias, dy):
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
    L, C, k = x.shape[1], w.shape[0], w.shape[-1]
    y = F.conv1d(x64.transpose(1, 2), w64, b64, padding=k - 1, groups=C)[..., :L].transpose(1, 2)
    return (y.detach(), *torch.autograd.grad(y, (x64, w64, b64), dy.double()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_p1(case, dtype):
    x, w, bias, dy = make(*case, dtype, seed=1)
    y64, dx64, _, _ = reference(x, w, bias, dy)
    assert_close(K.causal_conv1d_fwd(x, w, bias), y64, dtype, name="y")
    assert_close(K.causal_conv1d_fwd(x, w, None), y64 - bias.double(), dtype, name="y (no bias)")
    assert_close(K.causal_conv1d_dx(dy, w), dx64, dtype, name="dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_p2_accumulates_over_microbatches_in_one_launch(dtype):
    mbs = [make(2, 37, 21, 4, dtype, seed=2), make(1, 11, 21, 4, dtype, seed=3)]
    w, bias = mbs[0][1], mbs[0][2]
    g = torch.Generator().manual_seed(4)
    start_w, start_b = torch.randn(21, 1, 4, generator=g), torch.randn(21, generator=g)
    dw, db = start_w.clone(), start_b.clone()  # fp32 master gradients of fp16 activations, too
    K.causal_conv1d_dw([m[0] for m in mbs], [m[3] for m in mbs], dw, db)
    want_w, want_b = start_w.double(), start_b.double()
    for x, _, _, dy in mbs:
        _, _, gw, gb = reference(x, w, bias, dy)
        want_w, want_b = want_w + gw, want_b + gb
    assert_close(dw, want_w, dtype, name="dW")
    assert_close(db, want_b, dtype, name="db")


def test_torch_reference_matches_float64():
    x, w, bias, dy = make(2, 37, 21, 4, torch.float32, seed=5)
    y64, dx64, dw64, db64 = reference(x, w, bias, dy)
    assert_close(causal_conv1d_fwd_ref(x, w, bias), y64, name="y")
    assert_close(causal_conv1d_dx_ref(dy, w), dx64, name="dx")
    dw, db = torch.zeros_like(w), torch.zeros_like(bias)
    causal_conv1d_dw_ref([x], [dy], dw, db)
    assert_close(dw, dw64, name="dW")
    assert_close(db, db64, name="db")


def test_launchers_reject_what_they_cannot_do():
    x, w, bias, dy = make(1, 8, 5, 4, torch.float32, seed=6)
    with pytest.raises(ValueError, match="depthwise"):
        K.causal_conv1d_fwd(x, torch.zeros(5, 2, 4), bias)
    with pytest.raises(ValueError, match="channels"):
        K.causal_conv1d_fwd(x[..., :4], w, bias)
    with pytest.raises(TypeError, match="float64"):
        K.causal_conv1d_dx(dy.double(), w)
    with pytest.raises(ValueError, match="MAX_TAPS"):
        K.causal_conv1d_fwd(x, torch.zeros(5, 1, K.MAX_TAPS + 1), None)
    with pytest.raises(ValueError, match="as many"):
        K.causal_conv1d_dw([x, x], [dy], torch.zeros_like(w), None)
