"""Run a schedule for real: one process per pipeline rank, torch.distributed between them.

Per step, every rank walks its own list of the explicit form (:func:`lower_comm`):

* ``RF``/``RB``: receive an activation / output gradient (blocking, with a timeout);
* ``F``: forward of one micro-batch through this rank's stage module. If the schedule
  splits that micro-batch's backward (it has a ``P1``), the forward runs inside
  ``twobp.split_backward(microbatch=mb)``, so the twobp modules park what p2 needs in
  the activation store. The last stage applies the loss;
* ``P1`` / ``B``: ``torch.autograd.backward`` of the stage output with the received
  gradient (or of the scaled loss). Under a split forward this is p1 only: input
  gradients, plus the gradients of parameters outside twobp modules; otherwise it is the
  full backward;
* ``P2``: ``twobp.backward_p2(stage, microbatches=mbs)``, one batched launch per module;
* ``SF``/``SB``: post the send and go on.

Loss scaling: with micro-batch sizes ``n_i`` summing to ``N`` and ``loss_fn`` returning
the mean over its micro-batch, micro-batch i's loss is scaled by ``n_i / N`` before its
backward, so the accumulated gradients and the summed loss equal those of the
full-batch mean loss on one process. A ``loss_fn`` that averages over counted items (tokens
whose label is not the ignore index; :func:`twobp.data.averages_over`) is scaled by
``c_i / Σ c`` instead, over every replica's micro-batches.

Stage boundaries carry one floating tensor each way; stage inputs are detached and made
to require grad, so each stage's autograd graph ends at its own input.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .actions import Schedule
from .comm import P2P
from .deferral import warn_if_nothing_deferred
from .comm import one_way_channels as _one_way_channels
from .lowering import comm_peer, lower_comm, message_key, receive_in_send_order
from ..host_memory import keep_freed_host_memory
from ..store import ActivationStore
from .overlap import split_tail
from .grad_sync import GradSync, describe_plans
from .optimizer_step import OptimizerStep
from .partition import BlockLike, Partition, partition_blocks, shared_across_ranks
from .timeline import Event, Timeline
from .validate import validate

__all__ = ["PipelineExecutor", "StepResult", "PipelineError", "measured_costs"]


class PipelineError(RuntimeError):
    """An action failed on this rank; the message shows where in the schedule."""


@dataclass
class StepResult:
    """What one :meth:`PipelineExecutor.step` returns (the same on every rank)."""

    loss: float
    """Full-batch mean loss (the sum of the scaled micro-batch losses). With replicas and a
    counted loss (:func:`twobp.data.averages_over`), this replica's share times the replica
    count: the mean over replicas is the global batch's loss."""
    timeline: Timeline | None
    """Every rank's actions in seconds from the step start (None when ``measure=False``)."""
    costs: dict | None
    """Measured per-stage costs in the ``costs`` mapping form (see :func:`measured_costs`)."""
    peak_store_bytes: int
    """Peak bytes in this rank's twobp activation store during the step."""
    store_empty: bool
    """Whether this rank's activation store and executor buffers were empty afterwards (apart
    from the entries of the P2 it carries into the next step)."""
    carried: int = 0
    """P2 micro-batches this rank carries into the next step (``overlap_steps``)."""
    grad_norm: float | None = None
    """The whole model's gradient norm before clipping (with ``clip_grad_norm``; None when
    the optimizer step is carried to the next step)."""
    rank_events: list[Event] | None = None
    """This rank's own actions in seconds from its step start, without any collective (on
    CPU always; on CUDA with ``measure=True`` only, as reading event times synchronizes)."""


class _Clock:
    """Timestamps on CPU (perf_counter) or on the current CUDA stream (events)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def start(self) -> None:
        self.marks = []
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def mark(self) -> int:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [self.t0.elapsed_time(ev) / 1e3 for ev in self.marks]
        return [t - self.t0 for t in self.marks]


class PipelineExecutor:
    """This rank's share of a pipelined model and the loop that runs a schedule on it.

    ``blocks``: the model as a sequence of blocks (``nn.Sequential``, list of modules, or
    list of module factories so that only this rank's blocks get built); ``loss_fn(output,
    target)`` is applied after the last block and must return the mean over the
    micro-batch. ``schedule``: any valid :class:`Schedule` with ``stages`` equal to the
    number of ranks in ``group``. ``block_costs`` / ``bounds``: balance stages by measured
    block times, or give the cut explicitly (default: by block count).
    ``timeout``: seconds a receive may wait before the step fails with a clear error.
    ``static_shapes``: the tensors between stages have shapes that depend only on the
    batch's shape, so after the first step with a given batch shape messages go without
    their shape header (every rank sees the same batch shape, so all agree). Set False
    for data-dependent shapes.
    ``one_way_channels``: send each direction between two ranks on its own process group
    (see :mod:`.comm`; default: on for NCCL). Building them is a collective over the
    default group, so it needs ``group=None`` and every rank constructing the executor.
    ``overlap_steps``: run the P2 this rank carries (``schedule.carry``, see
    :func:`~twobp.pipeline.make_schedule` with ``overlap_steps=True``) and its optimizer
    step at the start of the next :meth:`step`, while it waits for its first input. Only
    when :meth:`step` is given the optimizer, and not with tied weights across ranks,
    ``clip_grad_norm`` or ``grad_scaler`` (their collectives would make the other ranks wait
    for the carried work); :meth:`flush` finishes them (call it before reading, evaluating
    or saving the weights; stepping that optimizer yourself while work is carried raises an
    error that says so).
    ``store``: the activation store this executor's split forwards use (default: one of
    its own, so pipelines in one process never see each other's entries; ``self.store``).

    Past one pipeline (see :mod:`.grad_sync`): ``mesh``, a
    :class:`~torch.distributed.device_mesh.DeviceMesh` with dims ``("dp", "pp")`` (from
    :func:`~twobp.pipeline.parallel.init_mesh`), runs this pipeline on its "pp" row and
    averages gradients over its "dp" column, bucketed by ``bucket_mb`` and overlapped with
    the schedule. Parameters shared by blocks on different ranks (a tied embedding and
    head) keep a copy on each rank whose gradients are summed, so the copies stay equal.
    """

    def __init__(self, blocks: Sequence[BlockLike] | nn.Sequential,
                 loss_fn: Callable[..., torch.Tensor], *, schedule: Schedule,
                 rank: int | None = None, group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None,
                 block_costs: Sequence[float] | None = None, bounds: Sequence[int] | None = None,
                 timeout: float = 300.0, one_way_channels: bool | None = None,
                 static_shapes: bool = True, overlap_steps: bool = False,
                 store: "ActivationStore | None" = None, mesh: Any = None, bucket_mb: float = 25.0):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: start the ranks with "
                               "twobp.pipeline.spawn(...) or under torchrun with init_from_env()")
        dp_group = None
        if mesh is not None:
            if group is not None:
                raise ValueError("give either mesh= (its 'pp' row is the pipeline) or group=, not both")
            if tuple(mesh.mesh_dim_names or ()) != ("dp", "pp"):
                raise ValueError(f"mesh must have dims ('dp', 'pp'), got {mesh.mesh_dim_names}; build it with "
                                 "twobp.pipeline.init_mesh(pp=..., dp=...)")
            group, dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        if not (bucket_mb > 0):
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        world = dist.get_world_size(group)
        if world != schedule.stages:
            raise ValueError(f"schedule {schedule.name!r} is for {schedule.stages} ranks but the "
                             f"process group has {world}; build it with stages={world}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        validate(schedule)
        self.schedule = schedule
        self.rank = dist.get_rank(group) if rank is None else rank
        self.group = group
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_host_memory()  # else every held activation is page-faulted back in (host_memory)
        self.loss_fn = loss_fn
        self.timeout = timeout
        p, v = schedule.stages, schedule.chunks
        mine = [schedule.stage_of(self.rank, c) for c in range(v)]
        self.partition: Partition
        self.partition, built = partition_blocks(blocks, num_stages=p * v, ranks=p,
                                                 stages_wanted=mine, costs=block_costs,
                                                 bounds=bounds, allow_shared=True, layout=schedule.layout)
        block_list = list(blocks.children()) if isinstance(blocks, nn.Sequential) else list(blocks)
        shared = shared_across_ranks(block_list, self.partition, ranks=p, layout=schedule.layout)
        self.stages: dict[int, nn.Sequential] = {c: built[s].to(self.device)
                                                 for c, s in enumerate(mine)}
        mine_acts, carried = split_tail(schedule.ranks[self.rank], schedule.carried(self.rank))
        self._lowered = lower_comm(schedule.replace(
            ranks=schedule.ranks[:self.rank] + (tuple(mine_acts),) + schedule.ranks[self.rank + 1:], carry=()))
        self._carry_acts = carried if overlap_steps else []
        if not overlap_steps and carried:  # run as written, at the end of the step
            self._lowered = lower_comm(schedule.replace(carry=()))
        if dist.get_backend(group) == "nccl":  # NCCL pairs a rank pair's messages in posting order
            self._lowered = receive_in_send_order(self._lowered)
        self._split = {(a.mb, a.chunk) for a in schedule.ranks[self.rank] if a.kind == "P1"}
        warn_if_nothing_deferred(self.stages, schedule_name=schedule.name, rank=self.rank, splits=bool(self._split))
        self.overlap_steps = overlap_steps
        self.store = store if store is not None else ActivationStore()
        self._steps_begun = 0  # training steps started on this executor (for error messages)
        self._failed_step: int | None = None  # a step that raised: the executor cannot go on
        self._grad_norm: float | None = None
        self.skipped_steps = 0
        """Optimizer steps the fp16 loss scaler skipped (an inf/nan gradient on some rank),
        carried and flushed ones included."""
        self._owed: list = []  # carried P2 actions not yet run (from the last step)
        self._owed_opt: OptimizerStep | None = None  # the optimizer step this rank owes
        self._left_grads: list = []  # (param, .grad, its version) when this rank began owing
        if one_way_channels is None:
            one_way_channels = dist.get_backend(group) == "nccl" and group is None
        channels = None
        if one_way_channels:
            if group is not None:
                raise ValueError("one_way_channels needs group=None (the channels are built "
                                 "over the default group); pass one_way_channels=False")
            pairs = sorted({(r, (r + d) % p) for r in range(p) for d in (1, -1) if p > 1})
            channels = _one_way_channels(pairs)
        self._p2p = P2P(rank=self.rank, device=self.device, timeout=timeout, group=group,
                        channels=channels)
        self.mesh, self.dp_group = mesh, dp_group
        self._sync = GradSync.for_pipeline(
            blocks=block_list, shared=shared, mesh=mesh, group=group, dp_group=dp_group,
            bucket_bytes=int(bucket_mb * 2**20), rank=self.rank, actions=self._lowered.ranks[self.rank],
            carried_chunks={a.chunk for a in self._carry_acts}, stages=self.stages)
        # the stage cut belongs to the plan: ranks cutting on their own block_costs may disagree
        plan = f"{schedule}\noverlap_steps={bool(overlap_steps)}, stage bounds={tuple(self.partition.bounds)}"
        self._check_ranks_agree(plan)
        self._sync.check_replicas_agree(plan)
        self._sync.check_tied_agree("building the pipeline")
        self._clock = _Clock(self.device)
        self._static_shapes = static_shapes
        self._shape_key: tuple | None = None  # batch shape the cache below belongs to
        self._shapes: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}  # tag -> (shape, dtype)

    @property
    def tied_parameters(self) -> list[nn.Parameter]:
        """This rank's copies of parameters shared with other pipeline ranks."""
        return [prm for prm, _ in self._sync.tied]

    def parameters(self):
        """Parameters of this rank's stages (for the optimizer), each once: a weight two of the
        rank's chunks share (a tied embedding and head in the V layout) must not be stepped twice."""
        for _, prm in self.named_parameters():
            yield prm

    def named_parameters(self):
        """(global qualified name, parameter): names match the whole model's ``nn.Sequential``."""
        seen = set()
        for c in sorted(self.stages):
            for name, prm in self.stages[c].named_parameters():
                if id(prm) not in seen:
                    seen.add(id(prm))
                    yield name, prm

    def _tag(self, key: tuple[str, int, int]) -> int:
        what, mb, s = key
        return ((0 if what == "act" else 1) * self.schedule.num_stages + s) \
            * self.schedule.microbatches + mb

    def step(self, inputs: torch.Tensor, targets: Any = None, *,
             optimizer: torch.optim.Optimizer | None = None, zero_grad: bool = True,
             measure: bool = True, lr_scheduler: Any = None, clip_grad_norm: float | None = None,
             grad_scaler: Any = None) -> StepResult:
        """One training step over the full batch ``inputs`` (split along dim 0 into the
        schedule's micro-batches). Every rank passes the same batch; only the first
        stage reads ``inputs`` and only the last reads ``targets``.

        ``zero_grad``: clear this rank's ``.grad`` first. ``optimizer``: stepped after the
        schedule (then ``lr_scheduler``, if given); with ``overlap_steps`` and carried P2 on
        this rank, at the start of the next step instead (see :meth:`flush`).
        ``measure``: gather every rank's timeline and measured costs (one small collective).
        ``clip_grad_norm``: before the optimizer step, scale every gradient so that their
        norm over the whole model (every pipeline rank, tied copies once; replicas agree
        after averaging) is at most this, as ``clip_grad_norm_`` on one process would.
        ``grad_scaler``: a ``torch.amp.GradScaler`` (fp16): the loss is scaled before its
        backward, and the step is skipped on every rank when any rank found an inf/nan.
        The gradient norm before clipping is ``StepResult.grad_norm`` (when clipping).
        """
        import twobp

        sched, m = self.schedule, self.schedule.microbatches
        if self._failed_step is not None:
            raise PipelineError(
                f"rank {self.rank}: training step {self._failed_step} of this executor failed, which leaves the ranks "
                "mid-schedule (messages half sent, peers gone or waiting) and the process group unusable (gloo closes "
                "its pairs): restart the ranks, or destroy and re-create the process group and build a new executor")
        self._steps_begun += 1
        if inputs.shape[0] < m:
            raise ValueError(f"batch of {inputs.shape[0]} rows cannot make {m} micro-batches; "
                             f"use at least {m} rows or fewer micro-batches")
        xs = torch.tensor_split(inputs, m)
        ts = torch.tensor_split(targets, m) if isinstance(targets, torch.Tensor) else [targets] * m
        sizes = [x.shape[0] for x in xs]
        batch_key = (tuple(inputs.shape), inputs.dtype)
        known = self._static_shapes and self._shape_key == batch_key
        if not known:
            self._shapes.clear()
        store = self.store
        if optimizer is None and (lr_scheduler is not None or clip_grad_norm is not None or grad_scaler is not None):
            raise ValueError("step(lr_scheduler=/clip_grad_norm=/grad_scaler=) needs optimizer= too: the executor "
                             "applies them around its optimizer step")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a number > 0, got {clip_grad_norm!r}")
        if grad_scaler is not None:
            # every rank's scaler must hold the scale the last stage's loss gets (they evolve
            # alike from here, as every rank agrees on infs); scaling once sets it up
            grad_scaler.scale(torch.zeros((), device=self.device))
        if measure:
            self._collective("the start-of-step barrier", dist.barrier, group=self.group)
        self._clock.start()
        records = []  # (text, kind, mark0, mark1, message key or None)
        if self._owed or self._owed_opt:
            self._run_owed(records)  # last step's carried P2 and optimizer step
        store.begin_step()  # raises LeakError if something was left from before
        if zero_grad:
            for prm in self.parameters():
                prm.grad = None
        self._sync.begin_step()
        weights = self._loss_weights(ts, sizes)
        last = sched.num_stages - 1
        acts = self._lowered.ranks[self.rank]
        act_in: dict[tuple[int, int], torch.Tensor] = {}
        grad_in: dict[tuple[int, int], torch.Tensor] = {}
        saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        out_act: dict[tuple[int, int], torch.Tensor] = {}
        out_grad: dict[tuple[int, int], torch.Tensor] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        i = -1
        try:
            for i, a in enumerate(acts):
                key = (a.mb, a.chunk)
                s = sched.stage_of(self.rank, a.chunk)
                t0 = self._clock.mark()
                if a.kind in ("RF", "RB"):
                    mk = message_key(sched, self.rank, a)
                    peer = comm_peer(sched, self.rank, a)
                    what = "activation" if a.kind == "RF" else "gradient"
                    tag = self._tag(mk)
                    got = self._p2p.recv(peer, tag, lambda: f"{a}: micro-batch {a.mb}'s {what}",
                                         like=self._shapes.get(tag) if known else None)
                    self._shapes[tag] = (tuple(got.shape), got.dtype)
                    (act_in if a.kind == "RF" else grad_in)[key] = got
                    records.append((str(a), "recv", t0, self._clock.mark(), mk))
                    continue
                if a.kind in ("SF", "SB"):
                    mk = message_key(sched, self.rank, a)
                    tensor = (out_act if a.kind == "SF" else out_grad).pop(key)
                    self._p2p.send(tensor, comm_peer(sched, self.rank, a), self._tag(mk),
                                   header=not known)
                    records.append((str(a), "send", t0, self._clock.mark(), mk))
                    continue
                module = self.stages[a.chunk]
                if a.kind == "F":
                    x = xs[a.mb].to(self.device) if s == 0 else act_in.pop(key)
                    if s > 0 and x.is_floating_point():
                        x = x.detach().requires_grad_(True)
                    ctx = (twobp.split_backward(microbatch=a.mb, store=store) if key in self._split
                           else contextlib.nullcontext())
                    with ctx:
                        y = module(x)
                    if s == last:
                        t = ts[a.mb]
                        if isinstance(t, torch.Tensor):
                            t = t.to(self.device)
                        if weights[a.mb] == 0 and isinstance(y, torch.Tensor):
                            y = y.float().sum() * 0.0  # counts nothing: adds nothing (its mean is 0 / 0)
                        else:
                            loss = self.loss_fn(y, t) if t is not None else self.loss_fn(y)
                            y = loss * weights[a.mb]
                        loss_sum += y.detach().double()
                        if grad_scaler is not None:
                            y = grad_scaler.scale(y)
                    else:
                        nxt_rank, nxt_chunk = sched.place(s + 1)
                        if nxt_rank == self.rank:
                            act_in[(a.mb, nxt_chunk)] = y.detach()
                        else:
                            out_act[key] = y.detach()
                    saved[key] = (x, y)
                elif a.kind in ("P1", "B"):
                    x, y = saved.pop(key)
                    if y.requires_grad:
                        if s == last:
                            torch.autograd.backward(y)
                        else:
                            torch.autograd.backward(y, grad_in.pop(key))
                    elif s < last:
                        grad_in.pop(key)
                    if s > 0:
                        dx = x.grad if x.grad is not None else torch.zeros_like(x)
                        prv_rank, prv_chunk = sched.place(s - 1)
                        if prv_rank == self.rank:
                            grad_in[(a.mb, prv_chunk)] = dx
                        else:
                            out_grad[key] = dx
                    del x, y
                elif a.kind == "P2":
                    twobp.backward_p2(module, microbatches=a.mbs, batched=True, store=store)
                records.append((str(a), a.kind, t0, self._clock.mark(), None))
                if self._sync.buckets:
                    self._sync.launch_ready(i, self._clock.mark)
            t0 = self._clock.mark()
            self._p2p.drain()  # a send completes when its peer receives: waiting on a peer
            records.append(("sends completing", "recv", t0, self._clock.mark(), None))
        except Exception as e:
            if dist.get_world_size(self.group) > 1:  # one rank alone has no peer left mid-schedule
                self._failed_step = self._steps_begun
            raise PipelineError(
                f"rank {self.rank} failed in training step {self._steps_begun} at action {i} "
                f"({acts[i] if 0 <= i < len(acts) else '?'}) of schedule {sched.name!r}: "
                f"{type(e).__name__}: {e}\n{self._where(i)}") from e
        self._shape_key = batch_key
        # Carry only when this rank's optimizer step needs no other pipeline rank: tied copies,
        # the global clipping norm and fp16's inf agreement are collectives that would make
        # the other ranks wait for this one's carried work (and lose the overlap).
        carrying = (bool(self._carry_acts) and optimizer is not None and clip_grad_norm is None
                    and grad_scaler is None and not self._sync.tied)
        if self._carry_acts and not carrying:  # run them now, at the end of this step
            self._run_p2_actions(self._carry_acts, records)
        empty = (self._store_holds_only_carried(store, carrying)
                 and not (act_in or grad_in or saved or out_act or out_grad))
        peak = store.peak_bytes
        if dist.get_world_size(self.group) > 1:
            src = sched.place(last)[0]
            t0 = self._clock.mark()
            self._collective("the loss broadcast", dist.broadcast, loss_sum,
                             src=src if self.group is None else dist.get_global_rank(self.group, src),
                             group=self.group)
            # every rank meets here: the wait for the slowest one is idle time
            records.append(("loss broadcast", "recv", t0, self._clock.mark(), None))
        self._grad_norm = None
        if carrying:
            self._owed = list(self._carry_acts)
            self._owed_opt = OptimizerStep(optimizer, lr_scheduler, clip_grad_norm, grad_scaler)
            # .grad is half-made until the owed work runs: remember it, to refuse edits in between
            self._left_grads = [(prm, prm.grad, None if prm.grad is None else prm.grad._version)
                                for prm in self.parameters()]
        else:
            if self._sync.active:
                self._sync.finish(self._clock.mark, records)
            if optimizer is not None:
                self._step_optimizer(OptimizerStep(optimizer, lr_scheduler, clip_grad_norm, grad_scaler), records)
        timeline = costs = rank_events = None
        if measure or not self._clock.cuda:  # CUDA event times need a synchronize
            secs = self._clock.seconds()
            mine = [(self.rank, txt, kind, secs[a], secs[b], mk) for txt, kind, a, b, mk in records]
            rank_events = [Event(r, txt, kind, a, b) for r, txt, kind, a, b, _ in mine]
        if measure:
            gathered: list = [None] * dist.get_world_size(self.group)
            self._collective("gathering the timelines", dist.all_gather_object, gathered, mine,
                             group=self.group)
            rows = [row for part in gathered for row in part]
            timeline = Timeline(ranks=sched.stages, title=f"{sched.name} (measured)",
                                events=[Event(r, txt, kind, a, b) for r, txt, kind, a, b, _ in rows])
            costs = measured_costs(sched, rows)
        return StepResult(loss=float(loss_sum), timeline=timeline, costs=costs,
                          peak_store_bytes=peak, store_empty=empty, rank_events=rank_events,
                          carried=sum(len(a.mbs) for a in self._owed), grad_norm=self._grad_norm)

    # ---- carried work (overlap_steps) ---------------------------------------------------
    def flush(self) -> None:
        """Run what this rank carries from the last step (its trailing P2 and its optimizer
        and lr-scheduler steps) now. A no-op when nothing is carried; call it on every rank
        before reading, evaluating or saving the weights."""
        if self._owed or self._owed_opt:
            self._clock.start()
            self._run_owed([])

    @property
    def owes(self) -> bool:
        """Whether this rank still carries P2 or an optimizer step from the last step."""
        return bool(self._owed or self._owed_opt)

    def _run_owed(self, records: list) -> None:
        self._check_left_grads()
        acts, self._owed = self._owed, []
        self._run_p2_actions(acts, records)
        if self._sync.active:
            self._sync.finish(self._clock.mark, records)
        if self._owed_opt is not None:
            args, self._owed_opt = self._owed_opt, None
            self._step_optimizer(args, records)

    def _run_p2_actions(self, acts, records: list) -> None:
        import twobp

        for a in acts:
            t0 = self._clock.mark()
            twobp.backward_p2(self.stages[a.chunk], microbatches=a.mbs, batched=True, store=self.store)
            records.append((str(a), "P2", t0, self._clock.mark(), None))

    def _step_optimizer(self, step: OptimizerStep, records: list) -> None:
        t0 = self._clock.mark()
        tied_elsewhere = {id(prm) for prm, g in self._sync.tied if dist.get_rank() != min(dist.get_process_group_ranks(g))}
        norm = step.run(list(self.parameters()), device=self.device, pipeline_group=self.group,
                        all_group=None if (self.mesh is not None or self.group is None) else self.group,
                        tied_elsewhere=tied_elsewhere)
        if norm is not None:
            self._grad_norm = norm
        self.skipped_steps += step.skipped
        records.append(("optim", "optim", t0, self._clock.mark(), None))

    def _loss_weights(self, targets: Sequence, sizes: Sequence[int]) -> list[float]:
        """Each micro-batch's share of the step's loss: its rows over the batch's, or, for a
        ``loss_fn`` marked with :func:`twobp.data.averages_over`, the items it counts over the
        items every micro-batch of every replica counts (one all-reduce over the replicas, by
        the ranks holding the last stage), times the replica count that the gradient average
        divides by again. Computed where the loss is, the last stage."""
        sched = self.schedule
        counter = getattr(self.loss_fn, "counted_items", None)
        if counter is None or sched.place(sched.num_stages - 1)[0] != self.rank or \
                not all(isinstance(t, torch.Tensor) for t in targets):
            return [n / sum(sizes) for n in sizes]
        counts = [int(counter(t)) for t in targets]
        total, replicas = float(sum(counts)), self._sync.dp_size
        if replicas > 1:
            t = torch.tensor([total], dtype=torch.float64, device=self.device)
            self._collective("summing the counted targets over the replicas", dist.all_reduce, t,
                             group=self._sync.dp_group)
            total = float(t)
        if total == 0:
            raise ValueError("no target of this batch counts for the loss (every one is the ignore index): its "
                             "mean is 0 / 0. Give every step at least one counted target")
        return [c * replicas / total for c in counts]

    def _check_left_grads(self) -> None:
        """Refuse to finish a carried step whose ``.grad`` was changed after step() returned: the
        carried P2 would complete a gradient that is no longer there, silently."""
        left, self._left_grads = self._left_grads, []
        for prm, grad, version in left:
            if prm.grad is not grad or (grad is not None and grad._version != version):
                self._owed, self._owed_opt = [], None  # that step is lost: the next one starts clean
                self.store.clear()
                raise RuntimeError(
                    f"rank {self.rank}: the gradients of the last step were changed after step() returned "
                    "(optimizer.zero_grad(), clip_grad_norm_ or an edit of .grad), but with overlap_steps this rank "
                    "still owes that step's last P2 and optimizer step, which run at the head of the next step(): "
                    "the step's gradient is incomplete until then. Let step() zero the gradients (zero_grad=True, "
                    "the default) and clip them (clip_grad_norm=), or call executor.flush() before touching .grad. "
                    "That step's update is dropped on this rank (its carried work discarded); zero the gradients "
                    "and the next step() starts clean.")

    def _store_holds_only_carried(self, store, carrying: bool) -> bool:
        if not carrying:
            return store.is_empty()
        allowed = {(mb, a.chunk) for a in self._carry_acts for mb in a.mbs}
        chunk_of = {id(m): c for c, st in self.stages.items() for m in st.modules()}
        return all(e.state.value == "ready" and (e.microbatch, chunk_of.get(id(e.owner))) in allowed
                   for e in store.entries())

    def _check_ranks_agree(self, plan: str) -> None:
        """Refuse, on every rank alike, pipeline ranks given different schedules (each rank
        planning ``auto`` on its own measured costs, say): their sends and receives would not
        pair up, and the step would fail only at the timeout, or run a plan nobody simulated."""
        world = dist.get_world_size(self.group)
        if world == 1:
            return
        plans: list = [None] * world
        self._collective("comparing the ranks' schedules", dist.all_gather_object, plans, plan, group=self.group)
        if len(set(plans)) > 1:
            raise ValueError(
                f"the pipeline's ranks were given different schedules or stage cuts ({describe_plans(plans, 'rank')}): "
                "give every rank the same schedule, overlap_steps and cut (bounds=, or block_costs every rank shares: "
                "measure them on one rank and broadcast); plan auto on costs every rank shares (StepResult.costs of "
                "a measured step is the same on every rank)")

    def _collective(self, what: str, fn, *args, **kwargs) -> None:
        # Collectives wait on every rank; say which step of the executor hung or failed.
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:
            raise PipelineError(
                f"rank {self.rank}: {what} failed (a rank is dead, hung, or past the "
                f"process-group timeout): {str(e).splitlines()[0] if str(e) else e!r}") from e

    def _where(self, i: int) -> str:
        acts = self._lowered.ranks[self.rank]
        lo, hi = max(0, i - 6), min(len(acts), i + 7)
        shown = " ".join(f">{a}<" if j == i else str(a) for j, a in enumerate(acts[lo:hi], lo))
        return (f"rank {self.rank}, action {i}: {'... ' if lo else ''}{shown}"
                f"{' ...' if hi < len(acts) else ''}")


def measured_costs(schedule: Schedule, rows: Sequence[tuple]) -> dict:
    """Per-stage medians of measured action times, in the ``costs`` mapping form.

    ``rows``: ``(rank, action text, kind, start, end, message key)`` from every rank.
    ``F``, ``P1``, ``B`` are per micro-batch; ``P2`` is a batched launch's time divided by
    its micro-batches. ``comm``: median delay from a send being posted to the receive
    ending, over receives that were already waiting when the send was posted (others
    say nothing about the link); 0 when there were none. Kinds that did not run (P1/P2
    in a fused run, B in a split one) are left out, so a 2BP run gives what ``auto``
    needs: ``Costs.from_mapping(result.costs)``.
    """
    from .actions import parse_action

    S = schedule.num_stages
    per: dict[str, list[list[float]]] = {k: [[] for _ in range(S)] for k in ("F", "P1", "P2", "B")}
    sends, recvs = {}, []
    for rank, txt, kind, t0, t1, mk in rows:
        if kind == "send":
            sends[mk] = t0
        elif kind == "recv":
            recvs.append((mk, t0, t1))
        elif kind in per:
            a = parse_action(txt)
            per[kind][schedule.stage_of(rank, a.chunk)].append((t1 - t0) / len(a.mbs))
    out: dict[str, Any] = {}
    for kind, lists in per.items():
        if all(lists):
            out[kind] = [statistics.median(x) for x in lists]
    samples = [t1 - sends[mk] for mk, t0, t1 in recvs if mk in sends and t0 <= sends[mk]]
    out["comm"] = max(0.0, statistics.median(samples)) if samples else 0.0
    return out
