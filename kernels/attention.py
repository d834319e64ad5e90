"""Flash attention, split: a forward and a backward that is all p1 (the core has no weights).

Shapes (B batch, S sequence, H query heads, Hkv key/value heads, D head dim, G = H / Hkv):

* q [B, S, H, D]; k, v [B, S, Hkv, D]. Any strides, last dim contiguous, so the QKV
  projection's output [B, S, (H + 2 Hkv) D] viewed per head needs no copy. Query head h
  reads key/value head h // G (grouped-query attention, GQA; G = 1 is plain multi-head).
* o [B, S, H, D] (contiguous); lse [B, H, S] fp32 (contiguous).

Math, per (batch, query head); ``c = sm_scale`` (default 1/sqrt(D)), the causal mask keeps
key j for query i iff j <= i:

* forward:  S = c Q Kᵀ,  P = softmax(S) row-wise,  O = P V,  lse_i = log Σ_j exp(S_ij).
  Computed blockwise with the online softmax: per query block keep the running row max
  m, the running sum l = Σ exp(S - m) and acc = Σ exp(S - m) V, all fp32; rescale by
  exp(m_old - m_new) when the max grows. S never exists in memory.
* backward (p1; there is no p2): with δ_i = Σ_d dO_id O_id (the preprocess kernel),
  P recomputed as exp(S - lse),
      dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP - δ),   dQ = c dS K,   dK = c dSᵀ Q.
  δ_i equals Σ_j P_ij dP_ij, so dS needs no second pass over the row. For GQA, dK and dV
  of a kv head sum over its G query heads.

exp2: ``exp(x) = 2^(x log2 e)``. The kernels fold log2 e = 1/ln 2 into the score scale
(``qk_scale = c / ln 2``) and use exp2, the GPU's native instruction; lse is stored in
natural-log units (converted back with a factor ln 2) so it matches the torch reference.

Kernels and work (causal: about half of each FLOP count):

* ``_attn_fwd_kernel``, grid (S / BLOCK_M, B·H): 4 B H S² D FLOPs (two matmuls).
  Reads Q once and K, V once per query block (from L2), writes O and lse.
* ``_attn_bwd_preprocess_kernel``, grid (S / BLOCK_M, B·H): δ, reads O and dO once.
* ``_attn_bwd_dkdv_kernel``, grid (S / BLOCK_N, B·Hkv): one program owns a key block and
  loops over all query blocks of all G query heads of its kv head (one flat loop over
  (head, block) pairs): recomputes Sᵀ, dPᵀ and accumulates dV, dK in registers (fp32):
  8 B H S² D FLOPs.
* ``_attn_bwd_dq_kernel``, grid (S / BLOCK_M, B·H): one program owns a query block and loops
  over key blocks: recomputes S, dP and accumulates dQ: 6 B H S² D FLOPs.

Design trade-off: the backward is 14 B H S² D FLOPs instead of flash-attention-2's 10,
because S and dP are recomputed by both the dK/dV and the dQ kernels. In exchange no
gradient is accumulated with atomics: every output element has one owner program, so the
backward is deterministic (bit-identical run to run) and needs no zero-initialised
buffers. Head dims are padded to a power of two >= 16 (``HEAD_DIM_P``) with masked loads;
D up to 128 keeps the fp32 accumulators in registers.

Memory (what autograd must keep for the backward): q, k, v, o and lse, i.e. the
activation itself; nothing of size S², and nothing for a p2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import DTYPES as _DTYPES, INTERPRET as _INTERPRET
from ._targets import ConfigTable, make_prune

__all__ = ["attention_fwd", "attention_dx", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2  # 1/ln 2: exp(x) = exp2(x * log2(e))


# ---------------------------------------------------------------------------------------
# configs per launch class (architecture, dtype class, padded head dim; see _targets.py);
# one tiny config under the interpreter (CPU tests)
# ---------------------------------------------------------------------------------------
def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> triton.Configs."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


_INTERPRET_CONFIGS = _configs([(16, 16, 1, 1)]) if _INTERPRET else None
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per launch class, best first. Each is checked by the
# AOT sweep (bench/results/aot-sweep.md) at the model shapes: no spills, shared memory within
# the target's limit, wgmma on sm_90 in 16-bit. What shaped them:
# - at D = 128 the fp32 accumulators (acc / dQ / dK + dV) and the operands of a block fill the
#   register file: 4-warp 128-row forward and dQ blocks spill, as do 64-row dK/dV blocks
#   with 4 warps; ptxas for sm_80 and for sm_90 spill on different configs;
# - exact fp32 ("ieee") multiplies in registers: only 16- and 32-wide blocks fit, and 16-bit
#   tiles would also need more shared memory than an A100 block has (dQ at D = 128 asked for
#   172-295 KB of 163); the fp32 lists hold for every head dim up to 128.
_FWD_16 = {
    ("sm_90", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 3)],
    ("sm_80", 128): [(128, 64, 8, 4), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 32, 4, 3)],
    "small": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 3)],
}
_DQ_16 = {
    ("sm_90", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("sm_80", 128): [(64, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3)],
    "small": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
}
# dK/dV: BLOCK_N keys owned by a program, a loop over BLOCK_M queries
_DKDV_16 = {
    ("sm_90", 128): [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (16, 64, 4, 4)],
    ("sm_80", 128): [(64, 64, 8, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (16, 64, 4, 4)],
    "small": [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 4)],
}
_FWD_32 = {"sm_90": [(32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
           "sm_80": [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)]}
_DQ_32 = {"sm_90": [(32, 32, 4, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
          "sm_80": [(32, 32, 4, 2), (16, 64, 8, 2), (16, 32, 4, 2)]}
_DKDV_32 = {"sm_90": [(16, 64, 8, 1), (32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
            "sm_80": [(16, 64, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2)]}
_HEAD_DIMS = (16, 32, 64, 128)  # HEAD_DIM_P: D padded to a power of two >= 16


def _table(half: dict, full: dict) -> ConfigTable:
    lists = {}
    for arch in ("sm_90", "sm_80"):
        for hd in _HEAD_DIMS:
            lists[(arch, "16-bit", hd)] = _configs(half.get((arch, hd), half["small"]))
            lists[(arch, "fp32", hd)] = _configs(full[arch])
    return ConfigTable(lists, _INTERPRET_CONFIGS)


_FWD_TABLE = _table(_FWD_16, _FWD_32)
_DQ_TABLE = _table(_DQ_16, _DQ_32)
_DKDV_TABLE = _table(_DKDV_16, _DKDV_32)


def _head_class(meta) -> tuple[int]:
    return (meta["HEAD_DIM_P"],)


_prune_fwd = make_prune(_FWD_TABLE, "q_ptr", extra=_head_class)
_prune_dq = make_prune(_DQ_TABLE, "q_ptr", extra=_head_class)
_prune_dkdv = make_prune(_DKDV_TABLE, "q_ptr", extra=_head_class)
_PRE_BLOCK_M = 16 if _INTERPRET else 128
_KEYS = ["HEAD_DIM_P", "CAUSAL", "seq_bucket"]


# ---------------------------------------------------------------------------------------
# shared helper
# ---------------------------------------------------------------------------------------
@triton.jit
def _rows_ptrs(base,                       # pointer to row 0 of one (batch, head), element 0
               start,                      # first row of the block
               stride_row,                 # elements between consecutive rows
               ROWS: tl.constexpr,         # rows in the block
               offs_d):                    # [HEAD_DIM_P] column offsets
    """[ROWS, HEAD_DIM_P] pointers to rows start..start+ROWS-1. The block start is offset in
    int64 (start · stride may pass 2^31 at long sequences with a packed QKV row), the rows
    inside the block in int32."""
    blk = base + tl.cast(start, tl.int64) * stride_row
    return blk + tl.arange(0, ROWS)[:, None] * stride_row + offs_d[None, :]


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q,
                    k_base,          # pointer to k[b, 0, h_kv, 0]
                    v_base,          # pointer to v[b, 0, h_kv, 0]
                    stride_ks,       # k stride along the sequence
                    stride_vs,       # v stride along the sequence
                    offs_m,          # [BLOCK_M] query rows of this program
                    offs_d,          # [HEAD_DIM_P] head-dim offsets
                    d_mask,          # [HEAD_DIM_P] offs_d < HEAD_DIM
                    seq_len,         # S
                    lo, hi,          # key range [lo, hi) to visit, lo a multiple of BLOCK_N
                    qk_scale,        # sm_scale / ln 2: scores in log2 units
                    MASKED: tl.constexpr,         # apply the tail (and causal) mask to scores
                    CAUSAL: tl.constexpr,         # key j visible to query i iff j <= i
                    BLOCK_N: tl.constexpr,        # keys per step
                    DOT_PRECISION: tl.constexpr):  # tl.dot input_precision (fp32 inputs)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
        k = tl.load(_rows_ptrs(k_base, start_n, stride_ks, BLOCK_N, offs_d), mask=kv_mask, other=0.0)
        # s: [BLOCK_M, BLOCK_N] scores in log2 units, c q·k / ln 2
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        # online softmax; every row sees >= 1 key in the first block it visits (key 0), so
        # m_new is finite and exp2(-inf - m_new) = 0 for masked scores
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)           # rescales the old l and acc
        p = tl.math.exp2(s - m_new[:, None])        # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_rows_ptrs(v_base, start_n, stride_vs, BLOCK_N, offs_d), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_FWD_TABLE.configs, key=_KEYS, prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _attn_fwd_kernel(q_ptr,            # q [B, S, H, D], last dim contiguous
                     k_ptr,            # k [B, S, Hkv, D], last dim contiguous
                     v_ptr,            # v [B, S, Hkv, D], last dim contiguous
                     o_ptr,            # out: o [B, S, H, D], last dim contiguous
                     lse_ptr,          # out: lse [B, H, S] fp32, contiguous (natural log)
                     stride_qb, stride_qs, stride_qh,
                     stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh,
                     stride_ob, stride_os, stride_oh,
                     seq_len,          # S
                     num_heads,        # H
                     group,            # G = H / Hkv: query heads per kv head
                     qk_scale,         # sm_scale / ln 2
                     seq_bucket,       # next power of two of S: autotune key only
                     HEAD_DIM: tl.constexpr,       # D
                     HEAD_DIM_P: tl.constexpr,     # D padded to a power of two >= 16
                     CAUSAL: tl.constexpr,         # causal mask
                     DOT_PRECISION: tl.constexpr,  # tl.dot input_precision
                     BLOCK_M: tl.constexpr,        # query rows per program
                     BLOCK_N: tl.constexpr):       # keys per inner step
    tl.static_assert(HEAD_DIM <= HEAD_DIM_P)
    tl.static_assert(HEAD_DIM_P >= 16)
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    off_hk = off_h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seq_len

    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_hk * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hk * stride_vh
    q = tl.load(_rows_ptrs(q_base, start_m, stride_qs, BLOCK_M, offs_d),
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                # running Σ exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)    # running Σ exp2(s - m_i) v

    # key blocks [0, full_hi) need no mask: in range, and (causal) wholly at or below the
    # diagonal of every row of this block; [full_hi, hi) are masked.
    full_tail = (seq_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, full_tail)
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_hi = full_tail
        hi = seq_len
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                                    offs_m, offs_d, d_mask, seq_len, 0, full_hi, qk_scale,
                                    False, CAUSAL, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                                    offs_m, offs_d, d_mask, seq_len, full_hi, hi, qk_scale,
                                    True, CAUSAL, BLOCK_N, DOT_PRECISION)

    o = acc / l_i[:, None]
    o_base = o_ptr + off_b * stride_ob + off_h * stride_oh
    tl.store(_rows_ptrs(o_base, start_m, stride_os, BLOCK_M, offs_d), o.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 -> natural log: times ln 2
    tl.store(lse_ptr + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=m_mask)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(o_ptr,        # o [B, S, H, D], last dim contiguous
                                do_ptr,       # dO [B, S, H, D], last dim contiguous
                                delta_ptr,    # out: δ [B, H, S] fp32, contiguous
                                stride_ob, stride_os, stride_oh,
                                stride_dob, stride_dos, stride_doh,
                                seq_len,      # S
                                num_heads,    # H
                                HEAD_DIM: tl.constexpr,    # D
                                HEAD_DIM_P: tl.constexpr,  # D padded to a power of two
                                BLOCK_M: tl.constexpr):    # rows per program
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask = (offs_m < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_rows_ptrs(o_ptr + off_b * stride_ob + off_h * stride_oh, start_m, stride_os, BLOCK_M,
                           offs_d), mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_rows_ptrs(do_ptr + off_b * stride_dob + off_h * stride_doh, start_m, stride_dos,
                            BLOCK_M, offs_d), mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)  # δ_i = Σ_d dO_id O_id
    tl.store(delta_ptr + pid_bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v,
                         q_head0,      # pointer to q[b, 0, h0, 0], h0 the first query head of this kv head
                         do_head0,     # pointer to dO[b, 0, h0, 0]
                         lse_head0,    # pointer to lse[b, h0, 0]
                         delta_head0,  # pointer to δ[b, h0, 0]
                         stride_qh,    # q stride between heads
                         stride_doh,   # dO stride between heads
                         stride_qs,    # q stride along the sequence
                         stride_dos,   # dO stride along the sequence
                         offs_n,       # [BLOCK_N] key rows of this program
                         offs_d,       # [HEAD_DIM_P]
                         d_mask,       # [HEAD_DIM_P] offs_d < HEAD_DIM
                         seq_len,      # S
                         group,        # G query heads sharing the kv head, visited in order
                         lo, hi,       # query range [lo, hi) in every head, lo a multiple of BLOCK_M
                         qk_scale,     # sm_scale / ln 2
                         MASKED: tl.constexpr,         # mask query tail (and causal)
                         CAUSAL: tl.constexpr,
                         BLOCK_M: tl.constexpr,        # queries per step
                         DOT_PRECISION: tl.constexpr):
    """dK, dV += the contributions of query rows [lo, hi) of the G query heads. One flat loop
    over (head g, query block): a loop over heads around the query-block loop would hold dK,
    dV, K and V live across two loop levels, which at D = 128 spilled on every config (the
    AOT sweep); flat, GQA compiles like plain multi-head attention."""
    n_blocks = tl.maximum(tl.cdiv(hi - lo, BLOCK_M), 0)
    for t in range(0, group * n_blocks):
        g = t // n_blocks
        start_m = tl.multiple_of(lo + (t - g * n_blocks) * BLOCK_M, BLOCK_M)
        q_base = q_head0 + g * stride_qh
        do_base = do_head0 + g * stride_doh
        lse_row = lse_head0 + g * seq_len
        delta_row = delta_head0 + g * seq_len
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seq_len
        qd_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(_rows_ptrs(q_base, start_m, stride_qs, BLOCK_M, offs_d), mask=qd_mask, other=0.0)
        lse2 = tl.load(lse_row + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634  # to log2
        # transposed scores sᵀ [BLOCK_N, BLOCK_M], so P ends up keyed by this program's keys
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        if MASKED:
            keep = m_mask[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        do = tl.load(_rows_ptrs(do_base, start_m, stride_dos, BLOCK_M, offs_d), mask=qd_mask, other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)   # dV += Pᵀ dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)          # dPᵀ = V dOᵀ
        delta = tl.load(delta_row + offs_m, mask=m_mask, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])                                   # dSᵀ (unscaled)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)    # dK += dSᵀ Q
    return dk, dv


@triton.autotune(configs=_DKDV_TABLE.configs, key=_KEYS,
                  prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr,        # q [B, S, H, D]
                          k_ptr,        # k [B, S, Hkv, D]
                          v_ptr,        # v [B, S, Hkv, D]
                          do_ptr,       # dO [B, S, H, D]
                          lse_ptr,      # lse [B, H, S] fp32 (natural log)
                          delta_ptr,    # δ [B, H, S] fp32
                          dk_ptr,       # out: dK [B, S, Hkv, D]
                          dv_ptr,       # out: dV [B, S, Hkv, D]
                          stride_qb, stride_qs, stride_qh,
                          stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh,
                          stride_dob, stride_dos, stride_doh,
                          stride_dkb, stride_dks, stride_dkh,
                          stride_dvb, stride_dvs, stride_dvh,
                          seq_len,      # S
                          num_heads,    # H
                          group,        # G = H / Hkv
                          sm_scale,     # c
                          qk_scale,     # c / ln 2
                          seq_bucket,   # autotune key only
                          HEAD_DIM: tl.constexpr,
                          HEAD_DIM_P: tl.constexpr,
                          CAUSAL: tl.constexpr,
                          DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr,    # queries per inner step
                          BLOCK_N: tl.constexpr):   # keys owned by a program
    tl.static_assert(HEAD_DIM <= HEAD_DIM_P)
    tl.static_assert(HEAD_DIM_P >= 16)
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    num_kv_heads = num_heads // group
    off_b = (pid_bhk // num_kv_heads).to(tl.int64)
    off_hk = (pid_bhk % num_kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
    k = tl.load(_rows_ptrs(k_ptr + off_b * stride_kb + off_hk * stride_kh, start_n, stride_ks, BLOCK_N,
                           offs_d), mask=kv_mask, other=0.0)
    v = tl.load(_rows_ptrs(v_ptr + off_b * stride_vb + off_hk * stride_vh, start_n, stride_vs, BLOCK_N,
                           offs_d), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_P], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_P], dtype=tl.float32)

    # Query blocks: [lo, mid) straddle the diagonal (causal only, masked), [mid, full_end)
    # need no mask, [max(mid, full_end), S) hold the tail past S (masked).
    full_end = (seq_len // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M           # first query block with a row >= start_n
        # first block start >= start_n + BLOCK_N - 1: every row sees every key of this program
        mid = lo + tl.cdiv(start_n + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    tail = tl.maximum(mid, full_end)
    # the G query heads sharing this kv head, in order: a deterministic sum, no atomics
    off_h0 = off_hk * group
    q_head0 = q_ptr + off_b * stride_qb + off_h0 * stride_qh
    do_head0 = do_ptr + off_b * stride_dob + off_h0 * stride_doh
    row0 = (off_b * num_heads + off_h0) * seq_len
    if CAUSAL:
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_head0, do_head0, lse_ptr + row0, delta_ptr + row0,
                                      stride_qh, stride_doh, stride_qs, stride_dos, offs_n, offs_d, d_mask,
                                      seq_len, group, lo, tl.minimum(mid, seq_len), qk_scale,
                                      True, CAUSAL, BLOCK_M, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_head0, do_head0, lse_ptr + row0, delta_ptr + row0,
                                  stride_qh, stride_doh, stride_qs, stride_dos, offs_n, offs_d, d_mask,
                                  seq_len, group, mid, full_end, qk_scale,
                                  False, CAUSAL, BLOCK_M, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_head0, do_head0, lse_ptr + row0, delta_ptr + row0,
                                  stride_qh, stride_doh, stride_qs, stride_dos, offs_n, offs_d, d_mask,
                                  seq_len, group, tail, seq_len, qk_scale,
                                  True, CAUSAL, BLOCK_M, DOT_PRECISION)
    dk = dk * sm_scale  # dK = c dSᵀ Q
    tl.store(_rows_ptrs(dk_ptr + off_b * stride_dkb + off_hk * stride_dkh, start_n, stride_dks, BLOCK_N,
                        offs_d), dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(_rows_ptrs(dv_ptr + off_b * stride_dvb + off_hk * stride_dvh, start_n, stride_dvs, BLOCK_N,
                        offs_d), dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta,
                       k_base,       # pointer to k[b, 0, h_kv, 0]
                       v_base,       # pointer to v[b, 0, h_kv, 0]
                       stride_ks,
                       stride_vs,
                       offs_m,       # [BLOCK_M] query rows of this program
                       offs_d,       # [HEAD_DIM_P]
                       d_mask,       # [HEAD_DIM_P]
                       seq_len,      # S
                       lo, hi,       # key range [lo, hi), lo a multiple of BLOCK_N
                       qk_scale,     # c / ln 2
                       MASKED: tl.constexpr,
                       CAUSAL: tl.constexpr,
                       BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
        k = tl.load(_rows_ptrs(k_base, start_n, stride_ks, BLOCK_N, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_rows_ptrs(v_base, start_n, stride_vs, BLOCK_N, offs_d), mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])      # P = exp(c q·k - lse)
        if MASKED:
            keep = offs_n[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)   # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])                               # dS (unscaled)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_TABLE.configs, key=_KEYS, prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit
def _attn_bwd_dq_kernel(q_ptr,        # q [B, S, H, D]
                        k_ptr,        # k [B, S, Hkv, D]
                        v_ptr,        # v [B, S, Hkv, D]
                        do_ptr,       # dO [B, S, H, D]
                        lse_ptr,      # lse [B, H, S] fp32 (natural log)
                        delta_ptr,    # δ [B, H, S] fp32
                        dq_ptr,       # out: dQ [B, S, H, D]
                        stride_qb, stride_qs, stride_qh,
                        stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh,
                        stride_dob, stride_dos, stride_doh,
                        stride_dqb, stride_dqs, stride_dqh,
                        seq_len,      # S
                        num_heads,    # H
                        group,        # G = H / Hkv
                        sm_scale,     # c
                        qk_scale,     # c / ln 2
                        seq_bucket,   # autotune key only
                        HEAD_DIM: tl.constexpr,
                        HEAD_DIM_P: tl.constexpr,
                        CAUSAL: tl.constexpr,
                        DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr,    # queries owned by a program
                        BLOCK_N: tl.constexpr):   # keys per inner step
    tl.static_assert(HEAD_DIM <= HEAD_DIM_P)
    tl.static_assert(HEAD_DIM_P >= 16)
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    off_hk = off_h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seq_len
    qd_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(_rows_ptrs(q_ptr + off_b * stride_qb + off_h * stride_qh, start_m, stride_qs, BLOCK_M,
                           offs_d), mask=qd_mask, other=0.0)
    do = tl.load(_rows_ptrs(do_ptr + off_b * stride_dob + off_h * stride_doh, start_m, stride_dos,
                            BLOCK_M, offs_d), mask=qd_mask, other=0.0)
    row = pid_bh.to(tl.int64) * seq_len
    lse2 = tl.load(lse_ptr + row + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634  # to log2
    delta = tl.load(delta_ptr + row + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)

    k_base = k_ptr + off_b * stride_kb + off_hk * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hk * stride_vh
    # same key-block split as the forward
    full_tail = (seq_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, full_tail)
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_hi = full_tail
        hi = seq_len
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                            offs_m, offs_d, d_mask, seq_len, 0, full_hi, qk_scale,
                            False, CAUSAL, BLOCK_N, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                            offs_m, offs_d, d_mask, seq_len, full_hi, hi, qk_scale,
                            True, CAUSAL, BLOCK_N, DOT_PRECISION)
    dq = dq * sm_scale  # dQ = c dS K
    tl.store(_rows_ptrs(dq_ptr + off_b * stride_dqb + off_h * stride_dqh, start_m, stride_dqs, BLOCK_M,
                        offs_d), dq.to(dq_ptr.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------
def _check_bshd(name: str, t: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"attention: {name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}; "
            "reshape a projection output [B, S, H*D] with .view(B, S, H, D)")
    if t.dtype not in _DTYPES:
        raise TypeError(f"attention: {name} dtype {t.dtype} is not supported by the Triton kernels; "
                        f"use one of {_DTYPES} (or the torch backend)")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"attention: {name} dtype {t.dtype} differs from q's {dtype}; cast it with "
                        f".to({dtype})")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"attention: {name} must have a contiguous last dim, got strides "
                         f"{tuple(t.stride())}; pass {name}.contiguous()")
    return t


def _check_same_device(**tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError(f"attention: tensors are on different devices {devs}; move them to one device")


def _check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    _check_bshd("q", q)
    _check_bshd("k", k, q.dtype)
    _check_bshd("v", v, q.dtype)
    _check_same_device(q=q, k=k, v=v)
    b, s, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(
            f"attention: k/v shape {tuple(k.shape)} must be [B={b}, S={s}, Hkv, D={d}] to match q "
            f"{tuple(q.shape)} (self-attention: same batch, sequence and head dim)")
    hkv = k.shape[2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"attention: q heads H={h} must be a multiple of the k/v heads Hkv={hkv} "
                         "(grouped-query attention); choose num_kv_heads dividing num_heads")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D={d} is outside the kernels' range 1..{MAX_HEAD_DIM}; "
                         "use more heads of a smaller dim, or the torch backend")
    if b == 0 or s == 0 or h == 0:
        raise ValueError(f"attention: empty input, q shape {tuple(q.shape)}")
    return b, s, h, hkv, d


def _scale(sm_scale: float | None, d: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not sm_scale > 0 \
            or not math.isfinite(sm_scale):
        raise ValueError(f"attention: sm_scale must be a positive finite float or None "
                         f"(1/sqrt(head_dim)), got {sm_scale!r}")
    return float(sm_scale)


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs follow torch's own matmul setting; 16-bit inputs use the default tensor cores
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return None


def _head_dim_p(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _out_buffer(name: str, buf: torch.Tensor | None, like: torch.Tensor, shape: tuple,
                dtype: torch.dtype) -> torch.Tensor:
    if buf is None:
        return torch.empty(shape, device=like.device, dtype=dtype)
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor or None, got {type(buf).__name__}")
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != like.device:
        raise ValueError(f"attention: output buffer {name} must be {tuple(shape)} {dtype} on "
                         f"{like.device}, got {tuple(buf.shape)} {buf.dtype} on {buf.device}")
    if shape[-1] > 1 and buf.stride(-1) != 1:
        raise ValueError(f"attention: output buffer {name} needs a contiguous last dim, got strides "
                         f"{tuple(buf.stride())}")
    return buf


def _check_causal(causal: object) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__} {causal!r}")
    return causal


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  sm_scale: float | None = None, o: torch.Tensor | None = None,
                  lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-attention forward: ``(o, lse)`` for q [B, S, H, D], k and v [B, S, Hkv, D].

    ``o`` [B, S, H, D] has q's dtype; ``lse`` [B, H, S] is fp32, the natural-log
    log-sum-exp of each row of scaled scores (what the backward needs). ``sm_scale``
    defaults to 1/sqrt(D). Optional ``o``/``lse`` are output buffers to write into.
    """
    causal = _check_causal(causal)
    b, s, h, hkv, d = _check_qkv(q, k, v)
    scale = _scale(sm_scale, d)
    o = _out_buffer("o", o, q, (b, s, h, d), q.dtype)
    lse = _out_buffer("lse", lse, q, (b, h, s), torch.float32)
    if not lse.is_contiguous():
        raise ValueError("attention: output buffer lse must be contiguous")
    grid = lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * h)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        s, h, h // hkv, scale * _LOG2E, triton.next_power_of_2(s),
        HEAD_DIM=d, HEAD_DIM_P=_head_dim_p(d), CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype))
    return o, lse


def attention_dx(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 o: torch.Tensor, lse: torch.Tensor, *, causal: bool, sm_scale: float | None = None,
                 dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                 dv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-attention backward: ``(dq, dk, dv)`` from dO and the forward's q, k, v, o, lse.

    ``causal`` and ``sm_scale`` must be the forward's. dk and dv of a kv head sum over its
    query heads. Optional ``dq``/``dk``/``dv`` are output buffers (any strides with a
    contiguous last dim, e.g. views into one packed dQKV buffer); they are overwritten.
    """
    causal = _check_causal(causal)
    b, s, h, hkv, d = _check_qkv(q, k, v)
    scale = _scale(sm_scale, d)
    _check_bshd("do", do, q.dtype)
    _check_bshd("o", o, q.dtype)
    for name, t in (("do", do), ("o", o)):
        if t.shape != q.shape:
            raise ValueError(f"attention: {name} shape {tuple(t.shape)} must equal q's {tuple(q.shape)}")
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != (b, h, s) \
            or not lse.is_contiguous():
        got = (f"{tuple(lse.shape)} {lse.dtype} contiguous={lse.is_contiguous()}"
               if isinstance(lse, torch.Tensor) else type(lse).__name__)
        raise ValueError(f"attention: lse must be the forward's contiguous fp32 [B={b}, H={h}, S={s}] "
                         f"log-sum-exp, got {got}")
    _check_same_device(q=q, do=do, o=o, lse=lse)
    dq = _out_buffer("dq", dq, q, tuple(q.shape), q.dtype)
    dk = _out_buffer("dk", dk, q, tuple(k.shape), q.dtype)
    dv = _out_buffer("dv", dv, q, tuple(v.shape), q.dtype)
    d_p = _head_dim_p(d)
    group = h // hkv
    bucket = triton.next_power_of_2(s)
    prec = _dot_precision(q.dtype)

    delta = torch.empty((b, h, s), device=q.device, dtype=torch.float32)
    _attn_bwd_preprocess_kernel[(triton.cdiv(s, _PRE_BLOCK_M), b * h)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        s, h, HEAD_DIM=d, HEAD_DIM_P=d_p, BLOCK_M=_PRE_BLOCK_M)

    grid_kv = lambda meta: (triton.cdiv(s, meta["BLOCK_N"]), b * hkv)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        s, h, group, scale, scale * _LOG2E, bucket,
        HEAD_DIM=d, HEAD_DIM_P=d_p, CAUSAL=causal, DOT_PRECISION=prec)

    grid_q = lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * h)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        s, h, group, scale, scale * _LOG2E, bucket,
        HEAD_DIM=d, HEAD_DIM_P=d_p, CAUSAL=causal, DOT_PRECISION=prec)
    return dq, dk, dv
