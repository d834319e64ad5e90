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
import functools
import threading
import warnings
from collections import defaultdict
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .store import ActivationStore, Entry, EntryState, default_store

__all__ = ["split_backward", "backward_p2", "current_split", "pending_microbatches"]

_local = threading.local()


class _SplitState:
    __slots__ = ("microbatch", "store", "opened")

    def __init__(self, microbatch: int, store: ActivationStore):
        self.microbatch = microbatch
        self.store = store
        self.opened: list[Entry] = []  # entries this region's forwards opened


def current_split() -> _SplitState | None:
    """The active split region of this thread, or None outside one."""
    return getattr(_local, "state", None)


@contextlib.contextmanager
def split_backward(*, microbatch: int, store: ActivationStore | None = None) -> Iterator[None]:
    """Run forwards whose backward will be p1 only; their p2 waits for :func:`backward_p2`.

    ``microbatch`` keys the saved tensors; ``backward_p2(..., microbatches=[i])`` runs the
    p2 of every forward made under ``i`` (a module run several times under one id, as
    with shared layers, accumulates all its calls).

    If the block raises, the store entries its forwards opened are dropped again (their
    backward can never run), so the next step starts clean.
    """
    if isinstance(microbatch, bool) or not isinstance(microbatch, int):
        raise TypeError(f"microbatch must be an int, got {type(microbatch).__name__} {microbatch!r}")
    if store is not None and not isinstance(store, ActivationStore):
        raise TypeError(f"store must be a twobp.ActivationStore, got {type(store).__name__}")
    prev = current_split()
    state = _SplitState(microbatch, store or default_store())
    _local.state = state
    try:
        yield
    except BaseException:
        for e in state.opened:
            if e.state is EntryState.FORWARD:
                e.close()
        raise
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
    return sorted({e.microbatch for e in store.entries(module.modules()) if e.state is EntryState.READY})


@torch.no_grad()
def backward_p2(module_or_model: nn.Module, microbatches: Iterable[int] | int | None = None, *,
                batched: bool = True, store: ActivationStore | None = None) -> int:
    """Run the deferred weight gradients (p2) of every twobp module inside ``module_or_model``.

    ``microbatches``: which micro-batches to run, an int or several (default: every ready
    one). ``batched``: one kernel launch per module over all the micro-batches
    (dW = Σ_i dY_iᵀ X_i as one reduction), instead of one launch per micro-batch. Results
    are equal up to floating-point summation order.

    Accumulates into each parameter's ``.grad`` (allocated as zeros when None) and frees
    the entries. Returns the number of module calls processed.

    Raises ``RuntimeError`` naming the fix when a named micro-batch has nothing pending
    although the module has trainable twobp weights (a module without any owes no p2, so
    naming its micro-batches is fine), or when no call of a named micro-batch has run p1
    yet (p2 needs the dy p1 deposits). Calls of a micro-batch whose backward did run, but
    whose own outputs reached no loss and are still referenced, stay pending without an
    error (torch keeps their graph too; a later backward readies them). With
    ``microbatches=None`` it runs every ready entry and warns about micro-batches still
    waiting for their backward (raising when nothing is ready but something waits). Warns
    (and returns 0) when nothing at all is pending for a model with trainable twobp
    weights: its forward probably ran outside ``split_backward``, so its gradients are
    already in ``.grad``. A forward whose output never reaches a loss leaves nothing
    behind once that output is garbage.
    """
    if not isinstance(module_or_model, nn.Module):
        raise TypeError(f"backward_p2 takes an nn.Module, got {type(module_or_model).__name__}")
    if isinstance(microbatches, bool) or (microbatches is not None and not isinstance(microbatches, int)
                                          and not isinstance(microbatches, Iterable)):
        raise TypeError(f"backward_p2: microbatches must be an int, an iterable of ints or None, "
                        f"got {microbatches!r}")
    if isinstance(microbatches, int):
        microbatches = [microbatches]
    store = store or default_store()
    owners = list(module_or_model.modules())  # one walk of the tree per call: it runs per P2 action
    _refuse_wrappers(owners)
    wanted = None if microbatches is None else sorted(set(microbatches))
    if wanted is not None and any(isinstance(mb, bool) or not isinstance(mb, int) for mb in wanted):
        raise TypeError(f"backward_p2: micro-batch ids must be ints, got {wanted!r}")
    entries = store.entries(owners, wanted)
    waiting = [e for e in entries if e.state is EntryState.FORWARD]
    ready = [e for e in entries if e.state is EntryState.READY]
    # A micro-batch none of whose calls ran p1 had no backward yet: p2 now would lose its
    # gradient. One whose backward ran may still have calls waiting: outputs that did not
    # reach that loss but are still referenced (an auxiliary output kept in a variable), as
    # torch keeps their graph; they stay pending (a later backward readies them, freeing the
    # output drops them).
    ready_mbs = {e.microbatch for e in ready}
    unreached = [e for e in waiting if e.microbatch not in ready_mbs]
    if unreached and (wanted is not None or not ready):
        e = unreached[0]
        raise RuntimeError(
            f"backward_p2 for micro-batch {e.microbatch} of {e.label} before its p1: run the "
            "backward of that micro-batch's loss (or output) first. (A backward restricted to the "
            "parameters, loss.backward(inputs=[...]) or torch.autograd.grad(loss, params), does not reach "
            "a split forward's p1: inside split_backward the weights are not autograd inputs, and their "
            "gradients come from backward_p2 after a backward to the inputs or with no inputs= at all. "
            "An output that reaches no loss but is still referenced also waits here: compute it outside "
            "split_backward, or del it.)")
    if unreached:  # microbatches=None: run what is ready, say what still waits
        labels = sorted({f"{e.label} (micro-batch {e.microbatch})" for e in unreached})
        warnings.warn(
            f"backward_p2: {len(unreached)} split forward(s) of {type(module_or_model).__name__} have had no "
            f"backward yet, so their p2 still waits: {', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''}",
            UserWarning, stacklevel=3)
    if wanted is not None:
        missing = sorted(set(wanted) - {e.microbatch for e in entries})
        if missing and _has_deferred_weights(owners):
            have = pending_microbatches(module_or_model, store)
            raise RuntimeError(
                f"backward_p2: nothing pending for micro-batch(es) {missing} in "
                f"{type(module_or_model).__name__}; pending: {have or 'none'}. Was the forward run "
                "inside twobp.split_backward(microbatch=...), and was its p2 already run?")
    elif not entries and _has_deferred_weights(owners):
        warnings.warn(
            f"backward_p2: nothing is pending for {type(module_or_model).__name__}: no forward of it ran "
            "inside twobp.split_backward since the last p2, or those that did computed their weight gradients "
            "at once (a computed weight such as weight_norm, or reentrant checkpointing, each warned when it "
            "ran), so there is no deferred gradient to compute: .grad already holds it.", UserWarning, stacklevel=3)
    # one batched p2 per (owner, op, parameters, mask): a module may call two kinds of op on
    # its parameters (TwoBPAttention: a packed projection, or grouped ones for cross-attention),
    # and its calls under different micro-batches may have seen other Parameter objects (a
    # weight replaced between forwards) or other requires_grad flags (a layer frozen for some
    # micro-batches): each group's gradients go to exactly the parameters its forwards used
    by_call: dict[tuple, list[Entry]] = defaultdict(list)
    for e in ready:
        by_call[(e.owner_id, _op_key(e.op), tuple(map(id, e.params)), e.param_mask)].append(e)
    _run_p2_groups(list(by_call.values()), batched)
    return len(ready)


def _op_key(op) -> object:
    """Entries whose ops are equal (frozen dataclasses: same kind and settings) batch together."""
    try:
        hash(op)
    except TypeError:
        return id(op)
    return op


_DP_ALTERNATIVE = ("2BP computes weight gradients after the backward, when DDP and FSDP have already reduced "
                   "(missing) gradients in their autograd hooks, so each rank would keep only its own. Use "
                   "twobp's data parallelism instead (PipelineExecutor(..., dp_group=...) or `twobp train "
                   "--dp N`, which all-reduces after p2), or run the forward outside split_backward.")


def _refuse_wrappers(modules: list[nn.Module]) -> None:
    """Raise for a DDP- or FSDP-wrapped model (``modules``: the model's modules). Looks the
    wrapper classes up in each module's MRO: FSDPModule is an ABC, whose isinstance runs Python."""
    fsdp = _fsdp_type()
    for m in modules:
        mro = type(m).__mro__
        if DistributedDataParallel in mro or (fsdp is not None and fsdp in mro):
            if DistributedDataParallel in mro:
                raise NotImplementedError(f"backward_p2 on a torch DistributedDataParallel model: {_DP_ALTERNATIVE}")
            raise NotImplementedError(f"backward_p2 on a model sharded with torch FSDP (fully_shard): "
                                      f"{_DP_ALTERNATIVE}")


@functools.lru_cache(maxsize=1)
def _fsdp_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        return None
    return FSDPModule


def _has_deferred_weights(modules: list[nn.Module]) -> bool:
    """Whether any twobp module among ``modules`` has a trainable parameter of its own (so p2 is owed)."""
    from .nn.base import TwoBPModule

    return any(isinstance(m, TwoBPModule) and any(p.requires_grad for p in m.parameters(recurse=False))
               for m in modules)


def _run_p2_groups(groups: list[list[Entry]], batched: bool) -> None:
    """p2 of every owner's entries, then the parameters' gradient hooks, as autograd would.

    A parameter's tensor hooks (``register_hook``) see the gradient this call adds, summed
    over every entry and owner (a tied weight), and may replace it; then it is accumulated
    into ``.grad`` and the post-accumulate-grad hooks fire, once per parameter per call.
    Parameters without tensor hooks are accumulated into ``.grad`` in place.
    """
    fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (param, pending gradient)
    touched: dict[int, torch.Tensor] = {}
    for group in groups:
        first = group[0]
        grads = []
        for p, need in zip(first.params, first.param_mask):
            if p is None or not need:
                grads.append(None)
                continue
            touched[id(p)] = p
            if getattr(p, "_backward_hooks", None):
                if id(p) not in fresh:
                    dtype = getattr(p, "grad_dtype", None) or p.dtype
                    fresh[id(p)] = (p, torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format))
                grads.append(fresh[id(p)][1])
            else:
                grads.append(_grad_buffer(p))
        op = first.op
        for chunk in ([group] if batched else [[e] for e in group]):
            taken = [e.take_p2() for e in chunk]
            if any(g is not None for g in grads):  # else every parameter was frozen before p1
                op.param_grads([dy for dy, _ in taken], [s for _, s in taken], grads)
            for e in chunk:
                e.close()
    for p, g in fresh.values():
        for hook in list(p._backward_hooks.values()):
            out = hook(g)
            if out is not None:
                g = out
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g.to(p.grad.dtype))
    for p in touched.values():
        for hook in list((getattr(p, "_post_accumulate_grad_hooks", None) or {}).values()):
            hook(p)
