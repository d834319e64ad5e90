"""Linear layer GEMMs for Hopper: TMA tensor descriptors and a persistent tile loop.

The same three GEMMs as :mod:`.linear` (X [M, K], W [N, K], Y and dY [M, N]):

    forward   Y  = X Wᵀ + b
    p1        dX = dY W
    p2        dW += Σ_i dY_iᵀ X_i,   db += Σ_i Σ_rows dY_i      (k micro-batches, one launch)

Why a second set of kernels
---------------------------
On sm_90 a tile load can be one TMA instruction (``cp.async.bulk.tensor``): the copy engine
moves a whole [rows, cols] box from global to shared memory, computes the addresses, zero-
fills what lies outside the tensor and signals an mbarrier, so no thread spends registers
or instructions on pointer arithmetic and masks, and the warpgroup MMA (``wgmma``) reads
the operands straight from shared memory. The kernels here describe every operand with a
device-side tensor descriptor (``tl.make_tensor_descriptor``: base, shape, strides, box)
and load tiles through it; Triton pipelines those loads ``num_stages`` deep.

They are *persistent*: the grid has min(#SMs, #tiles) programs and program p computes
tiles p, p + P, p + 2P, ... in the grouped order of :func:`._tiles.grouped_tile`. One wave
of programs, no tail of half-empty waves, and each program sets its descriptors up once.

Descriptors need what TMA needs: 16-byte aligned base addresses, row strides that are
multiples of 16 bytes and a unit column stride; 16-bit dtypes (fp16, bf16). The launchers
in :mod:`.linear` check that and pick these kernels on sm_90 (``tma=None``), else the
pointer kernels, which take any strides and fp32 too.

p2 over k micro-batches reads each X_i, dY_i through its own pair of descriptors, built
in the kernel from the int64 micro-batch table (the same table as :mod:`.linear`); a
program rebuilds them per (tile, micro-batch), a 128-byte write and a fence each, next to
M_i / BLOCK_SIZE_M pipelined MMA steps. With one micro-batch they are built once per program.
dW and db are accumulated as in :mod:`.linear`: output-stationary, one read-add-write per
element, no atomics, deterministic.

Device-side descriptors live in a small global scratch buffer that Triton asks for at
launch through ``triton.set_allocator``; the launchers install a torch allocator only for
their own launch (inside a copied ``contextvars`` context), so no global state changes.

Under the interpreter the same kernels run on CPU tensors (fp32 and fp16), with a few
programs so that each walks several tiles.
"""

from __future__ import annotations

import contextvars
import functools

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET as _INTERPRET
from ._targets import ConfigTable, make_prune
from ._tiles import grouped_tile as _grouped_tile

__all__ = ["tma_problem", "tma_matmul", "tma_dw", "AUTO_DTYPES"]

#: dtypes for which the launchers pick these kernels by default on Hopper. fp32 runs here
#: only on request (``tma=True``): its products are exact ("ieee", no tensor cores) unless
#: torch allows TF32, and the pointer kernels serve it as well.
AUTO_DTYPES = (torch.float16, torch.bfloat16)


def _cfg(bm: int, bn: int, bk: int, group: int, warps: int, stages: int, group_name: str = "GROUP_SIZE_M"):
    return triton.Config({"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, group_name: group},
                         num_warps=warps, num_stages=stages)


# sm_90 only: the launchers never pick these kernels elsewhere. Each config is checked by the
# AOT sweep (bench/results/aot-sweep.md): no spills, shared memory within 227 KB, TMA and wgmma.
_MM_SM90 = [
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 8, 4),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(128, 64, 64, 8, 4, 4),
    _cfg(64, 128, 64, 8, 4, 4),
]
# dW: BLOCK_SIZE_M is the reduction step (rows), the output tile is BLOCK_SIZE_N x BLOCK_SIZE_K.
# A 128x128 fp32 accumulator needs 8 warps: with 4 the epilogue's read-add-write spills.
_DW_SM90 = [
    _cfg(128, 128, 128, 8, 8, 3, "GROUP_SIZE_N"),
    _cfg(64, 128, 128, 8, 8, 4, "GROUP_SIZE_N"),
    _cfg(64, 64, 128, 8, 4, 4, "GROUP_SIZE_N"),
    _cfg(64, 128, 64, 8, 4, 4, "GROUP_SIZE_N"),
]
# fp32 (on request only): exact products are FMAs on registers; 32-deep K steps at most
_MM_FP32 = [_cfg(128, 64, 16, 8, 8, 3), _cfg(64, 64, 32, 8, 8, 3), _cfg(64, 64, 16, 8, 4, 3),
            _cfg(64, 32, 32, 8, 4, 3), _cfg(32, 64, 32, 8, 4, 3)]
_DW_FP32 = [_cfg(32, 64, 64, 8, 4, 3, "GROUP_SIZE_N"), _cfg(32, 64, 32, 8, 4, 3, "GROUP_SIZE_N")]
_INTERPRET_MM = [_cfg(32, 16, 16, 2, 4, 1)]
_INTERPRET_DW = [_cfg(16, 32, 16, 2, 4, 1, "GROUP_SIZE_N")]

_MM_TABLE = ConfigTable({("sm_90", "16-bit"): _MM_SM90, ("sm_90", "fp32"): _MM_FP32},
                        _INTERPRET_MM if _INTERPRET else None)
_DW_TABLE = ConfigTable({("sm_90", "16-bit", "input-grad"): _DW_SM90, ("sm_90", "16-bit", "fp32-grad"): _DW_SM90,
                         ("sm_90", "fp32", "input-grad"): _DW_FP32},
                        _INTERPRET_DW if _INTERPRET else None)


def _grad_class(meta) -> tuple[str]:
    wide = meta["dw_ptr"].dtype == torch.float32 and meta["x_ptr"].dtype != torch.float32
    return ("fp32-grad" if wide else "input-grad",)


_prune_mm = make_prune(_MM_TABLE, "a_ptr")
_prune_dw = make_prune(_DW_TABLE, "x_ptr", extra=_grad_class)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _tma_matmul_kernel(
    a_ptr,  # A [M, K], row stride stride_am, unit column stride: X (forward) or dY (dX)
    b_ptr,  # B_KN: B [K, N] with row stride stride_b (dX: W); else Bᵀ [N, K] with row stride stride_b (forward: W)
    c_ptr,  # C [M, N] output, row stride stride_cm, unit column stride
    bias_ptr,  # bias [N] added in the epilogue when HAS_BIAS; any valid pointer otherwise
    M, N, K,  # C[M, N] = A[M, K] B[K, N]
    stride_am,  # A row stride, in elements (a multiple of 16 bytes)
    stride_b,  # row stride of B (B_KN) or of Bᵀ, in elements (a multiple of 16 bytes)
    stride_cm,  # C row stride, in elements (a multiple of 16 bytes)
    stride_bias,  # bias stride
    HAS_BIAS: tl.constexpr,  # add bias in the epilogue
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    B_KN: tl.constexpr,  # B is stored [K, N] (dX reads W so); else as Bᵀ [N, K] (the forward reads W so)
    BLOCK_SIZE_M: tl.constexpr,  # C tile rows
    BLOCK_SIZE_N: tl.constexpr,  # C tile columns
    BLOCK_SIZE_K: tl.constexpr,  # reduction step
    GROUP_SIZE_M: tl.constexpr,  # row blocks per group in the tile order
):
    """C = A B (+ bias), fp32 accumulation, persistent over [BLOCK_SIZE_M, BLOCK_SIZE_N] tiles of C."""
    tl.static_assert(BLOCK_SIZE_M >= 16 and BLOCK_SIZE_N >= 16 and BLOCK_SIZE_K >= 16, "tl.dot needs tiles of at least 16")
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_K])
    if B_KN:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_SIZE_K, BLOCK_SIZE_N])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                       block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_N])
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    offs_n = tl.arange(0, BLOCK_SIZE_N)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):  # persistent
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_SIZE_M)
        m0 = pid_m * BLOCK_SIZE_M
        n0 = pid_n * BLOCK_SIZE_N
        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_SIZE_K):
            a = a_desc.load([m0, k0])  # [BM, BK]; rows / columns past M / K read as 0
            if B_KN:
                b = b_desc.load([k0, n0])  # [BK, BN]
            else:
                b = tl.trans(b_desc.load([n0, k0]))  # [BN, BK] -> [BK, BN]
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + (n0 + offs_n) * stride_bias, mask=offs_n < N - n0, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        c_desc.store([m0, n0], acc.to(c_ptr.dtype.element_ty))  # the part past M / N is not written


@triton.jit
def _tma_dw_rows(
    x_ptr, dy_ptr, mb_table_ptr, num_mb, M, K, N, stride_xm, stride_dym,  # as in _tma_dw_kernel
    x_desc, dy_desc,  # the single micro-batch's descriptors (unused with FROM_TABLE)
    n0,  # first output feature of the tile (dW row)
    k0,  # first input feature of the tile (dW column)
    FROM_TABLE: tl.constexpr,  # as in _tma_dw_kernel
    WITH_DB: tl.constexpr,  # also sum the dY rows (the tiles that own db)
    INPUT_PRECISION: tl.constexpr,  # as in _tma_dw_kernel
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
):
    """(Σ_i dY_i[:, n-tile]ᵀ X_i[:, k-tile], Σ_i Σ_rows dY_i[:, n-tile]); the second only WITH_DB."""
    acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_K), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_SIZE_N,), dtype=tl.float32)
    for i in range(num_mb):
        if FROM_TABLE:
            entry = mb_table_ptr + i * 5  # the table of linear.py: x_i, dy_i addresses, M_i, row strides
            x_base = tl.load(entry + 0).to(tl.pointer_type(x_ptr.dtype.element_ty))
            dy_base = tl.load(entry + 1).to(tl.pointer_type(dy_ptr.dtype.element_ty))
            rows = tl.load(entry + 2).to(tl.int32)
            sxm = tl.load(entry + 3)
            sdym = tl.load(entry + 4)
            xd = tl.make_tensor_descriptor(x_base, shape=[rows, K], strides=[sxm, 1],
                                           block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_K])
            dyd = tl.make_tensor_descriptor(dy_base, shape=[rows, N], strides=[sdym, 1],
                                            block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_N])
        else:
            rows = M
            xd = x_desc
            dyd = dy_desc
        for m0 in range(0, rows, BLOCK_SIZE_M):
            x = xd.load([m0, k0])  # [BM, BK]; rows past M_i read as 0, so they add nothing
            dy = dyd.load([m0, n0])  # [BM, BN]
            acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)  # [BN, BM] @ [BM, BK]
            if WITH_DB:
                db_acc += tl.sum(dy.to(tl.float32), axis=0)
    return acc, db_acc


@triton.jit
def _tma_dw_kernel(
    x_ptr,  # X [M, K] of the single micro-batch; with FROM_TABLE, x_0 (only its dtype is used)
    dy_ptr,  # dY [M, N] likewise
    dw_ptr,  # dW [N, K], accumulated into (read, add, write) in its own dtype, any strides
    db_ptr,  # db [N], accumulated into when HAS_BIAS; any valid pointer otherwise
    mb_table_ptr,  # int64 [num_mb, 5] with FROM_TABLE (see linear.py); any valid pointer otherwise
    num_mb,  # micro-batches: rows of the table, 1 without it
    M,  # rows of the single micro-batch; with FROM_TABLE, Σ_i M_i (autotune key only)
    N,  # output features: rows of dW
    K,  # input features: columns of dW
    stride_xm,  # X row stride (unit column stride; a multiple of 16 bytes); unused with FROM_TABLE
    stride_dym,  # dY row stride, likewise
    stride_dwn, stride_dwk,  # dW strides
    stride_db,  # db stride
    HAS_BIAS: tl.constexpr,  # also accumulate db
    FROM_TABLE: tl.constexpr,  # read the micro-batches from mb_table_ptr
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    BLOCK_SIZE_M: tl.constexpr,  # reduction step over rows
    BLOCK_SIZE_N: tl.constexpr,  # dW tile rows (output features)
    BLOCK_SIZE_K: tl.constexpr,  # dW tile columns (input features)
    GROUP_SIZE_N: tl.constexpr,  # N blocks per group in the tile order
):
    """dW += Σ_i dY_iᵀ X_i and db += Σ_i Σ_rows dY_i, persistent over [BLOCK_SIZE_N, BLOCK_SIZE_K]
    tiles of dW; the tiles of the first column block (pid_k == 0) also own db[n-tile]."""
    tl.static_assert(BLOCK_SIZE_M >= 16 and BLOCK_SIZE_N >= 16 and BLOCK_SIZE_K >= 16, "tl.dot needs tiles of at least 16")
    if FROM_TABLE:
        x_desc = 0  # built per micro-batch in _tma_dw_rows
        dy_desc = 0
    else:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_K])
        dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, N], strides=[stride_dym, 1],
                                            block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_N])
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_k = tl.cdiv(K, BLOCK_SIZE_K)
    offs_n = tl.arange(0, BLOCK_SIZE_N)
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    for tile in range(tl.program_id(0), num_pid_n * num_pid_k, tl.num_programs(0)):  # persistent
        pid_n, pid_k = _grouped_tile(tile, num_pid_n, num_pid_k, GROUP_SIZE_N)
        n0 = pid_n * BLOCK_SIZE_N
        k0 = pid_k * BLOCK_SIZE_K
        mask_n = offs_n < N - n0
        mask_k = offs_k < K - k0
        if HAS_BIAS and pid_k == 0:
            acc, db_acc = _tma_dw_rows(x_ptr, dy_ptr, mb_table_ptr, num_mb, M, K, N, stride_xm, stride_dym,
                                       x_desc, dy_desc, n0, k0, FROM_TABLE, True, INPUT_PRECISION,
                                       BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)
            db_ptrs = db_ptr + (n0 + offs_n) * stride_db
            db = tl.load(db_ptrs, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(db_ptrs, (db + db_acc).to(db_ptr.dtype.element_ty), mask=mask_n)
        else:
            acc, _ = _tma_dw_rows(x_ptr, dy_ptr, mb_table_ptr, num_mb, M, K, N, stride_xm, stride_dym,
                                  x_desc, dy_desc, n0, k0, FROM_TABLE, False, INPUT_PRECISION,
                                  BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K)
        dw_ptrs = dw_ptr + n0.to(tl.int64) * stride_dwn + k0.to(tl.int64) * stride_dwk
        dw_ptrs += offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
        mask = mask_n[:, None] & mask_k[None, :]
        dw = tl.load(dw_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dw_ptrs, (dw + acc).to(dw_ptr.dtype.element_ty), mask=mask)


_tma_matmul_tuned = triton.autotune(configs=_MM_TABLE.configs, key=["M", "N", "K", "B_KN"],
                                    prune_configs_by={"early_config_prune": _prune_mm})(_tma_matmul_kernel)
# Autotuning runs the kernel several times; restore the accumulated gradients after each trial.
_tma_dw_tuned = triton.autotune(configs=_DW_TABLE.configs, key=["M", "N", "K", "FROM_TABLE"],
                                prune_configs_by={"early_config_prune": _prune_dw},
                                restore_value=["dw_ptr", "db_ptr"])(_tma_dw_kernel)


# ----------------------------------------------------------------------------------------
# Eligibility and launchers (called by linear.py, which validates shapes and dtypes first)
# ----------------------------------------------------------------------------------------


def _rows_ok(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be a TMA operand (None when it can): 2-D, unit column stride,
    16-byte aligned base and row stride."""
    size = t.element_size()
    if t.dim() != 2:
        return f"is {t.dim()}-D"
    if t.stride(1) != 1 and t.shape[1] > 1:
        return f"has column stride {t.stride(1)} (TMA needs 1)"
    if t.data_ptr() % 16:
        return f"starts at an address that is not 16-byte aligned ({t.data_ptr() % 16} past)"
    if (t.stride(0) * size) % 16 and t.shape[0] > 1:
        return f"has a row stride of {t.stride(0) * size} bytes (TMA needs a multiple of 16)"
    return None


def tma_problem(**tensors: torch.Tensor | None) -> str | None:
    """Why the TMA kernels cannot take these operands (None when they can): every named
    tensor must be a TMA-describable row-major matrix (the device and the dtype are the
    caller's choice: the kernels compile wherever Triton's descriptors do)."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} has no tl.make_tensor_descriptor"
    for name, t in tensors.items():
        if t is not None and (why := _rows_ok(t)) is not None:
            return f"{name} {why}"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, tiles: int, programs: int | None) -> int:
    """Persistent grid size: one program per SM (4 under the interpreter), at most one per tile."""
    if programs is None:
        if device.type == "cuda":
            programs = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        else:
            programs = 4
    return max(1, min(programs, tiles))


def _launch(device: torch.device, launch) -> None:
    """Run ``launch()`` with a torch allocator for the descriptors' global scratch, set in a
    copied context so that the caller's Triton allocator (or its absence) is untouched."""
    def run():
        if device.type == "cuda":
            triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
        with torch.cuda.device(device) if device.type == "cuda" else _null():
            launch()

    contextvars.copy_context().run(run)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def tma_matmul(a: torch.Tensor, b: torch.Tensor, b_kn: bool, c: torch.Tensor, bias: torch.Tensor | None,
               m: int, n: int, k: int, precision: str, programs: int | None = None) -> None:
    """C[m, n] = A[m, k] B[k, n] (+ bias) on the TMA kernel; B is ``b`` ([k, n]) when ``b_kn``,
    else ``b`` is Bᵀ ([n, k]). Operands are already validated and TMA-describable."""
    def launch():
        _tma_matmul_tuned[lambda meta: (_programs(a.device, triton.cdiv(m, meta["BLOCK_SIZE_M"])
                                                  * triton.cdiv(n, meta["BLOCK_SIZE_N"]), programs),)](
            a, b, c, bias if bias is not None else c,
            m, n, k, a.stride(0), b.stride(0), c.stride(0), bias.stride(0) if bias is not None else 0,
            HAS_BIAS=bias is not None, INPUT_PRECISION=precision, B_KN=b_kn,
        )

    _launch(a.device, launch)


def tma_dw(x0: torch.Tensor, dy0: torch.Tensor, dweight: torch.Tensor, dbias: torch.Tensor | None,
           table: torch.Tensor | None, num_mb: int, total_rows: int, n: int, k: int, precision: str,
           programs: int | None = None) -> None:
    """dW += Σ_i dY_iᵀ X_i (and db) on the TMA kernel; ``table`` as built by linear_dw (None for
    one micro-batch, then x0 / dy0 are it). Operands are already validated and TMA-describable."""
    def launch():
        _tma_dw_tuned[lambda meta: (_programs(dweight.device, triton.cdiv(n, meta["BLOCK_SIZE_N"])
                                              * triton.cdiv(k, meta["BLOCK_SIZE_K"]), programs),)](
            x0, dy0, dweight, dbias if dbias is not None else dweight,
            table if table is not None else dweight, num_mb,
            total_rows, n, k, x0.stride(0), dy0.stride(0),
            dweight.stride(0), dweight.stride(1), dbias.stride(0) if dbias is not None else 0,
            HAS_BIAS=dbias is not None, FROM_TABLE=table is not None, INPUT_PRECISION=precision,
        )

    _launch(dweight.device, launch)
