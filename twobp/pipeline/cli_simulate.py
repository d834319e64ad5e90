"""``simulate``: compare schedules on a cost model, print a table, write timelines.

Meant to be wired as ``twobp simulate``; runnable alone as
``python -m twobp.pipeline.cli_simulate --stages 4 --microbatches 8``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .actions import LAYOUTS
from .costs import Costs
from .flags import as_flags
from .generators import SCHEDULE_NAMES, make_schedule
from .simulate import simulate

__all__ = ["simulate_main", "build_parser", "compare"]

_DEFAULT_SET = "gpipe,gpipe-2bp,1f1b,1f1b-2bp,zb-h1-2bp,auto-2bp"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="twobp simulate",
        description=(
            "Simulate pipeline schedules on a cost model and compare makespan, bubble "
            "(idle share of all ranks' time), throughput and held activations. Costs are "
            "per micro-batch per chunk; a batched P2 over k micro-batches costs k*P2."),
        epilog=(
            "examples:\n"
            "  twobp simulate -p 4 -m 8\n"
            "  twobp simulate -p 4 -m 16 --costs F=1,P1=1.2,P2=0.8,comm=0.05 --timeline runs/sim\n"
            "  twobp simulate -p 4 -m 8 --chunks 2 --schedules interleaved-1f1b,interleaved-1f1b-2bp\n"
            "  twobp simulate -p 4 -m 8 --chunks 2 --layout v --schedules gpipe-2bp,auto-2bp --memory-limit 8\n"
            "  twobp simulate -p 2 -m 8 --costs-json measured_costs.json --memory-limit 4\n"
            "  twobp simulate -p 2 -m 8 --costs F=1,P1=1.2,P2=0.6 --overlap-steps"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", "--stages", type=int, required=True, help="pipeline ranks p")
    ap.add_argument("-m", "--microbatches", type=int, required=True,
                    help="micro-batches per step m")
    ap.add_argument("-v", "--chunks", type=int, default=1,
                    help="model chunks per rank (interleaved-1f1b, gpipe, auto); default 1")
    ap.add_argument("--layout", choices=LAYOUTS, default="loop",
                    help="chunk placement with --chunks > 1: loop (stage c*p + r) or v (ZB-V's: rank r runs "
                         "stages r and 2p-1-r; auto and gpipe only); default loop")
    ap.add_argument("--schedules", default=_DEFAULT_SET,
                    help=("comma list of <name>[-2bp], names: " + ", ".join(SCHEDULE_NAMES)
                          + f" (default: {_DEFAULT_SET}; with --chunks > 1 use interleaved-1f1b)"))
    ap.add_argument("--costs", default="F=1,P1=1,P2=1,comm=0",
                    help="per-chunk times as K=V pairs, keys F, P1, P2, B, comm "
                         "(default: F=1,P1=1,P2=1,comm=0; B defaults to P1+P2)")
    ap.add_argument("--costs-json", type=Path,
                    help="JSON file with the costs mapping (values: numbers or per-stage lists), "
                         "e.g. the 'costs' a measured run writes; overrides --costs")
    ap.add_argument("--memory-limit", type=int, default=None,
                    help="auto: most micro-batch chunks a rank may hold from F until P2")
    ap.add_argument("--overlap-steps", action="store_true",
                    help="2BP schedules carry trailing P2 into the next step where it shortens the "
                         "steady-state step (the executor's overlap_steps); step times are then the "
                         "steady-state period, not the one-step makespan")
    ap.add_argument("--timeline", type=Path, default=None,
                    help="directory for <schedule>.json (Chrome/Perfetto trace) and .png")
    ap.add_argument("--show", action="store_true", help="also print each schedule's text form")
    return ap


def _parse_costs(text: str) -> Costs:
    vals = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"--costs: expected K=V, got {part!r}")
        try:
            vals[key.strip()] = float(val)
        except ValueError:
            raise ValueError(f"--costs: {key} must be a number, got {val!r}") from None
    return Costs.from_mapping(vals)


def compare(*, stages: int, microbatches: int, chunks: int, costs: Costs, names: Sequence[str],
            memory_limit: int | None = None, timeline_dir: Path | None = None,
            show: bool = False, out=None, overlap_steps: bool = False, layout: str = "loop") -> list[dict]:
    """Simulate each ``<name>[-2bp]`` and print a markdown table; returns the rows."""
    out = out if out is not None else sys.stdout
    rows = []
    for full in names:
        twobp = full.endswith("-2bp")
        name = full[:-4] if twobp else full
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sched = make_schedule(name, stages=stages, microbatches=microbatches, twobp=twobp,
                                  chunks=chunks, costs=costs, memory_limit=memory_limit,
                                  overlap_steps=overlap_steps, layout=layout)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        res = simulate(sched, costs, check=False)  # make_schedule validated it
        rows.append({"schedule": sched.name, "makespan": res.makespan, "step": res.period,
                     "carry": list(sched.carry), "bubble": res.bubble_fraction, "throughput": res.throughput,
                     "peak_held": max(res.peak_held), "result": res})
        if timeline_dir is not None:
            res.timeline.write(Path(timeline_dir) / sched.name)
        if show:
            print(sched, file=out)
    base = next((r["step"] for r in rows if r["schedule"] == "1f1b"), rows[0]["step"])
    base_name = "1f1b" if any(r["schedule"] == "1f1b" for r in rows) else rows[0]["schedule"]
    print(f"p={stages} m={microbatches} chunks={chunks}" + (f" layout={layout}" if layout != "loop" else "")
          + f" costs={costs.as_dict()}"
          + (" (steady state, carried P2)" if overlap_steps else ""), file=out)
    extra = " carry | steady-state step |" if overlap_steps else ""
    print(f"| schedule | makespan |{extra} bubble | throughput (mb/unit) | speedup vs {base_name} | "
          "peak held mb/rank |", file=out)
    print("|---|---:|" + ("---|---:|" if overlap_steps else "") + "---:|---:|---:|---:|", file=out)
    for r in rows:
        mid = f" {r['carry'] or '-'} | {r['step']:.4g} |" if overlap_steps else ""
        print(f"| {r['schedule']} | {r['makespan']:.4g} |{mid} {r['bubble']:.1%} | "
              f"{r['throughput']:.4g} | {base / r['step']:.3f}x | {r['peak_held']} |", file=out)
    return rows


def simulate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``), print the table; returns 0,
    or 2 with a message on bad input."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.costs_json is not None:
            costs = Costs.from_mapping(json.loads(args.costs_json.read_text()))
        else:
            costs = _parse_costs(args.costs)
        names = [n.strip() for n in args.schedules.split(",") if n.strip()]
        compare(stages=args.stages, microbatches=args.microbatches, chunks=args.chunks,
                costs=costs, names=names, memory_limit=args.memory_limit,
                timeline_dir=args.timeline, show=args.show, overlap_steps=args.overlap_steps, layout=args.layout)
    except (ValueError, OSError) as e:
        print(f"twobp simulate: error: {as_flags(str(e))}", file=sys.stderr)
        return 2
    if args.timeline is not None:
        print(f"timelines written to {args.timeline}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(simulate_main())
