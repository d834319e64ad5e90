"""Drop-in twobp modules, and convert() to swap them into any model."""

from .attention import TwoBPAttention
from .base import TwoBPModule, label_modules, twobp_modules
from .conv import TwoBPConv2d
from .convert import ConversionReport, convert, revert
from .linear import TwoBPLinear
from .norm import TwoBPLayerNorm, TwoBPRMSNorm
from .torch_attention import TorchAttention

__all__ = [
    "ConversionReport",
    "TorchAttention",
    "TwoBPAttention",
    "TwoBPConv2d",
    "TwoBPLayerNorm",
    "TwoBPLinear",
    "TwoBPModule",
    "TwoBPRMSNorm",
    "convert",
    "label_modules",
    "revert",
    "twobp_modules",
]
