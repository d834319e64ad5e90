"""Per-chunk cost model shared by the simulator, the ``auto`` placer and the executor.

A cost is the time one micro-batch takes on one virtual stage (one chunk of one rank):

* ``F``: forward; ``P1``: input gradient; ``P2``: weight gradient of one micro-batch
  (a batched ``P2`` over k micro-batches costs ``k * P2``);
* ``B``: fused backward, ``P1 + P2`` unless given (fusion may be cheaper or dearer);
* ``comm``: latency from the end of a producer to the data being usable at the consumer
  on another rank (activations forward and gradients backward alike).

Each field is a number (every stage alike) or a sequence with one entry per virtual
stage ``0 .. S-1``. Units are free; the timeline treats them as seconds. A plain mapping
``{"F": .., "P1": .., "P2": .., "B": .., "comm": ..}`` is accepted wherever a
:class:`Costs` is, and measured costs from the executor come out as one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, fields
from typing import Mapping, Sequence, Union

__all__ = ["Costs", "MemorySizes", "as_costs", "mean_costs", "median_costs", "with_fused_backward", "PROBE_STEPS", "UNIT_COSTS"]

Number = Union[int, float]
PerStage = Union[Number, Sequence[Number]]


def _check(name: str, val, owner: str = "Costs"):
    vals = list(val) if isinstance(val, (list, tuple)) else [val]
    if not vals:
        raise ValueError(f"{owner}.{name} is an empty sequence; give a number or one per stage")
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ValueError(f"{owner}.{name} must be a number or a sequence of numbers, got {val!r}")
        if not 0 <= x < float("inf"):
            raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {val!r}")
    return tuple(float(x) for x in vals) if isinstance(val, (list, tuple)) else float(val)


@dataclass(frozen=True, kw_only=True)
class Costs:
    """Per-micro-batch, per-virtual-stage times (see the module docstring)."""

    F: PerStage
    """Forward time."""
    P1: PerStage
    """Backward-p1 (input gradient) time."""
    P2: PerStage
    """Backward-p2 (weight gradient) time for one micro-batch."""
    B: PerStage | None = None
    """Fused backward time; ``None`` means ``P1 + P2``."""
    comm: PerStage = 0.0
    """Send latency out of stage s (both directions use the entry of the lower stage)."""
    allreduce: PerStage = 0.0
    """Data-parallel all-reduce of stage s's gradients (once per step). It starts when the
    stage's last weight gradient is final, runs beside compute (one stream per rank, chunk
    after chunk) and the rank's step ends no earlier than its last all-reduce."""

    def __post_init__(self) -> None:
        for f in fields(self):
            val = getattr(self, f.name)
            if val is None:
                continue
            object.__setattr__(self, f.name, _check(f.name, val))
        work = [getattr(self, k) for k in ("F", "P1", "P2")]
        if not any((max(w) if isinstance(w, tuple) else w) > 0 for w in work):
            raise ValueError("Costs: F, P1 and P2 are all 0, so every schedule takes no time; give at "
                             "least one of them a positive time (e.g. F=1,P1=1,P2=1)")

    def at(self, kind: str, stage: int) -> float:
        """Time of ``kind`` (F, P1, P2, B or comm) for one micro-batch on ``stage``."""
        if kind == "B" and self.B is None:
            return self.at("P1", stage) + self.at("P2", stage)
        val = getattr(self, kind)
        if isinstance(val, tuple):
            if stage >= len(val):
                raise ValueError(
                    f"Costs.{kind} has {len(val)} entries but stage {stage} was asked for; "
                    "give one entry per virtual stage (stages * chunks)")
            return val[stage]
        return val

    def check_stages(self, num_stages: int) -> None:
        """Raise unless every per-stage sequence has ``num_stages`` entries."""
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, tuple) and len(val) != num_stages:
                raise ValueError(
                    f"Costs.{f.name} has {len(val)} entries for {num_stages} virtual stages")

    def as_dict(self) -> dict:
        """The plain-mapping form (``B`` filled in when it was left to default)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["B"] is None:
            del out["B"]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @classmethod
    def from_mapping(cls, m: Mapping) -> "Costs":
        unknown = set(m) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown cost keys {sorted(unknown)}; expected F, P1, P2, B, comm, allreduce")
        missing = [k for k in ("F", "P1", "P2") if k not in m]
        if missing:
            raise ValueError(
                f"costs lack {missing}: F, P1 and P2 are required (measure them with a 2BP "
                "schedule, which runs P1 and P2 as separate actions)")
        return cls(**dict(m))


UNIT_COSTS = Costs(F=1.0, P1=1.0, P2=1.0)
"""T_F = T_P1 = T_P2 = 1, no communication: the textbook setting (B = 2)."""


PROBE_STEPS = 3
"""Measured steps a cost probe takes :func:`median_costs` over (after one warm-up step)."""


def median_costs(measured: Sequence[Mapping]) -> dict:
    """Element-wise median of several steps' measured costs (the executor's ``costs`` mapping
    form): per kind and stage, the median over steps. One step's per-stage medians can be off by
    half on a busy CPU (a first step's page faults, a neighbour's burst); ``auto`` places by
    these figures, so probes measure several steps and take this. Kinds missing from any step
    are left out."""
    return _per_kind(measured, statistics.median, "median_costs")


def mean_costs(measured: Sequence[Mapping]) -> dict:
    """Element-wise mean of several measured costs (as :func:`median_costs`, the mean instead)."""
    return _per_kind(measured, statistics.fmean, "mean_costs")


def _per_kind(measured: Sequence[Mapping], reduce, who: str) -> dict:
    if not measured:
        raise ValueError(f"{who} needs at least one measurement")
    out: dict = {}
    for kind in measured[0]:
        vals = [m[kind] for m in measured if kind in m]
        if len(vals) < len(measured):
            continue
        if isinstance(vals[0], (list, tuple)):
            if len({len(v) for v in vals}) != 1:
                raise ValueError(f"{who}: measurements disagree on the number of stages for {kind}")
            out[kind] = [reduce(col) for col in zip(*vals)]
        else:
            out[kind] = reduce(vals)
    return out


def with_fused_backward(split: Mapping, fused: Mapping) -> dict:
    """A split run's measured costs (F, P1, P2, comm) with the fused backward ``B`` a run of the
    same schedule without 2BP measured. ``auto`` then keeps a micro-batch's backward fused
    wherever its P2 would fill no idle time and B costs less than P1 + P2 (on a CPU the weight
    gradient computed right after dX finds its inputs still in cache)."""
    out = dict(split)
    if "B" in fused:
        out["B"] = fused["B"]
    return out


def as_costs(costs: Costs | Mapping | None) -> Costs:
    """Accept a :class:`Costs`, a plain mapping, or None (unit costs)."""
    if costs is None:
        return UNIT_COSTS
    if isinstance(costs, Costs):
        return costs
    if isinstance(costs, Mapping):
        return Costs.from_mapping(costs)
    raise TypeError(f"costs must be a Costs, a mapping or None, got {type(costs).__name__}")


@dataclass(frozen=True, kw_only=True)
class MemorySizes:
    """Bytes one micro-batch holds on one virtual stage, for the simulator's memory figure."""

    activation: PerStage
    """Held from the start of F until its P1 (or B) ends."""
    p2: PerStage = 0.0
    """Held from the end of P1 until its P2 ends (x and dy of the layers with weights)."""

    def __post_init__(self) -> None:
        for name in ("activation", "p2"):
            object.__setattr__(self, name, _check(name, getattr(self, name), "MemorySizes"))

    def at(self, kind: str, stage: int) -> float:
        val = getattr(self, kind)
        return val[stage] if isinstance(val, tuple) else val
