"""Simulate a schedule on a cost model: makespan, bubble, throughput, held activations.

Model (the same the executor follows): each rank runs its actions in order; a compute
action takes its cost (a batched ``P2`` over k micro-batches takes ``k * P2``); a send
costs the sender nothing and the data arrives ``comm`` later; a receive waits for it.

Figures, for ``p`` ranks, makespan ``T`` and busy time ``busy_r`` of rank r:

* ``bubble_fraction = sum_r (T - busy_r) / (p * T)``, the idle share of all ranks' time;
  for 1F1B with ``comm = 0`` it is exactly ``(p-1) / (m+p-1)`` for any F and B;
* ``throughput = m / T`` micro-batches per time unit (``T`` the steady-state ``period``
  when ranks carry P2 into the next step);
* held activations per rank: a micro-batch's chunk holds ``activation`` bytes from the
  start of its F to the end of its P1/B, then ``p2`` bytes until its P2 ends. Without
  sizes the count of (micro-batch, chunk) pairs between F and the end of their backward
  (P2 for split ones) is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .actions import Action, Schedule
from .costs import Costs, MemorySizes, as_costs
from .lowering import lower_comm
from .timeline import Event, Timeline
from .validate import validate
from .walk import Walk, walk

__all__ = ["SimResult", "simulate", "makespan_of"]


@dataclass
class SimResult:
    """What :func:`simulate` found."""

    schedule: Schedule
    makespan: float
    """End of the last action on any rank (or of its last data-parallel all-reduce)."""
    busy: list[float]
    """Compute time per rank."""
    idle: list[float]
    """``makespan - busy`` per rank."""
    bubble_fraction: float
    """Idle share of all ranks' time."""
    throughput: float
    """Micro-batches per time unit, ``m / makespan``."""
    peak_held: list[int]
    """Per rank, the most (micro-batch, chunk) pairs holding activations at once."""
    peak_bytes: list[float] | None
    """Per rank, the peak of held bytes (when ``sizes`` were given)."""
    timeline: Timeline
    period: float = 0.0
    """Steady-state time per step: the makespan, or less when ranks carry P2 into the next
    step (``schedule.carry``; see :mod:`.overlap`)."""

    def summary(self) -> str:
        carry = f", steady-state step {self.period:.4g} (carry {list(self.schedule.carry)})" \
            if self.schedule.carry else ""
        return (f"{self.schedule.name}: makespan {self.makespan:.4g}{carry}, bubble "
                f"{self.bubble_fraction:.1%}, throughput {self.throughput:.4g}/unit, "
                f"peak held {max(self.peak_held)}")


def _timings(schedule: Schedule, costs: Costs):
    def duration(rank: int, a: Action) -> float:
        s = schedule.stage_of(rank, a.chunk)
        return costs.at(a.kind, s) * len(a.mbs)

    def latency(rank: int, a: Action) -> float:
        s = schedule.stage_of(rank, a.chunk)
        return costs.at("comm", s if a.kind == "SF" else s - 1)

    return duration, latency


def _walk(schedule: Schedule, costs: Costs, start_at=None) -> tuple[Schedule, Walk]:
    lowered = lower_comm(schedule)
    duration, latency = _timings(lowered, costs)
    return lowered, walk(lowered, duration, latency, start_at)


def _allreduce_ends(lowered: Schedule, w: Walk, costs: Costs) -> list[float]:
    """Per rank, when its last data-parallel all-reduce ends (``Costs.allreduce``): each
    chunk's starts once its last B / P1 / P2 has ended, on one stream per rank."""
    ends = []
    for r, acts in enumerate(lowered.ranks):
        final: dict[int, float] = {}
        for a, t1 in zip(acts, w.end[r]):
            if a.kind in ("B", "P1", "P2"):
                final[a.chunk] = max(final.get(a.chunk, 0.0), t1)
        t = 0.0
        for c, ready in sorted(final.items(), key=lambda kv: kv[1]):
            cost = costs.at("allreduce", lowered.stage_of(r, c))
            if cost:
                t = max(t, ready) + cost
        ends.append(t)
    return ends


def makespan_of(schedule: Schedule, costs: Costs | Mapping | None = None, *,
                start_at: Sequence[float] | None = None) -> float:
    """Makespan only, without validation (for search loops on already valid schedules).
    ``start_at[r]``: when rank r is free to start (default 0)."""
    costs = as_costs(costs)
    _, w = _walk(schedule, costs, start_at)
    return max((max(e, default=0.0) for e in w.end), default=0.0)


def simulate(schedule: Schedule, costs: Costs | Mapping | None = None, *,
             sizes: MemorySizes | Mapping | None = None, check: bool = True) -> SimResult:
    """Run ``schedule`` on ``costs`` (default: F = P1 = P2 = 1, comm = 0).

    ``check`` validates first (raises :class:`ScheduleError` on a bad schedule).
    """
    costs = as_costs(costs)
    costs.check_stages(schedule.num_stages)
    if isinstance(sizes, Mapping):
        sizes = MemorySizes(**sizes)
    if check:
        validate(schedule)
    lowered, w = _walk(schedule, costs)
    p = schedule.stages
    tl = Timeline(ranks=p, title=schedule.name)
    busy = [0.0] * p
    peak_held = [0] * p
    peak_bytes = [0.0] * p if sizes is not None else None
    for r, acts in enumerate(lowered.ranks):
        held: dict[tuple[int, int], str] = {}  # (mb, chunk) -> "act" | "p2"
        nbytes = 0.0
        for a, t0, t1 in zip(acts, w.start[r], w.end[r]):
            if a.is_comm:
                continue
            tl.events.append(Event(r, str(a), a.kind, t0, t1))
            busy[r] += t1 - t0
            st = schedule.stage_of(r, a.chunk)
            if a.kind == "F":
                held[(a.mb, a.chunk)] = "act"
                if sizes is not None:
                    nbytes += sizes.at("activation", st)
            # Peaks are taken while the action runs, before what it frees is released.
            peak_held[r] = max(peak_held[r], len(held))
            if peak_bytes is not None:
                peak_bytes[r] = max(peak_bytes[r], nbytes)
            if a.kind in ("B", "P1"):
                if sizes is not None:
                    nbytes -= sizes.at("activation", st)
                if a.kind == "B":
                    del held[(a.mb, a.chunk)]
                else:
                    held[(a.mb, a.chunk)] = "p2"
                    if sizes is not None:
                        nbytes += sizes.at("p2", st)
            elif a.kind == "P2":
                for mb in a.mbs:
                    del held[(mb, a.chunk)]
                    if sizes is not None:
                        nbytes -= sizes.at("p2", st)
    span = max((max(e, default=0.0) for e in w.end), default=0.0)
    span = max(span, max(_allreduce_ends(lowered, w, costs), default=0.0))
    idle = [span - b for b in busy]
    if schedule.carry:
        from .overlap import period
        step = period(schedule, costs)
    else:
        step = span
    return SimResult(
        schedule=schedule, makespan=span, busy=busy, idle=idle,
        bubble_fraction=(sum(idle) / (p * span)) if span > 0 else 0.0,
        throughput=schedule.microbatches / step if step > 0 else float("inf"),
        peak_held=peak_held, peak_bytes=peak_bytes, timeline=tl, period=step)
