"""Triton selective scan (twobp.kernels.scan) against float64 torch autograd.

Runs the real kernels on CPU through Triton's interpreter, in fp32 and fp16 (the interpreter
cannot compute bf16). The reference is a plain per-step scan in float64 differentiated by
autograd (not the hand-written backward of twobp.ops.scan), on the same rounded inputs. Every
buffer the launchers allocate comes out of a NaN-filled ``torch.empty`` (outputs, boundary
states, scratch, partial sums), so an element a kernel forgets to write fails; parameter
gradients accumulate into random non-zero buffers. Each gradient is checked on its own.

Shapes are odd on purpose: L = 37 (three chunks of 16, the last one short, over tiles of 8),
L = 16 (exactly one chunk: nothing saved), L = 1; E and N that leave masked channels and
states, and several channel blocks (so dB, dC sum partials across programs).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from checks import assert_close, poison  # noqa: E402
from twobp.kernels import scan as K  # noqa: E402
from twobp.ops.scan import scan_dw_ref, scan_dx_ref, scan_fwd_ref  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# (batch, L, E channels, N states), chunk 16
CASES = [(2, 37, 11, 5), (1, 16, 9, 3), (3, 1, 4, 16)]
CASE_IDS = [f"b{b}-L{L}-E{e}-N{n}" for b, L, e, n in CASES]
CHUNK = 16


@pytest.fixture(autouse=True)
def _nan_empty(monkeypatch):
    """Make torch.empty return NaN-filled floating buffers while a test runs."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return poison(t) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def make_inputs(b, L, E, N, dtype, seed):
    """u, Δ > 0, B and C as strided views of one projection (as x_proj gives them), A_log, D, dy."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, L, E, generator=g).to(dtype)
    delta = F.softplus(torch.randn(b, L, E, generator=g) - 1.0).to(dtype)
    dbc = torch.randn(b, L, 3 + 2 * N, generator=g).to(dtype)  # [dt_in (3) | B | C]
    B, C = dbc[..., 3:3 + N], dbc[..., 3 + N:]
    A_log = torch.log(torch.rand(E, N, generator=g) * 3.5 + 0.5)
    D = torch.randn(E, generator=g)
    dy = torch.randn(b, L, E, generator=g).to(dtype)
    return u, delta, B, C, A_log, D, dy


def scan64(u, delta, B, C, A_log, D):
    """The definition, step by step, in float64 (differentiable)."""
    A = -torch.exp(A_log)
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(ys, 1)


def reference(u, delta, B, C, A_log, D, dy):
    """float64 autograd: y and the gradients of (u, Δ, B, C, A_log, D)."""
    leaves = [t.detach().double().requires_grad_() for t in (u, delta, B, C, A_log, D)]
    y = scan64(*leaves)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return y.detach(), grads


def states64(u, delta, B, A_log, chunk):
    """The states after every chunk but the last, in float64."""
    A = -torch.exp(A_log.double())
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float64)
    out = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None].double() * A) * h + \
            (delta[:, t].double() * u[:, t].double())[..., None] * B[:, t, None, :].double()
        if (t + 1) % chunk == 0 and t + 1 < u.shape[1]:
            out.append(h)
    return torch.stack(out, 1) if out else h.new_zeros(u.shape[0], 0, *h.shape[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_float64(case, dtype):
    u, delta, B, C, A_log, D, dy = make_inputs(*case, dtype, seed=1)
    y, H = K.scan_fwd(u, delta, B, C, A_log, D, chunk=CHUNK)
    y64, _ = reference(u, delta, B, C, A_log, D, dy)
    assert y.dtype == dtype and H.dtype == torch.float32
    assert_close(y, y64, dtype, name="y")
    H64 = states64(u, delta, B, A_log, CHUNK)
    assert H.shape == H64.shape == (case[0], -(-case[1] // CHUNK) - 1, case[2], case[3])
    if H.numel():
        assert_close(H, H64, dtype, name="H (boundary states)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_p1_input_grads_match_float64(case, dtype):
    u, delta, B, C, A_log, D, dy = make_inputs(*case, dtype, seed=2)
    _, H = K.scan_fwd(u, delta, B, C, A_log, D, chunk=CHUNK)
    got = K.scan_dx(dy, u, delta, B, C, A_log, D, H, chunk=CHUNK)
    _, want = reference(u, delta, B, C, A_log, D, dy)
    for name, g, w in zip(("du", "ddelta", "dB", "dC"), got, want[:4]):
        assert g.dtype == dtype
        assert_close(g, w, dtype, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_p2_param_grads_accumulate_over_microbatches(dtype):
    """p2 over two micro-batches of different shapes adds Σ of their dA_log, dD to what is there."""
    mbs = [make_inputs(1, 37, 11, 5, dtype, seed=3), make_inputs(1, 21, 11, 5, dtype, seed=4)]
    A_log, D = mbs[0][4], mbs[0][5]
    saved = []
    for u, delta, B, C, _, _, dy in mbs:
        _, H = K.scan_fwd(u, delta, B, C, A_log, D, chunk=CHUNK)
        saved.append((dy, u, delta, B, C, H))
    g = torch.Generator().manual_seed(5)
    start_a, start_d = torch.randn(11, 5, generator=g), torch.randn(11, generator=g)
    dA_log, dD = start_a.clone(), start_d.clone()
    K.scan_dw(*[list(col) for col in zip(*saved)], A_log, dA_log, dD, chunk=CHUNK)
    want_a, want_d = start_a.double(), start_d.double()
    for u, delta, B, C, _, _, dy in mbs:
        _, grads = reference(u, delta, B, C, A_log, D, dy)
        want_a, want_d = want_a + grads[4], want_d + grads[5]
    assert_close(dA_log, want_a, dtype, name="dA_log")
    assert_close(dD, want_d, dtype, name="dD")


@pytest.mark.parametrize("chunk", [16, 32])
def test_torch_reference_matches_float64(chunk):
    """The torch backend's sequential scan: y, then p1's four and p2's two gradients, each on its own."""
    u, delta, B, C, A_log, D, dy = make_inputs(2, 37, 11, 5, torch.float32, seed=8)
    y, H = scan_fwd_ref(u, delta, B, C, A_log, D, chunk=chunk)
    y64, want = reference(u, delta, B, C, A_log, D, dy)
    assert_close(y, y64, name="y")
    assert H.shape == (2, -(-37 // chunk) - 1, 11, 5)
    for name, g, w in zip(("du", "ddelta", "dB", "dC"), scan_dx_ref(dy, u, delta, B, C, A_log, D, H, chunk=chunk),
                          want[:4]):
        assert_close(g, w, name=name)
    dA_log, dD = torch.ones(11, 5), torch.ones(11)
    scan_dw_ref([dy], [dict(u=u, delta=delta, B=B, C=C, H=H)], A_log, None, dA_log, dD, chunk=chunk)
    assert_close(dA_log, want[4] + 1, name="dA_log")
    assert_close(dD, want[5] + 1, name="dD")


def test_one_walk_equals_p1_then_p2_and_reruns_are_bit_identical():
    """The unsplit backward (both in one walk) gives exactly p1's and p2's results."""
    u, delta, B, C, A_log, D, dy = make_inputs(2, 37, 5, 3, torch.float32, seed=6)
    _, H = K.scan_fwd(u, delta, B, C, A_log, D, chunk=CHUNK)
    both_in, both_p = K.scan_bwd(dy, u, delta, B, C, A_log, D, H, chunk=CHUNK, input_grads=True, param_grads=True)
    p1 = K.scan_dx(dy, u, delta, B, C, A_log, D, H, chunk=CHUNK)
    _, p2 = K.scan_bwd(dy, u, delta, B, C, A_log, D, H, chunk=CHUNK, input_grads=False, param_grads=True)
    _, p2_again = K.scan_bwd(dy, u, delta, B, C, A_log, D, H, chunk=CHUNK, input_grads=False, param_grads=True)
    for a, b in zip(both_in, p1):
        assert torch.equal(a, b)
    for a, b, c in zip(both_p, p2, p2_again):
        assert torch.equal(b, c)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # p2 sums over more slots: order differs


def test_launchers_reject_what_they_cannot_do():
    u, delta, B, C, A_log, D, dy = make_inputs(1, 20, 4, 3, torch.float32, seed=7)
    _, H = K.scan_fwd(u, delta, B, C, A_log, D, chunk=16)
    with pytest.raises(ValueError, match="same chunk"):
        K.scan_dx(dy, u, delta, B, C, A_log, D, H, chunk=32)
    with pytest.raises(TypeError, match="float64"):
        K.scan_fwd(u.double(), delta.double(), B.double(), C.double(), A_log, D, chunk=16)
    with pytest.raises(ValueError, match="multiple of the tile"):
        K.scan_fwd(u, delta, B, C, A_log, D, chunk=12)
    wide = torch.zeros(4, K.MAX_STATE + 1)
    Bw = torch.zeros(1, 20, K.MAX_STATE + 1)
    with pytest.raises(ValueError, match="MAX_STATE"):
        K.scan_fwd(u, delta, Bw, Bw, wide, D, chunk=16)
    with pytest.raises(ValueError, match="unit stride"):
        K.scan_fwd(u.transpose(1, 2).contiguous().transpose(1, 2), delta, B, C, A_log, D, chunk=16)
