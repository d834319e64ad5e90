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
"""

from __future__ import annotations


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
    half = d // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2.0 / d)  # (D/2,)
    angle = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (S, D/2)
    cos = angle.cos()[None, :, None, :]  # (1, S, 1, D/2)
    sin = angle.sin()[None, :, None, :]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = x.to(ct).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


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
    Not supported (NotImplementedError): cross-attention (key/value other than the query
    tensor itself), dropout > 0 in training, add_bias_kv, add_zero_attn, kdim/vdim other
    than embed_dim, attention masks other than the causal mask or masks that mask nothing.

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
        for name, val in (("kdim", kdim), ("vdim", vdim)):
            if val is not None and val != embed_dim:
                raise NotImplementedError(
                    f"TwoBPAttention: {name}={val} != embed_dim={embed_dim} (cross-attention with "
                    f"other key/value sizes) is not supported; leave {name}=None")
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
        self.kdim = embed_dim
        self.vdim = embed_dim
        # False for the extended variants (causal / GQA / rotary): torch's inference fast path
        # (TransformerEncoderLayer, torch._transformer_encoder_layer_fwd) reads the weights
        # directly when this is True and would compute plain attention.
        self._qkv_same_embed_dim = not (causal or rotary or hkv != num_heads)
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = head_dim
        self.causal = causal
        self.num_kv_heads = hkv
        self.rotary = rotary
        self.rope_theta = float(rope_theta)

        qkv_rows = embed_dim + 2 * hkv * head_dim
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
        """torch's init: xavier_uniform_ on the packed in_proj_weight, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
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
        """Self-attention with torch's signature: ``key`` and ``value`` must be ``query``.

        Returns ``(out, None)``. ``attn_mask`` may be the causal mask (bool, True above
        the diagonal, or float, -inf above it) or a mask that masks nothing;
        ``key_padding_mask`` may only mask nothing (checking it reads its values).
        """
        if need_weights:
            raise NotImplementedError(
                "TwoBPAttention: need_weights=True is not supported (the flash kernels never form "
                "the attention matrix); pass need_weights=False, the output is the same")
        if key is not query or value is not query:
            raise NotImplementedError(
                "TwoBPAttention does self-attention only: key and value must be the query tensor "
                "itself (cross-attention is not supported)")
        seq_dim = 0 if query.dim() == 2 or not self.batch_first else 1
        s = query.shape[seq_dim]
        if key_padding_mask is not None:
            kpm = key_padding_mask
            pads = kpm.any() if kpm.dtype == torch.bool else (kpm != 0).any()
            if pads:
                raise NotImplementedError(
                    "TwoBPAttention: key_padding_mask that masks keys is not supported; pad with "
                    "ignored tokens and mask them in the loss, or pass key_padding_mask=None")
        causal = self.causal or bool(is_causal)
        if attn_mask is not None:
            kind = _is_causal_mask(attn_mask, s)
            if kind is None:
                raise NotImplementedError(
                    f"TwoBPAttention: attn_mask of shape {tuple(attn_mask.shape)} is neither the "
                    f"causal mask nor empty; only causal attention is supported (pass is_causal=True "
                    f"or construct with causal=True)")
            if is_causal and not kind:
                raise ValueError("TwoBPAttention: is_causal=True but attn_mask is not the causal mask")
            causal = causal or kind
        return self._attend(query, causal), None

    def self_attention(self, x: Tensor, *, is_causal: bool = False) -> Tensor:
        """Self-attention of x ([B, S, E] if batch_first, else [S, B, E]; or unbatched [S, E]),
        returning the output tensor only; causal if constructed so or ``is_causal``."""
        return self._attend(x, self.causal or bool(is_causal))

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
        if self.training and self.dropout > 0:
            raise NotImplementedError(
                f"TwoBPAttention: attention dropout (dropout={self.dropout}) in training is not "
                "supported; construct with dropout=0.0 (or call .eval())")
        if self.in_proj_weight is None:
            raise NotImplementedError("TwoBPAttention: separate q/k/v projection weights (kdim/vdim "
                                      "!= embed_dim) are not supported")
        if self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError("TwoBPAttention: add_bias_kv / add_zero_attn are not supported")
