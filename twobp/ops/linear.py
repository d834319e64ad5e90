"""Linear, split: Y = X Wᵀ + b.

Shapes: X [..., K] (flattened to [M, K]), W [N, K], b [N], Y [..., N].

* forward: Y = X Wᵀ + b.
* p1, dX = dY W: needs only W (a parameter), so p1 saves **nothing**.
* p2, dW += Σ_mb dYᵀ X and db += Σ_mb Σ_rows dY: needs X (saved by forward, [M, K]) and
  dY (deposited by p1, [M, N]).

The Triton backend is :mod:`twobp.kernels.linear`; the torch reference below computes the
same contract with plain torch ops (batched p2 as one matmul per micro-batch).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..backend import gemm_backend
from ._checks import check_same_dtype_device
from .base import SplitOp

__all__ = ["LinearOp", "linear_fwd_ref", "linear_dx_ref", "linear_dw_ref"]


def linear_fwd_ref(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Y = X Wᵀ + b for X [..., K]."""
    return torch.nn.functional.linear(x, weight, bias)


def linear_dx_ref(dy: Tensor, weight: Tensor) -> Tensor:
    """dX = dY W for dY [..., N]."""
    return dy @ weight


def linear_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], dweight: Tensor | None,
                  dbias: Tensor | None) -> None:
    """dW += Σ dYᵀ X, db += Σ_rows dY over the micro-batches (one GEMM per micro-batch)."""
    for x, dy in zip(xs, dys):
        if dweight is not None:
            if dweight.dtype == x.dtype:
                dweight.addmm_(dy.t(), x)
            else:  # e.g. fp32 master gradients of fp16 activations
                dweight.add_((dy.t().float() @ x.float()).to(dweight.dtype))
        if dbias is not None:
            wide = torch.float64 if dy.dtype == torch.float64 else torch.float32  # fp32 sums for half dy
            dbias.add_(dy.sum(0, dtype=wide).to(dbias.dtype))


class LinearOp(SplitOp):
    """The split linear op (see module docstring). Stateless: one instance serves all."""

    name = "linear"
    autocast = "lower"  # under torch.autocast: run in the autocast dtype, as F.linear does

    @staticmethod
    def _check(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        k = weight.shape[1]
        if x.dim() == 0 or x.shape[-1] != k:
            raise ValueError(
                f"linear: input's last dim must be in_features={k}, got input shape {tuple(x.shape)}")
        check_same_dtype_device("linear", x, weight=weight, bias=bias)

    def native_forward(self, inputs, params):
        (x,), (weight, bias) = inputs, params
        if gemm_backend(x.device, x.dtype, "linear") != "torch":
            return None
        self._check(x, weight, bias)
        return linear_fwd_ref(x, weight, bias)

    def forward(self, inputs, params, *, save_p1, save_p2):
        (x,), (weight, bias) = inputs, params
        n, k = weight.shape
        if gemm_backend(x.device, x.dtype, "linear") == "triton":
            from ..kernels.linear import linear_fwd
            self._check(x, weight, bias)
            x2 = x.reshape(-1, k)
            y = linear_fwd(x2.contiguous(), weight, bias).reshape(*x.shape[:-1], n)
        else:
            try:  # torch validates as it runs; ours only names the fix when it fails (hot path)
                y = linear_fwd_ref(x, weight, bias)
            except RuntimeError:
                self._check(x, weight, bias)
                raise
        p2 = {"x": x.reshape(-1, k).contiguous()} if save_p2 else {}
        return y, {}, p2

    def input_grads(self, dy, saved, params, needs):
        weight = params[0]
        if gemm_backend(dy.device, dy.dtype, "linear") != "triton":
            return (linear_dx_ref(dy, weight),)  # [..., N] @ [N, K]: matmul folds the leading dims
        from ..kernels.linear import linear_dx
        n, k = weight.shape
        dx = linear_dx(dy.reshape(-1, n).contiguous(), weight)
        return (dx.reshape(*dy.shape[:-1], k),)

    def differentiable_forward(self, inputs, params):
        return torch.nn.functional.linear(inputs[0], *params)

    def fused_grads(self, dy, p1, p2, params, in_needs, p_needs):
        if gemm_backend(dy.device, dy.dtype, "linear") == "triton":
            return super().fused_grads(dy, p1, p2, params, in_needs, p_needs)
        weight, bias = params
        n, k = weight.shape
        dy2 = dy.reshape(-1, n)
        dx = linear_dx_ref(dy2, weight).reshape(*dy.shape[:-1], k) if in_needs[0] else None
        dw = dy2.t().mm(p2["x"]) if p_needs[0] else None  # [N, K], no zero-filled buffer
        db = dy2.sum(0) if p_needs[1] else None
        return (dx,), (dw, db)

    def param_grads(self, dys, saved, grads):
        dweight, dbias = grads
        n = dys[0].shape[-1]
        xs = [s["x"] for s in saved]
        dys2 = [dy.reshape(-1, n) for dy in dys]
        if gemm_backend(xs[0].device, xs[0].dtype, "linear") == "triton":
            from ..kernels.linear import linear_dw
            if dweight is None:
                # the kernel always produces dW; a frozen weight with a trainable bias is rare
                dweight = torch.empty(n, xs[0].shape[1], device=xs[0].device, dtype=torch.float32)
                dweight.zero_()
            linear_dw(xs, dys2, dweight, dbias)
        else:
            linear_dw_ref(xs, dys2, dweight, dbias)
