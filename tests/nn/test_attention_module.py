"""TwoBPAttention against nn.MultiheadAttention and a float64 reference, normal and split mode,
on both backends; the attention core op and its torch reference; unsupported cases."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twobp
from checks import assert_close
from twobp.nn.attention import TwoBPAttention
from twobp.ops.attention import AttentionCoreOp, attention_dx_ref, attention_fwd_ref

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]
E, H = 32, 2  # head dim 16


def _pair(dtype=torch.float32, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, bias=bias, batch_first=kw.pop("batch_first", True), dtype=dtype)
    m = TwoBPAttention(E, H, bias=bias, batch_first=ref.batch_first, dtype=dtype, **kw)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _mha64(ref, x, dy, **kw):
    """float64 nn.MultiheadAttention with ref's weights: (out, dx, {name: grad})."""
    ref64 = nn.MultiheadAttention(ref.embed_dim, ref.num_heads, bias=ref.in_proj_bias is not None,
                                  batch_first=ref.batch_first, dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    # A float mask must match the query's dtype: torch 2.13's float64 SDPA silently ignores
    # most of a float32 additive mask (wrong output, no error).
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw = {**kw, "attn_mask": mask.double()}
    out, _ = ref64(x64, x64, x64, need_weights=False, **kw)
    out.backward(dy.double())
    return out, x64.grad, {n: p.grad for n, p in ref64.named_parameters()}


def _run(m, x, dy, split, **kw):
    """Forward + backward of m; in split mode check p1 leaves .grad alone, then run p2."""
    if split:
        with twobp.split_backward(microbatch=0):
            out, w = m(x, x, x, **kw)
        out.backward(dy)
        assert all(p.grad is None for p in m.parameters()), "p1 must leave weight grads untouched"
        assert len(twobp.pending_microbatches(m)) == 1
        dx_after_p1 = x.grad.clone()
        twobp.backward_p2(m)
        assert torch.equal(x.grad, dx_after_p1), "p2 must not touch dX"
    else:
        out, w = m(x, x, x, **kw)
        out.backward(dy)
    assert w is None
    assert twobp.default_store().is_empty()
    return out


def test_drop_in_for_multihead_attention():
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    torch.manual_seed(3)
    m = TwoBPAttention(E, H)
    assert isinstance(m, nn.MultiheadAttention) and isinstance(m, twobp.TwoBPModule)
    assert list(m.state_dict()) == list(ref.state_dict()) == [
        "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    for name, t in ref.state_dict().items():
        assert torch.equal(m.state_dict()[name], t), f"init of {name} must match torch's"
    assert repr(m).replace("TwoBPAttention", "MultiheadAttention").replace(
        "TwoBPLinear", "NonDynamicallyQuantizableLinear") == repr(ref)
    assert (m.embed_dim, m.num_heads, m.head_dim, m.batch_first, m.dropout) == (E, H, 16, True, 0.0)
    nobias = TwoBPAttention(E, H, bias=False)
    assert list(nobias.state_dict()) == ["in_proj_weight", "out_proj.weight"]
    gqa = TwoBPAttention(64, 4, num_kv_heads=2, rotary=True, causal=True)
    assert gqa.in_proj_weight.shape == (64 + 2 * 2 * 16, 64) and gqa.in_proj_bias.shape == (128,)
    assert "num_kv_heads=2" in repr(gqa) and "rotary=True" in repr(gqa)
    assert not gqa._qkv_same_embed_dim, "keeps torch's fused inference fast path away from GQA/rotary"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [False, True], ids=["normal", "split"])
def test_matches_multihead_attention(backend, dtype, split):
    ref, m = _pair(dtype)
    torch.manual_seed(1)
    x = torch.randn(2, 13, E, dtype=dtype).requires_grad_()
    dy = torch.randn(2, 13, E, dtype=dtype)
    out64, dx64, g64 = _mha64(ref, x, dy)
    with twobp.use_backend(backend):
        out = _run(m, x, dy, split)
    assert_close(out, out64, dtype, name="out")
    assert_close(x.grad, dx64, dtype, name="dX")
    for name, p in m.named_parameters():
        assert_close(p.grad, g64[name], dtype, name=f"d{name}", scale=2)


@pytest.mark.parametrize("mask_kind", ["is_causal", "float", "bool"])
def test_causal_masks_match_multihead_attention(mask_kind):
    ref, m = _pair()
    torch.manual_seed(2)
    x = torch.randn(2, 11, E).requires_grad_()
    dy = torch.randn(2, 11, E)
    float_mask = nn.Transformer.generate_square_subsequent_mask(11)
    bool_mask = torch.ones(11, 11, dtype=torch.bool).triu(1)
    kw = {"is_causal": dict(attn_mask=float_mask, is_causal=True), "float": dict(attn_mask=float_mask),
          "bool": dict(attn_mask=bool_mask)}[mask_kind]
    out64, dx64, g64 = _mha64(ref, x, dy, **kw)
    out = _run(m, x, dy, True, **kw)
    assert_close(out, out64, name="out")
    assert_close(x.grad, dx64, name="dX")
    assert_close(m.in_proj_weight.grad, g64["in_proj_weight"], name="dW_in", scale=2)


def test_layouts_and_masks_that_mask_nothing():
    """batch_first=False, unbatched input, an all-False key_padding_mask, a zero attn_mask."""
    ref, m = _pair(batch_first=False)
    torch.manual_seed(4)
    x = torch.randn(9, 3, E)  # [S, B, E]
    want, _ = ref(x, x, x, need_weights=False)
    got, _ = m(x, x, x, key_padding_mask=torch.zeros(3, 9, dtype=torch.bool),
               attn_mask=torch.zeros(9, 9))
    assert_close(got, want.double(), name="seq-first out")
    assert_close(m.self_attention(x), want.double(), name="self_attention(x)")
    u = torch.randn(9, E)
    assert_close(m(u, u, u)[0], ref(u, u, u, need_weights=False)[0].double(), name="unbatched out")


def _rope64(t, theta):
    """Rotary embedding in float64 with the rotate-half formulation (HF LLaMa)."""
    s, d = t.shape[1], t.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)[None, :, None, :]  # (1, S, 1, D)
    rot = torch.cat([-t[..., d // 2:], t[..., :d // 2]], dim=-1)
    return t * emb.cos() + rot * emb.sin()


def _self_attention64(m, x, causal):
    """float64 self-attention from m's weights: projections, RoPE, GQA by repeating heads."""
    h, d, hkv = m.num_heads, m.head_dim, m.num_kv_heads
    w = m.in_proj_weight.detach().double().requires_grad_()
    b = m.in_proj_bias.detach().double().requires_grad_()
    wo = m.out_proj.weight.detach().double().requires_grad_()
    bo = m.out_proj.bias.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    qkv = F.linear(x64, w, b)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
    if m.rotary:
        q, k = _rope64(q, m.rope_theta), _rope64(k, m.rope_theta)
    k, v = k.repeat_interleave(h // hkv, dim=2), v.repeat_interleave(h // hkv, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal).transpose(1, 2)
    out = F.linear(o.flatten(2), wo, bo)
    return out, x64, {"in_proj_weight": w, "in_proj_bias": b, "out_proj.weight": wo, "out_proj.bias": bo}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,num_kv_heads,rotary", [(False, 2, False), (True, 4, True), (True, 1, True)],
                         ids=["gqa", "rope-causal", "mqa-rope-causal"])
def test_gqa_rotary_causal_match_float64(backend, causal, num_kv_heads, rotary):
    torch.manual_seed(5)
    m = TwoBPAttention(64, 4, causal=causal, num_kv_heads=num_kv_heads, rotary=rotary, rope_theta=500.0)
    with torch.no_grad():
        m.in_proj_bias.normal_()  # torch's init zeroes the biases: make them count
        m.out_proj.bias.normal_()
    x = torch.randn(2, 19, 64).requires_grad_()
    dy = torch.randn(2, 19, 64)
    out64, x64, p64 = _self_attention64(m, x, causal)
    out64.backward(dy.double())
    with twobp.use_backend(backend):
        with twobp.split_backward(microbatch=3):
            out = m.self_attention(x)
        out.backward(dy)
        assert_close(x.grad, x64.grad, name="dX after p1")
        twobp.backward_p2(m)
    assert_close(out, out64, name="out")
    for name, p in m.named_parameters():
        assert_close(p.grad, p64[name].grad, name=f"d{name}", scale=2)
    assert twobp.default_store().is_empty()


def test_store_holds_projection_inputs_only():
    """The core has no weights: its saved q, k, v, o, lse stay on the autograd node (freed by
    p1); the store holds x for in_proj's dW and o for out_proj's dW, then the dys."""
    _, m = _pair()
    twobp.label_modules(nn.ModuleDict({"attn": m}))
    store = twobp.default_store()
    x = torch.randn(2, 7, E, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        out = m.self_attention(x)
    labels = sorted(e.label for e in store.report().entries)
    assert labels == ["attn.in_proj", "attn.out_proj"]
    assert store.live_bytes == 2 * x.nbytes  # x and o, both [2, 7, E] fp32
    out.backward(torch.randn_like(out))
    # + dQKV [2, 7, 3E] and dOut [2, 7, E]
    assert store.live_bytes == 2 * x.nbytes + 3 * x.nbytes + x.nbytes
    assert all(e.state == "ready" for e in store.report().entries)
    twobp.backward_p2(m)
    assert store.is_empty() and store.live_bytes == 0


def test_microbatches_accumulate_and_batched_p2():
    ref, m = _pair()
    torch.manual_seed(6)
    xs = [torch.randn(1, 5 + i, E) for i in range(3)]
    dys = [torch.randn(1, 5 + i, E) for i in range(3)]
    for x, dy in zip(xs, dys):
        ref(x, x, x, need_weights=False)[0].backward(dy)
    for i, (x, dy) in enumerate(zip(xs, dys)):
        with twobp.split_backward(microbatch=i):
            out = m.self_attention(x)
        out.backward(dy)
    assert twobp.pending_microbatches(m) == [0, 1, 2]
    twobp.backward_p2(m)
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, q.grad.double(), name=f"d{name}")


def test_in_transformer_encoder_layer():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True)
    ours = nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True)
    ours.self_attn = TwoBPAttention(E, H)
    ours.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, E)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    assert_close(ours(x, src_mask=mask, is_causal=True), layer(x, src_mask=mask, is_causal=True).double(),
                 name="encoder layer out")


def test_core_op_reference_matches_float64_autograd():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 10, 4, 8, generator=gen)
    k = torch.randn(2, 10, 2, 8, generator=gen)
    v = torch.randn(2, 10, 2, 8, generator=gen)
    do = torch.randn(2, 10, 4, 8, generator=gen)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = F.scaled_dot_product_attention(q64.transpose(1, 2), k64.repeat_interleave(2, 2).transpose(1, 2),
                                         v64.repeat_interleave(2, 2).transpose(1, 2), is_causal=True,
                                         scale=0.2).transpose(1, 2)
    o64.backward(do.double())
    o, lse = attention_fwd_ref(q, k, v, causal=True, sm_scale=0.2)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 10)
    assert_close(o, o64, name="O")
    dq, dk, dv = attention_dx_ref(do, q, k, v, o, lse, causal=True, sm_scale=0.2)
    assert_close(dq, q64.grad, name="dQ")
    assert_close(dk, k64.grad, name="dK")
    assert_close(dv, v64.grad, name="dV")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_reference_flash_and_math_paths_agree(causal):
    """The torch backend runs aten's CPU flash attention on CPU and the materialised scores
    elsewhere: both against each other in float64 (GQA, odd length), O, lse and every grad."""
    from twobp.ops.attention import _attention_dx_math, _attention_fwd_math

    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 13, 6, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 13, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    do = torch.randn(2, 13, 6, 8, generator=gen, dtype=torch.float64)
    o, lse = attention_fwd_ref(q, k, v, causal=causal)
    o_m, lse_m = _attention_fwd_math(q, k, v, causal=causal)
    assert o.shape == o_m.shape and lse.shape == lse_m.shape == (2, 6, 13)
    assert torch.allclose(o, o_m, atol=1e-12) and torch.allclose(lse, lse_m, atol=1e-12)
    for got, want, name in zip(attention_dx_ref(do, q, k, v, o, lse, causal=causal),
                               _attention_dx_math(do, q, k, v, o, lse, causal=causal), ("dq", "dk", "dv")):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_op_saves_for_p1_only(backend):
    op = AttentionCoreOp(causal=True)
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
    with twobp.use_backend(backend):
        o, p1, p2 = op.forward((q, k, v), (), save_p1=True, save_p2=True)
        assert sorted(p1) == ["k", "lse", "o", "q", "v"] and p2 == {}
        assert p1["lse"].dtype == torch.float32
        _, p1, _ = op.forward((q, k, v), (), save_p1=False, save_p2=False)
        assert p1 == {}
    with pytest.raises(TypeError, match="causal must be a bool"):
        AttentionCoreOp(causal=1)
    with pytest.raises(ValueError, match="multiple of the k/v heads"):
        op.forward((q, torch.randn(1, 5, 3, 16), torch.randn(1, 5, 3, 16)), (), save_p1=True, save_p2=False)


def test_unsupported_cases_raise_not_implemented():
    m = TwoBPAttention(E, H)
    x = torch.randn(2, 5, E)
    with pytest.raises(NotImplementedError, match="need_weights=True"):
        m(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="is_causal=True but attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="is_causal=True but attn_mask"):
        m(x, x, x, attn_mask=torch.ones(5, 5, dtype=torch.bool).tril(-1), is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask must be \(L, S\)"):
        m(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool).triu(1))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, S\)"):
        m(x, x, x, key_padding_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key must have last dim 32"):
        m(x, torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    with pytest.raises(NotImplementedError, match="kdim=16"):
        TwoBPAttention(E, H, kdim=16, causal=True)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        TwoBPAttention(E, H, add_bias_kv=True)
    with pytest.raises(NotImplementedError, match="add_zero_attn"):
        TwoBPAttention(E, H, add_zero_attn=True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TwoBPAttention(E, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        TwoBPAttention(E, 5)
    with pytest.raises(ValueError, match="even head dim"):
        TwoBPAttention(6, 2, rotary=True)
    with pytest.raises(ValueError, match=r"\[B, S, E=32\]"):
        m.self_attention(torch.randn(2, 5, 16))


def test_triton_backend_launches_the_attention_kernels(monkeypatch):
    """The triton backend must really run kernels/attention.py (not fall back silently)."""
    from twobp.kernels import attention as ka

    calls = []
    for name in ("attention_fwd", "attention_dx"):
        real = getattr(ka, name)
        monkeypatch.setattr(ka, name,
                            lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    m = TwoBPAttention(E, H)
    x = torch.randn(1, 4, E, requires_grad=True)
    with twobp.use_backend("triton"):
        with twobp.split_backward(microbatch=0):
            out = m.self_attention(x)
        out.sum().backward()
        twobp.backward_p2(m)
    assert calls == ["attention_fwd", "attention_dx"]
    calls.clear()
    with twobp.use_backend("torch"):
        m.self_attention(x).sum().backward()
    assert calls == []


def test_normal_mode_autograd_semantics():
    """Outside a split region: retain_graph and autograd.grad on a subset work as in torch."""
    _, m = _pair()
    x = torch.randn(1, 6, E, requires_grad=True)
    out = m.self_attention(x)
    (gx,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    out.sum().backward()
    assert torch.equal(gx, x.grad)
    assert m.in_proj_weight.grad is not None


def test_class_swapped_multihead_attention_still_splits():
    """convert() may swap an nn.MultiheadAttention's class in place; torch's out_proj then is
    not a TwoBPLinear, and its dW must still be deferred (owner: out_proj)."""
    ref, _ = _pair()
    m = nn.MultiheadAttention(E, H, batch_first=True)
    m.load_state_dict(ref.state_dict())
    m.__class__ = TwoBPAttention
    x = torch.randn(2, 5, E, requires_grad=True)
    dy = torch.randn(2, 5, E)
    out64, dx64, g64 = _mha64(ref, x, dy)
    out = _run(m, x, dy, True)
    assert_close(out, out64, name="out")
    for name, p in m.named_parameters():
        assert_close(p.grad, g64[name], name=f"d{name}", scale=2)
