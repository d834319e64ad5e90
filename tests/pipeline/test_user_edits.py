"""The executor against one process when a user composes it with what the public API allows
around a step: gradient accumulation over steps with a weight tied across ranks, a loss that
averages over counted targets (padding), optimizer.zero_grad() while P2 is carried, ranks cut
on their own block costs, tied copies that start apart. Each was silently wrong before the fix
it tests (found by an audit against one-process references)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from twobp.pipeline import spawn

sys.path.insert(0, str(Path(__file__).parent))
import _workers as W  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}


def _reference_accumulated() -> dict:
    model = nn.Sequential(*W.tied_blocks(0))
    for x, y in W.two_batches():
        W.tied_loss(model(x), y).backward()
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pp,dp,use_2bp", [(2, 1, False), (2, 1, True), (2, 2, True)])
def test_accumulating_over_steps_sums_a_tied_weight_once(pp, dp, use_2bp):
    ref = _reference_accumulated()
    for grads in spawn(W.accumulate_tied, world_size=pp * dp, args=(pp, dp, use_2bp), timeout=60, env=ENV):
        for name, g in grads.items():
            want = ref[name] if name in ref else ref["0.weight"]  # the head's copy of the tied weight
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pp,dp,m", [(2, 1, 4), (2, 2, 2)])
def test_a_counted_loss_weights_micro_batches_by_their_counted_targets(pp, dp, m):
    from twobp.hf import masked_lm_loss

    model = nn.Sequential(*W.untied_blocks(0))
    ids, tgt = W.padded_targets()
    loss = masked_lm_loss(model(ids), tgt)
    loss.backward()
    ref = {k: p.grad for k, p in model.named_parameters()}
    for out in spawn(W.counted_loss_step, world_size=pp * dp, args=(pp, dp, m), timeout=60, env=ENV):
        assert out["loss"] == pytest.approx(float(loss), rel=1e-6)
        for name, g in out["grads"].items():
            torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_count_targets_and_averages_over_mark_the_losses_that_count():
    from twobp.data import IGNORE_INDEX, count_targets
    from twobp.hf import causal_lm_loss, masked_lm_loss
    from twobp.models.base import TwoBPModel

    t = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 3]])
    assert count_targets(t) == 3
    assert masked_lm_loss.counted_items(t) == 3 and TwoBPModel.loss_fn.counted_items(t) == 3
    assert causal_lm_loss.counted_items(t) == 2  # position 0 predicts nothing


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero_grad_between_steps_while_p2_is_carried_is_refused():
    outs = spawn(W.zero_grad_between_carried_steps, world_size=2, timeout=60, join_timeout=120, env=ENV)
    said = [o for o in outs if o and "changed after step() returned" in o]
    assert said, outs
    assert "executor.flush()" in said[0] and "zero_grad=True" in said[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_cut_differently_are_refused_on_every_rank_and_tied_copies_that_differ_too():
    outs = spawn(W.different_cuts, world_size=2, timeout=60, env=ENV)
    assert all(o and "stage cuts" in o and "stage bounds=(0, 3, 8)" in o and "(0, 5, 8)" in o for o in outs), outs
    outs = spawn(W.different_tied_copies, world_size=2, timeout=60, env=ENV)
    assert all(o and "tied copies" in o and "the same seed" in o for o in outs), outs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_step_after_a_failed_step_says_at_once_that_the_ranks_must_restart():
    for said in spawn(W.step_after_a_failed_step, world_size=2, timeout=60, env=ENV):
        assert said[0].startswith("ok ")
        assert "failed in training step 2" in said[1], said
        assert "training step 2 of this executor failed" in said[2] and "restart the ranks" in said[2], said


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("carry", [False, True], ids=["1f1b-2bp", "auto-carried"])
def test_an_inf_on_one_rank_skips_the_step_on_every_rank_and_is_counted(carry):
    """GradScaler's verdict is one for the whole model: rank 0's inf skips rank 1's step too
    (else the stages would part), both count it, and both take the next step. A schedule that
    would carry P2 into the next step runs it at the step's end instead (the inf agreement is a
    collective over the ranks), so both cases skip step 0 alone."""
    outs = spawn(W.scaler_skips_together, world_size=2, args=(carry,), timeout=60, env=ENV)
    for rank, out in enumerate(outs):
        assert out["skipped"] == [1, 1, 1], (rank, out)
        assert out["moved"] == [False, True, True], (rank, out)
    assert outs[0]["scale"] == outs[1]["scale"] == [32768.0] * 3, outs
