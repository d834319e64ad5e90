"""What every twobp module shares: a label for reports, and the call into the split op."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from ..autograd import split_apply
from ..ops.base import SplitOp

__all__ = ["TwoBPModule", "label_modules", "twobp_modules"]


class TwoBPModule:
    """Mixin for twobp modules. Holds no state of its own, so a torch module can become its
    twin by a class swap (see :func:`twobp.convert`), keeping parameters and hooks."""

    def twobp_label(self) -> str:
        # read from __dict__: a missing attribute would go through nn.Module.__getattr__ and an
        # AttributeError on every op call of an unlabelled module
        return self.__dict__.get("_twobp_label") or type(self).__name__

    def _split(self, op: SplitOp, inputs: Sequence[Tensor], params: Sequence[Tensor | None]) -> Tensor:
        return split_apply(op, self, self.twobp_label(), inputs, params)

    @staticmethod
    def _as_torch(forward: Callable[[], Tensor], explain: Callable[[], object]) -> Tensor:
        """``forward()``, torch's own forward of the module; if torch's op fails, ``explain()``
        first (the op's validation, which raises the error that names the fix), else torch's error."""
        try:
            return forward()
        except RuntimeError:
            explain()
            raise


def twobp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every twobp module inside ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TwoBPModule)]


def label_modules(model: nn.Module, prefix: str = "") -> nn.Module:
    """Name each twobp module by its qualified name, for memory reports and traces."""
    for name, m in twobp_modules(model):
        m._twobp_label = f"{prefix}{name}" if name else (prefix or type(m).__name__)
    return model
