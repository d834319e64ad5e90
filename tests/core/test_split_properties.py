"""Property tests: any interleaving of forward / p1 / p2 over micro-batches gives the
gradients of plain autograd, and leaves the store empty (torch backend)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import twobp


@st.composite
def _plans(draw):
    """Shapes, micro-batch count, and an event order respecting F < P1 < P2 per micro-batch."""
    dims = draw(st.lists(st.integers(1, 9), min_size=2, max_size=4))
    rows = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    m = len(rows)
    stage = {mb: 0 for mb in range(m)}  # 0: nothing run, 1: F, 2: P1, 3: P2
    order = []
    while any(s < 3 for s in stage.values()):
        mb = draw(st.sampled_from([k for k, s in stage.items() if s < 3]))
        stage[mb] += 1
        order.append((("F", "P1", "P2")[stage[mb] - 1], mb))
    batched = draw(st.booleans())
    return dims, rows, order, batched


@settings(max_examples=40, deadline=None)
@given(_plans())
def test_any_interleaving_matches_autograd(plan):
    dims, rows, order, batched = plan
    torch.manual_seed(len(order))
    layers = [twobp.TwoBPLinear(a, b, bias=(i % 2 == 0)) for i, (a, b) in enumerate(zip(dims, dims[1:]))]
    model = nn.Sequential(*[x for layer in layers for x in (layer, nn.Tanh())])
    ref = nn.Sequential(*[x for layer in layers for x in (nn.Linear(layer.in_features, layer.out_features,
                                                                    bias=layer.bias is not None), nn.Tanh())])
    ref.load_state_dict(model.state_dict())
    xs = [torch.randn(r, dims[0]) for r in rows]
    for x in xs:
        ref(x).square().sum().backward()

    outputs = {}
    pending_p2: list[int] = []
    for kind, mb in order:
        if kind == "F":
            with twobp.split_backward(microbatch=mb):
                outputs[mb] = model(xs[mb])
        elif kind == "P1":
            outputs.pop(mb).square().sum().backward()
        else:
            pending_p2.append(mb)
            if not batched:
                twobp.backward_p2(model, microbatches=[mb], batched=False)
                pending_p2.clear()
    if pending_p2:
        twobp.backward_p2(model, microbatches=pending_p2, batched=True)
    assert twobp.default_store().is_empty()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
