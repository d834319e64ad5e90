"""TwoBPEmbedding against nn.Embedding (float64 references), in normal and split mode, on both
backends: the whole weight gradient is p2, padding_idx / scale_grad_by_freq / max_norm as torch."""

import copy

import pytest
import torch
from torch import nn

import twobp
from checks import assert_close

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]


def _pair(v, d, dtype, **kw):
    torch.manual_seed(0)
    ref = nn.Embedding(v, d, dtype=dtype, **kw)
    m = twobp.TwoBPEmbedding(v, d, dtype=dtype, **kw)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _reference(ref, ids_list, dys):
    """float64 autograd through torch's own nn.Embedding, one forward per micro-batch."""
    r64 = copy.deepcopy(ref).double()
    outs = []
    for ids, dy in zip(ids_list, dys):
        y = r64(ids)
        y.backward(dy.double())
        outs.append(y)
    return outs, r64.weight.grad


def test_drop_in_for_nn_embedding():
    ref, m = _pair(23, 7, torch.float32, padding_idx=2)
    assert isinstance(m, nn.Embedding)
    assert list(m.state_dict()) == list(ref.state_dict())
    assert repr(m).replace("TwoBPEmbedding", "Embedding") == repr(ref)
    torch.manual_seed(4)
    a = nn.Embedding(23, 7, padding_idx=2)
    torch.manual_seed(4)
    b = twobp.TwoBPEmbedding(23, 7, padding_idx=2)
    assert torch.equal(a.weight, b.weight), "init (and the zeroed padding row) must match nn.Embedding's"
    w = torch.randn(5, 3)
    assert torch.equal(twobp.TwoBPEmbedding.from_pretrained(w).weight, nn.Embedding.from_pretrained(w).weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"padding_idx": 3}, {"scale_grad_by_freq": True},
                                {"padding_idx": -1, "scale_grad_by_freq": True}],
                         ids=["plain", "padding", "freq", "padding-freq"])
@pytest.mark.parametrize("split", [False, True])
def test_matches_float64_autograd(backend, dtype, kw, split):
    v, d = 61, 37
    ref, m = _pair(v, d, dtype, **kw)
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 11), (5,), (0, 4)]  # a 2-D batch, a 1-D one and an empty micro-batch
    ids_list = [torch.randint(0, v, s, generator=g) for s in shapes]
    ids_list[0][0, :4] = 3  # repeated ids (and the padding row) in one micro-batch
    ids_list[0][1, :2] = v - 1
    dys = [torch.randn(*s, d, generator=g).to(dtype) for s in shapes]
    outs64, dw64 = _reference(ref, ids_list, dys)
    with twobp.use_backend(backend):
        for mb, (ids, dy) in enumerate(zip(ids_list, dys)):
            if split:
                with twobp.split_backward(microbatch=mb):
                    y = m(ids)
            else:
                y = m(ids)
            assert torch.equal(y, ref(ids)), "the lookup is torch's gather, exactly"
            if y.numel():
                assert_close(y, outs64[mb], dtype, name="y")
            y.backward(dy)
        if split:
            assert m.weight.grad is None, "p1 leaves the whole weight gradient to p2"
            assert twobp.backward_p2(m) == 3, "one entry per micro-batch, the empty one included"
    assert_close(m.weight.grad, dw64, dtype, name="dW")
    if "padding_idx" in kw:
        assert not m.weight.grad[kw["padding_idx"]].any(), "the padding row gets no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_p2_equals_one_p2_per_microbatch(backend):
    _, a = _pair(29, 19, torch.float32)
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(2)
    ids_list = [torch.randint(0, 29, (2, 7), generator=g) for _ in range(3)]
    dys = [torch.randn(2, 7, 19, generator=g) for _ in range(3)]
    with twobp.use_backend(backend):
        for m, batched in ((a, True), (b, False)):
            for mb, (ids, dy) in enumerate(zip(ids_list, dys)):
                with twobp.split_backward(microbatch=mb):
                    y = m(ids)
                y.backward(dy)
            assert twobp.backward_p2(m, batched=batched) == 3
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_and_head_are_deferred_entirely(backend):
    """A tied embedding/head weight: both uses accumulate in p2, nothing in p1."""
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Embedding(31, 16), nn.LayerNorm(16), nn.Linear(16, 31, bias=False))
    ref[2].weight = ref[0].weight
    ours = twobp.convert(copy.deepcopy(ref))
    assert isinstance(ours[0], twobp.TwoBPEmbedding) and ours[2].weight is ours[0].weight
    g = torch.Generator().manual_seed(6)
    ids_list = [torch.randint(0, 31, (2, 5), generator=g) for _ in range(2)]
    for ids in ids_list:
        ref(ids).logsumexp(-1).sum().backward()
    with twobp.use_backend(backend):
        for mb, ids in enumerate(ids_list):
            with twobp.split_backward(microbatch=mb):
                loss = ours(ids).logsumexp(-1).sum()
            loss.backward()
        assert ours[0].weight.grad is None, "no share of the tied weight's gradient runs in p1"
        twobp.backward_p2(ours)
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", [False, True])
def test_max_norm_renormalises_rows_as_torch_and_p2_still_runs(split):
    ref, m = _pair(17, 6, torch.float32, max_norm=0.5)
    with torch.no_grad():
        for e in (ref, m):
            e.weight.mul_(3)
    g = torch.Generator().manual_seed(3)
    ids_list = [torch.randint(0, 17, (4,), generator=g) for _ in range(2)]
    dys = [torch.randn(4, 6, generator=g) for _ in range(2)]
    ys = []
    for mb, ids in enumerate(ids_list):  # both forwards first: a renorm between forward and p2
        if split:
            with twobp.split_backward(microbatch=mb):
                ys.append(m(ids))
        else:
            ys.append(m(ids))
    ref_ys = [ref(ids) for ids in ids_list]
    for y, r, dy in zip(ys, ref_ys, dys):
        torch.testing.assert_close(y, r)
        y.backward(dy)
        r.backward(dy)
    if split:
        twobp.backward_p2(m)
    torch.testing.assert_close(m.weight, ref.weight)
    assert m.weight[torch.cat(ids_list)].norm(dim=-1).max() <= 0.5 + 1e-5
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)


def test_sparse_is_refused_and_convert_leaves_it_with_the_reason():
    with pytest.raises(NotImplementedError, match="sparse=False"):
        twobp.TwoBPEmbedding(5, 3, sparse=True)
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True))
    model, report = twobp.convert(model, return_report=True)
    assert type(model[0]) is nn.Embedding
    assert any("sparse=True" in why for _, _, why in report.left), report


def test_float_ids_are_refused_with_the_fix():
    _, m = _pair(5, 3, torch.float32)
    with pytest.raises((TypeError, RuntimeError), match="long|Long|integer"):
        m(torch.zeros(2))
