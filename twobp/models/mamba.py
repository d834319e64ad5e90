"""Mamba(-1) language model built from twobp modules.

The block of Mamba (Gu and Dao 2023, arXiv 2312.00752, sec. 3.4 and fig. 3): a pre-norm
residual around one mixer, ``x + mixer(rms(x))``, where the mixer with E = expand · d_model
channels, N = d_state and R = dt_rank is::

    in_proj   TwoBPLinear(d, 2E)                [b, L, d] -> x, z [b, L, E]
    conv1d    TwoBPCausalConv1d(E, d_conv)      causal depthwise conv over time, then SiLU: u
    x_proj    TwoBPLinear(E, R + 2N)            u -> dt [b, L, R], B, C [b, L, N]
    dt_proj   TwoBPLinear(R, E) + bias          Δ = softplus(dt_proj(dt))   [b, L, E]
    scan      TwoBPSelectiveScan(E, N)          y = S6(u, Δ, B, C; A = -exp(A_log), D)
    out_proj  TwoBPLinear(E, d)                 out_proj(y · SiLU(z))

Blocks (see :mod:`twobp.models.base`), tokens [b, L] -> logits [b, L, vocab_padded]::

    embed   TwoBPEmbedding                    [b, L] -> [b, L, d]
    layers  MambaBlock                        (n_layers times)
    head    rms -> TwoBPLinear(d, vocab)      tied to the embedding by default, as Mamba

Every parameter is owned by a twobp module, so every gradient of the model is deferred to
p2: the embedding's scatter-add (and the tied head's matmul into the same weight), the four
projections, the norms' γ, the conv's W and b, and the scan's A_log and D (recomputed from
chunk-boundary states, :mod:`twobp.ops.scan`). p1 computes input gradients only.

Init follows Mamba's reference: linear and conv weights as torch's defaults (uniform,
bound 1/sqrt(fan_in)), out_proj scaled by 1/sqrt(n_layers); dt_proj's weight uniform with
bound R^-1/2 and its bias the inverse softplus of Δ ~ exp(U(log dt_min, log dt_max)), floored
at dt_init_floor; A_log = log(1..N) (S4D-Real), D = 1; the embedding normal(0, 0.02); norms 1.
The vocabulary is padded to a multiple of ``pad_vocab_size_multiple`` (50277 -> 50280).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import synthetic_tokens
from ..nn.causal_conv1d import TwoBPCausalConv1d
from ..nn.embedding import TwoBPEmbedding
from ..nn.linear import TwoBPLinear
from ..nn.mamba_scan import TwoBPSelectiveScan
from ..nn.norm import TwoBPRMSNorm
from .base import TwoBPModel, check_positive

__all__ = ["PRESETS", "Mamba", "MambaBlock", "MambaConfig", "MambaMixer"]


@dataclass(kw_only=True)
class MambaConfig:
    """Shape of a Mamba(-1) language model."""

    vocab_size: int = 256
    """Token ids lie in [0, vocab_size). 256: the bytes of :class:`twobp.data.ByteCorpus`."""
    pad_vocab_size_multiple: int = 8
    """Embedding rows and logits are padded up to a multiple of this (Mamba's 50277 -> 50280)."""
    d_model: int = 64
    """Model width d."""
    n_layers: int = 4
    """Number of Mamba blocks."""
    d_state: int = 16
    """State size N per channel (Mamba: 16)."""
    expand: int = 2
    """Channels of the mixer E = expand · d_model (Mamba: 2)."""
    d_conv: int = 4
    """Taps of the causal depthwise convolution (Mamba: 4)."""
    dt_rank: int | None = None
    """Rank R of Δ's projection; None means ceil(d_model / 16) (Mamba's "auto")."""
    seq_len: int = 64
    """Training sequence length L, used by ``example_batch`` and the FLOP count."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the embedding table with the output head (Mamba does)."""
    init_std: float = 0.02
    """Standard deviation of the embedding's (and an untied head's) normal init."""
    dt_min: float = 0.001
    """Smallest Δ at init (Δ ~ exp(U(log dt_min, log dt_max)) through dt_proj's bias)."""
    dt_max: float = 0.1
    """Largest Δ at init."""
    dt_init_floor: float = 1e-4
    """Δ at init is at least this."""
    scan_chunk: int = 256
    """Steps between the states the scan's forward saves (a multiple of 16); the backward recomputes from them."""
    scan_dparams_in_p1: bool = True
    """Reduce the scan's dA_log, dD in p1's walk over time (as fp32 partials, [E, N] + [E] per
    micro-batch; p2 adds them into .grad) instead of recomputing the scan in p2. The default,
    because p1 walks time anyway: recomputing in p2 walks it a second time (1.7-2.3x the scan's
    fused backward in bench/mamba_block_costs.py) and keeps u, Δ, B, C and the boundary states of
    every pending micro-batch alive until p2, for two parameters that are 0.4% of a block's
    elements. Either way every gradient of the model reaches .grad in p2."""

    def __post_init__(self) -> None:
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        check_positive(self, "vocab_size", "pad_vocab_size_multiple", "d_model", "n_layers", "d_state", "expand",
                       "d_conv", "dt_rank", "seq_len", "scan_chunk")
        if self.scan_chunk % 16:
            raise ValueError(f"MambaConfig.scan_chunk must be a multiple of 16, got {self.scan_chunk}")
        for name in ("norm_eps", "init_std", "dt_min", "dt_max", "dt_init_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MambaConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"MambaConfig: dt_min={self.dt_min} must be <= dt_max={self.dt_max}")

    @property
    def d_inner(self) -> int:
        """E, the mixer's channels."""
        return self.expand * self.d_model

    @property
    def padded_vocab(self) -> int:
        """Embedding rows and logits: vocab_size rounded up to pad_vocab_size_multiple."""
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m


PRESETS: dict[str, dict] = {
    # CPU demo on the byte corpus: 0.2 M parameters; the scan saves one boundary state per layer
    "tiny": dict(vocab_size=256, d_model=64, n_layers=4, seq_len=64, scan_chunk=32),
    # CPU pipeline comparisons: 3.6 M parameters, compute large enough to see the schedule
    "small": dict(vocab_size=256, d_model=256, n_layers=8, seq_len=128, scan_chunk=64),
    # the Mamba paper's family (GPT-NeoX tokenizer's 50277 ids, padded to 50280), sequence 1024
    "130m": dict(vocab_size=50277, d_model=768, n_layers=24, seq_len=1024),
    "370m": dict(vocab_size=50277, d_model=1024, n_layers=48, seq_len=1024),
    "790m": dict(vocab_size=50277, d_model=1536, n_layers=48, seq_len=1024),
    # Mamba-1.4B, the 2BP paper's fourth model: 1.372 B parameters (tied)
    "1.4b": dict(vocab_size=50277, d_model=2048, n_layers=48, seq_len=1024),
}


class MambaMixer(nn.Module):
    """in_proj -> causal conv -> SiLU -> x_proj -> (Δ, B, C) -> selective scan, gated by SiLU(z) -> out_proj."""

    def __init__(self, cfg: MambaConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank = E, N, R
        self.in_proj = TwoBPLinear(cfg.d_model, 2 * E, bias=False, **kw)
        self.conv1d = TwoBPCausalConv1d(E, cfg.d_conv, bias=True, **kw)
        self.x_proj = TwoBPLinear(E, R + 2 * N, bias=False, **kw)
        self.dt_proj = TwoBPLinear(R, E, bias=True, **kw)
        self.scan = TwoBPSelectiveScan(E, N, chunk=cfg.scan_chunk, dparams_in_p1=cfg.scan_dparams_in_p1, **kw)
        self.out_proj = TwoBPLinear(E, cfg.d_model, bias=False, **kw)

    def forward(self, x: Tensor) -> Tensor:
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        xs, z = self.in_proj(x).split(E, dim=-1)  # [b, L, E] each (views)
        u = F.silu(self.conv1d(xs))  # [b, L, E]
        dt, B, C = self.x_proj(u).split([R, N, N], dim=-1)  # [b, L, R], [b, L, N], [b, L, N]
        delta = F.softplus(self.dt_proj(dt))  # [b, L, E], > 0
        y = self.scan(u, delta, B, C)  # [b, L, E]
        return self.out_proj(y * F.silu(z))  # [b, L, d]


class MambaBlock(nn.Module):
    """Pre-norm residual: x + mixer(rms(x))."""

    def __init__(self, cfg: MambaConfig, *, device=None, dtype=None):
        super().__init__()
        self.norm = TwoBPRMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.mixer = MambaMixer(cfg, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mixer(self.norm(x))  # [b, L, d]


class MambaHead(nn.Module):
    """Final RMSNorm and the projection to the (padded) vocabulary."""

    def __init__(self, cfg: MambaConfig, *, device=None, dtype=None):
        super().__init__()
        self.norm = TwoBPRMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.proj = TwoBPLinear(cfg.d_model, cfg.padded_vocab, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))  # [b, L, vocab_padded]


class Mamba(TwoBPModel):
    """Mamba(-1) language model (see the module docstring); ``Mamba(MambaConfig(...))``."""

    name = "mamba"

    def __init__(self, config: MambaConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embed = TwoBPEmbedding(config.padded_vocab, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(MambaBlock(config, device=device, dtype=dtype) for _ in range(config.n_layers))
        self.head = MambaHead(config, device=device, dtype=dtype)
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.proj.weight = self.embed.weight

    def init_parameter(self, name: str, module: nn.Module, attr: str, p: Tensor) -> None:
        """Mamba's reference init (see the module docstring), drawn from torch's default generator."""
        c = self.config
        if isinstance(module, nn.Embedding) or name == "head.proj.weight":
            nn.init.normal_(p, std=c.init_std)
        elif isinstance(module, TwoBPRMSNorm):
            nn.init.ones_(p)
        elif isinstance(module, TwoBPSelectiveScan):
            if attr == "A_log":
                p.copy_(torch.log(torch.arange(1, p.shape[1] + 1, dtype=torch.float32)).expand_as(p))
            else:
                nn.init.ones_(p)
        elif name.endswith("dt_proj.weight"):
            nn.init.uniform_(p, -c.dt_rank ** -0.5, c.dt_rank ** -0.5)
        elif name.endswith("dt_proj.bias"):
            lo, hi = math.log(c.dt_min), math.log(c.dt_max)
            dt = torch.exp(torch.rand(p.shape) * (hi - lo) + lo).clamp(min=c.dt_init_floor)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(Δ): softplus(bias) = Δ
        else:  # in_proj, x_proj, out_proj, conv1d: torch's default, U(±1/sqrt(fan_in))
            fan_in = p.shape[1] * (p.shape[2] if p.dim() == 3 else 1) if p.dim() > 1 else module.weight.shape[-1]
            bound = 1 / math.sqrt(fan_in)
            if name.endswith("out_proj.weight"):
                bound /= math.sqrt(c.n_layers)  # n_layers residual branches add up in the stream
            nn.init.uniform_(p, -bound, bound)

    def blocks(self) -> list[nn.Module]:
        return [self.embed, *self.layers, self.head]

    def flops_per_sample(self) -> int:
        """Training FLOPs of one sequence: 6 per weight of a matmul per token (Kaplan et al. 2020,
        sec. 2.1: 2 forward, 4 backward), and, per layer, the scan and the conv at 3x their
        forward (backward = 2 forward, the same convention): the scan's forward costs 7 FLOPs per
        (token, channel, state) (Δ·A, exp, Δu·B, a·h + x, C·h), the conv's 2·d_conv per
        (token, channel). p2's recomputation is overhead, not model FLOPs: not counted."""
        c = self.config
        mm = sum(m.weight.numel() for m in self.modules() if isinstance(m, TwoBPLinear))  # the head once
        per_layer = 3 * (7 * c.d_inner * c.d_state + 2 * c.d_conv * c.d_inner)
        return 6 * mm * c.seq_len + c.n_layers * per_layer * c.seq_len

    def example_batch(self, batch_size: int, *, generator: torch.Generator | None = None,
                      device=None) -> tuple[Tensor, Tensor]:
        """Random tokens (synthetic): input [B, T] and the same sequence shifted by one."""
        tokens = synthetic_tokens(batch_size, self.config.seq_len + 1, self.config.vocab_size,
                                  generator=generator).to(device)
        return tokens[:, :-1], tokens[:, 1:]
