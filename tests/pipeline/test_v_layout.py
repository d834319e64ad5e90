"""The V chunk layout (ZB-V's): placement, text form, schedules auto builds in it, and the
runtime pieces that depend on which rank runs a stage. The executor runs V schedules against
one process in test_executor.py."""

import itertools

import pytest

from twobp.pipeline import (
    LAYOUTS, Costs, Schedule, lower_bound, lower_comm, make_schedule, simulate, validate,
)
from twobp.pipeline.actions import place, stage_of
from twobp.pipeline.auto import _peak_held
from twobp.pipeline.greedy import list_schedule
from twobp.pipeline.lowering import receive_in_send_order
from twobp.pipeline.overlap import period, unroll
from twobp.pipeline.validate import fifo_violations

from checks import assert_covers_all_work


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p,v", [(1, 2), (2, 2), (3, 3), (4, 2), (4, 4)])
def test_place_inverts_stage_of_and_covers_every_stage_once(layout, p, v):
    stages = [stage_of(r, c, p, layout) for r in range(p) for c in range(v)]
    assert sorted(stages) == list(range(p * v))
    for r, c in itertools.product(range(p), range(v)):
        assert place(stage_of(r, c, p, layout), p, layout) == (r, c)


def test_v_layout_is_torch_zbv_placement():
    # torch's ScheduleZBVZeroBubble: rank r holds stages r and 2p-1-r
    for p in (2, 3, 4):
        assert [[stage_of(r, c, p, "v") for c in range(2)] for r in range(p)] == [[r, 2 * p - 1 - r] for r in range(p)]
        assert [[stage_of(r, c, p, "loop") for c in range(2)] for r in range(p)] == [[r, p + r] for r in range(p)]


def test_layout_is_part_of_the_text_form_and_of_equality():
    sched = make_schedule("auto", stages=2, microbatches=4, twobp=True, chunks=2, layout="v")
    text = str(sched)
    assert text.splitlines()[0].endswith(" layout=v")
    assert Schedule.parse(text) == sched
    assert sched.replace(layout="loop") != sched
    loop = make_schedule("gpipe", stages=2, microbatches=4, twobp=True, chunks=2)
    assert "layout" not in str(loop)  # the looped form reads as before
    with pytest.raises(ValueError, match="layout must be one of loop, v"):
        Schedule(ranks=((),), stages=1, microbatches=1, layout="zigzag")


def test_make_schedule_names_what_takes_the_v_layout():
    with pytest.raises(ValueError, match="1f1b places chunks in the looped layout.*layout='v'"):
        make_schedule("1f1b", stages=2, microbatches=4, twobp=False, layout="v")
    with pytest.raises(ValueError, match="interleaved-1f1b places chunks in the looped layout"):
        make_schedule("interleaved-1f1b", stages=2, microbatches=4, twobp=True, chunks=2, layout="v")
    with pytest.raises(ValueError, match="needs chunks >= 2.*chunks=2"):
        make_schedule("auto", stages=2, microbatches=4, twobp=True, layout="v")
    with pytest.raises(ValueError, match="layout must be one of loop, v"):
        make_schedule("auto", stages=2, microbatches=4, twobp=True, chunks=2, layout="V")


V_CASES = [(name, twobp, p, m, v) for name, twobp in (("auto", True), ("gpipe", True), ("gpipe", False))
           for p, m in ((1, 3), (2, 4), (3, 5), (4, 8)) for v in (2, 3)]


@pytest.mark.parametrize("name,twobp,p,m,v", V_CASES)
def test_v_schedules_validate_cover_all_work_and_receive_in_send_order_for_nccl(name, twobp, p, m, v):
    s = make_schedule(name, stages=p, microbatches=m, twobp=twobp, chunks=v, layout="v")
    validate(s)
    lowered = lower_comm(s)
    validate(lowered)
    assert Schedule.parse(str(lowered)) == lowered and lowered.layout == "v"
    # NCCL pairs messages in posting order: the executor receives in the sender's order there
    fixed = receive_in_send_order(s)
    validate(fixed)
    assert fifo_violations(fixed) == []
    assert sorted(map(str, itertools.chain(*fixed.ranks))) == sorted(map(str, itertools.chain(*lowered.ranks)))
    costs = Costs(F=1, P1=1.2, P2=0.7, comm=0.1)
    assert simulate(fixed, costs).makespan == pytest.approx(simulate(lowered, costs).makespan)  # no one waits longer
    assert_covers_all_work(s, split=twobp)


def test_the_turn_of_the_v_needs_no_message():
    # stage p-1 and stage p both sit on rank p-1: their hand-off is local, both ways
    p = 3
    s = lower_comm(make_schedule("auto", stages=p, microbatches=4, twobp=True, chunks=2, layout="v"))
    for r, acts in enumerate(s.ranks):
        comm = [a for a in acts if a.is_comm]
        if r == p - 1:
            assert not any(a.kind in ("SF", "RB") and a.chunk == 0 for a in comm)  # stage p-1 -> p
            assert not any(a.kind in ("RF", "SB") and a.chunk == 1 for a in comm)  # stage p <- p-1
    # rank 0 holds the first stage and the last one, which computes the loss
    assert s.place(0)[0] == 0 and s.place(2 * p - 1)[0] == 0


def test_auto_in_the_v_layout_reaches_the_bound_on_unit_costs():
    for p, m in ((2, 4), (4, 8)):
        costs = Costs(F=1, P1=1, P2=1)
        s = make_schedule("auto", stages=p, microbatches=m, twobp=True, chunks=2, costs=costs, layout="v")
        assert s.meta["gap"] == pytest.approx(0.0, abs=1e-9), s.meta
        plain = make_schedule("1f1b", stages=p, microbatches=m, twobp=False, costs=Costs(F=2, P1=2, P2=2))
        assert simulate(plain, Costs(F=2, P1=2, P2=2)).makespan / s.meta["makespan"] > 1.1


@pytest.mark.parametrize("limit", [2, 3, 4, 6, 8])
def test_auto_v_keeps_the_memory_limit(limit):
    costs = Costs(F=[1, 1.3, 0.8, 1.1, 0.9, 1.0, 1.2, 1.6], P1=1.1, P2=[0.6, 0.5, 0.7, 0.4, 0.6, 0.5, 0.6, 0.8],
                  comm=0.05)
    s = make_schedule("auto", stages=4, microbatches=8, twobp=True, chunks=2, costs=costs, layout="v",
                      memory_limit=limit)
    assert max(_peak_held(a) for a in s.ranks) <= limit


@pytest.mark.parametrize("limit", [2, 4, 5, 8])
def test_greedy_deepest_first_order_holds_its_limit_exactly(limit):
    # the limit gates a new micro-batch by everything it will hold on the rank, so it is a hard bound
    for layout in LAYOUTS:
        s = list_schedule(stages=4, microbatches=8, chunks=2, costs=Costs(F=1, P1=1, P2=1, comm=0.1),
                          fwd_order=None, bwd_order=None, limit=[limit] * 4, layout=layout)
        validate(s)
        assert max(_peak_held(a) for a in s.ranks) <= limit


def test_v_beats_the_looped_layout_within_1f1b_memory_when_messages_cost():
    # the V's local turn saves a message each way per micro-batch, and its deepest-first order
    # needs no fixed sweep of the chunks
    costs = Costs(F=0.5, P1=0.5, P2=0.5, comm=0.05)
    for p, m in ((2, 4), (4, 8)):
        spans = {lay: make_schedule("auto", stages=p, microbatches=m, twobp=True, chunks=2, costs=costs,
                                    layout=lay, memory_limit=2 * p).meta["makespan"] for lay in LAYOUTS}
        assert spans["v"] < spans["loop"], spans


def test_lower_bound_drops_the_message_at_the_turn():
    costs = Costs(F=1, P1=1, P2=0, comm=0.5)
    loop = lower_bound(stages=2, chunks=2, microbatches=1, costs=costs)
    v = lower_bound(stages=2, chunks=2, microbatches=1, costs=costs, layout="v")
    assert loop - v == pytest.approx(2 * 0.5)  # one message forward, one back


def test_carry_keeps_the_layout_when_steps_are_unrolled():
    costs = Costs(F=[1, 1.2, 1, 2], P1=[1, 1, 1, 2], P2=[0.5, 0.6, 0.5, 1], comm=0.05)
    s = make_schedule("auto", stages=2, microbatches=4, twobp=True, chunks=2, costs=costs, layout="v",
                      overlap_steps=True)
    assert unroll(s, 2).layout == "v"
    validate(unroll(s, 3))
    assert period(s, costs) <= simulate(s.replace(carry=()), costs).makespan + 1e-9


def test_tied_first_and_last_blocks_share_a_rank_in_the_v_layout():
    import torch.nn as nn

    from twobp.pipeline.partition import partition_blocks, shared_across_ranks

    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    blocks = [emb, nn.Linear(4, 4), nn.Linear(4, 4), head]
    part, _ = partition_blocks(blocks, num_stages=4, ranks=2, stages_wanted=[], allow_shared=True)
    assert [x.ranks for x in shared_across_ranks(blocks, part, ranks=2)] == [(0, 1)]  # stages 0, 3: ranks 0, 1
    assert shared_across_ranks(blocks, part, ranks=2, layout="v") == []  # stages 0, 3: both on rank 0
    partition_blocks(blocks, num_stages=4, ranks=2, stages_wanted=[0, 3], layout="v")  # no SharedParameterError


def test_receive_in_send_order_receives_earlier_sent_messages_first():
    from twobp.pipeline.actions import F, P1, P2

    # rank 1 consumes micro-batch 1 before 0; rank 0 sends 0 first
    s = Schedule(ranks=((F(0), F(1), P1(0), P1(1), P2([0, 1])), (F(1), F(0), P1(0), P1(1), P2([0, 1]))),
                 stages=2, microbatches=2)
    assert fifo_violations(s)
    fixed = receive_in_send_order(s)
    assert [str(a) for a in fixed.ranks[1][:4]] == ["RF0.0", "RF1.0", "F1.0", "F0.0"]
    assert fifo_violations(fixed) == []
    validate(fixed)
    # a V schedule auto builds does need it (activations and gradients share rank pairs both ways)
    v = make_schedule("auto", stages=2, microbatches=4, twobp=True, chunks=2, layout="v")
    assert fifo_violations(v) and not fifo_violations(receive_in_send_order(v))
