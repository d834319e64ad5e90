"""TwoBPLayerNorm and TwoBPRMSNorm: nn.LayerNorm / nn.RMSNorm whose backward can be split.

Both normalize over the last dim only (a 1-D ``normalized_shape``). Outside a split region
they are their torch twins; inside ``twobp.split_backward`` their backward computes dX only
and dγ (dβ) wait for ``twobp.backward_p2``. What each call keeps, and until when, is in
:mod:`twobp.ops.norm`.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..autograd import runs_as_torch
from ..ops.norm import LayerNormOp, RMSNormOp
from .base import TwoBPModule

__all__ = ["TwoBPLayerNorm", "TwoBPRMSNorm"]


def _check_last_dim_only(cls: str, normalized_shape) -> None:
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    if len(shape) != 1:
        hint = (f"; flatten those dims into one (x.flatten(-{len(shape)}), normalized_shape={math.prod(shape)})"
                if len(shape) > 1 else "")
        raise NotImplementedError(
            f"{cls} normalizes over the last dim only (a 1-D normalized_shape), got "
            f"normalized_shape={shape}{hint}, or keep the torch module")


@functools.lru_cache(maxsize=None)
def _rms_eps_in_opmath() -> bool:
    """Whether this torch's RMSNorm(eps=None) uses the epsilon of the opmath type (fp32 for
    fp16 / bf16 inputs, newer torch) rather than of the input dtype (older torch). Probed
    once on a tiny CPU tensor whose result differs by 30x between the two."""
    x = torch.full((1, 2), 1e-3, dtype=torch.float16)
    y = torch.nn.functional.rms_norm(x, (2,), None, None)
    return float(y[0, 0]) > 0.5


def _rms_default_eps(dtype: torch.dtype) -> float:
    """torch's eps for RMSNorm(eps=None) on inputs of ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16) and _rms_eps_in_opmath():
        return torch.finfo(torch.float32).eps
    return torch.finfo(dtype).eps


class TwoBPLayerNorm(TwoBPModule, nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` over the last dim: same constructor,
    parameters (weight, bias), init, state_dict and repr.

    y = (x - mean) / sqrt(var + eps) · weight + bias over x's last dim. A multi-dim
    ``normalized_shape`` raises NotImplementedError.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        _check_last_dim_only(type(self).__name__, normalized_shape)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        _check_last_dim_only(type(self).__name__, self.normalized_shape)  # converted modules too
        if runs_as_torch(input) and input.dtype in (torch.float32, torch.float64):
            return self._as_torch(lambda: F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps),
                                  lambda: self._op().native_forward((input,), (self.weight, self.bias)))
        return self._split(self._op(), (input,), (self.weight, self.bias))

    def _op(self) -> LayerNormOp:
        return LayerNormOp(eps=self.eps, normalized_size=self.normalized_shape[0])


class TwoBPRMSNorm(TwoBPModule, nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` over the last dim: same constructor, parameter
    (weight), init, state_dict and repr.

    y = x / sqrt(mean(x²) + eps) · weight over x's last dim; ``eps=None`` takes torch's
    default for the input dtype. A multi-dim ``normalized_shape`` raises NotImplementedError.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        _check_last_dim_only(type(self).__name__, normalized_shape)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        op = self._op(x.dtype)  # validated once per (shape, eps, dtype), converted modules too
        if runs_as_torch(x) and x.dtype in (torch.float32, torch.float64):
            # normal mode: torch's own op. Its CPU backward is composite and 2x the split op's
            # fused one in isolation, but in a model the split Function's Python on every call
            # (caches cold after a GEMM) takes that back: the two measure alike there
            return self._as_torch(lambda: F.rms_norm(x, self.normalized_shape, self.weight, self.eps),
                                  lambda: op.forward((x,), (self.weight,), save_p1=False, save_p2=False))
        return self._split(op, (x,), (self.weight,))

    def _op(self, dtype: torch.dtype) -> RMSNormOp:
        """The op for inputs of ``dtype``, built once per (shape, eps, dtype): its checks and
        construction are Python on every call of a module that runs per token block."""
        key = (self.normalized_shape, self.eps, dtype)
        cached = self.__dict__.get("_twobp_rms_op")
        if cached is not None and cached[0] == key:
            return cached[1]
        _check_last_dim_only(type(self).__name__, self.normalized_shape)  # converted modules too
        eps = self.eps if self.eps is not None else _rms_default_eps(dtype)
        op = RMSNormOp(eps=eps, normalized_size=self.normalized_shape[0])
        self.__dict__["_twobp_rms_op"] = (key, op)
        return op
