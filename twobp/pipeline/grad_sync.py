"""Gradient synchronisation after a step's weight gradients: tied copies and replicas.

Two reductions, both linear, so their order does not matter:

* **Tied parameters across pipeline ranks** (a tied embedding on the first stage and the
  LM head on the last): every owning rank holds a copy, and each copy's gradient is the
  sum of all owners' gradients (all-reduce SUM over the owners), as one process holding
  the parameter once would accumulate. The optimizer then takes the same step on every
  copy, so the copies stay bit-identical.
* **Data-parallel replicas** (``dp_group``): the mean over replicas (all-reduce SUM, then
  divided by their number), which makes a replica's gradient that of the global batch.

Replica all-reduces are **bucketed** (``bucket_bytes``, about 25 MB by default) and
**overlapped**: a chunk's gradients are final after its last P2 (or fused B / P1 for
parameters autograd fills), so its buckets are launched asynchronously right after that
action and only waited for before the optimizer step; they hide behind the P2 of other
chunks and the bubble, as Megatron's overlapped grad reduce does for zero-bubble
schedules. Tied parameters are reduced at the end, synchronously (one small tensor).

Replicas issue these all-reduces in the order their schedules make gradients final, and
collectives meet by issue order: every replica must run the same plan. A plan made from
each replica's own measured costs can differ (carried P2 on one replica and not on the
other moves a bucket from before the tied reduction to after it: gloo then aborts with
"Received data size doesn't match expected size", NCCL hangs). :meth:`GradSync.check_replicas_agree`
refuses that at construction; :func:`twobp.pipeline.agree_costs` gives replicas one set of costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradSync", "Bucket", "describe_plans"]


def describe_plans(plans: Sequence[str], who: str) -> str:
    """The first line of each ``who``'s plan (a schedule as text, then any settings on its last
    line), for an error that refuses plans which differ: with the last lines where those differ,
    and saying so when only the action lists between them differ."""
    lines = [p.splitlines() for p in plans]
    tails_differ = len({ln[-1] for ln in lines}) > 1
    heads = [ln[0] + (f" {ln[-1]}" if tails_differ else "") for ln in lines]
    text = "; ".join(f"{who} {i}: {h!r}" for i, h in enumerate(heads))
    return text + ("; the same head, different action lists" if len(set(heads)) == 1 else "")


@dataclass
class Bucket:
    """Parameters of one chunk whose gradients travel as one flat tensor."""

    chunk: int
    params: list[nn.Parameter]
    work: object = None
    flat: torch.Tensor | None = None
    launched_mark: int | None = None


@dataclass
class GradSync:
    """See the module docstring. ``ready_after[c]``: index of the action after which chunk
    c's gradients are final in a step (None: only at the end, e.g. carried P2)."""

    buckets: list[Bucket]
    ready_after: dict[int, int | None]
    dp_group: dist.ProcessGroup | None
    tied: list[tuple[nn.Parameter, dist.ProcessGroup]] = field(default_factory=list)
    dp_size: int = 1
    _tied_base: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per tied parameter, the ``.grad`` it held when the step began (gradient accumulation
    over steps): already summed over the tie, so only what the step adds is summed again."""

    @classmethod
    def build(cls, params_by_chunk: dict[int, Sequence[nn.Parameter]], ready_after: dict[int, int | None], *,
              dp_group: dist.ProcessGroup | None, tied: list[tuple[nn.Parameter, dist.ProcessGroup]],
              bucket_bytes: int) -> "GradSync":
        tied_ids = {id(p) for p, _ in tied}
        buckets: list[Bucket] = []
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            for c, params in params_by_chunk.items():
                current: dict[torch.dtype, Bucket] = {}
                size: dict[torch.dtype, int] = {}
                # roughly the order backward finishes them: last registered first
                for p in reversed([p for p in params if p.requires_grad and id(p) not in tied_ids]):
                    dtype = getattr(p, "grad_dtype", None) or p.dtype
                    b = current.get(dtype)
                    nbytes = p.numel() * torch.empty((), dtype=dtype).element_size()
                    if b is None or size[dtype] + nbytes > bucket_bytes:
                        b = current[dtype] = Bucket(c, [])
                        size[dtype] = 0
                        buckets.append(b)
                    b.params.append(p)
                    size[dtype] += nbytes
        dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        return cls(buckets, dict(ready_after), dp_group, list(tied), dp_size)

    @classmethod
    def for_pipeline(cls, *, blocks: Sequence[nn.Module], shared, mesh, group, dp_group, bucket_bytes: int,
                     rank: int, actions, carried_chunks: set[int], stages: dict[int, nn.Module]) -> "GradSync":
        """The sync of one pipeline rank: tie groups (a collective: every rank of the world
        creates every group, in one order) and replica buckets, each chunk's made ready after
        the action that makes its gradients final (``actions``: the rank's explicit list)."""
        tied = []
        for share in shared:
            if mesh is not None:
                rows = mesh.mesh.reshape(-1, mesh.mesh.shape[-1]).tolist()
                members = [[row[r] for r in share.ranks] for row in rows]
            elif group is None:
                members = [list(share.ranks)]
            else:
                raise NotImplementedError(
                    f"parameter {' and '.join(share.names)} is tied across pipeline ranks {list(share.ranks)} of a "
                    "process sub-group: pass mesh= (twobp.pipeline.init_mesh) so every rank can build the tie groups")
            me = dist.get_rank()
            mine = None
            for ranks in members:
                g = dist.new_group(ranks=ranks)
                if me in ranks:
                    mine = g
            if rank in share.ranks and mine is not None:
                param = next(prm for b in share.blocks for n, prm in blocks[b].named_parameters()
                             if f"{b}.{n}" in share.names)
                tied.append((param, mine))
        ready: dict[int, int | None] = {}
        for c in stages:
            idx = [i for i, a in enumerate(actions) if a.chunk == c and a.kind in ("B", "P1", "P2")]
            ready[c] = None if (c in carried_chunks or not idx) else max(idx)
        by_chunk: dict[int, list] = {}
        seen: set[int] = set()
        order = sorted(stages, key=lambda c: (ready[c] is None, ready[c] or 0), reverse=True)
        for c in order:  # a parameter two chunks share is final with the later one
            by_chunk[c] = [prm for prm in stages[c].parameters() if id(prm) not in seen]
            seen.update(id(prm) for prm in by_chunk[c])
        return cls.build(by_chunk, ready, dp_group=dp_group, tied=tied, bucket_bytes=bucket_bytes)

    def check_replicas_agree(self, plan: str) -> None:
        """Refuse, on every rank alike, replicas whose data-parallel all-reduces would meet out
        of order: ``plan`` (the rank's schedule as text, with anything else that decides when
        gradients are final) and the bucket layout must be the same on every replica (one
        small collective over the replica group; nothing to check without replicas)."""
        if self.dp_group is None or self.dp_size == 1:
            return
        layout = [(b.chunk, self.ready_after.get(b.chunk), [tuple(p.shape) for p in b.params]) for b in self.buckets]
        mine = (plan, layout, [tuple(p.shape) for p, _ in self.tied])
        gathered: list = [None] * self.dp_size
        dist.all_gather_object(gathered, mine, group=self.dp_group)
        if all(g == mine for g in gathered):
            return
        if any(g[0] != mine[0] for g in gathered):
            raise ValueError(
                "data-parallel replicas run different pipeline schedules, so their gradient all-reduces would "
                f"meet out of order ({describe_plans([g[0] for g in gathered], 'replica')}). Build every replica's "
                "schedule from the same costs: twobp.pipeline.agree_costs(costs, mesh) averages measured costs "
                "over the replicas")
        raise ValueError("data-parallel replicas hold different parameters on this pipeline rank (shapes or "
                         "tied copies differ), so their gradient all-reduces cannot pair up: build every replica "
                         "from the same model and stage cut")

    @property
    def active(self) -> bool:
        return bool(self.buckets or self.tied)

    def launch_ready(self, index: int, mark: Callable[[], int]) -> None:
        """Launch the buckets of every chunk that became final with action ``index``."""
        for b in self.buckets:
            if b.work is None and self.ready_after.get(b.chunk) == index:
                self._launch(b, mark)

    def _launch(self, b: Bucket, mark: Callable[[], int]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p, dtype=getattr(p, "grad_dtype", None)
                                                                     or p.dtype) for p in b.params]
        b.flat = torch.cat([g.reshape(-1) for g in grads])
        b.launched_mark = mark()
        b.work = dist.all_reduce(b.flat, op=dist.ReduceOp.SUM, group=self.dp_group, async_op=True)

    def begin_step(self) -> None:
        """A step begins adding to ``.grad``: remember what the tied copies already hold (the
        same on every copy, summed by an earlier step), so :meth:`finish` sums only the new part."""
        self._tied_base = {id(p): p.grad.clone() for p, _ in self.tied if p.grad is not None}

    def finish(self, mark: Callable[[], int], records: list) -> None:
        """Tie sums, the rest of the replica buckets, every wait, and the unflatten; records
        one ``allreduce`` event per bucket (launch to completion) into ``records``.

        A tied copy's ``.grad`` is its earlier steps' sum (the same on every copy, see
        :meth:`begin_step`) plus this step's own part: the part is summed over the tie and
        averaged over the replicas, the base added back once. (Replica buckets need no base:
        averaging values that agree leaves them unchanged.)"""
        for p, group in self.tied:
            t0 = mark()
            if p.grad is None:
                p.grad = torch.zeros_like(p, dtype=getattr(p, "grad_dtype", None) or p.dtype)
            base = self._tied_base.pop(id(p), None)
            if base is not None:
                p.grad.sub_(base)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
            if self.dp_size > 1:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.dp_group)
                p.grad.div_(self.dp_size)
            if base is not None:
                p.grad.add_(base)
            records.append(("allreduce[tied]", "allreduce", t0, mark(), None))
        for b in self.buckets:
            if b.work is None:
                self._launch(b, mark)
        for b in self.buckets:
            b.work.wait()
            b.flat.div_(self.dp_size)
            offset = 0
            for p in b.params:
                n = p.numel()
                part = b.flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = part.clone()
                else:
                    p.grad.copy_(part)
                offset += n
            records.append((f"allreduce[chunk {b.chunk}, {len(b.params)} params]", "allreduce",
                            b.launched_mark, mark(), None))
            b.work = b.flat = b.launched_mark = None

    def check_tied_agree(self, where: str) -> None:
        """Refuse tied copies that differ across the ranks holding them (one max and one min
        all-reduce per tied parameter over its tie group): their gradients are summed, so copies
        that start apart stay apart, and the model is no longer the tied one. ``where`` says when."""
        for p, group in self.tied:
            hi, lo = p.detach().clone(), p.detach().clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
            if not torch.equal(hi, lo):
                gap = float((hi.double() - lo.double()).abs().max())
                raise ValueError(
                    f"{where}: the tied copies of a parameter of shape {tuple(p.shape)} differ across pipeline ranks "
                    f"{dist.get_process_group_ranks(group)} (largest gap {gap:.3g}); their gradients are summed, so "
                    "they would never meet again. Build every copy from the same values (the same seed), or load a "
                    "checkpoint saved with the weights tied (twobp train --tie-embeddings)")
