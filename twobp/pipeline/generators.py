"""Schedule generators: GPipe, 1F1B, interleaved 1F1B, ZB-H1 and ``auto``.

Every generator first builds the 2BP form (``P1`` then a ``P2`` somewhere later);
``twobp=False`` then fuses each ``P1`` with its weight gradient into ``B`` at the
``P1``'s place (:func:`fuse_backward`), so both forms share one F/backward order.

Notation: ``p`` ranks (``stages``), ``v`` chunks per rank, ``m`` micro-batches, rank
``r`` in ``0..p-1``.

* ``gpipe``: every F (chunk by chunk), then every P1 (chunks in reverse), then one
  batched P2 per chunk [GPipe, Huang et al. 2019; 2BP paper's GPipe variant].
* ``1f1b``: ``min(p-r-1, m)`` warm-up forwards, then F/P1 pairs, then the cool-down P1s.
  With 2BP the oldest pending P2 runs before each cool-down P1, in the wait for that P1's
  gradient, and what is left runs as one batched P2 at the end [PipeDream-Flush /
  Megatron; 2BP paper, whose cool-down runs pending P2 in these waits]. At p = 2, m = 4
  and T_F = T_P1 = T_P2 this reaches the analytic 1.154x over 1F1B.
* ``interleaved-1f1b``: Megatron's interleaved order over ``v`` chunks (needs
  ``m % p == 0``); warm-up ``min((p-r-1)*2 + (v-1)*p, m*v)``; 2BP as for 1F1B.
* ``zb-h1``: 1F1B's F/P1 order; rank r runs the P2 of micro-batch ``i - r`` right after
  the P1 of micro-batch i, and the last r P2s at the end. Each rank holds at most ``p``
  micro-batches from F until P2 (1F1B's peak activation memory, on rank 0). At
  T_F = T_P1 = T_P2 the makespan is ``3m + p - 1``: idle time per rank ``p - 1``, a third
  of 1F1B's ``3(p - 1)`` [Qi et al. 2023, ZB-H1].
* ``auto``: see :mod:`.auto`.
"""

from __future__ import annotations

import warnings
from typing import Mapping

from .actions import LAYOUTS, Action, Schedule
from .costs import Costs, as_costs
from .lowering import fuse_backward, merge_p2

__all__ = ["make_schedule", "SCHEDULE_NAMES", "interleaved_order", "split_memory_cap"]

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "auto")


def split_memory_cap(name: str, allowed: tuple[str, ...] = ("auto",)) -> tuple[str, int | None]:
    """``auto@6`` -> (``auto``, 6): a placement name and its memory cap (make_schedule's
    ``memory_limit``, micro-batch chunks held per rank from F to P2); a name without ``@`` ->
    (name, None). Raises ValueError naming the form when N is not an int >= 1 or the name
    before ``@`` is not one of ``allowed``."""
    if "@" not in name:
        return name, None
    base, _, n = name.partition("@")
    if base not in allowed or not n.isdigit() or int(n) < 1:
        forms = [f"{a}@N" for a in allowed]
        written = forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"
        raise ValueError(f"{name!r}: a memory cap is written {written} with N >= 1 micro-batch chunks held per "
                         f"rank from F to P2 (e.g. {allowed[-1]}@4); only auto places by memory")
    return base, int(n)


def _check_int(name: str, val, lo: int = 1) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < lo:
        raise ValueError(f"make_schedule: {name} must be an int >= {lo}, got {val!r}")
    return val


def make_schedule(name: str, *, stages: int, microbatches: int, twobp: bool, chunks: int = 1,
                  costs: Costs | Mapping | None = None, memory_limit: int | None = None,
                  overlap_steps: bool = False, layout: str = "loop", validate_result: bool = True) -> Schedule:
    """Build the schedule ``name`` for ``stages`` ranks and ``microbatches`` micro-batches.

    ``twobp``: split backward into P1/P2 (True) or fuse it into B (False).
    ``chunks``: model chunks per rank (interleaved-1f1b, gpipe and auto accept > 1).
    ``costs``: per-chunk times (:class:`Costs` or mapping) that ``auto`` places by
    (default unit costs); the fixed schedules do not depend on costs.
    ``memory_limit``: for ``auto``, the most micro-batch chunks a rank may hold from F
    until P2 (default unbounded); ``zb-h1`` always uses ``stages``.
    ``layout``: ``"loop"`` (Megatron's chunk placement) or ``"v"`` (ZB-V's: rank r runs stages
    r and 2p-1-r, see :mod:`.actions`); ``auto`` and ``gpipe`` accept ``"v"``.
    ``overlap_steps`` (2BP only): set each rank's ``carry``, the trailing P2 it runs at
    the start of the next step while it waits for its first input (see
    :mod:`.overlap`), to minimise the steady-state step time on ``costs``; ``auto`` then
    also places its P2 for that objective. Run it with
    ``PipelineExecutor(..., overlap_steps=True)``.

    Too few micro-batches: an error where the schedule cannot be built (interleaved
    needs a multiple of ``stages``), a ``UserWarning`` where it only costs a bubble
    (``microbatches < stages``).
    """
    if name not in SCHEDULE_NAMES:
        if "@" in name and name.partition("@")[0] in SCHEDULE_NAMES:
            raise ValueError(f"unknown schedule {name!r}: make_schedule takes the cap as memory_limit= "
                             f"(twobp simulate: --memory-limit {name.partition('@')[2] or 'N'}); "
                             f"choose one of {', '.join(SCHEDULE_NAMES)}")
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if not isinstance(twobp, bool):
        raise ValueError(f"make_schedule: twobp must be True or False, got {twobp!r}")
    p = _check_int("stages", stages)
    m = _check_int("microbatches", microbatches)
    v = _check_int("chunks", chunks)
    if memory_limit is not None:
        _check_int("memory_limit", memory_limit)
    if name in ("zb-h1", "auto") and not twobp:
        raise ValueError(f"{name} places the P2 (weight-gradient) actions, so it needs twobp=True "
                         f"(on the command line: {name}-2bp, or drop --no-2bp); for a fused backward "
                         "use 1f1b, gpipe or interleaved-1f1b")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "v" and name not in ("auto", "gpipe"):
        raise ValueError(f"{name} places chunks in the looped layout; the V layout is built by 'auto' "
                         "(or 'gpipe'): use make_schedule('auto', ..., layout='v')")
    if layout == "v" and v < 2:
        raise ValueError("layout='v' needs chunks >= 2 (with one chunk per rank it is the looped layout); "
                         "pass chunks=2")
    if v > 1 and name in ("1f1b", "zb-h1"):
        raise ValueError(f"{name} runs one chunk per rank (chunks={v}); use "
                         f"'interleaved-1f1b' or 'auto' for chunks > 1")
    if m < p:
        warnings.warn(
            f"{name}: microbatches={m} < stages={p}: ranks sit idle for at least "
            f"{p - m} slots of the fill and drain; use microbatches >= {p} (ideally "
            f">= {2 * p}) to keep the bubble small", UserWarning, stacklevel=2)
    costs = as_costs(costs)
    costs.check_stages(p * v)
    if name == "gpipe":
        sched = _gpipe(p, m, v).replace(layout=layout)
    elif name == "1f1b":
        sched = _one_f_one_b(p, m, 1, "1f1b")
    elif name == "interleaved-1f1b":
        if v > 1 and m % p:
            raise ValueError(
                f"interleaved-1f1b needs microbatches to be a multiple of stages "
                f"(microbatches={m}, stages={p}); use microbatches={(m // p + 1) * p}")
        sched = _one_f_one_b(p, m, v, "interleaved-1f1b")
    elif name == "zb-h1":
        sched = _zb_h1(p, m)
    else:
        from .auto import auto_schedule
        sched = auto_schedule(stages=p, microbatches=m, chunks=v, costs=costs,
                              memory_limit=memory_limit, overlap_steps=overlap_steps and twobp, layout=layout)
    sched = merge_p2(sched)
    if not twobp:
        sched = fuse_backward(sched).replace(carry=())
    elif overlap_steps and name != "auto":
        from .overlap import choose_carry
        sched = choose_carry(sched, costs)
    sched = sched.replace(name=f"{name}{'-2bp' if twobp else ''}")
    if validate_result:
        from .validate import validate
        validate(sched)
    return sched


def _gpipe(p: int, m: int, v: int) -> Schedule:
    ranks = []
    for _ in range(p):
        acts = [Action("F", (mb,), c) for c in range(v) for mb in range(m)]
        acts += [Action("P1", (mb,), c) for c in reversed(range(v)) for mb in range(m)]
        acts += [Action("P2", tuple(range(m)), c) for c in reversed(range(v))]
        ranks.append(tuple(acts))
    return Schedule(ranks=tuple(ranks), stages=p, chunks=v, microbatches=m, name="gpipe")


def interleaved_order(p: int, m: int, v: int, backward: bool) -> list[tuple[int, int]]:
    """Megatron's (mb, chunk) order for one rank: groups of ``p`` micro-batches sweep the
    chunks (forward 0..v-1, backward v-1..0). With ``v = 1`` it is plain mb order."""
    if v == 1:
        return [(mb, 0) for mb in range(m)]
    out = []
    for k in range(m * v):
        in_group = k % (p * v)
        c = in_group // p
        if backward:
            c = v - 1 - c
        out.append(((k // (p * v)) * p + k % p, c))
    return out


def _one_f_one_b(p: int, m: int, v: int, name: str) -> Schedule:
    total = m * v
    fwd = interleaved_order(p, m, v, backward=False)
    bwd = interleaved_order(p, m, v, backward=True)
    ranks = []
    for r in range(p):
        if v == 1:
            warm = min(p - r - 1, m)
        elif m == p:
            warm = total
        else:
            warm = min((p - r - 1) * 2 + (v - 1) * p, total)
        acts = [Action("F", (mb,), c) for mb, c in fwd[:warm]]
        for i in range(total - warm):
            acts.append(Action("F", fwd[warm + i][:1], fwd[warm + i][1]))
            acts.append(Action("P1", bwd[i][:1], bwd[i][1]))
        pending = [bwd[i] for i in range(total - warm)]
        for i in range(total - warm, total):
            # Cool-down: before each P1 the rank waits for its gradient from the next rank;
            # the oldest pending P2 fills that wait.
            if pending:
                mb, c = pending.pop(0)
                acts.append(Action("P2", (mb,), c))
            acts.append(Action("P1", bwd[i][:1], bwd[i][1]))
            pending.append(bwd[i])
        for c in sorted({c for _, c in pending}, key=lambda c: [x[1] for x in pending].index(c)):
            acts.append(Action("P2", tuple(sorted(mb for mb, cc in pending if cc == c)), c))
        ranks.append(tuple(acts))
    return Schedule(ranks=tuple(ranks), stages=p, chunks=v, microbatches=m, name=name)


def lagged_one_f_one_b(p: int, m: int, lags: list[int], name: str = "zb-h1") -> Schedule:
    """1F1B's F/P1 order; rank r runs ``P2`` of micro-batch ``i - lags[r]`` right after
    ``P1`` of micro-batch i, and the P2s still pending at the end one after another.

    Rank r then holds at most ``(p - r) + lags[r]`` micro-batches (F until P2).
    """
    ranks = []
    for r in range(p):
        warm = min(p - r - 1, m)
        acts = [Action("F", (mb,), 0) for mb in range(warm)]
        pending: list[int] = []
        for i in range(m):
            if warm + i < m:
                acts.append(Action("F", (warm + i,), 0))
            acts.append(Action("P1", (i,), 0))
            pending.append(i)
            if i - lags[r] >= 0:
                pending.remove(i - lags[r])
                acts.append(Action("P2", (i - lags[r],), 0))
        acts += [Action("P2", (mb,), 0) for mb in pending]
        ranks.append(tuple(acts))
    return Schedule(ranks=tuple(ranks), stages=p, chunks=1, microbatches=m, name=name)


def _zb_h1(p: int, m: int) -> Schedule:
    # Lag r on rank r: the last rank defers the most, which is what lets the gradient
    # front run ahead at the end; each rank holds exactly p micro-batches at its peak.
    return lagged_one_f_one_b(p, m, [r for r in range(p)])
