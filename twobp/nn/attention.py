"""TwoBPAttention: self-attention whose projections' backward splits into p1 (dX) and p2 (dW).

self-attention(x) = out_proj( attention_core( rope?( in_proj(x) split into q, k, v ) ) )

* ``in_proj``: one packed weight ``in_proj_weight`` [E + 2·Hkv·D, E] (and ``in_proj_bias``),
  applied through the split linear op, so dW of the whole QKV projection is one p2.
  With Hkv = H (the default) it is torch's [3E, E].
* rotary embedding (optional, no weights): plain torch ops under autograd.
* attention core: :class:`twobp.ops.attention.AttentionCoreOp` (flash attention on the
  Triton backend); no weights, so its whole backward is p1.
* ``out_proj``: a :class:`TwoBPLinear`; dW is its p2.

What is saved, for whom, and when it is freed (B·S tokens, E = H·D, Hkv·D = E_kv):

* in_proj p2 (store entry of this module): x [B, S, E], plus the deposited dQKV
  [B, S, E + 2 E_kv]; freed by ``twobp.backward_p2``.
* core p1 (on the autograd node, like plain autograd; the machinery only uses the store
  for ops with trainable parameters): q, k, v (views of the QKV output, or with rotary the
  rotated q, k) , o [B, S, E] and lse [B, H, S] fp32; freed when p1 runs.
* out_proj p2 (store entry of ``out_proj``): o (the same storage the core saves) and the
  deposited dOut [B, S, E]; freed by ``twobp.backward_p2``.

Cross-attention, masks other than the causal one, separate q/k/v weights (kdim/vdim) and
attention dropout in training take the general path of :mod:`twobp.nn.cross_attention`:
the same deferred projections, torch's SDPA as the (weightless) core.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..autograd import split_apply
from ..ops.attention import AttentionCoreOp
from ..ops.linear import LinearOp
from .base import TwoBPModule
from .linear import TwoBPLinear

__all__ = ["TwoBPAttention", "apply_rotary"]

_LINEAR = LinearOp()


def apply_rotary(x: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotary position embedding of x [B, S, H, D] (position = index along S).

    LLaMa's half-split convention: with x = [x1, x2] (the two halves of the head dim),
    inv_freq_i = theta^(-2i/D) and angle_{s,i} = s · inv_freq_i,
    rope(x) = [x1 cos - x2 sin, x2 cos + x1 sin]. cos/sin are computed in fp32 on the fly
    (no buffers, no parameters); the result has x's dtype.
    """
    b, s, h, d = x.shape
    if d % 2:
        raise ValueError(f"apply_rotary: head dim must be even, got {d}")
    cos, sin = _rotary_tables(s, d, float(theta), x.device)  # (1, S, 1, D/2) each
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


@functools.lru_cache(maxsize=64)
def _rotary_tables(s: int, d: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, (1, S, 1, D/2) fp32, computed once per shape: every
    attention layer of every micro-batch uses the same tables."""
    half = d // 2
    with torch.inference_mode(False), torch.no_grad():  # plain constants, whatever mode asked first
        inv_freq = theta ** (-torch.arange(half, device=device, dtype=torch.float32) * 2.0 / d)  # (D/2,)
        angle = torch.arange(s, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (S, D/2)
        return angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]


def _is_causal_mask(mask: Tensor, s: int) -> bool | None:
    """True: ``mask`` is the causal mask; False: it masks nothing; None: anything else."""
    if mask.shape[-2:] != (s, s) or mask.dim() not in (2, 3):
        return None
    if mask.dtype == torch.bool:
        blocked = mask
    elif mask.is_floating_point():
        blocked = torch.isneginf(mask) | (mask == torch.finfo(mask.dtype).min)
        if not (blocked | (mask == 0)).all():
            return None  # an additive bias, not a mask
    else:
        return None
    if not blocked.any():
        return False
    future = torch.ones(s, s, dtype=torch.bool, device=mask.device).triu(1)
    return True if bool((blocked == future).all()) else None


class TwoBPAttention(TwoBPModule, nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` used as self-attention.

    Same constructor, parameters (``in_proj_weight`` [3E, E], ``in_proj_bias`` [3E],
    ``out_proj.weight``, ``out_proj.bias``), state_dict and init as torch's; ``forward``
    returns ``(out, None)``. Outside a split region it behaves as its torch twin; inside
    ``twobp.split_backward`` the backward computes dX only and the projections' dW wait
    for ``twobp.backward_p2``.

    Differences: ``batch_first`` defaults to True; ``need_weights`` defaults to False (and
    True is not supported: the flash kernels never form the attention matrix).
    Not supported (NotImplementedError): add_bias_kv, add_zero_attn, and separate q/k/v
    weights (kdim/vdim) together with the extensions below.

    Two paths, the same projections (whose dW is deferred either way):

    * self-attention (key and value are the query tensor itself) with no mask, the causal
      mask or masks that mask nothing, and no active dropout: the attention core is
      :class:`~twobp.ops.attention.AttentionCoreOp` (flash attention on the Triton backend);
    * anything else torch's MHA takes: cross-attention (key/value from another tensor,
      other lengths, kdim/vdim), any ``attn_mask`` / ``key_padding_mask``, attention dropout
      in training: see :mod:`twobp.nn.cross_attention`. The core there is torch's
      ``scaled_dot_product_attention`` under autograd (it has no weights: its whole backward
      is p1 anyway), with the masks merged as ``nn.MultiheadAttention`` merges them.

    Extensions (keyword-only):

    * ``causal``: always apply the causal mask (``is_causal=True`` or a causal
      ``attn_mask`` in a call does the same per call).
    * ``num_kv_heads``: grouped-query attention with Hkv key/value heads; the packed
      ``in_proj_weight`` is then [E + 2·Hkv·D, E] (q rows, then k rows, then v rows).
    * ``rotary``, ``rope_theta``: rotary position embedding of q and k (LLaMa convention,
      see :func:`apply_rotary`).

    For our own models, :meth:`self_attention` takes x alone and returns the tensor.
    """

    # Extension settings as class defaults: an nn.MultiheadAttention whose class is swapped
    # to this one (twobp.convert) has none of them and reads them as off.
    causal: bool = False
    num_kv_heads: int | None = None
    rotary: bool = False
    rope_theta: float = 10000.0

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = True, device=None, dtype=None, *,
                 causal: bool = False, num_kv_heads: int | None = None, rotary: bool = False,
                 rope_theta: float = 10000.0) -> None:
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"TwoBPAttention: {name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"TwoBPAttention: embed_dim={embed_dim} must be divisible by "
                             f"num_heads={num_heads}")
        head_dim = embed_dim // num_heads
        hkv = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(hkv, bool) or not isinstance(hkv, int) or hkv <= 0 or num_heads % hkv:
            raise ValueError(f"TwoBPAttention: num_kv_heads must be a positive int dividing "
                             f"num_heads={num_heads}, got {num_kv_heads!r}")
        if add_bias_kv:
            raise NotImplementedError("TwoBPAttention: add_bias_kv=True is not supported; "
                                      "use add_bias_kv=False")
        if add_zero_attn:
            raise NotImplementedError("TwoBPAttention: add_zero_attn=True is not supported; "
                                      "use add_zero_attn=False")
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        for name, val in (("kdim", kdim), ("vdim", vdim)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"TwoBPAttention: {name} must be a positive int or None, got {val!r}")
        separate = kdim != embed_dim or vdim != embed_dim
        if separate and (causal or rotary or hkv != num_heads):
            raise NotImplementedError(
                f"TwoBPAttention: kdim={kdim}/vdim={vdim} (separate q/k/v weights) together with causal, rotary or "
                "num_kv_heads is not supported; use kdim = vdim = embed_dim for those extensions")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"TwoBPAttention: dropout must be in [0, 1], got {dropout!r}")
        if not isinstance(causal, bool) or not isinstance(rotary, bool) or not isinstance(batch_first, bool):
            raise TypeError(f"TwoBPAttention: causal, rotary and batch_first must be bools, got "
                            f"causal={causal!r}, rotary={rotary!r}, batch_first={batch_first!r}")
        if rotary and head_dim % 2:
            raise ValueError(f"TwoBPAttention: rotary=True needs an even head dim, got "
                             f"embed_dim/num_heads = {head_dim}")
        if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
            raise ValueError(f"TwoBPAttention: rope_theta must be a positive number, got {rope_theta!r}")

        factory_kwargs = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)  # nn.MultiheadAttention.__init__ would build [3E, E] and its own out_proj
        self.embed_dim = embed_dim
        self.kdim = kdim
        self.vdim = vdim
        # False for separate q/k/v weights (as torch's) and for the extended variants (causal /
        # GQA / rotary): torch's inference fast path (TransformerEncoderLayer,
        # torch._transformer_encoder_layer_fwd) reads the weights directly when this is True
        # and would compute plain attention.
        self._qkv_same_embed_dim = not (separate or causal or rotary or hkv != num_heads)
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = head_dim
        self.causal = causal
        self.num_kv_heads = hkv
        self.rotary = rotary
        self.rope_theta = float(rope_theta)

        qkv_rows = embed_dim + 2 * hkv * head_dim
        if separate:  # torch's layout and registration order for kdim/vdim != embed_dim
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, kdim), **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((qkv_rows, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(qkv_rows, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        # same construction order as torch (out_proj's own init draws from the RNG first)
        self.out_proj = TwoBPLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()  # torch's: xavier_uniform_ in_proj_weight, zero biases

    def _reset_parameters(self) -> None:
        """torch's init: xavier_uniform_ on the packed in_proj_weight (or on each of the
        separate q/k/v weights), zero biases."""
        if self.in_proj_weight is not None:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def extra_repr(self) -> str:
        ext = []
        if self.causal:
            ext.append("causal=True")
        if self.num_kv_heads not in (None, self.num_heads):
            ext.append(f"num_kv_heads={self.num_kv_heads}")
        if self.rotary:
            ext.append(f"rotary=True, rope_theta={self.rope_theta:g}")
        return ", ".join(ext)

    # ---- public entry points -----------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        """torch's signature and semantics; returns ``(out, None)``.

        Self-attention with no mask, the causal mask (bool, True above the diagonal, or
        float, -inf above it) or masks that mask nothing, and no active dropout, runs the
        flash core; anything else (cross-attention, other masks, dropout in training) the
        general path (class docstring). ``is_causal=True`` without ``attn_mask`` applies the
        causal mask (torch requires the mask too); with a mask, the mask must be causal.
        Checking whether ``key_padding_mask`` masks anything reads its values.
        """
        if need_weights:
            raise NotImplementedError(
                "TwoBPAttention: need_weights=True is not supported (the flash kernels never form "
                "the attention matrix); pass need_weights=False, the output is the same")
        self_attn = key is query and value is query and self.in_proj_weight is not None
        fast = self_attn and not (self.training and self.dropout > 0)
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if bool(kpm.any() if kpm.dtype == torch.bool else (kpm != 0).any()):
                fast = False
            else:
                key_padding_mask = None  # masks nothing
        causal = self.causal or bool(is_causal)
        if attn_mask is not None:
            seq_dim = 0 if query.dim() == 2 or not self.batch_first else 1
            kind = _is_causal_mask(attn_mask, query.shape[seq_dim]) if key is query else None
            if is_causal and not kind:
                raise ValueError("TwoBPAttention: is_causal=True but attn_mask is not the causal mask; pass "
                                 "is_causal=False with any other mask")
            if kind is None:
                fast = False
            else:
                causal, attn_mask = causal or kind, None
        if fast:
            return self._attend(query, causal), None
        from .cross_attention import general_attention

        return general_attention(self, query, key, value, key_padding_mask=key_padding_mask,
                                 attn_mask=attn_mask, causal=causal), None

    def self_attention(self, x: Tensor, *, is_causal: bool = False) -> Tensor:
        """Self-attention of x ([B, S, E] if batch_first, else [S, B, E]; or unbatched [S, E]),
        returning the output tensor only; causal if constructed so or ``is_causal``."""
        causal = self.causal or bool(is_causal)
        if (self.training and self.dropout > 0) or self.in_proj_weight is None:
            from .cross_attention import general_attention

            return general_attention(self, x, x, x, key_padding_mask=None, attn_mask=None, causal=causal)
        return self._attend(x, causal)

    # ---- implementation -----------------------------------------------------------------
    def _attend(self, x: Tensor, causal: bool) -> Tensor:
        self._check_supported()
        if x.dim() not in (2, 3) or x.shape[-1] != self.embed_dim:
            raise ValueError(f"TwoBPAttention: input must be [B, S, E={self.embed_dim}] (batch_first), "
                             f"[S, B, E] or unbatched [S, E], got shape {tuple(x.shape)}")
        if x.dim() == 2:
            xb = x.unsqueeze(0)                      # (1, S, E)
        else:
            xb = x if self.batch_first else x.transpose(0, 1)  # (B, S, E)
        h, d = self.num_heads, self.head_dim
        hkv = self.num_kv_heads or h
        label = self.twobp_label()
        qkv = split_apply(_LINEAR, self, f"{label}.in_proj", (xb,),
                          (self.in_proj_weight, self.in_proj_bias))  # (B, S, (H + 2 Hkv) D)
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        q = q.unflatten(-1, (h, d))      # (B, S, H, D), a view: last dim contiguous
        k = k.unflatten(-1, (hkv, d))    # (B, S, Hkv, D)
        v = v.unflatten(-1, (hkv, d))    # (B, S, Hkv, D)
        if self.rotary:
            q, k = apply_rotary(q, self.rope_theta), apply_rotary(k, self.rope_theta)
        o = split_apply(AttentionCoreOp(causal=causal), self, f"{label}.attention", (q, k, v), ())
        o = o.flatten(2)                 # (B, S, E)
        out = self._out_proj(o, label)   # (B, S, E)
        if x.dim() == 2:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def _out_proj(self, o: Tensor, label: str) -> Tensor:
        proj = self.out_proj
        if isinstance(proj, TwoBPModule):
            return proj(o)
        # an nn.MultiheadAttention converted by class swap may keep torch's out_proj: split it
        # all the same, with out_proj as the store owner
        return split_apply(_LINEAR, proj, f"{label}.out_proj", (o,), (proj.weight, proj.bias))

    def _check_supported(self) -> None:
        if self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError("TwoBPAttention: add_bias_kv / add_zero_attn are not supported; build the "
                                      "module without them (or keep torch's nn.MultiheadAttention)")
