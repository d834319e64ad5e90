"""auto keeps a backward fused where its P2 would fill no idle time and the fused backward B is
measured cheaper than P1 + P2 (on a CPU it is: dW right after dX finds its inputs in cache)."""

import pytest

from twobp.pipeline import Costs, make_schedule, simulate, validate, with_fused_backward
from twobp.pipeline.auto import _peak_held

from checks import assert_covers_all_work


def _kinds(s):
    return {k: sum(1 for acts in s.ranks for a in acts if a.kind == k) for k in ("B", "P1", "P2")}


@pytest.mark.parametrize("p,m,v,layout", [(2, 4, 1, "loop"), (4, 8, 1, "loop"), (2, 4, 2, "v"), (2, 8, 2, "loop")])
def test_a_slightly_cheaper_fused_backward_is_used_where_p2_fills_nothing(p, m, v, layout):
    split = Costs(F=1, P1=1, P2=1, comm=0.02)
    cheap = Costs(F=1, P1=1, P2=1, B=1.9, comm=0.02)
    s_split = make_schedule("auto", stages=p, microbatches=m, twobp=True, chunks=v, costs=split, layout=layout)
    s = make_schedule("auto", stages=p, microbatches=m, twobp=True, chunks=v, costs=cheap, layout=layout)
    validate(s)
    k = _kinds(s)
    assert k["B"] > 0 and k["P1"] > 0 and k["P2"] > 0, k  # a mix: some fused, some split
    assert k["B"] + k["P1"] == p * m * v
    assert_covers_all_work(s, split=None)  # every backward exactly once, fused or split
    assert simulate(s, cheap).makespan < simulate(s_split, cheap).makespan  # fusing bought time
    assert _kinds(s_split)["B"] == 0  # with B = P1 + P2 nothing is fused


def test_never_worse_than_plain_1f1b_when_fusing_is_much_cheaper():
    costs = Costs(F=1, P1=1, P2=1, B=1.5, comm=0.02)
    for p, m in ((2, 4), (2, 8), (4, 8)):
        s = make_schedule("auto", stages=p, microbatches=m, twobp=True, costs=costs)
        plain = make_schedule("1f1b", stages=p, microbatches=m, twobp=False)
        assert simulate(s, costs).makespan <= simulate(plain, costs).makespan + 1e-9
        assert s.meta["lower_bound"] <= s.meta["makespan"] + 1e-9


def test_fusing_respects_the_memory_limit_and_keeps_carry_valid():
    costs = Costs(F=[1, 1.2, 0.9, 1.1], P1=1, P2=[0.8, 1, 0.7, 1.2], B=[1.7, 1.9, 1.6, 2.1], comm=0.05)
    for limit in (2, 4):
        s = make_schedule("auto", stages=4, microbatches=8, twobp=True, costs=costs, memory_limit=limit)
        assert max(_peak_held(a) for a in s.ranks) <= limit
    s = make_schedule("auto", stages=4, microbatches=8, twobp=True, costs=costs, overlap_steps=True)
    validate(s)


def test_with_fused_backward_takes_b_from_the_fused_run():
    split = {"F": [1, 2], "P1": [1, 1], "P2": [0.5, 0.6], "comm": 0.01}
    assert with_fused_backward(split, {"F": [1, 2], "B": [1.4, 1.5], "comm": 0.01}) == {**split, "B": [1.4, 1.5]}
    assert with_fused_backward(split, {}) == split
