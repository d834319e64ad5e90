"""measure_block_costs times each block's forward + backward on its own, and balance() cuts by it."""

import time

import pytest
import torch
from torch import nn

from twobp.pipeline import balance, measure_block_costs


class Slow(nn.Module):
    """A linear layer whose forward also sleeps ``seconds``: a block of known cost."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.lin(x)


def test_costs_follow_each_blocks_own_time_and_balance_cuts_by_them():
    blocks = [Slow(s) for s in (0.030, 0.030, 0.002, 0.002, 0.002, 0.002)]
    x, target = torch.randn(4, 8), torch.randn(4, 8)
    costs = measure_block_costs(blocks, x, nn.functional.mse_loss, target, reps=3)
    assert len(costs) == 6
    assert min(costs[:2]) > 5 * max(costs[2:]), costs
    assert balance(6, 2).bounds == (0, 3, 6)  # equal counts: 62 ms against 6
    assert balance(6, 2, costs).bounds == (0, 1, 6)  # by cost: 30 against 38
    assert all(p.grad is None for b in blocks for p in b.parameters()), "the measurement leaves no grads"


def test_integer_model_input_and_no_loss():
    emb, lin = nn.Embedding(10, 8), nn.Linear(8, 8)
    costs = measure_block_costs([emb, lin], torch.randint(0, 10, (3, 5)), reps=1, warmup=0)
    assert len(costs) == 2 and all(c > 0 for c in costs)
    assert emb.weight.grad is None and lin.weight.grad is None


def test_bad_arguments_say_what_to_fix():
    with pytest.raises(ValueError, match="together"):
        measure_block_costs([nn.Linear(2, 2)], torch.randn(1, 2), nn.functional.mse_loss)
    with pytest.raises(ValueError, match="reps"):
        measure_block_costs([nn.Linear(2, 2)], torch.randn(1, 2), reps=0)
    with pytest.raises(ValueError, match="no blocks"):
        measure_block_costs([], torch.randn(1, 2))
