"""Depthwise causal conv1d over time (Mamba's short convolution) for 2BP: forward, p1 (dX)
and p2 (dW, db) as separately launchable kernels.

Math
----
Channels-last x [b, L, C] (unit channel stride; batch and time strides free, so a slice of a
wider projection is read in place), weight W [C, K] (nn.Conv1d's [C, 1, K] with the middle
dim dropped), bias b [C]; time runs over t, and x_t = 0 for t < 0:

    forward   y[t, c] = b[c] + Σ_k W[c, k] x[t - (K-1) + k, c]
    p1        dx[t, c] = Σ_k W[c, k] dy[t + (K-1) - k, c]           (dy_t = 0 for t >= L)
    p2        dW[c, k] += Σ_mb Σ_{b,t} dy[t, c] x[t - (K-1) + k, c]   db[c] += Σ_mb Σ_{b,t} dy[t, c]

Each output is a [BLOCK_T, BLOCK_C] tile: K shifted loads of the input (the shifted rows hit
L1/L2), K FMAs per element, fp32 accumulation. Forward and p1 cost 2·K·b·L·C FLOPs and read
~ one input and write one output: memory-bound.

p2 is a reduction over every row of every micro-batch into a [C, K] weight: a program owns
BLOCK_C channels and walks all rows of all micro-batches (read from an int64 table of base
addresses, row counts and strides, so batched p2 is one launch and nothing is concatenated),
accumulating dW and db in fp32 registers, then adds them into the fp32 accumulators it alone
owns. Deterministic (no atomics); parallelism is C / BLOCK_C programs (128 at C = 4096), each
streaming b·L rows: fine for a weight of 4 taps per channel, whose p2 costs one read of x and dy.

Everything here is plain functions on tensors: no autograd, no modules, no global state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import DTYPES as _DTYPES, INTERPRET as _INTERPRET, check_devices, check_dtype, device_table

__all__ = ["MAX_TAPS", "causal_conv1d_fwd", "causal_conv1d_dx", "causal_conv1d_dw"]

MAX_TAPS = 16  #: most taps K the kernels unroll

if _INTERPRET:
    _BLOCK_T, _BLOCK_C, _DW_BLOCK_T, _WARPS = 16, 16, 16, 1  # small tiles: the tests' odd shapes leave ragged edges
else:
    # forward / p1: a 32 x 32 fp32 accumulator, 8 values per thread, and K shifted loads in flight;
    # p2: [16 steps, K taps, 32 channels] of x per step of the row walk. ptxas for sm_90 / sm_80: no
    # spills in fp16 / bf16 even without alignment hints (tests/kernels/test_scan_compile.py).
    _BLOCK_T, _BLOCK_C, _DW_BLOCK_T, _WARPS = 32, 32, 16, 4

_MB_COLS = 6  # table row: x address, dy address, batch, L, x batch stride, x time stride


@triton.jit
def _fwd_kernel(
    x_ptr,  # x [b, L, C], unit channel stride
    w_ptr,  # W [C, K] contiguous
    bias_ptr,  # b [C] (unused without HAS_BIAS)
    y_ptr,  # out: y [b, L, C] contiguous, x's dtype
    L, C,
    stride_xb, stride_xt,  # x's batch and time strides
    K: tl.constexpr,  # taps
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        src = t - (K - 1) + k  # the input step tap k reads
        m = ((src >= 0) & (src < L))[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + b * stride_xb + src.to(tl.int64)[:, None] * stride_xt + c[None, :], mask=m, other=0.0)
        w = tl.load(w_ptr + c * K + k, mask=mask_c, other=0.0).to(tl.float32)
        acc += w[None, :] * x.to(tl.float32)
    m = (t < L)[:, None] & mask_c[None, :]
    tl.store(y_ptr + (b * L + t.to(tl.int64)[:, None]) * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dx_kernel(
    dy_ptr,  # dy [b, L, C] contiguous
    w_ptr,  # W [C, K] contiguous
    dx_ptr,  # out: dx [b, L, C] contiguous, dy's dtype
    L, C,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        dst = t + (K - 1) - k  # the output step that read x_t through tap k
        m = (dst < L)[:, None] & mask_c[None, :]
        dy = tl.load(dy_ptr + (b * L + dst.to(tl.int64)[:, None]) * C + c[None, :], mask=m, other=0.0)
        w = tl.load(w_ptr + c * K + k, mask=mask_c, other=0.0).to(tl.float32)
        acc += w[None, :] * dy.to(tl.float32)
    m = (t < L)[:, None] & mask_c[None, :]
    tl.store(dx_ptr + (b * L + t.to(tl.int64)[:, None]) * C + c[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dw_kernel(
    table_ptr,  # int64 [num_mb, 6]: x address, dy address, batch, L, x batch stride, x time stride
    num_mb,  # micro-batches: rows of the table
    x_ptr, dy_ptr,  # micro-batch 0's x and dy: give the element types of the table's addresses
    dw_ptr,  # fp32 [C, K]: accumulated into (this program owns its channels' rows)
    db_ptr,  # fp32 [C]: accumulated into (unused without HAS_BIAS)
    C,
    K: tl.constexpr, BLOCK_K: tl.constexpr,  # taps, next_pow2(taps)
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    offs_k = tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    acc_w = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, num_mb):
        entry = table_ptr + i * 6  # 6 == _MB_COLS
        x_base = tl.load(entry + 0).to(tl.pointer_type(x_ptr.dtype.element_ty))
        dy_base = tl.load(entry + 1).to(tl.pointer_type(dy_ptr.dtype.element_ty))
        n_b = tl.load(entry + 2)
        L = tl.load(entry + 3)
        sxb = tl.load(entry + 4)
        sxt = tl.load(entry + 5)
        for b in range(0, n_b):
            for t0 in range(0, L, BLOCK_T):
                t = t0 + offs_t
                dy = tl.load(dy_base + (b * L + t[:, None]) * C + c[None, :], mask=(t < L)[:, None] & mask_c[None, :],
                             other=0.0).to(tl.float32)  # [BT, BC]
                src = t[:, None, None] - (K - 1) + offs_k[None, :, None]  # [BT, BK, 1]: the step tap k read
                m = (src >= 0) & (src < L) & (offs_k < K)[None, :, None] & mask_c[None, None, :]
                x = tl.load(x_base + b * sxb + src * sxt + c[None, None, :], mask=m, other=0.0).to(tl.float32)
                acc_w += tl.sum(dy[:, None, :] * x, axis=0)
                if HAS_BIAS:
                    acc_b += tl.sum(dy, axis=0)
    m = (offs_k < K)[:, None] & mask_c[None, :]
    ptrs = dw_ptr + c[None, :] * K + offs_k[:, None]
    tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + acc_w, mask=m)
    if HAS_BIAS:
        tl.store(db_ptr + c, tl.load(db_ptr + c, mask=mask_c, other=0.0) + acc_b, mask=mask_c)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _check_x(name: str, x: torch.Tensor, C: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"causal_conv1d: {name} must be [b, L, C], got {getattr(x, 'shape', type(x).__name__)}")
    check_dtype(f"causal_conv1d: {name}", x, _DTYPES, "the Triton kernels take fp16/bf16/fp32")
    if x.shape[2] != C:
        raise ValueError(f"causal_conv1d: {name} has {x.shape[2]} channels (shape {tuple(x.shape)}), weight has {C}")
    if x.stride(2) != 1 and C > 1:
        raise ValueError(f"causal_conv1d: {name} needs unit channel stride, got strides {x.stride()}; "
                         f"pass {name}.contiguous()")


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """W as [C, K] contiguous, from [C, 1, K] or [C, K]."""
    if weight.dim() not in (2, 3) or (weight.dim() == 3 and weight.shape[1] != 1):
        raise ValueError(f"causal_conv1d: weight must be [C, 1, K] (depthwise) or [C, K], got {tuple(weight.shape)}")
    w = weight.reshape(weight.shape[0], weight.shape[-1])
    if w.shape[1] > MAX_TAPS:
        raise ValueError(f"causal_conv1d: {w.shape[1]} taps is above MAX_TAPS={MAX_TAPS}; use the torch reference")
    return w.contiguous()


def causal_conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [b, L, C] = the causal depthwise conv of x [b, L, C] with W [C, 1, K] (+ bias [C])."""
    w = _taps(weight)
    C, K = w.shape
    _check_x("x", x, C)
    check_devices("causal_conv1d", x=x, weight=w, bias=bias)
    b, L, _ = x.shape
    y = torch.empty((b, L, C), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    grid = (triton.cdiv(L, _BLOCK_T), triton.cdiv(C, _BLOCK_C), b)
    _fwd_kernel[grid](x, w, bias if bias is not None else w, y, L, C, x.stride(0), x.stride(1), K=K,
                      HAS_BIAS=bias is not None, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, num_warps=_WARPS)
    return y


def causal_conv1d_dx(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """p1: dx [b, L, C] from dy [b, L, C] and W (no saved activation needed)."""
    w = _taps(weight)
    C, K = w.shape
    dy = dy.contiguous()
    _check_x("dy", dy, C)
    check_devices("causal_conv1d", dy=dy, weight=w)
    b, L, _ = dy.shape
    dx = torch.empty_like(dy)
    if dx.numel() == 0:
        return dx
    grid = (triton.cdiv(L, _BLOCK_T), triton.cdiv(C, _BLOCK_C), b)
    _dx_kernel[grid](dy, w, dx, L, C, K=K, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, num_warps=_WARPS)
    return dx


def causal_conv1d_dw(xs: Sequence[torch.Tensor] | torch.Tensor, dys: Sequence[torch.Tensor] | torch.Tensor,
                     dweight: torch.Tensor | None, dbias: torch.Tensor | None) -> None:
    """p2: dW [C, 1, K] += Σ_mb Σ dy x_shifted and db [C] += Σ_mb Σ dy, over every micro-batch
    in one launch; summed in fp32 and added once, in the gradients' own dtypes."""
    xs = [xs] if isinstance(xs, torch.Tensor) else list(xs)
    dys = [dys] if isinstance(dys, torch.Tensor) else list(dys)
    if len(xs) != len(dys) or not xs:
        raise ValueError(f"causal_conv1d_dw: needs as many x as dy (one per micro-batch), got {len(xs)} and {len(dys)}")
    if dweight is None and dbias is None:
        return
    if dweight is None:  # db alone: a plain row sum, no kernel needed
        dbias.add_(sum(dy.sum((0, 1), dtype=torch.float32) for dy in dys).to(dbias.dtype))
        return
    C, K = dweight.shape[0], dweight.shape[-1]
    dys = [dy.contiguous() for dy in dys]
    for i, (x, dy) in enumerate(zip(xs, dys)):
        _check_x(f"xs[{i}]", x, C)
        _check_x(f"dys[{i}]", dy, C)
        if x.shape != dy.shape or x.dtype != xs[0].dtype or dy.dtype != dys[0].dtype:
            raise ValueError(f"causal_conv1d_dw: micro-batch {i}: x {tuple(x.shape)} {x.dtype} and dy "
                             f"{tuple(dy.shape)} {dy.dtype} must match each other and micro-batch 0's dtypes")
    device = check_devices("causal_conv1d", x=xs[0], dweight=dweight)
    if K > MAX_TAPS:
        raise ValueError(f"causal_conv1d: {K} taps is above MAX_TAPS={MAX_TAPS}; use the torch reference")
    acc_w = torch.zeros((C, K), device=device, dtype=torch.float32)
    acc_b = torch.zeros((C,), device=device, dtype=torch.float32) if dbias is not None else acc_w
    table = device_table([[x.data_ptr(), dy.data_ptr(), x.shape[0], x.shape[1], x.stride(0), x.stride(1)]
                          for x, dy in zip(xs, dys)], device)
    _dw_kernel[(triton.cdiv(C, _BLOCK_C),)](table, len(xs), xs[0], dys[0], acc_w, acc_b, C, K=K,
                                            BLOCK_K=triton.next_power_of_2(K), HAS_BIAS=dbias is not None,
                                            BLOCK_T=_DW_BLOCK_T, BLOCK_C=_BLOCK_C, num_warps=_WARPS)
    dweight.add_(acc_w.view(dweight.shape).to(dweight.dtype))
    if dbias is not None:
        dbias.add_(acc_b.to(dbias.dtype))
