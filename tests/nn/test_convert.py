"""convert() on models we did not write: the loss and every gradient must not change."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twobp
from checks import assert_close


# ---- a decoder written the way common open-source LLM code is written --------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim, n_heads, hidden):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(dim), Attention(dim, n_heads)
        self.ffn_norm, self.feed_forward = RMSNorm(dim), FeedForward(dim, hidden)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class TinyDecoder(nn.Module):
    def __init__(self, vocab=61, dim=24, n_layers=2, n_heads=3, hidden=40):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def _lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _check_same(original, converted, loss_fn, microbatches, split):
    for mb, batch in enumerate(microbatches):
        loss_ref = loss_fn(original, batch)
        loss_ref.backward()
        if split:
            with twobp.split_backward(microbatch=mb):
                loss = loss_fn(converted, batch)
        else:
            loss = loss_fn(converted, batch)
        loss.backward()
        assert_close(loss, loss_ref.double(), name=f"loss mb{mb}")
    if split:
        twobp.backward_p2(converted)
    named_ref = dict(original.named_parameters())
    for name, p in converted.named_parameters():
        assert p.grad is not None, f"{name}: gradient lost"
        assert_close(p.grad, named_ref[name].grad.double(), name=f"grad of {name}", scale=3)


@pytest.mark.parametrize("split", [False, True])
def test_llm_style_decoder(split):
    torch.manual_seed(0)
    original = TinyDecoder()
    converted = copy.deepcopy(original)
    converted, report = twobp.convert(converted, return_report=True)
    swapped = {n for n, _, _ in report.swapped}
    assert {"layers.0.attention.wq", "layers.1.feed_forward.w3", "output"} <= swapped
    left = {n: why for n, _, why in report.left}
    assert "norm" in left and "no twobp twin" in left["norm"], "its own RMSNorm class is left, with the reason"
    assert converted.output.weight is converted.tok_embeddings.weight, "the tie must survive"
    assert isinstance(converted.layers[0].attention.wq, twobp.TwoBPLinear)
    batches = [torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    _check_same(original, converted, _lm_loss, batches, split)


def test_extra_factory_converts_a_custom_class_and_keeps_parameters():
    torch.manual_seed(1)
    model = TinyDecoder()
    weight = model.norm.weight

    def to_twin(m: RMSNorm) -> nn.Module:
        twin = twobp.TwoBPRMSNorm(m.weight.shape[0], eps=m.eps, device="meta")
        twin.weight = m.weight
        return twin

    original = copy.deepcopy(model)
    twobp.convert(model, extra={RMSNorm: to_twin})
    assert isinstance(model.norm, twobp.TwoBPRMSNorm) and model.norm.weight is weight
    batches = [torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))]
    _check_same(original, model, _lm_loss, batches, split=True)


@pytest.mark.parametrize("split", [False, True])
def test_conv_net_with_layernorm(split):
    torch.manual_seed(2)
    original = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                             nn.Flatten(), nn.LayerNorm(36), nn.Linear(36, 5),
                             nn.Conv2d(1, 1, 3, groups=1, padding_mode="reflect"))
    original = original[:-1]  # keep the reflect-padded conv out of the forward path
    converted = copy.deepcopy(original)
    converted, report = twobp.convert(converted, return_report=True)
    assert [t for _, _, t in report.swapped] == ["TwoBPConv2d", "TwoBPConv2d", "TwoBPLayerNorm", "TwoBPLinear"]
    x = [torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    _check_same(original, converted, lambda m, b: m(b).square().mean(), x, split)


def test_unsupported_layers_are_left_with_a_reason():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding_mode="reflect", padding=1),
                          nn.LayerNorm([4, 5]))
    _, report = twobp.convert(model, return_report=True)
    reasons = [why for _, _, why in report.left]
    assert any("groups=2" in r for r in reasons)
    assert any("padding_mode='reflect'" in r for r in reasons)
    assert any("normalized_shape" in r for r in reasons)
    assert not report.swapped
    with pytest.raises(TypeError, match="nn.Module"):
        twobp.convert("not a model")


@pytest.mark.parametrize("split", [False, True])
def test_torch_transformer_encoder(split):
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=24, dropout=0.0, batch_first=True)
    original = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    converted = copy.deepcopy(original)
    converted, report = twobp.convert(converted, return_report=True)
    kinds = {t for _, _, t in report.swapped}
    assert {"TwoBPAttention", "TwoBPLinear", "TwoBPLayerNorm"} <= kinds, report
    assert not report.left, report
    x = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    # post-LN output has a fixed mean square, so project it on a random direction instead
    direction = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))
    _check_same(original, converted, lambda m, b: (m(b) * direction).sum(), x, split)


@pytest.mark.parametrize("family", ["llama", "bert", "resnet"])
def test_revert_gives_torch_modules_with_the_same_parameters_and_math(family):
    """revert() swaps every twin back to torch's class (TwoBPAttention -> TorchAttention, SDPA),
    keeping the Parameter objects; outputs and every gradient match the twobp model's."""
    from twobp import models
    from twobp.nn import TorchAttention

    torch.manual_seed(0)
    ours = models.build(family, "tiny")
    torch.manual_seed(0)
    theirs = models.build(family, "tiny")
    params_before = [id(p) for p in theirs.parameters()]
    assert twobp.revert(theirs) is theirs
    assert [id(p) for p in theirs.parameters()] == params_before
    assert not any(isinstance(m, twobp.TwoBPModule) for m in theirs.modules())
    if family != "resnet":
        assert any(isinstance(m, TorchAttention) for m in theirs.modules())
    x, y = ours.example_batch(3, generator=torch.Generator().manual_seed(1))
    for m in (ours, theirs):
        m.loss_fn(m(x), y).backward()
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    back = twobp.convert(theirs)
    assert not any(type(m) in (nn.Linear, TorchAttention) for m in back.modules()), "convert undoes revert"
    assert torch.allclose(back(x), ours(x), atol=1e-6)


def test_revert_rejects_unknown_twobp_subclasses():
    class Mine(twobp.TwoBPLinear):
        pass

    with pytest.raises(TypeError, match="no torch twin known for Mine"):
        twobp.revert(nn.Sequential(Mine(2, 2)))
    with pytest.raises(TypeError, match="revert takes an nn.Module"):
        twobp.revert("model")
