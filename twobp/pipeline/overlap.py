"""Carrying trailing P2 into the next step: the steady-state step time it gives.

A rank other than the first starts every step waiting for its first activation, which
the ranks before it are still computing (at least one forward per rank ahead of it).
With 2BP, that wait can be filled by the weight gradients this rank still owes from the
previous step, and by its optimizer step: they are due before this rank's next forward,
not before the previous rank's. ``Schedule.carry[r]`` says how many trailing P2
micro-batches rank r carries (see :mod:`.actions`).

A single step then says little; the figure is the **period**, the steady-state time
between step ends. The executor ends every step with the loss broadcast, where every rank
meets, so steps overlap by the carried work only: each step starts on all ranks at once,
rank r first runs the P2 it carried from the previous step and then this step's actions up
to its own carried tail, and the step ends when the last rank is done. Without carry the
period is the one-step makespan. (A model in which steps also overlap past the broadcast,
:func:`unroll` repeated and differenced, promised gains the executor cannot reach: 24
against 27 time units without carry at p = 4, m = 8 with equal costs, where the synced
step is 26.) :func:`unroll` writes ``n`` consecutive steps as one schedule
(micro-batch ids of step k offset by ``k * m``, carried P2 at the head of the next step),
which validates a carry across steps.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .actions import Action, Schedule
from .costs import Costs, as_costs

__all__ = ["trailing_p2", "unroll", "period", "choose_carry", "split_tail"]


def trailing_p2(acts: Sequence[Action]) -> int:
    """Micro-batches in the run of P2 actions that ends a rank's list (sends may follow)."""
    n = 0
    for a in reversed(acts):
        if a.kind == "P2":
            n += len(a.mbs)
        elif a.kind in ("SF", "SB"):
            continue
        else:
            break
    return n


def split_tail(acts: Sequence[Action], k: int) -> tuple[list[Action], list[Action]]:
    """``(kept, carried)``: the last ``k`` P2 micro-batches of ``acts`` taken off its end
    (a batched P2 is split where needed; carried ones keep their order)."""
    kept = list(acts)
    carried: list[Action] = []
    while k > 0:
        i = max(j for j, a in enumerate(kept) if a.kind == "P2")
        a = kept[i]
        if len(a.mbs) <= k:
            carried.insert(0, a)
            del kept[i]
            k -= len(a.mbs)
        else:
            kept[i] = Action("P2", a.mbs[:-k], a.chunk)
            carried.insert(0, Action("P2", a.mbs[-k:], a.chunk))
            k = 0
    return kept, carried


def unroll(schedule: Schedule, steps: int) -> Schedule:
    """``steps`` consecutive steps as one schedule, carried P2 at the head of the next step."""
    m = schedule.microbatches

    def shifted(a: Action, k: int) -> Action:
        return Action(a.kind, tuple(mb + k * m for mb in a.mbs), a.chunk)

    ranks = []
    for r, acts in enumerate(schedule.ranks):
        kept, carried = split_tail(acts, schedule.carried(r))
        out: list[Action] = []
        for k in range(steps):
            if k > 0:
                out += [shifted(a, k - 1) for a in carried]
            out += [shifted(a, k) for a in kept]
        out += [shifted(a, steps - 1) for a in carried]
        ranks.append(tuple(out))
    return schedule.replace(ranks=tuple(ranks), microbatches=m * steps, carry=())


def period(schedule: Schedule, costs: Costs | Mapping | None = None) -> float:
    """Steady-state time per step with ``schedule.carry`` (the makespan without carry): every
    rank starts the step together, busy first with the P2 it carried from the last step, and
    runs the step's actions but its own carried tail (module docstring)."""
    from .simulate import makespan_of

    costs = as_costs(costs)
    if not schedule.carry:
        return makespan_of(schedule, costs)
    kept_ranks, owed = [], []
    for r, acts in enumerate(schedule.ranks):
        kept, carried = split_tail(acts, schedule.carried(r))
        kept_ranks.append(tuple(kept))
        owed.append(sum(costs.at("P2", schedule.stage_of(r, a.chunk)) * len(a.mbs) for a in carried))
    return makespan_of(schedule.replace(ranks=tuple(kept_ranks), carry=()), costs, start_at=owed)


def choose_carry(schedule: Schedule, costs: Costs | Mapping | None = None, *, passes: int = 2) -> Schedule:
    """The schedule with, per rank, the carry (0 .. its trailing P2) that minimises the
    period: coordinate descent over ranks, ``passes`` sweeps. The first rank carries 0
    (nothing precedes its first forward)."""
    costs = as_costs(costs)
    best = schedule.replace(carry=())
    best_t = period(best, costs)
    carry = [0] * schedule.stages
    for _ in range(passes):
        changed = False
        for r in range(1, schedule.stages):
            for k in range(trailing_p2(schedule.ranks[r]) + 1):
                if k == carry[r]:
                    continue
                trial = carry[:r] + [k] + carry[r + 1:]
                cand = schedule.replace(carry=tuple(trial))
                t = period(cand, costs)
                if t < best_t - 1e-12:
                    best, best_t, carry, changed = cand, t, trial, True
        if not changed:
            break
    return best
