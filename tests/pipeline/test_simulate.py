"""Simulator figures, the auto placer, timelines and the simulate CLI."""

import json

import pytest

from twobp.pipeline import (
    Costs, MemorySizes, Timeline, auto_schedule, lower_bound, make_schedule, simulate,
)
from twobp.pipeline.cli_simulate import simulate_main

PM = [(2, 2), (2, 5), (3, 4), (4, 4), (4, 8), (4, 16), (8, 8), (8, 24)]


@pytest.mark.parametrize("p,m", PM)
@pytest.mark.parametrize("costs", [dict(F=1, P1=1, P2=1), dict(F=1, P1=0.7, P2=1.6),
                                   dict(F=2, P1=1, P2=0, B=3.5)])
def test_1f1b_bubble_is_exactly_the_formula(p, m, costs):
    res = simulate(make_schedule("1f1b", stages=p, microbatches=m, twobp=False), costs)
    c = Costs(**costs)
    assert res.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert res.makespan == pytest.approx((m + p - 1) * (c.at("F", 0) + c.at("B", 0)))
    assert res.throughput == pytest.approx(m / res.makespan)
    assert res.peak_held == [p - r if m >= p - r else m for r in range(p)]


@pytest.mark.parametrize("p,m", [(p, m) for p, m in PM if m >= p])
def test_zb_h1_idle_is_a_third_of_1f1b_at_equal_costs(p, m):
    one = simulate(make_schedule("1f1b", stages=p, microbatches=m, twobp=False))
    zb = simulate(make_schedule("zb-h1", stages=p, microbatches=m, twobp=True))
    assert sum(zb.idle) / sum(one.idle) == pytest.approx(1 / 3)
    assert zb.makespan == 3 * m + p - 1
    assert max(zb.peak_held) == p == max(one.peak_held)  # 1F1B's activation memory
    # and the bubble fraction (which also counts the longer busy time) follows
    assert zb.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1))


@pytest.mark.parametrize("p,m", [(p, m) for p, m in PM if p > 1])
@pytest.mark.parametrize("name,v", [("1f1b", 1), ("gpipe", 1), ("interleaved-1f1b", 2)])
def test_2bp_is_strictly_faster(p, m, name, v):
    if name == "interleaved-1f1b" and m % p:
        pytest.skip("interleaving needs m % p == 0")
    base = simulate(make_schedule(name, stages=p, microbatches=m, twobp=False, chunks=v))
    split = simulate(make_schedule(name, stages=p, microbatches=m, twobp=True, chunks=v))
    assert split.makespan < base.makespan
    assert split.bubble_fraction < base.bubble_fraction
    assert sum(split.busy) == pytest.approx(sum(base.busy))  # same work, less idle


def test_interleaving_shrinks_the_bubble():
    one = simulate(make_schedule("1f1b", stages=4, microbatches=8, twobp=False))
    inter = simulate(make_schedule("interleaved-1f1b", stages=4, microbatches=8, twobp=False,
                                   chunks=2), Costs(F=0.5, P1=0.5, P2=0.5))
    assert inter.bubble_fraction < one.bubble_fraction


def test_memory_sizes_and_comm():
    s = make_schedule("1f1b", stages=2, microbatches=4, twobp=True)
    res = simulate(s, dict(F=1, P1=1, P2=1, comm=0.25),
                   sizes=MemorySizes(activation=100.0, p2=30.0))
    # rank 1 (last): F holds 100, P1 turns it into 30, P2s wait for the end: peak at F3
    assert res.peak_bytes[1] == pytest.approx(100 + 3 * 30)
    assert res.peak_bytes[0] == pytest.approx(2 * 100 + 2 * 30)  # at F3: acts 2, 3; p2 of 0, 1
    assert res.peak_held == [4, 4]
    no_comm = simulate(s)
    assert res.makespan > no_comm.makespan
    per_stage = simulate(s, dict(F=[1, 2], P1=[1, 2], P2=[1, 1]))
    assert per_stage.busy[1] > per_stage.busy[0]
    with pytest.raises(ValueError, match="Costs.F has 3 entries"):
        simulate(s, dict(F=[1, 2, 3], P1=1, P2=1))
    with pytest.raises(ValueError, match="Costs.P1 must be a finite number >= 0"):
        Costs(F=1, P1=-1, P2=1)
    with pytest.raises(ValueError, match="costs lack \\['P2'\\]"):
        simulate(s, dict(F=1, P1=1))


SKEWED = [
    dict(F=1.0, P1=0.6, P2=2.2, comm=0.05),
    dict(F=[0.5, 1.0, 1.5, 1.0], P1=[0.4, 1.0, 1.2, 0.8], P2=[1.5, 0.3, 0.9, 2.0], comm=0.1),
    dict(F=1.0, P1=2.0, P2=0.3),
    dict(F=0.2, P1=0.2, P2=3.0, comm=0.3),
]


@pytest.mark.parametrize("costs", SKEWED)
@pytest.mark.parametrize("m", [4, 8])
def test_auto_matches_or_beats_fixed_placements(costs, m):
    p = 4
    auto = make_schedule("auto", stages=p, microbatches=m, twobp=True, costs=costs)
    t_auto = simulate(auto, costs).makespan
    for name in ("gpipe", "1f1b", "zb-h1"):
        fixed = simulate(make_schedule(name, stages=p, microbatches=m, twobp=True), costs)
        assert t_auto <= fixed.makespan + 1e-9, (name, t_auto, fixed.makespan)
    lb = lower_bound(stages=p, chunks=1, microbatches=m, costs=Costs(**costs))
    assert lb <= t_auto + 1e-9
    assert auto.meta["gap"] == pytest.approx(t_auto / lb - 1)
    again = make_schedule("auto", stages=p, microbatches=m, twobp=True, costs=costs)
    assert again == auto  # deterministic: every rank builds the same schedule


def test_auto_strictly_beats_1f1b_2bp_somewhere():
    costs = SKEWED[0]
    auto = simulate(make_schedule("auto", stages=4, microbatches=8, twobp=True, costs=costs), costs)
    fixed = simulate(make_schedule("1f1b", stages=4, microbatches=8, twobp=True), costs)
    assert auto.makespan < fixed.makespan


@pytest.mark.parametrize("limit", [1, 2, 4, 6])
def test_auto_respects_the_memory_limit(limit):
    costs = SKEWED[0]
    s = make_schedule("auto", stages=4, microbatches=8, twobp=True, costs=costs,
                      memory_limit=limit)
    assert max(simulate(s, costs).peak_held) <= limit


def test_auto_reaches_the_bound_on_unit_costs_and_interleaves():
    s = auto_schedule(stages=4, microbatches=8, costs=Costs(F=1, P1=1, P2=1))
    assert s.meta["gap"] == 0 and s.meta["makespan"] == 27
    s2 = make_schedule("auto", stages=2, microbatches=4, twobp=True, chunks=2,
                       costs=dict(F=0.5, P1=0.5, P2=0.5, comm=0.01))
    assert simulate(s2, dict(F=0.5, P1=0.5, P2=0.5, comm=0.01)).makespan <= simulate(
        make_schedule("interleaved-1f1b", stages=2, microbatches=4, twobp=True, chunks=2),
        dict(F=0.5, P1=0.5, P2=0.5, comm=0.01)).makespan + 1e-9


def test_timeline_files_round_trip(tmp_path):
    res = simulate(make_schedule("zb-h1", stages=3, microbatches=4, twobp=True))
    paths = res.timeline.write(tmp_path / "zb")
    trace = json.loads((tmp_path / "zb.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(res.timeline.events)
    assert {e["cat"] for e in xs} == {"F", "P1", "P2"}
    back = Timeline.load(tmp_path / "zb.json")
    assert back.ranks == 3 and back.makespan == pytest.approx(res.makespan)
    assert back.bubble_fraction() == pytest.approx(res.bubble_fraction)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "zb.png") in paths and (tmp_path / "zb.png").stat().st_size > 1000


def test_simulate_cli(tmp_path, capsys):
    assert simulate_main(["-p", "4", "-m", "8", "--timeline", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 1f1b | 33 | 27.3% |" in out and "| zb-h1-2bp | 27 |" in out
    assert (tmp_path / "auto-2bp.json").exists()
    assert simulate_main(["-p", "2", "-m", "4", "--costs", "F=1,P1=oops"]) == 2
    assert "P1 must be a number" in capsys.readouterr().err
    costs = tmp_path / "c.json"
    costs.write_text(json.dumps({"F": [1, 2], "P1": [1, 1], "P2": [1, 1], "comm": 0.1}))
    assert simulate_main(["-p", "2", "-m", "4", "--costs-json", str(costs),
                          "--schedules", "1f1b,auto-2bp"]) == 0
    with pytest.raises(SystemExit):
        simulate_main(["--help"])
    assert "Chrome/Perfetto" in capsys.readouterr().out


def test_allreduce_cost_ends_the_step_after_the_last_final_gradient():
    s = make_schedule("1f1b", stages=2, microbatches=4, twobp=True)
    plain = simulate(s, dict(F=1, P1=1, P2=1))
    with_ar = simulate(s, dict(F=1, P1=1, P2=1, allreduce=[0.5, 4.0]))
    # both ranks' gradients are final at t = 13, when their last P2 ends: rank 1's 4-unit
    # all-reduce then ends at 17, after everything else
    assert plain.makespan == 13 and with_ar.makespan == 17
    assert simulate(s, dict(F=1, P1=1, P2=1, allreduce=0.5)).makespan == 13.5


def test_1f1b_2bp_fills_the_cool_down_waits_and_reaches_the_analytic_ceiling():
    """p = 2, m = 4, T_F = T_P1 = T_P2: the P2 in each cool-down wait give 1.154x (15/13) over 1F1B."""
    plain = simulate(make_schedule("1f1b", stages=2, microbatches=4, twobp=False))
    split = simulate(make_schedule("1f1b", stages=2, microbatches=4, twobp=True))
    assert plain.makespan / split.makespan == pytest.approx(15 / 13)


def test_median_costs_takes_the_median_per_kind_and_stage_across_steps():
    from twobp.pipeline import median_costs

    steps = [{"F": [1.0, 2.0], "P1": [1.0, 1.0], "P2": [0.5, 0.5], "comm": 0.1},
             {"F": [1.5, 9.0], "P1": [3.0, 1.2], "P2": [0.7, 0.4], "comm": 0.3},   # one noisy step
             {"F": [1.2, 2.2], "P1": [1.1, 0.9], "P2": [0.6, 0.6], "comm": 0.2, "B": [2.0, 2.0]}]
    got = median_costs(steps)
    assert got == {"F": [1.2, 2.2], "P1": [1.1, 1.0], "P2": [0.6, 0.5], "comm": 0.2}  # B: not in every step
    with pytest.raises(ValueError, match="at least one"):
        median_costs([])
    with pytest.raises(ValueError, match="number of stages"):
        median_costs([{"F": [1.0]}, {"F": [1.0, 2.0]}])
