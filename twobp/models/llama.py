"""LLaMa-like decoder built from twobp modules.

The block structure of LLaMa (Touvron et al. 2023, arXiv 2302.13971): pre-norm RMSNorm,
rotary position embeddings (Su et al. 2021, arXiv 2104.09864) inside causal self-attention,
grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245) when ``n_kv_heads <
n_heads``, and a SwiGLU MLP (Shazeer 2020, arXiv 2002.05202). No biases, no dropout.

Blocks (see :mod:`twobp.models.base`), ``x`` [B, T] token ids -> [B, T, vocab] logits::

    embed   nn.Embedding                                   [B, T] -> [B, T, d]
    layers  x += attn(rms(x)); x += down(silu(gate(rms(x))) * up(rms(x)))   (n_layers times)
    head    rms -> TwoBPLinear(d, vocab)                    [B, T, d] -> [B, T, vocab]

The embedding's gradient is computed by autograd in p1 (a lookup has no split); every
matmul and norm is a twobp module, so its dW waits for p2. Init follows GPT-2 (normal,
std 0.02; residual output projections scaled by 1/sqrt(2 n_layers)); norms start at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data import synthetic_tokens
from ..nn.attention import TwoBPAttention
from ..nn.linear import TwoBPLinear
from ..nn.norm import TwoBPRMSNorm
from .base import TwoBPModel, check_positive, matmul_parameters, transformer_flops_per_sample

__all__ = ["PRESETS", "Llama", "LlamaConfig"]


@dataclass(kw_only=True)
class LlamaConfig:
    """Shape of a LLaMa-like decoder."""

    vocab_size: int = 256
    """Token ids lie in [0, vocab_size). 256: the bytes of :class:`twobp.data.ByteCorpus`."""
    dim: int = 64
    """Model width d."""
    n_layers: int = 4
    """Number of decoder blocks L."""
    n_heads: int = 4
    """Query heads; ``dim`` must divide by it and the head dim must be even (RoPE)."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means ``n_heads`` (multi-head)."""
    ffn_dim: int = 172
    """Hidden width of the SwiGLU MLP; LLaMa uses about 8/3 d rounded up (172 for d=64)."""
    seq_len: int = 64
    """Training sequence length T, used by ``example_batch`` and the FLOP count."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (LLaMa-2's value)."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding's frequencies."""
    tie_embeddings: bool = False
    """Share the embedding table with the output head (LLaMa does not)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of matmul weights and the embedding."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "seq_len")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig.n_heads={self.n_heads} must be divisible by "
                             f"n_kv_heads={self.n_kv_heads} (each kv head serves a group of query heads)")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head dim dim/n_heads = {self.head_dim} must be even for RoPE")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LlamaConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


PRESETS: dict[str, dict] = {
    # CPU demo on the byte corpus: about 0.2 M parameters
    "tiny": dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=172, seq_len=64),
    # one GPU on the byte corpus: 23 M parameters
    "small": dict(vocab_size=256, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1376, seq_len=256),
    # TinyLlama-1.1B's shape (Zhang et al. 2024), at sequence length 1024
    "1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
               seq_len=1024),
    # LLaMa-7B (6.74 B parameters), the 2BP paper's size, at sequence length 1024
    "7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
               seq_len=1024),
}


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), three bias-free twobp linears."""

    def __init__(self, dim: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate = TwoBPLinear(dim, hidden, **kw)
        self.up = TwoBPLinear(dim, hidden, **kw)
        self.down = TwoBPLinear(hidden, dim, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))  # [B, T, d]


class DecoderBlock(nn.Module):
    """Pre-norm: x + attn(rms(x)), then x + mlp(rms(x))."""

    def __init__(self, cfg: LlamaConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attn_norm = TwoBPRMSNorm(cfg.dim, eps=cfg.norm_eps, **kw)
        self.attn = TwoBPAttention(cfg.dim, cfg.n_heads, bias=False, batch_first=True, causal=True,
                                   num_kv_heads=cfg.n_kv_heads, rotary=True, rope_theta=cfg.rope_theta, **kw)
        self.mlp_norm = TwoBPRMSNorm(cfg.dim, eps=cfg.norm_eps, **kw)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim, **kw)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn.self_attention(self.attn_norm(x))  # [B, T, d]
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Module):
    """Final RMSNorm and the projection to the vocabulary."""

    def __init__(self, cfg: LlamaConfig, *, device=None, dtype=None):
        super().__init__()
        self.norm = TwoBPRMSNorm(cfg.dim, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.proj = TwoBPLinear(cfg.dim, cfg.vocab_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))  # [B, T, vocab]


class Llama(TwoBPModel):
    """LLaMa-like decoder (see the module docstring); ``Llama(LlamaConfig(...))``."""

    name = "llama"

    def __init__(self, config: LlamaConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderBlock(config, device=device, dtype=dtype)
                                    for _ in range(config.n_layers))
        self.head = LMHead(config, device=device, dtype=dtype)
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.proj.weight = self.embed.weight

    def init_parameter(self, name: str, module: nn.Module, attr: str, p: Tensor) -> None:
        """GPT-2 style: matmul weights and the embedding normal(0, init_std), the residual
        output projections scaled by 1/sqrt(2 n_layers) (their sum over 2L branches keeps the
        stream's variance bounded), norms at 1, biases (if a variant has them) at 0."""
        std = self.config.init_std
        if p.dim() == 1:
            nn.init.ones_(p) if isinstance(module, TwoBPRMSNorm) else nn.init.zeros_(p)
            return
        if name.endswith(("attn.out_proj.weight", "mlp.down.weight")):
            std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(p, std=std)

    def blocks(self) -> list[nn.Module]:
        return [self.embed, *self.layers, self.head]

    def flops_per_sample(self) -> int:
        c = self.config
        return transformer_flops_per_sample(matmul_parameters(self, [self.embed]), c.n_layers, c.seq_len, c.dim)

    def example_batch(self, batch_size: int, *, generator: torch.Generator | None = None,
                      device=None) -> tuple[Tensor, Tensor]:
        """Random tokens (synthetic): input [B, T] and the same sequence shifted by one."""
        tokens = synthetic_tokens(batch_size, self.config.seq_len + 1, self.config.vocab_size,
                                  generator=generator).to(device)
        return tokens[:, :-1], tokens[:, 1:]
