"""The attention core, split: O = softmax(c Q Kᵀ [+ causal mask]) V, with no weights.

Shapes: q [B, S, H, D]; k, v [B, S, Hkv, D] (H a multiple of Hkv: query head h reads
key/value head h // (H/Hkv), grouped-query attention); o [B, S, H, D]; lse [B, H, S], the
log-sum-exp of each row of scaled scores, kept in fp32. ``c = sm_scale`` (default 1/sqrt(D)).

* forward: O and lse.
* p1 (dQ, dK, dV): needs q, k, v, o and lse, so p1 saves exactly those (lse is the only
  extra: B·H·S fp32, against the B·H·S² probabilities a plain softmax would keep).
* p2: there are no parameters, so nothing is saved for it and ``param_grads`` does nothing.

Lifetime. The split machinery puts saved tensors into the activation store only when the
op has a parameter that needs a gradient; this op has none, so its p1 set stays on the
autograd node, exactly as in plain autograd, and is freed when p1 (its backward) runs.
In a module such as :class:`twobp.nn.TwoBPAttention` the tensors are mostly views of
storages the projections' p2 entries hold anyway (q, k, v view the QKV projection's
output; o is the input the output projection saves for its dW).

The Triton backend is :mod:`twobp.kernels.attention` (flash attention: S² never stored);
the torch reference below runs aten's CPU flash attention (forward and backward, which
is what ``F.scaled_dot_product_attention`` runs on CPU) and materialises the scores on
other devices.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..backend import gemm_backend
from .base import Saved, SplitOp

__all__ = ["AttentionCoreOp", "attention_fwd_ref", "attention_dx_ref"]

_ATEN = torch.ops.aten


def _scale(sm_scale: float | None, d: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not sm_scale > 0 \
            or not math.isfinite(sm_scale):
        raise ValueError(f"attention: sm_scale must be a positive finite float or None "
                         f"(1/sqrt(head_dim)), got {sm_scale!r}")
    return float(sm_scale)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shape, dtype and device agreement of q, k, v (torch-only, no head-dim limit)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [batch, seq, heads, head_dim], got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be floating point, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} dtype {t.dtype} differs from q's {q.dtype}; cast it with "
                            f".to({q.dtype})")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}; move it with "
                             f".to({str(q.device)!r})")
    b, s, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"attention: k/v shape {tuple(k.shape)} must be [B={b}, S={s}, Hkv, D={d}] to "
                         f"match q {tuple(q.shape)} (self-attention: same batch, sequence, head dim)")
    hkv = k.shape[2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"attention: q heads H={h} must be a multiple of the k/v heads Hkv={hkv} "
                         "(grouped-query attention); choose num_kv_heads dividing num_heads")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q -> [B, Hkv, G, S, D]; k, v -> [B, Hkv, 1, S, D] in the compute dtype (G = H / Hkv)."""
    b, s, h, d = q.shape
    hkv = k.shape[2]
    ct = _compute_dtype(q.dtype)
    qg = q.to(ct).view(b, s, hkv, h // hkv, d).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, S, D)
    kg = k.to(ct).permute(0, 2, 1, 3).unsqueeze(2)                     # (B, Hkv, 1, S, D)
    vg = v.to(ct).permute(0, 2, 1, 3).unsqueeze(2)                     # (B, Hkv, 1, S, D)
    return qg, kg, vg


def _scores(qg: Tensor, kg: Tensor, scale: float, causal: bool) -> Tensor:
    s = (qg @ kg.transpose(-1, -2)) * scale  # (B, Hkv, G, S, S)
    if causal:
        n = s.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return s


def _attention_fwd_math(q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                      sm_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """(o, lse) with the S x S scores materialised, fp32 (fp64 for fp64 inputs)."""
    b, s, h, d = q.shape
    scale = _scale(sm_scale, d)
    qg, kg, vg = _grouped(q, k, v)
    scores = _scores(qg, kg, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)                     # (B, Hkv, G, S)
    o = torch.exp(scores - lse.unsqueeze(-1)) @ vg            # (B, Hkv, G, S, D)
    o = o.permute(0, 3, 1, 2, 4).reshape(b, s, h, d)          # (B, S, H, D)
    return o.to(q.dtype), lse.reshape(b, h, s)


def _attention_dx_math(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, *,
                     causal: bool, sm_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) with the kernels' formulas (P recomputed from lse), scores materialised."""
    b, s, h, d = q.shape
    hkv, g = k.shape[2], h // k.shape[2]
    scale = _scale(sm_scale, d)
    ct = _compute_dtype(q.dtype)
    qg, kg, vg = _grouped(q, k, v)
    dog = do.to(ct).view(b, s, hkv, g, d).permute(0, 2, 3, 1, 4)   # (B, Hkv, G, S, D)
    og = o.to(ct).view(b, s, hkv, g, d).permute(0, 2, 3, 1, 4)
    lseg = lse.to(ct).view(b, hkv, g, s, 1)
    p = torch.exp(_scores(qg, kg, scale, causal) - lseg)            # (B, Hkv, G, S, S)
    dv = (p.transpose(-1, -2) @ dog).sum(2)                         # (B, Hkv, S, D)
    dp = dog @ vg.transpose(-1, -2)
    delta = (dog * og).sum(-1, keepdim=True)                        # δ = rowsum(dO ∘ O)
    ds = p * (dp - delta)
    dq = (ds @ kg) * scale                                          # (B, Hkv, G, S, D)
    dk = (ds.transpose(-1, -2) @ qg).sum(2) * scale                 # (B, Hkv, S, D)
    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, s, h, d)
    return dq.to(q.dtype), dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype)


def _cpu_flash(t: Tensor) -> bool:
    return t.device.type == "cpu" and hasattr(_ATEN, "_scaled_dot_product_flash_attention_for_cpu")


def _heads_first(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # [B, S, H, D] <-> [B, H, S, D], a view


def attention_fwd_ref(q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                      sm_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """(o, lse) through torch: aten's CPU flash attention on CPU (GQA natively, no S x S
    matrix), the materialised scores elsewhere; accumulation in fp32 (fp64 for fp64)."""
    _check_qkv(q, k, v)
    scale = _scale(sm_scale, q.shape[-1])
    if _cpu_flash(q):
        o, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, scale=scale)
        return _heads_first(o), lse  # o [B, S, H, D] (aten lays it out so: contiguous), lse [B, H, S]
    return _attention_fwd_math(q, k, v, causal=causal, sm_scale=scale)


def attention_dx_ref(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, *,
                     causal: bool, sm_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the saved q, k, v, o, lse; aten's CPU flash backward on CPU."""
    _check_qkv(q, k, v)
    scale = _scale(sm_scale, q.shape[-1])
    if _cpu_flash(q) and lse.dtype == _compute_dtype(q.dtype):
        dq, dk, dv = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(do), _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(o), lse,
            0.0, causal, scale=scale)
        return _heads_first(dq), _heads_first(dk), _heads_first(dv)
    return _attention_dx_math(do, q, k, v, o, lse, causal=causal, sm_scale=scale)


@functools.lru_cache(maxsize=None)
def _sdpa_takes_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5)."""
    t = torch.zeros(1, 2, 1, 2)
    try:
        torch.nn.functional.scaled_dot_product_attention(t, t[:, :1], t[:, :1], enable_gqa=True)
    except TypeError:
        return False
    return True


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class AttentionCoreOp(SplitOp):
    """softmax(c Q Kᵀ) V as a split op: 3 inputs (q, k, v), no parameters.

    ``causal``: query i sees keys j <= i. ``sm_scale``: c, default 1/sqrt(head_dim).
    p1 saves q, k, v, o, lse (fp32); p2 saves nothing.
    """

    causal: bool = False
    sm_scale: float | None = None
    name = "attention"
    autocast = "lower"  # under torch.autocast: run in the autocast dtype, as SDPA does

    def __post_init__(self) -> None:
        if not isinstance(self.causal, bool):
            raise TypeError(f"AttentionCoreOp: causal must be a bool, got {self.causal!r}")
        if self.sm_scale is not None:
            _scale(self.sm_scale, 1)

    def forward(self, inputs, params, *, save_p1, save_p2):
        if len(inputs) != 3 or params:
            raise ValueError(f"AttentionCoreOp takes inputs (q, k, v) and no params, got "
                             f"{len(inputs)} inputs and {len(params)} params")
        q, k, v = inputs
        _check_qkv(q, k, v)
        if gemm_backend(q.device, q.dtype, "attention") == "triton":
            from ..kernels.attention import attention_fwd
            o, lse = attention_fwd(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v),
                                   causal=self.causal, sm_scale=self.sm_scale)
        else:
            o, lse = attention_fwd_ref(q, k, v, causal=self.causal, sm_scale=self.sm_scale)
        p1: Saved = {"q": q, "k": k, "v": v, "o": o, "lse": lse} if save_p1 else {}
        return o, p1, {}

    def native_forward(self, inputs, params):
        """torch's own SDPA, as the twin's torch module runs it: one aten call whose C++ node
        computes dQ, dK, dV with no Python of ours. The core has no weights, so there is
        nothing to defer and a split region takes this path too. Like torch's, its CPU flash
        backward has no double backward; under ``sdpa_kernel(SDPBackend.MATH)`` it has."""
        q, k, v = inputs
        if gemm_backend(q.device, q.dtype, "attention") != "torch" or (k.shape[2] != q.shape[2]
                                                                      and not _sdpa_takes_gqa()):
            return None
        _check_qkv(q, k, v)
        o = torch.nn.functional.scaled_dot_product_attention(
            _heads_first(q), _heads_first(k), _heads_first(v), is_causal=self.causal,
            scale=_scale(self.sm_scale, q.shape[-1]), **({"enable_gqa": True} if k.shape[2] != q.shape[2] else {}))
        return _heads_first(o)

    def differentiable_forward(self, inputs, params):
        q, k, v = inputs
        return _attention_fwd_math(q, k, v, causal=self.causal, sm_scale=self.sm_scale)[0]

    def input_grads(self, dy, saved, params, needs):
        q, k, v, o, lse = (saved[n] for n in ("q", "k", "v", "o", "lse"))
        if gemm_backend(dy.device, dy.dtype, "attention") == "triton":
            from ..kernels.attention import attention_dx
            grads = attention_dx(_last_contiguous(dy), _last_contiguous(q), _last_contiguous(k),
                                 _last_contiguous(v), o, lse, causal=self.causal, sm_scale=self.sm_scale)
        else:
            grads = attention_dx_ref(dy, q, k, v, o, lse, causal=self.causal, sm_scale=self.sm_scale)
        return tuple(g if need else None for g, need in zip(grads, needs))

    def param_grads(self, dys: Sequence[Tensor], saved: Sequence[Saved],
                    grads: Sequence[Tensor | None]) -> None:
        """No parameters: nothing to accumulate."""
        return None
