"""One autograd Function for every split op: p1 in backward, p2 now or later.

``split_apply(op, owner, label, inputs, params)`` runs ``op.forward`` and wires its
backward:

* **Outside a split region** the saved sets live on the autograd node, and backward runs
  p1 and p2 together, returning the parameter gradients to autograd. The module is then
  exactly its torch twin under ``loss.backward()``.
* **Inside** ``split_backward(microbatch=i)`` the sets go into the activation store under
  ``(owner, i)``. Backward runs p1, frees the p1 set, deposits dy, and returns *no*
  parameter gradients; :func:`twobp.backward_p2` runs p2 later.

Saved tensors are held detached, so the store (not the autograd graph) owns their
lifetime, and the graph is freed by backward as usual: there is no ``retain_graph``.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor

from .ops.base import SplitOp
from .split import current_split
from .store import Entry, check_versions, record_versions

__all__ = ["split_apply"]


def _detached(saved: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.detach() if v is not None else None) for k, v in saved.items()}


class _SplitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: SplitOp, owner: Hashable, label: str, n_inputs: int, *tensors):  # type: ignore[override]
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        in_needs = tuple(t is not None and t.requires_grad for t in inputs)
        p_needs = tuple(p is not None and p.requires_grad for p in params)
        out, p1, p2 = op.forward(inputs, params, save_p1=any(in_needs), save_p2=any(p_needs))
        p1, p2 = _detached(p1), _detached(p2)
        ctx.op, ctx.params, ctx.in_needs, ctx.p_needs = op, params, in_needs, p_needs
        split = current_split()
        if split is not None and any(p_needs):
            ctx.entry = split.store.open(owner=owner, label=label, microbatch=split.microbatch, op=op,
                                         params=params, param_mask=p_needs, p1=p1, p2=p2)
        else:
            ctx.entry = None
            ctx.p1, ctx.p2 = p1, p2
            ctx.versions = record_versions(p1, p2)
            ctx.label = label
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        op: SplitOp = ctx.op
        entry: Entry | None = ctx.entry
        if entry is not None:
            p1 = entry.take_p1()
        else:
            p1 = ctx.p1
            check_versions(p1, ctx.versions, ctx.label)
            ctx.p1 = None
        dx = (op.input_grads(dy, p1, ctx.params, ctx.in_needs)
              if any(ctx.in_needs) else (None,) * len(ctx.in_needs))
        del p1
        if entry is not None:
            # p2 happens later: keep dy for it, row-contiguous so batched p2 reads it in place.
            entry.deposit_dy(dy.detach().contiguous())
            pgrads: Sequence[Tensor | None] = (None,) * len(ctx.params)
        else:
            pgrads = [torch.zeros_like(p) if need else None for p, need in zip(ctx.params, ctx.p_needs)]
            if any(ctx.p_needs):
                check_versions(ctx.p2, ctx.versions, ctx.label)
                op.param_grads([dy.contiguous()], [ctx.p2], pgrads)
            ctx.p2 = None
        return (None, None, None, None, *dx, *pgrads)


def split_apply(op: SplitOp, owner: Hashable, label: str, inputs: Sequence[Tensor],
                params: Sequence[Tensor | None]) -> Tensor:
    """Apply ``op`` to ``inputs`` with ``params``, with the split backward wired in."""
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*inputs, *params))
    if not needs_graph:
        out, _, _ = op.forward(tuple(inputs), tuple(params), save_p1=False, save_p2=False)
        return out
    return _SplitFunction.apply(op, owner, label, len(inputs), *inputs, *params)
