"""TwoBPSelectiveScan: Mamba's selective scan with its own parameters A_log and D, split."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.scan import SelectiveScanOp
from .base import TwoBPModule

__all__ = ["TwoBPSelectiveScan"]


class TwoBPSelectiveScan(TwoBPModule, nn.Module):
    """y = selective_scan(u, Δ, B, C; A = -exp(A_log), D) (see :mod:`twobp.ops.scan`).

    Parameters: ``A_log`` [channels, d_state], initialised to log(1..d_state) in every
    channel (S4D-Real, as Mamba), and ``D`` [channels], the skip, initialised to 1. Inputs:
    u, Δ [b, L, channels], B, C [b, L, d_state]; Δ, B, C are cast to u's dtype (autograd
    casts) when they differ. Inside ``twobp.split_backward`` the backward gives du, dΔ, dB, dC
    (p1) and leaves dA_log, dD to ``twobp.backward_p2``, which recomputes the scan from the
    saved chunk-boundary states (``chunk`` steps apart); ``dparams_in_p1=True`` computes them
    in p1's pass instead and defers only their accumulation.
    """

    def __init__(self, channels: int, d_state: int, *, chunk: int = 256, dparams_in_p1: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if channels <= 0 or d_state <= 0:
            raise ValueError(f"TwoBPSelectiveScan: channels and d_state must be positive, got {channels}, {d_state}")
        self.channels, self.d_state = channels, d_state
        self.op = SelectiveScanOp(chunk=chunk, dparams_in_p1=dparams_in_p1)
        self.A_log = nn.Parameter(torch.empty(channels, d_state, device=device, dtype=dtype))
        self.D = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.A_log.is_meta:
            return
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.channels, -1))
        self.D.fill_(1.0)

    def forward(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor) -> Tensor:
        delta, B, C = (t if t.dtype == u.dtype else t.to(u.dtype) for t in (delta, B, C))
        return self._split(self.op, (u, delta, B, C), (self.A_log, self.D))

    def extra_repr(self) -> str:
        extra = ", dparams_in_p1=True" if self.op.dparams_in_p1 else ""
        return f"channels={self.channels}, d_state={self.d_state}, chunk={self.op.chunk}{extra}"
