"""Drop-in twobp modules."""

from .base import TwoBPModule, label_modules, twobp_modules
from .linear import TwoBPLinear

__all__ = ["TwoBPModule", "TwoBPLinear", "label_modules", "twobp_modules"]
