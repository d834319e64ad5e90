"""TwoBPConv2d: nn.Conv2d whose backward can be split into p1 (dX) and p2 (dW, db)."""

from __future__ import annotations

from torch import Tensor, nn

from ..autograd import runs_as_torch
from ..ops.conv import conv2d_op
from .base import TwoBPModule

__all__ = ["TwoBPConv2d"]


def _check_supported(m: nn.Conv2d) -> None:
    if m.groups != 1:
        raise NotImplementedError(
            f"TwoBPConv2d: groups={m.groups} is not supported (grouped / depthwise convolution); only groups=1. "
            "Use a plain nn.Conv2d for this layer (twobp.convert leaves such layers as they are).")
    if m.padding_mode != "zeros":
        raise NotImplementedError(
            f"TwoBPConv2d: padding_mode={m.padding_mode!r} is not supported; only 'zeros'. Use a plain "
            "nn.Conv2d for this layer, or pad the input yourself (F.pad) and use padding=0.")


class TwoBPConv2d(TwoBPModule, nn.Conv2d):
    """Drop-in for :class:`torch.nn.Conv2d`: same constructor, parameters, init, state_dict, repr.

    y = conv2d(x, W) + b with x [N, C, H, W] (or unbatched [C, H, W]), W [O, C, KH, KW].
    Outside a split region it is nn.Conv2d; inside ``twobp.split_backward`` its backward
    computes dX only and dW, db wait for ``twobp.backward_p2``, which keeps x and dy alive
    until then (for convolutions usually far more bytes than dW; see ``twobp.memory_report``).

    Supported: any stride, dilation, int / pair / 'same' / 'valid' padding (torch's
    asymmetric 'same' for even kernels included). Not supported (NotImplementedError):
    groups != 1, padding_mode other than 'zeros'.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        _check_supported(self)

    def forward(self, input: Tensor) -> Tensor:
        _check_supported(self)  # also for modules converted by a class swap
        op = conv2d_op(self.stride, self.padding, self.dilation)
        if runs_as_torch(input) and input.dim() in (3, 4):
            return self._as_torch(lambda: self._conv_forward(input, self.weight, self.bias),  # nn.Conv2d's own
                                  lambda: op.native_forward((input.unsqueeze(0) if input.dim() == 3 else input,),
                                                            (self.weight, self.bias)))
        if input.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d accepts
            return self._split(op, (input.unsqueeze(0),), (self.weight, self.bias)).squeeze(0)
        if input.dim() != 4:
            raise ValueError(f"TwoBPConv2d: expected a 3-D (unbatched) or 4-D (batched) input, got shape "
                             f"{tuple(input.shape)}")
        return self._split(op, (input,), (self.weight, self.bias))
