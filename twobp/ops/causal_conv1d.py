"""Depthwise causal conv1d over time (Mamba's short convolution), split.

Shapes: channels-last x [b, L, C] (unit channel stride, e.g. a slice of in_proj's output),
W [C, 1, K] (nn.Conv1d's depthwise weight), bias [C] or None, y [b, L, C]; x_t = 0 for t < 0.

* forward: y[t, c] = b[c] + Σ_k W[c, k] x[t - (K-1) + k, c]; equal to
  ``nn.Conv1d(C, C, K, groups=C, padding=K-1)`` on x transposed, its first L outputs.
* p1, dx[t, c] = Σ_k W[c, k] dy[t + (K-1) - k, c]: needs only W, so p1 saves **nothing**.
* p2, dW[c, k] += Σ_mb Σ_{b,t} dy[t, c] x[t - (K-1) + k, c] and db += Σ_mb Σ_{b,t} dy: needs x
  (saved by forward; kept as the view it came in, so a slice of a wider projection keeps that
  projection's storage, which the store counts once) and dy (deposited by p1).

What the split costs: the conv is a tiny share of a Mamba block's work (2·K FLOPs per
element); deferring its dW holds x and dy (2 activations [b, L, C]) until p2.

The Triton backend is :mod:`twobp.kernels.causal_conv1d`; the torch reference below computes
the same contract with torch's conv1d (forward and p1) and K shifted products (p2).
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import resolve_backend
from ._checks import check_same_dtype_device
from .base import SplitOp

__all__ = ["CausalConv1dOp", "causal_conv1d_fwd_ref", "causal_conv1d_dx_ref", "causal_conv1d_dw_ref"]


def causal_conv1d_fwd_ref(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y [b, L, C] (contiguous) from x [b, L, C], W [C, 1, K]: torch's conv1d, causal cut."""
    C, K = weight.shape[0], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=K - 1, groups=C)[..., :x.shape[1]]  # [b, C, L]
    return y.transpose(1, 2).contiguous()


def causal_conv1d_dx_ref(dy: Tensor, weight: Tensor) -> Tensor:
    """dx [b, L, C]: the time-reversed conv of dy with W (dy padded with K-1 zeros after L)."""
    C, K = weight.shape[0], weight.shape[-1]
    dx = F.conv1d(F.pad(dy.transpose(1, 2), (0, K - 1)), weight.flip(-1), groups=C)  # [b, C, L]
    return dx.transpose(1, 2).contiguous()


def causal_conv1d_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], dweight: Tensor | None,
                         dbias: Tensor | None) -> None:
    """dW[c, 0, k] += Σ dy[t, c] x[t - (K-1) + k, c], db += Σ dy over the micro-batches, in ≥ fp32."""
    if dweight is None and dbias is None:
        return
    ct = torch.float64 if dys[0].dtype == torch.float64 else torch.float32
    tot_w = tot_b = None
    for x, dy in zip(xs, dys):
        L = dy.shape[1]
        dyc = dy.to(ct)
        if dweight is not None:
            K = dweight.shape[-1]
            xp = F.pad(x.to(ct), (0, 0, K - 1, 0))  # [b, L + K - 1, C]: K-1 zero steps before t = 0
            part = torch.stack([(dyc * xp[:, k:k + L]).sum((0, 1)) for k in range(K)], -1)  # [C, K]
            tot_w = part if tot_w is None else tot_w + part
        if dbias is not None:
            part = dyc.sum((0, 1))
            tot_b = part if tot_b is None else tot_b + part
    if dweight is not None:
        dweight.add_(tot_w.view(dweight.shape).to(dweight.dtype))
    if dbias is not None:
        dbias.add_(tot_b.to(dbias.dtype))


class CausalConv1dOp(SplitOp):
    """The split depthwise causal conv1d (see module docstring). Stateless: one instance serves all."""

    name: ClassVar[str] = "causal_conv1d"
    autocast: ClassVar[str] = "lower"  # under torch.autocast: the autocast dtype, as F.conv1d

    def forward(self, inputs, params, *, save_p1, save_p2):
        (x,), (weight, bias) = inputs, params
        if weight.dim() != 3 or weight.shape[1] != 1:
            raise ValueError(f"causal_conv1d: weight must be depthwise [C, 1, K], got {tuple(weight.shape)}")
        if x.dim() != 3 or x.shape[2] != weight.shape[0]:
            raise ValueError(f"causal_conv1d: input must be channels-last [b, L, C={weight.shape[0]}], "
                             f"got shape {tuple(x.shape)}")
        check_same_dtype_device("causal_conv1d", x, weight=weight, bias=bias)
        if x.stride(2) != 1 and x.shape[2] > 1:
            x = x.contiguous()
        if resolve_backend(x.device) == "triton":
            from ..kernels.causal_conv1d import causal_conv1d_fwd
            y = causal_conv1d_fwd(x, weight, bias)
        else:
            y = causal_conv1d_fwd_ref(x, weight, bias)
        # dW needs x; db alone needs only dy
        p2 = {"x": x} if save_p2 and weight.requires_grad else {}
        return y, {}, p2

    def input_grads(self, dy, saved, params, needs):
        weight = params[0]
        if resolve_backend(dy.device) == "triton":
            from ..kernels.causal_conv1d import causal_conv1d_dx
            return (causal_conv1d_dx(dy, weight),)
        return (causal_conv1d_dx_ref(dy, weight),)

    def param_grads(self, dys, saved, grads):
        dweight, dbias = grads
        if dweight is None:
            if dbias is not None:
                causal_conv1d_dw_ref([None] * len(dys), dys, None, dbias)
            return
        xs = [s["x"] for s in saved]
        if resolve_backend(dys[0].device) == "triton":
            from ..kernels.causal_conv1d import causal_conv1d_dw
            causal_conv1d_dw(xs, list(dys), dweight, dbias)
        else:
            causal_conv1d_dw_ref(xs, dys, dweight, dbias)

    def differentiable_forward(self, inputs, params):
        return causal_conv1d_fwd_ref(inputs[0], *params)
