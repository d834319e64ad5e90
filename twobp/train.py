"""Pipelined training jobs: what `twobp run`, `twobp train` and `twobp compare` execute.

A job trains one model with one or more pipeline *variants* (schedule x 2BP on/off),
on the same data from the same initial weights, and reports per variant:

* throughput (tokens/s for language models, samples/s otherwise), from the median step
  time after ``warmup`` steps;
* the bubble: idle share of the ranks' time in the last step's measured timeline;
* peak bytes in each stage's saved-activation store;
* the loss of every step (variants must agree: same math, different order).

Ranks come from ``torchrun`` (one process per rank, any number of nodes) when its
environment is set, or are spawned on this machine otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .store import format_bytes

__all__ = ["JobConfig", "Variant", "VariantResult", "run_job", "format_results", "results_to_json"]


@dataclass(frozen=True)
class Variant:
    """One pipeline schedule to run: a name of :func:`twobp.pipeline.make_schedule` and 2BP on/off."""

    schedule: str
    twobp: bool

    @property
    def label(self) -> str:
        return f"{self.schedule}{' +2BP' if self.twobp else ''}"


@dataclass(kw_only=True)
class JobConfig:
    """Everything a pipelined training job needs; every field has a CLI flag of the same name."""

    model: str = "llama"
    """Model family: llama, bert or resnet."""
    preset: str = "tiny"
    """Model size preset (see `twobp.models.presets`)."""
    stages: int = 2
    """Pipeline ranks (processes; GPUs under NCCL)."""
    chunks: int = 1
    """Model chunks per rank (interleaved-1f1b needs >= 2)."""
    microbatches: int = 4
    """Micro-batches per step."""
    batch_size: int = 8
    """Sequences (or images) per step, split into the micro-batches."""
    variants: tuple[Variant, ...] = (Variant("1f1b", False), Variant("1f1b", True))
    """Schedules to run, one after another, each from the same initial weights."""
    steps: int = 20
    """Optimizer steps per variant."""
    warmup: int = 2
    """Steps left out of the throughput figure (compilation, allocator warm-up)."""
    lr: float = 3e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seed of the weights and the data order."""
    device: str = "auto"
    """cpu (gloo, torch reference backend), cuda (NCCL, Triton kernels) or auto."""
    threads: int = 1
    """torch threads per rank on CPU (1 makes a bubble real idle time)."""
    timeout: float = 120.0
    """Seconds a rank waits for a silent peer before the job fails with an error."""
    tie_embeddings: bool = False
    """Tie a language model's head to its embedding (then they must sit on one rank)."""
    out: str | None = "runs/latest"
    """Folder for the timeline traces/pictures and results (None: write nothing)."""
    checkpoint: str | None = None
    """Folder to save per-stage state dicts into after the last step."""
    resume: str | None = None
    """Folder of per-stage state dicts (any stage count) to start from."""
    quiet: bool = False
    """No per-step progress lines."""

    def __post_init__(self) -> None:
        for name in ("stages", "chunks", "microbatches", "batch_size", "steps", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.warmup < 0 or self.warmup >= self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}; "
                             "lower --warmup or raise --steps")
        if self.batch_size < self.microbatches:
            raise ValueError(f"batch_size={self.batch_size} cannot make {self.microbatches} micro-batches; "
                             f"use --batch-size >= {self.microbatches}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and torch.cuda.device_count() < self.stages and "RANK" not in os.environ:
            raise ValueError(f"--device cuda with {self.stages} stages needs {self.stages} GPUs, "
                             f"{torch.cuda.device_count()} visible; use --device cpu or fewer --stages")
        if not self.variants:
            raise ValueError("variants is empty: give at least one schedule")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.device_count() >= self.stages else "cpu"


@dataclass
class VariantResult:
    """What one variant measured (rank 0's view, with per-stage figures gathered)."""

    schedule: str
    twobp: bool
    losses: list[float]
    step_seconds: list[float]
    items_per_step: int
    unit: str  # "tokens" or "samples"
    bubble_fraction: float
    peak_bytes: list[int]  # per rank
    store_empty: bool
    timeline: Any = field(default=None, repr=False)
    costs: dict | None = None

    @property
    def label(self) -> str:
        return Variant(self.schedule, self.twobp).label

    @property
    def throughput(self) -> float:
        return self.items_per_step / statistics.median(self.step_seconds)

    @property
    def loss(self) -> float:
        return self.losses[-1]


# ---- the worker -----------------------------------------------------------------------
def _data_source(cfg: JobConfig, model):
    from .data import ByteCorpus, SyntheticBatches

    if cfg.model == "llama":
        return ByteCorpus(seq_len=model.config.seq_len + 1)
    return SyntheticBatches(lambda batch_size, generator=None, device=None:
                            model.example_batch(batch_size, generator=generator), name=f"synthetic {cfg.model}")


def _items_per_step(cfg: JobConfig, model) -> tuple[int, str]:
    if cfg.model in ("llama", "bert"):
        return cfg.batch_size * model.config.seq_len, "tokens"
    return cfg.batch_size, "samples"


def _build_model(cfg: JobConfig):
    from . import models

    overrides = {"tie_embeddings": cfg.tie_embeddings} if cfg.model == "llama" else {}
    torch.manual_seed(cfg.seed)
    return models.build(cfg.model, cfg.preset, **overrides)


def _worker(rank: int, world: int, cfg: JobConfig) -> list[dict] | None:
    from .pipeline import PipelineExecutor, make_schedule
    from .checkpoint import load_stage_state, save_stage_state

    device_kind = cfg.resolved_device()
    if device_kind == "cpu":
        torch.set_num_threads(cfg.threads)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    results = []
    measured_costs = None
    for variant in cfg.variants:
        model = _build_model(cfg)
        data = _data_source(cfg, model)
        items, unit = _items_per_step(cfg, model)
        costs = measured_costs if variant.schedule in ("auto", "zb-h1") else None
        sched = make_schedule(variant.schedule, stages=world, microbatches=cfg.microbatches,
                              twobp=variant.twobp, chunks=cfg.chunks, costs=costs)
        ex = PipelineExecutor(model.blocks(), model.loss_fn, schedule=sched, device=device, timeout=cfg.timeout)
        if cfg.resume:
            load_stage_state(ex, cfg.resume)
        opt = torch.optim.AdamW(list(ex.parameters()), lr=cfg.lr)
        losses, seconds, last = [], [], None
        for step in range(cfg.steps):
            x, y = data.batch(step, cfg.batch_size, seed=cfg.seed)
            t0 = time.perf_counter()
            last = ex.step(x.to(device), y.to(device), optimizer=opt, measure=(step == cfg.steps - 1))
            seconds.append(time.perf_counter() - t0)
            losses.append(last.loss)
            if rank == 0 and not cfg.quiet:
                rate = items / seconds[-1]
                print(f"  [{variant.label:<22}] step {step + 1:>3}/{cfg.steps}  loss {last.loss:.4f}  "
                      f"{rate:,.0f} {unit}/s", flush=True)
        peaks = [0] * world
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (last.peak_store_bytes, last.store_empty))
        peaks = [g[0] for g in gathered]
        empty = all(g[1] for g in gathered)
        if cfg.checkpoint and variant == cfg.variants[-1]:
            save_stage_state(ex, cfg.checkpoint)
        if last.costs is not None and variant.twobp:
            measured_costs = last.costs
        results.append(dict(schedule=variant.schedule, twobp=variant.twobp, losses=losses,
                            step_seconds=seconds[cfg.warmup:], items_per_step=items, unit=unit,
                            bubble_fraction=last.timeline.bubble_fraction() if last.timeline else math.nan,
                            peak_bytes=peaks, store_empty=empty, timeline=last.timeline, costs=last.costs))
        del ex, opt, model
    return results if rank == 0 else None


def run_job(cfg: JobConfig) -> list[VariantResult]:
    """Run every variant of ``cfg``; returns rank 0's results (empty on other torchrun ranks)."""
    from .pipeline import init_from_env, spawn

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if cfg.resolved_device() == "cuda" else "gloo"
        rank, world = init_from_env(backend=backend, timeout=cfg.timeout)
        if world != cfg.stages:
            raise ValueError(f"torchrun started {world} processes but --stages is {cfg.stages}; "
                             f"use --nproc_per_node/--nnodes for {cfg.stages} ranks")
        raw = _worker(rank, world, cfg)
        dist.barrier()
        return [VariantResult(**r) for r in raw] if raw else []
    backend = "nccl" if cfg.resolved_device() == "cuda" else "gloo"
    env = {"OMP_NUM_THREADS": str(cfg.threads)} if backend == "gloo" else {}
    per_rank = spawn(_worker, world_size=cfg.stages, args=(cfg,), backend=backend, timeout=cfg.timeout,
                     join_timeout=cfg.timeout * 2 + 60 + 30 * cfg.steps * len(cfg.variants), env=env)
    return [VariantResult(**r) for r in per_rank[0]]


# ---- reporting ------------------------------------------------------------------------
def format_results(results: Sequence[VariantResult], *, baseline: int = 0) -> str:
    """Markdown table, one row per variant, ratios against ``results[baseline]``."""
    base = results[baseline]
    unit = base.unit
    rows = [f"| schedule | 2BP | {unit}/s | vs {base.label} | bubble | peak saved bytes per stage | "
            "final loss |", "|---|---|---:|---:|---:|---|---:|"]
    for r in results:
        rows.append(f"| {r.schedule} | {'yes' if r.twobp else 'no'} | {r.throughput:,.0f} | "
                    f"{r.throughput / base.throughput:.2f}x | {r.bubble_fraction:.1%} | "
                    f"{' / '.join(format_bytes(b) for b in r.peak_bytes)} | {r.loss:.5f} |")
    return "\n".join(rows)


def losses_agree(results: Sequence[VariantResult], rtol: float = 1e-4) -> tuple[bool, float]:
    """Whether every variant's loss curve matches the first's; the largest relative gap."""
    ref = results[0].losses
    worst = 0.0
    for r in results[1:]:
        for a, b in zip(ref, r.losses):
            worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    return worst <= rtol, worst


def results_to_json(results: Sequence[VariantResult], cfg: JobConfig, machine: str) -> dict:
    return {
        "config": {k: (list(map(dataclasses.asdict, v)) if k == "variants" else v)
                   for k, v in dataclasses.asdict(cfg).items() if k != "variants"} | {
            "variants": [dataclasses.asdict(v) for v in cfg.variants]},
        "machine": machine,
        "rows": [{"schedule": r.schedule, "twobp": r.twobp, f"{r.unit}_per_s": r.throughput,
                  "bubble_fraction": r.bubble_fraction, "peak_bytes": max(r.peak_bytes),
                  "peak_bytes_per_stage": r.peak_bytes, "loss": r.loss, "losses": r.losses,
                  "store_empty": r.store_empty} for r in results],
    }


def write_timelines(results: Sequence[VariantResult], out: Path) -> list[Path]:
    """One trace (and PNG) per variant, and one picture stacking them all."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in results:
        if r.timeline is not None:
            slug = r.label.replace(" +", "-").replace(" ", "")
            written += r.timeline.write(out / f"timeline-{slug}")
    png = _stacked_png([r for r in results if r.timeline is not None], out / "timeline-compare.png")
    if png:
        written.append(png)
    return written


def _stacked_png(results: Sequence[VariantResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    from .pipeline.timeline import KIND_COLORS

    if not results:
        return None
    span = max(r.timeline.makespan for r in results) or 1.0
    ranks = results[0].timeline.ranks
    fig, axes = plt.subplots(len(results), 1, figsize=(12, 0.55 * ranks * len(results) + 1.2 * len(results)),
                             sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        tl = r.timeline
        for k in range(tl.ranks):
            ax.broken_barh([(0, tl.makespan)], (k - 0.4, 0.8), facecolors="#EEEEEE")
        for e in tl.events:
            if e.kind in KIND_COLORS:
                h = 0.8 if e.kind in ("F", "B", "P1", "P2") else 0.25  # thin: waiting on a peer
                ax.broken_barh([(e.start, e.duration)], (e.rank - h / 2, h),
                               facecolors=KIND_COLORS[e.kind], edgecolors="white", linewidth=0.4)
        ax.set_yticks(range(tl.ranks), [f"rank {k}" for k in range(tl.ranks)])
        ax.invert_yaxis()
        ax.set_title(f"{r.label}: step {tl.makespan * 1e3:.0f} ms, bubble {tl.bubble_fraction():.1%}", fontsize=9)
    axes[-1, 0].set_xlim(0, span)
    axes[-1, 0].set_xlabel("time in the measured step (s)")
    kinds = [k for k in KIND_COLORS if any(e.kind == k for r in results for e in r.timeline.events)]
    fig.legend(handles=[Patch(color=KIND_COLORS[k], label="waiting on a peer" if k == "recv" else k)
                        for k in kinds] +
               [Patch(color="#EEEEEE", label="idle")], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_json(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path
