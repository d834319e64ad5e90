"""Measure what each block of a model costs, to cut balanced pipeline stages.

A pipeline runs at the pace of its slowest stage: cutting a model into stages of equal block
*counts* leaves a stage with the stem or the vocabulary head the bottleneck, and the others'
idle time is then a bubble no schedule can fill. :func:`measure_block_costs` times forward +
backward of one micro-batch through each block on this process; feed the list to
:func:`~twobp.pipeline.partition.balance` or ``PipelineExecutor(block_costs=...)``, which cut
contiguous stages minimising the largest stage sum.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["measure_block_costs"]


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def measure_block_costs(blocks: Sequence[nn.Module] | nn.Sequential, x: torch.Tensor,
                        loss_fn: Callable[..., torch.Tensor] | None = None, target: torch.Tensor | None = None,
                        *, reps: int = 3, warmup: int = 1) -> list[float]:
    """Median seconds of forward + backward of micro-batch ``x`` through each block, in order.

    Each block runs on the previous block's output, detached so its backward is its own; the last
    block's output goes through ``loss_fn(out, target)`` when given (its cost counts with that
    block), else its backward is seeded with ones. Gradients the run leaves are cleared
    (``zero_grad(set_to_none=True)``). Shapes: whatever the blocks take; ``x`` is the model input.
    """
    blocks = list(blocks.children()) if isinstance(blocks, nn.Sequential) else list(blocks)
    if not blocks:
        raise ValueError("measure_block_costs: no blocks")
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    if (loss_fn is None) != (target is None):
        raise ValueError("give loss_fn and target together (the last block's loss), or neither")
    samples: list[list[float]] = [[] for _ in blocks]
    for rep in range(warmup + reps):
        h, ran = x, []
        for i, block in enumerate(blocks):
            inp = h.detach().requires_grad_(h.is_floating_point())
            _sync(inp)
            t0 = time.perf_counter()
            out = block(inp)
            if i == len(blocks) - 1 and loss_fn is not None:
                out = loss_fn(out, target)
            _sync(out)
            ran.append((inp, out, time.perf_counter() - t0))
            h = out
        grad = None
        for i in reversed(range(len(blocks))):
            inp, out, t_fwd = ran[i]
            t0 = time.perf_counter()
            if out.requires_grad:
                out.backward(torch.ones_like(out) if grad is None else grad)
            _sync(out)
            t_bwd = time.perf_counter() - t0
            grad = inp.grad if inp.requires_grad else None
            if rep >= warmup:
                samples[i].append(t_fwd + t_bwd)
        for block in blocks:
            block.zero_grad(set_to_none=True)
    return [statistics.median(s) for s in samples]
