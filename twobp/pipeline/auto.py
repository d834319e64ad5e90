"""``auto``: place the P2s from measured costs to shorten the makespan.

Problem. Given per-chunk times for F, P1, P2 and communication, and each rank's fixed
order of forwards and P1s (plain micro-batch order, or Megatron's interleaved order for
``chunks > 1``), choose where each rank runs each P2 (after its P1) so that the step ends
as early as possible, holding at most ``memory_limit`` micro-batch chunks per rank from
F until P2. With P2s free to move this is a job-shop-like scheduling problem (NP-hard in
general), so ``auto`` is a heuristic:

1. **Candidates** (each is simulated, over-limit ones dropped):
   the 2BP 1F1B (or interleaved 1F1B) schedule; ZB-H1 and the same with every P2
   lag raised by e (``chunks = 1``, within the limit); greedy list scheduling (:mod:`.greedy`:
   P1 > F > P2, P2 fills idle time) with the memory limit, and with the limit ``p`` of
   ZB-H1 (``v * p``, ZB-V's, in the V layout); the same with every P2 left to the end;
   2BP GPipe. With ``chunks > 1`` the greedy runs both with Megatron's interleaved F/P1
   order (looped layout only) and with the deepest-ready-stage order, the one the V
   layout (:data:`~.actions.LAYOUTS`) uses: ZB-V's placement, found from costs.
2. **Local search** on the best candidate: every P2 is split to one micro-batch, and
   single P2 moves (to any later or earlier legal slot on its rank, before a compute
   action or at the end) are tried, taking the first that lowers the simulated makespan
   and respects the memory limit, until no move helps or ``max_evals`` simulations ran.
   Deterministic: every rank that builds the schedule gets the same one.
3. **Fusing back** where the costs give a fused backward ``B`` cheaper than ``P1 + P2`` (a
   measured B; on a CPU dW computed right after dX finds its inputs in cache): every
   candidate also competes with its backward fused throughout, and when no P2 move helps,
   turning one micro-batch's P1 back into B (its P2 gone) is tried the same way. So a split
   is kept only where its P2 fills idle time that pays for it.

How far from optimal. The result is never worse than the best candidate that fits the
memory limit, so never worse than 2BP 1F1B (no limit), ZB-H1 (limit >= p) or, where B is
cheaper than P1 + P2, plain 1F1B under the same costs, and it is a local optimum for
single-P2 moves and single fusions (F and P1 orders stay fixed,
so a schedule needing another F/P1 interleaving is out of its reach). It is compared
with a lower bound that holds for every schedule with these costs, memory aside (stored
in ``schedule.meta``; :func:`auto_report` formats it):

    LB = max( max_r (head_r + work_r),  Σ_s (F_s + P1_s) + 2 Σ_{s<S-1} comm_s + P2_0 )

where ``work_r`` is all compute on rank r and ``head_r`` the earliest its first
forward's input can arrive (a message at the turn of a V costs nothing; where B is cheaper,
each backward counts at min(P1 + P2, B)). ``meta["gap"] = makespan / LB - 1`` bounds the distance to
the optimum for that instance. On unit costs (p=4, m=8) auto reaches the ZB-H1 makespan
``3m + p - 1``, which meets the first term of the bound: gap 0.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from .actions import Action, Schedule, place, stage_of
from .costs import Costs
from .greedy import list_schedule
from .lowering import fuse_backward, lower_comm
from .overlap import choose_carry, period, trailing_p2
from .walk import walk

__all__ = ["auto_schedule", "lower_bound", "period_lower_bound", "auto_report"]


def _crossing_comm(p: int, S: int, layout: str, costs: Costs) -> list[float]:
    """Latency of the hand-off out of each stage s -> s+1: 0 where both lie on one rank."""
    return [0.0 if place(s, p, layout)[0] == place(s + 1, p, layout)[0] else costs.at("comm", s)
            for s in range(S - 1)]


def _rank_work(r: int, p: int, v: int, m: int, layout: str, costs: Costs) -> float:
    return sum(m * sum(costs.at(k, stage_of(r, c, p, layout)) for k in ("F", "P1", "P2")) for c in range(v))


def lower_bound(*, stages: int, chunks: int, microbatches: int, costs: Costs, layout: str = "loop") -> float:
    """A makespan no placement of the P2s can beat (see the module docstring)."""
    p, v, m = stages, chunks, microbatches
    S = p * v
    comm = _crossing_comm(p, S, layout, costs)
    head = [0.0] * S
    for s in range(1, S):
        head[s] = head[s - 1] + costs.at("F", s - 1) + comm[s - 1]
    best = 0.0
    for r in range(p):
        first = min(stage_of(r, c, p, layout) for c in range(v))
        best = max(best, head[first] + _rank_work(r, p, v, m, layout, costs))
    path = sum(costs.at("F", s) + costs.at("P1", s) for s in range(S))
    path += 2 * sum(comm) + costs.at("P2", 0)
    return max(best, path)


def period_lower_bound(*, stages: int, chunks: int, microbatches: int, costs: Costs,
                       layout: str = "loop") -> float:
    """A steady-state step time no schedule can beat, carry or not: the busiest rank's work."""
    return max(_rank_work(r, stages, chunks, microbatches, layout, costs) for r in range(stages))


def _clamped(sched: Schedule) -> Schedule:
    """``sched`` with each rank's carry cut to the P2 its list still ends with."""
    if not sched.carry:
        return sched
    return sched.replace(carry=tuple(min(k, trailing_p2(acts)) for k, acts in zip(sched.carry, sched.ranks)))


def _makespan(sched: Schedule, costs: Costs) -> float:
    lowered = lower_comm(sched)

    def duration(r: int, a: Action) -> float:
        return costs.at(a.kind, lowered.stage_of(r, a.chunk)) * len(a.mbs)

    def latency(r: int, a: Action) -> float:
        s = lowered.stage_of(r, a.chunk)
        return costs.at("comm", s if a.kind == "SF" else s - 1)

    w = walk(lowered, duration, latency)
    return max(max(e, default=0.0) for e in w.end)


def _peak_held(acts: list[Action] | tuple[Action, ...]) -> int:
    held = peak = 0
    for a in acts:
        if a.kind == "F":
            held += 1
        peak = max(peak, held)
        if a.kind == "P2":
            held -= len(a.mbs)
        elif a.kind == "B":
            held -= 1
    return peak


def _split_p2(sched: Schedule) -> Schedule:
    ranks = tuple(tuple(x for a in acts for x in
                        ([Action("P2", (mb,), a.chunk) for mb in a.mbs] if a.kind == "P2" else [a]))
                  for acts in sched.ranks)
    return sched.replace(ranks=ranks)


def _candidates(p: int, m: int, v: int, costs: Costs, limit: int | None, layout: str = "loop") -> list[Schedule]:
    from .generators import _gpipe, _one_f_one_b, interleaved_order, lagged_one_f_one_b

    out = []
    orders: list[tuple] = [(None, None)] if v > 1 else []  # deepest ready stage first: fits any layout
    if layout == "loop":
        orders.insert(0, ([interleaved_order(p, m, v, backward=False)] * p,
                          [interleaved_order(p, m, v, backward=True)] * p))
        if v == 1 or m % p == 0:
            out.append(_one_f_one_b(p, m, v, "1f1b"))
    out.append(_gpipe(p, m, v).replace(layout=layout))
    if v == 1:
        # ZB-H1 and its relaxations: P2 lag r + e on rank r holds p + e micro-batches.
        top = m if limit is None else max(0, limit - p)
        for e in sorted({0, 1, 2, top // 2, top} & set(range(0, top + 1))):
            out.append(lagged_one_f_one_b(p, m, [min(r + e, m) for r in range(p)], "zb-lag"))
    limits = {limit} if limit is not None else {None}
    limits.add(p if limit is None else min(p, limit))
    if layout == "v":  # ZB-V's memory: p micro-batches of the whole rank, 2p chunks of half of it
        limits.add(v * p if limit is None else min(v * p, limit))
    for fwd, bwd in orders:
        for lim in sorted(limits, key=lambda x: (x is None, x)):
            for idle in (True, False):
                try:
                    out.append(list_schedule(stages=p, microbatches=m, chunks=v, costs=costs,
                                             fwd_order=fwd, bwd_order=bwd,
                                             limit=None if lim is None else [lim] * p,
                                             p2_when_idle=idle, layout=layout, name="greedy"))
                except RuntimeError:
                    continue  # leaving every P2 to the end cannot meet a tight limit
    return [_split_p2(s) for s in out
            if limit is None or max(_peak_held(a) for a in s.ranks) <= limit]


def _with_rank(sched: Schedule, r: int, acts) -> Schedule:
    """``sched`` with rank ``r``'s list replaced (carry cut to what the list still ends with)."""
    return _clamped(sched.replace(ranks=sched.ranks[:r] + (tuple(acts),) + sched.ranks[r + 1:]))


def _p2_moves(sched: Schedule, limit: int | None) -> Iterator[Schedule]:
    """Every schedule one step away: (with carry) one P2 more or less carried on a rank, then one
    single-micro-batch P2 moved to another legal slot on its rank within the memory limit."""
    if sched.carry:
        for r in range(1, sched.stages):
            for d in (1, -1):
                k = sched.carried(r) + d
                if 0 <= k <= trailing_p2(sched.ranks[r]):
                    yield sched.replace(carry=sched.carry[:r] + (k,) + sched.carry[r + 1:])
    for r, acts in enumerate(sched.ranks):
        acts = list(acts)
        for i, a in enumerate(acts):
            if a.kind != "P2":
                continue
            rest = acts[:i] + acts[i + 1:]
            first = next(j for j, x in enumerate(rest)
                         if x.kind == "P1" and x.mb == a.mb and x.chunk == a.chunk) + 1
            for j in range(first, len(rest) + 1):
                # Slots next to another P2 are equivalent to one already tried.
                if j == i or (j < len(rest) and rest[j].kind == "P2"):
                    continue
                trial = rest[:j] + [a] + rest[j:]
                if limit is None or _peak_held(trial) <= limit:
                    yield _with_rank(sched, r, trial)


def _b_cheaper(costs: Costs, stage: int) -> bool:
    """Whether a fused backward costs less than P1 + P2 on ``stage`` (a measured B)."""
    return costs.B is not None and costs.at("B", stage) < costs.at("P1", stage) + costs.at("P2", stage) - 1e-15


def _fusions(sched: Schedule, costs: Costs) -> Iterator[Schedule]:
    """Every schedule with one micro-batch's backward on one chunk fused back into ``B`` (its P1
    becomes B in place, its P2 goes), where B is cheaper. Fusing never raises what a rank holds
    (B frees its micro-batch at once)."""
    for r, acts in enumerate(sched.ranks):
        cheaper = {c for c in range(sched.chunks) if _b_cheaper(costs, sched.stage_of(r, c))}
        for i, a in enumerate(acts):
            if a.kind != "P1" or a.chunk not in cheaper:
                continue
            j = next((k for k, x in enumerate(acts) if x.kind == "P2" and x.chunk == a.chunk and x.mbs == a.mbs), None)
            if j is not None:  # None: its P2 is in a batch (never, after _split_p2)
                yield _with_rank(sched, r, [Action("B", a.mbs, a.chunk) if k == i else x
                                            for k, x in enumerate(acts) if k != j])


def _first_better(cands: Iterable[Schedule], span: float, budget: int,
                  score) -> tuple[tuple[Schedule, float] | None, int]:
    """The first of ``cands`` whose ``score`` is below ``span`` (and it), within ``budget``
    simulations; and the simulations spent."""
    evals = 0
    for cand in cands:
        if evals >= budget:
            return None, evals
        evals += 1
        t = score(cand)
        if t < span - 1e-12:
            return (cand, t), evals
    return None, evals


def _fused_everywhere(costs: Costs, num_stages: int) -> Costs:
    """``costs`` with P1 + P2 replaced by the cheaper of them and B on every stage (for the bound)."""
    p1 = [min(costs.at("P1", s), costs.at("B", s)) for s in range(num_stages)]
    p2 = [max(0.0, min(costs.at("P1", s) + costs.at("P2", s), costs.at("B", s)) - p1[s]) for s in range(num_stages)]
    return Costs(F=[costs.at("F", s) for s in range(num_stages)], P1=p1, P2=p2, B=None,
                 comm=[costs.at("comm", s) for s in range(num_stages)])


def auto_schedule(*, stages: int, microbatches: int, chunks: int = 1, costs: Costs,
                  memory_limit: int | None = None, max_evals: int = 3000,
                  overlap_steps: bool = False, layout: str = "loop") -> Schedule:
    """The ``auto`` placement (module docstring); ``schedule.meta`` holds ``makespan``,
    ``lower_bound``, ``gap`` and ``start`` (which candidate the search began from).

    ``layout``: ``"loop"`` or ``"v"`` chunk placement (:mod:`.actions`); the result has it.
    ``overlap_steps``: minimise the steady-state step time with carried P2 instead of
    the one-step makespan (see :mod:`.overlap`); the result has its ``carry`` set, and
    ``meta`` reports the ``period`` and its lower bound (the busiest rank's work)."""
    p, m, v = stages, microbatches, chunks
    cands = _candidates(p, m, v, costs, memory_limit, layout)
    fuse = any(_b_cheaper(costs, st) for st in range(p * v))
    if fuse:  # where B is cheaper than P1 + P2, each candidate with no backward split competes too
        cands += [fuse_backward(c).replace(name=f"{c.name}-fused") for c in cands]
    if not cands:
        raise ValueError(f"auto: no placement fits memory_limit={memory_limit} micro-batch chunks per rank; "
                         f"use memory_limit={v} or more (with {v} chunk(s) per rank, {v} always fits)")
    if overlap_steps:
        cands = [choose_carry(s, costs) for s in cands]
        lb = period_lower_bound(stages=p, chunks=v, microbatches=m, costs=costs, layout=layout)

        def score(s: Schedule) -> float:
            return period(s, costs)
        # each period simulates 5 steps: keep the search's wall time near the one-step search's
        max_evals = max(1, max_evals // 5)
    else:
        lb = lower_bound(stages=p, chunks=v, microbatches=m, costs=costs, layout=layout)

        def score(s: Schedule) -> float:
            return _makespan(s, costs)
    scored = sorted(((score(s), i, s) for i, s in enumerate(cands)), key=lambda x: (x[0], x[1]))
    best_t, _, best = scored[0]
    start_name = best.name
    evals = 0
    if fuse:  # the bound assumes a split backward; a fused one may go below it
        lb = min(lb, (period_lower_bound if overlap_steps else lower_bound)(
            stages=p, chunks=v, microbatches=m, costs=_fused_everywhere(costs, p * v), layout=layout))
    while best_t > lb * (1 + 1e-9) and evals < max_evals:  # at the bound nothing improves
        found, used = _first_better(_p2_moves(best, memory_limit), best_t, max_evals - evals, score)
        evals += used
        if found is None and fuse:
            found, used = _first_better(_fusions(best, costs), best_t, max_evals - evals, score)
            evals += used
        if found is None:
            break
        best, best_t = found
    key = "period" if overlap_steps else "makespan"
    meta = {key: best_t, "lower_bound": lb, "gap": best_t / lb - 1 if lb > 0 else 0.0,
            "start": start_name, "evals": evals, "objective": key}
    if overlap_steps:
        meta["makespan"] = _makespan(best, costs)
    return best.replace(name="auto", meta=meta)


def auto_report(schedule: Schedule) -> str:
    """One line: makespan, lower bound and the gap between them."""
    meta = schedule.meta
    if "lower_bound" not in meta:
        return f"{schedule.name}: no auto metadata"
    key = meta.get("objective", "makespan")
    return (f"auto: {'steady-state step' if key == 'period' else 'makespan'} {meta[key]:.4g}, "
            f"lower bound {meta['lower_bound']:.4g} "
            f"(within {meta['gap']:.1%} of optimal), started from {meta['start']}, "
            f"{meta['evals']} simulations")
