"""Selective scan (Mamba's S6) for 2BP: forward, p1 (du, dΔ, dB, dC) and p2 (dA_log, dD) as
separately launchable kernels.

Math
----
u, Δ [b, L, E], B, C [b, L, N], A_log [E, N], D [E]; per channel e and state n, in fp32:

    A = -exp(A_log)          a_t = exp(Δ_t A)          h_t = a_t h_{t-1} + Δ_t u_t B_t
    y_t = Σ_n C_t h_t + D u_t
    backward  s_t = C_t dy_t + a_{t+1} s_{t+1}       (∂L/∂h_t, backwards in time)
      p1  du_t = Δ_t Σ_n s_t B_t + D dy_t            dΔ_t = u_t Σ_n s_t B_t + Σ_n s_t A (a_t h_{t-1})
          dB_t = Σ_e s_t Δ_t u_t                     dC_t = Σ_e h_t dy_t
      p2  dA_log = A Σ_{b,t} s_t Δ_t (a_t h_{t-1})   dD = Σ_{b,t} dy_t u_t

A linear recurrence h_t = a_t h_{t-1} + x_t composes: applying (a1, x1) then (a2, x2) is
(a1 a2, a2 x1 + x2), an associative operator, so ``tl.associative_scan`` solves a tile of
BLOCK_T steps at once (log2(BLOCK_T) combine rounds) for a [BLOCK_T, BLOCK_E, BLOCK_N] block of
states, and a state carried from tile to tile in registers joins the tiles: h_t =
(Π a) h_in + (scanned x). The backward recurrence for s is the same operator scanned in
reverse (``reverse=True``: s_t = x_t + α_t s_{t+1} with α_t = a_{t+1}, read from Δ one step
ahead). a_t h_{t-1} is taken as h_t - Δ_t u_t B_t: no shifted copy of the states is needed.

Chunks and what is saved
------------------------
Time is walked in tiles of BLOCK_T steps, TILES_PER_CHUNK tiles make a chunk of ``chunk``
steps. Forward keeps the state in fp32 registers and writes it out only at the end of every
chunk but the last: H [b, ceil(L/chunk) - 1, E, N] fp32, ``chunk`` times less than all the
states. A backward pass (p1, p2 or both) walks the chunks from the last: pass 1 recomputes
the state at the start of each tile of the chunk from H into a per-program scratch
([TILES_PER_CHUNK, BLOCK_E, BLOCK_N] fp32, a few KB that stay in L2), pass 2 walks the tiles
backwards, recomputing each tile's states from its start state and scanning s. So every
backward recomputes the forward twice (pass 1 and pass 2) and scans once in reverse.

Transient buffers of a backward walk (freed when it returns): the scratch, [slots, cdiv(E,
BLOCK_E), TILES_PER_CHUNK, BLOCK_E, BLOCK_N] fp32 (4 MiB per sequence at Mamba-1.4B), and in
p1 the dB, dC partials, 2 x [cdiv(E, BLOCK_E), b, L, N] fp32 (32 MiB per sequence there).

**What the split costs**: p1 and p2 each run that whole walk, so the split scan pays one extra
backward walk (recompute and reverse scan) in p2, about the cost of p1 minus the dB / dC /
du / dΔ epilogue. ``param_grads=True`` together with ``input_grads=True`` (the normal, unsplit
backward, or ``dparams_in_p1``) does both in one walk.

Parallelism and determinism
---------------------------
A program owns (BLOCK_E channels, one batch slot): the grid is (cdiv(E, BLOCK_E), slots).
For p1 the slots are the batch rows; dB and dC, sums over the channels, are written per
channel block as fp32 partials [cdiv(E, BLOCK_E), b, L, N] and summed in a fixed order by the
launcher. For p2 a slot walks batch rows slot, slot + slots, ... and sums its dA_log, dD in
registers; the launcher sums the slots' [slots, E, N] partials in a fixed order. No atomics:
reruns are bit-identical.

Cost per (t, e, n): forward ~ 10 FLOPs and one exp; a backward walk ~ 3 forward recomputes'
worth plus the reverse scan, ~ 35 FLOPs and two exps. Bytes: forward reads u, Δ, B, C
and writes y; a backward reads them and dy, writes the gradients. The scan is latency- and
exp-bound on a GPU; the tile sizes below keep every [BLOCK_T, BLOCK_E, BLOCK_N] fp32 block
at 4096 values (16 per thread at 8 warps).

Everything here is plain functions on tensors: no autograd, no modules, no global state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import DTYPES as _DTYPES, INTERPRET as _INTERPRET, check_devices, check_dtype

__all__ = ["MAX_STATE", "scan_fwd", "scan_bwd", "scan_dx", "scan_dw"]

#: Largest state size N (d_state) the kernels take: a tile holds BLOCK_E x next_pow2(N) states.
MAX_STATE = 256

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)); exp2 is the hardware instruction

if _INTERPRET:
    # The interpreter runs a custom-combine scan element by element in Python: small tiles.
    _BLOCK_T, _TILE_STATES, _WARPS = 8, 64, 1
else:
    # 16 steps x 4096 / 16 states: 16 fp32 values per thread per block at 8 warps.
    _BLOCK_T, _TILE_STATES, _WARPS = 16, 256, 8


def _blocks(n_state: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_N): BLOCK_E x BLOCK_N = _TILE_STATES states per tile, at least one channel."""
    block_n = triton.next_power_of_2(n_state)
    return max(1, _TILE_STATES // block_n), block_n


@triton.jit
def _linear_recurrence(a1, x1, a2, x2):
    """(a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _last_row(t, BLOCK_T: tl.constexpr):
    """Row BLOCK_T - 1 of a [BLOCK_T, BE, BN] block, as [BE, BN] (a masked sum: no dynamic indexing)."""
    rows = tl.arange(0, BLOCK_T)[:, None, None]
    return tl.sum(tl.where(rows == BLOCK_T - 1, t, 0.0), axis=0)


@triton.jit
def _tile_inputs(u_ptr, d_ptr, B_ptr, t, mask_t, offs_e, mask_e, offs_n, mask_n, row_u, row_d, row_B,
                 stride_ut, stride_dt, stride_Bt, A2):
    """u, Δ [BT, BE] and B [BT, BN] of one tile (fp32; masked rows give Δ = 0: a = 1, x = 0),
    and the recurrence's (a, x) [BT, BE, BN]."""
    t64 = t.to(tl.int64)
    m_te = mask_t[:, None] & mask_e[None, :]
    u = tl.load(u_ptr + row_u + t64[:, None] * stride_ut + offs_e[None, :], mask=m_te, other=0.0).to(tl.float32)
    dt = tl.load(d_ptr + row_d + t64[:, None] * stride_dt + offs_e[None, :], mask=m_te, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + row_B + t64[:, None] * stride_Bt + offs_n[None, :],
                 mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    a = tl.exp2(dt[:, :, None] * A2[None, :, :])
    x = (dt * u)[:, :, None] * Bt[:, None, :]
    return u, dt, Bt, a, x


@triton.jit
def _scan_fwd_kernel(
    u_ptr, d_ptr, B_ptr, C_ptr,  # u, Δ [b, L, E]; B, C [b, L, N] (unit stride on the last dim)
    A_log_ptr, D_ptr,  # A_log [E, N], D [E], contiguous, any float dtype
    y_ptr,  # out: y [b, L, E], u's dtype, contiguous
    H_ptr,  # out: H [b, n_chunks - 1, E, N] fp32, contiguous
    L, E, N,  # sequence length, channels, state size
    stride_ub, stride_ut, stride_db, stride_dt,  # batch and time strides of u, Δ
    stride_Bb, stride_Bt, stride_Cb, stride_Ct,  # of B, C
    BLOCK_T: tl.constexpr,  # time steps per tile
    BLOCK_E: tl.constexpr,  # channels per program
    BLOCK_N: tl.constexpr,  # next_pow2(N)
    TILES_PER_CHUNK: tl.constexpr,  # tiles between saved states
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_e, mask_n = offs_e < E, offs_n < N
    mask_en = mask_e[:, None] & mask_n[None, :]
    A_log = tl.load(A_log_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en, other=0.0).to(tl.float32)
    A2 = -tl.exp(A_log) * 1.4426950408889634  # A log2(e): a = exp2(Δ A2)
    Dv = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(L, BLOCK_T * TILES_PER_CHUNK)
    h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for j in range(0, tl.cdiv(L, BLOCK_T)):
        t = j * BLOCK_T + offs_t
        mask_t = t < L
        u, dt, Bt, a, x = _tile_inputs(u_ptr, d_ptr, B_ptr, t, mask_t, offs_e, mask_e, offs_n, mask_n,
                                       b * stride_ub, b * stride_db, b * stride_Bb, stride_ut, stride_dt,
                                       stride_Bt, A2)
        Ct = tl.load(C_ptr + b * stride_Cb + t.to(tl.int64)[:, None] * stride_Ct + offs_n[None, :],
                     mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _linear_recurrence)
        hs = a_cum * h[None, :, :] + x_cum  # h_t, [BT, BE, BN]
        y = tl.sum(hs * Ct[:, None, :], axis=2) + Dv[None, :] * u
        t64 = t.to(tl.int64)
        tl.store(y_ptr + (b * L + t64[:, None]) * E + offs_e[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_e[None, :])
        h = _last_row(hs, BLOCK_T)  # masked rows carry the state through unchanged
        if ((j + 1) % TILES_PER_CHUNK == 0) & ((j + 1) * BLOCK_T < L):
            c = (j + 1) // TILES_PER_CHUNK - 1
            tl.store(H_ptr + ((b * (n_chunks - 1) + c) * E + offs_e[:, None]) * N + offs_n[None, :], h,
                     mask=mask_en)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, d_ptr, B_ptr, C_ptr,  # saved inputs: u, Δ [b, L, E]; B, C [b, L, N]
    dy_ptr,  # dy [b, L, E], contiguous
    A_log_ptr, D_ptr,  # A_log [E, N], D [E]
    H_ptr,  # boundary states [b, n_chunks - 1, E, N] fp32
    scratch_ptr,  # [slots, cdiv(E, BLOCK_E), TILES_PER_CHUNK, BLOCK_E, BLOCK_N] fp32: tile start states
    du_ptr, dd_ptr,  # out (INPUT_GRADS): du, dΔ [b, L, E] contiguous, in u's dtype
    dBp_ptr, dCp_ptr,  # out (INPUT_GRADS): dB, dC partials [cdiv(E, BLOCK_E), b, L, N] fp32
    dAp_ptr, dDp_ptr,  # out (PARAM_GRADS): dA_log, dD partials [slots, E, N], [slots, E] fp32
    batch, L, E, N,
    stride_ub, stride_ut, stride_db, stride_dt,
    stride_Bb, stride_Bt, stride_Cb, stride_Ct,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, TILES_PER_CHUNK: tl.constexpr,
    INPUT_GRADS: tl.constexpr,  # write du, dΔ and the dB, dC partials (p1)
    PARAM_GRADS: tl.constexpr,  # write the dA_log, dD partials (p2)
):
    tl.static_assert(INPUT_GRADS or PARAM_GRADS, "a backward walk must produce something")
    pid_e = tl.program_id(0)
    slot = tl.program_id(1)
    n_slots = tl.num_programs(1)
    n_eblocks = tl.num_programs(0)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_e, mask_n = offs_e < E, offs_n < N
    mask_en = mask_e[:, None] & mask_n[None, :]
    A_log = tl.load(A_log_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en, other=0.0).to(tl.float32)
    A = -tl.exp(A_log)
    A2 = A * 1.4426950408889634
    Dv = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    CHUNK: tl.constexpr = BLOCK_T * TILES_PER_CHUNK
    n_chunks = tl.cdiv(L, CHUNK)
    tile_states: tl.constexpr = BLOCK_E * BLOCK_N
    scratch = scratch_ptr + (slot * n_eblocks + pid_e).to(tl.int64) * (TILES_PER_CHUNK * tile_states)
    offs_s = tl.arange(0, BLOCK_E)[:, None] * BLOCK_N + offs_n[None, :]  # a tile state's place in the scratch
    acc_dA = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    acc_dD = tl.zeros((BLOCK_E,), dtype=tl.float32)
    rows = offs_t[:, None, None]
    for b32 in range(slot, batch, n_slots):
        b = tl.cast(b32, tl.int64)  # tl.cast: the interpreter hands range values over as ints
        rho = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)  # a_{t+1} s_{t+1} entering the chunk's last step
        for ci in range(0, n_chunks):
            c = n_chunks - 1 - ci
            c0 = c * CHUNK
            n_tiles = tl.minimum(TILES_PER_CHUNK, tl.cdiv(L - c0, BLOCK_T))
            h = tl.load(H_ptr + ((b * (n_chunks - 1) + c - 1) * E + offs_e[:, None]) * N + offs_n[None, :],
                        mask=mask_en & (tl.full((BLOCK_E, BLOCK_N), c, tl.int32) > 0), other=0.0)
            tl.debug_barrier()  # the previous chunk's pass 2 is done reading the scratch
            # pass 1: the state entering each tile of the chunk
            for k in range(0, n_tiles):
                tl.store(scratch + k * tile_states + offs_s, h)
                t = c0 + k * BLOCK_T + offs_t
                _, _, _, a, x = _tile_inputs(u_ptr, d_ptr, B_ptr, t, t < L, offs_e, mask_e, offs_n, mask_n,
                                             b * stride_ub, b * stride_db, b * stride_Bb, stride_ut, stride_dt,
                                             stride_Bt, A2)
                a_cum, x_cum = tl.associative_scan((a, x), 0, _linear_recurrence)
                h = _last_row(a_cum * h[None, :, :] + x_cum, BLOCK_T)
            tl.debug_barrier()  # pass 1's stores are visible to every thread of the program
            # pass 2: tiles backwards
            for kk in range(0, n_tiles):
                k = n_tiles - 1 - kk
                t = c0 + k * BLOCK_T + offs_t
                mask_t = t < L
                t64 = t.to(tl.int64)
                m_te = mask_t[:, None] & mask_e[None, :]
                m_tn = mask_t[:, None] & mask_n[None, :]
                h_in = tl.load(scratch + k * tile_states + offs_s)
                u, dt, Bt, a, x = _tile_inputs(u_ptr, d_ptr, B_ptr, t, mask_t, offs_e, mask_e, offs_n, mask_n,
                                               b * stride_ub, b * stride_db, b * stride_Bb, stride_ut, stride_dt,
                                               stride_Bt, A2)
                Ct = tl.load(C_ptr + b * stride_Cb + t64[:, None] * stride_Ct + offs_n[None, :], mask=m_tn,
                             other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + (b * L + t64[:, None]) * E + offs_e[None, :], mask=m_te,
                             other=0.0).to(tl.float32)
                t_next = t + 1  # a_{t+1}: Δ one step ahead (past L: Δ = 0, never used)
                dt_next = tl.load(d_ptr + b * stride_db + t_next.to(tl.int64)[:, None] * stride_dt + offs_e[None, :],
                                  mask=(t_next < L)[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
                a_cum, x_cum = tl.associative_scan((a, x), 0, _linear_recurrence)
                hs = a_cum * h_in[None, :, :] + x_cum  # h_t
                a_next = tl.exp2(dt_next[:, :, None] * A2[None, :, :])
                cc = Ct[:, None, :] * dy[:, :, None]  # C_t dy_t
                cc += tl.where(rows == BLOCK_T - 1, rho[None, :, :], 0.0)  # the future, past the tile
                _, s = tl.associative_scan((a_next, cc), 0, _linear_recurrence, reverse=True)
                rho = tl.sum(tl.where(rows == 0, a * s, 0.0), axis=0)  # a_t s_t at the tile's first step
                ah = hs - x  # a_t h_{t-1}
                if INPUT_GRADS:
                    sB = tl.sum(s * Bt[:, None, :], axis=2)  # Σ_n s_t B_t, [BT, BE]
                    du = sB * dt + Dv[None, :] * dy
                    dd = sB * u + tl.sum(s * ah * A[None, :, :], axis=2)
                    tl.store(du_ptr + (b * L + t64[:, None]) * E + offs_e[None, :], du.to(du_ptr.dtype.element_ty),
                             mask=m_te)
                    tl.store(dd_ptr + (b * L + t64[:, None]) * E + offs_e[None, :], dd.to(dd_ptr.dtype.element_ty),
                             mask=m_te)
                    dBp = tl.sum(s * (dt * u)[:, :, None], axis=1)  # [BT, BN], this channel block's share
                    dCp = tl.sum(hs * dy[:, :, None], axis=1)
                    part = ((pid_e * batch + b) * L + t64[:, None]) * N + offs_n[None, :]
                    tl.store(dBp_ptr + part, dBp, mask=m_tn)
                    tl.store(dCp_ptr + part, dCp, mask=m_tn)
                if PARAM_GRADS:
                    acc_dA += tl.sum(s * ah * dt[:, :, None], axis=0)
                    acc_dD += tl.sum(dy * u, axis=0)
    if PARAM_GRADS:
        tl.store(dAp_ptr + (slot * E + offs_e[:, None]).to(tl.int64) * N + offs_n[None, :], acc_dA * A, mask=mask_en)
        tl.store(dDp_ptr + slot * E + offs_e, acc_dD, mask=mask_e)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _check_inputs(u, delta, B, C, A_log, D, chunk: int) -> tuple[int, int, int, int]:
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"scan: {name} must be a 3-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        check_dtype(f"scan: {name}", t, _DTYPES, "the Triton scan computes in fp32 from fp16/bf16/fp32 inputs")
        if t.stride(-1) != 1:
            raise ValueError(f"scan: {name} needs unit stride on its last dim, got strides {t.stride()}; "
                             f"pass {name}.contiguous()")
        if t.dtype != u.dtype:
            raise TypeError(f"scan: {name} dtype {t.dtype} differs from u's {u.dtype}")
    b, L, E = u.shape
    N = A_log.shape[-1]
    if tuple(delta.shape) != (b, L, E) or tuple(B.shape) != (b, L, N) or tuple(C.shape) != (b, L, N):
        raise ValueError(f"scan: shapes u {tuple(u.shape)}, delta {tuple(delta.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)} with A_log {tuple(A_log.shape)}; expected [b, L, E], [b, L, E], "
                         "[b, L, N], [b, L, N] with A_log [E, N]")
    if tuple(A_log.shape) != (E, N) or tuple(D.shape) != (E,):
        raise ValueError(f"scan: A_log must be [E={E}, N] and D [E={E}], got {tuple(A_log.shape)}, {tuple(D.shape)}")
    if N > MAX_STATE:
        raise ValueError(f"scan: state size N={N} is above MAX_STATE={MAX_STATE}; use the torch reference backend")
    if chunk <= 0 or chunk % _BLOCK_T:
        raise ValueError(f"scan: chunk={chunk} must be a positive multiple of the tile length {_BLOCK_T}")
    check_devices("scan", u=u, delta=delta, B=B, C=C, A_log=A_log, D=D)
    return b, L, E, N


def _n_chunks(L: int, chunk: int) -> int:
    return -(-L // chunk)


def scan_fwd(u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A_log: torch.Tensor,
             D: torch.Tensor, *, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [b, L, E] in u's dtype, H [b, ceil(L/chunk) - 1, E, N] fp32): the forward scan,
    keeping the state at the end of every chunk but the last."""
    b, L, E, N = _check_inputs(u, delta, B, C, A_log, D, chunk)
    y = torch.empty((b, L, E), device=u.device, dtype=u.dtype)
    H = torch.empty((b, max(0, _n_chunks(L, chunk) - 1), E, N), device=u.device, dtype=torch.float32)
    if b == 0 or L == 0 or E == 0:
        return y, H
    block_e, block_n = _blocks(N)
    grid = (triton.cdiv(E, block_e), b)
    _scan_fwd_kernel[grid](
        u, delta, B, C, A_log.contiguous(), D.contiguous(), y, H, L, E, N,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        BLOCK_T=_BLOCK_T, BLOCK_E=block_e, BLOCK_N=block_n, TILES_PER_CHUNK=chunk // _BLOCK_T, num_warps=_WARPS)
    return y, H


def _launch_bwd(dy, u, delta, B, C, A_log, D, H, *, chunk: int, input_grads: bool, param_grads: bool,
                slots: int):
    b, L, E, N = _check_inputs(u, delta, B, C, A_log, D, chunk)
    if tuple(dy.shape) != (b, L, E):
        raise ValueError(f"scan: dy must be [b, L, E] = {(b, L, E)}, got {tuple(dy.shape)}")
    dy = dy.contiguous()
    want = (b, max(0, _n_chunks(L, chunk) - 1), E, N)
    if tuple(H.shape) != want or H.dtype != torch.float32:
        raise ValueError(f"scan: H must be the forward's fp32 states {want}, got {tuple(H.shape)} {H.dtype} "
                         f"(same chunk={chunk} in forward and backward?)")
    block_e, block_n = _blocks(N)
    n_eblocks = triton.cdiv(E, block_e)
    tpc = chunk // _BLOCK_T
    dev = u.device
    scratch = torch.empty((slots, n_eblocks, tpc, block_e, block_n), device=dev, dtype=torch.float32)
    f32 = dict(device=dev, dtype=torch.float32)
    if input_grads:
        du, dd = torch.empty((b, L, E), device=dev, dtype=u.dtype), torch.empty((b, L, E), device=dev, dtype=u.dtype)
        dBp, dCp = torch.empty((n_eblocks, b, L, N), **f32), torch.empty((n_eblocks, b, L, N), **f32)
    else:
        du = dd = dBp = dCp = scratch  # never written (INPUT_GRADS is off)
    if param_grads:
        dAp, dDp = torch.empty((slots, E, N), **f32), torch.empty((slots, E), **f32)
    else:
        dAp = dDp = scratch
    _scan_bwd_kernel[(n_eblocks, slots)](
        u, delta, B, C, dy, A_log.contiguous(), D.contiguous(), H, scratch, du, dd, dBp, dCp, dAp, dDp,
        b, L, E, N,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        BLOCK_T=_BLOCK_T, BLOCK_E=block_e, BLOCK_N=block_n, TILES_PER_CHUNK=tpc,
        INPUT_GRADS=input_grads, PARAM_GRADS=param_grads, num_warps=_WARPS)
    grads_in = (du, dd, dBp.sum(0).to(B.dtype), dCp.sum(0).to(C.dtype)) if input_grads else None
    grads_p = (dAp.sum(0), dDp.sum(0)) if param_grads else None  # fixed-order sums over the slots
    return grads_in, grads_p


def scan_bwd(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             A_log: torch.Tensor, D: torch.Tensor, H: torch.Tensor, *, chunk: int, input_grads: bool = True,
             param_grads: bool = False):
    """One backward walk: ((du, dΔ, dB, dC) or None, (dA_log, dD) fp32 or None).

    ``input_grads`` alone is p1 (:func:`scan_dx`); ``param_grads`` alone is p2 of one
    micro-batch; both at once are the unsplit backward in one walk."""
    if not (input_grads or param_grads):
        raise ValueError("scan_bwd: ask for input_grads, param_grads or both")
    slots = u.shape[0] if input_grads else max(1, min(u.shape[0], 8))
    if u.shape[0] == 0:
        raise ValueError("scan_bwd: empty batch")
    return _launch_bwd(dy, u, delta, B, C, A_log, D, H, chunk=chunk, input_grads=input_grads,
                       param_grads=param_grads, slots=slots)


def scan_dx(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            A_log: torch.Tensor, D: torch.Tensor, H: torch.Tensor, *, chunk: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """p1: (du, dΔ, dB, dC) in the inputs' dtype."""
    return scan_bwd(dy, u, delta, B, C, A_log, D, H, chunk=chunk, input_grads=True)[0]


def scan_dw(dys: Sequence[torch.Tensor], us: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
            Bs: Sequence[torch.Tensor], Cs: Sequence[torch.Tensor], Hs: Sequence[torch.Tensor],
            A_log: torch.Tensor, dA_log: torch.Tensor | None, dD: torch.Tensor | None, *, chunk: int) -> None:
    """p2: dA_log += A Σ s Δ a h_{t-1} and dD += Σ dy u over the micro-batches, each recomputed
    from its saved inputs and boundary states (one launch per micro-batch: the parameters
    are [E, N] + [E], so there is no reduction worth fusing across them), summed in fp32 in
    micro-batch order and added once."""
    if dA_log is None and dD is None:
        return
    zeros_d = torch.zeros(A_log.shape[0], device=A_log.device, dtype=torch.float32)
    tot_a = tot_d = None
    for dy, u, delta, B, C, H in zip(dys, us, deltas, Bs, Cs, Hs):
        _, (ga, gd) = scan_bwd(dy, u, delta, B, C, A_log, zeros_d, H, chunk=chunk, input_grads=False,
                               param_grads=True)
        tot_a = ga if tot_a is None else tot_a.add_(ga)
        tot_d = gd if tot_d is None else tot_d.add_(gd)
    if dA_log is not None:
        dA_log.add_(tot_a.to(dA_log.dtype))
    if dD is not None:
        dD.add_(tot_d.to(dD.dtype))
