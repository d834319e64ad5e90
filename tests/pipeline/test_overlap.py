"""Carried P2 (Schedule.carry): the IR, the unrolled steady state, and what auto makes of it."""

import pytest

from twobp.pipeline import Costs, Schedule, ScheduleError, make_schedule, simulate, validate
from twobp.pipeline.actions import F, P1, P2
from twobp.pipeline.auto import period_lower_bound
from twobp.pipeline.overlap import choose_carry, period, split_tail, trailing_p2, unroll
from twobp.pipeline.simulate import makespan_of

COSTS = Costs(F=1.0, P1=1.2, P2=0.6)


def _two_rank(carry=()):
    return Schedule(ranks=((F(0), F(1), P1(0), P1(1), P2([0, 1])),
                           (F(0), P1(0), F(1), P1(1), P2([0, 1]))),
                    stages=2, microbatches=2, name="t", carry=carry)


def test_carry_text_form_round_trips_and_defaults_to_none():
    s = _two_rank(carry=(0, 2))
    assert "carry=0,2" in str(s).splitlines()[0]
    assert Schedule.parse(str(s)) == s
    assert _two_rank(carry=(0, 0)).carry == () and "carry" not in str(_two_rank())
    assert s.carried(1) == 2 and s.carried(0) == 0


def test_carry_is_checked():
    with pytest.raises(ValueError, match="one int >= 0 per rank"):
        _two_rank(carry=(1,))
    with pytest.raises(ValueError, match="one int >= 0 per rank"):
        _two_rank(carry=(0, -1))
    bad = _two_rank(carry=(0, 3))
    with pytest.raises(ScheduleError, match="carry=3 on rank 1 but its list ends with only 2 P2"):
        validate(bad)


def test_split_tail_splits_a_batched_p2():
    acts = (F(0), P1(0), P2([0, 1, 2]))
    assert trailing_p2(acts) == 3
    kept, carried = split_tail(acts, 2)
    assert kept == [F(0), P1(0), P2([0])] and carried == [P2([1, 2])]
    assert split_tail(acts, 0) == (list(acts), [])


def test_unroll_moves_carried_p2_to_the_next_steps_head():
    u = unroll(_two_rank(carry=(0, 1)), 2)
    validate(u)
    assert u.microbatches == 4
    assert u.ranks[1][:6] == (F(0), P1(0), F(1), P1(1), P2([0]), P2([1]))  # P2[0] stays, P2[1] carried...
    assert u.ranks[1][5:7] == (P2([1]), F(2))  # ...to just before the next step's first forward
    assert u.ranks[1][-1] == P2([3])


def test_period_is_the_makespan_without_carry_and_never_below_the_busiest_rank():
    s = make_schedule("1f1b", stages=2, microbatches=4, twobp=True)
    assert period(s, COSTS) == makespan_of(s, COSTS)
    for m in (4, 8):
        a = make_schedule("auto", stages=2, microbatches=m, twobp=True, costs=COSTS, overlap_steps=True)
        validate(a)
        lb = period_lower_bound(stages=2, chunks=1, microbatches=m, costs=COSTS)
        assert a.carry and lb - 1e-9 <= period(a, COSTS) < makespan_of(a, COSTS)
        res = simulate(a, COSTS)
        assert res.period == pytest.approx(period(a, COSTS)) and res.throughput == pytest.approx(m / res.period)


def test_carry_beats_every_plain_schedule_at_p2():
    """p = 2, F : P1 : P2 = 1 : 1.2 : 0.6: a zero-bubble steady state (the busiest rank's
    work) with carry, against 1F1B's (m + 1)(F + B)."""
    for m, floor in ((4, 1.18), (8, 1.12)):
        plain = makespan_of(make_schedule("1f1b", stages=2, microbatches=m, twobp=False), COSTS)
        a = make_schedule("auto", stages=2, microbatches=m, twobp=True, costs=COSTS, overlap_steps=True)
        best_plain = min(makespan_of(make_schedule(n, stages=2, microbatches=m, twobp=True, costs=COSTS), COSTS)
                         for n in ("1f1b", "zb-h1", "auto"))
        assert plain / period(a, COSTS) > floor
        assert period(a, COSTS) < best_plain


def test_choose_carry_never_worse_and_keeps_the_first_rank_uncarried():
    for name in ("1f1b", "zb-h1", "gpipe"):
        s = make_schedule(name, stages=3, microbatches=6, twobp=True)
        c = choose_carry(s, COSTS)
        assert period(c, COSTS) <= makespan_of(s, COSTS) + 1e-9
        assert c.carried(0) == 0
    fused = make_schedule("1f1b", stages=2, microbatches=4, twobp=False, overlap_steps=True)
    assert fused.carry == (), "no P2, nothing to carry"


def test_period_starts_every_step_together_as_the_loss_broadcast_does():
    """The executor ends each step with the loss broadcast, where all ranks meet: a rank's
    carried P2 can only fill the next step's start, never overlap the others' current step.
    Worked by hand, F = P1 = P2 = 1: rank 1 carrying both P2 starts its F0 at t = 2 (it owes
    2), so its P1s send at 4 and 6 and rank 0 ends at 8; carrying one, rank 1 is free at 1,
    waits for F0's activation anyway and the step is no longer than without carry: 7."""
    unit = Costs(F=1.0, P1=1.0, P2=1.0)

    def sched(carry):
        return Schedule(ranks=((F(0), F(1), P1(0), P2([0]), P1(1), P2([1])),
                               (F(0), P1(0), F(1), P1(1), P2([0, 1]))),
                        stages=2, microbatches=2, name="t", carry=carry)

    assert makespan_of(sched(()), unit) == pytest.approx(7.0)
    assert period(sched((0, 1)), unit) == pytest.approx(7.0)
    assert period(sched((0, 2)), unit) == pytest.approx(8.0)
    assert choose_carry(sched(()), unit).carry in ((), (0, 0), (0, 1))  # never the carry that costs


def test_steps_overlapping_past_the_broadcast_are_not_promised():
    """p = 4, m = 8, equal costs: steps that overlapped past the loss broadcast would reach the
    busiest rank's 24 units; the executor syncs each step, so the period promised is above that
    and never above the plain schedule's 27."""
    unit = Costs(F=1.0, P1=1.0, P2=1.0)
    a = make_schedule("auto", stages=4, microbatches=8, twobp=True, costs=unit, overlap_steps=True)
    plain = makespan_of(make_schedule("auto", stages=4, microbatches=8, twobp=True, costs=unit), unit)
    assert plain == pytest.approx(27.0)
    assert 24.0 + 1e-9 < period(a, unit) <= plain


def test_carry_keeps_a_memory_cap():
    """Carried P2 runs at the head of the next step, before its first forward, so carrying a
    capped placement's trailing P2 leaves its peak where the cap put it, and can still shorten
    the steady-state step (auto over the V layout, p = 2, m = 4, 6 micro-batch chunks)."""
    costs = Costs(F=(0.08, 0.08, 0.08, 0.082), P1=(0.09, 0.09, 0.09, 0.092), P2=(0.064, 0.064, 0.064, 0.063))
    kw = dict(stages=2, microbatches=4, twobp=True, chunks=2, layout="v", costs=costs, memory_limit=6)
    plain = make_schedule("auto", **kw)
    carried = make_schedule("auto", **kw, overlap_steps=True)
    assert carried.carry and max(simulate(carried, costs).peak_held) <= 6
    assert period(carried, costs) < makespan_of(plain, costs)
