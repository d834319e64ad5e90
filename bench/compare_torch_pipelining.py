"""twobp's schedules next to torch.distributed.pipelining's, same model, data and machine, one run.

Rows:

* ours: 1F1B, 1F1B with 2BP, and ``auto`` with 2BP (placement fed the costs measured by the
  2BP run), through :func:`twobp.train.run_job`;
* torch: ``Schedule1F1B`` (one stage per rank) and ``ScheduleInterleavedZeroBubble`` (two
  stages per rank, looped placement: virtual stage ``s`` on rank ``s % ranks``), on the
  same blocks cut by the same rule (:func:`twobp.pipeline.partition.balance`, by count).

Every variant starts from the weights made by ``torch.manual_seed(seed)`` and sees the batches
``ByteCorpus(...).batch(step, batch_size, seed=seed)``, with AdamW at the same lr, so the
loss curves must agree step by step (same math, different order). torch reports each
micro-batch's mean loss and scales gradients by 1/microbatches; their average is the
full-batch mean loss we report.

Throughput = tokens per step / median step time (rank 0's wall time of one optimizer step,
after ``--warmup`` steps). Memory: ours is the activation store's peak bytes per rank
(``StepResult.peak_store_bytes``: what p1/p2 keep between forward and backward). For torch
on CUDA we report ``torch.cuda.max_memory_allocated`` growth during a step (everything: it
includes gradients and optimizer state, so it is NOT the same measure); on CPU there is no
honest per-tensor peak to read, so the table says n/a.

    python bench/compare_torch_pipelining.py --steps 12 --microbatches 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

SCHEDULES_TORCH = ("Schedule1F1B", "ScheduleInterleavedZeroBubble")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- torch.distributed.pipelining worker (module level: spawn pickles it) ---------------
def _torch_worker(rank: int, world: int, schedule_name: str, args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed import pipelining as tp

    from twobp import models
    from twobp.data import ByteCorpus
    from twobp.pipeline.partition import balance

    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(args.seed)
    model = models.build("llama", args.preset, tie_embeddings=False).to(device)
    blocks = model.blocks()
    per_rank = 2 if schedule_name == "ScheduleInterleavedZeroBubble" else 1
    n_stages = world * per_rank
    part = balance(len(blocks), n_stages)
    my_stages = [s for s in range(n_stages) if s % world == rank]  # looped placement, as torch's
    stages = [tp.PipelineStage(nn.Sequential(*(blocks[i] for i in part.blocks_of(s))), s, n_stages, device)
              for s in my_stages]
    loss_fn = model.loss_fn
    if per_rank == 1:
        sched = tp.Schedule1F1B(stages[0], args.microbatches, loss_fn=loss_fn)
    else:
        sched = tp.ScheduleInterleavedZeroBubble(stages, args.microbatches, loss_fn=loss_fn)
    params = [p for st in stages for p in st.submod.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr)
    data = ByteCorpus(seq_len=model.config.seq_len + 1)
    has_first = 0 in my_stages
    has_last = n_stages - 1 in my_stages
    losses, seconds, peaks = [], [], []
    for step in range(args.steps):
        x, y = data.batch(step, args.batch_size, seed=args.seed)
        x, y = x.to(device), y.to(device)
        mb_losses: list = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        kwargs = {}
        if has_last:
            kwargs.update(target=y, losses=mb_losses)
        if has_first:
            sched.step(x, **kwargs)
        else:
            sched.step(**kwargs)
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        seconds.append(time.perf_counter() - t0)
        if has_last:
            losses.append(float(torch.stack([l.detach().float() for l in mb_losses]).mean()))
    dist.barrier()
    return dict(losses=losses if has_last else None, step_seconds=seconds[args.warmup:],
                peak_bytes=max(peaks) if peaks else None)


def run_torch(schedule_name: str, args: argparse.Namespace) -> dict:
    """One torch schedule in its own spawn call; the exact error instead of a row on failure."""
    from twobp.pipeline.launch import WorkerError, spawn

    backend = "nccl" if args.device == "cuda" else "gloo"
    try:
        per_rank = spawn(_torch_worker, world_size=args.stages, args=(schedule_name, args), backend=backend,
                         timeout=args.timeout, join_timeout=args.timeout * 2 + 60 + 30 * args.steps,
                         env={"OMP_NUM_THREADS": "1"})
    except WorkerError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        # The exception line: the last "SomethingError: ..." line of the worker's traceback.
        err = next((l for l in reversed(lines) if "Error" in l.split(":")[0]), lines[-1] if lines else str(e))
        print(f"  [{schedule_name}] FAILED: {e}", file=sys.stderr, flush=True)
        return dict(error=f"rank {e.rank}: {err}")
    losses = next(r["losses"] for r in per_rank if r["losses"] is not None)
    return dict(losses=losses, step_seconds=per_rank[0]["step_seconds"],
                peak_bytes=[r["peak_bytes"] for r in per_rank])


# ---- report ---------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def build_table(rows: list[dict], tokens_per_step: int) -> tuple[str, list[str]]:
    base = rows[0]
    base_tput = tokens_per_step / statistics.median(base["step_seconds"])
    # Without 2BP nothing passes through the store (autograd keeps the activations), so the
    # store-peak ratio is taken against our 1F1B +2BP, the first row that fills the store.
    mem_base = next((r for r in rows if r["impl"] == "twobp" and max(r["peak_bytes"]) > 0), base)
    base_peak = max(mem_base["peak_bytes"])
    out = ["| implementation | schedule | tokens/s | vs our 1F1B | median step | peak memory per rank "
           "(measure) | peak vs our 1F1B +2BP | final loss | max rel. loss gap vs our 1F1B |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    notes = []
    for r in rows:
        if "error" in r:
            err = r["error"].replace("|", "\\|")
            out.append(f"| {r['impl']} | {r['name']} | failed | | | | | | `{err}` |")
            continue
        med = statistics.median(r["step_seconds"])
        tput = tokens_per_step / med
        gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(base["losses"], r["losses"]))
        if r["impl"] == "twobp":
            mem = " / ".join(_fmt_bytes(b) for b in r["peak_bytes"]) + " (activation store)"
            if not max(r["peak_bytes"]):
                mem += ": unused without 2BP, autograd's saved tensors are not counted"
            mem_ratio = f"{max(r['peak_bytes']) / base_peak:.2f}x" if base_peak and max(r["peak_bytes"]) else "n/a"
        elif all(b is not None for b in r["peak_bytes"]):
            mem = " / ".join(_fmt_bytes(b) for b in r["peak_bytes"]) + " (CUDA allocated growth, all tensors)"
            mem_ratio = "not comparable"
        else:
            mem, mem_ratio = "n/a on CPU", "n/a"
        out.append(f"| {r['impl']} | {r['name']} | {tput:,.0f} | {tput / base_tput:.2f}x | {med * 1e3:.1f} ms | "
                   f"{mem} | {mem_ratio} | {r['losses'][-1]:.5f} | {gap:.1e} |")
        if len(r["losses"]) != len(base["losses"]):
            notes.append(f"{r['name']}: {len(r['losses'])} losses vs {len(base['losses'])}")
    return "\n".join(out), notes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="llama size preset (twobp.models.presets('llama'))")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per step")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (all variants)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo, 1 thread per rank; cuda: NCCL, one GPU per rank")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for a silent peer")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative loss gap counted as equal")
    p.add_argument("--out", default="bench/results/compare_torch_pipelining.md", help="markdown table path")
    args = p.parse_args(argv)
    args.stages = 2
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    if args.batch_size % args.microbatches:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --microbatches {args.microbatches} "
                "(torch splits the batch into equal micro-batches)")
    return args


def main(argv=None) -> int:
    from twobp import models
    from twobp.train import JobConfig, Variant, run_job

    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    seq_len = models.config("llama", args.preset).seq_len
    tokens_per_step = args.batch_size * seq_len

    t_start = time.perf_counter()
    cfg = JobConfig(model="llama", preset=args.preset, stages=args.stages, microbatches=args.microbatches,
                    batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, lr=args.lr, seed=args.seed,
                    device=args.device, threads=1, timeout=args.timeout, out=None,
                    variants=(Variant("1f1b", False), Variant("1f1b", True), Variant("auto", True)))
    print(f"twobp: {', '.join(v.label for v in cfg.variants)}", flush=True)
    rows = [dict(impl="twobp", name=r.label, losses=r.losses, step_seconds=r.step_seconds,
                 peak_bytes=r.peak_bytes) for r in run_job(cfg)]
    for name in SCHEDULES_TORCH:
        print(f"torch.distributed.pipelining: {name}", flush=True)
        label = name + (" (2 stages/rank)" if "Interleaved" in name else "")
        rows.append(dict(impl="torch", name=label, **run_torch(name, args)))

    table, notes = build_table(rows, tokens_per_step)
    ok = [r for r in rows if "error" not in r]
    worst = max(abs(a - b) / max(abs(a), 1e-12) for r in ok for a, b in zip(ok[0]["losses"], r["losses"]))
    machine = cpu_model() if args.device == "cpu" else torch.cuda.get_device_name()
    text = "\n".join([
        "# twobp vs torch.distributed.pipelining",
        "",
        f"- machine: {machine} ({os.cpu_count()} logical CPUs visible, shared); {args.stages} ranks, "
        + ("gloo, 1 CPU thread per rank" if args.device == "cpu" else "NCCL, one GPU per rank"),
        f"- command: `{command}`",
        f"- model: llama/{args.preset} (seq_len {seq_len}), batch {args.batch_size} in {args.microbatches} "
        f"micro-batches, {args.steps} AdamW steps (lr {args.lr}), seed {args.seed}; step time = median over "
        f"steps {args.warmup + 1}..{args.steps} (rank 0's wall time incl. optimizer step); torch {torch.__version__}",
        f"- losses: largest relative gap of any variant's per-step loss vs our 1F1B = {worst:.1e} "
        f"({'equal' if worst <= args.rtol else 'NOT equal'} at rtol {args.rtol:g})",
        "- memory: ours = peak bytes of saved activations in the twobp store per rank (only 2BP runs use the "
        "store, so plain 1F1B shows 0 and the ratio is taken vs our 1F1B +2BP); torch on CPU has no "
        "allocator statistics, so no figure is given rather than an invented one",
        *(f"- note: {n}" for n in notes),
        "",
        table,
        "",
        f"(whole run: {time.perf_counter() - t_start:.0f} s)",
        "",
    ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0 if worst <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
