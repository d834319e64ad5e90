"""LayerNorm and RMSNorm for 2BP: forward, p1 (dX) and p2 (dγ, dβ) as separately launchable kernels.

Math
----
X [M, N] (callers' leading dims flattened into the M rows; N is the normalized last dim),
γ (weight) [N], β (bias) [N]. Per row m, in fp32:

    LayerNorm   μ_m = (1/N) Σ_n X[m, n]          σ²_m = (1/N) Σ_n (X[m, n] - μ_m)²
                rstd_m = 1 / sqrt(σ²_m + eps)    X̂ = (X - μ) · rstd
    RMSNorm     μ_m = 0 (not stored)             rstd_m = 1 / sqrt((1/N) Σ_n X[m, n]² + eps)
                X̂ = X · rstd

    forward   Y = X̂ · γ + β                   (γ, β optional; RMSNorm has no β)
              saves μ [M] and rstd [M] in fp32 next to X.

    p1        G = dY · γ                       (G = dY without γ)
              c1_m = (1/N) Σ_n X̂[m, n] G[m, n]    c2_m = (1/N) Σ_n G[m, n]   (c2 = 0 for RMSNorm)
              dX = rstd · (G - c2 - X̂ · c1)

    p2        dγ += Σ_i Σ_rows dY_i · X̂_i     dβ += Σ_i Σ_rows dY_i
              over k pending micro-batches i = 1..k, X̂_i recomputed from (X_i, μ_i, rstd_i).

X̂ is recomputed from X in p1 and p2 instead of being stored: X is usually alive anyway (it is
the residual stream or the previous layer's output), while X̂ would be a second activation-sized
tensor held from forward until p2.

Cost (s = bytes per element of X; all three kernels are memory-bound):

    forward   reads X, writes Y:        bytes ≈ 2·M·N·s + 8·M     FLOPs ≈ 8·M·N (LayerNorm)
    p1        reads X, dY, writes dX:   bytes ≈ 3·M·N·s + 8·M     FLOPs ≈ 11·M·N
    p2        reads X, dY:              bytes ≈ 2·M·N·s + 8·M     FLOPs ≈ 4·M·N
              plus P·N·4 bytes of fp32 partial sums written and read once.

Design
------
- Forward and p1 hold whole rows in registers: one program normalizes a [BLOCK_M, BLOCK_N]
  tile, BLOCK_N = next_power_of_2(N), BLOCK_M rows at a time when N is small (so a program
  still moves a few thousand elements). That bounds N: rows up to :data:`MAX_HIDDEN` columns;
  longer rows raise a ValueError (they would need a looped two-pass kernel that re-reads X).
- p2 is a deterministic two-stage reduction over rows, with no atomics and no locks:
  ``_norm_dw_partial_kernel`` runs a grid of P x cdiv(N, BLOCK_N) programs; program (p, j)
  owns columns j and sums dY·X̂ (and dY) over the row tiles p, p + P, p + 2P, ... of the
  concatenation of all micro-batches, in fp32, into row p of a [P, N] partial buffer.
  ``_norm_dw_reduce_kernel`` then sums the P partial rows in a fixed order and adds the
  result into dγ (and dβ), reading and writing them in their own dtype (the input dtype, or
  fp32 master gradients). The summation order depends only on the shapes and P, so a rerun
  gives bit-identical gradients. P is a few programs per SM divided among the column blocks.
- Batched p2 does not concatenate: with k > 1 micro-batches the launcher writes an int64
  table on the device holding, per micro-batch, the addresses of X_i, dY_i, μ_i, rstd_i,
  the row count M_i and both row strides; the kernel walks the table. The global tile
  numbering runs on across micro-batches, so the programs stay balanced whatever the M_i.
  On CUDA the table is copied from pinned memory without blocking the host.
- Forward and p1 are autotuned over num_warps only (the tile follows from N). p2's
  kernels accumulate into the caller's gradients, so they are not autotuned (a trial run
  would add twice); their tiles are fixed.

Everything here is plain functions on tensors: no autograd, no modules, and no state
besides Triton's autotune caches and a per-device SM count.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import DTYPES as _DTYPES, INTERPRET as _INTERPRET, as_list, device_table as _device_table
from ._targets import max_configs

__all__ = [
    "MAX_HIDDEN",
    "layer_norm_fwd",
    "layer_norm_dx",
    "layer_norm_dw",
    "rms_norm_fwd",
    "rms_norm_dx",
    "rms_norm_dw",
]


#: Longest normalized dim the kernels take. Forward and p1 keep a whole row (as fp32) in
#: registers; at 16384 columns that is 32 fp32 values per thread per row-sized temporary with
#: 16 warps (ptxas for sm_80 / sm_90: 128 registers, no spills, in fp32 and fp16).
MAX_HIDDEN = 16384

# ----------------------------------------------------------------------------------------
# Tiles and configs
# ----------------------------------------------------------------------------------------

if _INTERPRET:
    # The interpreter pays per program, not per element: big tiles, one config, no autotuning.
    # The caps still leave several programs (and a ragged last one) on the tests' small shapes.
    _ROW_TILE = 4096  # target elements per forward / p1 program
    _ROW_BLOCK_CAP = 16  # most rows per forward / p1 program
    _ROW_CONFIGS = [triton.Config({}, num_warps=1)]
    _DW_BLOCK_M, _DW_BLOCK_N, _DW_WARPS = 16, 256, 1  # p2 row tile and column block
    _DW_PROGRAMS = 2  # row-programs P: exercises the two-stage reduction
    _RED_BLOCK_P, _RED_BLOCK_N, _RED_WARPS = 4, 256, 1  # stage 2: partial rows per step, columns
else:
    # Hopper / Ampere. A program moves >= 2048 elements; num_warps is tuned per N.
    _ROW_TILE = 2048
    _ROW_BLOCK_CAP = 64
    _ROW_CONFIGS = [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]
    # p2: two 32 x 128 fp32 accumulators over 8 warps = 16 registers per thread each
    # (ptxas for sm_90: 128 registers, no spills; 4 warps needed ~200).
    _DW_BLOCK_M, _DW_BLOCK_N, _DW_WARPS = 32, 128, 8
    _DW_PROGRAMS = None  # from the SM count, see _dw_programs
    _RED_BLOCK_P, _RED_BLOCK_N, _RED_WARPS = 32, 128, 4

_DW_PROGRAMS_PER_SM = 8  # p2 programs per SM, over all column blocks: hides load latency


def _row_blocks(n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward / p1 tile for rows of n columns."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(_ROW_BLOCK_CAP, _ROW_TILE // block_n))
    return block_m, block_n


def _prune_warps(configs, named_args, **kwargs):
    """Keep num_warps giving 4..64 tile elements per thread (fewer wastes threads, more spills).

    Falls back to the config closest to that range so the list is never empty.
    """
    meta = {**named_args, **kwargs}  # the block sizes are call kwargs
    tile = meta["BLOCK_M"] * meta["BLOCK_N"]
    kept = [c for c in configs if 4 <= tile // (32 * c.num_warps) <= 64]
    if not kept:
        return [min(configs, key=lambda c: abs(tile // (32 * c.num_warps) - 16))]
    cap = max_configs()  # TWOBP_AUTOTUNE_MAX_CONFIGS (bench/gpu_check.sh): the middle ones first
    if cap:
        kept.sort(key=lambda c: abs(tile // (32 * c.num_warps) - 16))
        return kept[:cap]
    return kept


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _dw_programs(device: torch.device, total_tiles: int, col_blocks: int) -> int:
    """P, the row-programs of p2: a few per SM shared among the column blocks, at most one
    per row tile."""
    if _DW_PROGRAMS is not None:
        p = _DW_PROGRAMS
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        p = triton.cdiv(_DW_PROGRAMS_PER_SM * _sm_count(index), col_blocks)
    return max(1, min(p, total_tiles))


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _norm_fwd_kernel(
    x_ptr,  # X [M, N] input; unit column stride
    y_ptr,  # Y [M, N] output, X's dtype; unit column stride
    w_ptr,  # γ [N], contiguous; read when HAS_WEIGHT, any valid pointer otherwise
    b_ptr,  # β [N], contiguous; read when HAS_BIAS, any valid pointer otherwise
    mean_ptr,  # μ [M] fp32 output; written unless IS_RMS
    rstd_ptr,  # rstd [M] fp32 output
    stride_xm,  # X row stride, in elements
    stride_ym,  # Y row stride, in elements
    M,  # rows
    N,  # normalized length (columns)
    eps,  # added to the variance (LayerNorm) or the mean square (RMSNorm) before the sqrt
    IS_RMS: tl.constexpr,  # RMSNorm: no centring, no μ
    HAS_WEIGHT: tl.constexpr,  # scale by γ
    HAS_BIAS: tl.constexpr,  # add β
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program: the whole row, next_power_of_2(N)
):
    """Y = X̂ γ + β and the row statistics, for BLOCK_M rows per program."""
    tl.static_assert(BLOCK_M * BLOCK_N <= 65536, "a tile is held in registers: keep it small")
    tl.static_assert(IS_RMS == 0 or HAS_BIAS == 0, "RMSNorm has no bias")

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.arange(0, BLOCK_N)  # [BN]
    mask_m = rows < M
    mask_n = cols < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows64 = rows.to(tl.int64)  # row offsets of large tensors overflow int32

    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N  # [BM]
        xc = tl.where(mask, x - mean[:, None], 0.0)  # padding stays 0 so it adds nothing below
        tl.store(mean_ptr + rows, mean, mask=mask_m)
    var = tl.sum(xc * xc, axis=1) / N  # σ² (LayerNorm) or mean square (RMSNorm)
    rstd = tl.rsqrt(var + eps)
    tl.store(rstd_ptr + rows, rstd, mask=mask_m)

    y = xc * rstd[:, None]  # X̂
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_dx_kernel(
    dy_ptr,  # dY [M, N]; unit column stride
    x_ptr,  # X [M, N] saved by the forward; unit column stride
    w_ptr,  # γ [N], contiguous; read when HAS_WEIGHT, any valid pointer otherwise
    mean_ptr,  # μ [M] fp32; read unless IS_RMS
    rstd_ptr,  # rstd [M] fp32
    dx_ptr,  # dX [M, N] output, X's dtype; unit column stride
    stride_dym,  # dY row stride, in elements
    stride_xm,  # X row stride, in elements
    stride_dxm,  # dX row stride, in elements
    M,  # rows
    N,  # normalized length (columns)
    IS_RMS: tl.constexpr,  # RMSNorm: no centring term (c2 = 0)
    HAS_WEIGHT: tl.constexpr,  # G = dY γ (else G = dY)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program: the whole row, next_power_of_2(N)
):
    """p1: dX = rstd (G - c2 - X̂ c1) with G = dY γ, c1 = mean(X̂ G), c2 = mean(G)."""
    tl.static_assert(BLOCK_M * BLOCK_N <= 65536, "a tile is held in registers: keep it small")

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.arange(0, BLOCK_N)  # [BN]
    mask_m = rows < M
    mask_n = cols < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
        g = dy * w[None, :]
    else:
        g = dy
    c1 = tl.sum(xhat * g, axis=1) / N  # [BM]
    if IS_RMS:
        dx = (g - xhat * c1[:, None]) * rstd[:, None]
    else:
        c2 = tl.sum(g, axis=1) / N  # [BM]
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
    tl.store(dx_ptr + rows64[:, None] * stride_dxm + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# Columns of the micro-batch table read by _norm_dw_partial_kernel, one int64 row per micro-batch.
_MB_X, _MB_DY, _MB_MEAN, _MB_RSTD, _MB_ROWS, _MB_STRIDE_XM, _MB_STRIDE_DYM = range(7)
_MB_COLS = 7


@triton.jit
def _norm_dw_partial_kernel(
    x_ptr,  # X [M, N] of the single micro-batch; with FROM_TABLE, X_0 (only its dtype is used)
    dy_ptr,  # dY [M, N] likewise
    mean_ptr,  # μ [M] fp32 likewise (unused when IS_RMS)
    rstd_ptr,  # rstd [M] fp32 likewise
    mb_table_ptr,  # int64 [num_mb, 7] with FROM_TABLE: addresses of X_i, dY_i, μ_i, rstd_i; M_i; row strides of X_i, dY_i
    part_w_ptr,  # [P, N] fp32 output: row p = Σ dY X̂ over program p's row tiles (when HAS_DW)
    part_b_ptr,  # [P, N] fp32 output: row p = Σ dY over program p's row tiles (when HAS_DB)
    num_mb,  # micro-batches: rows of the table, 1 without it
    M,  # rows of the single micro-batch; unused with FROM_TABLE
    N,  # normalized length (columns)
    stride_xm,  # X row stride (single micro-batch), in elements
    stride_dym,  # dY row stride (single micro-batch), in elements
    IS_RMS: tl.constexpr,  # X̂ = X rstd (no μ)
    HAS_DW: tl.constexpr,  # reduce dY X̂ (reads X, μ, rstd)
    HAS_DB: tl.constexpr,  # reduce dY
    FROM_TABLE: tl.constexpr,  # read the micro-batches from mb_table_ptr
    TABLE_ALIGNED: tl.constexpr,  # all table addresses 16-byte aligned, all row strides multiples of 16
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per program
):
    """p2, stage 1: program (p, j) sums over the row tiles t ≡ p (mod P) of all micro-batches,
    numbered on across micro-batches, for the columns of block j."""
    tl.static_assert(HAS_DW or HAS_DB, "nothing to reduce")
    tl.static_assert(FROM_TABLE or not TABLE_ALIGNED, "TABLE_ALIGNED describes the table")

    pid_p = tl.program_id(0)
    num_p = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = cols < N
    offs_m = tl.arange(0, BLOCK_M)  # [BM]

    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tiles_before = tl.zeros((), dtype=tl.int64)  # row tiles in the micro-batches already walked
    for i in range(num_mb):
        if FROM_TABLE:
            entry = mb_table_ptr + i * 7  # 7 == _MB_COLS; entries in _MB_* order
            x_base = tl.load(entry + 0).to(tl.pointer_type(x_ptr.dtype.element_ty))
            dy_base = tl.load(entry + 1).to(tl.pointer_type(dy_ptr.dtype.element_ty))
            mean_base = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
            rstd_base = tl.load(entry + 3).to(tl.pointer_type(tl.float32))
            rows_i = tl.load(entry + 4)
            sxm = tl.load(entry + 5)
            sdym = tl.load(entry + 6)
            if TABLE_ALIGNED:
                # What Triton's argument specialisation would tell the compiler for plain
                # arguments; the launcher checked it. Lets the loads vectorize.
                x_base = tl.multiple_of(x_base, 16)
                dy_base = tl.multiple_of(dy_base, 16)
                mean_base = tl.multiple_of(mean_base, 16)
                rstd_base = tl.multiple_of(rstd_base, 16)
                sxm = tl.multiple_of(sxm, 16)
                sdym = tl.multiple_of(sdym, 16)
        else:
            x_base = x_ptr
            dy_base = dy_ptr
            mean_base = mean_ptr
            rstd_base = rstd_ptr
            rows_i = tl.cast(M, tl.int64)  # tl.cast: Triton may pass 1-valued ints as constexprs
            sxm = tl.cast(stride_xm, tl.int64)
            sdym = tl.cast(stride_dym, tl.int64)
        n_tiles = tl.cdiv(rows_i, BLOCK_M)
        # Global tile g = tiles_before + t belongs to program g mod P: this program's first t.
        first = (pid_p - tiles_before % num_p + num_p) % num_p
        for t in range(first, n_tiles, num_p):
            rows = t * BLOCK_M + offs_m  # [BM] int64
            mask_m = rows < rows_i
            mask = mask_m[:, None] & mask_n[None, :]
            dy = tl.load(dy_base + rows[:, None] * sdym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_DW:
                x = tl.load(x_base + rows[:, None] * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_base + rows, mask=mask_m, other=0.0)
                if IS_RMS:
                    xhat = x * rstd[:, None]
                else:
                    mean = tl.load(mean_base + rows, mask=mask_m, other=0.0)
                    xhat = (x - mean[:, None]) * rstd[:, None]  # dY = 0 where masked
                acc_w += dy * xhat
            if HAS_DB:
                acc_b += dy
        tiles_before += n_tiles

    part_offs = pid_p.to(tl.int64) * N + cols
    if HAS_DW:
        tl.store(part_w_ptr + part_offs, tl.sum(acc_w, axis=0), mask=mask_n)
    if HAS_DB:
        tl.store(part_b_ptr + part_offs, tl.sum(acc_b, axis=0), mask=mask_n)


@triton.jit
def _norm_dw_reduce_kernel(
    part_ptr,  # [P, N] fp32 partial sums from _norm_dw_partial_kernel
    grad_ptr,  # [N] gradient accumulated into (read, add, write) in its own dtype; contiguous
    P,  # partial rows
    N,  # columns
    BLOCK_P: tl.constexpr,  # partial rows per step
    BLOCK_N: tl.constexpr,  # columns per program
):
    """p2, stage 2: grad[j] += Σ_p part[p, j], always in the same order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + offs_p
        mask = (rows < P)[:, None] & mask_n[None, :]
        acc += tl.load(part_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    old = tl.load(grad_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(grad_ptr + cols, (old + total).to(grad_ptr.dtype.element_ty), mask=mask_n)


_ROW_AUTOTUNE = dict(configs=_ROW_CONFIGS, key=["N", "IS_RMS", "BLOCK_M", "BLOCK_N"],
                     prune_configs_by={"early_config_prune": _prune_warps})
_fwd_tuned = triton.autotune(**_ROW_AUTOTUNE)(_norm_fwd_kernel)
_dx_tuned = triton.autotune(**_ROW_AUTOTUNE)(_norm_dx_kernel)


# ----------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------


def _check_device(where: str, **tensors: torch.Tensor | None) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        on = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{where}: all tensors must be on one device, got {on}; move them with .to(device)")
    device = next(iter(devices))
    if device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
        raise ValueError(
            f"{where}: tensors are on {device}: the Triton norm kernels need CUDA tensors, or CPU tensors "
            "with TRITON_INTERPRET=1 set before triton is imported (otherwise use the torch reference "
            "in twobp.ops.norm)")
    return device


def _check_input(where: str, name: str, x) -> tuple[torch.Tensor, int]:
    """x as [M, N] with unit column stride (a view when possible), and N."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{where}: {name} must have at least 1 dim (the normalized one), got a scalar")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{where}: {name} has dtype {x.dtype}; the kernels take float16, bfloat16 or float32")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{where}: {name} has shape {tuple(x.shape)}; the normalized (last) dim must be >= 1")
    if n > MAX_HIDDEN:
        raise ValueError(
            f"{where}: {name} has last dim {n}, above the {MAX_HIDDEN} columns these kernels hold in "
            f"registers (twobp.kernels.norm.MAX_HIDDEN); use the torch reference backend "
            "(twobp.use_backend('torch')) for longer rows")
    x2 = x.reshape(-1, n)
    if x2.stride(1) != 1 and n > 1:
        x2 = x2.contiguous()
    return x2, n


def _check_vector(where: str, name: str, t, n: int) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected ({n},) to match the last dim of x")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{where}: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{where}: {name} has stride {t.stride()}; pass {name}.contiguous()")


def _check_stats(where: str, name: str, t, m: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (m,):
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected ({m},): one value per row of x, "
                         "as returned by the forward")
    if t.dtype != torch.float32:
        raise TypeError(f"{where}: {name} has dtype {t.dtype}, expected torch.float32 (as returned by the forward)")
    if m > 1 and t.stride(0) != 1:
        raise ValueError(f"{where}: {name} has stride {t.stride()}; pass {name}.contiguous()")


def _check_eps(where: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{where}: eps must be a float, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"{where}: eps must be finite and >= 0, got {eps!r}")
    return eps


def _check_dy(where: str, dy, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(dy, torch.Tensor):
        raise TypeError(f"{where}: dy must be a torch.Tensor, got {type(dy).__name__}")
    if dy.shape != x.shape:
        raise ValueError(f"{where}: dy has shape {tuple(dy.shape)}, expected x's shape {tuple(x.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"{where}: dy has dtype {dy.dtype} but x has {x.dtype}; cast them to one dtype")
    dy2 = dy.reshape(-1, x.shape[-1])
    if dy2.stride(1) != 1 and x.shape[-1] > 1:
        dy2 = dy2.contiguous()
    return dy2


# ----------------------------------------------------------------------------------------
# Launchers: forward and p1
# ----------------------------------------------------------------------------------------


def _fwd(where: str, x, weight, bias, eps, is_rms: bool):
    x2, n = _check_input(where, "x", x)
    _check_vector(where, "weight", weight, n)
    _check_vector(where, "bias", bias, n)
    eps = _check_eps(where, eps)
    _check_device(where, x=x, weight=weight, bias=bias)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = None if is_rms else torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    y2 = y.view(-1, n)
    block_m, block_n = _row_blocks(n)
    _fwd_tuned[(triton.cdiv(m, block_m),)](
        x2, y2, weight if weight is not None else x2, bias if bias is not None else x2,
        mean if mean is not None else rstd, rstd,
        x2.stride(0), y2.stride(0), m, n, eps,
        IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return y, mean, rstd


def _dx(where: str, dy, x, weight, mean, rstd, is_rms: bool) -> torch.Tensor:
    x2, n = _check_input(where, "x", x)
    dy2 = _check_dy(where, dy, x)
    _check_vector(where, "weight", weight, n)
    m = x2.shape[0]
    if not is_rms:
        _check_stats(where, "mean", mean, m)
    _check_stats(where, "rstd", rstd, m)
    _check_device(where, dy=dy, x=x, weight=weight, mean=mean, rstd=rstd)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0:
        return dx
    dx2 = dx.view(-1, n)
    block_m, block_n = _row_blocks(n)
    _dx_tuned[(triton.cdiv(m, block_m),)](
        dy2, x2, weight if weight is not None else x2, mean if mean is not None else rstd, rstd, dx2,
        dy2.stride(0), x2.stride(0), dx2.stride(0), m, n,
        IS_RMS=is_rms, HAS_WEIGHT=weight is not None,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return dx


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim: Y = (X - μ) rstd γ + β.

    Args:
        x: [..., N] fp16, bf16 or fp32, N <= MAX_HIDDEN; rows = all leading dims (M of them).
        weight: γ [N] (any of the three dtypes) or None.
        bias: β [N] or None.
        eps: added to the variance.

    Returns:
        (Y in x's shape and dtype, μ [M] fp32, rstd [M] fp32).
    """
    y, mean, rstd = _fwd("layer_norm_fwd", x, weight, bias, eps, is_rms=False)
    return y, mean, rstd


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim: Y = X rstd γ with rstd = 1 / sqrt(mean(X²) + eps).

    Args:
        x: [..., N] fp16, bf16 or fp32, N <= MAX_HIDDEN; rows = all leading dims (M of them).
        weight: γ [N] or None.
        eps: added to the mean square.

    Returns:
        (Y in x's shape and dtype, rstd [M] fp32).
    """
    y, _, rstd = _fwd("rms_norm_fwd", x, weight, None, eps, is_rms=True)
    return y, rstd


def layer_norm_dx(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                  rstd: torch.Tensor) -> torch.Tensor:
    """p1 of LayerNorm: dX = rstd (G - mean(G) - X̂ mean(G X̂)), G = dY γ.

    Args:
        dy: [..., N] in x's shape and dtype.
        x: the forward's input.
        weight: γ [N] or None.
        mean, rstd: [M] fp32 from :func:`layer_norm_fwd`.

    Returns:
        dX in x's shape and dtype.
    """
    return _dx("layer_norm_dx", dy, x, weight, mean, rstd, is_rms=False)


def rms_norm_dx(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                rstd: torch.Tensor) -> torch.Tensor:
    """p1 of RMSNorm: dX = rstd (G - X̂ mean(G X̂)), G = dY γ, X̂ = X rstd.

    Args:
        dy: [..., N] in x's shape and dtype.
        x: the forward's input.
        weight: γ [N] or None.
        rstd: [M] fp32 from :func:`rms_norm_fwd`.

    Returns:
        dX in x's shape and dtype.
    """
    return _dx("rms_norm_dx", dy, x, weight, None, rstd, is_rms=True)


# ----------------------------------------------------------------------------------------
# Launchers: p2
# ----------------------------------------------------------------------------------------


def _check_grad(where: str, name: str, g, n: int, dtype: torch.dtype) -> None:
    if g is None:
        return
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(g).__name__}")
    if tuple(g.shape) != (n,):
        raise ValueError(f"{where}: {name} has shape {tuple(g.shape)}, expected ({n},) to match the last dim of x")
    if g.dtype not in (dtype, torch.float32):
        raise TypeError(f"{where}: {name} has dtype {g.dtype}, expected {dtype} (x's) or torch.float32 "
                        "(master gradients)")
    if n > 1 and g.stride(0) != 1:
        raise ValueError(f"{where}: {name} has stride {g.stride()}; accumulate into a contiguous buffer")


def _dw(where: str, x, dy, mean, rstd, dweight, dbias, is_rms: bool) -> None:
    single = isinstance(x, torch.Tensor)
    xs, dys, rstds = (as_list(f"{where}: {name}", v) for name, v in (("x", x), ("dy", dy), ("rstd", rstd)))
    means = [None] * len(xs) if is_rms else as_list(f"{where}: mean", mean)
    given = [isinstance(v, torch.Tensor) for v in ((x, dy, rstd) if is_rms else (x, dy, mean, rstd))]
    if any(given) and not all(given):
        raise TypeError(f"{where}: pass all of x, dy, {'' if is_rms else 'mean, '}rstd as tensors (one "
                        "micro-batch) or all as sequences (one entry per micro-batch)")
    if not xs:
        raise ValueError(f"{where}: x is an empty sequence; pass at least one micro-batch")
    for name, seq in (("dy", dys), ("mean", means), ("rstd", rstds)):
        if len(seq) != len(xs):
            raise ValueError(f"{where}: x has {len(xs)} micro-batches but {name} has {len(seq)}; pass one per x")

    entries = []  # (x2, dy2, mean, rstd) per micro-batch, validated
    n = dtype = None
    for i, (xi, dyi, mi, ri) in enumerate(zip(xs, dys, means, rstds)):
        sfx = "" if single else f"[{i}]"
        x2, ni = _check_input(where, f"x{sfx}", xi)
        if n is None:
            n, dtype = ni, xi.dtype
        elif ni != n:
            raise ValueError(f"{where}: x{sfx} has last dim {ni} but x[0] has {n}; every micro-batch must "
                             "have the same normalized size")
        if xi.dtype != dtype:
            raise TypeError(f"{where}: x{sfx} has dtype {xi.dtype} but x[0] has {dtype}; cast them to one dtype")
        dy2 = _check_dy(where, dyi, xi)
        m = x2.shape[0]
        if not is_rms:
            _check_stats(where, f"mean{sfx}", mi, m)
        _check_stats(where, f"rstd{sfx}", ri, m)
        entries.append((x2, dy2, mi, ri))
    _check_grad(where, "dweight", dweight, n, dtype)
    _check_grad(where, "dbias", dbias, n, dtype)
    tensors = {"dweight": dweight, "dbias": dbias}
    for i, (x2, dy2, mi, ri) in enumerate(entries):
        tensors.update({f"x[{i}]": x2, f"dy[{i}]": dy2, f"mean[{i}]": mi, f"rstd[{i}]": ri})
    device = _check_device(where, **tensors)

    if dweight is None and dbias is None:
        return  # no parameter to accumulate into (elementwise_affine=False, or frozen)
    live = [e for e in entries if e[0].shape[0] > 0]
    if not live:
        return  # no rows: nothing to add

    total_tiles = sum(triton.cdiv(e[0].shape[0], _DW_BLOCK_M) for e in live)
    col_blocks = triton.cdiv(n, _DW_BLOCK_N)
    p = _dw_programs(device, total_tiles, col_blocks)
    part_w = torch.empty((p, n), dtype=torch.float32, device=device) if dweight is not None else None
    part_b = torch.empty((p, n), dtype=torch.float32, device=device) if dbias is not None else None

    x0, dy0, m0, r0 = live[0]
    m0 = m0 if m0 is not None else r0
    table, aligned = None, False
    if len(live) > 1:
        rows = [[x2.data_ptr(), dy2.data_ptr(), (mi if mi is not None else ri).data_ptr(), ri.data_ptr(),
                 x2.shape[0], x2.stride(0), dy2.stride(0)] for x2, dy2, mi, ri in live]
        table = _device_table(rows, device)  # [num_mb, _MB_COLS]
        aligned = all(r[c] % 16 == 0 for r in rows
                      for c in (_MB_X, _MB_DY, _MB_MEAN, _MB_RSTD, _MB_STRIDE_XM, _MB_STRIDE_DYM))

    any_part = part_w if part_w is not None else part_b
    _norm_dw_partial_kernel[(p, col_blocks)](
        x0, dy0, m0, r0, table if table is not None else r0,
        part_w if part_w is not None else any_part, part_b if part_b is not None else any_part,
        len(live), x0.shape[0], n, x0.stride(0), dy0.stride(0),
        IS_RMS=is_rms, HAS_DW=dweight is not None, HAS_DB=dbias is not None,
        FROM_TABLE=table is not None, TABLE_ALIGNED=aligned,
        BLOCK_M=_DW_BLOCK_M, BLOCK_N=_DW_BLOCK_N, num_warps=_DW_WARPS,
    )
    for part, grad in ((part_w, dweight), (part_b, dbias)):
        if grad is not None:
            _norm_dw_reduce_kernel[(triton.cdiv(n, _RED_BLOCK_N),)](
                part, grad, p, n, BLOCK_P=_RED_BLOCK_P, BLOCK_N=_RED_BLOCK_N, num_warps=_RED_WARPS,
            )


def layer_norm_dw(x: torch.Tensor | Sequence[torch.Tensor], dy: torch.Tensor | Sequence[torch.Tensor],
                  mean: torch.Tensor | Sequence[torch.Tensor], rstd: torch.Tensor | Sequence[torch.Tensor],
                  dweight: torch.Tensor | None, dbias: torch.Tensor | None) -> None:
    """p2 of LayerNorm: dγ += Σ_i Σ_rows dY_i X̂_i and dβ += Σ_i Σ_rows dY_i, in one pass.

    Args:
        x: X [..., N] of one micro-batch, or a sequence of k micro-batches (row counts may
            differ); read in place, never concatenated.
        dy: dY matching ``x`` (a tensor or a sequence of k), in x's dtype.
        mean, rstd: [M_i] fp32 from :func:`layer_norm_fwd`, matching ``x``.
        dweight: dγ [N] accumulated into, in x's dtype or fp32; None skips it.
        dbias: dβ [N] likewise.

    The reduction is deterministic (fixed order, no atomics). With both gradients None
    nothing is launched.
    """
    _dw("layer_norm_dw", x, dy, mean, rstd, dweight, dbias, is_rms=False)


def rms_norm_dw(x: torch.Tensor | Sequence[torch.Tensor], dy: torch.Tensor | Sequence[torch.Tensor],
                rstd: torch.Tensor | Sequence[torch.Tensor], dweight: torch.Tensor | None) -> None:
    """p2 of RMSNorm: dγ += Σ_i Σ_rows dY_i X_i rstd_i, in one pass.

    Args:
        x: X [..., N] of one micro-batch, or a sequence of k micro-batches.
        dy: dY matching ``x``, in x's dtype.
        rstd: [M_i] fp32 from :func:`rms_norm_fwd`, matching ``x``.
        dweight: dγ [N] accumulated into, in x's dtype or fp32; None: nothing is launched.
    """
    _dw("rms_norm_dw", x, dy, None, rstd, dweight, None, is_rms=True)
