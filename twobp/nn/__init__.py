"""Drop-in twobp modules, and convert() to swap them into any model.

Twins of Hugging Face layers (``TwoBPConv1D``, the RMSNorm twins) live in :mod:`twobp.nn.hf`
and are built on first use, so transformers stays optional.
"""

from .attention import TwoBPAttention
from .base import TwoBPModule, label_modules, twobp_modules
from .causal_conv1d import TwoBPCausalConv1d
from .conv import TwoBPConv2d
from .convert import ConversionReport, convert, revert
from .embedding import TwoBPEmbedding
from .linear import TwoBPLinear
from .mamba_scan import TwoBPSelectiveScan
from .norm import TwoBPLayerNorm, TwoBPRMSNorm
from .torch_attention import TorchAttention

__all__ = [
    "ConversionReport",
    "TorchAttention",
    "TwoBPAttention",
    "TwoBPCausalConv1d",
    "TwoBPConv2d",
    "TwoBPEmbedding",
    "TwoBPLayerNorm",
    "TwoBPLinear",
    "TwoBPModule",
    "TwoBPRMSNorm",
    "TwoBPSelectiveScan",
    "convert",
    "label_modules",
    "revert",
    "twobp_modules",
]
