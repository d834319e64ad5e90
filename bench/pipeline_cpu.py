"""CPU pipeline benchmark: 1F1B vs 1F1B with 2BP vs ``auto``, measured side by side.

Two gloo ranks on this machine, one thread each (``torch.set_num_threads(1)``), so a rank
waiting on its peer is real idle time, as on a GPU. The model is a stack of residual MLP
blocks built from ``twobp.TwoBPLinear`` (cut evenly over the ranks). Per block and
micro-batch of r rows, width d, hidden h = 4d:

    forward  FLOPs = 2 * (2 r d h)       (two GEMMs)
    p1       FLOPs = 2 * (2 r d h)       (dX of both)
    p2       FLOPs = 2 * (2 r d h)       (dW of both)

Procedure: a warm-up run of 1F1B with 2BP measures per-stage F, P1, P2 and comm times
(the executor's ``costs``, median over the warm-up steps) and ``auto`` is built from
them; a warm-up run of plain 1F1B measures the fused backward B for its prediction. Then the variants take turns,
one step each, ``--repeats`` times (turns spread slow drifts of a shared machine over all
variants), and the median step time of each is reported next to the simulator's
prediction from the same measured costs. One more step per variant records a timeline
for the measured bubble.

Writes a markdown table (default ``bench/results/pipeline_cpu.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

# ---- settings (each has a flag) --------------------------------------------------------
DEFAULTS = dict(
    blocks=8,          # residual MLP blocks, cut evenly over the 2 ranks
    width=256,         # d
    rows=32,           # rows per micro-batch
    microbatches=8,    # m
    warmup=5,          # measured 1F1B-2BP steps; their per-entry median feeds auto
    repeats=12,        # timed steps per variant
    variants="1f1b,1f1b-2bp,zb-h1-2bp,auto-2bp",
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python bench/pipeline_cpu.py",
        description="Measure pipeline schedules on 2 CPU ranks (gloo, one thread each) and "
                    "compare with the simulator's prediction from measured costs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--blocks", type=int, default=DEFAULTS["blocks"], help="residual MLP blocks")
    ap.add_argument("--width", type=int, default=DEFAULTS["width"], help="model width d (hidden 4d)")
    ap.add_argument("--rows", type=int, default=DEFAULTS["rows"], help="rows per micro-batch")
    ap.add_argument("--microbatches", type=int, default=DEFAULTS["microbatches"],
                    help="micro-batches per step")
    ap.add_argument("--warmup", type=int, default=DEFAULTS["warmup"],
                    help="measured 1F1B-2BP warm-up steps; the per-stage medians feed auto")
    ap.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                    help="timed steps per variant (taken in turns)")
    ap.add_argument("--variants", default=DEFAULTS["variants"],
                    help="comma list of <schedule>[-2bp] (schedules: gpipe, 1f1b, zb-h1, auto)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/pipeline_cpu.md"),
                    help="markdown table to write")
    ap.add_argument("--timelines", type=Path, default=None,
                    help="also write each variant's measured timeline (trace JSON + PNG) here")
    return ap


def _blocks(n: int, d: int, seed: int = 0):
    import torch
    from torch import nn

    import twobp

    class ResidualMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = twobp.TwoBPLinear(d, 4 * d)
            self.down = twobp.TwoBPLinear(4 * d, d)

        def forward(self, x):
            return x + self.down(nn.functional.gelu(self.up(x)))

    torch.manual_seed(seed)
    return [ResidualMLP() for _ in range(n)]


def _mse(out, target):
    import torch
    return torch.nn.functional.mse_loss(out, target)


def _worker(rank: int, world: int, args: dict) -> dict | None:
    import torch
    import torch.distributed as dist

    from twobp.pipeline import Costs, PipelineExecutor, make_schedule, simulate

    torch.set_num_threads(1)
    p, m = world, args["microbatches"]
    blocks = _blocks(args["blocks"], args["width"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m * args["rows"], args["width"], generator=g)
    y = torch.randn(m * args["rows"], args["width"], generator=g)

    def executor(sched):
        return PipelineExecutor(blocks, _mse, schedule=sched, timeout=120)

    def warm_up(use_2bp: bool) -> dict:
        ex = executor(make_schedule("1f1b", stages=p, microbatches=m, twobp=use_2bp))
        ex.step(x, y, measure=False)  # first-call allocations
        runs = [ex.step(x, y, measure=True).costs for _ in range(args["warmup"])]
        # Per entry, the median over the warm-up steps: one step on a shared machine is noisy.
        return {k: ([statistics.median(c[k][s] for c in runs) for s in range(len(runs[0][k]))]
                    if isinstance(runs[0][k], list) else statistics.median(c[k] for c in runs))
                for k in runs[0]}

    split, fused = warm_up(True), warm_up(False)
    # P1/P2 from the 2BP run (what auto places); B from the fused run, for the 1F1B prediction.
    costs = Costs.from_mapping({**split, "B": fused["B"]})

    variants = {}
    for full in args["variants"].split(","):
        use_2bp = full.endswith("-2bp")
        name = full[:-4] if use_2bp else full
        sched = make_schedule(name, stages=p, microbatches=m, twobp=use_2bp, costs=costs)
        variants[sched.name] = (sched, executor(sched))
    for _, ex in variants.values():  # one untimed step each: first-call allocations
        ex.step(x, y, measure=False)
    times = {k: [] for k in variants}
    for _ in range(args["repeats"]):
        for k, (_, ex) in variants.items():
            dist.barrier()
            t0 = time.perf_counter()
            ex.step(x, y, measure=False)
            times[k].append(time.perf_counter() - t0)
    rows = {}
    for k, (sched, ex) in variants.items():
        res = ex.step(x, y, measure=True)
        sim = simulate(sched, costs)
        if args.get("timelines") and rank == 0:
            res.timeline.write(Path(args["timelines"]) / k)
            sim.timeline.write(Path(args["timelines"]) / f"{k}-simulated")
        rows[k] = dict(step=statistics.median(times[k]), spread=(min(times[k]), max(times[k])),
                       bubble=res.timeline.bubble_fraction(), sim_makespan=sim.makespan,
                       sim_bubble=sim.bubble_fraction, peak_store=res.peak_store_bytes,
                       sim_held=max(sim.peak_held), text=str(sched))
    peaks = [None] * world
    dist.all_gather_object(peaks, {k: r["peak_store"] for k, r in rows.items()})
    if rank != 0:
        return None
    for k in rows:
        rows[k]["peak_store"] = max(pk[k] for pk in peaks)
    return {"rows": rows, "costs": costs.as_dict()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt_costs(costs: dict) -> str:
    def f(v):
        return "/".join(f"{x * 1e3:.2f}" for x in v) if isinstance(v, list) else f"{v * 1e3:.2f}"
    return ", ".join(f"{k} {f(v)}" for k, v in costs.items())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from twobp.pipeline import spawn

    cfg = {k: getattr(args, k) for k in DEFAULTS}
    cfg["timelines"] = str(args.timelines) if args.timelines else None
    load = os.getloadavg()
    t0 = time.time()
    out = spawn(_worker, world_size=2, args=(cfg,), timeout=300, join_timeout=1800,
                env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})[0]
    took = time.time() - t0
    rows, costs = out["rows"], out["costs"]
    base = rows.get("1f1b", next(iter(rows.values())))
    samples = args.microbatches * args.rows
    d, h = args.width, 4 * args.width
    flops_f = 2 * 2 * args.rows * d * h * (args.blocks // 2)
    lines = [
        "# Pipeline schedules on CPU: measured vs simulated",
        "",
        f"- machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, load average "
        f"{load[0]:.2f} at start (the machine is shared); torch {torch.__version__}, gloo",
        f"- run: {datetime.datetime.now().isoformat(timespec='seconds')}, {took:.0f} s; command: "
        f"`python bench/pipeline_cpu.py --blocks {args.blocks} --width {args.width} --rows "
        f"{args.rows} --microbatches {args.microbatches} --warmup {args.warmup} --repeats "
        f"{args.repeats} --variants {args.variants}`",
        f"- 2 ranks, one thread each; {args.blocks} residual MLP blocks (d={d}, hidden {h}) cut "
        f"4+4; m={args.microbatches} micro-batches of {args.rows} rows; forward per stage and "
        f"micro-batch = {flops_f / 1e6:.0f} MFLOP (2 GEMMs x 2rdh per block), p1 and p2 the same",
        f"- costs measured in the warm-up (ms, per stage 0/1, median of {args.warmup} steps; "
        f"F, P1, P2, comm from 1F1B-2BP, B from 1F1B): {_fmt_costs(costs)}",
        f"- step time: median of {args.repeats} steps per variant, taken in turns; predicted = "
        "simulated makespan on the measured costs; bubble = idle share of both ranks' time in "
        "one measured step (timeline) and in the simulation",
        "",
        "| schedule | step, measured (ms) | min..max (ms) | step, predicted (ms) | samples/s | "
        "speedup vs 1f1b, measured | speedup, predicted | bubble, measured | bubble, predicted "
        "| peak held mb/rank (sim) | peak store, max rank (KiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in rows.items():
        lines.append(
            f"| {k} | {r['step'] * 1e3:.1f} | {r['spread'][0] * 1e3:.0f}..{r['spread'][1] * 1e3:.0f} "
            f"| {r['sim_makespan'] * 1e3:.1f} | {samples / r['step']:.0f} | "
            f"{base['step'] / r['step']:.3f}x | {base['sim_makespan'] / r['sim_makespan']:.3f}x | "
            f"{r['bubble']:.1%} | {r['sim_bubble']:.1%} | {r['sim_held']} | "
            f"{r['peak_store'] / 1024:.0f} |")
    auto = rows.get("auto-2bp")
    if auto is not None:
        lines += ["", "auto's schedule (from the measured costs):", "", "```", auto["text"], "```"]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
