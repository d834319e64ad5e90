"""Embedding, split: Y = W[ids]. The whole weight gradient is p2.

Shapes: ids [...] integers in [0, V) (flattened to [M]), W [V, D], Y [..., D].

* forward: the gather Y = W[ids], torch's own on both backends (bounds-checked; there is
  nothing to split in it).
* p1: ids are integers, so there is **no input gradient** and p1 computes nothing: it only
  deposits dY. The previous pipeline stage waits for nothing from an embedding.
* p2, dW[v] += Σ_{m: ids[m] = v} dY[m] (padding_idx's row excluded; with
  ``scale_grad_by_freq`` each row divided by its id's count in its own micro-batch): needs
  ids (saved by forward, [M] int) and dY (deposited by p1, [M, D]). A tied embedding/head
  weight is then deferred entirely: both its uses accumulate in p2.

The Triton backend is :func:`twobp.kernels.embedding.embedding_dw` (sort-based, one
program per dW row, deterministic, all micro-batches in one launch); the torch reference
below is aten's ``embedding_dense_backward``, what torch's autograd runs for nn.Embedding,
over the concatenated micro-batches in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import resolve_backend
from .base import SplitOp

__all__ = ["EmbeddingOp", "embedding_dw_ref"]

_ATEN = torch.ops.aten


def embedding_dw_ref(ids: Sequence[Tensor], dys: Sequence[Tensor], dweight: Tensor, *,
                     padding_idx: int | None, scale_grad_by_freq: bool) -> None:
    """dW += Σ_i scatter-add of dY_i's rows at ids_i, through aten's embedding_dense_backward.

    One call over the concatenated micro-batches (one [V, D] temporary), or one per
    micro-batch with ``scale_grad_by_freq`` (its counts are per micro-batch). Computed in
    dW's dtype when that is wider than dY's (fp32 master gradients)."""
    v = dweight.shape[0]
    pad = -1 if padding_idx is None else padding_idx
    wide = dweight.dtype if dweight.dtype.itemsize > dys[0].dtype.itemsize else dys[0].dtype
    groups = [(i, g) for i, g in zip(ids, dys)] if scale_grad_by_freq else \
        [(torch.cat(list(ids)), torch.cat(list(dys)))] if len(ids) > 1 else [(ids[0], dys[0])]
    for i, g in groups:
        grad = _ATEN.embedding_dense_backward(g.to(wide), i, v, pad, scale_grad_by_freq)
        dweight.add_(grad.to(dweight.dtype))


@dataclass(frozen=True)
class EmbeddingOp(SplitOp):
    """The split lookup: 1 input (ids), 1 parameter (weight [V, D]); p1 saves nothing, p2 ids.

    ``padding_idx``: the row that gets no gradient (already normalised to [0, V), or None).
    ``scale_grad_by_freq``: as ``nn.Embedding``. ``max_norm`` is not the op's business: the
    module renormalises the weight rows before the lookup, as torch does.
    """

    padding_idx: int | None = None
    scale_grad_by_freq: bool = False
    name = "embedding"
    autocast = None  # torch's embedding is not an autocast op: it returns the weight's dtype

    def native_forward(self, inputs, params):
        (ids,), (weight,) = inputs, params
        if resolve_backend(weight.device) != "torch":
            return None
        self._check(ids, weight)
        return F.embedding(ids, weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)

    def forward(self, inputs, params, *, save_p1, save_p2):
        (ids,), (weight,) = inputs, params
        self._check(ids, weight)
        out = F.embedding(ids, weight, self.padding_idx)
        p2 = {"ids": ids.reshape(-1)} if save_p2 else {}
        return out, {}, p2

    @staticmethod
    def _check(ids: Tensor, weight: Tensor) -> None:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"embedding: ids must be an integer tensor (int64 or int32), got {ids.dtype}; "
                            "cast with ids.long()")
        if ids.device != weight.device:
            raise ValueError(f"embedding: ids are on {ids.device} but the weight is on {weight.device}; move "
                             f"them with ids.to({str(weight.device)!r})")

    def input_grads(self, dy, saved, params, needs):
        return (None,)  # integer ids: no gradient

    def differentiable_forward(self, inputs, params):
        return F.embedding(inputs[0], params[0], self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)

    def fused_grads(self, dy, p1, p2, params, in_needs, p_needs):
        if resolve_backend(dy.device) == "triton" or not p_needs[0]:
            return super().fused_grads(dy, p1, p2, params, in_needs, p_needs)
        weight = params[0]
        pad = -1 if self.padding_idx is None else self.padding_idx
        # exactly what torch's autograd computes for F.embedding
        grad = _ATEN.embedding_dense_backward(dy.reshape(-1, weight.shape[1]), p2["ids"], weight.shape[0], pad,
                                              self.scale_grad_by_freq)
        return (None,), (grad,)

    def param_grads(self, dys, saved, grads):
        (dweight,) = grads
        if dweight is None:
            return
        d = dweight.shape[1]
        ids = [s["ids"] for s in saved]
        dys2 = [dy.reshape(-1, d) for dy in dys]
        if resolve_backend(dweight.device) == "triton":
            from ..kernels.embedding import embedding_dw
            embedding_dw(ids, dys2, dweight, padding_idx=self.padding_idx,
                         scale_grad_by_freq=self.scale_grad_by_freq)
        else:
            embedding_dw_ref(ids, dys2, dweight, padding_idx=self.padding_idx,
                             scale_grad_by_freq=self.scale_grad_by_freq)

