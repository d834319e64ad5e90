"""The optimizer step of one pipeline rank, agreeing with every other rank where it must.

Ranks of a pipeline (and its replicas) each step their own parameters, but three decisions
span the whole model and are taken together:

* fp16 loss scaling: ``GradScaler`` finds infs per rank; a step skipped on one rank and
  taken on another would split the model, so the verdict is all-reduced (MAX) first;
* global-norm clipping: the norm of the *whole* model's gradient, ``sqrt(sum over ranks of
  each rank's squared norm)`` (a tied copy counted on one of its ranks only; replicas agree
  after averaging, so the pipeline group suffices), then every gradient scaled by
  ``min(1, max_norm / (norm + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` does;
* then the optimizer step and the lr scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["OptimizerStep"]


@dataclass
class OptimizerStep:
    """What :meth:`PipelineExecutor.step` was asked to do after the schedule."""

    optimizer: Any
    lr_scheduler: Any = None
    clip_grad_norm: float | None = None
    grad_scaler: Any = None
    skipped: bool = False
    """Set by :meth:`run`: the fp16 loss scaler found an inf/nan on some rank, so every rank
    skipped this optimizer step (and lowered the scale)."""

    def run(self, params: Sequence[nn.Parameter], *, device: torch.device, pipeline_group, all_group,
            tied_elsewhere: set[int]) -> float | None:
        """Step; returns the whole model's gradient norm before clipping (when clipping).
        ``tied_elsewhere``: ids of tied copies counted on another rank."""
        norm = None
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            self.skipped = _agree_on_inf(self.grad_scaler, self.optimizer, device, all_group)
        if self.clip_grad_norm is not None:
            norm = _clip(params, float(self.clip_grad_norm), device, pipeline_group, tied_elsewhere)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return norm


def _agree_on_inf(scaler, optimizer, device: torch.device, group) -> bool:
    """All-reduce (MAX) the scaler's inf/nan verdict over the ranks; returns whether any
    rank found one (then every rank's GradScaler.step skips)."""
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    flag = torch.zeros((), dtype=torch.float32, device=device)
    for v in found.values():
        flag = torch.maximum(flag, v.to(flag.device, torch.float32))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    for v in found.values():
        v.fill_(float(flag))
    return float(flag) > 0


def _clip(params: Sequence[nn.Parameter], max_norm: float, device: torch.device, group,
          tied_elsewhere: set[int]) -> float:
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for prm in params:
        if prm.grad is not None and id(prm) not in tied_elsewhere:
            sq += prm.grad.detach().double().square().sum()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for prm in params:
            if prm.grad is not None:
                prm.grad.mul_(coef)
    return norm
