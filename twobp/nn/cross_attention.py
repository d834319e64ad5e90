"""TwoBPAttention's general path: cross-attention, any mask, attention dropout.

    out = out_proj( SDPA( q = X_q W_qᵀ + b_q,  k = X_k W_kᵀ + b_k,  v = X_v W_vᵀ + b_v,  mask, dropout ) )

Shapes (B batch, L query length, S key length, E = H·D, kdim / vdim the key / value
widths): query [B, L, E], key [B, S, kdim], value [B, S, vdim] (batch_first; [L, B, E] ...
otherwise; unbatched [L, E] ...). out [B, L, E].

* **Projections**, split: W_q, W_k, W_v are row blocks of the packed ``in_proj_weight``
  [3E, E] (or the separate ``q/k/v_proj_weight`` when kdim/vdim != E) and the biases row
  blocks of ``in_proj_bias`` [3E]. Self-attention input (key and value the query tensor)
  is one packed GEMM through :class:`~twobp.ops.linear.LinearOp`; otherwise one
  :class:`~twobp.ops.projections.ProjectionsOp` call (k and v of one memory tensor in one
  GEMM). Their dW, db are p2 either way; out_proj is the module's TwoBPLinear.
* **Core**, torch's ``F.scaled_dot_product_attention`` under autograd: it has no weights,
  so its whole backward is p1, as in :class:`~twobp.ops.attention.AttentionCoreOp`.
* **Masks** merged as ``nn.MultiheadAttention`` merges them: bool masks become -inf where
  True; ``attn_mask`` (L, S) or (B·H, L, S) plus ``key_padding_mask`` (B, S) broadcast over
  heads and queries; the module's ``causal`` adds -inf above the diagonal (query i sees
  keys j <= i). ``dropout`` applies to the attention weights in training, drawing from
  torch's RNG exactly as ``nn.MultiheadAttention`` does.

Saved until p2: the projection inputs (query, and key/value when they differ) and the flat
dQKV; o and dOut for out_proj. The core keeps q, k, v, o (and its statistics) until p1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..autograd import split_apply
from ..ops.linear import LinearOp
from ..ops.projections import ProjectionsOp, merge_groups, split_outputs

__all__ = ["general_attention", "merged_mask"]

_LINEAR = LinearOp()


def merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, *, b: int, h: int, l: int, s: int,
                causal: bool, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The additive float mask [B or 1, H or 1, L, S] SDPA takes, or None for no mask.

    ``attn_mask``: (L, S) or (B·H, L, S), bool (True = blocked) or additive float.
    ``key_padding_mask``: (B, S), bool (True = ignore that key) or additive float.
    ``causal``: also block key j > query i.
    """
    kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=dtype)
    am = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                           target_type=dtype, check_other=False)
    mask = None
    if am is not None:
        if am.dim() == 2 and tuple(am.shape) == (l, s):
            mask = am.view(1, 1, l, s)
        elif am.dim() == 3 and tuple(am.shape) == (b * h, l, s):
            mask = am.view(b, h, l, s)
        else:
            raise ValueError(f"TwoBPAttention: attn_mask must be (L, S) = {(l, s)} or (B·H, L, S) = {(b * h, l, s)}, "
                             f"got {tuple(am.shape)}")
    if kpm is not None:
        if tuple(kpm.shape) != (b, s):
            raise ValueError(f"TwoBPAttention: key_padding_mask must be (B, S) = {(b, s)} (or (S,) unbatched), got "
                             f"{tuple(kpm.shape)}")
        kpm = kpm.view(b, 1, 1, s)
        mask = kpm if mask is None else mask + kpm
    if causal and mask is not None:
        future = torch.ones(l, s, dtype=torch.bool, device=device).triu(1)
        mask = mask.masked_fill(future, float("-inf"))
    return mask


def _layout(m, t: Tensor, unbatched: bool) -> Tensor:
    """[B, T, C] from the module's layout."""
    if unbatched:
        return t.unsqueeze(0)
    return t if m.batch_first else t.transpose(0, 1)


def _project(m, label: str, qb: Tensor, kb: Tensor, vb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, L, H·D], k, v [B, S, Hkv·D] through the split projections (module docstring)."""
    h, d = m.num_heads, m.head_dim
    eq, ekv = h * d, (m.num_kv_heads or h) * d
    if m.in_proj_weight is not None and kb is qb and vb is qb:
        qkv = split_apply(_LINEAR, m, f"{label}.in_proj", (qb,), (m.in_proj_weight, m.in_proj_bias))
        return qkv.split([eq, ekv, ekv], dim=-1)
    inputs: list[Tensor] = []  # the distinct input tensors, in first-use order
    for t in (qb, kb, vb):
        if not any(t is u for u in inputs):
            inputs.append(t)

    def idx(t):
        return next(i for i, u in enumerate(inputs) if u is t)

    if m.in_proj_weight is not None:
        params = (m.in_proj_weight, m.in_proj_bias)
        wanted = [(idx(qb), 0, 0, eq, 0), (idx(kb), 0, eq, eq + ekv, eq), (idx(vb), 0, eq + ekv, eq + 2 * ekv, eq + ekv)]
    else:
        e = m.embed_dim
        params = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight, m.in_proj_bias)
        wanted = [(idx(qb), 0, 0, e, 0), (idx(kb), 1, 0, e, e), (idx(vb), 2, 0, e, 2 * e)]
    op = ProjectionsOp.for_call(wanted, inputs)
    flat = split_apply(op, m, f"{label}.in_proj", inputs, params)
    blocks = split_outputs(flat, op.rows, [r1 - r0 for _, _, r0, r1, _ in op.groups])
    out = []
    for i, w, r0, r1, _ in wanted:  # each wanted block is columns of one merged block
        j = next(j for j, g in enumerate(op.groups) if g[0] == i and g[1] == w and g[2] <= r0 and r1 <= g[3])
        col = r0 - op.groups[j][2]
        t = (qb, kb, vb)[len(out)]
        out.append(blocks[j][:, col:col + (r1 - r0)].view(*t.shape[:-1], r1 - r0))
    return out[0], out[1], out[2]


def general_attention(m, query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Tensor | None,
                      attn_mask: Tensor | None, causal: bool) -> Tensor:
    """Attention of ``m`` (a TwoBPAttention) on any inputs torch's MHA takes (module docstring)."""
    from .attention import apply_rotary

    m._check_supported()
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"TwoBPAttention: query, key and value must all be 3-D (batched) or all 2-D (unbatched), "
                         f"got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    for name, t, width in (("query", query, m.embed_dim), ("key", key, m.kdim), ("value", value, m.vdim)):
        if t.shape[-1] != width:
            raise ValueError(f"TwoBPAttention: {name} must have last dim {width}, got shape {tuple(t.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"TwoBPAttention: key {tuple(key.shape)} and value {tuple(value.shape)} must agree in all "
                         "but the last dim")
    unbatched = query.dim() == 2
    qb = _layout(m, query, unbatched)                                    # (B, L, E)
    kb = qb if key is query else _layout(m, key, unbatched)              # (B, S, kdim)
    vb = qb if value is query else kb if value is key else _layout(m, value, unbatched)  # (B, S, vdim)
    if kb.shape[0] != qb.shape[0]:
        raise ValueError(f"TwoBPAttention: query batch {qb.shape[0]} != key batch {kb.shape[0]}")
    if unbatched and key_padding_mask is not None:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    b, l, s = qb.shape[0], qb.shape[1], kb.shape[1]
    h, d = m.num_heads, m.head_dim
    hkv = m.num_kv_heads or h
    label = m.twobp_label()
    q, k, v = _project(m, label, qb, kb, vb)
    q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))  # (B, T, heads, D)
    if m.rotary:
        q, k = apply_rotary(q, m.rope_theta), apply_rotary(k, m.rope_theta)
    mask = merged_mask(attn_mask, key_padding_mask, b=b, h=h, l=l, s=s, causal=causal, dtype=q.dtype,
                       device=q.device)
    dropout_p = m.dropout if m.training else 0.0
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       dropout_p=dropout_p, is_causal=causal and mask is None,
                                       enable_gqa=hkv != h)      # (B, H, L, D)
    # (L, B, E) in memory, as nn.MultiheadAttention lays its output out (batch_first returns a
    # transposed view): a dropout after this layer then draws the same mask as after torch's
    o = o.permute(2, 0, 1, 3).reshape(l, b, m.embed_dim)         # (L, B, E)
    out = m._out_proj(o, label)
    if unbatched:
        return out.squeeze(1)
    return out.transpose(0, 1) if m.batch_first else out
