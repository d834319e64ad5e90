"""TwoBPEmbedding: nn.Embedding whose whole weight gradient is deferred to p2."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.embedding import EmbeddingOp
from .base import TwoBPModule

__all__ = ["TwoBPEmbedding"]

_SPARSE = ("TwoBPEmbedding: sparse=True (sparse weight gradients) is not supported: 2BP defers a dense "
           "scatter-add into .grad. Use sparse=False, or keep torch's nn.Embedding for this table")


class TwoBPEmbedding(TwoBPModule, nn.Embedding):
    """Drop-in for :class:`torch.nn.Embedding`: same constructor, parameter (weight [V, D]),
    init, state_dict and repr.

    y = W[ids] for integer ids [...] -> y [..., D]. There is no input gradient, so inside
    ``twobp.split_backward`` p1 only hands dY over and the whole weight gradient (the
    scatter-add of dY's rows, padding_idx's row left at zero) waits for
    ``twobp.backward_p2``. Saved until p2: ids (int) and dY [M, D].

    ``max_norm``: rows looked up are renormalised in place before the lookup, as torch does.
    The renorm writes through ``weight.data`` so that it does not bump the weight's version
    counter: the deferred gradient does not read the weight, and a later micro-batch's
    renorm must not look like an edit between forward and p2. ``sparse=True`` raises
    NotImplementedError.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Tensor | None = None, _freeze: bool = False,
                 device=None, dtype=None) -> None:
        if sparse:
            raise NotImplementedError(_SPARSE)
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm,
                         norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse,
                         _weight=_weight, _freeze=_freeze, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        if self.sparse:  # a converted module, or the attribute set later
            raise NotImplementedError(_SPARSE)
        if self.max_norm is not None:
            with torch.no_grad():
                torch.embedding_renorm_(self.weight.data, input.contiguous(), self.max_norm, self.norm_type)
        op = EmbeddingOp(padding_idx=self.padding_idx, scale_grad_by_freq=bool(self.scale_grad_by_freq))
        return self._split(op, (input,), (self.weight,))
