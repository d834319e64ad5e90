"""Embedding for 2BP: the whole weight gradient is p2, a deterministic scatter-add of dY rows.

Math
----
ids [M] integer row indices into W [V, D] (callers flatten leading dims into M); Y, dY [M, D].

    forward   Y[m, :] = W[ids[m], :]
    p1        none: ids are integers, so there is no input gradient
    p2        dW[v, :] += Σ_{m : ids[m] = v} s_m dY[m, :]      for every v ≠ padding_idx

with s_m = 1, or with ``scale_grad_by_freq`` s_m = 1 / #{m' : ids[m'] = ids[m]} counted
within m's own micro-batch (what torch does per forward call). Over micro-batches
i = 1..k the sum runs over every row of every micro-batch, in one launch.

Cost: p2 reads every dY row once and dW rows of the ids present (M·D + U·D elements,
U distinct ids); no FLOPs worth counting (M·D adds).

Design: sort-based, each dW row owned by one program
------------------------------------------------------
- The launcher (torch ops on the device, no host synchronisation) lists every row of
  every micro-batch as (id, byte address of its dY row), stably sorts the list by id (ties
  keep micro-batch order, then row order) and marks where each run of equal ids starts and
  ends. dY is never concatenated: rows are read where p1 left them.
- ``_embedding_dw_kernel``, grid (M_total, cdiv(D, BLOCK_SIZE_D)): program (p, d) exits
  unless sorted row p starts a run; otherwise it owns dW[id, d-block], sums its run's rows
  in sorted order, BLOCK_SIZE_R rows at a time, in fp32, and does a single read-add-write
  of its slice (in dW's dtype: the weight's, or fp32 master gradients). No atomics, and no
  element has two writers: the result is bit-identical run to run.
- Trade-off: one program reduces one id's whole run, so a very frequent id (a padding-like
  token that is not ``padding_idx``) is the longest program; splitting runs would need a
  workspace and a second fixed-order pass. The programs of non-starting rows cost a
  launch slot and two loads each.
- There is no forward kernel: the lookup is a gather with nothing to split, so both
  backends run torch's own (bounds-checked) gather.

Everything here is plain functions on tensors: no autograd, no modules, no state.
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
from ._launch import check_devices, check_dtype as _check_dtype, check_tensor as _check_tensor

__all__ = ["embedding_dw", "embedding_dw_bytes"]

_INT_DTYPES = (torch.int32, torch.int64)


def embedding_dw_bytes(rows: int, dim: int, distinct: int, elem: int, grad_elem: int) -> int:
    """Bytes p2 moves: every dY row read once (rows·dim·elem) plus one read and one write of
    each touched dW row (2·distinct·dim·grad_elem); the 16 bytes of sort data per row aside."""
    return rows * dim * elem + 2 * distinct * dim * grad_elem


@triton.jit
def _embedding_dw_kernel(
    sorted_ids_ptr,  # int64 [P]: ids sorted (stable) over every row of every micro-batch
    run_end_ptr,  # int64 [P]: for a row that starts a run, one past the run's last sorted row
    row_addr_ptr,  # int64 [P]: byte address of the dY row of each sorted row
    row_scale_ptr,  # fp32 [P]: s of each sorted row (HAS_SCALE); any valid pointer otherwise
    dy_ptr,  # dY of the first micro-batch: only its element type is used
    dw_ptr,  # dW [V, D], accumulated into (read, add, write) in its own dtype
    D,  # embedding dim: columns of dW and dY
    stride_dwv, stride_dwd,  # dW strides
    padding_idx,  # the id whose row gets no gradient; -1 for none
    HAS_SCALE: tl.constexpr,  # multiply each row by row_scale (scale_grad_by_freq)
    BLOCK_SIZE_R: tl.constexpr,  # sorted rows summed per loop iteration
    BLOCK_SIZE_D: tl.constexpr,  # dW columns per program
):
    """dW[id, d-block] += Σ over the run of ``id`` of s · dY[row, d-block] (module docstring)."""
    tl.static_assert(BLOCK_SIZE_R >= 1 and BLOCK_SIZE_D >= 16, "a tile of at least one row and 16 columns")
    p = tl.program_id(axis=0)
    pid_d = tl.program_id(axis=1)
    v = tl.load(sorted_ids_ptr + p)
    prev = tl.load(sorted_ids_ptr + p - 1, mask=p > 0, other=-1)  # ids are >= 0: row 0 always starts
    if v != prev and v != padding_idx:
        end = tl.load(run_end_ptr + p)
        offs_r = tl.arange(0, BLOCK_SIZE_R)
        offs_d = pid_d * BLOCK_SIZE_D + tl.arange(0, BLOCK_SIZE_D)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_SIZE_D,), dtype=tl.float32)
        for r0 in range(p, end, BLOCK_SIZE_R):
            rows = r0 + offs_r
            mask_r = rows < end
            addr = tl.load(row_addr_ptr + rows, mask=mask_r, other=0)
            ptrs = addr.to(tl.pointer_type(dy_ptr.dtype.element_ty))[:, None] + offs_d[None, :]
            tile = tl.load(ptrs, mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            if HAS_SCALE:
                scale = tl.load(row_scale_ptr + rows, mask=mask_r, other=0.0)
                tile = tile * scale[:, None]
            acc += tl.sum(tile, axis=0)
        dw_ptrs = dw_ptr + v * stride_dwv + offs_d * stride_dwd
        dw = tl.load(dw_ptrs, mask=mask_d, other=0.0).to(tl.float32)
        tl.store(dw_ptrs, (dw + acc).to(dw_ptr.dtype.element_ty), mask=mask_d)


_BLOCK_R = 8
"""Sorted rows summed per loop iteration on a GPU. Each row of the tile carries its own 64-bit
pointers: 16 rows x 256 columns on 4 warps spilled 8 bytes on sm_90 under Triton 3.6."""


def _block_d(d: int) -> int:
    if _INTERPRET:
        return 16  # small and not a divisor of typical test dims: masks get exercised
    return max(16, min(256, triton.next_power_of_2(d)))


def _run_ends(sorted_ids: torch.Tensor) -> torch.Tensor:
    """For every sorted row, the index one past the end of the run of equal ids it belongs
    to (only read at run starts). Fixed-size ops only: no host synchronisation."""
    p = sorted_ids.shape[0]
    idx = torch.arange(p, device=sorted_ids.device)
    starts = torch.ones(p, dtype=torch.bool, device=sorted_ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    # next start strictly after each row, or p: a suffix minimum over start positions
    cand = torch.where(starts, idx, torch.full_like(idx, p))
    nxt = torch.cat([cand[1:], cand.new_full((1,), p)])
    return nxt.flip(0).cummin(0).values.flip(0)


def embedding_dw(ids: torch.Tensor | Sequence[torch.Tensor], dy: torch.Tensor | Sequence[torch.Tensor],
                 dweight: torch.Tensor, *, padding_idx: int | None = None,
                 scale_grad_by_freq: bool = False) -> None:
    """p2: dW += Σ_i scatter-add of dY_i's rows at ids_i, in one kernel launch, deterministic.

    Args:
        ids: ids [M] (int32 or int64, values in [0, V)), or a sequence of k micro-batches'
            ids_i [M_i]; row counts may differ.
        dy: dY [M, D] or a sequence of dY_i [M_i, D] matching ``ids``; fp16, bf16 or fp32,
            one dtype, unit column stride (stride(1) == 1), any row stride.
        dweight: dW [V, D] accumulated into, in dY's dtype or fp32, any strides.
        padding_idx: the row that gets no gradient (None: every row does); negative values
            count from the end, as in ``nn.Embedding``.
        scale_grad_by_freq: scale each row by 1 / (count of its id in its own micro-batch).
    """
    id_list, dy_list = _as_list("ids", ids), _as_list("dy", dy)
    if isinstance(ids, torch.Tensor) != isinstance(dy, torch.Tensor):
        raise TypeError("ids and dy must both be tensors or both be sequences of tensors")
    if len(id_list) != len(dy_list):
        raise ValueError(f"ids has {len(id_list)} micro-batches but dy has {len(dy_list)}; pass one dy per ids")
    if not id_list:
        raise ValueError("ids and dy are empty sequences; pass at least one micro-batch")
    _check_tensor("dweight", dweight, 2, " (expected [num_embeddings, embedding_dim])")
    v, d = dweight.shape
    for i, (ii, gi) in enumerate(zip(id_list, dy_list)):
        si, sg = (f"ids[{i}]", f"dy[{i}]") if len(id_list) > 1 else ("ids", "dy")
        _check_tensor(si, ii, 1, " (flatten the ids: ids.reshape(-1))")
        _check_tensor(sg, gi, 2, " (flatten the leading dims: dy.reshape(-1, embedding_dim))")
        _check_dtype(si, ii, _INT_DTYPES, "embedding ids are integer indices")
        _check_dtype(sg, gi, _DTYPES, "supported by the kernels")
        if gi.shape != (ii.shape[0], d):
            raise ValueError(f"{sg} has shape {tuple(gi.shape)}, expected {(ii.shape[0], d)} to match {si} of "
                             f"shape {tuple(ii.shape)} and dweight of shape {(v, d)}")
        if gi.dtype != dy_list[0].dtype:
            raise TypeError(f"{sg} has dtype {gi.dtype}, expected {dy_list[0].dtype} like dy[0]; cast to one dtype")
        if gi.stride(1) != 1 and d > 1:
            raise ValueError(f"{sg} has strides {gi.stride()}; its columns must be contiguous (stride(1) == 1): "
                             f"pass {sg}.contiguous()")
    _check_dtype("dweight", dweight, (dy_list[0].dtype, torch.float32), "dY's dtype or fp32 master gradients")
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -v <= padding_idx < v:
            raise ValueError(f"padding_idx must be an int in [-{v}, {v}) or None, got {padding_idx!r}")
        padding_idx = padding_idx % v
    device = check_devices("embedding", dweight=dweight, **{f"ids[{i}]": t for i, t in enumerate(id_list)},
                           **{f"dy[{i}]": t for i, t in enumerate(dy_list)})
    live = [(ii, gi) for ii, gi in zip(id_list, dy_list) if ii.shape[0] > 0]
    if not live or v == 0 or d == 0:
        return  # nothing to add

    elem = dy_list[0].element_size()
    all_ids = torch.cat([ii.to(torch.int64) for ii, _ in live])                       # [P]
    addr = torch.cat([torch.arange(ii.shape[0], device=device, dtype=torch.int64) * (gi.stride(0) * elem)
                      + gi.data_ptr() for ii, gi in live])                             # [P] bytes
    sorted_ids, order = torch.sort(all_ids, stable=True)
    row_addr = addr[order].contiguous()
    scale = None
    if scale_grad_by_freq:
        per_mb = [1.0 / torch.bincount(ii.to(torch.int64), minlength=v).to(torch.float32)[ii.to(torch.int64)]
                  for ii, _ in live]
        scale = torch.cat(per_mb)[order].contiguous()
    run_end = _run_ends(sorted_ids)
    p = sorted_ids.shape[0]
    block_d = _block_d(d)
    grid = (p, triton.cdiv(d, block_d))
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _embedding_dw_kernel[grid](
            sorted_ids, run_end, row_addr, scale if scale is not None else row_addr,
            live[0][1], dweight, d, dweight.stride(0), dweight.stride(1),
            -1 if padding_idx is None else padding_idx,
            HAS_SCALE=scale is not None,
            BLOCK_SIZE_R=4 if _INTERPRET else _BLOCK_R,
            BLOCK_SIZE_D=block_d,
            num_warps=4,
        )

