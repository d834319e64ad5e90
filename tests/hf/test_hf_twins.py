"""Twins of Hugging Face's own layers (float64 references, normal and split mode, both backends):
GPT-2's Conv1D, Llama-style and T5-style RMSNorm classes, a subclass of nn.Embedding whose
forward calls super() (Gemma's scaled embedding), and what convert leaves with the reason."""

import copy

import pytest
import torch
from torch import nn

import twobp
from checks import assert_close

transformers = pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402


def _run(m, x, dy, split, backend):
    with twobp.use_backend(backend):
        if split:
            with twobp.split_backward(microbatch=0):
                y = m(x)
            y.backward(dy)
            assert all(p.grad is None for p in m.parameters()), "p1 leaves the weight gradients to p2"
            twobp.backward_p2(m)
        else:
            y = m(x)
            y.backward(dy)
    return y


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [False, True])
def test_conv1d_twin_matches_float64_conv1d(backend, dtype, split):
    torch.manual_seed(0)
    ref = Conv1D(29, 37).to(dtype)  # nf=29 outputs, nx=37 inputs: W [37, 29]
    with torch.no_grad():
        ref.bias.normal_()
    m = twobp.convert(copy.deepcopy(ref))
    assert type(m).__name__ == "TwoBPConv1D" and isinstance(m, Conv1D) and isinstance(m, twobp.TwoBPModule)
    assert list(m.state_dict()) == ["weight", "bias"] and m.weight.shape == (37, 29)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 37, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(3, 11, 29, generator=g).to(dtype)
    r64 = copy.deepcopy(ref).double()
    x64 = x.detach().double().requires_grad_()
    y64 = r64(x64)
    y64.backward(dy.double())
    y = _run(m, x, dy, split, backend)
    assert_close(y, y64, dtype, name="y")
    assert_close(x.grad, x64.grad, dtype, name="dX")
    assert_close(m.weight.grad, r64.weight.grad, dtype, name="dW", scale=2)
    assert_close(m.bias.grad, r64.bias.grad, dtype, name="db", scale=2)
    assert type(twobp.revert(m)) is Conv1D


def _rms_classes():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return [LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm]


@pytest.mark.parametrize("cls", _rms_classes(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("split", [False, True])
def test_hf_rmsnorm_twins_match_their_class(cls, backend, split):
    torch.manual_seed(2)
    ref = cls(40, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_()
    m = twobp.convert(copy.deepcopy(ref))
    assert isinstance(m, cls) and isinstance(m, twobp.TwoBPModule), type(m)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 40, generator=g).requires_grad_()
    dy = torch.randn(4, 7, 40, generator=g)
    # float64 reference of the same formula (HF computes even fp64 inputs in fp32)
    x64 = x.detach().double().requires_grad_()
    w64 = ref.weight.detach().double().requires_grad_()
    y64 = w64 * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5)
    y64.backward(dy.double())
    y = _run(m, x, dy, split, backend)
    assert y.dtype == ref(x).dtype
    assert_close(y, y64, torch.float32, name="y")
    assert_close(x.grad, x64.grad, torch.float32, name="dX")
    assert_close(m.weight.grad, w64.grad, torch.float32, name="dW", scale=2)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
    assert type(twobp.revert(m)) is cls


def test_hf_rmsnorm_twin_takes_half_inputs_with_fp32_weights_as_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(4)
    ref = LlamaRMSNorm(24)
    m = twobp.convert(copy.deepcopy(ref))
    x = torch.randn(3, 24).to(torch.bfloat16)
    want, got = ref(x), m(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


def test_subclass_whose_forward_calls_super_gets_the_twin_under_it():
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    torch.manual_seed(5)
    ref = GemmaTextScaledWordEmbedding(30, 8, padding_idx=0, embed_scale=8 ** 0.5)
    m, report = twobp.convert(copy.deepcopy(ref), return_report=True)
    assert isinstance(m, GemmaTextScaledWordEmbedding) and isinstance(m, twobp.TwoBPEmbedding)
    assert report.deferred_share == 1.0
    ids = torch.randint(0, 30, (2, 6))
    ref(ids).sum().backward()
    with twobp.split_backward(microbatch=0):
        y = m(ids)
    y.sum().backward()
    assert m.weight.grad is None
    twobp.backward_p2(m)
    torch.testing.assert_close(y, ref(ids))
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    assert type(twobp.revert(m)) is GemmaTextScaledWordEmbedding


def test_unknown_hf_norms_are_left_with_the_reason():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = nn.Sequential(GemmaRMSNorm(8))
    _, report = twobp.convert(model, return_report=True)
    assert type(model[0]) is GemmaRMSNorm
    assert report.left and "no twobp twin" in report.left[0][2] and "run in p1" in report.left[0][2]
    assert report.deferred_share == 0.0


def test_tied_parameters_are_named_once_with_where_their_gradient_runs():
    """BERT's MLM head: cls.predictions.bias *is* decoder.bias, filled by p2 (the issue's report
    said p1); a tied embedding / head weight is named once, deferred entirely."""
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=20, max_position_embeddings=16)
    model, report = twobp.convert(transformers.BertForMaskedLM(cfg), return_report=True)
    tied = {names: where for names, where in report.tied}
    emb = next(w for n, w in tied.items() if "bert.embeddings.word_embeddings.weight" in n)
    assert emb.startswith("p2") and "whole gradient" in emb
    bias = next(w for n, w in tied.items() if "cls.predictions.bias" in n)
    assert bias.startswith("p2") and "cls.predictions.decoder" in bias
    assert not any(name == "cls.predictions" for name, _, _ in report.left), "it holds only a tied, deferred bias"
    assert sum(1 for names in tied if "cls.predictions.bias" in names) == 1, "named once"
    # the bias is counted as not (surely) deferred: cls.predictions, not converted, holds it too
    assert report.deferred_elements == report.total_elements - cfg.vocab_size, report
