"""Input validation shared by the ops: errors that name the argument and the fix."""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_same_dtype_device"]


def check_same_dtype_device(what: str, x: Tensor, **params: Tensor | None) -> None:
    """Raise TypeError/ValueError when a parameter's dtype or device differs from ``x``'s."""
    for name, p in params.items():
        if p is None:
            continue
        if p.device != x.device:
            raise ValueError(
                f"{what}: input is on {x.device} but {name} is on {p.device}; move the module "
                f"(module.to({str(x.device)!r})) or the input (x.to({str(p.device)!r}))")
        if p.dtype != x.dtype:
            raise TypeError(
                f"{what}: input dtype {x.dtype} differs from {name} dtype {p.dtype}; cast the input "
                f"(x.to({p.dtype})) or the module (module.to({x.dtype}))")
