"""Hugging Face's Conv1D (GPT-2), split: Y = X W + b with W stored [in, out].

Shapes: X [..., K] (flattened to [M, K]), W [K, N] (``nx`` = K inputs, ``nf`` = N outputs),
b [N], Y [..., N]. It is a linear layer whose weight is the transpose of nn.Linear's, so
every call goes to :class:`~twobp.ops.linear.LinearOp` with Wᵀ as a *view* (strides
(1, N)): the Triton kernels take any weight and gradient strides, so no transposed copy of
W or dW ever exists.

* forward: Y = X W + b = X (Wᵀ)ᵀ + b.
* p1, dX = dY Wᵀ: needs only W; saves nothing.
* p2, dW += Σ_mb Xᵀ dY (accumulated as (dWᵀ) += dYᵀ X into the transposed view), db += Σ dY:
  needs X (saved by forward) and dY (deposited by p1), as the linear op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SplitOp
from .linear import LinearOp

__all__ = ["Conv1DOp"]

_LINEAR = LinearOp()


def _t(w: Tensor | None) -> Tensor | None:
    return None if w is None else w.t()


class Conv1DOp(SplitOp):
    """The split Conv1D (see module docstring): params (weight [K, N], bias [N] or None)."""

    name = "conv1d"
    autocast = "lower"  # torch.addmm, what Conv1D calls, runs in the autocast dtype

    def forward(self, inputs, params, *, save_p1, save_p2):
        weight, bias = params
        return _LINEAR.forward(inputs, (_t(weight), bias), save_p1=save_p1, save_p2=save_p2)

    def native_forward(self, inputs, params):
        return _LINEAR.native_forward(inputs, (_t(params[0]), params[1]))

    def input_grads(self, dy, saved, params, needs):
        return _LINEAR.input_grads(dy, saved, (_t(params[0]), params[1]), needs)

    def differentiable_forward(self, inputs, params):
        return torch.nn.functional.linear(inputs[0], _t(params[0]), params[1])

    def fused_grads(self, dy, p1, p2, params, in_needs, p_needs):
        dx, (dwt, db) = _LINEAR.fused_grads(dy, p1, p2, (_t(params[0]), params[1]), in_needs, p_needs)
        return dx, (_t(dwt), db)

    def param_grads(self, dys, saved, grads):
        dweight, dbias = grads
        _LINEAR.param_grads(dys, saved, (_t(dweight), dbias))
