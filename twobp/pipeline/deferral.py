"""A 2BP schedule on stages where nothing is deferred: say so, and why.

2BP moves the weight gradients of twobp modules (twins of Linear, Embedding, norms, Conv2d,
attention) into P2 actions. A stage whose trainable parameters all sit in other modules
computes every gradient during P1, so its P2 actions do nothing and the schedule buys
nothing over its plain counterpart, silently. :func:`warn_if_nothing_deferred` says so
at executor construction, with what :func:`twobp.convert` would swap or leave, and why.
"""

from __future__ import annotations

import warnings
from typing import Mapping

from torch import nn

__all__ = ["deferred_parameters", "warn_if_nothing_deferred"]


def deferred_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable parameter elements held by twobp modules, all trainable parameter elements)
    of ``module``, each parameter counted once."""
    from ..nn.base import TwoBPModule

    seen, deferred, total = set(), 0, 0
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            total += p.numel()
            deferred += p.numel() if isinstance(m, TwoBPModule) else 0
    return deferred, total


def warn_if_nothing_deferred(stages: Mapping[int, nn.Module], *, schedule_name: str, rank: int,
                             splits: bool) -> bool:
    """Warn (and return True) when ``splits`` (the rank's schedule has P1/P2 actions) but the
    rank's stages have trainable parameters and none of them in a twobp module."""
    if not splits:
        return False
    held = [deferred_parameters(s) for s in stages.values()]
    if sum(t for _, t in held) == 0 or sum(d for d, _ in held) > 0:
        return False
    from ..nn.convert import convert

    lines = []
    for c, stage in sorted(stages.items()):
        _, report = convert(stage, dry_run=True, return_report=True)
        lines += [f"{name}: {frm} -> {to} (convert() would swap it)" for name, frm, to in report.swapped[:6]]
        lines += [f"{name}: {kind} ({why})" for name, kind, why in report.left[:6]]
    hint = ("twobp.convert(model) before building the blocks would swap in twins"
            if any("would swap" in x for x in lines) else
            "these classes have no twin: pass convert(model, extra={cls: factory}), or use the schedule without 2BP")
    warnings.warn(
        f"twobp: schedule {schedule_name!r} splits the backward (2BP), but rank {rank}'s stages hold no twobp module "
        f"with trainable weights: nothing is deferred, every gradient is computed in P1 and the P2 actions do "
        f"nothing. {hint}. What convert() says about this rank's modules: " + "; ".join(lines[:8])
        + (" ..." if len(lines) > 8 else ""), UserWarning, stacklevel=3)
    return True
