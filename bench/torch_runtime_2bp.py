"""torch.distributed.pipelining's zero-bubble schedules with torch's own I/W split against the same
schedules with twobp stages (TwoBPPipelineStage: I = p1, W = p2 from the store), same model,
weights, data and machine, alternating step by step.

Per schedule and per contender it reports the median step time (tokens/s), the paired step-time
ratio twobp / torch (median and interquartile range over rounds: a range holding 1 is noise),
the peak saved-activation bytes per rank (``SavedActivationMeter``: what autograd saves plus
the twobp store, storages counted once, measured in an extra untimed step), and the losses
(which must agree). torch's contender runs the model with torch's own modules
(``twobp.revert``: nn.Linear, nn.RMSNorm, SDPA) and torch's PipelineStage, whose I step keeps
the stage's whole autograd graph (``retain_graph=True``) until W.

    python bench/torch_runtime_2bp.py --preset small --microbatches 4 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SCHEDULES = ("ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble")


def _stage_ids(name: str, rank: int, world: int) -> tuple[list[int], int]:
    n = 2 * world
    if name == "ScheduleZBVZeroBubble":
        return [rank, n - 1 - rank], n  # V shape: rank r holds stages r and 2p-1-r
    return [s for s in range(n) if s % world == rank], n  # looped


class _Runner:
    def __init__(self, name: str, ours: bool, args, rank: int, world: int):
        import torch.distributed.pipelining as tp

        import twobp
        from twobp import models
        from twobp.pipeline.partition import balance
        from twobp.pipeline.torch_runtime import TwoBPPipelineStage

        torch.manual_seed(args.seed)
        self.model = models.build("llama", args.preset)
        if not ours:
            twobp.revert(self.model)
        blocks = self.model.blocks()
        mine, n = _stage_ids(name, rank, world)
        part = balance(len(blocks), n)
        self.store = twobp.ActivationStore()
        mods = [nn.Sequential(*(blocks[i] for i in part.blocks_of(s))) for s in mine]
        if ours:
            self.stages = [TwoBPPipelineStage(m, s, n, torch.device("cpu"), store=self.store) for m, s in zip(mods, mine)]
        else:
            self.stages = [tp.PipelineStage(m, s, n, torch.device("cpu")) for m, s in zip(mods, mine)]
        self.sched = getattr(tp, name)(self.stages, args.microbatches, loss_fn=self.model.loss_fn)
        self.params = [p for st in self.stages for p in st.submod.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.first, self.last = 0 in mine, n - 1 in mine

    def step(self, x, y) -> float | None:
        losses: list = []
        kw = dict(target=y, losses=losses) if self.last else {}
        self.sched.step(x, **kw) if self.first else self.sched.step(**kw)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(torch.stack([l.detach().float() for l in losses]).mean()) if losses else None


def _worker(rank: int, world: int, args) -> dict:
    from twobp.benchmarks.saved_memory import SavedActivationMeter
    from twobp.data import ByteCorpus

    torch.set_num_threads(args.threads)
    data = ByteCorpus(seq_len=args.seq_len)
    out = {}
    for name in args.schedules:
        runners = {"torch": _Runner(name, False, args, rank, world), "twobp": _Runner(name, True, args, rank, world)}
        walls = {k: [] for k in runners}
        losses = {k: [] for k in runners}
        order = list(runners)
        for r in range(args.warmup + args.rounds):
            x, y = data.batch(r, args.batch_size, seed=args.seed)
            for k in order[r % 2:] + order[:r % 2]:  # alternate, the order rotated per round
                dist.barrier()
                t0 = time.perf_counter()
                loss = runners[k].step(x, y)
                dist.barrier()
                if r >= args.warmup:
                    walls[k].append(time.perf_counter() - t0)
                losses[k].append(loss)
        peaks = {}
        x, y = data.batch(0, args.batch_size, seed=args.seed + 1)
        for k, run in runners.items():
            with SavedActivationMeter(run.store, exclude=run.params) as meter:
                run.step(x, y)
            dist.barrier()
            peaks[k] = meter.peak_bytes
        out[name] = dict(walls=walls, losses=losses, peaks=peaks)
        if rank == 0:
            print(f"  {name}: torch {statistics.median(walls['torch']) * 1e3:.0f} ms, twobp "
                  f"{statistics.median(walls['twobp']) * 1e3:.0f} ms per step", flush=True)
    return out


def _quantile(v, q):
    v = sorted(v)
    pos = q * (len(v) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="llama preset (tiny, small, ...)")
    p.add_argument("--stages", type=int, default=2, help="ranks (two pipeline stages each)")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write the raw figures here")
    args = p.parse_args(argv)
    args.schedules = [s for s in args.schedules.split(",") if s]
    from twobp import models
    from twobp.pipeline import spawn
    from twobp.store import format_bytes

    seq = models.config("llama", args.preset).seq_len
    if args.seq_len != seq:
        raise SystemExit(f"--seq-len must be the preset's seq_len ({seq}) for llama/{args.preset}")
    per_rank = spawn(_worker, world_size=args.stages, args=(args,), timeout=300, join_timeout=7200,
                     env={"OMP_NUM_THREADS": str(args.threads)})
    tokens = args.batch_size * args.seq_len
    rows = ["| schedule | stage | tokens/s | step (median) | twobp/torch step-time ratio (median, IQR) | "
            "peak saved bytes per rank | final loss |", "|---|---|---:|---:|---|---|---:|"]
    raw = {}
    for name in args.schedules:
        walls = per_rank[0][name]["walls"]
        loss = {k: next(v for v in (r[name]["losses"][k][-1] for r in per_rank) if v is not None)
                for k in walls}
        peaks = {k: [r[name]["peaks"][k] for r in per_rank] for k in walls}
        ratios = [t / o for o, t in zip(walls["torch"], walls["twobp"])]  # > 1: twobp slower
        raw[name] = dict(walls=walls, peaks=peaks, loss=loss, ratios=ratios)
        for k in ("torch", "twobp"):
            med = statistics.median(walls[k])
            ratio = (f"{statistics.median(ratios):.3f} ({_quantile(ratios, .25):.3f}-{_quantile(ratios, .75):.3f})"
                     if k == "twobp" else "1 (baseline)")
            rows.append(f"| {name} | {'TwoBPPipelineStage' if k == 'twobp' else 'torch PipelineStage'} | "
                        f"{tokens / med:,.0f} | {med * 1e3:.1f} ms | {ratio} | "
                        f"{' / '.join(format_bytes(b) for b in peaks[k])} | {loss[k]:.5f} |")
    gap = max(abs(r["loss"]["torch"] - r["loss"]["twobp"]) / abs(r["loss"]["torch"]) for r in raw.values())
    text = "\n".join(rows) + f"\n\nlargest relative gap between the final losses: {gap:.1e}\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"`python bench/torch_runtime_2bp.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
