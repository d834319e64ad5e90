"""Triton flash-attention kernels (twobp.kernels.attention) against float64 torch autograd.

Runs the real kernels on CPU through Triton's interpreter, in fp32 and fp16. Inputs are
strided per-head views of one packed QKV buffer (as a projection produces them); outputs
are written into NaN-poisoned buffers, dQ/dK/dV as views of one packed poisoned dQKV
buffer, so unwritten elements and writes into a neighbour's columns both fail.
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from checks import assert_close, poison  # noqa: E402
from twobp.kernels.attention import attention_dx, attention_fwd  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# (B, S, H, Hkv, D, causal): odd lengths (tails), exact block multiples, GQA, head dims that
# are not powers of two (80) or below 16 (8), and the largest (128).
CASES = [
    (1, 37, 2, 2, 32, False),
    (2, 37, 4, 2, 16, True),
    (1, 32, 2, 2, 16, True),
    (1, 32, 4, 1, 32, False),
    (1, 45, 4, 2, 80, False),
    (1, 70, 2, 1, 80, True),
    (2, 19, 2, 2, 8, True),
    (1, 23, 2, 1, 128, True),
]
CASE_IDS = [f"B{b}-S{s}-H{h}-Hkv{hk}-D{d}-{'causal' if c else 'full'}" for b, s, h, hk, d, c in CASES]


def _packed_qkv(gen, b, s, h, hkv, d, dtype):
    """q, k, v as per-head views of one [B, S, (H + 2 Hkv) D] buffer, like a QKV projection."""
    qkv = torch.randn(b, s, (h + 2 * hkv) * d, generator=gen).to(dtype)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    return q.unflatten(-1, (h, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))


def _reference(q, k, v, do, causal, scale):
    """float64 autograd: (o, lse, dq, dk, dv), with GQA by repeating k/v heads."""
    g = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kk, vv = k64.repeat_interleave(g, dim=2), v64.repeat_interleave(g, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q64, kk) * scale
    if causal:
        s = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, S]
    o = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), vv)
    o.backward(do.double())
    return o.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def _poisoned_outputs(q, k):
    b, s, h, d = q.shape
    hkv = k.shape[2]
    o = poison(torch.empty_like(q, memory_format=torch.contiguous_format))
    lse = poison(torch.empty(b, h, s, dtype=torch.float32))
    dqkv = poison(torch.empty(b, s, (h + 2 * hkv) * d, dtype=q.dtype))
    dq, dk, dv = dqkv.split([h * d, hkv * d, hkv * d], dim=-1)
    return o, lse, dq.unflatten(-1, (h, d)), dk.unflatten(-1, (hkv, d)), dv.unflatten(-1, (hkv, d))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,s,h,hkv,d,causal", CASES, ids=CASE_IDS)
def test_fwd_and_dx_match_float64(b, s, h, hkv, d, causal, dtype):
    gen = torch.Generator().manual_seed(100 * s + 10 * h + d)
    q, k, v = _packed_qkv(gen, b, s, h, hkv, d, dtype)
    do = torch.randn(b, s, h, d, generator=gen).to(dtype)
    o_buf, lse_buf, dq_buf, dk_buf, dv_buf = _poisoned_outputs(q, k)
    o64, lse64, dq64, dk64, dv64 = _reference(q, k, v, do, causal, 1 / math.sqrt(d))

    o, lse = attention_fwd(q, k, v, causal=causal, o=o_buf, lse=lse_buf)
    assert o is o_buf and lse is lse_buf
    assert_close(o, o64, dtype, name="O")
    assert lse.dtype == torch.float32
    assert_close(lse, lse64, torch.float32, name="lse")  # fp32 statistics whatever the input dtype

    dq, dk, dv = attention_dx(do, q, k, v, o, lse, causal=causal, dq=dq_buf, dk=dk_buf, dv=dv_buf)
    assert dq is dq_buf and dk is dk_buf and dv is dv_buf
    assert_close(dq, dq64, dtype, name="dQ")
    assert_close(dk, dk64, dtype, name="dK")
    assert_close(dv, dv64, dtype, name="dV")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_allocating_launchers_custom_scale_and_determinism(causal):
    gen = torch.Generator().manual_seed(7)
    b, s, h, hkv, d, scale = 2, 21, 4, 2, 24, 0.3
    q = torch.randn(b, s, h, d, generator=gen)
    k = torch.randn(b, s, hkv, d, generator=gen)
    v = torch.randn(b, s, hkv, d, generator=gen)
    do = torch.randn(b, s, h, d, generator=gen)
    o64, lse64, dq64, dk64, dv64 = _reference(q, k, v, do, causal, scale)

    o, lse = attention_fwd(q, k, v, causal=causal, sm_scale=scale)
    assert o.shape == q.shape and o.is_contiguous() and lse.shape == (b, h, s)
    assert_close(o, o64, name="O")
    assert_close(lse, lse64, name="lse")
    grads = attention_dx(do, q, k, v, o, lse, causal=causal, sm_scale=scale)
    for got, want, name in zip(grads, (dq64, dk64, dv64), ("dQ", "dK", "dV")):
        assert_close(got, want, name=name)
    again = attention_dx(do, q, k, v, o, lse, causal=causal, sm_scale=scale)
    assert all(torch.equal(a, b_) for a, b_ in zip(grads, again)), "backward must be deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_token(dtype):
    """S = 1: o = v of the head's kv head, lse = the one score, dQ = dK = 0, dV = Σ_group dO."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 16, generator=gen).to(dtype)
    k = torch.randn(2, 1, 2, 16, generator=gen).to(dtype)
    v = torch.randn(2, 1, 2, 16, generator=gen).to(dtype)
    do = torch.randn(2, 1, 4, 16, generator=gen).to(dtype)
    for causal in (False, True):
        o, lse = attention_fwd(q, k, v, causal=causal)
        assert_close(o, v.double().repeat_interleave(2, dim=2), dtype, name="O")
        score = (q.double() * k.double().repeat_interleave(2, dim=2)).sum(-1) / 4.0  # [B, 1, H]
        assert_close(lse, score.transpose(1, 2), torch.float32, name="lse")
        dq, dk, dv = attention_dx(do, q, k, v, o, lse, causal=causal)
        tiny = 1e-6 if dtype == torch.float32 else 1e-3
        assert dq.abs().max() < tiny and dk.abs().max() < tiny, "softmax over one key has no gradient"
        assert_close(dv, do.double().unflatten(2, (2, 2)).sum(3), dtype, name="dV")


def test_bad_inputs_name_the_fix():
    q = torch.randn(1, 8, 4, 16)
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="4-D"):
        attention_fwd(q[0], k, k, causal=False)
    with pytest.raises(TypeError, match="float16"):
        attention_fwd(q.double(), k.double(), k.double(), causal=False)
    with pytest.raises(TypeError, match=r"k dtype torch.float16 differs"):
        attention_fwd(q, k.half(), k, causal=False)
    with pytest.raises(ValueError, match="multiple of the k/v heads Hkv=3"):
        attention_fwd(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16), causal=False)
    with pytest.raises(ValueError, match=r"S=8"):
        attention_fwd(q, torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16), causal=False)
    with pytest.raises(ValueError, match="head dim D=160"):
        big = torch.randn(1, 8, 2, 160)
        attention_fwd(big, big, big, causal=False)
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        attention_fwd(q.transpose(2, 3).contiguous().transpose(2, 3), k, k, causal=False)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attention_fwd(q, k, k, causal=None)
    with pytest.raises(ValueError, match="sm_scale"):
        attention_fwd(q, k, k, causal=False, sm_scale=-1.0)
    with pytest.raises(ValueError, match="output buffer o"):
        attention_fwd(q, k, k, causal=False, o=torch.empty(1, 8, 4, 8))
    o, lse = attention_fwd(q, k, k, causal=True)
    with pytest.raises(ValueError, match="lse must be the forward's contiguous fp32"):
        attention_dx(o, q, k, k, o, lse.half(), causal=True)
    with pytest.raises(ValueError, match="do shape"):
        attention_dx(o[:, :4], q, k, k, o, lse, causal=True)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (16, 64)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_other_block_shapes(block_m, block_n, causal, monkeypatch):
    """The GPU configs use BLOCK_M != BLOCK_N; the interpreter's default is 16 x 16. Force
    other shapes so the causal/tail block split is checked where the two differ."""
    import triton

    from twobp.kernels import attention as attn

    cfg = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=1, num_stages=1)]
    for kernel in (attn._attn_fwd_kernel, attn._attn_bwd_dkdv_kernel, attn._attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "configs", cfg)
        monkeypatch.setattr(kernel, "cache", {})
    gen = torch.Generator().manual_seed(block_m + block_n)
    q, k, v = _packed_qkv(gen, 1, 75, 4, 2, 16, torch.float32)
    do = torch.randn(1, 75, 4, 16, generator=gen)
    o64, lse64, dq64, dk64, dv64 = _reference(q, k, v, do, causal, 0.25)
    o, lse = attention_fwd(q, k, v, causal=causal)
    assert_close(o, o64, name="O")
    assert_close(lse, lse64, name="lse")
    dq, dk, dv = attention_dx(do, q, k, v, o, lse, causal=causal)
    assert_close(dq, dq64, name="dQ")
    assert_close(dk, dk64, name="dK")
    assert_close(dv, dv64, name="dV")
