"""One autograd Function for every split op: p1 in backward, p2 now or later.

``split_apply(op, owner, label, inputs, params)`` runs ``op.forward`` and wires its
backward:

* **Outside a split region** the saved sets live on the autograd node, and backward runs
  p1 and p2 together, returning the parameter gradients to autograd. The module is then
  exactly its torch twin under ``loss.backward()``.
* **Inside** ``split_backward(microbatch=i)`` the sets go into the activation store under
  ``(owner, i)``. Backward runs p1, frees the p1 set, deposits dy, and returns *no*
  parameter gradients; :func:`twobp.backward_p2` runs p2 later.

In a split region, saved tensors are held detached, so the store (not the autograd graph)
owns their lifetime; the graph is freed by p1 as usual and there is no ``retain_graph``.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor

from .ops.base import SplitOp
from .split import current_split
from .store import Entry

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
            # Plain autograd semantics: saved through save_for_backward, so version checks,
            # retain_graph and torch.distributed.pipelining's split backward all work.
            ctx.entry = None
            ctx.p1_keys, ctx.p2_keys = list(p1), list(p2)
            ctx.save_for_backward(*p1.values(), *p2.values())
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        op: SplitOp = ctx.op
        entry: Entry | None = ctx.entry
        n_in = len(ctx.in_needs)
        if entry is not None:
            p1 = entry.take_p1()
            in_needs = ctx.in_needs
        else:
            saved = ctx.saved_tensors
            n1 = len(ctx.p1_keys)
            p1 = dict(zip(ctx.p1_keys, saved[:n1]))
            p2 = dict(zip(ctx.p2_keys, saved[n1:]))
            # autograd.grad(..., inputs=...) may ask for a subset: compute only that
            in_needs = tuple(ctx.needs_input_grad[4:4 + n_in])
        if entry is None:
            # normal mode: one fused backward, fresh gradients for autograd to accumulate
            p_needs = tuple(ctx.needs_input_grad[4 + n_in:])
            dx, pgrads = op.fused_grads(dy, p1, p2, ctx.params, in_needs, p_needs)
            return (None, None, None, None, *dx, *pgrads)
        dx, partials = op.split_input_grads(dy, p1, ctx.params, in_needs, ctx.p_needs)
        del p1
        if partials is None:
            # p2 happens later: keep dy for it, row-contiguous so batched p2 reads it in place.
            entry.deposit_dy(dy.detach().contiguous())
        else:
            entry.deposit_partials(_detached(partials))
        return (None, None, None, None, *dx, *((None,) * len(ctx.params)))


def split_apply(op: SplitOp, owner: Hashable, label: str, inputs: Sequence[Tensor],
                params: Sequence[Tensor | None]) -> Tensor:
    """Apply ``op`` to ``inputs`` with ``params``, with the split backward wired in."""
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*inputs, *params))
    if not needs_graph:
        out, _, _ = op.forward(tuple(inputs), tuple(params), save_p1=False, save_p2=False)
        return out
    return _SplitFunction.apply(op, owner, label, len(inputs), *inputs, *params)
