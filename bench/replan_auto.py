"""Does re-planning ``auto`` on the costs its own steps measure beat the plan made on the probe's?

``auto`` places P2 by per-kind costs a throw-away 1F1B + 2BP probe measured. Its own placement
may make those ops dearer (a P2 deferred further reads its inputs back from memory), so its
timed steps can cost more than the probe said (ResNet: up to 6%). This bench plans A on the
probe's costs, measures A's own steps, plans B on those, and times A and B alternating, one
step each per round (order flipped every round), on 2 gloo ranks x 1 thread.

    python bench/replan_auto.py [--model resnet] [--preset cpu] [--microbatches 8] [--batch-size 32]
                                [--rounds 10] [--out bench/results/replan_auto.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from twobp import train as T
from twobp.benchmarks.timing import machine_name
from twobp.pipeline import spawn
from twobp.pipeline.costs import PROBE_STEPS, median_costs


def _fused(schedule) -> int:
    return sum(a.kind == "B" for acts in schedule.ranks for a in acts)


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    from twobp.pipeline import init_mesh

    torch.set_num_threads(1)
    cfg = T.JobConfig(model=args.model, preset=args.preset, stages=world, microbatches=args.microbatches,
                      batch_size=args.batch_size, steps=1, warmup=0, timeout=300.0, quiet=True, out=None,
                      variants=(T.Variant("auto", True),))
    mesh = init_mesh(pp=world, dp=1)
    data = T.batch_source(cfg.model, T._meta_model(cfg))
    device = torch.device("cpu")
    probe = T._probe_costs(cfg, mesh, device, data)
    plan_a = T._Run(cfg, T.Variant("auto", True), mesh, device, probe)
    own = []
    for k in range(1 + PROBE_STEPS):
        x, y = data.batch(k, cfg.batch_size, seed=0)
        plan_a.step(x, y, measure=k > 0)
        if k > 0:
            own.append(plan_a.last.costs)
    # kinds A never ran (every backward fused, say) keep the probe's figure
    own_costs = median_costs(own)
    replanned = {**probe, **own_costs}
    plan_b = T._Run(cfg, T.Variant("auto", True), mesh, device, replanned)
    walls: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        pair = [("A", plan_a), ("B", plan_b)]
        for name, run in (pair if r % 2 == 0 else pair[::-1]):
            x, y = data.batch(1 + PROBE_STEPS + r, cfg.batch_size, seed=0)
            dist.barrier()
            t0 = time.perf_counter()
            run.step(x, y, measure=False)
            dist.barrier()
            walls[name].append(time.perf_counter() - t0)
    plan_a.ex.flush()
    plan_b.ex.flush()
    if rank:
        return None
    return dict(probe=probe, own=own_costs, walls=walls, fused=(_fused(plan_a.schedule), _fused(plan_b.schedule)),
                machine=machine_name(device), heads=(str(plan_a.schedule).splitlines()[0], str(plan_b.schedule).splitlines()[0]))


def _report(res: dict, args: argparse.Namespace, seconds: float) -> str:
    a, b = res["walls"]["A"], res["walls"]["B"]
    ratio = statistics.median(x / y for x, y in zip(a, b))
    kinds = [k for k in ("F", "P1", "P2", "B") if k in res["probe"]]
    rows = [f"| {k} | " + " / ".join(f"{v * 1e3:.1f}" for v in res["probe"][k]) + " | "
            + (" / ".join(f"{v * 1e3:.1f}" for v in res["own"][k]) if k in res["own"] else "-") + " |" for k in kinds]
    return "\n".join([
        "# auto re-planned on its own steps' costs",
        "",
        f"- machine: {res['machine']} per rank, 2 gloo ranks; torch {torch.__version__}",
        f"- command: `python bench/replan_auto.py --model {args.model} --preset {args.preset} --microbatches "
        f"{args.microbatches} --batch-size {args.batch_size} --rounds {args.rounds}` ({seconds:.0f} s)",
        "- A: auto on the probe's costs; B: auto on the costs A measured in its own steps "
        f"(median of {PROBE_STEPS}); then {args.rounds} rounds, one step of each, order flipped per round",
        "",
        "| kind | probe (ms per micro-batch, stage 0 / 1) | A's own steps |",
        "|---|---|---|",
        *rows,
        "",
        "| plan | backwards kept fused | median step | B's speed over A (median of paired rounds) |",
        "|---|---:|---:|---:|",
        f"| A `{res['heads'][0]}` | {res['fused'][0]} | {statistics.median(a) * 1e3:,.0f} ms | |",
        f"| B `{res['heads'][1]}` | {res['fused'][1]} | {statistics.median(b) * 1e3:,.0f} ms | {ratio:.3f}x |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet", help="model family (llama, bert, resnet)")
    ap.add_argument("--preset", default="cpu", help="model preset")
    ap.add_argument("--microbatches", type=int, default=8, help="micro-batches per step")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per step")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (one step of each plan per round)")
    ap.add_argument("--out", default=None, help="write the markdown report here too")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = spawn(_worker, world_size=2, args=(args,), timeout=300, join_timeout=3600, env={"OMP_NUM_THREADS": "1"})[0]
    text = _report(res, args, time.perf_counter() - t0)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
