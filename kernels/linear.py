"""Linear layer for 2BP: forward, p1 (dX) and p2 (dW, db) as separately launchable Triton kernels.

Math
----
X [M, K] (callers flatten leading dims into M), W [N, K], b [N]; Y and dY are [M, N].

    forward   Y  = X Wᵀ + b          Y[m, n]   = Σ_k X[m, k] W[n, k] + b[n]
    p1        dX = dY W              dX[m, k]  = Σ_n dY[m, n] W[n, k]
    p2        dW += dYᵀ X            dW[n, k] += Σ_m dY[m, n] X[m, k]
              db += Σ_m dY[m, :]     db[n]    += Σ_m dY[m, n]

p1 sits on the critical path of the pipeline (the previous stage waits for dX); p2 can be
deferred and run once for k micro-batches i = 1..k with M_i rows each:

    dW += Σ_i dY_iᵀ X_i = [dY_1; ...; dY_k]ᵀ [X_1; ...; X_k]

which is one GEMM whose reduction runs over all Σ_i M_i rows, without forming the
concatenation.

Cost: each of the three GEMMs is 2·M·N·K FLOPs (`linear_flops`); the bias adds M·N to the
forward and to p2, which the FLOP count ignores, as is usual.

Precision: every kernel accumulates in fp32. The forward and dX write in the input dtype.
dW and db are read, added to and written back in their own dtype, which may be the
input dtype or fp32 (mixed-precision master gradients). fp32 inputs use exact fp32 products
("ieee") unless `torch.backends.cuda.matmul.allow_tf32` is set, as torch's matmul does.

Design
------
- Forward and dX are the same GEMM, C = A B (+ bias), `_matmul_kernel`, given A and B by
  strides (forward: A = X, B = Wᵀ; dX: A = dY, B = W), so no transposed copy of W exists.
  The two get separate autotuners: dX is latency-critical, so its config list leans to
  smaller tiles (more programs, fuller SMs for a single micro-batch).
- dW is output-stationary: each program owns one [BLOCK_SIZE_N, BLOCK_SIZE_K] tile of dW,
  loops over every row of every micro-batch with the tile in fp32 registers, then does a
  single read-add-write of its tile. Deterministic, no atomics, no workspace, and the
  gradient buffer needs no zeroing. Trade-off: the parallelism is only
  cdiv(N, BLOCK_SIZE_N) · cdiv(K, BLOCK_SIZE_K) programs whatever M is. For a small
  weight and many rows (N = K = 1024 at 128² tiles is 64 programs on 132 SMs) a split over
  rows ("split-K") would fill the GPU better, but needs fp32 atomics (non-deterministic) or
  a workspace plus a second reduction pass. The config list includes 64-wide tiles for that
  case instead.
- db is fused into the dW kernel: the programs of the first column block of dW
  (pid_k == 0) load every dY tile of their n-slice anyway, so they also sum its rows and
  own db[n-slice]; no two programs write the same db element, so no atomics. Those programs
  run a second copy of the row loop that carries the row sum, so the others pay nothing.
- Batched p2 does not concatenate: the launcher writes an int64 table on the device with,
  per micro-batch, the addresses of x_i and dy_i, the row count M_i and both row strides;
  the kernel's outer loop walks the table and the inner loop the rows. Each x_i and dy_i
  must be 2-D with unit column stride. When every address and row stride is 16-aligned the
  kernel tells the compiler so (tl.multiple_of), which keeps 16-byte vector loads; without
  that hint the compiled loads fall back to one element each. The table is a small
  non-blocking host-to-device copy per call (so this path is not CUDA-graph capturable);
  one micro-batch skips the table entirely.

- On Hopper (sm_90), for fp16/bf16 operands whose rows TMA can describe (16-byte aligned
  base and row stride, unit column stride), the three launchers run the persistent TMA
  kernels of :mod:`.linear_tma` instead (``tma=None``, the default); ``tma=False`` forces
  the kernels here, ``tma=True`` the TMA ones (also under the interpreter, which is how the
  CPU tests run them).
- Configs: per launch class (architecture, dtype class; see :mod:`._targets`), each list
  checked by the AOT sweep for spills, shared memory and wgmma (bench/results/aot-sweep.md).

Everything here is plain functions on tensors: no autograd, no modules, and no state
besides Triton's autotune caches.
"""

from __future__ import annotations

import contextlib
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
from . import linear_tma as _tma
from ._targets import ConfigTable, arch_of, make_prune
from ._tiles import grouped_tile as _grouped_tile

__all__ = ["linear_fwd", "linear_dx", "linear_dw", "linear_flops"]




def linear_flops(m: int, n: int, k: int) -> int:
    """FLOPs of one of the three linear GEMMs (forward, dX or dW): 2·m·n·k.

    A multiply-add counts as two FLOPs; the bias (m·n adds) is not counted.
    """
    return 2 * m * n * k


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, bk: int, group: int, warps: int, stages: int, group_name="GROUP_SIZE_M"):
    return triton.Config(
        {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, group_name: group},
        num_warps=warps,
        num_stages=stages,
    )


# Interpreter: one config each, so the autotuner never benchmarks on the CPU. The tiles are
# small and deliberately not square, so a swapped stride or mask shows up as a wrong answer,
# and GROUP_SIZE 2 exercises the grouped order with ragged groups.
_INTERPRET_FWD = [_cfg(32, 16, 32, 2, 4, 1)]
_INTERPRET_DX = [_cfg(16, 32, 32, 2, 4, 1)]
_INTERPRET_DW = [_cfg(32, 32, 16, 2, 4, 1, "GROUP_SIZE_N")]

# Candidates per launch class (kernels/_targets.py), best first at the model shapes: when the
# GPU check caps autotuning (TWOBP_AUTOTUNE_MAX_CONFIGS) the first ones are timed. Every config
# is checked by the AOT sweep (bench/results/aot-sweep.md): no spills, shared memory within the
# target's limit, wgmma on sm_90 in 16-bit. Findings behind the lists:
# - a 32-row tile (32x64x128, decode-sized batches) compiles to mma.sync on sm_90 (wgmma needs
#   64 rows per warpgroup), so it is an sm_80-only config;
# - exact fp32 ("ieee", no tensor cores) multiplies in registers: on sm_80 every 16-bit-sized
#   tile spills (up to 6 KB), 16-deep or 32-deep K steps do not;
# - a dW tile with fp32 master gradients holds the fp32 accumulator and the fp32 gradient
#   tile at once in the epilogue: 128x256 and 4-warp 128x128 tiles spill, so they are dropped.
_FWD_16_SM90 = [
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 8, 4),
    _cfg(256, 128, 64, 8, 8, 3),
    _cfg(128, 128, 32, 8, 4, 4),
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 128, 64, 8, 4, 4),
    _cfg(64, 64, 64, 8, 4, 4),
]
_FWD_16_SM80 = [
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 8, 4),
    _cfg(256, 128, 64, 8, 8, 3),
    _cfg(128, 128, 32, 8, 4, 4),
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 64, 64, 8, 4, 4),  # (64x128x64 with 4 warps spills 8 bytes on sm_80)
    _cfg(32, 64, 128, 8, 4, 4),  # few rows (M <= 32): decode-sized batches
]
# dX is on the critical path: medium tiles first, which give more programs per micro-batch.
_DX_16_SM90 = [
    _cfg(128, 128, 64, 8, 8, 4),
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(128, 128, 32, 8, 4, 4),
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 128, 64, 8, 4, 4),
    _cfg(64, 64, 64, 8, 4, 4),
    _cfg(64, 64, 32, 8, 4, 5),
]
_DX_16_SM80 = _DX_16_SM90 + [_cfg(32, 64, 128, 8, 4, 4)]
_FP32_SM90 = [  # exact products: FMA, no tensor cores
    _cfg(128, 128, 64, 8, 8, 4),
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 128, 64, 8, 4, 4),
    _cfg(64, 64, 64, 8, 4, 4),
]
_FP32_SM80 = [
    _cfg(128, 128, 16, 8, 8, 3),
    _cfg(128, 64, 16, 8, 8, 3),
    _cfg(64, 128, 16, 8, 8, 3),
    _cfg(64, 64, 16, 8, 4, 4),
    _cfg(32, 64, 32, 8, 4, 3),
]
# dW: BLOCK_SIZE_M is the reduction block (rows); the output tile is BLOCK_SIZE_N x BLOCK_SIZE_K.
_DW_NARROW = [  # clean everywhere in 16-bit, fp32 gradients included
    _cfg(64, 128, 128, 8, 8, 4, "GROUP_SIZE_N"),
    _cfg(64, 128, 64, 8, 4, 4, "GROUP_SIZE_N"),
    _cfg(64, 64, 128, 8, 4, 4, "GROUP_SIZE_N"),
    _cfg(64, 64, 64, 8, 4, 4, "GROUP_SIZE_N"),
]
_DW_16_SM90 = [
    _cfg(64, 128, 256, 8, 8, 3, "GROUP_SIZE_N"),
    _cfg(64, 256, 128, 8, 8, 3, "GROUP_SIZE_N"),
    *_DW_NARROW,
    _cfg(32, 128, 128, 8, 4, 4, "GROUP_SIZE_N"),
]
_DW_FP32_SM90 = [
    _cfg(64, 128, 64, 8, 8, 3, "GROUP_SIZE_N"),
    _cfg(32, 128, 64, 8, 8, 3, "GROUP_SIZE_N"),
    _cfg(64, 64, 64, 8, 8, 3, "GROUP_SIZE_N"),
    _cfg(16, 128, 64, 8, 8, 3, "GROUP_SIZE_N"),
    _cfg(64, 64, 64, 8, 4, 4, "GROUP_SIZE_N"),
    _cfg(32, 64, 64, 8, 4, 3, "GROUP_SIZE_N"),
]
_DW_FP32_SM80 = [
    _cfg(16, 128, 128, 8, 8, 3, "GROUP_SIZE_N"),
    _cfg(16, 128, 64, 8, 8, 3, "GROUP_SIZE_N"),
    _cfg(32, 64, 64, 8, 4, 3, "GROUP_SIZE_N"),
    _cfg(16, 64, 64, 8, 4, 4, "GROUP_SIZE_N"),
]
_FWD_TABLE = ConfigTable({("sm_90", "16-bit"): _FWD_16_SM90, ("sm_80", "16-bit"): _FWD_16_SM80,
                          ("sm_90", "fp32"): _FP32_SM90, ("sm_80", "fp32"): _FP32_SM80},
                         _INTERPRET_FWD if _INTERPRET else None)
_DX_TABLE = ConfigTable({("sm_90", "16-bit"): _DX_16_SM90, ("sm_80", "16-bit"): _DX_16_SM80,
                         ("sm_90", "fp32"): _FP32_SM90, ("sm_80", "fp32"): _FP32_SM80},
                        _INTERPRET_DX if _INTERPRET else None)
_DW_TABLE = ConfigTable({("sm_90", "16-bit", "input-grad"): _DW_16_SM90, ("sm_80", "16-bit", "input-grad"): _DW_NARROW,
                         ("sm_90", "16-bit", "fp32-grad"): _DW_NARROW, ("sm_80", "16-bit", "fp32-grad"): _DW_NARROW,
                         ("sm_90", "fp32", "input-grad"): _DW_FP32_SM90, ("sm_80", "fp32", "input-grad"): _DW_FP32_SM80},
                        _INTERPRET_DW if _INTERPRET else None)


def _prune_by_size(configs, named_args):
    """Drop configs whose tile is far larger than the problem (saves autotuning time).

    A block may exceed its dimension by less than 2x (the next power of two), with 32 as the
    floor so small problems keep a choice. Keeps at least the smallest config.
    """
    dims = {name: named_args[dim] for name, dim in (("BLOCK_SIZE_M", "M"), ("BLOCK_SIZE_N", "N"), ("BLOCK_SIZE_K", "K"))}
    kept = [
        c for c in configs
        if all(c.kwargs[name] <= max(32, triton.next_power_of_2(dim)) for name, dim in dims.items())
    ]
    if kept:
        return kept
    return [min(configs, key=lambda c: c.kwargs["BLOCK_SIZE_M"] * c.kwargs["BLOCK_SIZE_N"] * c.kwargs["BLOCK_SIZE_K"])]


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: only fp32 operands have a choice; follow torch's TF32 switch."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _matmul_kernel(
    a_ptr,  # A [M, K]: X for the forward, dY for dX
    b_ptr,  # B [K, N]: Wᵀ for the forward, W for dX (a strided view, never copied)
    c_ptr,  # C [M, N] output: Y or dX, written in its own dtype
    bias_ptr,  # bias [N], added to C when HAS_BIAS; any valid pointer otherwise
    M,  # rows of A and C
    N,  # columns of B and C
    K,  # reduction length: columns of A, rows of B
    stride_am, stride_ak,  # A strides, in elements
    stride_bk, stride_bn,  # B strides
    stride_cm, stride_cn,  # C strides
    stride_bias,  # bias stride
    HAS_BIAS: tl.constexpr,  # add bias in the epilogue
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    BLOCK_SIZE_M: tl.constexpr,  # C tile rows
    BLOCK_SIZE_N: tl.constexpr,  # C tile columns
    BLOCK_SIZE_K: tl.constexpr,  # reduction step
    GROUP_SIZE_M: tl.constexpr,  # row blocks per group in the tile order
):
    """C = A B (+ bias), fp32 accumulation. One program per [BLOCK_SIZE_M, BLOCK_SIZE_N] tile of C.

    In this kernel's names C[M, N] = A[M, K] B[K, N]. linear_fwd maps (M, N, K) to the
    linear's (M, N, K); linear_dx maps it to (M, K, N).
    """
    tl.static_assert(BLOCK_SIZE_M >= 16 and BLOCK_SIZE_N >= 16 and BLOCK_SIZE_K >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(GROUP_SIZE_M >= 1, "GROUP_SIZE_M counts row blocks")

    pid = tl.program_id(axis=0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_SIZE_M), tl.cdiv(N, BLOCK_SIZE_N), GROUP_SIZE_M)

    # Offsets inside the tile stay small; the tile origin is int64 so huge tensors cannot overflow.
    offs_m = tl.arange(0, BLOCK_SIZE_M)
    offs_n = tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    row0 = pid_m * BLOCK_SIZE_M
    col0 = pid_n * BLOCK_SIZE_N
    mask_m = offs_m < M - row0
    mask_n = offs_n < N - col0
    a_ptrs = a_ptr + row0.to(tl.int64) * stride_am + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + col0.to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # [BK, BN]

    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_SIZE_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + (col0 + offs_n) * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    c_ptrs = c_ptr + row0.to(tl.int64) * stride_cm + col0.to(tl.int64) * stride_cn
    c_ptrs += offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Columns of the micro-batch table read by _dw_kernel, one int64 row per micro-batch.
_MB_X, _MB_DY, _MB_ROWS, _MB_STRIDE_XM, _MB_STRIDE_DYM, _MB_COLS = 0, 1, 2, 3, 4, 5  # _MB_COLS: entries per row


@triton.jit
def _dw_rows(
    x_ptr, dy_ptr, mb_table_ptr, num_mb, M, stride_xm, stride_dym,  # as in _dw_kernel
    n0,  # first output feature of the tile (dW row)
    k0,  # first input feature of the tile (dW column)
    mask_n,  # [BLOCK_SIZE_N] n0 + offs_n < N
    mask_k,  # [BLOCK_SIZE_K] k0 + offs_k < K
    FROM_TABLE: tl.constexpr, TABLE_ALIGNED: tl.constexpr,  # as in _dw_kernel
    WITH_DB: tl.constexpr,  # also sum the dY rows (the programs that own db)
    INPUT_PRECISION: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,  # as in _dw_kernel
    BLOCK_SIZE_K: tl.constexpr,
):
    """Reduce over every row of every micro-batch: returns (Σ dY[:, n-tile]ᵀ X[:, k-tile],
    Σ_rows dY[:, n-tile]), the second only when WITH_DB (zeros otherwise)."""
    offs_m = tl.arange(0, BLOCK_SIZE_M)
    offs_n = tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_K), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_SIZE_N,), dtype=tl.float32)
    for i in range(num_mb):
        if FROM_TABLE:
            entry = mb_table_ptr + i * 5  # 5 == _MB_COLS; entries in _MB_* order
            x_base = tl.load(entry + 0).to(tl.pointer_type(x_ptr.dtype.element_ty))
            dy_base = tl.load(entry + 1).to(tl.pointer_type(dy_ptr.dtype.element_ty))
            rows = tl.load(entry + 2)
            sxm = tl.load(entry + 3)
            sdym = tl.load(entry + 4)
            if TABLE_ALIGNED:
                # The launcher checked what Triton's argument specialisation would have told the
                # compiler for plain arguments: 16-byte aligned bases, row strides multiple of 16.
                x_base = tl.multiple_of(x_base, 16)
                dy_base = tl.multiple_of(dy_base, 16)
                sxm = tl.multiple_of(sxm, 16)
                sdym = tl.multiple_of(sdym, 16)
        else:
            x_base = x_ptr
            dy_base = dy_ptr
            rows = M
            sxm = stride_xm
            sdym = stride_dym
        x_ptrs = x_base + k0 + offs_m[:, None] * sxm + offs_k[None, :]  # [BM, BK]
        dy_ptrs = dy_base + n0 + offs_m[:, None] * sdym + offs_n[None, :]  # [BM, BN]
        for m0 in range(0, rows, BLOCK_SIZE_M):
            mask_m = offs_m < rows - m0
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)  # [BN, BM] @ [BM, BK]
            if WITH_DB:
                db_acc += tl.sum(dy.to(tl.float32), axis=0)
            x_ptrs += BLOCK_SIZE_M * sxm
            dy_ptrs += BLOCK_SIZE_M * sdym
    return acc, db_acc


@triton.jit
def _dw_kernel(
    x_ptr,  # X [M, K] of the single micro-batch; with FROM_TABLE, x_0 (only its dtype is used)
    dy_ptr,  # dY [M, N] likewise
    dw_ptr,  # dW [N, K], accumulated into (read, add, write) in its own dtype
    db_ptr,  # db [N], accumulated into when HAS_BIAS; any valid pointer otherwise
    mb_table_ptr,  # int64 [num_mb, 5] with FROM_TABLE: x_i address, dy_i address, M_i, x_i row stride, dy_i row stride
    num_mb,  # micro-batches: rows in the table, 1 without it
    M,  # rows of the single micro-batch; with FROM_TABLE, Σ_i M_i (used only as an autotune key)
    N,  # output features: rows of dW
    K,  # input features: columns of dW
    stride_xm,  # X row stride (its column stride is 1); unused with FROM_TABLE
    stride_dym,  # dY row stride (its column stride is 1); unused with FROM_TABLE
    stride_dwn, stride_dwk,  # dW strides
    stride_db,  # db stride
    HAS_BIAS: tl.constexpr,  # also accumulate db
    FROM_TABLE: tl.constexpr,  # read the micro-batches from mb_table_ptr instead of x_ptr / dy_ptr
    TABLE_ALIGNED: tl.constexpr,  # every table address is 16-byte aligned and every stride a multiple of 16
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    BLOCK_SIZE_M: tl.constexpr,  # reduction step over rows
    BLOCK_SIZE_N: tl.constexpr,  # dW tile rows (output features)
    BLOCK_SIZE_K: tl.constexpr,  # dW tile columns (input features)
    GROUP_SIZE_N: tl.constexpr,  # N blocks per group in the tile order
):
    """dW += Σ_i dY_iᵀ X_i and db += Σ_i Σ_rows dY_i. One program per [BLOCK_SIZE_N, BLOCK_SIZE_K]
    tile of dW; the programs with pid_k == 0 also own db[n-tile]."""
    tl.static_assert(BLOCK_SIZE_M >= 16 and BLOCK_SIZE_N >= 16 and BLOCK_SIZE_K >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(GROUP_SIZE_N >= 1, "GROUP_SIZE_N counts N blocks")
    tl.static_assert(FROM_TABLE or not TABLE_ALIGNED, "TABLE_ALIGNED describes the table")

    pid = tl.program_id(axis=0)
    pid_n, pid_k = _grouped_tile(pid, tl.cdiv(N, BLOCK_SIZE_N), tl.cdiv(K, BLOCK_SIZE_K), GROUP_SIZE_N)
    n0 = pid_n * BLOCK_SIZE_N
    k0 = pid_k * BLOCK_SIZE_K
    offs_n = tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    mask_n = offs_n < N - n0
    mask_k = offs_k < K - k0

    if HAS_BIAS and pid_k == 0:
        acc, db_acc = _dw_rows(
            x_ptr, dy_ptr, mb_table_ptr, num_mb, M, stride_xm, stride_dym, n0, k0, mask_n, mask_k,
            FROM_TABLE, TABLE_ALIGNED, True, INPUT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K,
        )
        db_ptrs = db_ptr + (n0 + offs_n) * stride_db
        db = tl.load(db_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(db_ptrs, (db + db_acc).to(db_ptr.dtype.element_ty), mask=mask_n)
    else:
        acc, _ = _dw_rows(
            x_ptr, dy_ptr, mb_table_ptr, num_mb, M, stride_xm, stride_dym, n0, k0, mask_n, mask_k,
            FROM_TABLE, TABLE_ALIGNED, False, INPUT_PRECISION, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K,
        )

    dw_ptrs = dw_ptr + n0.to(tl.int64) * stride_dwn + k0.to(tl.int64) * stride_dwk
    dw_ptrs += offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    mask = mask_n[:, None] & mask_k[None, :]
    dw = tl.load(dw_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dw_ptrs, (dw + acc).to(dw_ptr.dtype.element_ty), mask=mask)


def _grad_class(meta) -> tuple[str]:
    """dW's class: fp32 master gradients for 16-bit inputs hold a wider tile in the epilogue."""
    wide = meta["dw_ptr"].dtype == torch.float32 and meta["x_ptr"].dtype != torch.float32
    return ("fp32-grad" if wide else "input-grad",)


_prune_fwd = make_prune(_FWD_TABLE, "a_ptr", by_size=_prune_by_size)
_prune_dx = make_prune(_DX_TABLE, "a_ptr", by_size=_prune_by_size)
_prune_dw = make_prune(_DW_TABLE, "x_ptr", extra=_grad_class, by_size=_prune_by_size)
_fwd_matmul = triton.autotune(configs=_FWD_TABLE.configs, key=["M", "N", "K"],
                              prune_configs_by={"early_config_prune": _prune_fwd})(_matmul_kernel)
_dx_matmul = triton.autotune(configs=_DX_TABLE.configs, key=["M", "N", "K"],
                             prune_configs_by={"early_config_prune": _prune_dx})(_matmul_kernel)
# Autotuning runs the kernel several times; restore the accumulated gradients after each trial.
_dw_tuned = triton.autotune(
    configs=_DW_TABLE.configs,
    key=["M", "N", "K", "FROM_TABLE"],
    prune_configs_by={"early_config_prune": _prune_dw},
    restore_value=["dw_ptr", "db_ptr"],
)(_dw_kernel)


# ----------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------


def _check_out(name: str, out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check_tensor(name, out, len(shape))
    if tuple(out.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {dtype} (the input dtype)")


_FLATTEN = "; flatten leading dims first, e.g. t.reshape(-1, t.shape[-1])"


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _on_device(device: torch.device):
    """Launch on the tensors' GPU: Triton launches on the current CUDA device otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _use_tma(tma: bool | None, device: torch.device, dtype: torch.dtype, **operands: torch.Tensor | None) -> bool:
    """Whether to launch the TMA kernels of :mod:`.linear_tma`: on request (``tma=True``, with a
    ValueError when an operand rules them out), or by default on Hopper when the operands allow."""
    if tma is False:
        return False
    if tma is not None and tma is not True:
        raise TypeError(f"tma must be None (automatic), True or False, got {tma!r}")
    why = _tma.tma_problem(**operands)
    if tma:
        if why is None and device.type == "cuda" and arch_of(device) != "sm_90":
            why = f"the GPU has compute capability {torch.cuda.get_device_capability(device)} (TMA is Hopper's, 9.0)"
        if why is not None:
            raise ValueError(f"tma=True, but the TMA kernels cannot take this launch: {why}; "
                             "pass tma=None to fall back to the pointer kernels")
        return True
    return (why is None and dtype in _tma.AUTO_DTYPES and arch_of(device) == "sm_90"
            and torch.cuda.get_device_capability(device)[0] == 9)


def _launch_matmul(kernel, a, b, b_strides: tuple[int, int], c, bias, m: int, n: int, k: int) -> None:
    """Launch C[m, n] = A[m, k] B[k, n] (+ bias); b_strides are B's (stride_bk, stride_bn)."""
    if m == 0 or n == 0:
        return
    if k == 0:  # an empty sum: C is the bias (or zero)
        c.copy_(bias.expand(m, n) if bias is not None else torch.zeros((), dtype=c.dtype, device=c.device).expand(m, n))
        return
    stride_bk, stride_bn = b_strides

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_SIZE_M"]) * triton.cdiv(n, meta["BLOCK_SIZE_N"]),)

    with _on_device(a.device):
        kernel[grid](
            a, b, c, bias if bias is not None else c,
            m, n, k,
            a.stride(0), a.stride(1),
            stride_bk, stride_bn,
            c.stride(0), c.stride(1),
            bias.stride(0) if bias is not None else 0,
            HAS_BIAS=bias is not None,
            INPUT_PRECISION=_input_precision(a.dtype),
        )


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None, tma: bool | None = None) -> torch.Tensor:
    """Y = X Wᵀ + b, fp32 accumulation, bias added in the epilogue.

    Args:
        x: [M, K] fp16, bf16 or fp32, any strides.
        weight: [N, K], x's dtype, any strides (read as Wᵀ in place).
        bias: [N], x's dtype, or None.
        out: optional [M, N] buffer of x's dtype (any strides) to write Y into.
        tma: which kernel: None picks the TMA persistent kernel (:mod:`.linear_tma`) on Hopper
            when the operands allow it, else the pointer kernel; True requires the TMA kernel
            (ValueError naming the operand that prevents it); False takes the pointer kernel.

    Returns:
        Y [M, N] in x's dtype (``out`` when given).
    """
    _check_tensor("x", x, 2, _FLATTEN)
    _check_tensor("weight", weight, 2, " (expected [out_features, in_features])")
    if bias is not None:
        _check_tensor("bias", bias, 1, " (expected [out_features])")
    _check_dtype("x", x, _DTYPES, "supported by the kernels")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [N, {k}] to match x of shape {tuple(x.shape)}")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},) to match weight of shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    if out is None:
        check_devices("linear", x=x, weight=weight, bias=bias)
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        _check_out("out", out, (m, n), x.dtype)
        check_devices("linear", x=x, weight=weight, bias=bias, out=out)
    if m and n and k and _use_tma(tma, x.device, x.dtype, x=x, weight=weight, out=out):
        _tma.tma_matmul(x, weight, False, out, bias, m, n, k, _input_precision(x.dtype))  # B = Wᵀ, read from W [N, K]
        return out
    # B = Wᵀ: B[k, n] = W[n, k]
    _launch_matmul(_fwd_matmul, x, weight, (weight.stride(1), weight.stride(0)), out, bias, m, n, k)
    return out


def linear_dx(dy: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None,
              tma: bool | None = None) -> torch.Tensor:
    """p1: dX = dY W, fp32 accumulation.

    Args:
        dy: [M, N] fp16, bf16 or fp32, any strides.
        weight: [N, K], dy's dtype, any strides.
        out: optional [M, K] buffer of dy's dtype (any strides) to write dX into.
        tma: the kernel choice, as for :func:`linear_fwd`.

    Returns:
        dX [M, K] in dy's dtype (``out`` when given).
    """
    _check_tensor("dy", dy, 2, _FLATTEN)
    _check_tensor("weight", weight, 2, " (expected [out_features, in_features])")
    _check_dtype("dy", dy, _DTYPES, "supported by the kernels")
    m, n = dy.shape
    if weight.shape[0] != n:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [{n}, K] to match dy of shape {tuple(dy.shape)}")
    k = weight.shape[1]
    if weight.dtype != dy.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but dy has {dy.dtype}; cast them to one dtype")
    if out is None:
        check_devices("linear", dy=dy, weight=weight)
        out = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    else:
        _check_out("out", out, (m, k), dy.dtype)
        check_devices("linear", dy=dy, weight=weight, out=out)
    if m and n and k and _use_tma(tma, dy.device, dy.dtype, dy=dy, weight=weight, out=out):
        _tma.tma_matmul(dy, weight, True, out, None, m, k, n, _input_precision(dy.dtype))  # B = W [N, K], the GEMM's [K, N]
        return out
    # GEMM (M, N, K) = (m, k, n); B = W: B[n, k] = W[n, k]
    _launch_matmul(_dx_matmul, dy, weight, (weight.stride(0), weight.stride(1)), out, None, m, k, n)
    return out


def linear_dw(x: torch.Tensor | Sequence[torch.Tensor], dy: torch.Tensor | Sequence[torch.Tensor],
              dweight: torch.Tensor, dbias: torch.Tensor | None = None, *, tma: bool | None = None) -> None:
    """p2: dW += Σ_i dY_iᵀ X_i and db += Σ_i Σ_rows dY_i, in one kernel launch.

    Args:
        x: X [M, K], or a sequence of k micro-batches X_i [M_i, K] (row counts may differ).
            Each must be 2-D with unit column stride (stride(1) == 1); they are not concatenated.
        dy: dY [M, N], or a sequence of dY_i [M_i, N] matching ``x``; same layout rule, x's dtype.
        dweight: [N, K] gradient accumulated into, in x's dtype or fp32, any strides.
        dbias: [N] gradient accumulated into, in x's dtype or fp32, or None to skip db.
        tma: the kernel choice, as for :func:`linear_fwd` (every x_i and dy_i must be
            TMA-describable for the TMA kernel; dweight and dbias may have any strides).
    """
    xs, dys = _as_list("x", x), _as_list("dy", dy)
    if isinstance(x, torch.Tensor) != isinstance(dy, torch.Tensor):
        raise TypeError("x and dy must both be tensors or both be sequences of tensors")
    if len(xs) != len(dys):
        raise ValueError(f"x has {len(xs)} micro-batches but dy has {len(dys)}; pass one dy per x")
    if not xs:
        raise ValueError("x and dy are empty sequences; pass at least one micro-batch")
    _check_tensor("dweight", dweight, 2, " (expected [out_features, in_features])")
    n, k = dweight.shape
    for i, (xi, dyi) in enumerate(zip(xs, dys)):
        sx, sdy = (f"x[{i}]", f"dy[{i}]") if len(xs) > 1 or not isinstance(x, torch.Tensor) else ("x", "dy")
        _check_tensor(sx, xi, 2, _FLATTEN)
        _check_tensor(sdy, dyi, 2, _FLATTEN)
        if xi.shape[1] != k:
            raise ValueError(f"{sx} has shape {tuple(xi.shape)}, expected [M, {k}] to match dweight of shape {(n, k)}")
        if dyi.shape != (xi.shape[0], n):
            raise ValueError(f"{sdy} has shape {tuple(dyi.shape)}, expected {(xi.shape[0], n)} "
                             f"to match {sx} of shape {tuple(xi.shape)} and dweight of shape {(n, k)}")
        _check_dtype(sx, xi, _DTYPES, "supported by the kernels")
        if xi.dtype != xs[0].dtype or dyi.dtype != xs[0].dtype:
            raise TypeError(f"{sx} has dtype {xi.dtype} and {sdy} has {dyi.dtype}, expected {xs[0].dtype} "
                            "for every x and dy; cast them to one dtype")
        for name, t in ((sx, xi), (sdy, dyi)):
            if t.stride(1) != 1 and t.shape[1] > 1:
                raise ValueError(f"{name} has strides {t.stride()}; its columns must be contiguous "
                                 f"(stride(1) == 1): pass {name}.contiguous()")
    dtype = xs[0].dtype
    grad_dtypes = (dtype, torch.float32)
    _check_dtype("dweight", dweight, grad_dtypes, "the input dtype or fp32 master gradients")
    if dbias is not None:
        _check_tensor("dbias", dbias, 1, " (expected [out_features])")
        if dbias.shape[0] != n:
            raise ValueError(f"dbias has shape {tuple(dbias.shape)}, expected ({n},) to match dweight of shape {(n, k)}")
        _check_dtype("dbias", dbias, grad_dtypes, "the input dtype or fp32 master gradients")
    check_devices("linear", dweight=dweight, dbias=dbias, **{f"x[{i}]": t for i, t in enumerate(xs)},
                   **{f"dy[{i}]": t for i, t in enumerate(dys)})

    live = [(xi, dyi) for xi, dyi in zip(xs, dys) if xi.shape[0] > 0]
    total_rows = sum(xi.shape[0] for xi, _ in live)
    if total_rows == 0 or n == 0 or k == 0:
        return  # nothing to add

    if len(live) == 1:
        (x0, dy0), table, table_aligned = live[0], None, False
    else:
        x0, dy0 = live[0]
        rows = [[xi.data_ptr(), dyi.data_ptr(), xi.shape[0], xi.stride(0), dyi.stride(0)] for xi, dyi in live]
        table = _device_table(rows, dweight.device)  # [num_mb, _MB_COLS]
        table_aligned = all(r[_MB_X] % 16 == 0 and r[_MB_DY] % 16 == 0 and r[_MB_STRIDE_XM] % 16 == 0
                            and r[_MB_STRIDE_DYM] % 16 == 0 for r in rows)

    operands = {name: t for i, (xi, dyi) in enumerate(live) for name, t in ((f"x[{i}]", xi), (f"dy[{i}]", dyi))}
    if _use_tma(tma, dweight.device, dtype, **operands):
        _tma.tma_dw(x0, dy0, dweight, dbias, table, len(live), total_rows, n, k, _input_precision(dtype))
        return

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_SIZE_N"]) * triton.cdiv(k, meta["BLOCK_SIZE_K"]),)

    with _on_device(dweight.device):
        _dw_tuned[grid](
            x0, dy0, dweight, dbias if dbias is not None else dweight,
            table if table is not None else dweight, len(live),
            total_rows, n, k,
            x0.stride(0), dy0.stride(0),
            dweight.stride(0), dweight.stride(1),
            dbias.stride(0) if dbias is not None else 0,
            HAS_BIAS=dbias is not None,
            FROM_TABLE=table is not None,
            TABLE_ALIGNED=table_aligned,
            INPUT_PRECISION=_input_precision(dtype),
        )
