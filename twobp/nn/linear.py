"""TwoBPLinear: nn.Linear whose backward can be split into p1 (dX) and p2 (dW)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..autograd import runs_as_torch
from ..ops.linear import LinearOp
from .base import TwoBPModule

__all__ = ["TwoBPLinear"]

_OP = LinearOp()


class TwoBPLinear(TwoBPModule, nn.Linear):
    """Drop-in for :class:`torch.nn.Linear`: same constructor, parameters, init, state_dict.

    y = x Wᵀ + b with x [..., in_features], W [out_features, in_features]. Outside a split
    region it is nn.Linear; inside ``twobp.split_backward`` its backward computes dX only
    and dW, db wait for ``twobp.backward_p2``.
    """

    def forward(self, input: Tensor) -> Tensor:
        if runs_as_torch(input):
            return self._as_torch(lambda: F.linear(input, self.weight, self.bias),
                                  lambda: LinearOp._check(input, self.weight, self.bias))
        return self._split(_OP, (input,), (self.weight, self.bias))
