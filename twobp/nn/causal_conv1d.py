"""TwoBPCausalConv1d: Mamba's depthwise causal conv1d, channels-last, with a split backward."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.causal_conv1d import CausalConv1dOp
from .base import TwoBPModule

__all__ = ["TwoBPCausalConv1d"]

_OP = CausalConv1dOp()


class TwoBPCausalConv1d(TwoBPModule, nn.Conv1d):
    """A depthwise causal convolution over time, on channels-last input.

    ``TwoBPCausalConv1d(channels, kernel_size)`` has the parameters, init, state_dict and repr
    of ``nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1)``
    (weight [C, 1, K], bias [C]: what Mamba's conv1d holds). Its forward takes x [b, L, C] and
    returns y [b, L, C], equal to that nn.Conv1d on x transposed to [b, C, L], cut to its first
    L outputs and transposed back: y_t depends on x_{t-K+1..t} only. Inside
    ``twobp.split_backward`` its backward computes dx only; dW and db wait for
    ``twobp.backward_p2`` (which keeps x and dy until then).
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 3 or input.shape[-1] != self.in_channels:
            raise ValueError(f"TwoBPCausalConv1d: expected channels-last input [batch, L, {self.in_channels}], "
                             f"got shape {tuple(input.shape)} (an nn.Conv1d layout [batch, C, L] needs .transpose(1, 2))")
        return self._split(_OP, (input,), (self.weight, self.bias))
