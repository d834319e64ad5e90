"""LayerNorm and RMSNorm over the last dim, split.

Shapes: X [..., N] (flattened to [M, N]), γ (weight) [N] or None, β (bias) [N] or None,
Y like X. Row statistics μ (LayerNorm only) and rstd are [M] fp32.

* forward: Y = X̂ γ + β with X̂ = (X - μ) rstd (RMSNorm: X̂ = X rstd, no β).
* p1, dX = rstd (G - mean(G) - X̂ mean(G X̂)) with G = dY γ (RMSNorm: no mean(G) term):
  needs X, μ, rstd (and γ, a parameter).
* p2, dγ += Σ_mb Σ_rows dY X̂ and dβ += Σ_mb Σ_rows dY: needs X, μ, rstd (the *same*
  tensors as p1; the store counts them once) and dY (deposited by p1). When γ is frozen
  or absent and only β trains, p2 saves nothing: dβ needs dY alone.

What the split costs in memory: p1 frees nothing of its own (p2 needs the same X, μ, rstd),
and it adds dY, so a pending norm holds X + dY (activation dtype) + 8 bytes per row (4 for
RMSNorm) from p1 until p2 frees all of it. X is usually the residual stream, alive anyway.

The Triton backend is :mod:`twobp.kernels.norm`; the torch reference below computes the
same contract with plain torch ops in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from ..backend import resolve_backend
from ._checks import check_same_dtype_device
from .base import SplitOp

__all__ = [
    "LayerNormOp",
    "RMSNormOp",
    "layer_norm_fwd_ref",
    "layer_norm_dx_ref",
    "layer_norm_dw_ref",
    "rms_norm_fwd_ref",
    "rms_norm_dx_ref",
    "rms_norm_dw_ref",
]


# ---------------------------------------------------------------------------------------
# torch reference: X [M, N] (any leading dims work), statistics [M] fp32, fp32 arithmetic
# ---------------------------------------------------------------------------------------


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    y = xhat * weight.float() if weight is not None else xhat
    return y + bias.float() if bias is not None else y


def layer_norm_fwd_ref(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, μ, rstd): Y = (X - μ) rstd γ + β over the last dim; μ, rstd fp32 of X's leading shape."""
    xf = x.float()
    mean = xf.mean(-1)
    xc = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    return _affine(xc * rstd.unsqueeze(-1), weight, bias).to(x.dtype), mean, rstd


def rms_norm_fwd_ref(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """(Y, rstd): Y = X rstd γ, rstd = 1 / sqrt(mean(X²) + eps), fp32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return _affine(xf * rstd.unsqueeze(-1), weight, None).to(x.dtype), rstd


def _xhat(x: Tensor, mean: Tensor | None, rstd: Tensor) -> Tensor:
    xf = x.float()
    if mean is not None:
        xf = xf - mean.unsqueeze(-1)
    return xf * rstd.unsqueeze(-1)


def _norm_dx_ref(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor | None, rstd: Tensor) -> Tensor:
    xhat = _xhat(x, mean, rstd)
    g = dy.float() * weight.float() if weight is not None else dy.float()
    c1 = (xhat * g).mean(-1, keepdim=True)
    dx = g - xhat * c1
    if mean is not None:
        dx = dx - g.mean(-1, keepdim=True)
    return (dx * rstd.unsqueeze(-1)).to(x.dtype)


def layer_norm_dx_ref(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor) -> Tensor:
    """p1: dX = rstd (G - mean(G) - X̂ mean(G X̂)), G = dY γ."""
    return _norm_dx_ref(dy, x, weight, mean, rstd)


def rms_norm_dx_ref(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor) -> Tensor:
    """p1: dX = rstd (G - X̂ mean(G X̂)), G = dY γ, X̂ = X rstd."""
    return _norm_dx_ref(dy, x, weight, None, rstd)


def _norm_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], means: Sequence[Tensor | None],
                 rstds: Sequence[Tensor], dweight: Tensor | None, dbias: Tensor | None) -> None:
    n = dys[0].shape[-1]
    if dweight is not None:
        total = torch.zeros(n, dtype=torch.float32, device=dweight.device)
        for x, dy, mean, rstd in zip(xs, dys, means, rstds):
            total += (dy.float() * _xhat(x, mean, rstd)).reshape(-1, n).sum(0)
        dweight.add_(total.to(dweight.dtype))
    if dbias is not None:
        _dbias_ref(dys, dbias)


def _dbias_ref(dys: Sequence[Tensor], dbias: Tensor) -> None:
    n = dys[0].shape[-1]
    total = torch.zeros(n, dtype=torch.float32, device=dbias.device)
    for dy in dys:
        total += dy.float().reshape(-1, n).sum(0)
    dbias.add_(total.to(dbias.dtype))


def layer_norm_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], means: Sequence[Tensor],
                      rstds: Sequence[Tensor], dweight: Tensor | None, dbias: Tensor | None) -> None:
    """p2: dγ += Σ dY X̂, dβ += Σ dY over the micro-batches, summed in fp32, added once."""
    _norm_dw_ref(xs, dys, means, rstds, dweight, dbias)


def rms_norm_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], rstds: Sequence[Tensor],
                    dweight: Tensor | None) -> None:
    """p2: dγ += Σ dY X rstd over the micro-batches, summed in fp32, added once."""
    _norm_dw_ref(xs, dys, [None] * len(xs), rstds, dweight, None)


# ---------------------------------------------------------------------------------------
# The split ops
# ---------------------------------------------------------------------------------------


def _flatten_checked(what: str, x: Tensor, normalized_size: int | None,
                     **params: Tensor | None) -> tuple[Tensor, int]:
    """x as [M, N] with unit column stride (the layout the kernels read and p2 keeps), and N."""
    if x.dim() == 0:
        raise ValueError(f"{what}: input must have at least 1 dim (the normalized one), got a scalar")
    n = normalized_size
    if n is None:
        n = next((p.shape[0] for p in params.values() if p is not None and p.dim() == 1), None)
    if n is not None and x.shape[-1] != n:
        raise ValueError(
            f"{what}: input's last dim must be the normalized size {n}, got input shape {tuple(x.shape)}")
    for name, p in params.items():
        if p is not None and tuple(p.shape) != (x.shape[-1],):
            raise ValueError(f"{what}: {name} has shape {tuple(p.shape)}, expected ({x.shape[-1]},)")
    check_same_dtype_device(what, x, **params)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1 and n > 1:
        x2 = x2.contiguous()  # saved as such, so p1 and p2 do not copy again
    return x2, n


def _needs_grad(p: Tensor | None) -> bool:
    return p is not None and p.requires_grad


@dataclass(frozen=True)
class LayerNormOp(SplitOp):
    """LayerNorm over the last dim, split (see module docstring).

    ``eps``: added to the variance. ``normalized_size``: the expected last dim, checked
    when given (modules pass it, so a weight-less LayerNorm still rejects a wrong shape).
    """

    eps: float
    normalized_size: int | None = None
    name: ClassVar[str] = "layer_norm"

    def forward(self, inputs, params, *, save_p1, save_p2):
        (x,), (weight, bias) = inputs, params
        x2, n = _flatten_checked("layer_norm", x, self.normalized_size, weight=weight, bias=bias)
        if resolve_backend(x.device) == "triton":
            from ..kernels.norm import layer_norm_fwd
            y, mean, rstd = layer_norm_fwd(x2, weight, bias, self.eps)
        else:
            y, mean, rstd = layer_norm_fwd_ref(x2, weight, bias, self.eps)
        saved = {"x": x2, "mean": mean, "rstd": rstd}
        p1 = saved if save_p1 else {}
        # dβ needs dY only: keep X, μ, rstd for p2 only when γ trains
        p2 = dict(saved) if save_p2 and _needs_grad(weight) else {}
        return y.reshape(x.shape), p1, p2

    def input_grads(self, dy, saved, params, needs):
        weight = params[0]
        x2, mean, rstd = saved["x"], saved["mean"], saved["rstd"]
        dy2 = dy.reshape(-1, x2.shape[1])
        if resolve_backend(dy.device) == "triton":
            from ..kernels.norm import layer_norm_dx
            dx = layer_norm_dx(dy2, x2, weight, mean, rstd)
        else:
            dx = layer_norm_dx_ref(dy2, x2, weight, mean, rstd)
        return (dx.reshape(dy.shape),)

    def param_grads(self, dys, saved, grads):
        dweight, dbias = grads
        if dweight is None and dbias is None:
            return
        n = dys[0].shape[-1]
        dys2 = [dy.reshape(-1, n) for dy in dys]
        if dweight is None:
            _dbias_ref(dys2, dbias)  # one deterministic row sum; forward kept nothing for it
            return
        xs = [s["x"] for s in saved]
        means = [s["mean"] for s in saved]
        rstds = [s["rstd"] for s in saved]
        if resolve_backend(xs[0].device) == "triton":
            from ..kernels.norm import layer_norm_dw
            layer_norm_dw(xs, dys2, means, rstds, dweight, dbias)
        else:
            layer_norm_dw_ref(xs, dys2, means, rstds, dweight, dbias)


@dataclass(frozen=True)
class RMSNormOp(SplitOp):
    """RMSNorm over the last dim, split (see module docstring).

    ``eps``: added to the mean square (modules resolve torch's ``eps=None`` to
    ``torch.finfo(x.dtype).eps`` before building the op). ``normalized_size``: as in
    :class:`LayerNormOp`.
    """

    eps: float
    normalized_size: int | None = None
    name: ClassVar[str] = "rms_norm"

    def forward(self, inputs, params, *, save_p1, save_p2):
        (x,), (weight,) = inputs, params
        x2, n = _flatten_checked("rms_norm", x, self.normalized_size, weight=weight)
        if resolve_backend(x.device) == "triton":
            from ..kernels.norm import rms_norm_fwd
            y, rstd = rms_norm_fwd(x2, weight, self.eps)
        else:
            y, rstd = rms_norm_fwd_ref(x2, weight, self.eps)
        saved = {"x": x2, "rstd": rstd}
        p1 = saved if save_p1 else {}
        p2 = dict(saved) if save_p2 else {}
        return y.reshape(x.shape), p1, p2

    def input_grads(self, dy, saved, params, needs):
        weight = params[0]
        x2, rstd = saved["x"], saved["rstd"]
        dy2 = dy.reshape(-1, x2.shape[1])
        if resolve_backend(dy.device) == "triton":
            from ..kernels.norm import rms_norm_dx
            dx = rms_norm_dx(dy2, x2, weight, rstd)
        else:
            dx = rms_norm_dx_ref(dy2, x2, weight, rstd)
        return (dx.reshape(dy.shape),)

    def param_grads(self, dys, saved, grads):
        (dweight,) = grads
        if dweight is None:
            return
        n = dys[0].shape[-1]
        dys2 = [dy.reshape(-1, n) for dy in dys]
        xs = [s["x"] for s in saved]
        rstds = [s["rstd"] for s in saved]
        if resolve_backend(xs[0].device) == "triton":
            from ..kernels.norm import rms_norm_dw
            rms_norm_dw(xs, dys2, rstds, dweight)
        else:
            rms_norm_dw_ref(xs, dys2, rstds, dweight)
