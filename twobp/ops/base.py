"""The split contract every op family implements, on both backends.

An op is a function ``y = f(inputs; params)``. Its backward is split in two:

* ``input_grads`` (**p1**): the gradients of the inputs, dX. The previous pipeline stage
  waits for them.
* ``param_grads`` (**p2**): the gradients of the parameters, dW. They *accumulate* into
  the given buffers, and may cover several micro-batches in one call (batched p2).

``forward`` returns the output plus two dicts of saved tensors: what p1 needs and what p2
needs. A tensor both need appears in both; the store counts it once. ``save_p1`` /
``save_p2`` say whether anyone will need each set (no input needs grad: no p1 set; no
parameter needs grad: no p2 set), so nothing is kept for nobody.

``split_input_grads`` is p1 in a split region. By default it is ``input_grads`` and the
store keeps dy for p2. An op whose parameter gradients are cheap reductions that ride
along with dX in one pass (LayerNorm on the torch backend) may instead return *partials*:
a small dict that p2 reduces into ``.grad`` (``param_grads`` then receives the partials
as its saved set and None as dy), so p1 frees X and dy at once.

``native_forward`` is normal mode on the torch backend: where torch has the op itself
at the same speed (F.linear, F.layer_norm, F.conv2d, F.embedding; SDPA for the weightless
attention core, in a split region too), the module *is* its torch twin outside a split region: one aten call under autograd, whose C++ node runs the fused
backward with no Python in it. It returns None where the Triton backend runs, or where
the op has no such twin; then the split Function runs the contract in both modes.

``fused_grads`` is normal mode (no split region) otherwise: p1 and p2 of one micro-batch at once,
returning fresh gradient tensors for autograd to accumulate. Its default runs the two
halves; ops override it where one call computes both for less (one aten backward with a
full output mask, no zero-filled buffer per parameter).

Ops hold their static attributes (eps, stride, ...) as plain fields. They pick the Triton
kernels or the torch reference per call with :func:`twobp.backend.resolve_backend`.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["SplitOp", "Saved"]

Saved = dict[str, Tensor]


class SplitOp(abc.ABC):
    """One op family's forward / p1 / p2 (see module docstring)."""

    name: str = "op"
    autocast: str | None = None
    """How torch.autocast treats the op: ``"lower"`` (the autocast dtype, matmul-like),
    ``"fp32"`` (fp32 on CUDA, as-is on CPU: norms), None (not at all)."""

    @abc.abstractmethod
    def forward(self, inputs: tuple[Tensor, ...], params: tuple[Tensor | None, ...], *,
                save_p1: bool, save_p2: bool) -> tuple[Tensor, Saved, Saved]:
        """Compute the output; return it with the p1 set and the p2 set of saved tensors."""

    @abc.abstractmethod
    def input_grads(self, dy: Tensor, saved: Saved, params: tuple[Tensor | None, ...],
                    needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
        """p1: the gradient of each input whose ``needs`` flag is set (None for the others)."""

    @abc.abstractmethod
    def param_grads(self, dys: Sequence[Tensor], saved: Sequence[Saved],
                    grads: Sequence[Tensor | None]) -> None:
        """p2: accumulate dW over the micro-batches given into ``grads`` (None: skip that one)."""

    def differentiable_forward(self, inputs: tuple[Tensor, ...], params: tuple[Tensor | None, ...]) -> Tensor:
        """The output as a differentiable function of inputs and params (plain torch ops),
        for double backward (``create_graph=True``) outside a split region."""
        raise NotImplementedError(
            f"{type(self).__name__} has no differentiable_forward, so double backward "
            "(create_graph=True) through it is not supported; compute higher-order gradients "
            "through the torch module instead (twobp.revert)")

    def native_forward(self, inputs: tuple[Tensor, ...], params: tuple[Tensor | None, ...]) -> Tensor | None:
        """Normal mode on the torch backend: the output through torch's own differentiable op,
        validated as ``forward`` validates; None where this op or backend has none (the
        default), so the split Function runs instead."""
        return None

    def split_input_grads(self, dy: Tensor, saved: Saved, params: tuple[Tensor | None, ...],
                          needs: tuple[bool, ...], p_needs: tuple[bool, ...]
                          ) -> tuple[tuple[Tensor | None, ...], Saved | None]:
        """p1 in a split region: (input grads, partials or None); see the module docstring."""
        dx = self.input_grads(dy, saved, params, needs) if any(needs) else (None,) * len(needs)
        return dx, None

    def fused_grads(self, dy: Tensor, p1: Saved, p2: Saved, params: tuple[Tensor | None, ...],
                    in_needs: tuple[bool, ...], p_needs: tuple[bool, ...]
                    ) -> tuple[tuple[Tensor | None, ...], tuple[Tensor | None, ...]]:
        """Normal mode: (input grads, parameter grads) of one micro-batch, None where not needed.

        Parameter gradients are new tensors in the parameter's dtype (autograd accumulates
        them into ``.grad``)."""
        dx = self.input_grads(dy, p1, params, in_needs) if any(in_needs) else (None,) * len(in_needs)
        grads = [torch.zeros_like(p) if need else None for p, need in zip(params, p_needs)]
        if any(p_needs):
            self.param_grads([dy.contiguous()], [p2], grads)
        return dx, tuple(grads)
