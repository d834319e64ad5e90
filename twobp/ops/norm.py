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
# torch reference: X [M, N] (any leading dims work), statistics of X's leading shape.
# fp32/fp64 inputs run aten's own fused kernels (torch.native_layer_norm and its backward
# with an output mask, so p1 computes dX only and p2 dγ/dβ only; aten._fused_rms_norm),
# whose statistics are in the input dtype. fp16/bf16 inputs compute in fp32 with fp32
# statistics, like the Triton kernels (aten's CPU LayerNorm would keep half statistics).
# ---------------------------------------------------------------------------------------

_ATEN = torch.ops.aten
_EAGER = "p1_reduces_dw"  # p1-set key: this forward's dγ/dβ are reduced in p1 (LayerNormOp)
_NATIVE_DTYPES = (torch.float32, torch.float64)


def _native(x: Tensor) -> bool:
    return x.dtype in _NATIVE_DTYPES


_HAS_FUSED_RMS = hasattr(_ATEN, "_fused_rms_norm")  # torch >= 2.8


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    y = xhat * weight.float() if weight is not None else xhat
    return y + bias.float() if bias is not None else y


def _stat(t: Tensor, x: Tensor) -> Tensor:
    """aten's [..., 1] statistic as [...] (a view)."""
    return t.view(x.shape[:-1])


def _stat_for_aten(t: Tensor, x: Tensor) -> Tensor:
    return t.view(*x.shape[:-1], 1)


def layer_norm_fwd_ref(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, μ, rstd): Y = (X - μ) rstd γ + β over the last dim; μ, rstd of X's leading shape."""
    n = x.shape[-1]
    if _native(x):
        y, mean, rstd = torch.native_layer_norm(x, (n,), weight, bias, eps)
        return y, _stat(mean, x), _stat(rstd, x)
    xf = x.float()
    mean = xf.mean(-1)
    xc = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    return _affine(xc * rstd.unsqueeze(-1), weight, bias).to(x.dtype), mean, rstd


def rms_norm_fwd_ref(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """(Y, rstd): Y = X rstd γ, rstd = 1 / sqrt(mean(X²) + eps) (fp32 for half inputs)."""
    if _HAS_FUSED_RMS and (weight is None or weight.dtype == x.dtype):
        y, rstd = _ATEN._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        if rstd.dtype == _compute_dtype(x):
            return y, _stat(rstd, x)
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return _affine(xf * rstd.unsqueeze(-1), weight, None).to(x.dtype), rstd


def _xhat(x: Tensor, mean: Tensor | None, rstd: Tensor) -> Tensor:
    xf = x.to(_compute_dtype(x))
    if mean is not None:
        xf = xf - mean.to(xf.dtype).unsqueeze(-1)
    return xf * rstd.to(xf.dtype).unsqueeze(-1)


def layer_norm_dx_ref(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor) -> Tensor:
    """p1: dX = rstd (G - mean(G) - X̂ mean(G X̂)), G = dY γ."""
    if _native(x):
        n = x.shape[-1]
        dx, _, _ = _ATEN.native_layer_norm_backward(dy, x, (n,), _stat_for_aten(mean, x), _stat_for_aten(rstd, x),
                                                    weight, None, [True, False, False])
        return dx
    xhat = _xhat(x, mean, rstd)
    g = dy.float() * weight.float() if weight is not None else dy.float()
    dx = g - xhat * (xhat * g).mean(-1, keepdim=True) - g.mean(-1, keepdim=True)
    return (dx * rstd.unsqueeze(-1)).to(x.dtype)


def rms_norm_dx_ref(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor) -> Tensor:
    """p1: dX = rstd (G - X̂ mean(G X̂)), G = dY γ, X̂ = X rstd.

    Written as dX = rstd G - X (rstd³ mean(G X)): one row dot product, no X̂ tensor."""
    ct = _compute_dtype(x)
    xf, r = x.to(ct), rstd.to(ct)
    g = dy.to(ct) * weight.to(ct) if weight is not None else dy.to(ct)
    c = torch.linalg.vecdot(g, xf).mul_(r.pow(3) / x.shape[-1])      # rstd³ mean(G X), [...]
    return torch.addcmul(g * r.unsqueeze(-1), xf, c.unsqueeze(-1), value=-1).to(x.dtype)


def _dweight_rows(x: Tensor, dy: Tensor, mean: Tensor | None, rstd: Tensor) -> Tensor:
    """Σ_rows dY X̂ of one micro-batch, [N], in the compute dtype."""
    n = x.shape[-1]
    ct = _compute_dtype(x)
    x2, dy2, r = x.reshape(-1, n).to(ct), dy.reshape(-1, n).to(ct), rstd.reshape(-1).to(ct)
    if mean is None:  # Σ_m rstd_m dY_m X_m: one product, then a matrix-vector reduction
        return torch.mv((dy2 * x2).t(), r)
    return (dy2 * _xhat(x2, mean.reshape(-1), r)).sum(0)


def _layer_norm_dw_native(xs: Sequence[Tensor], dys: Sequence[Tensor], means: Sequence[Tensor],
                          rstds: Sequence[Tensor], dweight: Tensor | None, dbias: Tensor | None) -> None:
    """dγ, dβ through aten's LayerNorm backward, masked to the parameter gradients only."""
    mask = [False, dweight is not None, dbias is not None]
    tw = tb = None
    for x, dy, mean, rstd in zip(xs, dys, means, rstds):
        n = x.shape[-1]
        # aten needs a γ and β tensor to size its outputs; dγ and dβ never read their values
        dummy = x.new_empty(n)
        _, dw, db = _ATEN.native_layer_norm_backward(dy, x, (n,), _stat_for_aten(mean, x), _stat_for_aten(rstd, x),
                                                     dummy, dummy, mask)
        tw = dw if tw is None else (tw.add_(dw) if dw is not None else tw)
        tb = db if tb is None else (tb.add_(db) if db is not None else tb)
    if dweight is not None:
        dweight.add_(tw.to(dweight.dtype))
    if dbias is not None:
        dbias.add_(tb.to(dbias.dtype))


def _norm_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], means: Sequence[Tensor | None],
                 rstds: Sequence[Tensor], dweight: Tensor | None, dbias: Tensor | None) -> None:
    if dweight is not None and all(m is not None and _native(x) for x, m in zip(xs, means)):
        _layer_norm_dw_native(xs, dys, means, rstds, dweight, dbias)
        return
    if dweight is not None:
        total = sum(_dweight_rows(x, dy, mean, rstd) for x, dy, mean, rstd in zip(xs, dys, means, rstds))
        dweight.add_(total.to(dweight.dtype))
    if dbias is not None:
        _dbias_ref(dys, dbias)


def _dbias_ref(dys: Sequence[Tensor], dbias: Tensor) -> None:
    n = dys[0].shape[-1]
    total = None
    for dy in dys:
        part = dy.reshape(-1, n).sum(0, dtype=_compute_dtype(dy))
        total = part if total is None else total.add_(part)
    dbias.add_(total.to(dbias.dtype))


def layer_norm_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], means: Sequence[Tensor],
                      rstds: Sequence[Tensor], dweight: Tensor | None, dbias: Tensor | None) -> None:
    """p2: dγ += Σ dY X̂, dβ += Σ dY over the micro-batches, summed in ≥ fp32, added once."""
    _norm_dw_ref(xs, dys, means, rstds, dweight, dbias)


def rms_norm_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], rstds: Sequence[Tensor],
                    dweight: Tensor | None) -> None:
    """p2: dγ += Σ dY X rstd over the micro-batches, summed in ≥ fp32, added once."""
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
    if x.dtype in (torch.float16, torch.bfloat16) and resolve_backend(x.device) == "torch":
        # as torch's CPU norms (what autocast hands them): a half input with fp32 weights,
        # computed in fp32
        check_same_dtype_device(what, x, **{k: (p.to(x.dtype) if p is not None and p.dtype == torch.float32
                                                else p) for k, p in params.items()})
    else:
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
    autocast: ClassVar[str] = "fp32"  # under torch.autocast: fp32 on CUDA, as torch's LayerNorm

    def native_forward(self, inputs, params):
        (x,), (weight, bias) = inputs, params
        if resolve_backend(x.device) != "torch" or not _native(x):
            return None  # half inputs: the reference's fp32 statistics, as the Triton kernels keep
        _flatten_checked("layer_norm", x, self.normalized_size, weight=weight, bias=bias)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def forward(self, inputs, params, *, save_p1, save_p2):
        (x,), (weight, bias) = inputs, params
        x2, n = _flatten_checked("layer_norm", x, self.normalized_size, weight=weight, bias=bias)
        if resolve_backend(x.device) == "triton":
            from ..kernels.norm import layer_norm_fwd
            y, mean, rstd = layer_norm_fwd(x2, weight, bias, self.eps)
        else:
            y, mean, rstd = layer_norm_fwd_ref(x2, weight, bias, self.eps)
        saved = {"x": x2, "mean": mean, "rstd": rstd}
        if save_p1 and save_p2 and resolve_backend(x.device) == "torch" and _native(x2):
            # dγ, dβ ride along with dX in aten's one backward pass: p1 reduces them to [N]
            # partials and frees X and dY (see split_input_grads); the marker owns no storage
            return y.reshape(x.shape), {**saved, _EAGER: x2.new_empty(0)}, {}
        p1 = saved if save_p1 else {}
        # dβ needs dY only: keep X, μ, rstd for p2 only when γ trains
        p2 = dict(saved) if save_p2 and _needs_grad(weight) else {}
        return y.reshape(x.shape), p1, p2

    def differentiable_forward(self, inputs, params):
        x = inputs[0]
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), *params, self.eps)

    def split_input_grads(self, dy, saved, params, needs, p_needs):
        if _EAGER not in saved:
            return super().split_input_grads(dy, saved, params, needs, p_needs)
        weight, bias = params
        x2 = saved["x"]
        n = x2.shape[-1]
        dx, dw, db = _ATEN.native_layer_norm_backward(
            dy.reshape(x2.shape), x2, (n,), _stat_for_aten(saved["mean"], x2), _stat_for_aten(saved["rstd"], x2),
            weight if weight is not None else (x2.new_ones(n) if p_needs[1] else None), bias,
            [needs[0], p_needs[0], p_needs[1]])
        partials = {k: v for k, v in (("dweight", dw), ("dbias", db)) if v is not None}
        return ((dx.reshape(dy.shape) if dx is not None else None),), partials

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
        if any(dy is None for dy in dys):  # partials reduced in p1 (split_input_grads)
            for name, grad in (("dweight", dweight), ("dbias", dbias)):
                if grad is not None:
                    grad.add_(sum(s[name] for dy, s in zip(dys, saved) if dy is None).to(grad.dtype))
            rest = [(dy, s) for dy, s in zip(dys, saved) if dy is not None]
            if rest:
                self.param_grads([dy for dy, _ in rest], [s for _, s in rest], grads)
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

    def fused_grads(self, dy, p1, p2, params, in_needs, p_needs):
        x2 = p1.get("x", p2.get("x"))
        if x2 is None or resolve_backend(dy.device) == "triton" or not _native(x2):
            return super().fused_grads(dy, p1, p2, params, in_needs, p_needs)
        saved = p1 or p2
        weight, bias = params
        n = x2.shape[-1]
        # aten sizes dβ by a β tensor (its values are never read); γ = None means γ = 1
        dx, dw, db = _ATEN.native_layer_norm_backward(
            dy.reshape(x2.shape), x2, (n,), _stat_for_aten(saved["mean"], x2), _stat_for_aten(saved["rstd"], x2),
            weight if weight is not None else (x2.new_ones(n) if p_needs[1] else None),
            bias if bias is not None else None, [in_needs[0], p_needs[0], p_needs[1]])
        return ((dx.reshape(dy.shape) if dx is not None else None),), (dw, db)


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
    autocast: ClassVar[str] = "fp32"  # under torch.autocast: fp32 on CUDA, as torch's RMSNorm

    # No native_forward: the twin itself calls torch's F.rms_norm in normal mode on the torch
    # backend (see TwoBPRMSNorm.forward); under saved-tensor hooks this op's fused_grads runs
    # (aten's fused forward plus one row dot product for dX, ~2x faster than torch's composite
    # CPU backward in isolation: 1.5 vs 3.0 ms fwd + bwd at 512 x 512).

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

    def differentiable_forward(self, inputs, params):
        x = inputs[0]
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), params[0], self.eps)

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

    def fused_grads(self, dy, p1, p2, params, in_needs, p_needs):
        saved = p1 or p2
        if not saved or resolve_backend(dy.device) == "triton":
            return super().fused_grads(dy, p1, p2, params, in_needs, p_needs)
        (weight,) = params
        x2, rstd = saved["x"], saved["rstd"]
        dy2 = dy.reshape(x2.shape)
        dx = rms_norm_dx_ref(dy2, x2, weight, rstd).reshape(dy.shape) if in_needs[0] else None
        dw = _dweight_rows(x2, dy2, None, rstd).to(weight.dtype) if p_needs[0] else None
        return (dx,), (dw,)
