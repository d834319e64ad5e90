"""Conv2d, split: y = conv2d(x, W) + b (groups = 1, zero padding).

Shapes: x [N, C, H, W], W [O, C, KH, KW], b [O], y [N, O, OH, OW].

* forward: y = conv2d(x, W) + b.
* p1, dx = conv_transpose2d(dy, W): needs W (a parameter) and the input's *shape* only (with
  stride > 1 several H give the same OH, so the shape is not implied by dy's). p1 saves a
  zero-element stand-in ``x_shape`` of shape [N, C, H, W, 0]: it owns no storage, so the
  store counts 0 bytes for it.
* p2, dW += Σ_mb Σ_pixels dy ⋆ x and db += Σ_mb Σ_pixels dy: needs x (saved by forward,
  contiguous [N, C, H, W]) and dy (deposited by p1, [N, O, OH, OW]).

Memory: between p1 and p2 the store holds x and dy, in early CNN layers 10-800x the bytes of
the dW they produce (numbers in ``kernels/conv.py``). That is the cost 2BP pays for conv
layers, and the store reports it as it is.

Padding: ints, pairs, ``'valid'`` (none) or ``'same'`` (stride 1 only, as in torch). With an
even effective kernel extent, 'same' pads one more row/column below/right than above/left,
exactly as torch does; the kernels take the per-side padding.

The Triton backend is :mod:`twobp.kernels.conv`; the torch reference below computes the
same contract with plain torch ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import gemm_backend
from ._checks import check_same_dtype_device
from .base import SplitOp

__all__ = ["Conv2dOp", "conv2d_fwd_ref", "conv2d_dx_ref", "conv2d_dw_ref", "conv2d_op"]

IntPair = Union[int, tuple[int, int]]
# Explicit per-side padding ((top, bottom), (left, right)), as the references and launchers take it.
Padding4 = tuple[tuple[int, int], tuple[int, int]]


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if (not isinstance(vals, (tuple, list)) or len(vals) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in vals)):
        raise TypeError(f"conv2d: {name} must be an int or a pair of ints, got {v!r}")
    if min(vals) < minimum:
        raise ValueError(f"conv2d: {name} must be >= {minimum} in both dims, got {v!r}")
    return int(vals[0]), int(vals[1])


def _sides(padding) -> Padding4:
    """((top, bottom), (left, right)) from an int, (pad_h, pad_w) or per-side pairs."""
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(p, (tuple, list)) for p in padding):
        return _pair("padding[0]", tuple(padding[0]), 0), _pair("padding[1]", tuple(padding[1]), 0)
    ph, pw = _pair("padding", padding, 0)
    return (ph, ph), (pw, pw)


def _symmetric(pad: Padding4) -> tuple[int, int] | None:
    (top, bottom), (left, right) = pad
    return (top, left) if top == bottom and left == right else None


# ----------------------------------------------------------------------------------------
# torch reference: the split contract in plain torch ops (the CPU backend)
# ----------------------------------------------------------------------------------------


def conv2d_fwd_ref(x: Tensor, weight: Tensor, bias: Tensor | None, *, stride: IntPair = 1,
                   padding=0, dilation: IntPair = 1) -> Tensor:
    """y = conv2d(x, W) + b; padding explicit: int, (pad_h, pad_w) or ((top, bottom), (left, right))."""
    pad = _sides(padding)
    sym = _symmetric(pad)
    if sym is None:
        (top, bottom), (left, right) = pad
        x, sym = F.pad(x, (left, right, top, bottom)), (0, 0)
    return F.conv2d(x, weight, bias, stride=stride, padding=sym, dilation=dilation)


def conv2d_dx_ref(dy: Tensor, weight: Tensor, *, input_shape: Sequence[int], stride: IntPair = 1,
                  padding=0, dilation: IntPair = 1) -> Tensor:
    """dx = the input gradient of conv2d for an input of ``input_shape`` (N, C, H, W)."""
    pad = _sides(padding)
    sym = _symmetric(pad)
    n, c, h, w = input_shape
    if sym is not None:
        return torch.nn.grad.conv2d_input((n, c, h, w), weight, dy, stride, sym, dilation)
    (top, bottom), (left, right) = pad
    dxp = torch.nn.grad.conv2d_input((n, c, h + top + bottom, w + left + right), weight, dy, stride, 0, dilation)
    return dxp[:, :, top:top + h, left:left + w].contiguous()


def _padded(x: Tensor, pad: Padding4) -> tuple[Tensor, tuple[int, int]]:
    """x and the symmetric padding aten takes: asymmetric padding is applied to x first."""
    sym = _symmetric(pad)
    if sym is not None:
        return x, sym
    (top, bottom), (left, right) = pad
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _aten_conv_backward(dy: Tensor, x: Tensor, weight: Tensor, *, has_bias: bool, pad: Padding4, stride, dilation,
                        mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """aten.convolution_backward (what autograd runs for conv2d) with an output mask.
    ``x`` is only read for the weight gradient; for dX alone its shape is enough."""
    xp, sym = _padded(x, pad)
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy, xp, weight, [weight.shape[0]] if has_bias else None, _pair("stride", stride, 1), sym,
        _pair("dilation", dilation, 1), False, [0, 0], 1, mask)
    if dx is not None and xp is not x:
        (top, _), (left, _) = pad
        dx = dx[:, :, top:top + x.shape[2], left:left + x.shape[3]].contiguous()
    return dx, dw, db


def conv2d_dw_ref(xs: Sequence[Tensor], dys: Sequence[Tensor], dweight: Tensor | None, dbias: Tensor | None, *,
                  stride: IntPair = 1, padding=0, dilation: IntPair = 1) -> None:
    """dW += Σ_mb Σ_pixels dy ⋆ x, db += Σ_mb Σ_pixels dy: aten's weight/bias backward per
    micro-batch (fp32/fp64), or in fp32 for half inputs; accumulated."""
    pad = _sides(padding)
    for x, dy in zip(xs, dys):
        if dweight is None:
            if dbias is not None:
                dbias.add_(dy.sum((0, 2, 3), dtype=torch.float32 if dy.dtype != torch.float64 else dy.dtype)
                           .to(dbias.dtype))
            continue
        native = x.dtype in (torch.float32, torch.float64)
        xc, dyc = (x, dy) if native else (x.float(), dy.float())
        w_like = xc.new_empty(dweight.shape)  # sizes dW; its values are never read
        _, dw, db = _aten_conv_backward(dyc, xc, w_like, has_bias=dbias is not None, pad=pad, stride=stride,
                                        dilation=dilation, mask=[False, True, dbias is not None])
        dweight.add_(dw.to(dweight.dtype))
        if dbias is not None:
            dbias.add_(db.to(dbias.dtype))


# ----------------------------------------------------------------------------------------
# The split op
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv2dOp(SplitOp):
    """The split conv2d op (see module docstring).

    ``stride``, ``dilation``: int or pair (>= 1). ``padding``: int, pair, ``'valid'`` or
    ``'same'``. ``groups``: 1 only (others raise NotImplementedError). Fields are stored as
    given after validation; build one with :func:`conv2d_op` to share instances.
    """

    stride: IntPair = 1
    padding: Union[IntPair, str] = 0
    dilation: IntPair = 1
    groups: int = 1

    name = "conv2d"  # not a field: a class attribute, as SplitOp's
    autocast = "lower"  # under torch.autocast: run in the autocast dtype, as F.conv2d does

    def __post_init__(self) -> None:
        if self.groups != 1:
            raise NotImplementedError(
                f"Conv2dOp: groups={self.groups} is not supported (grouped and depthwise convolutions); only "
                "groups=1. Keep such layers as plain nn.Conv2d (twobp.convert leaves them).")
        stride = _pair("stride", self.stride, 1)
        dilation = _pair("dilation", self.dilation, 1)
        padding = self.padding
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"conv2d: padding string must be 'same' or 'valid', got {padding!r}")
            if padding == "same" and stride != (1, 1):
                raise ValueError(f"conv2d: padding='same' is not supported for strided convolutions "
                                 f"(stride={self.stride}); give explicit padding instead")
        else:
            padding = _pair("padding", padding, 0)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "padding", padding)

    def explicit_padding(self, kernel_hw: Sequence[int]) -> Padding4:
        """((top, bottom), (left, right)) for a kernel of ``kernel_hw``; 'same' as torch pads it."""
        if self.padding == "valid":
            return (0, 0), (0, 0)
        if self.padding == "same":
            sides = []
            for k, d in zip(kernel_hw, self.dilation):
                total = d * (k - 1)
                sides.append((total // 2, total - total // 2))  # the odd row/column goes below / right
            return sides[0], sides[1]
        ph, pw = self.padding
        return (ph, ph), (pw, pw)

    def _geometry(self, weight: Tensor) -> dict:
        return dict(stride=self.stride, padding=self.explicit_padding(weight.shape[2:]), dilation=self.dilation)

    def native_forward(self, inputs, params):
        (x,), (weight, bias) = inputs, params
        if gemm_backend(x.device, x.dtype, "conv2d") != "torch":
            return None
        geo = self._checked_geometry(x, weight, bias)
        return conv2d_fwd_ref(x, weight, bias, **geo)

    def forward(self, inputs, params, *, save_p1, save_p2):
        (x,), (weight, bias) = inputs, params
        geo = self._checked_geometry(x, weight, bias)
        if gemm_backend(x.device, x.dtype, "conv2d") == "triton":
            from ..kernels.conv import conv2d_fwd
            y = conv2d_fwd(x, weight, bias, **geo)
        else:
            y = conv2d_fwd_ref(x, weight, bias, **geo)
        # p1 needs the input's shape only: a zero-element tensor carries it at no storage cost
        p1 = {"x_shape": x.new_empty((*x.shape, 0))} if save_p1 else {}
        p2 = {"x": x.contiguous()} if save_p2 else {}
        return y, p1, p2

    def _checked_geometry(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> dict:
        """Validate x against the weight and the op's geometry; the geometry for the calls."""
        if x.dim() != 4:
            raise ValueError(f"conv2d: input must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
        if weight.dim() != 4 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"conv2d: input has {x.shape[1]} channels (shape {tuple(x.shape)}) but weight has shape "
                             f"{tuple(weight.shape)}; expected weight [O, {x.shape[1]}, KH, KW]")
        check_same_dtype_device("conv2d", x, weight=weight, bias=bias)
        geo = self._geometry(weight)
        (top, bottom), (left, right) = geo["padding"]
        extent = [d * (k - 1) + 1 for k, d in zip(weight.shape[2:], self.dilation)]
        if x.shape[2] + top + bottom < extent[0] or x.shape[3] + left + right < extent[1]:
            raise ValueError(
                f"conv2d: input {x.shape[2]}x{x.shape[3]} padded by {geo['padding']} ((top, bottom), (left, right)) "
                f"is smaller than the dilated kernel {extent[0]}x{extent[1]}; pad more or use a smaller kernel")
        return geo

    def input_grads(self, dy, saved, params, needs):
        weight = params[0]
        input_shape = tuple(saved["x_shape"].shape[:-1])
        geo = self._geometry(weight)
        if gemm_backend(dy.device, dy.dtype, "conv2d") == "triton":
            from ..kernels.conv import conv2d_dx
            dx = conv2d_dx(dy, weight, input_shape=input_shape, **geo)
        else:
            dx = conv2d_dx_ref(dy, weight, input_shape=input_shape, **geo)
        return (dx,)

    def differentiable_forward(self, inputs, params):
        weight, bias = params
        return conv2d_fwd_ref(inputs[0], weight, bias, **self._geometry(weight))

    def fused_grads(self, dy, p1, p2, params, in_needs, p_needs):
        weight, bias = params
        x = p2.get("x")
        if (x is None or gemm_backend(dy.device, dy.dtype, "conv2d") == "triton"
                or x.dtype not in (torch.float32, torch.float64)):
            return super().fused_grads(dy, p1, p2, params, in_needs, p_needs)
        dx, dw, db = _aten_conv_backward(dy, x, weight, has_bias=bias is not None, pad=self._geometry(weight)["padding"],
                                         stride=self.stride, dilation=self.dilation,
                                         mask=[in_needs[0], p_needs[0], p_needs[1]])
        return (dx,), (dw, db)

    def param_grads(self, dys, saved, grads):
        dweight, dbias = grads
        xs = [s["x"] for s in saved]
        if dweight is None:
            # a frozen weight with a trainable bias: db alone is one reduction of dy, no conv needed
            if dbias is not None:
                conv2d_dw_ref(xs, dys, None, dbias)
            return
        geo = self._geometry(dweight)
        if gemm_backend(xs[0].device, xs[0].dtype, "conv2d") == "triton":
            from ..kernels.conv import conv2d_dw
            conv2d_dw(xs, list(dys), dweight, dbias, **geo)
        else:
            conv2d_dw_ref(xs, dys, dweight, dbias, **geo)


@functools.lru_cache(maxsize=256)
def conv2d_op(stride: IntPair = 1, padding: Union[IntPair, str] = 0, dilation: IntPair = 1,
              groups: int = 1) -> Conv2dOp:
    """A shared :class:`Conv2dOp` for these attributes (modules build theirs per forward)."""
    return Conv2dOp(stride, padding, dilation, groups)
