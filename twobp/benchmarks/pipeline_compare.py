"""twobp's pipeline schedules next to torch.distributed.pipelining's: one model, one run.

Contenders (:class:`Contender`):

* **twobp**: :class:`~twobp.pipeline.PipelineExecutor` on the model's twobp modules, with
  any :func:`~twobp.pipeline.make_schedule` name, with or without 2BP. ``auto`` places
  its P2 by the F / P1 / P2 costs measured in warm-up steps of ``1f1b`` with 2BP (median of
  ``PROBE_STEPS``).
* **torch**: ``torch.distributed.pipelining`` on the *same model with torch's own modules*
  (:func:`twobp.revert`: nn.Linear, nn.RMSNorm / nn.LayerNorm, SDPA attention, nn.Conv2d,
  the same Parameters): what a torch user would run instead. ``Schedule1F1B`` (one stage
  per rank), ``ScheduleInterleavedZeroBubble`` (two stages per rank, looped) and
  ``ScheduleZBVZeroBubble`` (two per rank, V-shaped). Optionally also torch's runtime on
  the twobp modules (``modules="twobp"``).

Every contender starts from the weights of ``torch.manual_seed(seed)`` and sees batch k
at its step k, with AdamW at the same learning rate, so per-step losses must agree.

**Alternating rounds.** Machine speed drifts (other tenants, clocks), so contenders are not
run one after the other: each round runs one step of every contender, in an order rotated
each round, all in the same processes. A step's time is rank 0's wall time between two
barriers around ``schedule step + optimizer step``. Throughput uses the median step; the
ratio to a reference is the median of the per-round ratios (paired), shown with its range.

**Where the time goes** (every timed step, every rank, no extra collective): compute per
action kind (F, B = fused backward or torch's input-gradient step I, P1, P2 or torch's W),
``wait`` (receives and waits on peers: idle plus transfer, and the closing barrier's wait
for the slowest rank), ``send`` (posting sends), ``optim`` (optimizer step) and ``other`` =
wall − all of those (the runtime's own Python between actions, the loss, allocation).

**Host allocator**: each rank keeps freed memory in the process before any contender is built
(:func:`twobp.keep_freed_host_memory`, which twobp's executor applies on CPU anyway), so every
contender runs on the same malloc; ``keep_freed_memory=False`` runs them all on glibc's default.

**Memory**, the same measure for both runtimes: peak bytes of saved activations per rank
(:class:`~twobp.benchmarks.saved_memory.SavedActivationMeter`: what autograd saves plus
what the twobp store holds, storages counted once), in one extra untimed step.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..host_memory import ENV_SWITCH
from ..pipeline.costs import PROBE_STEPS, median_costs, with_fused_backward

__all__ = ["Contender", "CompareConfig", "ContenderResult", "run_compare", "DEFAULT_OURS", "DEFAULT_TORCH"]

DEFAULT_OURS = ("1f1b", "1f1b-2bp", "zb-h1-2bp", "auto-h1-2bp", "auto-2bp", "auto@zb-2bp", "auto-vh1-2bp",
                "auto-v-2bp", "auto-v@zb-2bp")
"""Since 2026-12-05 the capped ``@zb`` placements replace the looped two-chunk ones (auto-x2,
auto-x2h1; never the best row in runs L, N and O, still there by ``--ours``): they answer the
issue's "faster at no more memory than torch's zero-bubble schedules" in one row each."""
DEFAULT_TORCH = ("Schedule1F1B", "ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble")
TORCH_SCHEDULES = DEFAULT_TORCH
_KINDS = ("F", "B", "P1", "P2", "W", "wait", "send", "optim", "other")
_AUTO_VARIANTS = ("auto", "auto-h1", "auto-x2", "auto-x2h1", "auto-v", "auto-vh1")
"""``auto`` placements the comparison runs: free, within ZB-H1's memory (h1), over two looped
chunks per rank (x2), both (x2h1), over two chunks per rank in ZB-V's V layout (v), and that
within 1F1B's memory (vh1). ``auto@N``, ``auto-x2@N``, ``auto-v@N``: the same placement held to
N micro-batch chunks per rank from F to P2 (a budget between 1F1B's and all of them)."""
_MEMORY_LIMITS = {"auto-h1": 1, "auto-x2h1": 2, "auto-vh1": 2}
"""The named limits, in micro-batch chunks per rank per pipeline rank (x stages)."""
_CAPPED = ("auto", "auto-x2", "auto-v")
"""The placements that take a memory cap ``@N`` or ``@zb``."""
FITS_TORCH_ZB = "@zb"
"""``auto@zb``, ``auto-x2@zb``, ``auto-v@zb``: the placement held to the largest cap N whose peak
saved bytes, measured in this run, fit in the smallest peak of torch's zero-bubble schedules (the
issue's "faster at no more memory" bar, met by construction instead of by a sweep over N)."""


def _variant_and_limit(base: str) -> tuple[str, int | None]:
    """``auto-v@6`` -> (``auto-v``, 6); ``auto@zb`` -> (``auto``, None), its cap chosen at run
    time; any other name -> (name, None). Raises on a bad N."""
    from ..pipeline.generators import split_memory_cap

    if base.endswith(FITS_TORCH_ZB) and base[:-len(FITS_TORCH_ZB)] in _CAPPED:
        return base[:-len(FITS_TORCH_ZB)], None
    return split_memory_cap(base, _CAPPED)


@dataclass(frozen=True)
class Contender:
    """One runtime x schedule. ``schedule``: ours, a make_schedule name with ``-2bp`` for
    the split (``1f1b-2bp``); torch, a schedule class name. ``modules``: the torch runtime's
    model, ``torch`` (reverted) or ``twobp``."""

    implementation: str
    schedule: str
    modules: str = "torch"

    @property
    def twobp(self) -> bool:
        return self.implementation == "twobp" and self.schedule.endswith("-2bp")

    @property
    def base_schedule(self) -> str:
        return self.schedule[:-4] if self.schedule.endswith("-2bp") else self.schedule

    @property
    def variant(self) -> str:
        """The placement without an ``@N`` memory limit (``auto-v@6`` -> ``auto-v``)."""
        return _variant_and_limit(self.base_schedule)[0]

    @property
    def fits_torch_zb(self) -> bool:
        """``auto@zb``-like: its cap is chosen in the run, to fit torch's leanest ZB schedule."""
        return self.twobp and self.base_schedule.endswith(FITS_TORCH_ZB)

    @property
    def schedule_name(self) -> str:
        """The make_schedule name: every ``auto-*`` variant is ``auto``."""
        return "auto" if self.variant in _AUTO_VARIANTS else self.variant

    @property
    def chunks(self) -> int:
        """Model chunks per rank: two for ``interleaved-1f1b``, ``auto-x2``/``auto-x2h1`` (looped,
        like torch's interleaved schedules) and ``auto-v``/``auto-vh1`` (V-shaped), one otherwise."""
        return 2 if self.variant in ("interleaved-1f1b", "auto-x2", "auto-x2h1", "auto-v", "auto-vh1") else 1

    @property
    def layout(self) -> str:
        """Chunk placement: ``v`` for ``auto-v``/``auto-vh1`` (rank r holds stages r and 2p-1-r, as
        torch's ScheduleZBVZeroBubble), ``loop`` otherwise."""
        return "v" if self.variant in ("auto-v", "auto-vh1") else "loop"

    def memory_limit(self, stages: int) -> int | None:
        """``auto-h1``: at most ``stages`` micro-batches held per rank from F to P2, what 1F1B
        and ZB-H1 hold, so its peak saved activations stay at 1F1B's; ``auto-x2h1``: the same
        bytes if the chunks were of equal size (``2 * stages`` chunk micro-batches; a last chunk
        holding the head's logits is heavier), and so ``auto-vh1``; ``...@N``: N; None otherwise."""
        variant, n = _variant_and_limit(self.base_schedule)
        if n is not None:
            return n
        per = _MEMORY_LIMITS.get(variant)
        return per * stages if per is not None else None

    @property
    def label(self) -> str:
        if self.implementation == "twobp":
            return f"twobp {self.base_schedule}{' +2BP' if self.twobp else ''}"
        return f"torch {self.schedule}{' (twobp modules)' if self.modules == 'twobp' else ''}"


@dataclass(kw_only=True)
class CompareConfig:
    """One comparison run; every field is a flag of ``bench/compare_torch_pipelining.py``."""

    model: str = "llama"
    """Model family: llama, bert or resnet."""
    preset: str = "small"
    """Size preset of the family (twobp.models.presets)."""
    stages: int = 2
    """Pipeline ranks."""
    microbatches: int = 4
    """Micro-batches per step."""
    batch_size: int = 8
    """Sequences (images) per step; a multiple of microbatches (torch splits evenly)."""
    rounds: int = 6
    """Timed rounds (one step of every contender each)."""
    warmup: int = 2
    """Untimed rounds first (allocator, caches); >= 1, auto's costs come from the last."""
    lr: float = 1e-3
    """AdamW learning rate, all contenders."""
    seed: int = 0
    """Seed of the weights and the data."""
    threads: int = 1
    """torch threads per rank (1: a bubble is real idle time on a CPU)."""
    timeout: float = 300.0
    """Seconds a rank waits for a silent peer."""
    ours: tuple[str, ...] = DEFAULT_OURS
    """twobp schedules (make_schedule names; suffix -2bp for the split)."""
    torch_schedules: tuple[str, ...] = DEFAULT_TORCH
    """torch.distributed.pipelining schedule classes."""
    torch_with_twobp_modules: bool = False
    """Also run torch's Schedule1F1B on the twobp modules (the runtime alone compared)."""
    measure_memory: bool = True
    """One extra untimed step per contender with the saved-activation meter on."""
    profile: bool = False
    """One extra untimed step per contender under torch.profiler: the op table per rank."""
    overlap_steps: bool = True
    """twobp's 2BP schedules carry trailing P2 into the next step where the measured costs
    say it helps (``PipelineExecutor(overlap_steps=True)``)."""
    cut: str = "balanced"
    """How the model is cut into stages, the same cut for both runtimes: ``balanced`` by each
    block's forward + backward time, measured once on rank 0 (:func:`~twobp.pipeline.measure_block_costs`,
    :func:`~twobp.pipeline.balance`), or ``equal`` block counts."""
    keep_freed_memory: bool = True
    """Every rank, hence both runtimes alike, keeps freed host memory in the process
    (:func:`twobp.keep_freed_host_memory`) instead of glibc's default of page-faulting it back;
    False leaves glibc's malloc as it is for all contenders."""

    def __post_init__(self) -> None:
        from ..pipeline import SCHEDULE_NAMES

        for name in ("stages", "microbatches", "batch_size", "rounds", "warmup", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.batch_size % self.microbatches:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of microbatches="
                             f"{self.microbatches} (torch's runtime splits the batch evenly)")
        for s in self.ours:
            base = s[:-4] if s.endswith("-2bp") else s
            if _variant_and_limit(base)[0] not in (*SCHEDULE_NAMES, *_AUTO_VARIANTS):
                raise ValueError(f"unknown twobp schedule {s!r}; use one of {SCHEDULE_NAMES} or auto-h1 (auto "
                                 "within ZB-H1's memory), auto-x2 (over two looped chunks per rank), auto-x2h1 "
                                 "(both), auto-v (two chunks per rank in the V layout), auto-vh1 (that within "
                                 "1F1B's memory), auto@N / auto-x2@N / auto-v@N (held to N micro-batch chunks "
                                 "per rank), auto@zb / auto-x2@zb / auto-v@zb (held to the largest N that fits "
                                 "torch's leanest zero-bubble peak); add -2bp for 2BP")
            if base.startswith("auto") and not s.endswith("-2bp"):
                raise ValueError(f"{base} places P2, so it needs 2BP: use {base}-2bp")
        if any(c.fits_torch_zb for c in self.contenders()) and not any("ZeroBubble" in s for s in self.torch_schedules):
            raise ValueError(f"{FITS_TORCH_ZB} holds auto to the peak of torch's zero-bubble schedules in the same run: "
                             "add ScheduleInterleavedZeroBubble or ScheduleZBVZeroBubble to the torch schedules")
        for s in self.torch_schedules:
            if s not in TORCH_SCHEDULES:
                raise ValueError(f"unknown torch schedule {s!r}; use one of {TORCH_SCHEDULES}")
        if not (self.timeout > 0):
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        if self.cut not in ("balanced", "equal"):
            raise ValueError(f"cut must be 'balanced' or 'equal', got {self.cut!r}")

    def contenders(self) -> list[Contender]:
        out = [Contender("twobp", s, "twobp") for s in self.ours]
        out += [Contender("torch", s, "torch") for s in self.torch_schedules]
        if self.torch_with_twobp_modules:
            out.append(Contender("torch", "Schedule1F1B", "twobp"))
        return out


@dataclass
class ContenderResult:
    """What one contender measured (rank 0's times; per-rank breakdown and memory)."""

    contender: Contender
    losses: list[float]
    step_seconds: list[float]  # one per timed round, in round order
    breakdown: list[dict[str, float]]  # per rank: median seconds per kind over the timed rounds
    peak_saved_bytes: list[int] | None  # per rank
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)


# ---- the runners: one step of one contender on this rank ------------------------------
class _Timer:
    """Seconds per kind on this rank during one step."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.acc[kind] = self.acc.get(kind, 0.0) + seconds

    def wrap(self, obj: Any, attr: str, kind: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(kind, time.perf_counter() - t0)

        setattr(obj, attr, timed)


class _OursRunner:
    def __init__(self, contender: Contender, model, world: int, cfg: CompareConfig, device, costs=None,
                 overlap: bool = False, bounds=None, limit: int | None = None):
        from ..pipeline import PipelineExecutor, make_schedule

        # a memory cap holds with carried P2 too: the executor runs what a rank carries at the
        # head of its next step, before that step's first forward, so carrying a step's trailing
        # P2 keeps its sets only until then, past the step's peak
        limit = contender.memory_limit(world) if limit is None else limit
        overlap = overlap and contender.twobp
        self.schedule = make_schedule(contender.schedule_name, stages=world, microbatches=cfg.microbatches,
                                      twobp=contender.twobp, chunks=contender.chunks, costs=costs,
                                      overlap_steps=overlap, memory_limit=limit, layout=contender.layout)
        self.ex = PipelineExecutor(model.blocks(), model.loss_fn, schedule=self.schedule, device=device,
                                   timeout=cfg.timeout, overlap_steps=overlap, bounds=bounds)
        self.opt = torch.optim.AdamW(list(self.ex.parameters()), lr=cfg.lr)
        self.last = None

    def step(self, x, y, timer: _Timer, measure: bool = False) -> float:
        # the executor steps the optimizer (at the start of the next step for carried P2)
        res = self.ex.step(x, y, optimizer=self.opt, measure=measure)
        for e in res.rank_events or ():
            timer.add({"recv": "wait"}.get(e.kind, e.kind), e.duration)
        self.last = res
        return res.loss


class _TorchRunner:
    def __init__(self, contender: Contender, model, rank: int, world: int, cfg: CompareConfig, device,
                 bounds=None):
        from torch import nn
        from torch.distributed import pipelining as tp
        from torch.distributed.pipelining import schedules as tps

        from ..pipeline.partition import Partition, balance

        per_rank = 1 if contender.schedule == "Schedule1F1B" else 2
        n = world * per_rank
        blocks = model.blocks()
        part = Partition(tuple(bounds)) if bounds is not None else balance(len(blocks), n)
        if contender.schedule == "ScheduleZBVZeroBubble":
            mine = [rank, n - 1 - rank]  # V shape: rank r holds stages r and 2p-1-r
        else:
            mine = [s for s in range(n) if s % world == rank]  # looped, as torch's interleaved schedules
        self.stages = [tp.PipelineStage(nn.Sequential(*(blocks[i] for i in part.blocks_of(s))), s, n, device)
                       for s in mine]
        cls = getattr(tp, contender.schedule)
        arg = self.stages[0] if per_rank == 1 else self.stages
        self.sched = cls(arg, cfg.microbatches, loss_fn=model.loss_fn)
        self.first, self.is_last = 0 in mine, n - 1 in mine
        self.opt = torch.optim.AdamW([p for st in self.stages for p in st.submod.parameters()], lr=cfg.lr)
        self.timer: _Timer | None = None
        t = self._hook
        for st in self.stages:
            t(st, "forward_one_chunk", "F")
            t(st, "backward_one_chunk", "B")
            t(st, "backward_weight_one_chunk", "W")
        self._tps = tps

    def _hook(self, obj, attr: str, kind: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.timer is not None:
                    self.timer.add(kind, time.perf_counter() - t0)

        setattr(obj, attr, timed)

    def step(self, x, y, timer: _Timer, measure: bool = False) -> float | None:
        self.timer = timer
        tps = self._tps
        real_wait, real_batch = tps._wait_batch_p2p, tps._batch_p2p

        def wait(*a, **k):
            t0 = time.perf_counter()
            try:
                return real_wait(*a, **k)
            finally:
                timer.add("wait", time.perf_counter() - t0)

        def post(*a, **k):
            t0 = time.perf_counter()
            try:
                return real_batch(*a, **k)
            finally:
                timer.add("send", time.perf_counter() - t0)

        tps._wait_batch_p2p, tps._batch_p2p = wait, post
        try:
            losses: list = []
            kwargs = dict(target=y, losses=losses) if self.is_last else {}
            if self.first:
                self.sched.step(x, **kwargs)
            else:
                self.sched.step(**kwargs)
        finally:
            tps._wait_batch_p2p, tps._batch_p2p = real_wait, real_batch
            self.timer = None
        t0 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        timer.add("optim", time.perf_counter() - t0)
        if self.is_last:
            return float(torch.stack([l.detach().float() for l in losses]).mean())
        return None


def _build_model(cfg: CompareConfig, modules: str):
    from .. import models
    from ..nn import revert

    torch.manual_seed(cfg.seed)
    # Untied: torch.distributed.pipelining has no way to keep an embedding tied to a head on
    # another rank (each rank would step its own copy on its own gradient, and a rank holding
    # both stages of a V schedule would step the shared Parameter twice), so a tied model would
    # not be the same model under both runtimes. twobp's executor can sum tied copies; not used here.
    overrides = {"tie_embeddings": False} if hasattr(models.config(cfg.model, cfg.preset), "tie_embeddings") else {}
    model = models.build(cfg.model, cfg.preset, **overrides)
    return revert(model) if modules == "torch" else model


def _cuts(cfg: CompareConfig, world: int, rank: int, model, full_batch) -> dict[int, tuple[int, ...]]:
    """{virtual stages: block bounds} for p and 2p stages, the same on every rank: balanced by
    block costs rank 0 measures on one micro-batch of ``model`` (then broadcast; its gradients
    are cleared), or equal block counts."""
    from ..pipeline import balance, measure_block_costs

    n_blocks = len(model.blocks())
    costs = None
    if cfg.cut == "balanced":
        box = [None]
        if rank == 0:
            rows = cfg.batch_size // cfg.microbatches
            x, y = (t[:rows] for t in full_batch)
            box = [measure_block_costs(model.blocks(), x, model.loss_fn, y)]
        dist.broadcast_object_list(box, src=0)
        costs = box[0]
    return {n: balance(n_blocks, n, costs).bounds for n in (world, 2 * world)}


def _worker(rank: int, world: int, cfg: CompareConfig) -> dict:
    import twobp
    from ..train import batch_source
    from .saved_memory import SavedActivationMeter

    torch.set_num_threads(cfg.threads)
    # The same allocator for every contender, set before anything is built (the executor
    # would set it on its own; the switch keeps it from doing so when the run asks for glibc's).
    if cfg.keep_freed_memory:
        twobp.keep_freed_host_memory(force=True)  # the run's flag decides, not the environment
    else:
        os.environ[ENV_SWITCH] = "0"
    device = torch.device("cpu")
    contenders = cfg.contenders()
    reference = _build_model(cfg, "twobp")  # data shapes and the block costs; never trained
    data = batch_source(cfg.model, reference)
    batches = {}

    def batch(step: int):
        if step not in batches:
            batches[step] = data.batch(step, cfg.batch_size, seed=cfg.seed)
        return batches[step]

    runners: dict[Contender, Any] = {}
    errors: dict[Contender, str] = {}
    steps_done: dict[Contender, int] = {}
    losses: dict[Contender, list] = {c: [] for c in contenders}

    cuts = _cuts(cfg, world, rank, reference, batch(0))

    def make_runner(c: Contender, costs=None, limit: int | None = None):
        model = _build_model(cfg, c.modules)
        n = world * (c.chunks if c.implementation == "twobp" else (1 if c.schedule == "Schedule1F1B" else 2))
        return (_OursRunner(c, model, world, cfg, device, costs, cfg.overlap_steps, bounds=cuts[n], limit=limit)
                if c.implementation == "twobp"
                else _TorchRunner(c, model, rank, world, cfg, device, bounds=cuts[n]))

    def build(c: Contender, costs=None, limit: int | None = None) -> None:
        try:
            runners[c] = make_runner(c, costs, limit)
            steps_done[c] = 0
        except Exception as e:  # noqa: BLE001 - reported per contender, the others still run
            errors[c] = f"{type(e).__name__}: {e}"

    def meter(runner) -> SavedActivationMeter:
        """The saved-activation meter of one runner: autograd's saved tensors and its store,
        parameters excluded (the same measure for both runtimes)."""
        ours = isinstance(runner, _OursRunner)
        params = list(runner.ex.parameters()) if ours else [p for st in runner.stages for p in st.submod.parameters()]
        return SavedActivationMeter(runner.ex.store if ours else twobp.default_store(), exclude=params)

    def throwaway_peak(c: Contender, costs=None, limit: int | None = None) -> int:
        """Peak saved bytes, the largest over ranks, of ``c``'s second step on a runner built for
        this and dropped (the contender's own runner keeps its step count and data order). The
        second step, because with carried P2 the first has no carry to run."""
        runner = make_runner(c, costs, limit)
        runner.step(*batch(0), _Timer())
        with meter(runner) as m:
            runner.step(*batch(1), _Timer())
        if isinstance(runner, _OursRunner):
            runner.ex.flush()
        peak = torch.tensor([m.peak_bytes], dtype=torch.int64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return int(peak)

    def cap_within(c: Contender, budget: int, costs) -> tuple[int | None, list[tuple[int, int]]]:
        """The largest cap N (micro-batch chunks held per rank) whose measured peak fits in
        ``budget`` bytes, and the (N, peak) pairs measured on the way down from no cap; a cap
        that gives the plan of the cap above it has that cap's peak, without a second step."""
        from ..pipeline import make_schedule

        tried: list[tuple[int, int]] = []
        last_plan, last_peak = None, None
        for n in range(cfg.microbatches * c.chunks, 0, -1):
            plan = make_schedule(c.schedule_name, stages=world, microbatches=cfg.microbatches, twobp=True,
                                 chunks=c.chunks, costs=costs, overlap_steps=cfg.overlap_steps, memory_limit=n,
                                 layout=c.layout)
            key = (tuple(map(tuple, plan.ranks)), tuple(plan.carry))
            peak = last_peak if key == last_plan else throwaway_peak(c, costs, n)
            tried.append((n, peak))
            last_plan, last_peak = key, peak
            if peak <= budget:
                return n, tried
        return None, tried

    def run(c: Contender, timer: _Timer, measure: bool = False) -> float:
        x, y = batch(steps_done[c])
        dist.barrier()
        t0 = time.perf_counter()
        loss = runners[c].step(x, y, timer, measure=measure)
        t_done = time.perf_counter()
        dist.barrier()  # waiting here for the slowest rank is idle time: counted as wait
        wall = time.perf_counter() - t0
        timer.add("wait", wall - (t_done - t0))
        steps_done[c] += 1
        losses[c].append(loss)
        timer.acc["wall"] = wall
        return wall

    # auto places P2 by measured per-stage costs, and carried P2 is sized by them: measure
    # them first, on a throw-away 1F1B + 2BP run (median of PROBE_STEPS steps after a warm-up),
    # and the fused backward B on the same schedule without 2BP (auto fuses where B is cheaper
    # and a P2 would fill no idle time)
    # (per virtual stage: two-chunk contenders get theirs from an interleaved probe; a stage's
    # compute costs the same whichever rank runs it, so the V layout uses them too)
    def probe_costs(schedule: str):
        probe = Contender("twobp", schedule, "twobp")
        build(probe)
        if probe not in runners:
            raise RuntimeError(f"the cost probe ({schedule}) failed: {errors.pop(probe)}")
        runners[probe].step(*batch(0), _Timer())
        measured = []
        for k in range(PROBE_STEPS):
            runners[probe].step(*batch(1 + k), _Timer(), measure=True)
            measured.append(runners[probe].last.costs)
        runners.pop(probe).ex.flush()  # a contender of the same name is built afresh below
        return median_costs(measured)

    costs = {}
    for chunks, schedule in ((1, "1f1b"), (2, "interleaved-1f1b")):
        if any(c.twobp and c.chunks == chunks for c in contenders):
            costs[chunks] = with_fused_backward(probe_costs(schedule + "-2bp"), probe_costs(schedule))
    # auto@zb: measure torch's leanest zero-bubble peak, then hold auto to the largest cap that fits it
    caps: dict[Contender, int] = {}
    cap_searches: dict[Contender, list] = {}
    fit = [c for c in contenders if c.fits_torch_zb]
    if fit:
        budget = min(throwaway_peak(c) for c in contenders
                     if c.implementation == "torch" and "ZeroBubble" in c.schedule)
        for c in fit:
            n, cap_searches[c] = cap_within(c, budget, costs[c.chunks])
            if n is None:
                errors[c] = (f"no memory cap fits torch's leanest zero-bubble peak ({budget} bytes): "
                             + ", ".join(f"@{k}: {b} bytes" for k, b in cap_searches[c]))
            else:
                caps[c] = n
    for c in contenders:
        if c not in errors:
            build(c, costs.get(c.chunks) if c.twobp else None, caps.get(c))
    for _ in range(cfg.warmup):
        for c in list(runners):
            run(c, _Timer())
    timed = [c for c in contenders if c in runners]
    walls: dict[Contender, list[float]] = {c: [] for c in timed}
    parts: dict[Contender, list[dict]] = {c: [] for c in timed}
    for r in range(cfg.rounds):
        k = r % len(timed)
        for c in timed[k:] + timed[:k]:
            t = _Timer()
            walls[c].append(run(c, t))
            parts[c].append(t.acc)
        if rank == 0:
            print(f"  round {r + 1}/{cfg.rounds}: " + ", ".join(
                f"{c.label} {walls[c][-1] * 1e3:.0f} ms" for c in timed), flush=True)
    peaks: dict[Contender, int] = {}
    if cfg.measure_memory:
        for c in timed:
            with meter(runners[c]) as m:
                run(c, _Timer())
            peaks[c] = m.peak_bytes
    profiles: dict[Contender, str] = {}
    if cfg.profile:
        from torch.profiler import ProfilerActivity, profile

        for c in timed:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(c, _Timer())
            profiles[c] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
    for c in timed:
        if isinstance(runners[c], _OursRunner):
            runners[c].ex.flush()
    out = {}
    for c in contenders:
        if c in errors:
            out[c.label] = dict(error=errors[c])
            continue
        bd = {}
        for kind in (*_KINDS, "wall"):
            vals = [p.get(kind, 0.0) for p in parts[c]]
            bd[kind] = statistics.median(vals) if vals else 0.0
        bd["other"] = max(0.0, bd["wall"] - sum(bd[k] for k in _KINDS if k != "other"))
        ours = isinstance(runners[c], _OursRunner)
        carry = list(runners[c].schedule.carry) if ours else []
        # of a 2BP schedule's backwards (micro-batch x chunk, all ranks), how many auto kept fused
        acts = [a for rank in runners[c].schedule.ranks for a in rank] if ours and c.twobp else []
        fused = [sum(a.kind == "B" for a in acts), sum(a.kind in ("B", "P1") for a in acts)] if acts else None
        out[c.label] = dict(walls=walls[c], losses=losses[c], breakdown=bd, peak=peaks.get(c), carry=carry, fused=fused,
                            memory_cap=caps.get(c), cap_search=cap_searches.get(c),
                            costs=costs.get(c.chunks) if c.twobp else None, profile=profiles.get(c),
                            cuts={n: list(b) for n, b in cuts.items()})
    return out


def run_compare(cfg: CompareConfig) -> list[ContenderResult]:
    """Run every contender of ``cfg`` on ``cfg.stages`` spawned gloo ranks (CPU)."""
    from ..pipeline.launch import spawn

    n = len(cfg.contenders())
    per_rank = spawn(_worker, world_size=cfg.stages, args=(cfg,), backend="gloo", timeout=cfg.timeout,
                     join_timeout=cfg.timeout * 2 + 120 + 60 * n * (cfg.rounds + 2 * cfg.warmup + 1),
                     env={"OMP_NUM_THREADS": str(cfg.threads)})
    results = []
    for c in cfg.contenders():
        rows = [pr[c.label] for pr in per_rank]
        if "error" in rows[0]:
            results.append(ContenderResult(c, [], [], [], None, error=rows[0]["error"]))
            continue
        # the loss is known on the rank holding the last stage
        losses = [next((r["losses"][i] for r in rows if r["losses"][i] is not None), float("nan"))
                  for i in range(len(rows[0]["losses"]))]
        results.append(ContenderResult(
            c, losses, rows[0]["walls"], [r["breakdown"] for r in rows],
            [r["peak"] for r in rows] if rows[0]["peak"] is not None else None,
            extra={"carry": rows[0]["carry"], "fused": rows[0]["fused"],
                   "memory_cap": rows[0]["memory_cap"], "cap_search": rows[0]["cap_search"], "costs": rows[0]["costs"], "cuts": rows[0]["cuts"],
                   "profiles": [r["profile"] for r in rows]}))
    return results


def paired_ratio(a: ContenderResult, b: ContenderResult) -> tuple[float, float, float]:
    """Speed of ``a`` relative to ``b`` per round (b's time / a's time): (median, min, max)."""
    r = [tb / ta for ta, tb in zip(a.step_seconds, b.step_seconds)]
    return statistics.median(r), min(r), max(r)


def losses_agree(results: Sequence[ContenderResult], rtol: float = 1e-4) -> float:
    """The largest relative gap between any contender's per-step loss and the first's."""
    return max(loss_gaps_per_step(results), default=0.0)


def loss_gaps_per_step(results: Sequence[ContenderResult]) -> list[float]:
    """Per step, the largest relative gap of any contender's loss to the first's. A gap that is
    0 at the first steps and grows by a factor each step is summation order amplified by the
    optimizer (schedules that sum micro-batches' weight gradients in another order); a lost or
    doubled gradient shows at once, at the second step."""
    ok = [r for r in results if r.error is None]
    ref = ok[0].losses
    return [max((abs(a - r.losses[i]) / max(abs(a), 1e-12) for r in ok[1:] if i < len(r.losses)), default=0.0)
            for i, a in enumerate(ref)]


def simulated_gain(results: Sequence[ContenderResult], cfg: CompareConfig, schedule: str = "auto-2bp") -> dict | None:
    """How much of ``schedule``'s simulated gain over our 1F1B the run realised: the simulator
    on the per-stage costs the run measured (its cost probe for F / P1 / P2; the fused backward B
    as the probe's P1 + P2 times the ratio, per rank, of our 1F1B's B to our 1F1B + 2BP's P1 + P2 in
    the same timed rounds, so a fused backward cheaper than P1 + P2 is not counted as gain and
    both sides of the ratio come from the same minutes), against the paired measurement.
    ``realised`` = (measured - 1) / (simulated - 1).

    Where the schedule runs one chunk per rank, also where a shortfall lies: ``cost_growth`` (the
    compute its timed steps measured over the probe's costs for the same actions), ``plan_step``
    (the same plan simulated on those measured costs, optimizer included) and ``step`` (its
    measured median step); ``plan_step / step`` near 1 means the executor ran its plan and the
    shortfall is in the costs."""
    from ..pipeline import make_schedule, simulate
    from ..pipeline.overlap import period

    by = {r.contender.schedule: r for r in results if r.contender.implementation == "twobp" and r.error is None}
    target, base = by.get(schedule), by.get("1f1b")
    costs = target.extra.get("costs") if target is not None else None
    if target is None or base is None or not costs:
        return None
    sched = make_schedule(target.contender.schedule_name, stages=cfg.stages, microbatches=cfg.microbatches, twobp=True,
                          costs=costs, overlap_steps=cfg.overlap_steps)
    plain = make_schedule("1f1b", stages=cfg.stages, microbatches=cfg.microbatches, twobp=False)
    plain_costs = costs
    split = by.get("1f1b-2bp")
    if split is not None and cfg.stages == len(base.breakdown) == len(split.breakdown) == len(costs["P1"]):
        ratio = [b.get("B", 0.0) / (s.get("P1", 0.0) + s.get("P2", 0.0) or float("inf"))
                 for b, s in zip(base.breakdown, split.breakdown)]
        if all(r > 0 for r in ratio):
            plain_costs = {**costs, "B": [r * (p1 + p2) for r, p1, p2 in zip(ratio, costs["P1"], costs["P2"])]}
    def plan(c):
        return period(sched, c) if sched.carry else simulate(sched, c).makespan

    simulated = simulate(plain, plain_costs).makespan / plan(costs)
    measured = paired_ratio(target, base)[0]
    realised = (measured - 1) / (simulated - 1) if simulated > 1 else float("nan")
    out = dict(schedule=schedule, simulated=simulated, measured=measured, realised=realised)
    own = _costs_of_own_steps(sched, target.breakdown, costs)
    if own is not None:
        # the same plan on the costs its timed steps measured, plus the optimizer the simulator leaves out
        optim = max(bd.get("optim", 0.0) for bd in target.breakdown)
        out.update(plan_step=plan(own) + optim, step=target.median_step,
                   cost_growth=sum(simulate(sched, own).busy) / sum(simulate(sched, costs).busy))
    return out


def _costs_of_own_steps(sched, breakdown: Sequence[dict], probe: dict) -> dict | None:
    """Per-stage, per-micro-batch F / B / P1 / P2 as ``sched``'s own timed steps measured them:
    each rank's median time per kind over the number of such actions (micro-batches) it ran.
    None where a rank is not one stage (two chunks per rank) or a kind it ran has no time."""
    if sched.chunks != 1 or len(breakdown) != len(sched.ranks):
        return None
    # a kind a rank never ran keeps the probe's figure (B where no backward stayed fused)
    fallback = {k: probe[k] for k in ("F", "P1", "P2")}
    fallback["B"] = probe.get("B") or [p1 + p2 for p1, p2 in zip(probe["P1"], probe["P2"])]
    own: dict = {k: [] for k in fallback}
    for r, (acts, bd) in enumerate(zip(sched.ranks, breakdown)):
        for kind in own:
            n = sum(len(a.mbs) if kind == "P2" else 1 for a in acts if a.kind == kind)
            if n and not bd.get(kind, 0.0) > 0:
                return None
            own[kind].append(bd[kind] / n if n else fallback[kind][r])
    return {**probe, **own}
