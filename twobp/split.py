"""Split regions and deferred weight gradients: the user-facing side of 2BP.

``with split_backward(microbatch=i): y = model(x)`` marks the forward of micro-batch ``i``:
the twobp modules inside record their saved tensors in the store under ``i``, and the
backward of that graph, whenever it runs, computes **p1 only** (input gradients flow on;
weight ``.grad`` is untouched). ``backward_p2(model)`` later runs the pending **p2** of
every twobp module in ``model``, accumulating dW into ``.grad``.

The split is decided at forward time, so a pipeline can choose per micro-batch.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Iterable, Iterator

import torch
from torch import nn

from .store import ActivationStore, Entry, EntryState, default_store

__all__ = ["split_backward", "backward_p2", "current_split", "pending_microbatches"]

_local = threading.local()


class _SplitState:
    __slots__ = ("microbatch", "store")

    def __init__(self, microbatch: int, store: ActivationStore):
        self.microbatch = microbatch
        self.store = store


def current_split() -> _SplitState | None:
    """The active split region of this thread, or None outside one."""
    return getattr(_local, "state", None)


@contextlib.contextmanager
def split_backward(*, microbatch: int, store: ActivationStore | None = None) -> Iterator[None]:
    """Run forwards whose backward will be p1 only; their p2 waits for :func:`backward_p2`.

    ``microbatch`` keys the saved tensors; it must be an int, unique among the
    forwards of one module that are pending at the same time.
    """
    if isinstance(microbatch, bool) or not isinstance(microbatch, int):
        raise TypeError(f"microbatch must be an int, got {type(microbatch).__name__} {microbatch!r}")
    prev = current_split()
    _local.state = _SplitState(microbatch, store or default_store())
    try:
        yield
    finally:
        _local.state = prev


def _grad_buffer(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        # honour a master-gradient dtype set on the parameter (torch >= 2.10: Tensor.grad_dtype)
        dtype = getattr(p, "grad_dtype", None) or p.dtype
        p.grad = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    return p.grad


def pending_microbatches(module: nn.Module, store: ActivationStore | None = None) -> list[int]:
    """Micro-batches with p2 ready (p1 done) for some twobp module inside ``module``."""
    store = store or default_store()
    owners = set(module.modules())
    return sorted({e.microbatch for e in store.entries(owners) if e.state is EntryState.READY})


@torch.no_grad()
def backward_p2(module_or_model: nn.Module, microbatches: Iterable[int] | None = None, *,
                batched: bool = True, store: ActivationStore | None = None) -> int:
    """Run the deferred weight gradients (p2) of every twobp module inside ``module_or_model``.

    ``microbatches``: which micro-batches to run (default: every ready one).
    ``batched``: one kernel launch per module over all the micro-batches (dW = Σ_i dY_iᵀ X_i
    as one reduction), instead of one launch per micro-batch. Results are equal up to
    floating-point summation order.

    Accumulates into each parameter's ``.grad`` (allocated as zeros when None) and frees
    the entries. Returns the number of (module, micro-batch) entries processed.

    Raises ``RuntimeError`` naming the fix when a named micro-batch has nothing pending
    although the module has trainable twobp weights (a module without any owes no p2, so
    naming its micro-batches is fine), or when its p1 has not run yet (p2 needs the dy p1
    deposits).
    """
    if not isinstance(module_or_model, nn.Module):
        raise TypeError(f"backward_p2 takes an nn.Module, got {type(module_or_model).__name__}")
    store = store or default_store()
    owners = set(module_or_model.modules())
    wanted = None if microbatches is None else sorted(set(microbatches))
    entries = store.entries(owners, wanted)
    waiting = [e for e in entries if e.state is EntryState.FORWARD]
    if wanted is not None:
        if waiting:
            e = waiting[0]
            raise RuntimeError(
                f"backward_p2 for micro-batch {e.microbatch} of {e.label} before its p1: run the "
                "backward of that micro-batch's loss (or output) first")
        missing = sorted(set(wanted) - {e.microbatch for e in entries})
        if missing and _has_deferred_weights(module_or_model):
            have = pending_microbatches(module_or_model, store)
            raise RuntimeError(
                f"backward_p2: nothing pending for micro-batch(es) {missing} in "
                f"{type(module_or_model).__name__}; pending: {have or 'none'}. Was the forward run "
                "inside twobp.split_backward(microbatch=...), and was its p2 already run?")
    ready = [e for e in entries if e.state is EntryState.READY]
    by_owner: dict[int, list[Entry]] = defaultdict(list)
    for e in ready:
        by_owner[id(e.owner)].append(e)
    for group in by_owner.values():
        _run_p2(group, batched)
    return len(ready)


def _has_deferred_weights(model: nn.Module) -> bool:
    """Whether any twobp module inside has a trainable parameter of its own (so p2 is owed)."""
    from .nn.base import TwoBPModule

    return any(isinstance(m, TwoBPModule) and any(p.requires_grad for p in m.parameters(recurse=False))
               for m in model.modules())


def _run_p2(group: list[Entry], batched: bool) -> None:
    first = group[0]
    grads = [(_grad_buffer(p) if (p is not None and need) else None)
             for p, need in zip(first.params, first.param_mask)]
    chunks = [group] if batched else [[e] for e in group]
    for chunk in chunks:
        taken = [e.take_p2() for e in chunk]
        first.op.param_grads([dy for dy, _ in taken], [s for _, s in taken], grads)
        for e in chunk:
            e.close()
