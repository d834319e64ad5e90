"""torch.autocast around twobp modules, normal and split mode: the same outputs and
gradients as the torch twins under autocast (bf16 and fp16 on CPU), the weight gradients
of a split region landing in the fp32 parameters' .grad."""

import pytest
import torch
from torch import nn

import twobp
from twobp.nn.attention import TwoBPAttention


def _pairs():
    torch.manual_seed(0)
    out = [("linear", nn.Linear(16, 12), twobp.TwoBPLinear(16, 12), (3, 5, 16)),
           ("conv", nn.Conv2d(3, 4, 3, padding=1), twobp.TwoBPConv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
           ("layernorm", nn.LayerNorm(16), twobp.TwoBPLayerNorm(16), (3, 5, 16)),
           ("rmsnorm", nn.RMSNorm(16), twobp.TwoBPRMSNorm(16), (3, 5, 16)),
           ("attention", nn.MultiheadAttention(16, 2, batch_first=True), TwoBPAttention(16, 2), (2, 5, 16))]
    for _, ref, ours, _ in out:
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ours.load_state_dict(ref.state_dict())
    return out


def _run(m, x):
    y = m(x, x, x, need_weights=False)[0] if isinstance(m, nn.MultiheadAttention) else m(x)
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("split", [False, True], ids=["normal", "split"])
@pytest.mark.parametrize("case", range(5), ids=["linear", "conv", "layernorm", "rmsnorm", "attention"])
def test_autocast_matches_torch(case, split, dtype):
    name, ref, ours, shape = _pairs()[case]
    torch.manual_seed(1)
    x0 = torch.randn(*shape)
    results = []
    for m, use_split in ((ref, False), (ours, split)):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            if use_split:
                with twobp.split_backward(microbatch=0):
                    y = _run(m, x)
            else:
                y = _run(m, x)
        y.float().square().mean().backward()
        if use_split:
            assert all(p.grad is None for p in m.parameters()), "p1 left the weights to p2"
            twobp.backward_p2(m)
        results.append((y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y_ref, dx_ref, g_ref), (y, dx, g) = results
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    assert y.dtype == y_ref.dtype, f"{name}: output {y.dtype}, torch gives {y_ref.dtype}"
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(dx.float(), dx_ref.float(), **tol)
    for n, want in g_ref.items():
        assert g[n].dtype == torch.float32 == want.dtype, f"{name} {n}: gradients of fp32 parameters stay fp32"
        torch.testing.assert_close(g[n], want, **tol, msg=f"{name} d{n}")
    assert twobp.default_store().is_empty()
