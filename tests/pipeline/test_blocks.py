"""twobp.pipeline.pipeline_blocks: modules that take and return tuples, carried across ranks
as one packed tensor (bit-exact integer members, gradients in place), equal to one process."""

import pytest
import torch
from torch import nn

import twobp
from twobp.pipeline import make_schedule, pack, pipeline_blocks, spawn, unpack
from twobp.pipeline.blocks import is_packed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_pack_round_trip_is_exact_and_differentiable(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, generator=g).to(dtype).requires_grad_()
    ids = torch.tensor([[-7, 2 ** 40 + 3], [0, 1]])  # beyond any float's integer range: bits travel
    mask = torch.tensor([True, False, True])
    packed = pack((a, None, ids, mask, a.sum(-1)))
    assert packed.dim() == 1 and packed.dtype == dtype and is_packed(packed)
    x = packed.detach().requires_grad_()
    got = unpack(x)
    assert got[1] is None and torch.equal(got[0], a) and torch.equal(got[4], a.sum(-1))
    assert got[2].dtype == torch.int64 and torch.equal(got[2], ids) and torch.equal(got[3], mask)
    (got[0] * 2).sum().backward()
    assert x.grad.sum().item() == 2 * a.numel(), "the gradient lands on the floating member only"
    assert not is_packed(torch.randn(64, generator=g).to(dtype))


def test_pack_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError, match="one dtype"):
        pack((torch.zeros(2), torch.zeros(2, dtype=torch.float64)))
    with pytest.raises(TypeError, match="tensors and None only"):
        pack((torch.zeros(2), 3))
    with pytest.raises(ValueError, match="not a tensor made by"):
        unpack(torch.zeros(4, 4))


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)

    def forward(self, ids):
        return self.emb(ids), (ids % 3 == 0)           # (hidden, keep-mask): a tuple out


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h, keep):                         # a tuple in
        return torch.tanh(self.lin(h)) * keep[..., None] + h, keep


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(8, 11)

    def forward(self, h, keep):
        return self.out(h)


def _model(seed):
    torch.manual_seed(seed)
    return twobp.convert(nn.ModuleList([Embed(), Layer(), Layer(), Head()]))


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 11, (8, 6), generator=g), torch.randint(0, 11, (8, 6), generator=g)


def _loss(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, 11), y.reshape(-1))


def _run(rank, world, use_2bp):
    from twobp.pipeline import PipelineExecutor

    torch.set_num_threads(1)
    ex = PipelineExecutor(pipeline_blocks(_model(0)), _loss,
                          schedule=make_schedule("1f1b", stages=world, microbatches=4, twobp=use_2bp), timeout=60)
    x, y = _data()
    res = ex.step(x, y, measure=False)
    return res.loss, {k: p.grad for k, p in ex.named_parameters()}, res.peak_store_bytes


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("use_2bp", [False, True])
def test_tuple_blocks_over_two_ranks_equal_one_process(use_2bp):
    blocks = nn.Sequential(*pipeline_blocks(_model(0)))
    x, y = _data()
    loss = _loss(blocks(x), y)
    loss.backward()
    ref = dict(blocks.named_parameters())
    per_rank = spawn(_run, world_size=2, args=(use_2bp,), timeout=60, env={"OMP_NUM_THREADS": "1"})
    grads = {}
    for got_loss, got, peak in per_rank:
        assert got_loss == pytest.approx(loss.item(), rel=1e-6)
        assert (peak > 0) == use_2bp
        grads.update(got)
    assert set(grads) == set(ref)
    for k, p in ref.items():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6, msg=k)
