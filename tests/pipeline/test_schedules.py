"""Schedules as data: text round trip, generators, validator rejections, lowering passes."""

import re
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twobp.pipeline import (
    SCHEDULE_NAMES, Action, Schedule, ScheduleError, fuse_backward, lower_comm, make_schedule,
    merge_p2, parse_action, validate,
)
from twobp.pipeline.actions import B, F, P1, P2

from checks import assert_covers_all_work

CASES = [(name, twobp, p, m, v)
         for name in SCHEDULE_NAMES for twobp in (False, True)
         for p, m in [(1, 3), (2, 4), (3, 5), (4, 8)]
         for v in ((1, 2) if name in ("gpipe", "interleaved-1f1b", "auto") else (1,))
         if not (name == "interleaved-1f1b" and v > 1 and m % p)
         and (twobp or name not in ("zb-h1", "auto"))]  # those two place P2: 2BP only


def test_p2_placing_schedules_refuse_a_fused_backward():
    for name in ("zb-h1", "auto"):
        with pytest.raises(ValueError, match=f"{name} places the P2 .* needs twobp=True"):
            make_schedule(name, stages=2, microbatches=4, twobp=False)


@pytest.mark.parametrize("name,twobp,p,m,v", CASES)
def test_generated_schedules_validate_and_round_trip(name, twobp, p, m, v):
    sched = make_schedule(name, stages=p, microbatches=m, twobp=twobp, chunks=v)
    validate(sched)
    assert Schedule.parse(str(sched)) == sched
    lowered = lower_comm(sched)
    validate(lowered)
    assert Schedule.parse(str(lowered)) == lowered
    assert sched.uses_split == twobp
    kinds = {a.kind for acts in sched.ranks for a in acts}
    assert kinds == ({"F", "P1", "P2"} if twobp else {"F", "B"})


def test_action_text_forms():
    assert str(F(3, 1)) == "F3.1"
    assert str(B(0)) == "B0.0"
    assert str(P1(12, 2)) == "P1[12].2"
    assert str(P2([0, 1, 2, 5, 7, 8], 0)) == "P2[0-2,5,7,8].0"
    assert parse_action("P2[0-2,5,7,8].0") == P2([0, 1, 2, 5, 7, 8], 0)
    assert parse_action("RB4.1") == Action("RB", (4,), 1)
    assert parse_action(" P13.0 ".replace("P13", "P1[3]")) == P1(3)
    for bad in ("F3", "X1.0", "P1[1,2].0", "P2[].0", "P2[3-1].0", "F-1.0", "P2[1,,2].0"):
        with pytest.raises(ValueError):
            parse_action(bad)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["F", "B", "P1", "P2", "SF", "RF", "SB", "RB"]),
       mbs=st.lists(st.integers(0, 300), min_size=1, max_size=12, unique=True),
       chunk=st.integers(0, 9))
def test_action_text_round_trip(kind, mbs, chunk):
    a = Action(kind, tuple(mbs) if kind == "P2" else (mbs[0],), chunk)
    assert parse_action(str(a)) == a


def test_schedule_parse_errors():
    with pytest.raises(ValueError, match="must start with"):
        Schedule.parse("rank 0: F0.0")
    with pytest.raises(ValueError, match="expected 'rank 1"):
        Schedule.parse("schedule name=x stages=2 chunks=1 microbatches=1\nrank 0: F0.0 B0.0\n"
                       "rank 2: F0.0 B0.0")
    with pytest.raises(ValueError, match="stages"):
        Schedule(ranks=((F(0), B(0)),), stages=2, microbatches=1)
    with pytest.raises(ValueError, match="Schedule.microbatches"):
        Schedule(ranks=((),), stages=1, microbatches=0)


def _two_rank(r0, r1, m=2):
    return Schedule(ranks=(tuple(r0), tuple(r1)), stages=2, microbatches=m, name="t")


GOOD = ([F(0), F(1), P1(0), P1(1), P2([0, 1])], [F(0), P1(0), F(1), P1(1), P2([0, 1])])


def test_validator_accepts_reference():
    validate(_two_rank(*GOOD))


@pytest.mark.parametrize("r0,r1,pattern", [
    # P1 before its F
    ([P1(0), F(0), F(1), P1(1), P2([0, 1])], GOOD[1], r"rank 0: P1\[0\]\.0 \(step 0\) runs before F0\.0"),
    # P2 before its P1
    (GOOD[0], [F(0), P2(0), P1(0), F(1), P1(1), P2(1)], r"rank 1: P2\[0\]\.0 \(step 1\) runs before P1\[0\]\.0"),
    # missing work: no forward of micro-batch 1 on rank 1
    (GOOD[0], [F(0), P1(0), P1(1), P2([0, 1])], r"rank 1: F1\.0 appears 0 times"),
    # duplicated forward
    ([F(0), F(0), F(1), P1(0), P1(1), P2([0, 1])], GOOD[1], r"rank 0: F0\.0 appears 2 times"),
    # P1 without P2
    ([F(0), F(1), P1(0), P1(1), P2(0)], GOOD[1], r"rank 0: P1\[1\]\.0 needs exactly one P2.*add P2\[1\]\.0"),
    # P2 twice for one micro-batch
    ([F(0), F(1), P1(0), P1(1), P2([0, 1]), P2(1)], GOOD[1], r"rank 0: .*found 2; remove"),
    # B and P1 for one micro-batch
    ([F(0), F(1), P1(0), B(0), P1(1), P2([0, 1])], GOOD[1], r"rank 0: micro-batch 0 of chunk 0 has more than one backward"),
    # out of range
    ([F(0), F(1), P1(0), P1(1), P2([0, 1]), F(5)], GOOD[1], r"micro-batch \[5\], outside 0\.\.1"),
])
def test_validator_rejections_name_rank_action_microbatch(r0, r1, pattern):
    with pytest.raises(ScheduleError) as info:
        validate(_two_rank(r0, r1))
    assert re.search(pattern, str(info.value)), str(info.value)


def test_deadlock_reports_the_cycle():
    # Sends are buffered, so receiving in another order than sent is fine...
    r0 = [F(0), F(1), P1(1), P1(0), P2([0, 1])]
    r1 = [F(0), F(1), P1(0), P1(1), P2([0, 1])]
    validate(_two_rank(r0, r1))
    # ...but rank 0 waiting for mb 0's gradient before it sends mb 1's activation, while
    # rank 1 waits for mb 1's activation first, is a cycle.
    r0 = [F(0), P1(0), F(1), P1(1), P2([0, 1])]
    r1 = [F(1), P1(1), F(0), P1(0), P2([0, 1])]
    with pytest.raises(ScheduleError) as info:
        validate(_two_rank(r0, r1))
    msg = str(info.value)
    assert "rank 0: deadlock: RB0.0" in msg and "gradient of micro-batch 0" in msg, msg
    assert "rank 1: deadlock: RF1.0" in msg and "activation of micro-batch 1" in msg, msg
    assert "rank 0 is stuck at RB0.0" in msg, msg


def test_send_recv_mismatch_in_explicit_form():
    low = lower_comm(_two_rank(*GOOD))
    r1 = [a for a in low.ranks[1] if a != Action("RF", (1,), 0)]
    bad = low.replace(ranks=(low.ranks[0], tuple(r1)))
    with pytest.raises(ScheduleError) as info:
        validate(bad)
    msg = str(info.value)
    assert "rank 1: F1.0 (step" in msg and "no RF1.0 comes before it" in msg
    assert "send/recv mismatch: SF1.0 sends micro-batch 1's act to rank 1" in msg
    # a receive written twice
    r1 = list(low.ranks[1]) + [Action("RF", (1,), 0)]
    with pytest.raises(ScheduleError, match="appears 2 times"):
        validate(low.replace(ranks=(low.ranks[0], tuple(r1))))
    # the consumer of a gradient without its receive
    r0 = [a for a in low.ranks[0] if a != Action("RB", (0,), 0)]
    with pytest.raises(ScheduleError, match=r"rank 0: P1\[0\]\.0 \(step \d+\) needs micro-batch 0's gradient"):
        validate(low.replace(ranks=(tuple(r0), low.ranks[1])))


def test_explicit_early_receive_is_valid():
    low = lower_comm(_two_rank(*GOOD))
    r1 = list(low.ranks[1])
    r1.remove(Action("RF", (1,), 0))
    r1.insert(0, Action("RF", (1,), 0))  # receive early: allowed, still no deadlock
    validate(low.replace(ranks=(low.ranks[0], tuple(r1))))


def test_lowering_passes():
    s = make_schedule("1f1b", stages=2, microbatches=3, twobp=True)
    fused = fuse_backward(s)
    assert fused.ranks == make_schedule("1f1b", stages=2, microbatches=3, twobp=False).ranks
    split = s.replace(ranks=tuple(tuple(x for a in acts for x in
                                        ([P2(mb, a.chunk) for mb in a.mbs] if a.kind == "P2" else [a]))
                                  for acts in s.ranks))
    assert merge_p2(split).ranks == s.ranks
    low = lower_comm(s)
    assert str(low).splitlines()[1] == (
        "rank 0: F0.0 SF0.0 F1.0 SF1.0 RB0.0 P1[0].0 F2.0 SF2.0 RB1.0 P1[1].0 P2[0].0 RB2.0 P1[2].0 "
        "P2[1,2].0")
    assert lower_comm(low) is low


def test_known_orders():
    s = make_schedule("1f1b", stages=3, microbatches=4, twobp=False)
    assert [str(a) for a in s.ranks[0]] == ["F0.0", "F1.0", "F2.0", "B0.0", "F3.0", "B1.0",
                                           "B2.0", "B3.0"]
    assert [str(a) for a in s.ranks[2]] == ["F0.0", "B0.0", "F1.0", "B1.0", "F2.0", "B2.0",
                                           "F3.0", "B3.0"]
    s = make_schedule("1f1b", stages=3, microbatches=4, twobp=True)
    # cool-down: the oldest pending P2 fills the wait before each P1; the rest batched at the end
    assert " ".join(map(str, s.ranks[0])) == (
        "F0.0 F1.0 F2.0 P1[0].0 F3.0 P1[1].0 P2[0].0 P1[2].0 P2[1].0 P1[3].0 P2[2,3].0")
    g = make_schedule("gpipe", stages=2, microbatches=3, twobp=True)
    assert " ".join(map(str, g.ranks[1])) == "F0.0 F1.0 F2.0 P1[0].0 P1[1].0 P1[2].0 P2[0-2].0"
    z = make_schedule("zb-h1", stages=3, microbatches=4, twobp=True)
    # rank r lags its P2 by r micro-batches
    assert " ".join(map(str, z.ranks[2])) == (
        "F0.0 P1[0].0 F1.0 P1[1].0 F2.0 P1[2].0 P2[0].0 F3.0 P1[3].0 P2[1-3].0")


def test_make_schedule_errors_and_warnings():
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        make_schedule("pipedream", stages=2, microbatches=4, twobp=True)
    with pytest.raises(ValueError, match="use microbatches=8"):
        make_schedule("interleaved-1f1b", stages=4, microbatches=6, twobp=True, chunks=2)
    with pytest.raises(ValueError, match="chunks=2"):
        make_schedule("1f1b", stages=2, microbatches=4, twobp=True, chunks=2)
    with pytest.raises(ValueError, match="stages must be an int >= 1"):
        make_schedule("1f1b", stages=0, microbatches=4, twobp=True)
    with pytest.raises(ValueError, match="twobp must be True or False"):
        make_schedule("1f1b", stages=2, microbatches=4, twobp="yes")
    with pytest.warns(UserWarning, match="microbatches=2 < stages=4"):
        make_schedule("1f1b", stages=4, microbatches=2, twobp=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_schedule("1f1b", stages=4, microbatches=4, twobp=True)


def test_every_schedule_covers_all_work_exactly_once():
    for name, twobp, p, m, v in CASES[::3]:
        assert_covers_all_work(make_schedule(name, stages=p, microbatches=m, twobp=twobp, chunks=v), split=twobp)


def test_generated_schedules_keep_fifo_order_per_rank_pair():
    from twobp.pipeline.validate import fifo_violations

    for name, twobp, p, m, v in CASES:
        s = make_schedule(name, stages=p, microbatches=m, twobp=twobp, chunks=v)
        assert fifo_violations(s) == [], (name, twobp, p, m, v)
    # receiving mb 1 before mb 0 is fine for gloo (tags) but flagged for NCCL
    r0 = [F(0), F(1), P1(0), P1(1), P2([0, 1])]
    r1 = [F(1), F(0), P1(0), P1(1), P2([0, 1])]
    bad = fifo_violations(_two_rank(r0, r1))
    assert bad == ["rank 0 sends SF0.0 to rank 1, whose next receive from it is RF1.0"]
