"""Greedy list scheduling on a cost model: one of ``auto``'s starting candidates.

Time advances event by event. Whenever a rank is free, it picks among the actions it
could start *now* (inputs arrived), by a fixed priority:

1. ``P1`` of the oldest micro-batch whose output gradient has arrived (critical path);
2. ``F`` of the next micro-batch, if its input has arrived and the rank holds fewer than
   ``limit`` micro-batches (a micro-batch is held from its F until its P2);
3. ``P2`` of the oldest pending micro-batch, to fill what would be idle time.

If nothing can start, the rank waits for the next arrival. A rank's forwards and P1s
keep a fixed order (``fwd_order``/``bwd_order``, e.g. plain or interleaved micro-batch
order), so only the interleaving of F, P1 and P2 is chosen. Without a fixed order
(``None``) the rank takes, among its chunks, the ready F or P1 of the *deepest* stage
(each chunk in micro-batch order): a micro-batch already in flight is pushed on towards
the loss, and a gradient on towards stage 0, before new work starts. That is the order
the V layout needs (rank 0 holds the first and the last stage, so no fixed sweep of the
chunks fits it); the memory ``limit`` then gates only forwards of the rank's first
chunk, the ones that let a new micro-batch in, reserving room for that micro-batch's
forwards on the rank's other chunks, so the deeper work that frees memory is never
blocked by it and the limit holds. Processing ranks in order of their free time
makes the set of actions ready at time t exact: anything not yet placed elsewhere ends
after t.

The resulting per-rank order is a valid schedule for any costs (the timed run is a
witness that its dependency graph is acyclic); only its quality depends on the costs.
"""

from __future__ import annotations


from .actions import Action, Schedule, place, stage_of
from .costs import Costs

__all__ = ["list_schedule"]


def list_schedule(*, stages: int, microbatches: int, chunks: int, costs: Costs,
                  fwd_order: list[list[tuple[int, int]]] | None,
                  bwd_order: list[list[tuple[int, int]]] | None,
                  limit: list[int] | None = None, ahead: list[int] | None = None,
                  p2_when_idle: bool = True, layout: str = "loop", name: str = "greedy") -> Schedule:
    """Greedy placement (see the module docstring).

    ``fwd_order[r]`` / ``bwd_order[r]``: rank r's (mb, chunk) sequence for F and for P1, or
    ``None`` for the deepest-ready-stage order. ``limit[r]``: most micro-batch chunks rank r
    may hold (F done, P2 not yet); None means unbounded. ``p2_when_idle=False`` leaves every
    P2 to the end. ``layout``: chunk placement (:data:`~.actions.LAYOUTS`); a hand-off between
    two stages of one rank costs no communication.
    """
    p, v, m = stages, chunks, microbatches
    S = p * v
    inf = float("inf")
    dynamic = fwd_order is None
    if dynamic != (bwd_order is None):
        raise ValueError("list_schedule: give both fwd_order and bwd_order, or neither")
    limit = limit or [inf] * p
    ahead = ahead or [inf] * p
    free = [0.0] * p   # when rank r next decides
    busy = [0.0] * p   # when rank r's last action ends
    held = [0] * p
    # Fixed order: index into the rank's list. Dynamic: next micro-batch per chunk.
    fi, bi = [0] * p, [0] * p
    fnext = [[0] * v for _ in range(p)]
    bnext = [[0] * v for _ in range(p)]
    pending: list[list[tuple[int, int]]] = [[] for _ in range(p)]  # (mb, chunk) awaiting P2
    act_at: dict[tuple[int, int], float] = {}   # (mb, stage): input activation arrives
    grad_at: dict[tuple[int, int], float] = {}  # (mb, stage): output gradient arrives
    fdone: dict[tuple[int, int], float] = {}    # (mb, stage): forward ends
    out: list[list[Action]] = [[] for _ in range(p)]

    def st(r: int, c: int) -> int:
        return stage_of(r, c, p, layout)

    def fb_left(r: int) -> bool:
        if dynamic:
            return any(fnext[r][c] < m or bnext[r][c] < m for c in range(v))
        return fi[r] < len(fwd_order[r]) or bi[r] < len(bwd_order[r])

    def p1_time(r: int, mb: int, c: int) -> float | None:
        s = st(r, c)
        f = fdone.get((mb, s))
        g = grad_at.get((mb, s)) if s < S - 1 else 0.0
        return None if f is None or g is None else max(f, g)

    def f_time(r: int, mb: int, c: int) -> float | None:
        s = st(r, c)
        return 0.0 if s == 0 else act_at.get((mb, s))

    def p1_next(r: int) -> list[tuple[int, int]]:
        """Candidate P1s (mb, chunk), most urgent first."""
        if dynamic:
            cs = sorted((c for c in range(v) if bnext[r][c] < m), key=lambda c: -st(r, c))
            return [(bnext[r][c], c) for c in cs]
        return [bwd_order[r][bi[r]]] if bi[r] < len(bwd_order[r]) else []

    def f_next(r: int) -> list[tuple[int, int]]:
        if dynamic:
            first = min(range(v), key=lambda c: st(r, c))
            # A micro-batch let in will run a forward on each of the rank's chunks: reserve
            # them all, so the deeper forwards that lead to its P1 never break the limit.
            owed = fnext[r][first] * (v - 1) - sum(fnext[r][c] for c in range(v) if c != first)
            admit = held[r] + owed + v <= limit[r] and fnext[r][first] - bnext[r][first] < ahead[r]
            cs = sorted((c for c in range(v) if fnext[r][c] < m and (c != first or admit)),
                        key=lambda c: -st(r, c))
            return [(fnext[r][c], c) for c in cs]
        if fi[r] >= len(fwd_order[r]) or held[r] >= limit[r] or fi[r] - bi[r] >= ahead[r]:
            return []
        return [fwd_order[r][fi[r]]]

    def ready_now(r: int, t: float, cands, when) -> tuple[int, int] | None:
        for mb, c in cands:
            x = when(r, mb, c)
            if x is not None and x <= t:
                return mb, c
        return None

    def deliver(q: int, when: float) -> None:
        free[q] = min(free[q], max(when, busy[q]))

    def send(s_from: int, s_to: int, mb: int, end: float, table: dict) -> None:
        q = place(s_to, p, layout)[0]
        same = q == place(s_from, p, layout)[0]
        table[(mb, s_to)] = end + (0.0 if same else costs.at("comm", min(s_from, s_to)))
        deliver(q, table[(mb, s_to)])

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
        got = ready_now(r, t, p1_next(r), p1_time)
        if got is not None:
            choice = ("P1",) + got
        if choice is None:
            got = ready_now(r, t, f_next(r), f_time)
            if got is not None:
                choice = ("F",) + got
        if choice is None and pending[r] and (p2_when_idle or not fb_left(r)):
            choice = ("P2",) + pending[r][0]
        if choice is None:
            later = [x for x in [p1_time(r, mb, c) for mb, c in p1_next(r)]
                     + [f_time(r, mb, c) for mb, c in f_next(r)] if x is not None and x > t]
            free[r] = min(later) if later else inf
            continue
        kind, mb, c = choice
        s = st(r, c)
        end = t + costs.at(kind, s)
        out[r].append(Action(kind, (mb,), c))
        free[r] = busy[r] = end
        if kind == "F":
            if dynamic:
                fnext[r][c] += 1
            else:
                fi[r] += 1
            held[r] += 1
            fdone[(mb, s)] = end
            if s < S - 1:
                send(s, s + 1, mb, end, act_at)
        elif kind == "P1":
            if dynamic:
                bnext[r][c] += 1
            else:
                bi[r] += 1
            pending[r].append((mb, c))
            if s > 0:
                send(s, s - 1, mb, end, grad_at)
        else:
            pending[r].pop(0)
            held[r] -= 1
    return Schedule(ranks=tuple(tuple(a) for a in out), stages=p, chunks=v,
                    microbatches=microbatches, layout=layout, name=name)
