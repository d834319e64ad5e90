"""Drop-in twobp modules, and convert() to swap them into any model."""

from .attention import TwoBPAttention
from .base import TwoBPModule, label_modules, twobp_modules
from .conv import TwoBPConv2d
from .convert import ConversionReport, convert
from .linear import TwoBPLinear
from .norm import TwoBPLayerNorm, TwoBPRMSNorm

__all__ = [
    "ConversionReport",
    "TwoBPAttention",
    "TwoBPConv2d",
    "TwoBPLayerNorm",
    "TwoBPLinear",
    "TwoBPModule",
    "TwoBPRMSNorm",
    "convert",
    "label_modules",
    "twobp_modules",
]
