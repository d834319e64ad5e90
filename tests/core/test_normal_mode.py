"""Normal mode (no split region) on the torch backend: the twin runs as its torch op.

A twin outside a split region calls torch's op directly (linear, LayerNorm, RMSNorm, conv2d,
embedding), so its autograd node is torch's own and its backward costs what torch's costs. Under saved-tensor hooks (non-reentrant checkpointing,
offloading, a memory meter) it keeps the split Function instead, whose saving does not
depend on the mode, so a checkpoint's recomputation saves what its forward saved. Both
paths are checked here against float64 torch autograd, and the checkpointed one in every
combination of split and normal forwards.
"""

import contextlib

import pytest
import torch
import torch.utils.checkpoint as ckpt
from torch import nn

import twobp

_CASES = ["linear", "layernorm", "rmsnorm", "conv2d", "embedding"]
_OWN_PATH: set[str] = set()  # twins whose normal mode keeps the split Function (none since RMSNorm went native)


def _pair(case: str):
    """(torch module, twin with the same non-default weights, input maker), float64."""
    torch.manual_seed(3)
    if case == "linear":
        ref, ours, make = nn.Linear(6, 5), twobp.TwoBPLinear(6, 5), lambda: torch.randn(3, 4, 6)
    elif case == "layernorm":
        ref, ours, make = nn.LayerNorm(7), twobp.TwoBPLayerNorm(7), lambda: torch.randn(4, 7) * 2 + 0.5
    elif case == "rmsnorm":
        ref, ours, make = nn.RMSNorm(7, eps=1e-6), twobp.TwoBPRMSNorm(7, eps=1e-6), lambda: torch.randn(4, 7)
    elif case == "conv2d":
        ref, ours = nn.Conv2d(3, 4, 3, stride=2, padding=1), twobp.TwoBPConv2d(3, 4, 3, stride=2, padding=1)
        make = lambda: torch.randn(2, 3, 7, 6)  # noqa: E731
    else:
        ref, ours = nn.Embedding(11, 5), twobp.TwoBPEmbedding(11, 5)
        make = lambda: torch.randint(0, 11, (3, 4))  # noqa: E731
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours.load_state_dict(ref.state_dict())
    return ref.double(), ours.double(), make


def _grads(m: nn.Module, x: torch.Tensor, dy_seed: int = 0):
    x = x.clone().requires_grad_(x.is_floating_point())
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=y.dtype)
    y.backward(g)
    out = {n: p.grad.clone() for n, p in m.named_parameters()}
    if x.is_floating_point():
        out["x"] = x.grad
    m.zero_grad(set_to_none=True)
    return y.detach(), out, y.grad_fn


def _no_twobp_node(grad_fn) -> bool:
    return "_SplitFunction" not in type(grad_fn).__name__


@pytest.mark.parametrize("case", _CASES)
def test_normal_mode_runs_as_the_torch_op_and_equals_it(case):
    ref, ours, make = _pair(case)
    x = make().double() if case != "embedding" else make()
    y_want, want, _ = _grads(ref, x)
    with twobp.use_backend("torch"):
        y_got, got, node = _grads(ours, x)
    assert _no_twobp_node(node) == (case not in _OWN_PATH), f"{case}: normal mode built {type(node).__name__}"
    torch.testing.assert_close(y_got, y_want, rtol=1e-12, atol=1e-12)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("case", _CASES)
def test_under_saved_tensor_hooks_normal_mode_keeps_the_split_function(case):
    """The fused backward of the split contract (``op.fused_grads``), the path a
    checkpointed or offloaded normal-mode forward takes: torch's gradients."""
    ref, ours, make = _pair(case)
    x = make().double() if case != "embedding" else make()
    y_want, want, _ = _grads(ref, x)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with twobp.use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y_got, got, node = _grads(ours, x)
    assert not _no_twobp_node(node), f"{case}: under saved-tensor hooks normal mode must keep the split Function"
    assert packed, "the hooks saw no saved tensor"
    torch.testing.assert_close(y_got, y_want, rtol=1e-12, atol=1e-12)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_half_norms_keep_the_reference_path():
    """fp16 norms on the torch backend compute in fp32 with fp32 statistics, like the Triton
    kernels (aten's CPU norms would keep half statistics): no torch shortcut for them."""
    norm = twobp.TwoBPLayerNorm(8).half()
    with twobp.use_backend("torch"):
        y = norm(torch.randn(3, 8, dtype=torch.float16, requires_grad=True))
    assert not _no_twobp_node(y.grad_fn)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = twobp.TwoBPLayerNorm(8)
        self.up = twobp.TwoBPLinear(8, 16)
        self.down = twobp.TwoBPLinear(16, 8)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


@pytest.mark.parametrize("split", [False, True], ids=["normal", "split"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_twins_equal_plain_autograd(split, reentrant):
    """A checkpoint's recomputation runs inside backward: it must save what its forward
    saved whichever mode the forward ran in, or torch's checkpoint refuses (or, unchecked,
    would hand the wrong tensors to backward)."""
    torch.manual_seed(5)
    blocks = nn.ModuleList(_Block() for _ in range(3)).double()
    ref = nn.ModuleList(_Block() for _ in range(3)).double()
    ref.load_state_dict(blocks.state_dict())
    x = torch.randn(4, 8, dtype=torch.float64)

    def loss_of(mods, use_ckpt):
        h = x.clone().requires_grad_()
        for b in mods:
            h = ckpt.checkpoint(b, h, use_reentrant=reentrant) if use_ckpt else b(h)
        return h.square().mean()

    loss_of(ref, False).backward()
    with twobp.use_backend("torch"), pytest.warns(UserWarning) if (split and reentrant) else contextlib.nullcontext():
        if split:
            with twobp.split_backward(microbatch=0):
                loss = loss_of(blocks, True)
        else:
            loss = loss_of(blocks, True)
        loss.backward()
        if split and not reentrant:
            twobp.backward_p2(blocks)
    assert twobp.default_store().is_empty()
    for (n, p), q in zip(blocks.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)

