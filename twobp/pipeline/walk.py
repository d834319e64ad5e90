"""Run an explicit schedule through its dependency graph, with or without durations.

Each rank executes its list in order. Sends never block (the executor posts them
asynchronously); a receive blocks until its send has run, plus the communication
latency; a compute action needs its inputs to exist on the rank already (made by an
earlier action there, or delivered by an earlier receive). The validator uses this
walk to find deadlocks, the simulator to get start and end times: because every
action is only placed once everything it depends on is placed, the times are exact
longest paths whatever order the ranks are visited in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .actions import Action, Schedule
from .lowering import comm_peer, message_key

__all__ = ["Walk", "Deadlock", "walk", "needs", "makes"]

Token = tuple[str, int, int]


def needs(schedule: Schedule, rank: int, a: Action) -> list[Token]:
    """What a compute or send action requires on its own rank before it can start."""
    s = schedule.stage_of(rank, a.chunk)
    if a.kind == "F":
        return [("act", a.mb, s - 1)] if s > 0 else []
    if a.kind in ("P1", "B"):
        out = [("F", a.mb, s)]
        if s < schedule.num_stages - 1:
            out.append(("grad", a.mb, s + 1))
        return out
    if a.kind == "P2":
        return [("P1", mb, s) for mb in a.mbs]
    if a.kind == "SF":
        return [("act", a.mb, s)]
    if a.kind == "SB":
        return [("grad", a.mb, s)]
    return []


def makes(schedule: Schedule, rank: int, a: Action) -> list[Token]:
    """What an action makes available on its own rank once it ends."""
    s = schedule.stage_of(rank, a.chunk)
    if a.kind == "F":
        return [("F", a.mb, s), ("act", a.mb, s)]
    if a.kind == "P1":
        return [("P1", a.mb, s), ("grad", a.mb, s)]
    if a.kind == "B":
        return [("grad", a.mb, s)]
    if a.kind in ("RF", "RB"):
        return [message_key(schedule, rank, a)]
    return []


@dataclass
class Walk:
    """Start and end time of every action, ``start[r][i]`` for ``schedule.ranks[r][i]``."""

    schedule: Schedule
    start: list[list[float]]
    end: list[list[float]]


class Deadlock(Exception):
    """The walk stopped with work left; ``blocked`` holds (rank, index, reason) per rank."""

    def __init__(self, schedule: Schedule, blocked: list[tuple[int, int, str]]):
        self.schedule = schedule
        self.blocked = blocked
        lines = [f"rank {r} stuck at {schedule.ranks[r][i]} (position {i}): {why}"
                 for r, i, why in blocked]
        super().__init__("\n".join(lines))


def walk(schedule: Schedule, duration: Callable[[int, Action], float] | None = None,
         latency: Callable[[int, Action], float] | None = None,
         start_at: Sequence[float] | None = None) -> Walk:
    """Place every action of an explicit ``schedule`` in time.

    ``duration(rank, action)`` gives compute times (default 1 for compute actions);
    communication actions take no time of their own. ``latency(rank, send)`` is the delay
    from a send to its data arriving (default 0). ``start_at[r]``: when rank r is free to
    start (default 0 for all; e.g. busy with work carried from the previous step).
    Raises :class:`Deadlock`.
    """
    p = schedule.stages
    acts = schedule.ranks
    pos = [0] * p
    clock = [float(t) for t in start_at] if start_at is not None else [0.0] * p
    if len(clock) != p:
        raise ValueError(f"walk: start_at has {len(clock)} entries for {p} ranks")
    start = [[0.0] * len(a) for a in acts]
    end = [[0.0] * len(a) for a in acts]
    have: list[set[Token]] = [set() for _ in range(p)]
    arrived: dict[tuple[int, Token], float] = {}  # (receiving rank, message) -> time
    pending = list(range(p))
    while pending:
        woke: set[int] = set()
        for r in pending:
            while pos[r] < len(acts[r]):
                a = acts[r][pos[r]]
                i = pos[r]
                if a.kind in ("RF", "RB"):
                    key = (r, message_key(schedule, r, a))
                    if key not in arrived:
                        break
                    start[r][i] = clock[r]
                    clock[r] = max(clock[r], arrived[key])
                    end[r][i] = clock[r]
                else:
                    if any(t not in have[r] for t in needs(schedule, r, a)):
                        break
                    start[r][i] = clock[r]
                    if a.kind in ("SF", "SB"):
                        peer = comm_peer(schedule, r, a)
                        lat = latency(r, a) if latency is not None else 0.0
                        arrived[(peer, message_key(schedule, r, a))] = clock[r] + lat
                        woke.add(peer)
                    else:
                        clock[r] += duration(r, a) if duration is not None else 1.0
                    end[r][i] = clock[r]
                have[r].update(makes(schedule, r, a))
                pos[r] += 1
        pending = sorted(r for r in woke if pos[r] < len(acts[r]))
    blocked = []
    for r in range(p):
        if pos[r] < len(acts[r]):
            blocked.append((r, pos[r], _why(schedule, r, acts[r][pos[r]], have[r], pos)))
    if blocked:
        raise Deadlock(schedule, blocked)
    return Walk(schedule, start, end)


def _why(schedule: Schedule, r: int, a: Action, have: set[Token], pos: list[int]) -> str:
    if a.kind in ("RF", "RB"):
        peer = comm_peer(schedule, r, a)
        what = "activation" if a.kind == "RF" else "gradient"
        send = Action("SF" if a.kind == "RF" else "SB", a.mbs,
                      schedule.place(message_key(schedule, r, a)[2])[1])
        at = (f"rank {peer} is stuck at {schedule.ranks[peer][pos[peer]]}"
              if pos[peer] < len(schedule.ranks[peer]) else f"rank {peer} has finished")
        return f"waits for the {what} of micro-batch {a.mb} ({send} on rank {peer}); {at}"
    missing = [t for t in needs(schedule, r, a) if t not in have]
    names = {"act": "the input activation", "grad": "the output gradient",
             "F": "its forward", "P1": "its P1"}
    parts = [f"{names[t[0]]} of micro-batch {t[1]} (stage {t[2]})" for t in missing]
    return "needs " + ", ".join(parts) + ", which no earlier action on this rank provides"
