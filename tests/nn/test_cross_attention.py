"""TwoBPAttention's general path against nn.MultiheadAttention (float64 references): cross-attention
(other lengths, packed or separate q/k/v weights), either layout, masks, dropout; nn.Transformer
and nn.TransformerDecoder converted whole, normal and split mode."""

import copy

import pytest
import torch
from torch import nn

import twobp
from checks import assert_close
from twobp.nn.attention import TwoBPAttention

E, H = 24, 3


def _inputs(batch_first, kdim, vdim, same_kv, g, l=5, s=7, b=2):
    def t(n, c):
        return torch.randn(b, n, c, generator=g) if batch_first else torch.randn(n, b, c, generator=g)

    q = t(l, E).requires_grad_()
    k = t(s, kdim).requires_grad_()
    v = k if same_kv else t(s, vdim).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dims", ["packed", "separate"])
@pytest.mark.parametrize("mask", ["none", "padding", "float", "bool3d"])
@pytest.mark.parametrize("split", [False, True])
def test_cross_attention_matches_float64_multihead_attention(backend, batch_first, dims, mask, split):
    kdim, vdim = (E, E) if dims == "packed" else (10, 14)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first)
    m = TwoBPAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first)
    m.load_state_dict(ref.state_dict())
    assert list(m.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    q, k, v = _inputs(batch_first, kdim, vdim, same_kv=dims == "packed", g=g)
    kw = {}
    if mask == "padding":
        kpm = torch.zeros(2, 7, dtype=torch.bool)
        kpm[0, -3:] = True
        kw["key_padding_mask"] = kpm
    elif mask == "float":
        kw["attn_mask"] = torch.randn(5, 7, generator=g)
    elif mask == "bool3d":
        am = torch.rand(2 * H, 5, 7, generator=g) > 0.7
        am[..., 0] = False  # every query sees at least one key
        kw["attn_mask"] = am
    dy = torch.randn(q.shape, generator=g)
    ref64 = copy.deepcopy(ref).double()
    kw64 = {n: (t.double() if t.is_floating_point() else t) for n, t in kw.items()}
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    v64 = k64 if v is k else v.detach().double().requires_grad_()
    out64, _ = ref64(q64, k64, v64, need_weights=False, **kw64)
    out64.backward(dy.double())
    with twobp.use_backend(backend):
        if split:
            with twobp.split_backward(microbatch=0):
                out, w = m(q, k, v, **kw)
            out.backward(dy)
            assert all(p.grad is None for p in m.parameters()), "p1 leaves every projection's dW to p2"
            assert q.grad is not None and k.grad is not None
            twobp.backward_p2(m)
        else:
            out, w = m(q, k, v, **kw)
            out.backward(dy)
    assert w is None
    assert_close(out, out64, name="out")
    assert_close(q.grad, q64.grad, name="dQuery")
    assert_close(k.grad, k64.grad, name="dKey")
    if v is not k:
        assert_close(v.grad, v64.grad, name="dValue")
    for (name, p), p64 in zip(m.named_parameters(), ref64.parameters()):
        assert_close(p.grad, p64.grad, name=f"d{name}", scale=2)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_dropout_draws_as_torch(cross):
    """In training, dropout on the attention weights: the same draws from torch's RNG as
    nn.MultiheadAttention, so equal outputs and gradients under one seed."""
    torch.manual_seed(2)
    ref = nn.MultiheadAttention(E, H, dropout=0.3, batch_first=True)
    m = TwoBPAttention(E, H, dropout=0.3)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, E)
    mem = torch.randn(2, 9, E) if cross else x
    torch.manual_seed(7)
    want, _ = ref(x, mem, mem, need_weights=False)
    want.square().sum().backward()
    torch.manual_seed(7)
    with twobp.split_backward(microbatch=0):
        got, _ = m(x, mem, mem)
    got.square().sum().backward()
    twobp.backward_p2(m)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p, r in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)
    torch.manual_seed(7)
    assert not torch.allclose(m(x, mem, mem)[0], m.eval()(x, mem, mem)[0]), "dropout is active in training"


def _transformer_loss(model, src, tgt, mask):
    out = model(src, tgt, tgt_mask=mask) if isinstance(model, nn.Transformer) else model(tgt, src, tgt_mask=mask)
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


@pytest.mark.parametrize("kind", ["transformer", "decoder"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("split", [False, True])
def test_torch_transformer_converts_fully_and_keeps_working(kind, batch_first, split):
    """nn.Transformer / nn.TransformerDecoder with torch's defaults (dropout 0.1 included):
    every layer converts, and loss and gradients equal the unconverted model's."""
    torch.manual_seed(3)
    if kind == "transformer":
        original = nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                  dim_feedforward=24, batch_first=batch_first)
    else:
        layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=24, batch_first=batch_first)
        original = nn.TransformerDecoder(layer, num_layers=2)
    converted, report = twobp.convert(copy.deepcopy(original), return_report=True)
    assert not report.left, report
    assert report.deferred_share == 1.0, report
    attn = [m for m in converted.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attn and all(isinstance(m, TwoBPAttention) for m in attn)
    g = torch.Generator().manual_seed(4)
    shape = (lambda n: (2, n, 16)) if batch_first else (lambda n: (n, 2, 16))
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    for mb in range(2):
        src, tgt = torch.randn(shape(7), generator=g), torch.randn(shape(6), generator=g)
        torch.manual_seed(10 + mb)
        want = _transformer_loss(original, src, tgt, mask)
        want.backward()
        torch.manual_seed(10 + mb)
        if split:
            with twobp.split_backward(microbatch=mb):
                got = _transformer_loss(converted, src, tgt, mask)
        else:
            got = _transformer_loss(converted, src, tgt, mask)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if split:
        assert all(p.grad is None for p in converted.parameters()), "every gradient waits for p2"
        twobp.backward_p2(converted)
    for (name, p), q in zip(converted.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    back = twobp.revert(converted)
    torch.manual_seed(0)
    src, tgt = torch.randn(shape(7), generator=g), torch.randn(shape(6), generator=g)
    original.eval(), back.eval()
    torch.testing.assert_close(_transformer_loss(back, src, tgt, mask), _transformer_loss(original, src, tgt, mask))
