"""Pipelined training jobs: what `twobp run`, `twobp train` and `twobp compare` execute.

A job trains one model with one or more pipeline *variants* (schedule x 2BP on/off),
on the same data from the same initial weights. All variants live in the same processes
and **alternate step by step** (one step of each per round, the order rotated every
round), so a drift in machine speed hits all of them alike. Per variant it reports:

* throughput (tokens/s for language models, samples/s otherwise), from the median step
  time after ``warmup`` steps, and the speedup over the first variant as the median of
  the per-round ratios, with its interquartile range (a range holding 1 is noise);
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

__all__ = ["JobConfig", "Variant", "VariantResult", "run_job", "format_results", "results_to_json", "batch_source",
           "realised_gain"]


@dataclass(frozen=True)
class Variant:
    """One pipeline schedule to run: a name of :func:`twobp.pipeline.make_schedule` and 2BP on/off.

    ``memory_limit`` (``auto`` only): the most micro-batch chunks a rank may hold from a
    forward to its P2; None holds as many as the placement wants. Written ``auto@N``."""

    schedule: str
    twobp: bool
    memory_limit: int | None = None

    @property
    def label(self) -> str:
        cap = f"@{self.memory_limit}" if self.memory_limit is not None else ""
        return f"{self.schedule}{cap}{' +2BP' if self.twobp else ''}"

    @classmethod
    def parse(cls, name: str, twobp: bool) -> "Variant":
        """``auto@6`` -> Variant("auto", twobp, 6); a plain name -> Variant(name, twobp). Raises
        ValueError naming the form when the cap is malformed or not on auto."""
        from .pipeline.generators import split_memory_cap

        base, cap = split_memory_cap(name)
        return cls(base, twobp, cap)


@dataclass(kw_only=True)
class JobConfig:
    """Everything a pipelined training job needs; every field has a CLI flag of the same name."""

    model: str = "llama"
    """Model family: llama, bert, resnet or mamba."""
    preset: str = "tiny"
    """Model size preset (see `twobp.models.presets`)."""
    stages: int = 2
    """Pipeline ranks (processes; GPUs under NCCL)."""
    chunks: int = 1
    """Model chunks per rank (interleaved-1f1b needs >= 2)."""
    layout: str = "loop"
    """Chunk placement with chunks > 1: loop (Megatron's, stage c*p + r) or v (ZB-V's: rank r runs
    stages r and 2p-1-r; auto and gpipe only)."""
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
    overlap_steps: bool = True
    """2BP schedules carry trailing P2 (and the rank's optimizer step) into the next step's
    fill where the cost model says it shortens the step (``PipelineExecutor(overlap_steps=)``)."""
    dp: int = 1
    """Data-parallel replicas of the pipeline: stages x dp processes, gradients averaged over
    replicas (each replica takes batch_size / dp rows of every step's batch)."""
    dtype: str = "fp32"
    """Parameter dtype: fp32, bf16 (fp32 gradients, fp32 master weights and optimizer state:
    twobp.MasterWeights) or fp16 (the same, with a GradScaler)."""
    clip_grad_norm: float | None = None
    """Clip the whole model's gradient norm (over every rank) to this before each step."""
    bucket_mb: float = 25.0
    """Size of the data-parallel all-reduce buckets."""
    out: str | None = "runs/latest"
    """Folder for the timeline traces/pictures and results (None: write nothing)."""
    checkpoint: str | None = None
    """Folder to save per-stage state dicts into after the last step."""
    resume: str | None = None
    """Folder of per-stage state dicts (any stage count) to start from."""
    quiet: bool = False
    """No per-step progress lines."""
    hf_config: str | None = None
    """A Hugging Face config instead of --model/--preset: a config.json (or its folder), or a
    transformers model type with overrides (``llama:hidden_size=64,...``); the model is built
    with random weights, converted and cut by twobp.hf (nothing is downloaded)."""

    def __post_init__(self) -> None:
        for name in ("stages", "chunks", "microbatches", "batch_size", "steps", "threads", "dp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.warmup < 0 or self.warmup >= self.steps:
            raise ValueError(f"--warmup must be in [0, --steps {self.steps}), got {self.warmup}; "
                             "lower --warmup or raise --steps")
        if self.batch_size < self.microbatches:
            raise ValueError(f"--batch-size {self.batch_size} cannot make {self.microbatches} micro-batches; "
                             f"use --batch-size >= {self.microbatches}")
        if self.batch_size % self.dp or self.batch_size // self.dp < self.microbatches:
            raise ValueError(f"--batch-size {self.batch_size} must split into --dp {self.dp} equal replica shares of "
                             f"at least --microbatches {self.microbatches} rows; use --batch-size "
                             f"{self.dp * self.microbatches} or a multiple of it")
        from .pipeline.actions import LAYOUTS
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.clip_grad_norm is not None and not (isinstance(self.clip_grad_norm, (int, float))
                                                    and math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise ValueError(f"--clip-grad-norm must be a finite number > 0, got {self.clip_grad_norm!r}")
        if not (isinstance(self.bucket_mb, (int, float)) and math.isfinite(self.bucket_mb) and self.bucket_mb > 0):
            raise ValueError(f"--bucket-mb must be a finite number > 0, got {self.bucket_mb!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and torch.cuda.device_count() < self.stages * self.dp and "RANK" not in os.environ:
            raise ValueError(f"--device cuda with {self.stages} stages x {self.dp} replicas needs "
                             f"{self.stages * self.dp} GPUs, {torch.cuda.device_count()} visible; use --device cpu, "
                             "fewer --stages or --dp, or torchrun across nodes")
        if not self.variants:
            raise ValueError("variants is empty: give at least one schedule")
        for name in ("lr", "timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (name == "timeout" and v == 0):
                raise ValueError(f"--{name} must be a finite number {'> 0' if name == 'timeout' else '>= 0'}, "
                                 f"got {v!r}")

    def preflight(self) -> None:
        """Every check that can fail before a rank is spawned, each a one-line ValueError
        naming the fix: model and preset, schedules against stages, chunks and
        micro-batches, blocks against stages, tied weights across ranks, the resume
        folder, and whether --out / --checkpoint can be written."""
        from . import models
        from .pipeline import SCHEDULE_NAMES, make_schedule
        from .pipeline.flags import as_flags

        overrides = {"tie_embeddings": self.tie_embeddings} if self.model == "llama" else {}
        if self.tie_embeddings and (self.model != "llama" or self.hf_config):
            raise ValueError(f"--tie-embeddings is for llama models, not {self.hf_config or self.model} (a Hugging Face "
                             "config says tie_word_embeddings itself)")
        try:
            model = _meta_model(self) if self.hf_config else models.build(self.model, self.preset, device="meta",
                                                                          **overrides)
        except (ValueError, NotImplementedError, ImportError) as e:
            what = f"--hf-config {self.hf_config}" if self.hf_config else f"--model {self.model} --preset {self.preset}"
            raise ValueError(f"{what}: {e}") from None
        blocks = model.blocks()
        need = self.stages * self.chunks
        if len(blocks) < need:
            raise ValueError(f"{self.model}/{self.preset} has {len(blocks)} blocks, fewer than --stages x --chunks "
                             f"= {need}: use at most {len(blocks)} stages (or a bigger preset)")
        for v in self.variants:
            if v.schedule.endswith("-2bp") and v.schedule[:-4] in SCHEDULE_NAMES:
                raise ValueError(f"schedule {v.schedule!r}: twobp train splits the backward with --2bp (on by default; "
                                 f"--no-2bp for the plain schedule), so write {v.schedule[:-4]!r}")
            if v.schedule not in SCHEDULE_NAMES:
                raise ValueError(f"unknown schedule {v.schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
            if v.schedule == "auto" and not v.twobp:
                raise ValueError(f"{v.label}: auto places each layer's P2, so it needs the split backward: drop --no-2bp "
                                 "for auto (compare it with 1f1b --no-2bp in the same run)")
            if v.schedule == "auto" and v.memory_limit is not None and isinstance(v.memory_limit, int) \
                    and not isinstance(v.memory_limit, bool) and v.memory_limit < self.chunks:
                raise ValueError(f"{v.label}: with --chunks {self.chunks} a rank holds at least one micro-batch per "
                                 f"chunk, so the cap must be >= {self.chunks} (auto@{self.chunks})")
            if v.schedule == "interleaved-1f1b" and self.chunks < 2:
                raise ValueError("interleaved-1f1b interleaves several model chunks per rank: add --chunks 2 (or more); "
                                 "with one chunk it is plain 1f1b")
            if v.memory_limit is not None and (v.schedule != "auto" or isinstance(v.memory_limit, bool)
                                               or not isinstance(v.memory_limit, int) or v.memory_limit < 1):
                raise ValueError(f"{v.label}: memory_limit is for auto only and must be an int >= 1 micro-batch "
                                 f"chunks per rank, got {v.memory_limit!r}")
            if v.schedule == "auto" and self.layout == "loop":
                continue  # built from measured costs at run time; its checks are the ones below
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # too few micro-batches only warns; the run says so too
                try:
                    make_schedule(v.schedule, stages=self.stages, microbatches=self.microbatches, twobp=v.twobp,
                                  chunks=self.chunks, layout=self.layout, validate_result=False)
                except ValueError as e:
                    raise ValueError(as_flags(str(e), memory_limit="auto@{}")) from None
        if self.resume:
            folder = Path(self.resume)
            if not folder.is_dir() or not any(folder.glob("stage-*.pt")):
                raise ValueError(f"--resume {self.resume}: no stage-*.pt files there; give a folder a previous "
                                 "--checkpoint wrote")
            self._check_resume_fits(folder, blocks)
        for flag, folder in (("--out", self.out), ("--checkpoint", self.checkpoint)):
            if folder:
                _check_writable(flag, Path(folder))

    def _check_resume_fits(self, folder: Path, blocks) -> None:
        """The checkpoint holds every tensor of this model with its shape (files mapped, not read)."""
        from torch import nn

        from .checkpoint import load_full_state_dict

        try:
            have = load_full_state_dict(folder, mmap=True)
        except (ValueError, RuntimeError, OSError) as e:
            raise ValueError(f"--resume {self.resume}: {e}") from None
        want = nn.Sequential(*blocks).state_dict(keep_vars=True)
        missing = [k for k in want if k not in have]
        wrong = [k for k in want if k in have and tuple(have[k].shape) != tuple(want[k].shape)]
        if missing or wrong:
            what = self.hf_config or f"{self.model} --preset {self.preset}"
            raise ValueError(f"--resume {self.resume}: the checkpoint does not fit {what}: "
                             + (f"{len(missing)} tensors missing, e.g. {missing[:3]}" if missing else "")
                             + ("; " if missing and wrong else "")
                             + (f"{len(wrong)} of other shapes, e.g. {wrong[0]} {tuple(have[wrong[0]].shape)} vs "
                                f"{tuple(want[wrong[0]].shape)}" if wrong else "")
                             + ". Resume with the model and preset that wrote it")
        names_of: dict[int, list[str]] = {}
        for k, t in want.items():  # one tensor under several keys: a tied weight
            names_of.setdefault(id(t), []).append(k)
        for names in (v for v in names_of.values() if len(v) > 1):
            if any(not torch.equal(have[names[0]], have[k]) for k in names[1:]):
                raise ValueError(f"--resume {self.resume}: this model ties {' and '.join(names)}, but the checkpoint "
                                 "holds different values for them (saved without --tie-embeddings?): resume it "
                                 "without --tie-embeddings, or from a checkpoint saved with the weights tied")

    @property
    def world(self) -> int:
        """Processes the job runs: pipeline stages x data-parallel replicas."""
        return self.stages * self.dp

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.device_count() >= self.world else "cpu"


def _check_writable(flag: str, folder: Path) -> None:
    """Fail now, not after training, when ``folder`` cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".twobp-write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror or e}); choose another folder") \
            from None


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
    carry: list[int] = field(default_factory=list)
    """P2 micro-batches each rank carried into the next step (empty: none)."""
    replicas: int = 1
    """Data-parallel replicas that shared each step's batch."""
    memory_limit: int | None = None
    """auto's cap: micro-batch chunks a rank held at most from F to P2 (None: no cap)."""
    skipped_steps: int | None = None
    """Optimizer steps fp16 loss scaling skipped (inf/nan gradients), warm-up included; None
    without loss scaling (fp32, bf16)."""

    @property
    def label(self) -> str:
        return Variant(self.schedule, self.twobp, self.memory_limit).label

    @property
    def throughput(self) -> float:
        return self.items_per_step / statistics.median(self.step_seconds)

    @property
    def loss(self) -> float:
        return self.losses[-1]

    def speedup_over(self, base: "VariantResult") -> tuple[float, float, float]:
        """Speed relative to ``base`` from the steps both ran in the same round (they
        alternate): (median, first quartile, third quartile) of base time / own time."""
        ratios = sorted(b / a for a, b in zip(self.step_seconds, base.step_seconds))
        return statistics.median(ratios), _quantile(ratios, 0.25), _quantile(ratios, 0.75)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


# ---- the worker -----------------------------------------------------------------------
def batch_source(model_name: str, model):
    """Where a job's batches come from (``.batch(step, batch_size, seed=)``): the stdlib byte
    corpus for language models, the model's labelled synthetic batches otherwise."""
    from .data import ByteCorpus, SyntheticBatches

    if hasattr(model, "batch_source"):  # a Hugging Face job model (twobp.hf.job)
        return model.batch_source()
    if model_name in ("llama", "mamba"):
        return ByteCorpus(seq_len=model.config.seq_len + 1)
    return SyntheticBatches(lambda batch_size, generator=None, device=None:
                            model.example_batch(batch_size, generator=generator), name=f"synthetic {model_name}")


def _items_per_step(cfg: JobConfig, model) -> tuple[int, str]:
    if cfg.model in ("llama", "bert", "mamba") or cfg.hf_config:
        return cfg.batch_size * model.config.seq_len, "tokens"
    return cfg.batch_size, "samples"


def _overrides(cfg: JobConfig) -> dict:
    return {"tie_embeddings": cfg.tie_embeddings} if cfg.model == "llama" else {}


def _meta_model(cfg: JobConfig):
    """The job's model on the meta device: blocks and sizes, no memory."""
    if cfg.hf_config:
        from .hf.job import HFJobModel
        return HFJobModel(cfg.hf_config, device="meta")
    from . import models
    # the job's dtype: the batch source casts floating inputs (images) to the model's
    return models.build(cfg.model, cfg.preset, device="meta", dtype=cfg.torch_dtype, **_overrides(cfg))


def _build_stage_model(cfg: JobConfig, pp_rank: int, device):
    """This rank's blocks only (the rest stay on the meta device), and the cut they follow.
    Values equal the whole model built with the same seed."""
    from . import models
    from .pipeline.actions import stage_of
    from .pipeline.partition import balance

    if cfg.hf_config:  # every rank builds the whole (seeded) model and keeps its own blocks
        from .hf.job import HFJobModel
        model = HFJobModel(cfg.hf_config, seed=cfg.seed, device=device, dtype=cfg.torch_dtype)
        return model, balance(len(model.blocks()), cfg.stages * cfg.chunks)
    meta = models.build(cfg.model, cfg.preset, device="meta", **_overrides(cfg))
    part = balance(len(meta.blocks()), cfg.stages * cfg.chunks)
    mine = [i for c in range(cfg.chunks) for i in part.blocks_of(stage_of(pp_rank, c, cfg.stages, cfg.layout))]
    model = models.build_blocks(cfg.model, cfg.preset, blocks=mine, seed=cfg.seed, device=device,
                                dtype=cfg.torch_dtype, **_overrides(cfg))
    return model, part


class _Run:
    """One variant's executor, optimizer and record on this rank."""

    def __init__(self, cfg: JobConfig, variant: Variant, mesh, device, costs):
        from .checkpoint import load_stage_state
        from .optim import MasterWeights
        from .pipeline import PipelineExecutor, make_schedule

        pp_rank = mesh.get_local_rank("pp")
        model, part = _build_stage_model(cfg, pp_rank, device)
        overlap = cfg.overlap_steps and variant.twobp
        sched = make_schedule(variant.schedule, stages=cfg.stages, microbatches=cfg.microbatches,
                              twobp=variant.twobp, chunks=cfg.chunks, costs=costs, overlap_steps=overlap,
                              layout=cfg.layout, memory_limit=variant.memory_limit)
        self.ex = PipelineExecutor(model.blocks(), model.loss_fn, schedule=sched, device=device,
                                   timeout=cfg.timeout, overlap_steps=overlap, bounds=part.bounds, mesh=mesh,
                                   bucket_mb=cfg.bucket_mb)
        if cfg.resume:
            load_stage_state(self.ex, cfg.resume)
        params = list(self.ex.parameters())
        self.opt = (torch.optim.AdamW(params, lr=cfg.lr) if cfg.dtype == "fp32"
                    else MasterWeights(params, torch.optim.AdamW, lr=cfg.lr))
        self.scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "fp16" else None
        self.steps_before = 0  # steps a resumed checkpoint had done: the data continues from there
        if cfg.resume:
            from .checkpoint import load_training_state
            self.steps_before = load_training_state(self.ex, cfg.resume, self.opt, self.scaler) or 0
        self.clip = cfg.clip_grad_norm
        self.mesh = mesh
        self.variant, self.schedule = variant, sched
        self.items, self.unit = _items_per_step(cfg, model)
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.last = None

    def step(self, x, y, *, measure: bool) -> float:
        from .pipeline import replica_slice

        t0 = time.perf_counter()
        self.last = self.ex.step(replica_slice(x, self.mesh), replica_slice(y, self.mesh), optimizer=self.opt,
                                 measure=measure, clip_grad_norm=self.clip, grad_scaler=self.scaler)
        wall = time.perf_counter() - t0
        loss = self.last.loss
        if self.mesh.size(0) > 1:  # the global batch's loss: the mean over replicas
            t = torch.tensor(loss, dtype=torch.float64)
            dist.all_reduce(t, group=self.mesh.get_group("dp"))
            loss = float(t) / self.mesh.size(0)
        self.losses.append(loss)
        return wall


def probe_schedule(cfg: JobConfig) -> str:
    """The fixed 2BP schedule whose run measures the costs ``auto`` places by: 1F1B with one chunk
    per rank, interleaved 1F1B over looped chunks where it applies, else GPipe (any layout)."""
    if cfg.chunks == 1:
        return "1f1b"
    return "interleaved-1f1b" if cfg.layout == "loop" and cfg.microbatches % cfg.stages == 0 else "gpipe"


def _probe_costs(cfg: JobConfig, mesh, device, data) -> dict:
    """Per-stage F / P1 / P2 costs, measured on a throw-away 2BP run of :func:`probe_schedule`, and
    the fused backward B on the same schedule without 2BP: each the median over PROBE_STEPS steps
    after a warm-up one, then the mean over the replicas, so that every replica plans the same
    schedule (:func:`twobp.pipeline.agree_costs`)."""
    from .pipeline import agree_costs
    from .pipeline.costs import PROBE_STEPS, median_costs, with_fused_backward

    measured = {}
    for split in (True, False):
        probe = _Run(cfg, Variant(probe_schedule(cfg), split), mesh, device, None)
        steps = []
        for k in range(1 + PROBE_STEPS):
            x, y = data.batch(k, cfg.batch_size, seed=cfg.seed)
            probe.step(x.to(device), y.to(device), measure=k > 0)
            if k > 0:
                steps.append(probe.last.costs)
        measured[split] = median_costs(steps)
        probe.ex.flush()
        del probe
    return agree_costs(with_fused_backward(measured[True], measured[False]), mesh)


def _worker(rank: int, world: int, cfg: JobConfig) -> list[dict] | None:
    from .checkpoint import save_stage_state, save_training_state

    from . import models
    from .pipeline import init_mesh

    device_kind = cfg.resolved_device()
    if device_kind == "cpu":
        torch.set_num_threads(cfg.threads)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = init_mesh(pp=cfg.stages, dp=cfg.dp)
    pp_group = mesh.get_group("pp")
    data = batch_source(cfg.model, _meta_model(cfg))
    # auto places its P2 by measured costs; carried P2 is sized by them too
    wants_costs = any(v.twobp and (v.schedule == "auto" or cfg.overlap_steps) for v in cfg.variants)
    costs = _probe_costs(cfg, mesh, device, data) if wants_costs else None
    runs = [_Run(cfg, v, mesh, device, costs if v.twobp else None) for v in cfg.variants]
    n = len(runs)
    start = runs[0].steps_before  # a resumed run continues the data where its checkpoint stopped
    if rank == 0 and cfg.resume and not cfg.quiet:
        print(f"  resumed {cfg.resume}: weights" + (f", optimizer state; data from step {start + 1}" if start
                                                     else " only (no optimizer state there): a fresh optimizer, "
                                                          "data from step 1"), flush=True)
    for step in range(cfg.steps):
        x, y = data.batch(start + step, cfg.batch_size, seed=cfg.seed)
        x, y = x.to(device), y.to(device)
        # alternate: one step of every variant per round, the order rotated each round,
        # so a drift in machine speed hits every variant alike
        order = runs[step % n:] + runs[:step % n]
        for run in order:
            wall = run.step(x, y, measure=(step == cfg.steps - 1))
            if step >= cfg.warmup:
                run.seconds.append(wall)
        if rank == 0 and not cfg.quiet:
            what = "warm-up" if step < cfg.warmup else "       "
            print(f"  step {step + 1:>3}/{cfg.steps} {what}  " + "   ".join(
                f"[{r.variant.label}] loss {r.losses[-1]:.4f}"
                + (f" {r.seconds[-1] * 1e3:,.0f} ms" if step >= cfg.warmup else "") for r in runs), flush=True)
    results = []
    for run in runs:
        run.ex.flush()  # carried P2 and optimizer steps: the weights are final from here on
        gathered: list[Any] = [None] * cfg.stages
        dist.all_gather_object(gathered, (run.last.peak_store_bytes, run.last.store_empty), group=pp_group)
        peaks = [g[0] for g in gathered]
        empty = all(g[1] for g in gathered)
        if cfg.checkpoint and run is runs[-1] and mesh.get_local_rank("dp") == 0:
            save_stage_state(run.ex, cfg.checkpoint)
            save_training_state(run.ex, cfg.checkpoint, run.opt, steps_done=run.steps_before + cfg.steps,
                                grad_scaler=run.scaler)
        last = run.last
        results.append(dict(schedule=run.variant.schedule, twobp=run.variant.twobp,
                            memory_limit=run.variant.memory_limit, losses=run.losses,
                            step_seconds=run.seconds, items_per_step=run.items, unit=run.unit,
                            bubble_fraction=last.timeline.bubble_fraction() if last.timeline else math.nan,
                            peak_bytes=peaks, store_empty=empty, timeline=last.timeline, costs=last.costs,
                            carry=list(run.schedule.carry), replicas=cfg.dp,
                            skipped_steps=run.ex.skipped_steps if run.scaler is not None else None))
    del runs
    return results if rank == 0 else None


def run_job(cfg: JobConfig) -> list[VariantResult]:
    """Run every variant of ``cfg``; returns rank 0's results (empty on other torchrun ranks).

    Raises ``ValueError`` from :meth:`JobConfig.preflight` before any rank starts."""
    from .pipeline import init_from_env, spawn

    cfg.preflight()

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if cfg.resolved_device() == "cuda" else "gloo"
        rank, world = init_from_env(backend=backend, timeout=cfg.timeout)
        if world != cfg.world:
            raise ValueError(f"torchrun started {world} processes but --stages x --dp is {cfg.world}; "
                             f"use --nproc_per_node/--nnodes for {cfg.world} ranks")
        raw = _worker(rank, world, cfg)
        dist.barrier()
        return [VariantResult(**r) for r in raw] if raw else []
    backend = "nccl" if cfg.resolved_device() == "cuda" else "gloo"
    env = {"OMP_NUM_THREADS": str(cfg.threads)} if backend == "gloo" else {}
    per_rank = spawn(_worker, world_size=cfg.world, args=(cfg,), backend=backend, timeout=cfg.timeout,
                     join_timeout=cfg.timeout * 2 + 60 + 30 * (cfg.steps + 2) * len(cfg.variants), env=env)
    return [VariantResult(**r) for r in per_rank[0]]


# ---- reporting ------------------------------------------------------------------------
def format_results(results: Sequence[VariantResult], *, baseline: int = 0) -> str:
    """Markdown table, one row per variant. The speedup over ``results[baseline]`` is the
    median over rounds of the paired step-time ratio (variants alternate step by step), with
    its interquartile range; when that range holds 1.00 the difference is within noise."""
    base = results[baseline]
    unit = base.unit
    dp = base.replicas
    per = f" | {unit}/s per replica" if dp > 1 else ""
    scaled = any(r.skipped_steps is not None for r in results)
    skip = " steps skipped (fp16 inf/nan) |" if scaled else ""
    rows = [f"| schedule | 2BP | carry | {unit}/s{per} | vs {base.label} (median of paired steps) | IQR | verdict | "
            f"bubble (last step) | peak deferred-p2 bytes per stage (the 2BP store) | final loss |{skip}",
            "|---|---|---|---:|" + ("---:|" if dp > 1 else "") + "---:|---|---|---:|---|---:|" + ("---:|" if scaled else "")]
    for r in results:
        med, q1, q3 = r.speedup_over(base)
        if r is base:
            verdict = "baseline"
        elif q1 <= 1.0 <= q3:
            verdict = "within noise"
        else:
            verdict = "faster" if med > 1 else "slower"
        carry = ",".join(map(str, r.carry)) if r.carry else "-"
        rep = f" | {r.throughput / dp:,.0f}" if dp > 1 else ""
        name = r.schedule + (f"@{r.memory_limit}" if r.memory_limit is not None else "")
        rows.append(f"| {name} | {'yes' if r.twobp else 'no'} | {carry} | {r.throughput:,.0f}{rep} | "
                    f"{med:.3f}x | {q1:.3f}-{q3:.3f} | {verdict} | {r.bubble_fraction:.1%} | "
                    f"{' / '.join(format_bytes(b) for b in r.peak_bytes)} | {r.loss:.5f} |"
                    + (f" {r.skipped_steps} of {len(r.losses)} |" if scaled else ""))
    return "\n".join(rows)


AGREE_STEPS = 5
"""Steps whose losses must agree across variants: a lost or doubled gradient shows at the
second step already, while rounding differences between schedules (which sum micro-batches'
weight gradients in another order) grow geometrically under the optimizer and may pass any
fixed tolerance after tens of steps without anything being wrong."""
AGREE_RTOL = {"fp32": 1e-4, "bf16": 5e-3, "fp16": 5e-3}
"""Relative tolerance of that check per --dtype (bf16 keeps 8 mantissa bits)."""


@dataclasses.dataclass(frozen=True)
class LossAgreement:
    ok: bool
    """False where the check failed (a real disagreement, a diverged run, missing steps)."""
    text: str
    """The verdict as the job prints it."""
    gap: float
    """Largest relative gap over the checked steps (nan when not checked)."""


def losses_agree(results: Sequence[VariantResult], dtype: str = "fp32", dropout: str | None = None) -> LossAgreement:
    """Whether every variant's losses match the first's over the first :data:`AGREE_STEPS` steps,
    within :data:`AGREE_RTOL` of ``dtype``. Non-finite losses fail (the run diverged), as do
    curves of different lengths; with ``dropout`` on (its description) the variants draw
    different masks, so the check is skipped and says why."""
    curves = [r.losses for r in results]
    if any(not math.isfinite(v) for c in curves for v in c):
        bad = sorted({r.label for r in results if any(not math.isfinite(v) for v in r.losses)})
        return LossAgreement(False, f"not finite in {', '.join(bad)} (the run diverged: lower --lr, "
                                    "or --clip-grad-norm)", math.nan)
    if len(results) < 2:
        return LossAgreement(True, "one schedule: nothing to compare", math.nan)
    if len({len(c) for c in curves}) > 1:
        return LossAgreement(False, "NO: the variants ran different numbers of steps", math.nan)
    if dropout:
        return LossAgreement(True, f"not checked: {dropout} is on, so the variants draw different dropout masks",
                             math.nan)
    n = min(AGREE_STEPS, len(curves[0]))
    gap = max(abs(a - b) / max(abs(a), 1e-12) for c in curves[1:] for a, b in zip(curves[0][:n], c[:n]))
    rtol = AGREE_RTOL.get(dtype, 1e-4)
    later = max((abs(a - b) / max(abs(a), 1e-12) for c in curves[1:] for a, b in zip(curves[0][n:], c[n:])),
                default=None)
    tail = f"; later steps drift to {later:.1e}, summation order amplified by the optimizer" \
        if later is not None and later > rtol else ""
    return LossAgreement(gap <= rtol, f"{'yes' if gap <= rtol else 'NO'} (largest relative gap over the first {n} "
                                      f"steps {gap:.1e}, tolerance {rtol:g} for {dtype}{tail})", gap)


def dropout_in(model: Any) -> str | None:
    """A description of the dropout a job's model applies in training, or None: dropout modules
    with p > 0, and its config's dropout probabilities (a Hugging Face model's attention dropout
    acts inside attention, not as a module). ``model``: an nn.Module or a job model holding one
    (``.model``) and its config (``.hf_config`` or ``.config``)."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    ps = {m.p for m in (module.modules() if module is not None else ())
          if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0}
    cfg = getattr(model, "hf_config", None) or getattr(module, "config", None)
    fields = cfg.to_dict() if hasattr(cfg, "to_dict") else (vars(cfg) if hasattr(cfg, "__dict__") else {})
    ps |= {v for k, v in fields.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float) and v > 0}
    return f"dropout (p = {', '.join(f'{p:g}' for p in sorted(ps))})" if ps else None


def results_to_json(results: Sequence[VariantResult], cfg: JobConfig, machine: str) -> dict:
    return {
        "config": {k: (list(map(dataclasses.asdict, v)) if k == "variants" else v)
                   for k, v in dataclasses.asdict(cfg).items() if k != "variants"} | {
            "variants": [dataclasses.asdict(v) for v in cfg.variants]},
        "machine": machine,
        "rows": [{"schedule": r.schedule, "twobp": r.twobp, "memory_limit": r.memory_limit,
                  f"{r.unit}_per_s": r.throughput,
                  "speedup_vs_first": r.speedup_over(results[0])[0],
                  "speedup_iqr": list(r.speedup_over(results[0])[1:]), "carry": r.carry,
                  "step_seconds": r.step_seconds,
                  "bubble_fraction": r.bubble_fraction, "peak_bytes": max(r.peak_bytes),
                  "peak_bytes_per_stage": r.peak_bytes, "loss": r.loss, "losses": r.losses,
                  "store_empty": r.store_empty, "skipped_steps": r.skipped_steps} for r in results],
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
                h = 0.8 if e.kind in ("F", "B", "P1", "P2", "optim") else 0.25  # thin: waiting on a peer
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


def _share_of_gain(simulated: float, median: float, q1: float, q3: float) -> str:
    """How much of the simulated gain the paired measurement realised, said only where the
    measurement resolves it: a share needs a simulated gain to divide by, and a measured
    interquartile range that leaves out 1.0 (else the share is noise over a small number and
    may read -900%)."""
    if simulated <= 1.001:
        return "no simulated gain to realise"
    if q1 <= 1.0 <= q3:
        return (f"within noise of no gain: interquartile range [{q1:.3f}, {q3:.3f}]; more --steps resolve "
                "the share of the simulated gain")
    return f"realises {(median - 1) / (simulated - 1):.0%} of the simulated gain"


def realised_gain(results: Sequence[VariantResult], cfg: JobConfig) -> str | None:
    """One line: each cost-placed 2BP variant's simulated speedup over the first variant (the
    simulator on the per-stage costs that variant measured in its last step) against the
    paired measurement, and the share of the simulated gain the run realised."""
    from .pipeline import make_schedule, simulate
    from .pipeline.overlap import period

    base = results[0]
    if base.twobp or base.schedule != "1f1b":
        return None
    lines = []
    for r in results[1:]:
        if not (r.twobp and r.costs and all(k in r.costs for k in ("F", "P1", "P2"))):
            continue
        costs = {k: r.costs[k] for k in ("F", "P1", "P2", "B", "comm") if k in r.costs}
        sched = make_schedule(r.schedule, stages=cfg.stages, microbatches=cfg.microbatches, twobp=True,
                              chunks=cfg.chunks, costs=costs, overlap_steps=bool(r.carry), layout=cfg.layout,
                              memory_limit=r.memory_limit)
        plain = make_schedule("1f1b", stages=cfg.stages, microbatches=cfg.microbatches, twobp=False)
        sim = simulate(plain, costs).makespan / (period(sched, costs) if sched.carry else simulate(sched, costs).makespan)
        got, lo, hi = r.speedup_over(base)
        lines.append(f"{r.label}: simulated {sim:.3f}x over {base.label} on its measured costs, measured {got:.3f}x "
                     f"({_share_of_gain(sim, got, lo, hi)})")
    return "\n".join(lines) or None
