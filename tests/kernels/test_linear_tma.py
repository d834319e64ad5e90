"""The Hopper TMA kernels of twobp.kernels.linear_tma against float64 torch references.

Triton's interpreter runs device-side tensor descriptors (``tl.make_tensor_descriptor``):
loads outside the tensor read zeros, stores outside it are dropped, as TMA does on a GPU.
So the same kernels that compile to ``cp.async.bulk.tensor`` + ``wgmma`` for sm_90
(tests/kernels/test_compile_targets.py) run here on CPU tensors, in fp32 and fp16, through
the public launchers with ``tma=True``. Under the interpreter a launch has 4 persistent
programs, so every shape below with more than 4 tiles makes each program walk several.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from checks import assert_close  # noqa: E402
from twobp.kernels import linear as lin  # noqa: E402
from twobp.kernels.linear import linear_dw, linear_dx, linear_fwd  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# (M, N, K): rows of any count, feature counts whose rows are 16-byte aligned (TMA's rule);
# ragged last tiles in every dim (interpreter tiles are 32x16x16 and 16x32x16).
SHAPES = [(37, 24, 40), (70, 56, 48), (1, 8, 16), (96, 48, 8)]
IDS = [f"M{m}-N{n}-K{k}" for m, n, k in SHAPES]


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _guarded(rows: int, cols: int, dtype: torch.dtype):
    """A NaN buffer with an aligned [rows, cols] view inside (8 columns of margin each side,
    one row above and below); returns (buffer, view)."""
    buf = torch.full((rows + 2, cols + 16), float("nan"), dtype=dtype)
    return buf, buf[1:rows + 1, 8:cols + 8]


def _outside_untouched(buf, rows, cols):
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[1:rows + 1, 8:cols + 8] = False
    return not (~torch.isnan(buf[outside])).any()


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=IDS)
def test_tma_fwd_matches_float64(m, n, k, dtype, with_bias):
    gen = torch.Generator().manual_seed(3 * m + n + k)
    x = _randn(gen, m, k, dtype=dtype)
    w = _randn(gen, n, k, dtype=dtype)
    b = _randn(gen, n, dtype=dtype) if with_bias else None
    buf, out = _guarded(m, n, dtype)

    y = linear_fwd(x, w, b, out=out, tma=True)

    assert y is out
    assert_close(y, x.double() @ w.double().T + (b.double() if with_bias else 0.0), name="Y")
    assert _outside_untouched(buf, m, n), "the TMA store wrote outside the output view"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=IDS)
def test_tma_dx_matches_float64(m, n, k, dtype):
    gen = torch.Generator().manual_seed(5 * m + n + k)
    dy = _randn(gen, m, n, dtype=dtype)
    w = _randn(gen, n, k, dtype=dtype)
    buf, out = _guarded(m, k, dtype)

    dx = linear_dx(dy, w, out=out, tma=True)

    assert_close(dx, dy.double() @ w.double(), name="dX")
    assert _outside_untouched(buf, m, k), "the TMA store wrote outside the output view"


@pytest.mark.parametrize("grad_dtype", ["input", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=IDS)
def test_tma_dw_accumulates(m, n, k, dtype, grad_dtype):
    gen = torch.Generator().manual_seed(7 * m + n + k)
    x = _randn(gen, m, k, dtype=dtype)
    dy = _randn(gen, m, n, dtype=dtype)
    gd = dtype if grad_dtype == "input" else torch.float32
    dw0 = _randn(gen, n, k, dtype=gd)
    db0 = _randn(gen, n, dtype=gd)
    dw, db = dw0.clone(), db0.clone()

    linear_dw(x, dy, dw, db, tma=True)

    assert_close(dw.double() - dw0.double(), dy.double().T @ x.double(), dtype, name="dW increment")
    assert_close(db.double() - db0.double(), dy.double().sum(0), dtype, name="db increment")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tma_batched_dw_equals_one_big_gemm(dtype):
    """k micro-batches of different row counts through the device table, one descriptor pair
    built per micro-batch in the kernel: the same as the GEMM over their concatenation."""
    gen = torch.Generator().manual_seed(17)
    n, k = 40, 24
    rows = [37, 1, 64, 20]
    xs = [_randn(gen, r, k, dtype=dtype) for r in rows]
    dys = [_randn(gen, r, n, dtype=dtype) for r in rows]
    dw = torch.zeros(n, k, dtype=torch.float32)
    db = torch.zeros(n, dtype=torch.float32)

    linear_dw(xs, dys, dw, db, tma=True)

    x_all, dy_all = torch.cat(xs).double(), torch.cat(dys).double()
    assert_close(dw, dy_all.T @ x_all, dtype, name="dW")
    assert_close(db, dy_all.sum(0), dtype, name="db")


def test_tma_batched_dw_skips_empty_and_reads_views():
    """Row slices of one buffer (aligned starts) and an empty micro-batch in the list."""
    gen = torch.Generator().manual_seed(23)
    n, k = 16, 32
    x_all = _randn(gen, 50, k, dtype=torch.float16)
    dy_all = _randn(gen, 50, n, dtype=torch.float16)
    xs = [x_all[:8], x_all[8:8], x_all[8:50]]
    dys = [dy_all[:8], dy_all[8:8], dy_all[8:50]]
    dw = torch.zeros(n, k, dtype=torch.float16)

    linear_dw(xs, dys, dw, tma=True)

    assert_close(dw, dy_all.double().T @ x_all.double(), name="dW")


@pytest.mark.parametrize("what", ["unaligned-row", "strided-column", "odd-base"])
def test_tma_true_names_the_operand_that_rules_it_out(what):
    gen = torch.Generator().manual_seed(0)
    if what == "unaligned-row":
        x = _randn(gen, 9, 13, dtype=torch.float16)  # 26-byte rows
        needle = "row stride"
    elif what == "strided-column":
        x = _randn(gen, 16, 9, dtype=torch.float16).T  # column stride 9
        needle = "column stride"
    else:
        x = _randn(gen, 9, 17, dtype=torch.float16)[:, 1:]  # 16 columns, base 2 bytes in
        needle = "16-byte aligned"
    w = _randn(gen, 8, x.shape[1], dtype=torch.float16)
    with pytest.raises(ValueError, match=needle) as err:
        linear_fwd(x, w, tma=True)
    assert "x " in str(err.value) and "tma=None" in str(err.value)


def test_tma_auto_is_off_under_the_interpreter_and_flag_is_checked():
    """tma=None picks the TMA kernels only on sm_90 GPUs; on CPU tensors it never does."""
    x = torch.zeros(16, 16, dtype=torch.float16)
    assert lin._use_tma(None, x.device, x.dtype, x=x) is False
    assert lin._use_tma(False, x.device, x.dtype, x=x) is False
    assert lin._use_tma(True, x.device, x.dtype, x=x) is True
    with pytest.raises(TypeError, match="tma must be"):
        lin._use_tma("yes", x.device, x.dtype, x=x)
