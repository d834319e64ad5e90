"""Reject a schedule that cannot run, naming the rank, action and micro-batch at fault.

Checks, in order (the first failing group is reported, every fault in it listed):

1. shape: known action kinds, chunks in ``[0, chunks)``, micro-batches in ``[0, m)``;
2. work: every (micro-batch, chunk) of every rank has exactly one ``F`` and exactly one
   backward, either ``B`` or ``P1`` plus exactly one ``P2`` covering it;
3. order on a rank: a backward after its ``F``, a ``P2`` after its ``P1``;
4. communication (explicit form, or the implicit form after :func:`lower_comm`): every
   receive a consumer needs comes before it, every send after its producer, and each
   send matches exactly one receive on the peer rank;
5. deadlock: the dependency graph is walked with blocking receives and non-blocking
   sends (:mod:`.walk`); if ranks are left waiting on each other, the cycle is shown.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from .actions import COMM_KINDS, COMPUTE_KINDS, Action, Schedule
from .lowering import comm_peer, lower_comm, message_key
from .walk import Deadlock, walk

__all__ = ["validate", "ScheduleError", "fifo_violations"]

_MAX_LISTED = 8


class ScheduleError(ValueError):
    """A schedule failed validation; ``faults`` lists (rank, action, message)."""

    def __init__(self, schedule: Schedule, faults: list[tuple[int, Action | None, str]]):
        self.schedule = schedule
        self.faults = faults
        shown = [f"  rank {r}: {msg}" for r, _, msg in faults[:_MAX_LISTED]]
        more = len(faults) - _MAX_LISTED
        if more > 0:
            shown.append(f"  ... and {more} more")
        super().__init__(f"invalid schedule {schedule.name!r}:\n" + "\n".join(shown))


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` (a ValueError) unless ``schedule`` can run to the end."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"validate takes a Schedule, got {type(schedule).__name__}")
    for check in (_check_shape, _check_work, _check_order):
        faults = check(schedule)
        if faults:
            raise ScheduleError(schedule, faults)
    lowered = lower_comm(schedule)
    faults = _check_comm(lowered)
    if faults:
        raise ScheduleError(schedule, faults)
    try:
        walk(lowered)
    except Deadlock as e:
        cyclic = all(lowered.ranks[r][i].kind in ("RF", "RB") for r, i, _ in e.blocked)
        label = "deadlock" if cyclic else "cannot run"
        faults = [(r, lowered.ranks[r][i], f"{label}: {lowered.ranks[r][i]} (step {i} of the "
                                           f"explicit form) {why}")
                  for r, i, why in e.blocked]
        raise ScheduleError(schedule, faults) from None


def fifo_violations(schedule: Schedule) -> list[str]:
    """Rank pairs whose receiver takes messages in another order than the sender posts them.

    Gloo matches by tag, so any order works there; NCCL matches a pair's messages in
    posting order, so on NCCL the executor runs :func:`~.lowering.receive_in_send_order`
    of the schedule, which has none. Looped schedules have none to begin with; V-shaped
    ones can (a rank pair carries activations and gradients both ways).
    """
    low = lower_comm(schedule)
    sent: dict[tuple[int, int], list] = defaultdict(list)
    got: dict[tuple[int, int], list] = defaultdict(list)
    for r, acts in enumerate(low.ranks):
        for a in acts:
            if a.kind in ("SF", "SB"):
                sent[(r, comm_peer(low, r, a))].append((a, message_key(low, r, a)))
            elif a.kind in ("RF", "RB"):
                got[(comm_peer(low, r, a), r)].append((a, message_key(low, r, a)))
    out = []
    for (src, dst), msgs in sorted(sent.items()):
        theirs = got.get((src, dst), [])
        for (sa, sk), (ra, rk) in zip(msgs, theirs):
            if sk != rk:
                out.append(f"rank {src} sends {sa} to rank {dst}, whose next receive from it "
                           f"is {ra}")
                break
    return out


def _check_shape(s: Schedule) -> list:
    from .overlap import trailing_p2

    faults = []
    for r in range(s.stages):
        if s.carried(r) > trailing_p2(s.ranks[r]):
            acts = s.ranks[r]
            faults.append((r, acts[-1] if acts else None,
                           f"carry={s.carried(r)} on rank {r} but its list ends with only "
                           f"{trailing_p2(acts)} P2 micro-batches to carry"))
    for r, acts in enumerate(s.ranks):
        for a in acts:
            if a.kind not in COMPUTE_KINDS + COMM_KINDS:
                faults.append((r, a, f"unknown action kind {a.kind!r}"))
                continue
            if not 0 <= a.chunk < s.chunks:
                faults.append((r, a, f"{a} names chunk {a.chunk}, but chunks={s.chunks}"))
            bad = [mb for mb in a.mbs if not 0 <= mb < s.microbatches]
            if bad or not a.mbs:
                faults.append((r, a, f"{a} names micro-batch {bad or '(none)'}, outside "
                                     f"0..{s.microbatches - 1}"))
            if len(set(a.mbs)) != len(a.mbs):
                faults.append((r, a, f"{a} lists a micro-batch twice"))
            if a.kind != "P2" and len(a.mbs) != 1:
                faults.append((r, a, f"{a.kind} takes one micro-batch, got {list(a.mbs)}"))
    return faults


def _check_work(s: Schedule) -> list:
    faults = []
    for r, acts in enumerate(s.ranks):
        count: Counter = Counter()
        for a in acts:
            if a.kind in COMPUTE_KINDS:
                for mb in a.mbs:
                    count[(a.kind, mb, a.chunk)] += 1
        for c in range(s.chunks):
            for mb in range(s.microbatches):
                f, b, p1, p2 = (count[(k, mb, c)] for k in COMPUTE_KINDS)
                if f != 1:
                    faults.append((r, Action("F", (mb,), c),
                                   f"F{mb}.{c} appears {f} times; every micro-batch needs "
                                   "exactly one forward per chunk"))
                if b + p1 != 1:
                    what = "no backward" if b + p1 == 0 else "more than one backward"
                    faults.append((r, Action("P1" if p1 else "B", (mb,), c),
                                   f"micro-batch {mb} of chunk {c} has {what} (B{mb}.{c}: {b}, "
                                   f"P1[{mb}].{c}: {p1}); give it one B or one P1 with a P2"))
                elif p1 == 1 and p2 != 1:
                    faults.append((r, Action("P2", (mb,), c),
                                   f"P1[{mb}].{c} needs exactly one P2 covering micro-batch {mb}, "
                                   f"found {p2}; " + ("add P2[{0}].{1} after it".format(mb, c)
                                                      if p2 == 0 else "remove the duplicates")))
                elif b == 1 and p2:
                    faults.append((r, Action("P2", (mb,), c),
                                   f"micro-batch {mb} of chunk {c} has a fused B{mb}.{c} and also "
                                   "a P2; B already computes the weight gradient"))
    return faults


def _check_order(s: Schedule) -> list:
    faults = []
    for r, acts in enumerate(s.ranks):
        seen: set[tuple[str, int, int]] = set()
        for i, a in enumerate(acts):
            if a.kind in ("P1", "B") and ("F", a.mb, a.chunk) not in seen:
                faults.append((r, a, f"{a} (step {i}) runs before F{a.mb}.{a.chunk}; "
                                     "move it after the forward of micro-batch "
                                     f"{a.mb}"))
            if a.kind == "P2":
                for mb in a.mbs:
                    if ("P1", mb, a.chunk) not in seen:
                        faults.append((r, a, f"{a} (step {i}) runs before P1[{mb}].{a.chunk}; "
                                             f"move micro-batch {mb}'s P2 after its P1"))
            for mb in a.mbs:
                seen.add((a.kind, mb, a.chunk))
    return faults


def _check_comm(s: Schedule) -> list:
    """Explicit form: the receives/sends that adjacency demands exist, in place, and match."""
    faults = []
    last = s.num_stages - 1
    sends: dict[tuple, list] = defaultdict(list)
    recvs: dict[tuple, list] = defaultdict(list)
    for r, acts in enumerate(s.ranks):
        got: set = set()
        for i, a in enumerate(acts):
            st = s.stage_of(r, a.chunk)
            if a.is_comm:
                other = st + 1 if a.kind in ("SF", "RB") else st - 1
                if not 0 <= other <= last:
                    faults.append((r, a, f"{a} talks to stage {other}, which does not exist"))
                    continue
                if s.place(other)[0] == r:
                    faults.append((r, a, f"{a}: stages {st} and {other} share rank {r}, so no "
                                         "communication is needed; remove it"))
                    continue
                key = message_key(s, r, a)
                if a.kind in ("SF", "SB"):
                    sends[(comm_peer(s, r, a), key)].append((r, a))
                else:
                    recvs[(r, key)].append((r, a))
                    got.add(key)
            elif a.kind == "F" and st > 0 and s.place(st - 1)[0] != r:
                if ("act", a.mb, st - 1) not in got:
                    faults.append((r, a, f"{a} (step {i}) needs micro-batch {a.mb}'s activation "
                                         f"from rank {s.place(st - 1)[0]} but no RF{a.mb}.{a.chunk} "
                                         "comes before it"))
            elif a.kind in ("P1", "B") and st < last and s.place(st + 1)[0] != r:
                if ("grad", a.mb, st + 1) not in got:
                    faults.append((r, a, f"{a} (step {i}) needs micro-batch {a.mb}'s gradient "
                                         f"from rank {s.place(st + 1)[0]} but no RB{a.mb}.{a.chunk} "
                                         "comes before it"))
    for key in set(sends) | set(recvs):
        snd, rcv = sends.get(key, []), recvs.get(key, [])
        dst, (what, mb, src_stage) = key
        if len(snd) == 1 and len(rcv) == 1:
            continue
        if len(snd) > 1 or len(rcv) > 1:
            r, a = (snd or rcv)[0]
            faults.append((r, a, f"{a} for micro-batch {mb} appears {max(len(snd), len(rcv))} "
                                 "times; each message is sent and received once"))
        elif not rcv:
            r, a = snd[0]
            faults.append((r, a, f"send/recv mismatch: {a} sends micro-batch {mb}'s {what} to rank "
                                 f"{dst}, which never receives it (add the matching "
                                 f"{'RF' if what == 'act' else 'RB'} there)"))
        else:
            r, a = rcv[0]
            src = s.place(src_stage)[0]
            faults.append((r, a, f"send/recv mismatch: {a} waits for micro-batch {mb}'s {what} "
                                 f"from rank {src}, which never sends it (add the matching "
                                 f"{'SF' if what == 'act' else 'SB'} there)"))
    return faults
