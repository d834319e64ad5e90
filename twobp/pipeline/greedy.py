"""Greedy list scheduling on a cost model: one of ``auto``'s starting candidates.

Time advances event by event. Whenever a rank is free, it picks among the actions it
could start *now* (inputs arrived), by a fixed priority:

1. ``P1`` of the oldest micro-batch whose output gradient has arrived (critical path);
2. ``F`` of the next micro-batch, if its input has arrived and the rank holds fewer than
   ``limit`` micro-batches (a micro-batch is held from its F until its P2);
3. ``P2`` of the oldest pending micro-batch, to fill what would be idle time.

If nothing can start, the rank waits for the next arrival. A rank's forwards and P1s
keep a fixed order (``order``, e.g. plain or interleaved micro-batch order), so only the
interleaving of F, P1 and P2 is chosen. Processing ranks in order of their free time
makes the set of actions ready at time t exact: anything not yet placed elsewhere ends
after t.

The resulting per-rank order is a valid schedule for any costs (the timed run is a
witness that its dependency graph is acyclic); only its quality depends on the costs.
"""

from __future__ import annotations


from .actions import Action, Schedule
from .costs import Costs

__all__ = ["list_schedule"]


def list_schedule(*, stages: int, microbatches: int, chunks: int, costs: Costs,
                  fwd_order: list[list[tuple[int, int]]], bwd_order: list[list[tuple[int, int]]],
                  limit: list[int] | None = None, ahead: list[int] | None = None,
                  p2_when_idle: bool = True, name: str = "greedy") -> Schedule:
    """Greedy placement (see the module docstring).

    ``fwd_order[r]`` / ``bwd_order[r]``: rank r's (mb, chunk) sequence for F and for P1.
    ``limit[r]``: most micro-batch chunks rank r may hold (F done, P2 not yet); None
    means unbounded. ``p2_when_idle=False`` leaves every P2 to the end.
    """
    p, v = stages, chunks
    S = p * v
    inf = float("inf")
    limit = limit or [inf] * p
    ahead = ahead or [inf] * p
    free = [0.0] * p   # when rank r next decides
    busy = [0.0] * p   # when rank r's last action ends
    fi, bi, held = [0] * p, [0] * p, [0] * p
    pending: list[list[tuple[int, int]]] = [[] for _ in range(p)]  # (mb, chunk) awaiting P2
    act_at: dict[tuple[int, int], float] = {}   # (mb, stage): input activation arrives
    grad_at: dict[tuple[int, int], float] = {}  # (mb, stage): output gradient arrives
    fdone: dict[tuple[int, int], float] = {}    # (mb, stage): forward ends
    out: list[list[Action]] = [[] for _ in range(p)]

    def fb_left(r: int) -> bool:
        return fi[r] < len(fwd_order[r]) or bi[r] < len(bwd_order[r])

    def p1_ready(r: int) -> float | None:
        if bi[r] >= len(bwd_order[r]):
            return None
        mb, c = bwd_order[r][bi[r]]
        s = c * p + r
        f = fdone.get((mb, s))
        g = grad_at.get((mb, s)) if s < S - 1 else 0.0
        return None if f is None or g is None else max(f, g)

    def f_ready(r: int) -> float | None:
        if fi[r] >= len(fwd_order[r]) or held[r] >= limit[r] or fi[r] - bi[r] >= ahead[r]:
            return None
        mb, c = fwd_order[r][fi[r]]
        s = c * p + r
        return 0.0 if s == 0 else act_at.get((mb, s))

    def deliver(q: int, when: float) -> None:
        free[q] = min(free[q], max(when, busy[q]))

    while True:
        live = [r for r in range(p) if fb_left(r) or pending[r]]
        if not live:
            break
        r = min(live, key=lambda q: (free[q], q))
        t = free[r]
        if t == inf:
            raise RuntimeError(
                "greedy placement stalled: every rank waits for data no one will send "
                f"(orders or limits are inconsistent); placed so far: {[len(o) for o in out]}")
        choice = None
        ready = p1_ready(r)
        if ready is not None and ready <= t:
            choice = ("P1",) + bwd_order[r][bi[r]]
        if choice is None:
            ready = f_ready(r)
            if ready is not None and ready <= t:
                choice = ("F",) + fwd_order[r][fi[r]]
        if choice is None and pending[r] and (p2_when_idle or not fb_left(r)):
            choice = ("P2",) + pending[r][0]
        if choice is None:
            later = [x for x in (p1_ready(r), f_ready(r)) if x is not None and x > t]
            free[r] = min(later) if later else inf
            continue
        kind, mb, c = choice
        s = c * p + r
        end = t + costs.at(kind, s)
        out[r].append(Action(kind, (mb,), c))
        free[r] = busy[r] = end
        if kind == "F":
            fi[r] += 1
            held[r] += 1
            fdone[(mb, s)] = end
            if s < S - 1:
                q = (s + 1) % p
                act_at[(mb, s + 1)] = end + costs.at("comm", s)
                deliver(q, act_at[(mb, s + 1)])
        elif kind == "P1":
            bi[r] += 1
            pending[r].append((mb, c))
            if s > 0:
                q = (s - 1) % p
                grad_at[(mb, s - 1)] = end + costs.at("comm", s - 1)
                deliver(q, grad_at[(mb, s - 1)])
        else:
            pending[r].pop(0)
            held[r] -= 1
    return Schedule(ranks=tuple(tuple(a) for a in out), stages=p, chunks=v,
                    microbatches=microbatches, name=name)
