"""The schedule IR: per rank, an ordered list of actions, with a text form that parses back.

Stages and ranks
----------------
A pipeline of ``p`` ranks (``stages`` below) with ``v`` model chunks per rank has
``S = p * v`` *virtual stages*. Chunk ``c`` of rank ``r`` runs virtual stage

    s = c * p + r                      (Megatron's interleaved placement)

so with ``v = 1`` the stage is the rank. That is the ``"loop"`` layout. The ``"v"`` layout
(ZB-V's) runs every odd chunk in the other direction:

    s = c * p + r              for even c,
    s = c * p + (p - 1 - r)    for odd c,

so with ``v = 2`` rank ``r`` holds stages ``r`` and ``2p - 1 - r``: rank 0 holds the first
and the last stage, and the hand-off from stage ``p - 1`` to ``p`` stays on rank ``p - 1``
(no message). Micro-batch ``mb`` flows forward through ``s = 0 .. S-1`` and its gradient
flows back through ``S-1 .. 0``, whatever the layout.

Actions
-------
Compute (they occupy the rank):

==========  ==================  ===========================================================
kind        text                meaning
==========  ==================  ===========================================================
``F``       ``F3.1``            forward of micro-batch 3 on chunk 1
``B``       ``B3.1``            fused backward (p1 + p2) of micro-batch 3 on chunk 1
``P1``      ``P1[3].1``         backward-p1 (input gradient) of micro-batch 3 on chunk 1
``P2``      ``P2[0,1,2].1``     backward-p2 (weight gradient) of micro-batches 0, 1, 2 on
                                chunk 1, batched; ``P2[0-7].1`` is the range 0..7
==========  ==================  ===========================================================

Communication (explicit form only; sends are asynchronous, receives block):

==========  ==================  ===========================================================
``SF``      ``SF3.1``           send the output of ``F3.1`` to the next virtual stage
``RF``      ``RF3.1``           receive the input of ``F3.1`` from the previous one
``SB``      ``SB3.1``           send the input gradient made by ``P1[3].1``/``B3.1`` back
``RB``      ``RB3.1``           receive the output gradient ``P1[3].1``/``B3.1`` needs
==========  ==================  ===========================================================

Communication follows from stage adjacency: generators emit compute actions only (the
*implicit* form) and :func:`twobp.pipeline.lower_comm` inserts each send right after its
producer and each receive right before its consumer. A schedule may also be written in
the explicit form by hand (to receive early, say); the validator then checks that every
send has its receive.

Carry
-----
``carry[r]`` (default 0 on every rank) is how many of rank r's trailing P2 micro-batches
run at the start of the *next* step instead of at the end of this one, together with the
rank's optimizer step, while the rank waits for its first input (a rank other than the
first one waits for an activation the previous rank is still computing). The math does
not change: a weight gradient is needed by the optimizer step, and this rank's optimizer
step is needed by this rank's next forward, nothing earlier. The executor carries them
when run with ``overlap_steps=True``; the simulator's :func:`~twobp.pipeline.simulate`
reports the steady-state step time (``period``) that results.

The text form of a whole schedule is a header line then one line per rank::

    schedule name=1f1b-2bp stages=2 chunks=1 microbatches=3
    rank 0: F0.0 F1.0 P1[0].0 F2.0 P1[1].0 P2[0].0 P1[2].0 P2[1,2].0
    rank 1: F0.0 P1[0].0 F1.0 P1[1].0 F2.0 P1[2].0 P2[0-2].0

A schedule in the ``"v"`` layout says so in its header (``... microbatches=4 layout=v``).
``Schedule.parse(str(schedule)) == schedule`` always holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

__all__ = [
    "Action",
    "LAYOUTS",
    "COMPUTE_KINDS",
    "COMM_KINDS",
    "Schedule",
    "F",
    "B",
    "P1",
    "P2",
    "parse_action",
    "place",
    "stage_of",
]

LAYOUTS = ("loop", "v")
"""How chunks map to virtual stages (module docstring): looped (Megatron) or V-shaped (ZB-V)."""
COMPUTE_KINDS = ("F", "B", "P1", "P2")
COMM_KINDS = ("SF", "RF", "SB", "RB")
_BRACKETED = ("P1", "P2")


class Action(NamedTuple):
    """One step of one rank: ``kind`` on micro-batches ``mbs`` of local chunk ``chunk``.

    ``mbs`` is a tuple with exactly one entry for every kind but ``P2``, which may batch
    several micro-batches into one launch.
    """

    kind: str
    mbs: tuple[int, ...]
    chunk: int

    @property
    def mb(self) -> int:
        """The micro-batch of a single-micro-batch action (the first one of a ``P2``)."""
        return self.mbs[0]

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    def __str__(self) -> str:
        if self.kind in _BRACKETED:
            return f"{self.kind}[{_format_mbs(self.mbs)}].{self.chunk}"
        return f"{self.kind}{self.mbs[0]}.{self.chunk}"


def F(mb: int, chunk: int = 0) -> Action:
    """Forward of ``mb`` on ``chunk``."""
    return Action("F", (mb,), chunk)


def B(mb: int, chunk: int = 0) -> Action:
    """Fused backward (p1 then p2 at once) of ``mb`` on ``chunk``."""
    return Action("B", (mb,), chunk)


def P1(mb: int, chunk: int = 0) -> Action:
    """Backward-p1 (input gradient only) of ``mb`` on ``chunk``."""
    return Action("P1", (mb,), chunk)


def P2(mbs: int | Iterable[int], chunk: int = 0) -> Action:
    """Backward-p2 (weight gradients) of one micro-batch or a batch of them on ``chunk``."""
    if isinstance(mbs, int):
        return Action("P2", (mbs,), chunk)
    return Action("P2", tuple(mbs), chunk)


def stage_of(rank: int, chunk: int, stages: int, layout: str = "loop") -> int:
    """Virtual stage run by ``chunk`` of ``rank`` among ``stages`` ranks (module docstring)."""
    if layout == "v" and chunk % 2:
        return chunk * stages + stages - 1 - rank
    return chunk * stages + rank


def place(stage: int, stages: int, layout: str = "loop") -> tuple[int, int]:
    """``(rank, chunk)`` that runs virtual ``stage``: the inverse of :func:`stage_of`."""
    chunk, i = divmod(stage, stages)
    return (stages - 1 - i if layout == "v" and chunk % 2 else i), chunk


def _format_mbs(mbs: tuple[int, ...]) -> str:
    # Runs of three or more consecutive ids print as a range, so a batched P2 over a whole
    # step stays one short token (P2[0-63].0).
    parts, i = [], 0
    while i < len(mbs):
        j = i
        while j + 1 < len(mbs) and mbs[j + 1] == mbs[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{mbs[i]}-{mbs[j]}")
        else:
            parts.extend(str(x) for x in mbs[i:j + 1])
        i = j + 1
    return ",".join(parts)


_ACTION_RE = re.compile(r"^(?:(P1|P2)\[([0-9,\-]+)\]|(SF|RF|SB|RB|F|B)([0-9]+))\.([0-9]+)$")


def parse_action(text: str) -> Action:
    """Parse one action's text form (``F3.1``, ``P2[0-2,5].0``, ``RB4.0``)."""
    m = _ACTION_RE.match(text.strip())
    if m is None:
        raise ValueError(
            f"cannot parse action {text!r}: expected F<mb>.<chunk>, B<mb>.<chunk>, "
            "P1[<mb>].<chunk>, P2[<mb>,<mb>-<mb>,...].<chunk> or SF/RF/SB/RB<mb>.<chunk>")
    chunk = int(m.group(5))
    if m.group(1):
        mbs: list[int] = []
        for part in m.group(2).split(","):
            if "-" in part:
                lo, _, hi = part.partition("-")
                if not lo or not hi or int(hi) < int(lo):
                    raise ValueError(f"bad micro-batch range {part!r} in action {text!r}")
                mbs.extend(range(int(lo), int(hi) + 1))
            elif part:
                mbs.append(int(part))
            else:
                raise ValueError(f"empty micro-batch entry in action {text!r}")
        if m.group(1) == "P1" and len(mbs) != 1:
            raise ValueError(f"P1 takes exactly one micro-batch, got {text!r}")
        return Action(m.group(1), tuple(mbs), chunk)
    return Action(m.group(3), (int(m.group(4)),), chunk)


_HEADER_RE = re.compile(
    r"^schedule name=(\S+) stages=([0-9]+) chunks=([0-9]+) microbatches=([0-9]+)(?: carry=([0-9,]+))?"
    r"(?: layout=(\S+))?$")
_RANK_RE = re.compile(r"^rank ([0-9]+):(.*)$")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A pipeline schedule: for each rank, the ordered actions it runs in one step."""

    ranks: tuple[tuple[Action, ...], ...]
    """``ranks[r]`` is rank ``r``'s action list, in execution order."""
    stages: int
    """Pipeline ranks ``p`` (one process each)."""
    chunks: int = 1
    """Model chunks per rank ``v``; see :attr:`layout` for which virtual stage each runs."""
    microbatches: int
    """Micro-batches ``m`` per step, numbered ``0 .. m-1``."""
    name: str = "custom"
    """Free-form label (no spaces), e.g. ``1f1b-2bp``."""
    carry: tuple[int, ...] = ()
    """Per rank, trailing P2 micro-batches run at the start of the next step (see Carry in
    the module docstring); ``()`` carries nothing."""
    layout: str = "loop"
    """``"loop"``: chunk c of rank r runs stage ``c * p + r``; ``"v"``: odd chunks run the other
    way, ``c * p + p - 1 - r`` (module docstring)."""
    meta: dict = field(default_factory=dict, compare=False, repr=False)
    """Generator notes (e.g. auto's lower bound); not part of the text form or equality."""

    def __post_init__(self) -> None:
        for fname in ("stages", "chunks", "microbatches"):
            val = getattr(self, fname)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"Schedule.{fname} must be a positive int, got {val!r}")
        if not self.name or any(ch.isspace() for ch in self.name):
            raise ValueError(f"Schedule.name must be non-empty without spaces, got {self.name!r}")
        ranks = tuple(tuple(a if isinstance(a, Action) else Action(*a) for a in acts)
                      for acts in self.ranks)
        object.__setattr__(self, "ranks", ranks)
        if len(ranks) != self.stages:
            raise ValueError(
                f"Schedule.ranks has {len(ranks)} action lists but stages={self.stages}: "
                "give one list per rank")
        carry = tuple(self.carry)
        if carry and (len(carry) != self.stages or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in carry)):
            raise ValueError(f"Schedule.carry must hold one int >= 0 per rank ({self.stages}), got {self.carry!r}")
        object.__setattr__(self, "carry", carry if any(carry) else ())
        if self.layout not in LAYOUTS:
            raise ValueError(f"Schedule.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    @property
    def num_stages(self) -> int:
        """Virtual stages ``S = stages * chunks``."""
        return self.stages * self.chunks

    def stage_of(self, rank: int, chunk: int) -> int:
        """Virtual stage run by ``chunk`` of ``rank``."""
        return stage_of(rank, chunk, self.stages, self.layout)

    def place(self, stage: int) -> tuple[int, int]:
        """``(rank, chunk)`` that runs virtual ``stage``."""
        return place(stage, self.stages, self.layout)

    @property
    def uses_split(self) -> bool:
        """True when any backward is split into P1 and P2."""
        return any(a.kind in ("P1", "P2") for acts in self.ranks for a in acts)

    @property
    def is_explicit(self) -> bool:
        """True when communication actions are written out."""
        return any(a.is_comm for acts in self.ranks for a in acts)

    def carried(self, rank: int) -> int:
        """P2 micro-batches rank ``rank`` carries into the next step."""
        return self.carry[rank] if self.carry else 0

    def replace(self, **changes) -> "Schedule":
        kw = dict(ranks=self.ranks, stages=self.stages, chunks=self.chunks, microbatches=self.microbatches,
                  name=self.name, carry=self.carry, layout=self.layout, meta=dict(self.meta))
        kw.update(changes)
        return Schedule(**kw)

    def __str__(self) -> str:
        lines = [f"schedule name={self.name} stages={self.stages} chunks={self.chunks} "
                 f"microbatches={self.microbatches}" + (f" carry={','.join(map(str, self.carry))}"
                                                        if self.carry else "")
                 + (f" layout={self.layout}" if self.layout != "loop" else "")]
        for r, acts in enumerate(self.ranks):
            lines.append(f"rank {r}: " + " ".join(str(a) for a in acts))
        return "\n".join(lines)

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """Inverse of ``str(schedule)``."""
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        if not lines:
            raise ValueError("empty schedule text")
        head = _HEADER_RE.match(lines[0])
        if head is None:
            raise ValueError(
                f"schedule text must start with 'schedule name=<n> stages=<p> chunks=<v> "
                f"microbatches=<m>' (then optionally ' carry=<k0>,<k1>,...' and ' layout=v'), got {lines[0]!r}")
        name, p, v, m = head.group(1), *(int(head.group(i)) for i in (2, 3, 4))
        carry = tuple(int(c) for c in head.group(5).split(",") if c) if head.group(5) else ()
        layout = head.group(6) or "loop"
        ranks: list[tuple[Action, ...]] = []
        for ln in lines[1:]:
            rm = _RANK_RE.match(ln)
            if rm is None or int(rm.group(1)) != len(ranks):
                raise ValueError(f"expected 'rank {len(ranks)}: <actions>', got {ln!r}")
            ranks.append(tuple(parse_action(tok) for tok in rm.group(2).split()))
        return cls(ranks=tuple(ranks), stages=p, chunks=v, microbatches=m, name=name, carry=carry, layout=layout)

    def grid(self, mark: tuple[int, int] | None = None) -> str:
        """The schedule as a table (one column per rank); ``mark=(rank, index)`` flags a step."""
        width = max((len(str(a)) for acts in self.ranks for a in acts), default=2) + 2
        depth = max((len(acts) for acts in self.ranks), default=0)
        rows = ["step  " + "".join(f"rank {r}".ljust(width) for r in range(self.stages))]
        for i in range(depth):
            cells = []
            for r, acts in enumerate(self.ranks):
                txt = str(acts[i]) if i < len(acts) else ""
                if mark == (r, i):
                    txt = f">{txt}<"
                cells.append(txt.ljust(width))
            rows.append(f"{i:<6}" + "".join(cells))
        return "\n".join(rows)
