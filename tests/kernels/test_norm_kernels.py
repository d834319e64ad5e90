"""Triton LayerNorm / RMSNorm kernels (twobp.kernels.norm) against float64 torch references.

Runs the real kernels on CPU through Triton's interpreter, in fp32 and fp16 (the interpreter
cannot compute bf16). Every buffer the launchers allocate comes out of a NaN-filled
``torch.empty`` here (outputs, statistics and the p2 partial sums), so an element a kernel
forgets to write fails the comparison; gradients accumulate into random non-zero buffers.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from checks import assert_close, poison  # noqa: E402
from twobp.kernels import norm as K  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# (M rows, N columns): odd sizes, one row, one column, ~1000 and one above 4096 (kept short).
SHAPES = [(37, 53), (1, 1000), (6, 1), (3, 5000)]
SHAPE_IDS = [f"M{m}-N{n}" for m, n in SHAPES]
KINDS = ["layer", "rms"]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _nan_empty(monkeypatch):
    """Make torch.empty return NaN-filled floating buffers while a test runs."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return poison(t) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype)


def _inputs(kind: str, m: int, n: int, dtype: torch.dtype, seed: int, affine: str = "wb"):
    """x (off-centre, so LayerNorm's mean matters), dy, weight, bias for one case."""
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, m, n, dtype=dtype, scale=2.0, shift=0.5)
    dy = _randn(gen, m, n, dtype=dtype)
    w = _randn(gen, n, dtype=dtype, shift=1.0) if "w" in affine else None
    b = _randn(gen, n, dtype=dtype) if ("b" in affine and kind == "layer") else None
    return x, dy, w, b


def _ref(kind: str, x, dy, w, b, eps=EPS):
    """float64 autograd: y, dx, dw, db and the row statistics (mean or None, rstd)."""
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_() if w is not None else None
    b64 = b.double().requires_grad_() if b is not None else None
    n = x.shape[-1]
    if kind == "layer":
        y = F.layer_norm(x64, (n,), w64, b64, eps)
        mean = x64.detach().mean(-1)
        rstd = torch.rsqrt((x64.detach() - mean.unsqueeze(-1)).square().mean(-1) + eps)
    else:
        y = F.rms_norm(x64, (n,), w64, eps)
        mean = None
        rstd = torch.rsqrt(x64.detach().square().mean(-1) + eps)
    y.backward(dy.double())
    return (y.detach(), x64.grad, w64.grad if w64 is not None else None,
            b64.grad if b64 is not None else None, mean, rstd)


def _fwd(kind, x, w, b, eps=EPS):
    if kind == "layer":
        return K.layer_norm_fwd(x, w, b, eps)
    y, rstd = K.rms_norm_fwd(x, w, eps)
    return y, None, rstd


def _dx(kind, dy, x, w, mean, rstd):
    if kind == "layer":
        return K.layer_norm_dx(dy, x, w, mean, rstd)
    return K.rms_norm_dx(dy, x, w, rstd)


def _dw(kind, x, dy, mean, rstd, dw, db):
    if kind == "layer":
        K.layer_norm_dw(x, dy, mean, rstd, dw, db)
    else:
        assert db is None
        K.rms_norm_dw(x, dy, rstd, dw)


def _stats32(mean, rstd):
    """The float64 reference statistics as the fp32 tensors the kernels take."""
    return (mean.float() if mean is not None else None), rstd.float()


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["wb", "w", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fwd_matches_float64(kind, m, n, dtype, affine):
    x, _, w, b = _inputs(kind, m, n, dtype, seed=100 + m + n, affine=affine)
    y64, _, _, _, mean64, rstd64 = _ref(kind, x, torch.zeros_like(x), w, b)
    y, mean, rstd = _fwd(kind, x, w, b)
    assert y.dtype == dtype and rstd.dtype == torch.float32 and rstd.shape == (m,)
    assert_close(y, y64, dtype, name="Y")
    # statistics are fp32 whatever the input dtype; N = 1 makes var 0 and rstd = 1/sqrt(eps)
    assert_close(rstd, rstd64, torch.float32, name="rstd")
    if kind == "layer":
        assert mean.dtype == torch.float32 and mean.shape == (m,)
        assert_close(mean, mean64, torch.float32, name="mean")


@pytest.mark.parametrize("kind", KINDS)
def test_fwd_leading_dims_and_strided_rows(kind):
    """x [2, 3, 17] keeps its shape; a row-strided view is read in place."""
    x, _, w, b = _inputs(kind, 6, 17, torch.float32, seed=7)
    x3 = x.reshape(2, 3, 17)
    y64, *_ = _ref(kind, x, torch.zeros_like(x), w, b)
    y, _, rstd = _fwd(kind, x3, w, b)
    assert y.shape == (2, 3, 17) and rstd.shape == (6,)
    assert_close(y.reshape(6, 17), y64, name="Y 3-D")
    wide = torch.randn(6, 40)
    wide[:, 5:22] = x
    strided = wide[:, 5:22]  # row stride 40
    y, _, _ = _fwd(kind, strided, w, b)
    assert_close(y, y64, name="Y strided")


def test_fwd_zero_rows():
    y, mean, rstd = K.layer_norm_fwd(torch.randn(0, 8), torch.ones(8), None, EPS)
    assert y.shape == (0, 8) and mean.shape == (0,) and rstd.shape == (0,)


# ----------------------------------------------------------------------------------------
# p1: dX
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_dx_matches_float64(kind, m, n, dtype, with_weight):
    x, dy, w, b = _inputs(kind, m, n, dtype, seed=200 + m + n, affine="wb" if with_weight else "none")
    _, dx64, _, _, mean64, rstd64 = _ref(kind, x, dy, w, b)
    mean, rstd = _stats32(mean64, rstd64)  # independent of the forward kernel
    dx = _dx(kind, dy, x, w, mean, rstd)
    assert dx.dtype == dtype and dx.shape == x.shape
    if n == 1:
        if kind == "layer":  # X̂ = 0 and G - mean(G) = 0: dX is exactly zero
            assert torch.equal(dx, torch.zeros_like(dx)) and dx64.abs().max() < 1e-10
        else:  # dX = G rstd (1 - X̂²) with X̂² ≈ 1: cancellation, so the error scales with |G| rstd
            g = dy.double() * (w.double() if w is not None else 1.0)
            atol = 1e-5 * (g.abs() * rstd64[:, None]).max().item()
            torch.testing.assert_close(dx.double(), dx64, atol=atol, rtol=1e-3)
        return
    assert_close(dx, dx64, dtype, name="dX")


@pytest.mark.parametrize("kind", KINDS)
def test_dx_leading_dims_and_expanded_dy(kind):
    """dy from y.sum().backward() is an expanded (stride-0) tensor: it must still work."""
    x, _, w, b = _inputs(kind, 6, 33, torch.float32, seed=9)
    dy = torch.ones(1, 1).expand(6, 33)
    _, dx64, _, _, mean64, rstd64 = _ref(kind, x, dy, w, b)
    mean, rstd = _stats32(mean64, rstd64)
    dx = _dx(kind, dy.reshape(2, 3, 33), x.reshape(2, 3, 33), w, mean, rstd)
    assert dx.shape == (2, 3, 33)
    assert_close(dx.reshape(6, 33), dx64, name="dX")


# ----------------------------------------------------------------------------------------
# p2: dγ, dβ
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_dtype", ["input", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_dw_accumulates_float64(kind, m, n, dtype, grad_dtype):
    x, dy, w, b = _inputs(kind, m, n, dtype, seed=300 + m + n)
    _, _, dw64, db64, mean64, rstd64 = _ref(kind, x, dy, w, b)
    mean, rstd = _stats32(mean64, rstd64)
    gdt = dtype if grad_dtype == "input" else torch.float32
    gen = torch.Generator().manual_seed(301)
    dw0 = _randn(gen, n, dtype=gdt)
    db0 = _randn(gen, n, dtype=gdt) if kind == "layer" else None
    dw, db = dw0.clone(), (db0.clone() if db0 is not None else None)
    _dw(kind, x, dy, mean, rstd, dw, db)
    assert dw.dtype == gdt
    assert_close(dw, dw0.double() + dw64, gdt, name="dgamma", scale=2)
    if kind == "layer":
        assert_close(db, db0.double() + db64, gdt, name="dbeta", scale=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_dw_batched_equals_sum(kind, dtype):
    """One launch over k micro-batches (uneven rows, one empty, one row-strided, one 3-D)
    equals the sum of the per-micro-batch gradients, and k separate launches."""
    n = 45
    rows = [37, 0, 20, 6]
    cases = [_inputs(kind, r, n, dtype, seed=400 + i) for i, r in enumerate(rows)]
    w, b = cases[0][2], cases[0][3]
    xs, dys, means, rstds = [], [], [], []
    dw64 = torch.zeros(n, dtype=torch.float64)
    db64 = torch.zeros(n, dtype=torch.float64)
    for i, (x, dy, _, _) in enumerate(cases):
        _, _, dwi, dbi, mean64, rstd64 = _ref(kind, x, dy, w, b)
        dw64 += dwi
        if dbi is not None:
            db64 += dbi
        mean, rstd = _stats32(mean64, rstd64)
        if i == 2:  # row stride 64 instead of n
            wide = torch.zeros(x.shape[0], 64, dtype=dtype)
            wide[:, 3:3 + n] = x
            x = wide[:, 3:3 + n]
        if i == 3:
            x, dy = x.reshape(2, 3, n), dy.reshape(2, 3, n)
        xs.append(x), dys.append(dy), means.append(mean), rstds.append(rstd)
    gen = torch.Generator().manual_seed(402)
    dw0 = _randn(gen, n, dtype=torch.float32)
    db0 = _randn(gen, n, dtype=torch.float32) if kind == "layer" else None

    dw, db = dw0.clone(), (db0.clone() if db0 is not None else None)
    _dw(kind, xs, dys, means, rstds, dw, db)
    assert_close(dw, dw0.double() + dw64, torch.float32 if dtype == torch.float32 else dtype,
                 name="batched dgamma", scale=2)
    if kind == "layer":
        assert_close(db, db0.double() + db64, torch.float32 if dtype == torch.float32 else dtype,
                     name="batched dbeta", scale=2)

    dw_seq, db_seq = dw0.clone(), (db0.clone() if db0 is not None else None)
    for x, dy, mean, rstd in zip(xs, dys, means, rstds):
        _dw(kind, x, dy, mean, rstd, dw_seq, db_seq)
    torch.testing.assert_close(dw, dw_seq, rtol=1e-5, atol=1e-5)
    if kind == "layer":
        torch.testing.assert_close(db, db_seq, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(0, 40), min_size=1, max_size=5), n=st.integers(2, 300),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_dw_any_split_of_rows_gives_the_same_gradient(rows, n, kind, seed):
    """However the rows are cut into micro-batches, batched p2 equals float64 on all rows."""
    total = sum(rows)
    assume(total > 0)  # no rows at all adds exactly nothing; N = 1 is in SHAPES above
    x, dy, w, b = _inputs(kind, total, n, torch.float32, seed=seed)
    _, _, dw64, db64, mean64, rstd64 = _ref(kind, x, dy, w, b)
    mean, rstd = _stats32(mean64, rstd64)
    cuts = [sum(rows[:i]) for i in range(len(rows) + 1)]
    parts = [slice(a, c) for a, c in zip(cuts, cuts[1:])]
    dw = torch.zeros(n)
    db = torch.zeros(n) if kind == "layer" else None
    _dw(kind, [x[p] for p in parts], [dy[p] for p in parts],
        [mean[p] for p in parts] if mean is not None else None, [rstd[p] for p in parts], dw, db)
    assert_close(dw, dw64, name="dgamma", scale=2)
    if db is not None:
        assert_close(db, db64, name="dbeta", scale=2)


def test_dw_is_deterministic():
    x, dy, w, b = _inputs("layer", 37, 53, torch.float32, seed=500)
    _, _, _, _, mean64, rstd64 = _ref("layer", x, dy, w, b)
    mean, rstd = _stats32(mean64, rstd64)
    outs = []
    for _ in range(2):
        dw, db = torch.zeros(53), torch.zeros(53)
        K.layer_norm_dw([x[:20], x[20:]], [dy[:20], dy[20:]], [mean[:20], mean[20:]], [rstd[:20], rstd[20:]], dw, db)
        outs.append((dw, db))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_dw_only_bias_or_nothing():
    """dweight None: only dβ (X is not read); both None: a no-op."""
    x, dy, w, b = _inputs("layer", 37, 53, torch.float32, seed=600)
    _, _, _, db64, mean64, rstd64 = _ref("layer", x, dy, w, b)
    mean, rstd = _stats32(mean64, rstd64)
    db = torch.ones(53)
    K.layer_norm_dw(x, dy, mean, rstd, None, db)
    assert_close(db, 1 + db64, name="dbeta only", scale=2)
    K.layer_norm_dw(x, dy, mean, rstd, None, None)
    K.rms_norm_dw(x, dy, rstd, None)


# ----------------------------------------------------------------------------------------
# limits and input errors
# ----------------------------------------------------------------------------------------


def test_hidden_size_limit_is_a_clear_error():
    n = K.MAX_HIDDEN + 1
    x = torch.zeros(1, n, dtype=torch.float16)
    stats = torch.zeros(1)
    for call in (lambda: K.layer_norm_fwd(x, None, None, EPS),
                 lambda: K.rms_norm_fwd(x, None, EPS),
                 lambda: K.layer_norm_dx(x, x, None, stats, stats),
                 lambda: K.rms_norm_dw(x, x, stats, torch.zeros(n))):
        with pytest.raises(ValueError, match=rf"last dim {n}.*{K.MAX_HIDDEN}.*MAX_HIDDEN"):
            call()
    assert K.MAX_HIDDEN >= 8192


def test_input_errors():
    x = torch.randn(4, 8)
    dy = torch.randn(4, 8)
    w = torch.ones(8)
    mean, rstd = torch.zeros(4), torch.ones(4)
    with pytest.raises(TypeError, match="float64"):
        K.layer_norm_fwd(x.double(), None, None, EPS)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        K.layer_norm_fwd(x, torch.ones(7), None, EPS)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        K.rms_norm_fwd(x, w, -1.0)
    with pytest.raises(ValueError, match="at least 1 dim"):
        K.rms_norm_fwd(torch.tensor(1.0), None, EPS)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 7\)"):
        K.layer_norm_dx(dy[:, :7], x, w, mean, rstd)
    with pytest.raises(TypeError, match="dy has dtype torch.float16"):
        K.rms_norm_dx(dy.half(), x, w, rstd)
    with pytest.raises(TypeError, match="rstd has dtype torch.float16, expected torch.float32"):
        K.rms_norm_dx(dy, x, w, rstd.half())
    with pytest.raises(ValueError, match=r"mean has shape \(3,\), expected \(4,\)"):
        K.layer_norm_dx(dy, x, w, mean[:3], rstd)
    with pytest.raises(ValueError, match="x has 2 micro-batches but dy has 1"):
        K.layer_norm_dw([x, x], [dy], [mean, mean], [rstd, rstd], torch.zeros(8), None)
    with pytest.raises(TypeError, match="all as sequences"):
        K.rms_norm_dw([x], dy, [rstd], torch.zeros(8))
    with pytest.raises(ValueError, match=r"x\[1\] has last dim 9 but x\[0\] has 8"):
        K.rms_norm_dw([x, torch.randn(4, 9)], [dy, torch.randn(4, 9)], [rstd, rstd], torch.zeros(8))
    with pytest.raises(TypeError, match="dweight has dtype torch.float16, expected torch.float32"):
        K.rms_norm_dw(x, dy, rstd, torch.zeros(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"dbias has shape \(9,\)"):
        K.layer_norm_dw(x, dy, mean, rstd, torch.zeros(8), torch.zeros(9))
