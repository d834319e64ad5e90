"""The comparison splits auto's shortfall: costs that grew in its timed steps, or an executor off its plan."""

import pytest

from twobp.benchmarks.pipeline_compare import (CompareConfig, Contender, ContenderResult, _costs_of_own_steps,
                                               simulated_gain)
from twobp.pipeline import make_schedule, simulate
from twobp.pipeline.overlap import period

PROBE = {"F": [0.150, 0.156], "P1": [0.172, 0.175], "P2": [0.124, 0.125], "comm": 0.0004, "B": [0.296, 0.297]}


def _auto():
    return make_schedule("auto", stages=2, microbatches=4, twobp=True, costs=PROBE, overlap_steps=True)


def test_own_costs_are_each_ranks_time_per_kind_over_its_actions():
    sched = _auto()
    bd = [dict(F=0.624, P1=0.705, P2=0.505), dict(F=0.648, P1=0.730, P2=0.507)]
    own = _costs_of_own_steps(sched, bd, PROBE)
    assert own["F"] == pytest.approx([0.156, 0.162])
    assert own["P1"] == pytest.approx([0.705 / 4, 0.730 / 4])
    assert own["P2"] == pytest.approx([0.505 / 4, 0.507 / 4])  # a batched P2[0-3] counts its 4 micro-batches
    assert own["B"] == PROBE["B"] and own["comm"] == PROBE["comm"]  # nothing fused ran: the probe's B stays
    # the plan's compute on its own costs is what the ranks measured, summed
    assert sum(simulate(sched, own).busy) == pytest.approx(sum(sum(v for k, v in b.items()) for b in bd))


def test_a_kind_that_ran_without_time_gives_no_own_costs():
    bd = [dict(F=0.624, P1=0.705, P2=0.0), dict(F=0.648, P1=0.730, P2=0.507)]
    assert _costs_of_own_steps(_auto(), bd, PROBE) is None


def test_simulated_gain_reports_the_plan_on_its_own_costs():
    cfg = CompareConfig(model="llama", microbatches=4, overlap_steps=True)
    bd = [dict(F=0.624, P1=0.705, P2=0.505, optim=0.021, wall=1.95),
          dict(F=0.648, P1=0.730, P2=0.507, optim=0.022, wall=1.95)]
    auto = ContenderResult(Contender("twobp", "auto-2bp", "twobp"), [1.0], [1.95, 1.96, 1.94], bd, None,
                           extra=dict(costs=PROBE))
    base = ContenderResult(Contender("twobp", "1f1b", "twobp"), [1.0], [2.32, 2.30, 2.33],
                           [dict(F=0.607, B=1.19, wall=2.32), dict(F=0.619, B=1.21, wall=2.32)], None)
    gain = simulated_gain([base, auto], cfg)
    assert gain["measured"] == pytest.approx(2.32 / 1.95)
    own = _costs_of_own_steps(_auto(), bd, PROBE)
    assert gain["plan_step"] == pytest.approx(period(_auto(), own) + 0.022)
    assert gain["step"] == pytest.approx(1.95)
    assert gain["cost_growth"] == pytest.approx((0.624 + 0.705 + 0.505 + 0.648 + 0.730 + 0.507)
                                                / sum(simulate(_auto(), PROBE).busy))
    assert gain["cost_growth"] > 1.02  # these steps ran 3% above the probe: part of the shortfall


def test_auto_with_an_explicit_memory_limit_parses_and_bad_limits_name_the_form():
    c = Contender("twobp", "auto-v@6-2bp", "twobp")
    assert (c.variant, c.schedule_name, c.chunks, c.layout, c.memory_limit(2)) == ("auto-v", "auto", 2, "v", 6)
    assert c.label == "twobp auto-v@6 +2BP"
    assert Contender("twobp", "auto@3-2bp", "twobp").memory_limit(4) == 3
    assert Contender("twobp", "auto-vh1-2bp", "twobp").memory_limit(2) == 4  # the named limits stay
    assert Contender("twobp", "auto-h1-2bp", "twobp").memory_limit(2) == 2
    assert Contender("twobp", "auto-v-2bp", "twobp").memory_limit(2) is None
    CompareConfig(ours=("auto-v@6-2bp", "auto@2-2bp"))  # accepted
    for bad in ("auto-v@0-2bp", "auto-v@x-2bp", "zb-h1@3-2bp", "auto-vh1@3-2bp"):
        with pytest.raises(ValueError, match="auto@N, auto-x2@N or auto-v@N"):
            CompareConfig(ours=(bad,))
