"""BERT-like encoder built from twobp modules, with a masked-LM head.

The encoder of BERT (Devlin et al. 2018, arXiv 1810.04805): learned position embeddings,
post-LN blocks (``LayerNorm(x + sublayer(x))``), non-causal self-attention and a GeLU MLP.
Left out: token-type embeddings and the pooler (one segment, no next-sentence task),
dropout, and padding masks (every sequence is full length).

The head is BERT's masked-LM head (dense -> GeLU -> LayerNorm -> decoder to the vocabulary,
tied to the token embedding as in BERT unless ``tie_embeddings=False``). It was chosen over
a classifier because it gives per-token logits like the LLaMa head, so both use the same
``loss_fn`` and the same data (:func:`twobp.data.mask_tokens` turns any token batch into a
masked-LM batch), and because its vocabulary projection is part of the real cost of BERT
pre-training, which is what the 2BP paper measures.

Blocks (see :mod:`twobp.models.base`), ``x`` [B, T] token ids -> [B, T, vocab] logits::

    embeddings  LayerNorm(tok[x] + pos[:T])                      [B, T] -> [B, T, d]
    layers      x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))   (n_layers times)
    head        decoder(LN(gelu(dense(x))))                      [B, T, d] -> [B, T, vocab]

The embeddings' gradients are computed by autograd in p1 (lookups have no split); every
matmul and LayerNorm is a twobp module. Init as BERT: normal std 0.02, zero biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data import mask_tokens, synthetic_tokens
from ..nn.attention import TwoBPAttention
from ..nn.linear import TwoBPLinear
from ..nn.norm import TwoBPLayerNorm
from .base import TwoBPModel, check_positive, matmul_parameters, transformer_flops_per_sample

__all__ = ["PRESETS", "Bert", "BertConfig"]


@dataclass(kw_only=True)
class BertConfig:
    """Shape of a BERT-like encoder and its masking."""

    vocab_size: int = 256
    """Token ids lie in [0, vocab_size). 256: the bytes of :class:`twobp.data.ByteCorpus`."""
    dim: int = 64
    """Model width d."""
    n_layers: int = 4
    """Number of encoder blocks L."""
    n_heads: int = 4
    """Attention heads; ``dim`` must divide by it."""
    ffn_dim: int = 256
    """Hidden width of the MLP (BERT: 4 d)."""
    seq_len: int = 64
    """Number of learned positions, the longest input, and T for ``example_batch`` and FLOPs."""
    norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's value)."""
    tie_embeddings: bool = True
    """Share the token embedding table with the head's decoder (BERT does)."""
    mask_token_id: int = 0
    """The [MASK] token. 0 for bytes (NUL does not occur in Python source); 103 in BERT's vocab."""
    mask_prob: float = 0.15
    """Share of the positions of each sequence masked for the masked-LM loss."""
    init_std: float = 0.02
    """Standard deviation of the normal init of matmul weights and embeddings."""

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "seq_len")
        if self.dim % self.n_heads:
            raise ValueError(f"BertConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"BertConfig.mask_token_id={self.mask_token_id} must be in [0, "
                             f"vocab_size={self.vocab_size})")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"BertConfig.mask_prob must be in (0, 1], got {self.mask_prob!r}")
        for name in ("norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BertConfig.{name} must be > 0, got {getattr(self, name)!r}")


PRESETS: dict[str, dict] = {
    # CPU demo on the byte corpus: about 0.2 M parameters
    "tiny": dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, ffn_dim=256, seq_len=64, mask_token_id=0),
    # BERT-small of Turc et al. 2019 (L=4, H=512)
    "small": dict(vocab_size=30522, dim=512, n_layers=4, n_heads=8, ffn_dim=2048, seq_len=512,
                  mask_token_id=103),
    # CPU pipeline benchmarks (bench/compare_torch_pipelining.py): 33 M parameters, compute-bound
    # at one thread per rank, a head no heavier than two layers so two stages balance
    "cpu": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, ffn_dim=2048, seq_len=256, mask_token_id=103),
    "base": dict(vocab_size=30522, dim=768, n_layers=12, n_heads=12, ffn_dim=3072, seq_len=512,
                 mask_token_id=103),
    # BERT-large, the 2BP paper's size
    "large": dict(vocab_size=30522, dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, seq_len=512,
                  mask_token_id=103),
}


class BertEmbeddings(nn.Module):
    """LayerNorm(token embedding + learned position embedding)."""

    def __init__(self, cfg: BertConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim, **kw)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim, **kw)
        self.norm = TwoBPLayerNorm(cfg.dim, eps=cfg.norm_eps, **kw)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[-1]
        if t > self.pos.num_embeddings:
            raise ValueError(f"sequence length {t} exceeds the {self.pos.num_embeddings} learned positions")
        return self.norm(self.tok(ids) + self.pos.weight[:t])  # [B, T, d]


class EncoderBlock(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg: BertConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attn = TwoBPAttention(cfg.dim, cfg.n_heads, bias=True, batch_first=True, causal=False, **kw)
        self.attn_norm = TwoBPLayerNorm(cfg.dim, eps=cfg.norm_eps, **kw)
        self.ffn_in = TwoBPLinear(cfg.dim, cfg.ffn_dim, **kw)
        self.act = nn.GELU()
        self.ffn_out = TwoBPLinear(cfg.ffn_dim, cfg.dim, **kw)
        self.ffn_norm = TwoBPLayerNorm(cfg.dim, eps=cfg.norm_eps, **kw)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_norm(x + self.attn.self_attention(x))  # [B, T, d]
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class MLMHead(nn.Module):
    """BERT's masked-LM head: decoder(LN(gelu(dense(x))))."""

    def __init__(self, cfg: BertConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.dense = TwoBPLinear(cfg.dim, cfg.dim, **kw)
        self.act = nn.GELU()
        self.norm = TwoBPLayerNorm(cfg.dim, eps=cfg.norm_eps, **kw)
        self.decoder = TwoBPLinear(cfg.dim, cfg.vocab_size, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))  # [B, T, vocab]


class Bert(TwoBPModel):
    """BERT-like encoder with a masked-LM head (see the module docstring)."""

    name = "bert"

    def __init__(self, config: BertConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config, device=device, dtype=dtype)
        self.layers = nn.ModuleList(EncoderBlock(config, device=device, dtype=dtype)
                                    for _ in range(config.n_layers))
        self.head = MLMHead(config, device=device, dtype=dtype)
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.decoder.weight = self.embeddings.tok.weight

    def init_parameter(self, name: str, module: nn.Module, attr: str, p: Tensor) -> None:
        """BERT's: embeddings and matmul weights normal(0, init_std), biases 0, LayerNorm 1 / 0."""
        if isinstance(module, TwoBPLayerNorm):
            nn.init.ones_(p) if attr == "weight" else nn.init.zeros_(p)
        elif p.dim() == 1:
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=self.config.init_std)

    def blocks(self) -> list[nn.Module]:
        return [self.embeddings, *self.layers, self.head]

    def flops_per_sample(self) -> int:
        c = self.config
        lookups = [self.embeddings.tok, self.embeddings.pos]
        return transformer_flops_per_sample(matmul_parameters(self, lookups), c.n_layers, c.seq_len, c.dim)

    def mask(self, tokens: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A masked-LM ``(input, target)`` pair from real tokens [B, T] (e.g. a ByteCorpus batch)."""
        return mask_tokens(tokens, mask_token_id=self.config.mask_token_id, mask_prob=self.config.mask_prob,
                           generator=generator)

    def example_batch(self, batch_size: int, *, generator: torch.Generator | None = None,
                      device=None) -> tuple[Tensor, Tensor]:
        """Random tokens (synthetic), masked: input [B, T], target [B, T] (-100 where unmasked)."""
        tokens = synthetic_tokens(batch_size, self.config.seq_len, self.config.vocab_size, generator=generator)
        x, y = self.mask(tokens, generator=generator)
        return x.to(device), y.to(device)
