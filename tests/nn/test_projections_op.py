"""ProjectionsOp (row blocks of shared Parameters, several inputs, one split op) against F.linear
in float64, fp32 and fp16, on both backends, batched p2 over micro-batches of different lengths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twobp
from checks import assert_close
from twobp.autograd import split_apply
from twobp.ops.projections import ProjectionsOp, merge_groups, split_outputs


def test_merge_groups_joins_adjacent_rows_of_one_input_and_weight():
    assert merge_groups([(0, 0, 0, 4, 0), (1, 0, 4, 6, 4), (1, 0, 6, 8, 6)]) == ((0, 0, 0, 4, 0), (1, 0, 4, 8, 4))
    assert merge_groups([(0, 0, 0, 4, 0), (0, 1, 0, 4, 4)]) == ((0, 0, 0, 4, 0), (0, 1, 0, 4, 4)), "two weights"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_projections_match_float64_linears(backend, dtype):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3 * 8, 8).to(dtype))      # packed [q; k; v] rows
    w2 = nn.Parameter(torch.randn(8, 5).to(dtype))         # a separate weight with another width
    b = nn.Parameter(torch.randn(4 * 8).to(dtype))         # packed bias of all four blocks
    owner = nn.Module()
    groups = [(0, 0, 0, 8, 0), (1, 0, 8, 16, 8), (1, 0, 16, 24, 16), (2, 1, 0, 8, 24)]
    g = torch.Generator().manual_seed(1)
    mbs = []
    for mb, s in enumerate((3, 7)):
        xs = [torch.randn(2, 5, 8, generator=g), torch.randn(2, s, 8, generator=g), torch.randn(2, s, 5, generator=g)]
        xs = [x.to(dtype).requires_grad_() for x in xs]
        op = ProjectionsOp.for_call(groups, xs)
        assert len(op.groups) == 3, "k and v of one input merge into one GEMM"
        with twobp.use_backend(backend), twobp.split_backward(microbatch=mb):
            flat = split_apply(op, owner, "proj", xs, (w, w2, b))
        dy = torch.randn(flat.shape, generator=g).to(dtype)
        with twobp.use_backend(backend):
            flat.backward(dy)
        mbs.append((xs, flat, dy))
    assert w.grad is None and b.grad is None
    with twobp.use_backend(backend):
        assert twobp.backward_p2(owner) == 2
    w64, w264, b64 = (t.detach().double().requires_grad_() for t in (w, w2, b))
    for xs, flat, dy in mbs:
        x64 = [x.detach().double().requires_grad_() for x in xs]
        ys = [F.linear(x64[0], w64[:8], b64[:8]), F.linear(x64[1], w64[8:], b64[8:24]),
              F.linear(x64[2], w264, b64[24:])]
        want = torch.cat([y.reshape(-1) for y in ys])
        assert_close(flat, want, dtype, name="flat output")
        want.backward(dy.double())
        for x, x_ref in zip(xs, x64):
            assert_close(x.grad, x_ref.grad, dtype, name="dX")
    assert_close(w.grad, w64.grad, dtype, name="dW packed", scale=2)
    assert_close(w2.grad, w264.grad, dtype, name="dW separate", scale=2)
    assert_close(b.grad, b64.grad, dtype, name="db", scale=2)
    blocks = split_outputs(torch.arange(10.0), [2, 2], [3, 2])
    assert [tuple(t.shape) for t in blocks] == [(2, 3), (2, 2)] and blocks[1][0, 0] == 6
