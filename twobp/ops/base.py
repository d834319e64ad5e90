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

Ops hold their static attributes (eps, stride, ...) as plain fields. They pick the Triton
kernels or the torch reference per call with :func:`twobp.backend.resolve_backend`.
"""

from __future__ import annotations

import abc
from typing import Sequence

from torch import Tensor

__all__ = ["SplitOp", "Saved"]

Saved = dict[str, Tensor]


class SplitOp(abc.ABC):
    """One op family's forward / p1 / p2 (see module docstring)."""

    name: str = "op"

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
