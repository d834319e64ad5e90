"""Triton linear kernels (twobp.kernels.linear) against float64 torch references.

Runs the real kernels on CPU through Triton's interpreter, in fp32 and fp16 (the interpreter
cannot compute bf16). Every output buffer sits inside a larger NaN-filled buffer: elements the
kernel forgets to write stay NaN and fail, and writes outside the view show up in the guard.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from checks import assert_close  # noqa: E402
from twobp.kernels.linear import linear_dw, linear_dx, linear_flops, linear_fwd  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# (M, N, K): odd sizes, the degenerate 1s, and multiples of the GPU block sizes.
SHAPES = [(37, 29, 53), (1, 29, 53), (37, 29, 1), (5, 1, 7), (64, 128, 64), (128, 64, 128)]
SHAPE_IDS = [f"M{m}-N{n}-K{k}" for m, n, k in SHAPES]


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _guarded(rows: int, cols: int, dtype: torch.dtype):
    """A NaN buffer with a [rows, cols] view inside it (row stride cols + 5, a margin all round).

    Returns (buffer, view); the view is poisoned too, so unwritten elements stay NaN.
    """
    buf = torch.full((rows + 2, cols + 5), float("nan"), dtype=dtype)
    return buf, buf[1:rows + 1, 2:cols + 2]


def _assert_guard_intact(buf: torch.Tensor, rows: int, cols: int, name: str) -> None:
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[1:rows + 1, 2:cols + 2] = False
    written = ~torch.isnan(buf[outside])
    assert not written.any(), f"{name}: {int(written.sum())} elements written outside the view"


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=SHAPE_IDS)
def test_fwd_matches_float64(m, n, k, dtype, with_bias):
    gen = torch.Generator().manual_seed(1000 + m * 7 + n * 3 + k)
    x = _randn(gen, m, k, dtype=dtype)
    w = _randn(gen, n, k, dtype=dtype)
    b = _randn(gen, n, dtype=dtype) if with_bias else None
    buf, out = _guarded(m, n, dtype)

    y = linear_fwd(x, w, b, out=out)

    assert y is out
    expected = x.double() @ w.double().T + (b.double() if with_bias else 0.0)
    assert_close(y, expected, name="Y")
    _assert_guard_intact(buf, m, n, "Y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_strided_views_and_allocation(dtype):
    """W given as a transposed view, X as a column slice: the kernel reads them in place."""
    gen = torch.Generator().manual_seed(11)
    m, n, k = 45, 19, 33
    x = _randn(gen, m, k + 7, dtype=dtype)[:, 3:k + 3]
    w = _randn(gen, k, n, dtype=dtype).T  # [N, K] with stride(1) != 1
    b = _randn(gen, 2 * n, dtype=dtype)[::2]  # non-unit stride

    y = linear_fwd(x, w, b)

    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, x.double() @ w.double().T + b.double(), name="Y")


# ----------------------------------------------------------------------------------------
# p1: dX
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=SHAPE_IDS)
def test_dx_matches_float64(m, n, k, dtype):
    gen = torch.Generator().manual_seed(2000 + m * 7 + n * 3 + k)
    dy = _randn(gen, m, n, dtype=dtype)
    w = _randn(gen, n, k, dtype=dtype)
    buf, out = _guarded(m, k, dtype)

    dx = linear_dx(dy, w, out=out)

    assert dx is out
    assert_close(dx, dy.double() @ w.double(), name="dX")
    _assert_guard_intact(buf, m, k, "dX")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dx_strided_views_and_allocation(dtype):
    gen = torch.Generator().manual_seed(12)
    m, n, k = 40, 21, 35
    dy = _randn(gen, n, m, dtype=dtype).T  # column-major dY
    w = _randn(gen, n, k + 4, dtype=dtype)[:, 4:]

    dx = linear_dx(dy, w)

    assert dx.shape == (m, k) and dx.dtype == dtype
    assert_close(dx, dy.double() @ w.double(), name="dX")


def test_fwd_and_dx_compose_to_autograd():
    """The launchers give what torch's autograd gives for F.linear (float64 reference)."""
    gen = torch.Generator().manual_seed(13)
    x = _randn(gen, 23, 41, dtype=torch.float32)
    w = _randn(gen, 17, 41, dtype=torch.float32)
    b = _randn(gen, 17, dtype=torch.float32)
    dy = _randn(gen, 23, 17, dtype=torch.float32)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y64 = torch.nn.functional.linear(x64, w64, b64)
    y64.backward(dy.double())

    dw, db = torch.zeros_like(w), torch.zeros_like(b)
    linear_dw(x, dy, dw, db)

    assert_close(linear_fwd(x, w, b), y64, name="Y")
    assert_close(linear_dx(dy, w), x64.grad, name="dX")
    assert_close(dw, w64.grad, name="dW")
    assert_close(db, b64.grad, name="db")


# ----------------------------------------------------------------------------------------
# p2: dW and db
# ----------------------------------------------------------------------------------------

# (input dtype, gradient dtype): same precision, and fp32 master grads for fp16 inputs.
GRAD_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
GRAD_IDS = ["fp32", "fp16", "fp16-gradfp32"]


def _grad_buffers(gen, n: int, k: int, grad_dtype: torch.dtype, with_bias: bool):
    """dW and db views inside NaN guards, filled with random (non-zero) running gradients."""
    dw_buf, dw = _guarded(n, k, grad_dtype)
    dw.copy_(_randn(gen, n, k, dtype=grad_dtype))
    db_buf, db = (None, None)
    if with_bias:
        db_buf, db2 = _guarded(1, n, grad_dtype)
        db = db2[0]
        db.copy_(_randn(gen, n, dtype=grad_dtype))
    return dw_buf, dw, db_buf, db


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype,grad_dtype", GRAD_DTYPES, ids=GRAD_IDS)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=SHAPE_IDS)
def test_dw_accumulates_into_running_grads(m, n, k, dtype, grad_dtype, with_bias):
    gen = torch.Generator().manual_seed(3000 + m * 7 + n * 3 + k)
    x = _randn(gen, m, k, dtype=dtype)
    dy = _randn(gen, m, n, dtype=dtype)
    dw_buf, dw, db_buf, db = _grad_buffers(gen, n, k, grad_dtype, with_bias)
    dw0 = dw.double()
    db0 = db.double() if with_bias else None

    linear_dw(x, dy, dw, db)

    assert_close(dw, dw0 + dy.double().T @ x.double(), name="dW")
    _assert_guard_intact(dw_buf, n, k, "dW")
    if with_bias:
        assert_close(db, db0 + dy.double().sum(0), name="db")
        _assert_guard_intact(db_buf, 1, n, "db")


# Row counts per micro-batch: one micro-batch given as a list, three different ones, and one
# micro-batch with no rows in the middle.
ROWS = [(29,), (5, 40, 17), (7, 0, 33)]


@pytest.mark.parametrize("rows", ROWS, ids=["-".join(map(str, r)) for r in ROWS])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype,grad_dtype", GRAD_DTYPES, ids=GRAD_IDS)
@pytest.mark.parametrize("n,k", [(29, 53), (32, 48)], ids=["odd", "aligned"])
def test_dw_batched_equals_sum_of_micro_batches(n, k, rows, dtype, grad_dtype, with_bias):
    """One launch over k micro-batches == k launches, and == the float64 sum.

    (32, 48) keeps every base address and row stride 16-aligned, so the batched launch takes
    the kernel's aligned-table branch; (29, 53) does not.
    """
    gen = torch.Generator().manual_seed(4000 + sum(rows) + n + k)
    xs = [_randn(gen, r, k, dtype=dtype) for r in rows]
    dys = [_randn(gen, r, n, dtype=dtype) for r in rows]
    _, dw, _, db = _grad_buffers(gen, n, k, grad_dtype, with_bias)
    dw_each, db_each = dw.clone(), (db.clone() if with_bias else None)
    dw0, db0 = dw.double(), (db.double() if with_bias else None)

    linear_dw(xs, dys, dw, db)
    for x, dy in zip(xs, dys):
        linear_dw(x, dy, dw_each, db_each)

    expected_dw = dw0 + sum(dy.double().T @ x.double() for x, dy in zip(xs, dys))
    assert_close(dw, expected_dw, name="batched dW")
    assert_close(dw, dw_each.double(), grad_dtype, name="batched dW vs per-micro-batch dW", scale=2.0)
    if with_bias:
        expected_db = db0 + sum(dy.double().sum(0) for dy in dys)
        assert_close(db, expected_db, name="batched db")
        assert_close(db, db_each.double(), grad_dtype, name="batched db vs per-micro-batch db", scale=2.0)


def test_dw_batched_reads_views_in_place():
    """Micro-batches that are row-strided views of bigger buffers are read without copies."""
    gen = torch.Generator().manual_seed(14)
    n, k = 24, 36
    big_x = _randn(gen, 80, k + 9, dtype=torch.float32)
    big_dy = _randn(gen, 80, n + 3, dtype=torch.float32)
    xs = [big_x[:19, 9:], big_x[30:70, :k]]
    dys = [big_dy[50:69, :n], big_dy[:40, 3:]]
    dw, db = _randn(gen, n, k, dtype=torch.float32), _randn(gen, n, dtype=torch.float32)
    expected_dw = dw.double() + sum(dy.double().T @ x.double() for x, dy in zip(xs, dys))
    expected_db = db.double() + sum(dy.double().sum(0) for dy in dys)

    linear_dw(xs, dys, dw, db)

    assert_close(dw, expected_dw, name="dW")
    assert_close(db, expected_db, name="db")


@settings(max_examples=12, deadline=None)
@given(
    rows=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    n=st.integers(1, 40),
    k=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_dw_batched_any_row_counts(rows, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [_randn(gen, r, k, dtype=torch.float16) for r in rows]
    dys = [_randn(gen, r, n, dtype=torch.float16) for r in rows]
    dw, db = _randn(gen, n, k, dtype=torch.float32), _randn(gen, n, dtype=torch.float32)
    expected_dw = dw.double() + sum(dy.double().T @ x.double() for x, dy in zip(xs, dys))
    expected_db = db.double() + sum(dy.double().sum(0) for dy in dys)

    linear_dw(xs, dys, dw, db)

    assert_close(dw, expected_dw, name="dW")
    assert_close(db, expected_db, name="db")


# ----------------------------------------------------------------------------------------
# Edge cases and bookkeeping
# ----------------------------------------------------------------------------------------


def test_empty_dimensions():
    gen = torch.Generator().manual_seed(15)
    w = _randn(gen, 6, 5, dtype=torch.float32)
    b = _randn(gen, 6, dtype=torch.float32)
    assert linear_fwd(torch.empty(0, 5), w, b).shape == (0, 6)
    assert linear_dx(torch.empty(0, 6), w).shape == (0, 5)
    # K = 0: Y is the bias broadcast over the rows (an empty sum plus b)
    y = linear_fwd(torch.empty(3, 0), torch.empty(6, 0), b)
    assert torch.equal(y, b.expand(3, 6))
    # no rows at all: the gradients are left as they were
    dw, db = w.clone(), b.clone()
    linear_dw([torch.empty(0, 5), torch.empty(0, 5)], [torch.empty(0, 6), torch.empty(0, 6)], dw, db)
    assert torch.equal(dw, w) and torch.equal(db, b)


def test_flops():
    assert linear_flops(4096, 11008, 4096) == 2 * 4096 * 11008 * 4096
    assert linear_flops(1, 1, 1) == 2


# ----------------------------------------------------------------------------------------
# Validation: errors name the argument, the shape or dtype given, and the fix
# ----------------------------------------------------------------------------------------

f32, f16 = torch.float32, torch.float16


def _t(*shape, dtype=f32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: linear_fwd(_t(2, 3, 4), _t(5, 4)), ValueError, r"x must be 2-D, got shape \(2, 3, 4\).*reshape"),
        (lambda: linear_fwd(_t(3, 4), _t(5, 6)), ValueError, r"weight has shape \(5, 6\), expected \[N, 4\]"),
        (lambda: linear_fwd(_t(3, 4), _t(5, 4), _t(6)), ValueError, r"bias has shape \(6,\), expected \(5,\)"),
        (lambda: linear_fwd(_t(3, 4), _t(5, 4), out=_t(3, 4)), ValueError, r"out has shape \(3, 4\), expected \(3, 5\)"),
        (lambda: linear_fwd(_t(3, 4), _t(5, 4, dtype=f16)), TypeError, r"weight has dtype torch.float16 but x has torch.float32"),
        (lambda: linear_fwd(_t(3, 4), _t(5, 4), _t(5, dtype=f16)), TypeError, r"bias has dtype torch.float16"),
        (lambda: linear_fwd(_t(3, 4), _t(5, 4), out=_t(3, 5, dtype=f16)), TypeError, r"out has dtype torch.float16"),
        (lambda: linear_fwd(_t(3, 4, dtype=torch.int32), _t(5, 4, dtype=torch.int32)), TypeError, r"x has dtype torch.int32"),
        (lambda: linear_fwd([[1.0]], _t(5, 4)), TypeError, r"x must be a torch.Tensor, got list"),
        (lambda: linear_fwd(_t(3, 4), _t(5, 4, device="meta")), ValueError, r"one device.*x on cpu, weight on meta"),
        (lambda: linear_dx(_t(3, 5), _t(4, 6)), ValueError, r"weight has shape \(4, 6\), expected \[5, K\]"),
        (lambda: linear_dx(_t(3, 5), _t(5, 6), out=_t(3, 5)), ValueError, r"out has shape \(3, 5\), expected \(3, 6\)"),
        (lambda: linear_dx(_t(3, 5, dtype=f16), _t(5, 6)), TypeError, r"weight has dtype torch.float32 but dy has torch.float16"),
        (lambda: linear_dx(_t(3, 5), _t(5, 6), out=_t(3, 6, device="meta")), ValueError, r"one device"),
        (lambda: linear_dw(_t(3, 4), _t(3, 5), _t(5, 7)), ValueError, r"x has shape \(3, 4\), expected \[M, 7\]"),
        (lambda: linear_dw(_t(3, 4), _t(2, 5), _t(5, 4)), ValueError, r"dy has shape \(2, 5\), expected \(3, 5\)"),
        (lambda: linear_dw([_t(3, 4), _t(2, 4)], [_t(3, 5), _t(3, 5)], _t(5, 4)), ValueError,
         r"dy\[1\] has shape \(3, 5\), expected \(2, 5\)"),
        (lambda: linear_dw([_t(3, 4)], [_t(3, 5), _t(3, 5)], _t(5, 4)), ValueError, r"x has 1 micro-batches but dy has 2"),
        (lambda: linear_dw([], [], _t(5, 4)), ValueError, r"empty sequences"),
        (lambda: linear_dw(_t(3, 4), [_t(3, 5)], _t(5, 4)), TypeError, r"both be tensors or both be sequences"),
        (lambda: linear_dw(_t(3, 4), _t(3, 5), _t(5, 4), _t(4)), ValueError, r"dbias has shape \(4,\), expected \(5,\)"),
        (lambda: linear_dw(_t(3, 4, dtype=f16), _t(3, 5), _t(5, 4)), TypeError, r"expected torch.float16 for every x and dy"),
        (lambda: linear_dw(_t(3, 4, dtype=f16), _t(3, 5, dtype=f16), _t(5, 4, dtype=torch.bfloat16)), TypeError,
         r"dweight has dtype torch.bfloat16, expected torch.float16, torch.float32"),
        (lambda: linear_dw(_t(3, 4), _t(3, 5), _t(5, 4), _t(5, dtype=f16)), TypeError, r"dbias has dtype torch.float16"),
        (lambda: linear_dw(_t(4, 3).T, _t(3, 5), _t(5, 4)), ValueError, r"x has strides \(1, 3\).*x.contiguous\(\)"),
        (lambda: linear_dw([_t(3, 4), _t(3, 4)], [_t(3, 5), _t(5, 3).T], _t(5, 4)), ValueError,
         r"dy\[1\] has strides \(1, 3\).*contiguous"),
        (lambda: linear_dw(_t(3, 4), _t(3, 5), _t(5, 4, device="meta")), ValueError, r"dweight on meta"),
    ],
)
def test_bad_inputs_raise_with_the_fix(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
