"""TorchAttention: TwoBPAttention's math in plain torch ops, for A/B runs against torch.

What a torch user writes for LLaMa/BERT-style self-attention: one packed QKV projection
(``F.linear``), rotary embeddings (the same :func:`~twobp.nn.attention.apply_rotary`), the
core through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels, GQA via
``enable_gqa``) and ``out_proj``, an ``nn.Linear``. It keeps TwoBPAttention's attributes,
Parameters and state_dict, so :func:`twobp.revert` swaps one into the other by class, and
autograd runs its whole backward (no split). Without those extensions it *is* torch's
``nn.MultiheadAttention`` (cross-attention, masks, dropout: its own forward).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import apply_rotary

__all__ = ["TorchAttention"]


class TorchAttention(nn.MultiheadAttention):
    """Plain-torch self-attention with TwoBPAttention's parameters and extensions
    (``causal``, ``num_kv_heads``, ``rotary``); built by :func:`twobp.revert`."""

    causal: bool = False
    num_kv_heads: int | None = None
    rotary: bool = False
    rope_theta: float = 10000.0

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        if not self._extended():  # plain attention: torch's own nn.MultiheadAttention
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if key is not query or value is not query or need_weights or attn_mask is not None \
                or key_padding_mask is not None:
            raise NotImplementedError("TorchAttention with causal/rotary/num_kv_heads mirrors TwoBPAttention's "
                                      "self-attention: pass key = value = query, no masks, need_weights=False")
        return self.self_attention(query, is_causal=is_causal), None

    def _extended(self) -> bool:
        return self.causal or self.rotary or (self.num_kv_heads or self.num_heads) != self.num_heads

    def self_attention(self, x: Tensor, *, is_causal: bool = False) -> Tensor:
        """x [B, S, E] if batch_first, else [S, B, E]; returns the same layout."""
        if self.in_proj_weight is None or (self.training and self.dropout > 0):
            return super().forward(x, x, x, need_weights=False, is_causal=False,
                                   attn_mask=_causal_mask(x, self.batch_first) if is_causal or self.causal
                                   else None)[0]
        xb = x if self.batch_first else x.transpose(0, 1)            # (B, S, E)
        h, d = self.num_heads, self.head_dim
        hkv = self.num_kv_heads or h
        qkv = F.linear(xb, self.in_proj_weight, self.in_proj_bias)  # (B, S, (H + 2 Hkv) D)
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
        if self.rotary:
            q, k = apply_rotary(q, self.rope_theta), apply_rotary(k, self.rope_theta)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=self.causal or is_causal, enable_gqa=hkv != h)
        out = self.out_proj(o.transpose(1, 2).flatten(2))         # (B, S, E)
        return out if self.batch_first else out.transpose(0, 1)


def _causal_mask(x: Tensor, batch_first: bool) -> Tensor:
    s = x.shape[1 if batch_first and x.dim() == 3 else 0]
    return nn.Transformer.generate_square_subsequent_mask(s, device=x.device, dtype=x.dtype)
