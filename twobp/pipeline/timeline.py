"""One timeline format for the simulator and the executor.

A :class:`Timeline` is a list of :class:`Event` (rank, action text, kind, start, end,
in seconds from the start of the step). It writes

* a Chrome/Perfetto trace (``chrome://tracing`` or https://ui.perfetto.dev): one thread
  lane per rank, complete events (``"ph": "X"``) with times in microseconds; and
* a PNG when matplotlib is installed: one lane per rank, F / P1 / P2 / B coloured,
  idle time left as the grey lane background, the makespan and bubble in the title.

:meth:`Timeline.load` reads a trace written by :meth:`Timeline.write_trace` back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

__all__ = ["Event", "Timeline", "KIND_COLORS"]

KIND_COLORS = {
    "F": "#4C72B0",    # blue
    "B": "#8172B3",    # purple: fused backward
    "P1": "#DD8452",   # orange: on the critical path
    "P2": "#55A868",   # green: deferred weight gradients
    "optim": "#CCB974",  # sand: optimizer step (executor only)
    "recv": "#C44E52",  # red: waiting on a peer (executor only)
    "send": "#8C8C8C",  # grey: posting a send (executor only)
}
_COMPUTE = ("F", "B", "P1", "P2", "optim")


@dataclass(frozen=True)
class Event:
    """One action on one rank, ``start``/``end`` in seconds."""

    rank: int
    name: str
    kind: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """Events of one pipeline step on ``ranks`` ranks."""

    ranks: int
    events: list[Event] = field(default_factory=list)
    title: str = ""

    @property
    def makespan(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - min(0.0, min(e.start for e in self.events))

    def busy(self) -> list[float]:
        """Compute time per rank (communication waits are idle)."""
        out = [0.0] * self.ranks
        for e in self.events:
            if e.kind in _COMPUTE:
                out[e.rank] += e.duration
        return out

    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time: ``1 - sum(busy) / (ranks * makespan)``."""
        span = self.makespan
        return 0.0 if span <= 0 else 1.0 - sum(self.busy()) / (self.ranks * span)

    def add(self, events: Iterable[Event]) -> None:
        self.events.extend(events)

    def to_trace(self) -> dict:
        """The Chrome trace-event object (``json.dump`` it, or use :meth:`write_trace`)."""
        ev = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": self.title or "pipeline"}}]
        for r in range(self.ranks):
            ev.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r,
                       "args": {"name": f"rank {r}"}})
        for e in sorted(self.events, key=lambda e: (e.rank, e.start)):
            ev.append({"name": e.name, "cat": e.kind, "ph": "X", "pid": 0, "tid": e.rank,
                       "ts": e.start * 1e6, "dur": e.duration * 1e6})
        return {"traceEvents": ev, "displayTimeUnit": "ms",
                "otherData": {"ranks": self.ranks, "title": self.title,
                              "makespan_s": self.makespan,
                              "bubble_fraction": self.bubble_fraction()}}

    def write_trace(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_trace(), indent=None))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Timeline":
        data = json.loads(Path(path).read_text())
        other = data.get("otherData", {})
        events = [Event(e["tid"], e["name"], e.get("cat", ""), e["ts"] / 1e6,
                        (e["ts"] + e["dur"]) / 1e6)
                  for e in data["traceEvents"] if e.get("ph") == "X"]
        ranks = other.get("ranks") or (max((e.rank for e in events), default=-1) + 1)
        return cls(ranks=ranks, events=events, title=other.get("title", ""))

    def write_png(self, path: str | Path, *, label_actions: bool | None = None) -> Path | None:
        """Draw the timeline; returns None (and writes nothing) without matplotlib.

        ``label_actions``: print each action's text in its box (default: when few enough
        boxes to stay legible).
        """
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.patches import Patch
        except ImportError:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        span = self.makespan or 1.0
        if label_actions is None:
            label_actions = len(self.events) <= 40 * max(1, self.ranks)
        fig, ax = plt.subplots(figsize=(min(24, 6 + 0.12 * len(self.events) / max(1, self.ranks)),
                                        0.7 * self.ranks + 1.6))
        for r in range(self.ranks):
            ax.broken_barh([(0, span)], (r - 0.4, 0.8), facecolors="#EEEEEE")  # idle
        for e in self.events:
            color = KIND_COLORS.get(e.kind, "#999999")
            height = 0.8 if e.kind in _COMPUTE else 0.25
            ax.broken_barh([(e.start, e.duration)], (e.rank - height / 2, height),
                           facecolors=color, edgecolors="white", linewidth=0.5)
            if label_actions and e.kind in _COMPUTE and e.duration > span / 150:
                ax.text(e.start + e.duration / 2, e.rank, e.name, ha="center", va="center",
                        fontsize=6, color="white", clip_on=True)
        ax.set_yticks(range(self.ranks), [f"rank {r}" for r in range(self.ranks)])
        ax.invert_yaxis()
        ax.set_xlim(0, span)
        ax.set_xlabel("time (s)")
        kinds = sorted({e.kind for e in self.events}, key=lambda k: list(KIND_COLORS).index(k)
                       if k in KIND_COLORS else 99)
        handles = [Patch(color=KIND_COLORS.get(k, "#999999"), label=k) for k in kinds]
        handles.append(Patch(color="#EEEEEE", label="idle"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.set_title(f"{self.title}  makespan {span:.4g} s, bubble {self.bubble_fraction():.1%}",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, stem: str | Path) -> list[Path]:
        """Write ``<stem>.json`` (trace) and ``<stem>.png`` (when matplotlib is there)."""
        stem = Path(stem)
        out = [self.write_trace(stem.with_suffix(".json"))]
        png = self.write_png(stem.with_suffix(".png"))
        if png is not None:
            out.append(png)
        return out
