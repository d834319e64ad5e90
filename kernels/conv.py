"""Conv2d for 2BP: forward, p1 (dX) and p2 (dW, db) as separately launchable Triton kernels.

Math
----
x [N, C, H, W] (NCHW by shape, any strides), W [O, C, KH, KW], b [O]; stride (sh, sw),
dilation (dh, dw), zero padding pt / pb rows above / below and pl / pr columns left / right;
groups = 1. y and dy are [N, O, OH, OW] with

    OH = (H + pt + pb - dh·(KH - 1) - 1) // sh + 1          (OW likewise)

and output row oh reads, through tap kh, the input row ih = oh·sh - pt + kh·dh (zero when
outside [0, H)); columns likewise.

    forward  y[n, o, oh, ow]  = b[o] + Σ_{c, kh, kw} x[n, c, ih, iw] · W[o, c, kh, kw]
    p1       dx[n, c, ih, iw] = Σ_{o, kh, kw} dy[n, o, oh, ow] · W[o, c, kh, kw]
                 over the taps for which oh = (ih + pt - kh·dh) / sh is an integer in [0, OH)
                 (and ow likewise): the transposed convolution, written as a gather
    p2       dW[o, c, kh, kw] += Σ_i Σ_{n, oh, ow} dy_i[n, o, oh, ow] · x_i[n, c, ih, iw]
             db[o]            += Σ_i Σ_{n, oh, ow} dy_i[n, o, oh, ow]

p2 may cover k micro-batches i = 1..k at once (their batch sizes N_i may differ); its
reduction then runs over Σ_i N_i·OH·OW output pixels, in one launch, without concatenating.

All three are implicit GEMMs: the im2col matrix is never formed; each kernel computes the
addresses of its entries and masks the padding.

                 rows             columns          reduction
    forward      N·OH·OW pixels   O                C·KH·KW
    p1 (dX)      N·H·W pixels     C                O·KH·KW (the taps that land, see above)
    p2 (dW)      O                C·KH·KW          Σ_i N_i·OH·OW pixels

Cost: each is 2·N·OH·OW·O·C·KH·KW FLOPs (`conv2d_flops`; the bias is not counted). Minimum
bytes: forward reads x and W and writes y; p1 reads dy and W and writes dx; p2 reads x and dy
and reads and writes dW (and db).

Memory in 2BP
-------------
Between p1 and p2 a conv layer keeps x_i and dy_i of every pending micro-batch alive
(N·C·H·W + N·O·OH·OW elements each), while what p2 produces, dW, is only O·C·KH·KW. Plain
backprop frees dy at the layer's backward; 2BP keeps it (and x) until p2. In the early,
high-resolution layers of a CNN this dwarfs dW: ResNet-152 at 224x224 in fp32, 8 images per
micro-batch, its first 3x3 conv (64 -> 64 at 56x56) keeps 6.4 MB of x and 6.4 MB of dy for a
0.15 MB dW (87x); the following 1x1 expansion (64 -> 256) keeps 6.4 + 25.7 MB for 0.07 MB
(490x). Only the last stage's 3x3 convs (512 channels at 7x7) have dW larger than x + dy. This
is the extra memory the paper reports for ResNet, and the store counts it as it is.

Precision: fp32 accumulation everywhere. y and dx are written in the input dtype; dW and db
are read, added to and written back in their own dtype, the input dtype or fp32 (master
gradients for fp16 / bf16 activations). fp32 operands use TF32 tensor cores when
`torch.backends.cudnn.allow_tf32` is set (torch's default for convolutions, so the kernels
round like cuDNN does), exact fp32 products ("ieee") otherwise.

Design
------
- Loop order: the forward and dX walk (tap, channel chunk) pairs in one runtime loop, the
  channels in BLOCK_SIZE_K chunks inside each tap, so a 1x1 convolution is a plain GEMM over
  channels. Not unrolling the taps keeps the code small: a 7x7 stem unrolled 49 times took
  ptxas 9-16 minutes per config in fp32. A small channel count
  (the 3 of an RGB stem) wastes most of each BLOCK_SIZE_K chunk; such layers are a small share
  of a network's FLOPs.
- p1 gathers: each program owns one [BLOCK_SIZE_M pixels, BLOCK_SIZE_N channels] tile of dx
  and reads the dy entries and weight taps that reach it, so there are no atomics and no
  zero-fill. With stride s > 1 only one tap in s (per axis) lands on a given input pixel; the
  kernel masks the others, which wastes up to (1 - 1/(sh·sw)) of its tensor-core work. The
  alternative, one launch per stride phase (dense sub-convolutions), removes the waste at
  the price of sh·sw launches; the masked gather keeps one launch on the critical path.
- p2 is output-stationary with an optional split of the pixel reduction ("split-K"): each
  program owns one [BLOCK_SIZE_M out channels, BLOCK_SIZE_N in channels] tile of one tap of
  dW, and walks every micro-batch's pixels (a 1/SPLIT share of them). Conv weights are small
  next to their activations (early ResNet layers: a 64x64x3x3 weight, 9 tiles of 64x64, and
  a reduction over millions of pixels), so without the split most of the GPU would idle.
  With SPLIT = 1 a program adds its tile straight into dW (read, add, write once). With
  SPLIT > 1 the programs write fp32 partial tiles to a [SPLIT, O, C, KH, KW] workspace and a
  second small kernel sums them in a fixed order and adds the result into dW: deterministic,
  no atomics. The launcher picks SPLIT from the tile count and the GPU's SM count.
- db is fused into p2: the programs of the first in-channel tile of tap (0, 0) load every dy
  entry of their out-channel slice anyway, so they also sum them and own db[slice].
- Batched p2 does not concatenate: the launcher writes an int64 table on the device with the
  addresses of x_i and dy_i and the batch size N_i; all micro-batches share channel, spatial
  sizes and strides (contiguous NCHW ones do), and the kernel's outer loop walks the table.
  One micro-batch skips the table.
- Layout: activation tiles keep pixels as their last (fastest) dim, so that in NCHW
  neighbouring threads touch neighbouring addresses (Triton orders threads along the last
  dim when it cannot prove contiguity, which the div/mod pixel decode hides). The forward and
  dX therefore compute their tiles transposed (yᵀ = W xᵀ), and dW transposes its x tile.
- Offsets that scale with the batch index are int64, so tensors past 2^31 elements are safe.
- Pipelining (cp.async) needs loads of 4 bytes or more per thread, i.e. addresses the compiler
  can prove contiguous. In 16 bits the im2col gathers of x (and, for a KxK conv, of an NCHW
  weight, whose channels are KH·KW apart) are 2-byte loads, so they are not pipelined. p2
  therefore walks the pixels image by image when dy's spatial dims are one unit-stride run
  of a multiple of 16 pixels (DY_FLAT: ResNet's 56x56 and 28x28 maps): dy's tile then loads
  as 16-byte vectors through cp.async, and so does x's in a 1x1 stride-1 conv (X_FLAT); the
  last chunk of each image is partly masked. The forward and dX of a KxK conv pipeline their
  weight loads when the weight is channels-last in memory (its channels contiguous; the
  kernels take any strides); with NCHW weights they do not (bench/results/aot-sweep.md).

Everything here is plain functions on tensors: no autograd, no modules, and no state besides
Triton's autotune caches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import DTYPES as _DTYPES
from ._launch import INTERPRET as _INTERPRET
from ._launch import as_list as _as_list
from ._launch import check_devices
from ._launch import check_dtype as _check_dtype
from ._launch import check_tensor as _check_tensor
from ._launch import device_table as _device_table
from ._targets import ConfigTable, make_prune
from ._tiles import grouped_tile as _grouped_tile

__all__ = ["conv2d_fwd", "conv2d_dx", "conv2d_dw", "conv2d_flops", "conv2d_output_size"]



# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group: int | None = 8) -> triton.Config:
    meta = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk}
    if group is not None:
        meta["GROUP_SIZE_M"] = group
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Interpreter: one config each, so the autotuner never benchmarks on the CPU. Tiles are small
# and not square, so a swapped stride or mask shows as a wrong answer; GROUP_SIZE_M 2
# exercises ragged groups.
_INTERPRET_GEMM = [_cfg(32, 16, 16, 4, 1, 2)]
_INTERPRET_DW = [_cfg(16, 16, 32, 4, 1, None)]
_REDUCE_BLOCK = 128 if _INTERPRET else 1024

# Candidates per launch class (kernels/_targets.py), best first; each is checked by the AOT sweep
# (bench/results/aot-sweep.md). BLOCK_SIZE_K is a channel chunk (fwd: in channels, dX: out
# channels); CNN channel counts are multiples of 32 past the stem. The forward and dX compute
# their tiles transposed (out channels x pixels), so the dot's rows are BLOCK_SIZE_N: 32 of
# them compile to mma.sync on sm_90, not wgmma, and that config is an sm_80 one.
# A KxK conv gathers its tiles with 2-byte loads that are not pipelined (see Design), so a tile
# lives in registers: 64-deep channel chunks (128x128x64) and 4-warp 64x128 tiles spill there.
_GEMM_SM90 = [
    _cfg(128, 128, 32, 8, 4),
    _cfg(256, 64, 32, 8, 3),
    _cfg(128, 64, 32, 8, 4),
    _cfg(64, 128, 32, 8, 4),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 64, 32, 4, 4),
    _cfg(64, 64, 16, 4, 5),  # the stem: 3 in channels
]
_GEMM_SM80 = _GEMM_SM90 + [_cfg(128, 32, 32, 4, 4)]  # few out channels
# fp32 (TF32 by default, as cuDNN): twice the bytes per tile; 32-deep channel chunks spill
_GEMM_FP32_SM90 = [
    _cfg(128, 64, 16, 8, 3),
    _cfg(64, 64, 16, 8, 3),
    _cfg(32, 64, 16, 4, 3),
]
_GEMM_FP32_SM80 = _GEMM_FP32_SM90 + [_cfg(64, 32, 16, 4, 3)]  # 32 out channels: mma.sync on sm_90
# dW: the tile is BLOCK_SIZE_M out x BLOCK_SIZE_N in channels; BLOCK_SIZE_K is the pixel step.
_DW_SM90 = [
    _cfg(128, 128, 32, 8, 3, None),
    _cfg(128, 64, 64, 8, 3, None),
    _cfg(64, 128, 64, 8, 3, None),
    _cfg(64, 64, 64, 8, 4, None),
    _cfg(64, 64, 32, 4, 5, None),
    _cfg(64, 32, 64, 4, 4, None),
]
_DW_SM80 = _DW_SM90 + [_cfg(32, 64, 64, 4, 4, None)]  # 32 out channels: mma.sync on sm_90
_DW_FP32_SM90 = [
    _cfg(128, 64, 32, 8, 3, None),
    _cfg(64, 64, 32, 4, 3, None),
    _cfg(64, 32, 32, 4, 3, None),
]
_DW_FP32_SM80 = [
    _cfg(64, 64, 32, 8, 3, None),
    _cfg(64, 32, 32, 4, 3, None),
    _cfg(64, 64, 16, 8, 3, None),
]
_FWD_TABLE = ConfigTable({("sm_90", "16-bit"): _GEMM_SM90, ("sm_80", "16-bit"): _GEMM_SM80,
                          ("sm_90", "fp32"): _GEMM_FP32_SM90, ("sm_80", "fp32"): _GEMM_FP32_SM80},
                         _INTERPRET_GEMM if _INTERPRET else None)
# dX's gather of the 128x32 tile spills up to 6 KB on sm_80: it keeps the sm_90 list there
_DX_TABLE = ConfigTable({**_FWD_TABLE.lists, ("sm_80", "16-bit"): _GEMM_SM90}, _INTERPRET_GEMM if _INTERPRET else None)
_DW_TABLE = ConfigTable({("sm_90", "16-bit"): _DW_SM90, ("sm_80", "16-bit"): _DW_SM80,
                         ("sm_90", "fp32"): _DW_FP32_SM90, ("sm_80", "fp32"): _DW_FP32_SM80},
                        _INTERPRET_DW if _INTERPRET else None)


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: only fp32 operands have a choice; follow torch's conv TF32 switch."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _prune_gemm(configs, named_args):
    """Drop configs whose tile is far larger than the problem (saves autotuning time): a
    block may exceed its dimension by less than 2x, with 32 (16 for channel chunks) as the
    floor. Keeps at least the smallest config."""
    limits = {"BLOCK_SIZE_M": max(32, triton.next_power_of_2(named_args["M"])),
              "BLOCK_SIZE_N": max(32, triton.next_power_of_2(named_args["N"])),
              "BLOCK_SIZE_K": max(16, triton.next_power_of_2(named_args["K_CHANNELS"]))}
    kept = [c for c in configs if all(c.kwargs[k] <= v for k, v in limits.items())]
    if kept:
        return kept
    return [min(configs, key=lambda c: c.kwargs["BLOCK_SIZE_M"] * c.kwargs["BLOCK_SIZE_N"] * c.kwargs["BLOCK_SIZE_K"])]


def _prune_dw_size(configs, named_args):
    """As _prune_gemm for dW: tiles no wider than the channel counts need."""
    limits = {"BLOCK_SIZE_M": max(32, triton.next_power_of_2(named_args["O"])),
              "BLOCK_SIZE_N": max(32, triton.next_power_of_2(named_args["C"]))}
    kept = [c for c in configs if all(c.kwargs[k] <= v for k, v in limits.items())]
    if kept:
        return kept
    return [min(configs, key=lambda c: c.kwargs["BLOCK_SIZE_M"] * c.kwargs["BLOCK_SIZE_N"])]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # x [N, C, H, W], any strides
    w_ptr,  # W [O, C, KH, KW], any strides
    bias_ptr,  # b [O], added in the epilogue when HAS_BIAS; any valid pointer otherwise
    y_ptr,  # y [N, O, OH, OW] output, written in its own dtype
    M,  # GEMM rows: N·OH·OW output pixels
    N,  # GEMM columns: O out channels
    K_CHANNELS,  # C in channels (the reduction is C·KH·KW; used as an autotune key)
    H, W,  # input height, width
    OH, OW,  # output height, width
    stride_xn, stride_xc, stride_xh, stride_xw,  # x strides, in elements
    stride_wo, stride_wc, stride_wh, stride_ww,  # W strides
    stride_bias,  # b stride
    stride_yn, stride_yc, stride_yh, stride_yw,  # y strides
    KH: tl.constexpr, KW: tl.constexpr,  # kernel height, width
    STRIDE_H, STRIDE_W,  # conv stride
    PAD_H, PAD_W,  # zero padding above / left of the input (below / right follow from OH, OW)
    DIL_H, DIL_W,  # dilation
    HAS_BIAS: tl.constexpr,  # add b in the epilogue
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    BLOCK_SIZE_M: tl.constexpr,  # tile rows: output pixels
    BLOCK_SIZE_N: tl.constexpr,  # tile columns: out channels
    BLOCK_SIZE_K: tl.constexpr,  # reduction step: in channels per tap
    GROUP_SIZE_M: tl.constexpr,  # row blocks per group in the tile order
):
    """y = conv(x, W) + b. One program per [BLOCK_SIZE_M pixels, BLOCK_SIZE_N out channels]
    tile of y (pixels flattened as (n, oh, ow)); reduction over taps, then channel chunks."""
    tl.static_assert(BLOCK_SIZE_M >= 16 and BLOCK_SIZE_N >= 16 and BLOCK_SIZE_K >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(GROUP_SIZE_M >= 1, "GROUP_SIZE_M counts row blocks")

    pid = tl.program_id(axis=0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_SIZE_M), tl.cdiv(N, BLOCK_SIZE_N), GROUP_SIZE_M)
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)  # output pixel (n, oh, ow) flattened
    offs_o = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)  # out channel
    offs_c = tl.arange(0, BLOCK_SIZE_K)  # in channel within a chunk
    mask_m = offs_m < M
    mask_o = offs_o < N

    # (n, oh, ow) of each row; the batch offset in int64
    n = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    x_rows = x_ptr + n.to(tl.int64) * stride_xn  # [BM] pointers to x[n, 0, 0, 0], one per pixel
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    w_cols = w_ptr + offs_o * stride_wo  # [BN] pointers to W[o, 0, 0, 0]

    # The tile is computed transposed, yᵀ[o, pixel] = Σ W[o, c] xᵀ[c, pixel], so that pixels are
    # the last (fastest) dim of every activation tile: in NCHW neighbouring output columns
    # read and write neighbouring addresses, and Triton orders threads along the last dim.
    acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_M), dtype=tl.float32)
    # One loop over (tap, channel chunk) pairs, not loops unrolled over the taps: a 7x7 stem
    # unrolled 49 times took ptxas 9-16 minutes per config in fp32 (the AOT sweep), and a flat
    # loop is one software pipeline instead of one short one per tap.
    n_chunks = tl.cdiv(K_CHANNELS, BLOCK_SIZE_K)
    for t in range(0, KH * KW * n_chunks):
        tap = t // n_chunks
        c0 = (t - tap * n_chunks) * BLOCK_SIZE_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * DIL_H
        iw = iw0 + kw * DIL_W
        in_hw = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # [BM] the tap lands inside the input
        x_tap = x_rows + ih * stride_xh + iw * stride_xw  # [BM] x[n, 0, ih, iw]
        w_tap = w_cols + kh * stride_wh + kw * stride_ww  # [BN] W[o, 0, kh, kw]
        mask_c = offs_c < K_CHANNELS - c0
        wgt = tl.load(w_tap[:, None] + (c0 + offs_c)[None, :] * stride_wc,
                      mask=mask_o[:, None] & mask_c[None, :], other=0.0)  # [BN, BK] W, o x c
        xt = tl.load(x_tap[None, :] + (c0 + offs_c)[:, None] * stride_xc,
                     mask=mask_c[:, None] & in_hw[None, :], other=0.0)  # [BK, BM] x, c x pixel
        acc = tl.dot(wgt, xt, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_o * stride_bias, mask=mask_o, other=0.0)
        acc += bias.to(tl.float32)[:, None]

    y_pix = y_ptr + n.to(tl.int64) * stride_yn + oh * stride_yh + ow * stride_yw  # [BM]
    y_ptrs = y_pix[None, :] + offs_o[:, None] * stride_yc  # [BN, BM]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_m[None, :])


@triton.jit
def _conv_dx_kernel(
    dy_ptr,  # dy [N, O, OH, OW], any strides
    w_ptr,  # W [O, C, KH, KW], any strides
    dx_ptr,  # dx [N, C, H, W] output, written in its own dtype
    M,  # GEMM rows: N·H·W input pixels
    N,  # GEMM columns: C in channels
    K_CHANNELS,  # O out channels (the reduction is O·KH·KW; used as an autotune key)
    H, W,  # input height, width
    OH, OW,  # output height, width
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,  # dy strides, in elements
    stride_wo, stride_wc, stride_wh, stride_ww,  # W strides
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,  # dx strides
    KH: tl.constexpr, KW: tl.constexpr,  # kernel height, width
    STRIDE_H, STRIDE_W,  # conv stride
    PAD_H, PAD_W,  # zero padding above / left of the input
    DIL_H, DIL_W,  # dilation
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    BLOCK_SIZE_M: tl.constexpr,  # tile rows: input pixels
    BLOCK_SIZE_N: tl.constexpr,  # tile columns: in channels
    BLOCK_SIZE_K: tl.constexpr,  # reduction step: out channels per tap
    GROUP_SIZE_M: tl.constexpr,  # row blocks per group in the tile order
):
    """dx = conv_transpose(dy, W) as a gather. One program per [BLOCK_SIZE_M pixels,
    BLOCK_SIZE_N in channels] tile of dx (pixels flattened as (n, ih, iw)); for each tap it
    finds the output pixel that read this input pixel, if any, and reduces over out channels."""
    tl.static_assert(BLOCK_SIZE_M >= 16 and BLOCK_SIZE_N >= 16 and BLOCK_SIZE_K >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(GROUP_SIZE_M >= 1, "GROUP_SIZE_M counts row blocks")

    pid = tl.program_id(axis=0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_SIZE_M), tl.cdiv(N, BLOCK_SIZE_N), GROUP_SIZE_M)
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)  # input pixel (n, ih, iw) flattened
    offs_c = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)  # in channel
    offs_o = tl.arange(0, BLOCK_SIZE_K)  # out channel within a chunk
    mask_m = offs_m < M
    mask_c = offs_c < N

    n = offs_m // (H * W)
    pix = offs_m % (H * W)
    ih = pix // W
    iw = pix % W
    dy_rows = dy_ptr + n.to(tl.int64) * stride_dyn  # [BM] pointers to dy[n, 0, 0, 0]
    w_cols = w_ptr + offs_c * stride_wc  # [BN] pointers to W[0, c, 0, 0]

    # Transposed tile as in the forward: dxᵀ[c, pixel] = Σ Wᵀ[c, o] dyᵀ[o, pixel], pixels last.
    acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_M), dtype=tl.float32)
    n_chunks = tl.cdiv(K_CHANNELS, BLOCK_SIZE_K)  # one loop over (tap, channel chunk), as the forward
    for t in range(0, KH * KW * n_chunks):
        tap = t // n_chunks
        o0 = (t - tap * n_chunks) * BLOCK_SIZE_K
        kh = tap // KW
        kw = tap - kh * KW
        # output pixel that reads input pixel (ih, iw) through tap (kh, kw): oh·sh = ih + pt - kh·dh
        th = ih + PAD_H - kh * DIL_H
        th_c = tl.maximum(th, 0)  # division of negatives rounds differently per backend: avoid it
        oh = th_c // STRIDE_H
        tw = iw + PAD_W - kw * DIL_W
        tw_c = tl.maximum(tw, 0)
        ow = tw_c // STRIDE_W
        hit = (mask_m & (th >= 0) & (th_c - oh * STRIDE_H == 0) & (oh < OH)
               & (tw >= 0) & (tw_c - ow * STRIDE_W == 0) & (ow < OW))  # [BM] the tap lands
        dy_tap = dy_rows + oh * stride_dyh + ow * stride_dyw  # [BM] dy[n, 0, oh, ow]
        w_tap = w_cols + kh * stride_wh + kw * stride_ww  # [BN] W[0, c, kh, kw]
        mask_o = offs_o < K_CHANNELS - o0
        wt = tl.load(w_tap[:, None] + (o0 + offs_o)[None, :] * stride_wo,
                     mask=mask_c[:, None] & mask_o[None, :], other=0.0)  # [BN, BK] W, c x o
        gt = tl.load(dy_tap[None, :] + (o0 + offs_o)[:, None] * stride_dyc,
                     mask=mask_o[:, None] & hit[None, :], other=0.0)  # [BK, BM] dy, o x pixel
        acc = tl.dot(wt, gt, acc, input_precision=INPUT_PRECISION)

    dx_pix = dx_ptr + n.to(tl.int64) * stride_dxn + ih * stride_dxh + iw * stride_dxw  # [BM]
    dx_ptrs = dx_pix[None, :] + offs_c[:, None] * stride_dxc  # [BN, BM]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_m[None, :])


@triton.jit
def _conv_dw_step(acc, db_acc,
                  dy_cols,  # [BK] pointers to dy[n, 0, oh, ow] of the chunk's pixels
                  x_pix,  # [BK] pointers to x[n, 0, ih, iw] they read through the tap
                  mask_p,  # [BK] the pixel exists
                  in_hw,  # [BK] ... and its tap lands inside the input
                  offs_o, offs_c, mask_o, mask_c,  # the tile's out / in channels
                  stride_dyc, stride_xc,  # channel strides
                  owns_db,  # this program also sums db
                  HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One pixel chunk of dW: acc += dy[o-tile, chunk] x[c-tile, chunk]ᵀ (and db_acc += Σ dy)."""
    g = tl.load(dy_cols[None, :] + offs_o[:, None] * stride_dyc,
                mask=mask_o[:, None] & mask_p[None, :], other=0.0)  # [BM, BK] dy, o x pixel
    # x is loaded with pixels last (neighbouring addresses in NCHW), then transposed
    xt = tl.load(x_pix[None, :] + offs_c[:, None] * stride_xc,
                 mask=mask_c[:, None] & in_hw[None, :], other=0.0)  # [BN, BK] x, c x pixel
    acc = tl.dot(g, tl.trans(xt), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        if owns_db:
            db_acc += tl.sum(g.to(tl.float32), axis=1)
    return acc, db_acc


# Columns of the micro-batch table read by _conv_dw_kernel, one int64 row per micro-batch.
_MB_X, _MB_DY, _MB_BATCH, _MB_COLS = 0, 1, 2, 3  # _MB_COLS: entries per row


@triton.jit
def _conv_dw_kernel(
    x_ptr,  # x [N, C, H, W] of the single micro-batch; with FROM_TABLE, x_0 (only its dtype is used)
    dy_ptr,  # dy [N, O, OH, OW] likewise
    dw_ptr,  # ACCUMULATE: dW [O, C, KH, KW] added into in its own dtype; else the fp32 workspace [SPLIT, O, C, KH, KW]
    db_ptr,  # ACCUMULATE: db [O]; else the fp32 workspace [SPLIT, O]; used when HAS_BIAS
    mb_table_ptr,  # int64 [num_mb, 3] with FROM_TABLE: x_i address, dy_i address, N_i
    num_mb,  # micro-batches: rows in the table, 1 without it
    N_BATCH,  # batch size of the single micro-batch; with FROM_TABLE, Σ_i N_i (autotune key only)
    O,  # out channels: dW rows
    C,  # in channels: dW columns (per tap)
    H, W,  # input height, width
    OH, OW,  # output height, width
    HW,  # OH·OW, as an argument so that the compiler learns its divisibility by 16 (DY_FLAT)
    stride_xn, stride_xc, stride_xh, stride_xw,  # x strides, shared by every micro-batch
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,  # dy strides, shared by every micro-batch
    stride_dws, stride_dwo, stride_dwc, stride_dwh, stride_dww,  # dw_ptr strides (split, o, c, kh, kw)
    stride_dbs, stride_dbo,  # db_ptr strides (split, o)
    KW: tl.constexpr,  # kernel width (the tap is decoded from the program id)
    STRIDE_H, STRIDE_W,  # conv stride
    PAD_H, PAD_W,  # zero padding above / left of the input
    DIL_H, DIL_W,  # dilation
    SPLIT,  # programs sharing the pixel reduction of one dW tile (grid axis 1)
    HAS_BIAS: tl.constexpr,  # also reduce db
    FROM_TABLE: tl.constexpr,  # read the micro-batches from mb_table_ptr instead of x_ptr / dy_ptr
    ACCUMULATE: tl.constexpr,  # SPLIT == 1: add into dW / db; else overwrite this split's workspace slice
    DY_FLAT: tl.constexpr,  # dy's (oh, ow) are one run of unit stride: walk pixels image by image
    X_FLAT: tl.constexpr,  # with DY_FLAT, x's pixel of output pixel p is p too (1x1, stride 1, no padding)
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    BLOCK_SIZE_M: tl.constexpr,  # dW tile rows: out channels
    BLOCK_SIZE_N: tl.constexpr,  # dW tile columns: in channels
    BLOCK_SIZE_K: tl.constexpr,  # reduction step: output pixels
):
    """dW[o-tile, c-tile, kh, kw] (+)= Σ_i Σ_pixels dy_iᵀ x_i-at-the-tap, over the pixel chunks
    pid_s, pid_s + SPLIT, ... of every micro-batch. Grid: (O tiles · C tiles · KH·KW, SPLIT).
    The programs of in-channel tile 0 at tap (0, 0) also own db[o-tile]."""
    tl.static_assert(BLOCK_SIZE_M >= 16 and BLOCK_SIZE_N >= 16 and BLOCK_SIZE_K >= 16, "tl.dot needs tiles of at least 16")

    pid = tl.program_id(axis=0)
    pid_s = tl.program_id(axis=1)
    num_pid_o = tl.cdiv(O, BLOCK_SIZE_M)
    num_pid_c = tl.cdiv(C, BLOCK_SIZE_N)
    # o-tile fastest: neighbouring programs share the x tile of one (tap, c-tile) in L2
    pid_o = pid % num_pid_o
    pid_c = (pid // num_pid_o) % num_pid_c
    tap = pid // (num_pid_o * num_pid_c)
    kh = tap // KW
    kw = tap % KW
    owns_db = (pid_c == 0) & (tap == 0)  # meaningful only when HAS_BIAS

    offs_o = pid_o * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)  # out channel
    offs_c = pid_c * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)  # in channel
    offs_p = tl.arange(0, BLOCK_SIZE_K)  # output pixel within a chunk
    mask_o = offs_o < O
    mask_c = offs_c < C

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_SIZE_M,), dtype=tl.float32)
    for i in range(num_mb):
        if FROM_TABLE:
            entry = mb_table_ptr + i * 3  # 3 == _MB_COLS; entries in _MB_* order
            x_base = tl.load(entry + 0).to(tl.pointer_type(x_ptr.dtype.element_ty))
            dy_base = tl.load(entry + 1).to(tl.pointer_type(dy_ptr.dtype.element_ty))
            pixels = tl.load(entry + 2).to(tl.int32) * (OH * OW)
        else:
            x_base = x_ptr
            dy_base = dy_ptr
            pixels = N_BATCH * (OH * OW)
        if DY_FLAT:
            # Chunks of BLOCK_SIZE_K pixels inside one image, image by image: chunk g is image
            # g // chunks, pixels (g % chunks)·BLOCK_SIZE_K + [0, BLOCK_SIZE_K). The compiler then
            # sees a dy row of unit stride starting at a multiple of BLOCK_SIZE_K, so the dy tile
            # (and x's with X_FLAT) loads as wide vectors and is pipelined through cp.async; the
            # last chunk of each image is partly masked (the price of that).
            chunks = tl.cdiv(HW, BLOCK_SIZE_K)
            for g_chunk in range(pid_s, (pixels // HW) * chunks, SPLIT):
                n = g_chunk // chunks
                pix = (g_chunk - n * chunks) * BLOCK_SIZE_K + offs_p  # [BK] pixel in the image
                mask_p = pix < HW  # constant over runs of 16 when HW is a multiple of 16
                dy_cols = dy_base + n.to(tl.int64) * stride_dyn + pix  # [BK], unit stride
                if X_FLAT:
                    in_hw = mask_p
                    x_pix = x_base + n.to(tl.int64) * stride_xn + pix
                else:
                    oh = pix // OW
                    ow = pix % OW
                    ih = oh * STRIDE_H - PAD_H + kh * DIL_H
                    iw = ow * STRIDE_W - PAD_W + kw * DIL_W
                    in_hw = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    x_pix = x_base + n.to(tl.int64) * stride_xn + ih * stride_xh + iw * stride_xw  # [BK]
                acc, db_acc = _conv_dw_step(acc, db_acc, dy_cols, x_pix, mask_p, in_hw, offs_o, offs_c, mask_o,
                                            mask_c, stride_dyc, stride_xc, owns_db, HAS_BIAS, INPUT_PRECISION)
        else:
            for p0 in range(pid_s * BLOCK_SIZE_K, pixels, SPLIT * BLOCK_SIZE_K):
                p = p0 + offs_p  # output pixel (n, oh, ow) flattened over the micro-batch
                mask_p = p < pixels
                n = p // (OH * OW)
                pix = p % (OH * OW)
                oh = pix // OW
                ow = pix % OW
                ih = oh * STRIDE_H - PAD_H + kh * DIL_H
                iw = ow * STRIDE_W - PAD_W + kw * DIL_W
                in_hw = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                dy_cols = dy_base + n.to(tl.int64) * stride_dyn + oh * stride_dyh + ow * stride_dyw  # [BK]
                x_pix = x_base + n.to(tl.int64) * stride_xn + ih * stride_xh + iw * stride_xw  # [BK]
                acc, db_acc = _conv_dw_step(acc, db_acc, dy_cols, x_pix, mask_p, in_hw, offs_o, offs_c, mask_o,
                                            mask_c, stride_dyc, stride_xc, owns_db, HAS_BIAS, INPUT_PRECISION)

    if ACCUMULATE:
        split_off = 0
    else:
        split_off = pid_s.to(tl.int64) * stride_dws
    dw_ptrs = (dw_ptr + split_off + kh * stride_dwh + kw * stride_dww
               + offs_o[:, None] * stride_dwo + offs_c[None, :] * stride_dwc)
    mask = mask_o[:, None] & mask_c[None, :]
    if ACCUMULATE:
        acc += tl.load(dw_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        if owns_db:
            if ACCUMULATE:
                db_ptrs = db_ptr + offs_o * stride_dbo
                db_acc += tl.load(db_ptrs, mask=mask_o, other=0.0).to(tl.float32)
            else:
                db_ptrs = db_ptr + pid_s * stride_dbs + offs_o * stride_dbo
            tl.store(db_ptrs, db_acc.to(db_ptr.dtype.element_ty), mask=mask_o)


@triton.jit
def _sum_splits(ws_ptr, out_ptr, offs, mask, out_offs, SPLIT, stride_ws, BLOCK: tl.constexpr):
    """out[out_offs] += Σ_s ws[s, offs] in fp32, s in order (deterministic)."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        total += tl.load(ws_ptr + s * stride_ws + offs, mask=mask, other=0.0)
    old = tl.load(out_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, (old + total).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_dw_reduce_kernel(
    ws_w_ptr,  # fp32 workspace [SPLIT, O, C, KH, KW], contiguous
    ws_b_ptr,  # fp32 workspace [SPLIT, O], contiguous; used when HAS_BIAS
    dw_ptr,  # dW [O, C, KH, KW] accumulated into, in its own dtype
    db_ptr,  # db [O] accumulated into when HAS_BIAS
    O, C,  # out, in channels
    KH, KW,  # kernel height, width
    SPLIT,  # workspace slices to sum
    stride_dwo, stride_dwc, stride_dwh, stride_dww,  # dW strides
    stride_db,  # db stride
    HAS_BIAS: tl.constexpr,  # also reduce db
    BLOCK: tl.constexpr,  # elements per program
):
    """Second pass of split p2: dW += Σ_s ws_w[s] and db += Σ_s ws_b[s]. The first
    cdiv(O·C·KH·KW, BLOCK) programs reduce dW, the rest (when HAS_BIAS) db."""
    pid = tl.program_id(axis=0)
    numel_w = O * C * KH * KW
    num_w_programs = tl.cdiv(numel_w, BLOCK)
    if pid < num_w_programs:
        offs = pid * BLOCK + tl.arange(0, BLOCK)  # flat index into the contiguous workspace slice
        kw = offs % KW
        kh = (offs // KW) % KH
        c = (offs // (KW * KH)) % C
        o = offs // (KW * KH * C)
        out_offs = o * stride_dwo + c * stride_dwc + kh * stride_dwh + kw * stride_dww
        _sum_splits(ws_w_ptr, dw_ptr, offs, offs < numel_w, out_offs, SPLIT, numel_w, BLOCK)
    elif HAS_BIAS:
        offs = (pid - num_w_programs) * BLOCK + tl.arange(0, BLOCK)
        _sum_splits(ws_b_ptr, db_ptr, offs, offs < O, offs * stride_db, SPLIT, O, BLOCK)


_prune_fwd = make_prune(_FWD_TABLE, "x_ptr", by_size=_prune_gemm)
_prune_dx = make_prune(_DX_TABLE, "dy_ptr", by_size=_prune_gemm)
_prune_dw = make_prune(_DW_TABLE, "x_ptr", by_size=_prune_dw_size)
_fwd_tuned = triton.autotune(
    configs=_FWD_TABLE.configs,
    key=["M", "N", "K_CHANNELS", "KH", "KW", "STRIDE_H", "STRIDE_W"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_conv_fwd_kernel)
_dx_tuned = triton.autotune(
    configs=_DX_TABLE.configs,
    key=["M", "N", "K_CHANNELS", "KH", "KW", "STRIDE_H", "STRIDE_W"],
    prune_configs_by={"early_config_prune": _prune_dx},
)(_conv_dx_kernel)
# Autotuning runs the kernel several times; with ACCUMULATE it adds into dW / db, so restore them.
_dw_tuned = triton.autotune(
    configs=_DW_TABLE.configs,
    key=["N_BATCH", "O", "C", "H", "W", "KW", "STRIDE_H", "SPLIT", "FROM_TABLE"],
    prune_configs_by={"early_config_prune": _prune_dw},
    restore_value=["dw_ptr", "db_ptr"],
)(_conv_dw_kernel)


# ----------------------------------------------------------------------------------------
# Geometry and validation helpers
# ----------------------------------------------------------------------------------------


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if (not isinstance(vals, (tuple, list)) or len(vals) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in vals)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(vals) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both dims, got {v!r}")
    return int(vals[0]), int(vals[1])


def _padding4(padding) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from an int, (pad_h, pad_w), or ((top, bottom), (left, right))."""
    if (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(p, (tuple, list)) for p in padding)):
        (top, bottom), (left, right) = _pair("padding[0]", tuple(padding[0]), 0), _pair("padding[1]", tuple(padding[1]), 0)
        return top, bottom, left, right
    if isinstance(padding, str):
        raise TypeError(f"padding {padding!r}: the launchers take explicit ints (pad_h, pad_w) or "
                        "((top, bottom), (left, right)); resolve 'same' / 'valid' first (Conv2dOp does)")
    ph, pw = _pair("padding", padding, 0)
    return ph, ph, pw, pw


def conv2d_output_size(input_hw: tuple[int, int], kernel_hw: tuple[int, int], *, stride, padding,
                       dilation) -> tuple[int, int]:
    """(OH, OW) of a convolution; padding as the launchers take it (ints or per-side pairs)."""
    sh, sw = _pair("stride", stride, 1)
    dh, dw = _pair("dilation", dilation, 1)
    top, bottom, left, right = _padding4(padding)
    (h, w), (kh, kw) = input_hw, kernel_hw
    return (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1


def conv2d_flops(n: int, o: int, c: int, oh: int, ow: int, kh: int, kw: int) -> int:
    """FLOPs of one of the three conv GEMMs (forward, dX or dW): 2·N·OH·OW·O·C·KH·KW.

    A multiply-add counts as two FLOPs; the bias is not counted. For dX with stride > 1
    this is the useful work; the kernel's masked gather issues up to sh·sw times as much.
    """
    return 2 * n * oh * ow * o * c * kh * kw


def _geometry(x_shape, w_shape, stride, padding, dilation, *, what: str):
    """Validated geometry: ((sh, sw), (top, bottom, left, right), (dh, dw), (OH, OW))."""
    sh_sw = _pair("stride", stride, 1)
    dil = _pair("dilation", dilation, 1)
    pad = _padding4(padding)
    n, c, h, w = x_shape
    o, wc, kh, kw = w_shape
    if wc != c:
        hint = (f" (grouped convolution, groups={c // wc}, is not supported: groups must be 1)"
                if wc > 0 and c % wc == 0 and wc != c else "")
        raise ValueError(f"{what}: weight has shape {tuple(w_shape)}, expected [O, {c}, KH, KW] to match the "
                         f"input's {c} channels{hint}")
    oh, ow = conv2d_output_size((h, w), (kh, kw), stride=sh_sw, padding=((pad[0], pad[1]), (pad[2], pad[3])),
                                dilation=dil)
    if oh < 1 or ow < 1 or kh < 1 or kw < 1:
        raise ValueError(f"{what}: input {h}x{w} with padding {pad} (top, bottom, left, right) is smaller than the "
                         f"dilated kernel {kh}x{kw} (dilation {dil}): output would be {oh}x{ow}; pad more or "
                         "use a smaller kernel")
    return sh_sw, pad, dil, (oh, ow)


def _check_out(name: str, out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check_tensor(name, out, len(shape))
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {dtype} (the input dtype)")


_NCHW = " (expected [N, C, H, W]; add a batch dim with x.unsqueeze(0))"
_OCKK = " (expected [out_channels, in_channels, KH, KW])"


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def conv2d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               stride=1, padding=0, dilation=1, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = conv2d(x, W) + b (groups = 1, zero padding), fp32 accumulation, bias in the epilogue.

    Args:
        x: [N, C, H, W] fp16, bf16 or fp32, any strides.
        weight: [O, C, KH, KW], x's dtype, any strides.
        bias: [O], x's dtype, or None.
        stride, dilation: int or (h, w), >= 1.
        padding: int, (pad_h, pad_w), or ((top, bottom), (left, right)) for asymmetric zero padding.
        out: optional [N, O, OH, OW] buffer of x's dtype (any strides) to write y into.

    Returns:
        y [N, O, OH, OW] in x's dtype (``out`` when given, else a new contiguous tensor).
    """
    _check_tensor("x", x, 4, _NCHW)
    _check_tensor("weight", weight, 4, _OCKK)
    if bias is not None:
        _check_tensor("bias", bias, 1, " (expected [out_channels])")
    _check_dtype("x", x, _DTYPES, "supported by the kernels")
    (sh, sw), (top, _, left, _), (dh, dw), (oh, ow) = _geometry(
        x.shape, weight.shape, stride, padding, dilation, what="conv2d_fwd")
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    if bias is not None and bias.shape[0] != o:
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({o},) to match weight of shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    if out is None:
        check_devices("conv", x=x, weight=weight, bias=bias)
        y = torch.empty((n, o, oh, ow), dtype=x.dtype, device=x.device)
    else:
        _check_out("out", out, (n, o, oh, ow), x.dtype)
        check_devices("conv", x=x, weight=weight, bias=bias, out=out)
        y = out
    m = n * oh * ow
    if m == 0 or o == 0:
        return y
    if c == 0:  # an empty sum: y is the bias (or zero)
        y.copy_(bias.view(1, o, 1, 1).expand_as(y)) if bias is not None else y.zero_()
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_SIZE_M"]) * triton.cdiv(o, meta["BLOCK_SIZE_N"]),)

    _fwd_tuned[grid](
        x, weight, bias if bias is not None else y, y,
        m, o, c, h, w, oh, ow,
        *x.stride(), *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *y.stride(),
        kh, kw, sh, sw, top, left, dh, dw,
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    return y


def conv2d_dx(dy: torch.Tensor, weight: torch.Tensor, *, input_shape, stride=1, padding=0,
              dilation=1, out: torch.Tensor | None = None) -> torch.Tensor:
    """p1: dx = the gradient of conv2d's input, as a gather (no atomics), fp32 accumulation.

    Args:
        dy: [N, O, OH, OW] fp16, bf16 or fp32, any strides; OH, OW must be the output size of
            ``input_shape`` under the given geometry.
        weight: [O, C, KH, KW], dy's dtype, any strides.
        input_shape: (N, C, H, W) of the forward's input (several H give the same OH when the
            stride exceeds 1, so it cannot be inferred).
        stride, padding, dilation: as for :func:`conv2d_fwd`.
        out: optional [N, C, H, W] buffer of dy's dtype (any strides) to write dx into.

    Returns:
        dx [N, C, H, W] in dy's dtype (``out`` when given, else a new contiguous tensor).
    """
    _check_tensor("dy", dy, 4, " (expected [N, O, OH, OW])")
    _check_tensor("weight", weight, 4, _OCKK)
    _check_dtype("dy", dy, _DTYPES, "supported by the kernels")
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a sequence of 4 ints (N, C, H, W), got {input_shape!r}") from None
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(f"input_shape must be 4 non-negative ints (N, C, H, W), got {input_shape!r}")
    (sh, sw), (top, _, left, _), (dh, dw), (oh, ow) = _geometry(
        shape, weight.shape, stride, padding, dilation, what="conv2d_dx")
    n, c, h, w = shape
    o, _, kh, kw = weight.shape
    if tuple(dy.shape) != (n, o, oh, ow):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {(n, o, oh, ow)} for input_shape {shape}, "
                         f"weight {tuple(weight.shape)}, stride {stride}, padding {padding}, dilation {dilation}")
    if weight.dtype != dy.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but dy has {dy.dtype}; cast them to one dtype")
    if out is None:
        check_devices("conv", dy=dy, weight=weight)
        dx = torch.empty(shape, dtype=dy.dtype, device=dy.device)
    else:
        _check_out("out", out, shape, dy.dtype)
        check_devices("conv", dy=dy, weight=weight, out=out)
        dx = out
    m = n * h * w
    if m == 0 or c == 0:
        return dx
    if o == 0:
        return dx.zero_()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_SIZE_M"]) * triton.cdiv(c, meta["BLOCK_SIZE_N"]),)

    _dx_tuned[grid](
        dy, weight, dx,
        m, c, o, h, w, oh, ow,
        *dy.stride(), *weight.stride(), *dx.stride(),
        kh, kw, sh, sw, top, left, dh, dw,
        INPUT_PRECISION=_input_precision(dy.dtype),
    )
    return dx


def _shared_strides(name: str, tensors: list[torch.Tensor]) -> tuple[int, ...]:
    """One set of strides valid for every micro-batch, or a ValueError naming the fix.

    A dim of size 1 is only ever indexed at 0, so its stride does not matter; the batch
    dim's size may differ between micro-batches, so its stride comes from one of size > 1.
    """
    ref = list(tensors[0].stride())
    for d in range(4):
        for t in tensors:
            if t.shape[d] > 1:
                ref[d] = t.stride(d)
                break
    for i, t in enumerate(tensors):
        for d in range(4):
            if t.shape[d] > 1 and t.stride(d) != ref[d]:
                label = name if len(tensors) == 1 else f"{name}[{i}]"
                raise ValueError(f"{label} has strides {t.stride()} but another micro-batch has {tuple(ref)}; the "
                                 f"batched kernel reads every micro-batch with one set of strides: pass "
                                 f".contiguous() tensors for all of them")
    return tuple(ref)


def _dw_flat_layout(x_strides, dy_strides, hw, ohw, khw, stride, pad_tl) -> tuple[bool, bool]:
    """(DY_FLAT, X_FLAT) of _conv_dw_kernel: walk pixels image by image, as one unit-stride run
    (vector loads, cp.async), when dy's (oh, ow) are one such run of a multiple of 16 pixels
    (what Triton's argument specialisation can tell the compiler: ResNet's 56x56 and 28x28
    maps, not 14x14 or 7x7); x's too when the conv is 1x1, stride 1, unpadded (x's pixel is
    dy's pixel)."""
    (h, w), (oh, ow) = hw, ohw
    dy_flat = dy_strides[3] == 1 and dy_strides[2] == ow and (oh * ow) % 16 == 0
    x_flat = (dy_flat and tuple(khw) == (1, 1) and tuple(stride) == (1, 1) and tuple(pad_tl) == (0, 0)
              and (h, w) == (oh, ow) and x_strides[3] == 1 and x_strides[2] == w)
    return dy_flat, x_flat


def _pick_split(o: int, c: int, taps: int, max_pixels: int, device: torch.device) -> int:
    """Programs per dW tile: enough to give every SM about two programs, each reducing at
    least 512 pixels; 1 when the weight alone fills the GPU (or under the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(o, 64) * triton.cdiv(c, 64) * taps  # at a typical 64x64 tile
    want = triton.cdiv(2 * sms, tiles)
    return max(1, min(want, 64, triton.cdiv(max_pixels, 512)))


def conv2d_dw(x: torch.Tensor | Sequence[torch.Tensor], dy: torch.Tensor | Sequence[torch.Tensor],
              dweight: torch.Tensor, dbias: torch.Tensor | None = None, *, stride=1, padding=0,
              dilation=1, split: int | None = None) -> None:
    """p2: dW += Σ_i Σ_pixels dy_i ⋆ x_i and db += Σ_i Σ_pixels dy_i, over k micro-batches in one launch.

    Args:
        x: x [N, C, H, W], or a sequence of k micro-batches x_i [N_i, C, H, W] (batch sizes may
            differ). All must share one set of strides (any contiguous NCHW or channels-last
            tensors of the same C, H, W do); they are not concatenated.
        dy: dy [N, O, OH, OW], or a sequence of dy_i [N_i, O, OH, OW] matching ``x``; x's dtype,
            one set of strides likewise.
        dweight: [O, C, KH, KW] gradient accumulated into, in x's dtype or fp32, any strides.
        dbias: [O] gradient accumulated into, in x's dtype or fp32, or None to skip db.
        stride, padding, dilation: as for :func:`conv2d_fwd`.
        split: programs sharing one dW tile's pixel reduction (>= 1); None picks it from the
            problem size and the GPU (see the module docstring). Any value gives the same
            result up to summation order.
    """
    xs, dys = _as_list("x", x), _as_list("dy", dy)
    if isinstance(x, torch.Tensor) != isinstance(dy, torch.Tensor):
        raise TypeError("x and dy must both be tensors or both be sequences of tensors")
    if len(xs) != len(dys):
        raise ValueError(f"x has {len(xs)} micro-batches but dy has {len(dys)}; pass one dy per x")
    if not xs:
        raise ValueError("x and dy are empty sequences; pass at least one micro-batch")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise ValueError(f"split must be a positive int or None (automatic), got {split!r}")
    _check_tensor("dweight", dweight, 4, _OCKK)
    o, c, kh, kw = dweight.shape
    single = isinstance(x, torch.Tensor)
    geometry = None
    for i, (xi, dyi) in enumerate(zip(xs, dys)):
        sx, sdy = ("x", "dy") if single else (f"x[{i}]", f"dy[{i}]")
        _check_tensor(sx, xi, 4, _NCHW)
        _check_tensor(sdy, dyi, 4, " (expected [N, O, OH, OW])")
        geometry = _geometry(xi.shape, dweight.shape, stride, padding, dilation, what="conv2d_dw")
        oh, ow = geometry[3]
        expect = (xi.shape[0], o, oh, ow)
        if tuple(dyi.shape) != expect:
            raise ValueError(f"{sdy} has shape {tuple(dyi.shape)}, expected {expect} to match {sx} of shape "
                             f"{tuple(xi.shape)}, dweight {tuple(dweight.shape)} and the conv geometry")
        _check_dtype(sx, xi, _DTYPES, "supported by the kernels")
        if xi.dtype != xs[0].dtype or dyi.dtype != xs[0].dtype:
            raise TypeError(f"{sx} has dtype {xi.dtype} and {sdy} has {dyi.dtype}, expected {xs[0].dtype} "
                            "for every x and dy; cast them to one dtype")
        if xi.shape[1:] != xs[0].shape[1:]:
            raise ValueError(f"{sx} has shape {tuple(xi.shape)} but x[0] has {tuple(xs[0].shape)}; micro-batches "
                             "may differ in batch size only")
    (sh, sw), (top, _, left, _), (dh, dw), (oh, ow) = geometry
    dtype = xs[0].dtype
    grad_dtypes = (dtype, torch.float32)
    _check_dtype("dweight", dweight, grad_dtypes, "the input dtype or fp32 master gradients")
    if dbias is not None:
        _check_tensor("dbias", dbias, 1, " (expected [out_channels])")
        if dbias.shape[0] != o:
            raise ValueError(f"dbias has shape {tuple(dbias.shape)}, expected ({o},) to match dweight of shape "
                             f"{tuple(dweight.shape)}")
        _check_dtype("dbias", dbias, grad_dtypes, "the input dtype or fp32 master gradients")
    device = check_devices("conv", dweight=dweight, dbias=dbias, **{f"x[{i}]": t for i, t in enumerate(xs)},
                            **{f"dy[{i}]": t for i, t in enumerate(dys)})

    live = [(xi, dyi) for xi, dyi in zip(xs, dys) if xi.shape[0] > 0]
    if not live or o == 0 or c == 0:
        return  # nothing to add
    x_strides = _shared_strides("x", [xi for xi, _ in live])
    dy_strides = _shared_strides("dy", [dyi for _, dyi in live])
    h, w = xs[0].shape[2:]
    batch_total = sum(xi.shape[0] for xi, _ in live)
    max_pixels = max(xi.shape[0] for xi, _ in live) * oh * ow
    split = split if split is not None else _pick_split(o, c, kh * kw, max_pixels, device)

    x0, dy0 = live[0]
    if len(live) == 1:
        table = None
    else:
        rows = [[xi.data_ptr(), dyi.data_ptr(), xi.shape[0]] for xi, dyi in live]
        table = _device_table(rows, device)  # [num_mb, _MB_COLS]

    accumulate = split == 1
    if accumulate:
        out_w, out_b = dweight, dbias
        w_strides = (0, *dweight.stride())
        b_strides = (0, dbias.stride(0) if dbias is not None else 0)
    else:
        out_w = torch.empty((split, o, c, kh, kw), dtype=torch.float32, device=device)  # every element written
        out_b = torch.empty((split, o), dtype=torch.float32, device=device) if dbias is not None else None
        w_strides = out_w.stride()
        b_strides = out_b.stride() if out_b is not None else (0, 0)

    dy_flat, x_flat = _dw_flat_layout(x_strides, dy_strides, (h, w), (oh, ow), (kh, kw), (sh, sw), (top, left))

    def grid(meta):
        return (triton.cdiv(o, meta["BLOCK_SIZE_M"]) * triton.cdiv(c, meta["BLOCK_SIZE_N"]) * kh * kw, split)

    _dw_tuned[grid](
        x0, dy0, out_w, out_b if out_b is not None else out_w,
        table if table is not None else out_w, len(live),
        x0.shape[0] if table is None else batch_total,
        o, c, h, w, oh, ow, oh * ow,
        *x_strides, *dy_strides,
        *w_strides, *b_strides,
        kw, sh, sw, top, left, dh, dw,
        split,
        HAS_BIAS=dbias is not None,
        FROM_TABLE=table is not None,
        ACCUMULATE=accumulate,
        DY_FLAT=dy_flat,
        X_FLAT=x_flat,
        INPUT_PRECISION=_input_precision(dtype),
    )
    if not accumulate:
        programs = triton.cdiv(o * c * kh * kw, _REDUCE_BLOCK) + (triton.cdiv(o, _REDUCE_BLOCK) if dbias is not None else 0)
        _conv_dw_reduce_kernel[(programs,)](
            out_w, out_b if out_b is not None else out_w, dweight, dbias if dbias is not None else dweight,
            o, c, kh, kw, split,
            *dweight.stride(), dbias.stride(0) if dbias is not None else 0,
            HAS_BIAS=dbias is not None,
            BLOCK=_REDUCE_BLOCK,
        )
