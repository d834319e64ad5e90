"""Pure passes from schedule to schedule, and the data dependencies they rest on.

* :func:`lower_comm`: implicit form -> explicit form (sends right after their producer,
  receives right before their consumer).
* :func:`fuse_backward`: every ``P1`` becomes ``B`` and the ``P2`` actions go (2BP off).
* :func:`merge_p2`: adjacent ``P2`` actions of one chunk become one batched ``P2``.
* :func:`receive_in_send_order`: explicit form whose every rank takes a peer's messages in
  the order the peer sends them (what NCCL, which ignores tags, needs).

Data dependencies (virtual stage ``s``, ``S`` stages, see :mod:`.actions`):

* ``F(mb, s)`` needs the output of ``F(mb, s-1)`` (for ``s > 0``);
* ``P1/B(mb, s)`` needs ``F(mb, s)`` and, for ``s < S-1``, the input gradient made by
  ``P1/B(mb, s+1)``; the last stage computes the loss inside its ``F``;
* ``P2(mb, s)`` needs ``P1(mb, s)``.
"""

from __future__ import annotations

from .actions import Action, Schedule

__all__ = ["lower_comm", "fuse_backward", "merge_p2", "receive_in_send_order", "comm_peer", "message_key"]


def comm_peer(schedule: Schedule, rank: int, action: Action) -> int:
    """The rank a communication action talks to."""
    s = schedule.stage_of(rank, action.chunk)
    other = s + 1 if action.kind in ("SF", "RB") else s - 1
    return schedule.place(other)[0]


def message_key(schedule: Schedule, rank: int, action: Action) -> tuple[str, int, int]:
    """``(what, mb, producing stage)``: equal for a send and the receive that matches it."""
    s = schedule.stage_of(rank, action.chunk)
    return {
        "SF": ("act", action.mb, s),
        "RF": ("act", action.mb, s - 1),
        "SB": ("grad", action.mb, s),
        "RB": ("grad", action.mb, s + 1),
    }[action.kind]


def lower_comm(schedule: Schedule) -> Schedule:
    """Write the communication out: ``RF`` before an F whose input lives on another rank,
    ``SF`` after an F whose consumer does, and ``RB``/``SB`` likewise around P1 and B.

    A schedule that already has communication actions is returned unchanged.
    """
    if schedule.is_explicit:
        return schedule
    last = schedule.num_stages - 1
    out = []
    for r, acts in enumerate(schedule.ranks):
        lowered: list[Action] = []
        for a in acts:
            s = schedule.stage_of(r, a.chunk)
            if a.kind == "F":
                if s > 0 and schedule.place(s - 1)[0] != r:
                    lowered.append(Action("RF", a.mbs, a.chunk))
                lowered.append(a)
                if s < last and schedule.place(s + 1)[0] != r:
                    lowered.append(Action("SF", a.mbs, a.chunk))
            elif a.kind in ("P1", "B"):
                if s < last and schedule.place(s + 1)[0] != r:
                    lowered.append(Action("RB", a.mbs, a.chunk))
                lowered.append(a)
                if s > 0 and schedule.place(s - 1)[0] != r:
                    lowered.append(Action("SB", a.mbs, a.chunk))
            else:
                lowered.append(a)
        out.append(tuple(lowered))
    return schedule.replace(ranks=tuple(out))


def fuse_backward(schedule: Schedule) -> Schedule:
    """2BP off: each ``P1`` becomes a fused ``B`` at the same place; ``P2`` actions go."""
    out = tuple(tuple(Action("B", a.mbs, a.chunk) if a.kind == "P1" else a
                      for a in acts if a.kind != "P2") for acts in schedule.ranks)
    return schedule.replace(ranks=out)


def merge_p2(schedule: Schedule) -> Schedule:
    """Merge runs of adjacent ``P2`` actions of the same chunk into one batched ``P2``.

    The simulator charges ``k * P2`` either way; on hardware one launch over k
    micro-batches is one larger GEMM, which is the point of batching.
    """
    out = []
    for acts in schedule.ranks:
        merged: list[Action] = []
        for a in acts:
            prev = merged[-1] if merged else None
            if a.kind == "P2" and prev is not None and prev.kind == "P2" and prev.chunk == a.chunk:
                merged[-1] = Action("P2", prev.mbs + a.mbs, a.chunk)
            else:
                merged.append(a)
        out.append(tuple(merged))
    return schedule.replace(ranks=tuple(out))


def receive_in_send_order(schedule: Schedule) -> Schedule:
    """The explicit form of ``schedule`` with each rank's receives from a peer in that peer's
    send order: where a receive would take message X while messages the peer sent before X
    are still unreceived, those are received first, right there (and not again later).

    Nothing waits longer for it: the peer posts those messages before X, and sends do not
    block, so they have left by the time X can arrive. A message received early sits in the
    rank's buffers until its consumer runs. Where the order already matches, the schedule
    comes back as lowered. With V-shaped chunks the order can differ: activations and
    gradients share a rank pair in both directions (rank 0 holds the first and the last stage).
    """
    low = lower_comm(schedule)
    sent: dict[tuple[int, int], list[tuple[Action, tuple]]] = {}
    for r, acts in enumerate(low.ranks):
        for a in acts:
            if a.kind in ("SF", "SB"):
                sent.setdefault((r, comm_peer(low, r, a)), []).append((a, message_key(low, r, a)))
    out = []
    for r, acts in enumerate(low.ranks):
        taken: dict[int, int] = {}  # peer -> messages from it received so far (in its send order)
        done: set[tuple] = set()
        new: list[Action] = []
        for a in acts:
            if a.kind not in ("RF", "RB"):
                new.append(a)
                continue
            key = message_key(low, r, a)
            if key in done:
                continue
            peer = comm_peer(low, r, a)
            queue = sent.get((peer, r), [])
            while key not in done:
                i = taken.get(peer, 0)
                if i >= len(queue):  # never sent: leave it to the validator to name
                    new.append(a)
                    done.add(key)
                    break
                send, k = queue[i]
                taken[peer] = i + 1
                # the receive matching that send, on this rank's chunk that consumes it
                rkind = "RF" if send.kind == "SF" else "RB"
                stage = k[2] + 1 if send.kind == "SF" else k[2] - 1
                new.append(Action(rkind, send.mbs, schedule.place(stage)[1]))
                done.add(k)
        out.append(tuple(new))
    return low.replace(ranks=tuple(out))
