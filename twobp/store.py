"""The saved-activation store: what p2 needs, with an explicit lifetime.

2BP changes *when* a layer's saved tensors may die. Plain autograd frees everything a
node saved once its backward has run. With the backward split in two:

* **forward** saves what p1 (dX) needs on the autograd node, as plain autograd does (so
  version checks and activation checkpointing work unchanged), and records here what p2
  (dW) needs, per module call: an *entry*.
* **p1** computes dX from the node's tensors, which autograd then frees, and deposits dy,
  the gradient of the module's output, next to the p2 set (or, for ops whose parameter
  gradients are cheap reductions, the reduced *partials* instead of the p2 set and dy).
  The entry is now *ready*.
* **p2** takes the ready entry, accumulates into ``.grad`` and removes the entry. At the
  end of a step the store must be empty; whatever is left is a leak and
  :meth:`ActivationStore.begin_step` reports it by raising :class:`LeakError`.

A module may run several times under one micro-batch (a weight shared by layers, ALBERT):
each call gets its own entry, and p2 of that micro-batch accumulates all of them.

Byte accounting counts the *storages* kept alive, each once (a view keeps its whole
storage alive, so that is what memory pays for). ``live_bytes`` is updated on every
transition; ``peak_bytes`` is the maximum since the last :meth:`reset_peak`.

Owners (the modules) are held **weakly**: the store never keeps a module alive, and when
a module is garbage-collected its pending entries are dropped with it (p2 is asked for
per module, and a module that no longer exists cannot be named; its input gradients
still flow at p1). An entry holds the parameters it accumulates into (so tied
parameters work) and the saved tensors, until p2 or until its owner dies.

In-place edits are caught: a tensor of the p2 set, or a parameter, modified in place
between the forward and p2 (an ``optimizer.step()`` before ``backward_p2``, say) makes p2
raise instead of computing a gradient of values that no longer exist.
"""

from __future__ import annotations

import enum
import functools
import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ActivationStore",
    "Entry",
    "EntryState",
    "LeakError",
    "MemoryReport",
    "PendingEntry",
    "record_versions",
    "check_versions",
    "default_store",
    "format_bytes",
    "memory_report",
]

_RECOVER = ("To recover, drop what is pending with twobp.default_store().clear() (or the "
            "executor's store) and zero the gradients; the step's deferred gradients are lost.")


class LeakError(RuntimeError):
    """Saved activations are still held when a new step starts."""


class EntryState(enum.Enum):
    FORWARD = "forward"  # p1 has not run yet: holds the p2 set
    READY = "ready"  # p1 ran: holds the p2 set and dy (or the partials)
    CLOSED = "closed"  # p2 ran (or the entry was dropped): holds nothing


def record_versions(*groups: dict[str, Tensor] | None) -> dict[int, int]:
    """Version counters of saved tensors, to catch in-place edits before they are used."""
    return {id(t): t._version for g in groups if g for t in g.values() if t is not None}


def check_versions(group: dict[str, Tensor], versions: dict[int, int], where: str) -> None:
    for name, t in group.items():
        if t is not None and id(t) in versions and t._version != versions[id(t)]:
            raise RuntimeError(
                f"saved tensor {name!r} of {where} was modified in place after forward; 2BP keeps "
                "it until p2, so clone it before editing it in place. " + _RECOVER)


def _storage_key(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


_seq = itertools.count()


class Entry:
    """Saved tensors of one module call under one micro-batch.

    Created by :meth:`ActivationStore.open` during forward. ``op`` is the split op that
    will consume the tensors; ``params`` are the parameters p2 accumulates into (the
    entry holds them so tied parameters work); ``param_mask`` says which of them need a
    gradient. ``owner`` is the module, held weakly (None once it is gone).
    """

    __slots__ = ("store", "_owner", "owner_id", "label", "microbatch", "op", "params", "param_mask", "state",
                 "p2", "dy", "seq", "_keys", "_versions", "_param_versions", "_dy_version", "_node")

    def __init__(self, store: "ActivationStore", owner: Hashable, label: str, microbatch: int,
                 op: Any, params: Sequence[Tensor | None], param_mask: Sequence[bool], p2: dict[str, Tensor]):
        try:
            self._owner = weakref.ref(owner, store._owner_died)
        except TypeError:  # not weak-referenceable (a plain key): held as it is
            self._owner = (lambda o=owner: o)
        params = tuple(params)
        self.store, self.owner_id, self.label, self.microbatch, self.op = store, id(owner), label, microbatch, op
        self.params, self.param_mask, self.state, self.p2 = params, tuple(param_mask), EntryState.FORWARD, p2
        self.dy: Tensor | None = None
        self._dy_version, self.seq, self._node = 0, next(_seq), None
        self._keys: set[tuple[int, int]] = set()
        self._versions = {id(t): t._version for t in p2.values() if t is not None}
        self._param_versions = [None if p is None else p._version for p in params]

    @property
    def owner(self) -> Any:
        """The module this entry belongs to, or None once it was garbage-collected."""
        return self._owner()

    def tensors(self) -> list[Tensor]:
        held = [t for t in (self.p2 or {}).values() if t is not None]
        if self.dy is not None:
            held.append(self.dy)
        return held

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct storages this entry alone keeps alive."""
        seen = {}
        for t in self.tensors():
            k = _storage_key(t)
            seen[k] = k[1]
        return sum(seen.values())

    def begin_p1(self) -> bool:
        """p1 is about to run for this entry: it must be the first time. Returns whether p1
        should deposit dy: False when the entry was dropped (its module was garbage-collected,
        so no p2 can ever be asked for it; dX is still needed).

        A parameter whose ``requires_grad`` was turned off since the forward gets no gradient,
        as torch's own AccumulateGrad decides at backward time: the mask is narrowed here."""
        if self.state is EntryState.CLOSED:
            return False
        if self.state is not EntryState.FORWARD:
            raise RuntimeError(
                f"p1 of {self.label} micro-batch {self.microbatch} ran a second time: the backward of a "
                "forward run inside twobp.split_backward may run only once (retain_graph=True and "
                "backward twice through the same split forward are not supported: the second pass "
                "would deposit its dy twice). Run such a forward outside split_backward.")
        self.param_mask = tuple([need and p is not None and p.requires_grad
                                 for p, need in zip(self.params, self.param_mask)])
        return True

    def close_with(self, node: Any) -> None:
        """Drop this entry if ``node`` (the autograd node of its forward) is freed before p1
        ran: an output that never reached a loss has its graph freed with no backward, and
        its weight gradient is zero, so nothing is deferred. (A weak reference with a
        callback, cut at :meth:`close`: cheaper per call than ``weakref.finalize``.)"""
        self._node = weakref.ref(node, self._node_freed)

    def _node_freed(self, ref: weakref.ref) -> None:
        if self.state is EntryState.FORWARD:
            self.close()

    def deposit_dy(self, dy: Tensor) -> None:
        """Finish p1: keep dy for p2; the entry becomes ready."""
        store = self.store
        with store._lock:
            self.dy, self._dy_version, self.state = dy, dy._version, EntryState.READY
            s = dy.untyped_storage()  # the p2 set is held already: only dy's storage is new
            k = (s.data_ptr(), s.nbytes())
            if k not in self._keys:
                self._keys.add(k)
                store._acquire(k)
                if store._live > store._peak:
                    store._peak = store._live

    def deposit_partials(self, partials: dict[str, Tensor]) -> None:
        """Finish p1 of an op that reduced its parameter gradients to partials in p1: they
        replace the p2 set (and dy is not kept); the entry becomes ready."""
        with self.store._lock:
            self.p2 = partials
            self._versions = {}
            self.dy = None
            self.state = EntryState.READY
            self.store._refresh(self)

    def take_p2(self) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Return (dy, p2 set) of a ready entry, checked for in-place modification."""
        if self.state is not EntryState.READY:
            raise RuntimeError(
                f"p2 of {self.label} micro-batch {self.microbatch} asked for before its p1: run the "
                "backward of that micro-batch's output first (p2 needs the dy that p1 deposits)")
        p2 = self.p2 or {}
        versions = self._versions
        for t in p2.values():
            if t is not None and versions.get(id(t), t._version) != t._version:
                check_versions(p2, versions, self._where())  # raises, naming the tensor
        if self.dy is not None and self.dy._version != self._dy_version:
            raise RuntimeError(
                f"the output gradient p1 received for {self._where()} was modified in place before p2 (a "
                "gradient buffer passed to backward() and reused, or edited by a hook): 2BP keeps that tensor "
                "until p2 computes the weight gradient from it, so pass backward() a tensor you do not reuse "
                "until backward_p2 has run (e.g. y.backward(g.clone())). " + _RECOVER)
        for i, (p, v) in enumerate(zip(self.params, self._param_versions)):
            if p is not None and self.param_mask[i] and p._version != v:
                raise RuntimeError(
                    f"parameter {i} (shape {tuple(p.shape)}) of {self._where()} was modified in place after its "
                    "forward (an optimizer.step() or a weight edit before twobp.backward_p2?): its deferred "
                    "gradient would belong to a value that no longer exists. Run backward_p2 before "
                    "stepping or editing the parameters. " + _RECOVER)
        return self.dy, p2

    def _where(self) -> str:
        return f"{self.label} micro-batch {self.microbatch} (p2)"

    def close(self) -> None:
        """Drop everything; the entry leaves the store."""
        self.store._close(self)


@dataclass(frozen=True)
class PendingEntry:
    """One line of a memory report."""

    label: str
    microbatch: int
    state: str
    nbytes: int


@dataclass(frozen=True)
class MemoryReport:
    """A snapshot of the store.

    ``live_bytes``: storages held right now, each counted once.
    ``peak_bytes``: the maximum of ``live_bytes`` since the last reset.
    ``entries``: what is held, per module call and micro-batch.
    """

    live_bytes: int
    peak_bytes: int
    entries: tuple[PendingEntry, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        lines = [f"twobp store: live {format_bytes(self.live_bytes)}, peak {format_bytes(self.peak_bytes)}, "
                 f"{len(self.entries)} entries"]
        for e in self.entries:
            lines.append(f"  {e.label:<40} mb={e.microbatch:<4} {e.state:<8} {format_bytes(e.nbytes)}")
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """Bytes in B/KiB/MiB/GiB, for reports."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


class ActivationStore:
    """Holds split-mode saved tensors between forward, p1 and p2 (see module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[int, Entry] = {}  # seq -> entry, in creation order
        # storage key -> number of entries holding it; live bytes count each storage once
        self._refcount: dict[tuple[int, int], int] = {}
        self._live = 0
        self._peak = 0
        _stores.add(self)

    # ---- lifetime transitions -------------------------------------------------------
    def open(self, *, owner: Hashable, label: str, microbatch: int, op: Any,
             params: Sequence[Tensor | None], param_mask: Sequence[bool], p2: dict[str, Tensor]) -> Entry:
        """Record a forward's p2 set under ``(owner, microbatch)`` (one more entry if that
        module already ran under this micro-batch: p2 accumulates all of them)."""
        return self.open_call(owner, label, microbatch, op, tuple(params), tuple(param_mask), p2)

    def open_call(self, owner: Hashable, label: str, microbatch: int, op: Any, params: tuple,
                  param_mask: tuple[bool, ...], p2: dict[str, Tensor]) -> Entry:
        """:meth:`open`, positional: the split op's forward calls it on every op call."""
        if not _guard_installed:
            _install_step_guard()
        with self._lock:
            entry = Entry(self, owner, label, microbatch, op, params, param_mask, p2)
            self._entries[entry.seq] = entry
            keys = entry._keys
            for t in p2.values():
                if t is not None:
                    s = t.untyped_storage()
                    k = (s.data_ptr(), s.nbytes())
                    if k not in keys:
                        keys.add(k)
                        self._acquire(k)
            if self._live > self._peak:
                self._peak = self._live
            return entry

    def _owner_died(self, ref: weakref.ref) -> None:
        with self._lock:
            for e in [e for e in self._entries.values() if e._owner is ref]:
                self._close(e)

    def _refresh(self, entry: Entry) -> None:
        new = {_storage_key(t) for t in entry.tensors()}
        for k in entry._keys - new:
            self._release(k)
        for k in new - entry._keys:
            self._acquire(k)
        entry._keys = new
        self._peak = max(self._peak, self._live)

    def _acquire(self, k: tuple[int, int]) -> None:
        n = self._refcount.get(k, 0)
        if n == 0:
            self._live += k[1]
        self._refcount[k] = n + 1

    def _release(self, k: tuple[int, int]) -> None:
        n = self._refcount[k] - 1
        if n == 0:
            del self._refcount[k]
            self._live -= k[1]
        else:
            self._refcount[k] = n

    def _close(self, entry: Entry) -> None:
        with self._lock:
            for k in entry._keys:
                self._release(k)
            entry._keys = set()
            entry._node = None  # the callback holds the entry: cut the cycle
            entry.p2 = entry.dy = None
            entry.params = ()
            entry.state = EntryState.CLOSED
            self._entries.pop(entry.seq, None)

    # ---- queries ----------------------------------------------------------------------
    def entries(self, owners: Iterable[Hashable] | None = None,
                microbatches: Iterable[int] | None = None) -> list[Entry]:
        """Entries (any state) of the given owners and micro-batches, in creation order."""
        own = None if owners is None else {id(o) for o in owners}
        mbs = None if microbatches is None else set(microbatches)
        with self._lock:
            out = [e for e in self._entries.values()
                   if (own is None or e.owner_id in own) and (mbs is None or e.microbatch in mbs)]
        # an id may outlive its module and be reused: keep entries whose owner is really there
        return out if own is None else [e for e in out if e._owner() is not None]

    def held_storages(self) -> dict[tuple[int, int], int]:
        """``{(data_ptr, nbytes): number of entries holding it}`` for every storage held now
        (a snapshot; for meters that count storages shared with other holders once)."""
        with self._lock:
            return dict(self._refcount)

    @property
    def live_bytes(self) -> int:
        return self._live

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def reset_peak(self) -> None:
        """Start a new peak measurement from the current live bytes."""
        with self._lock:
            self._peak = self._live

    def is_empty(self) -> bool:
        return not self._entries

    def report(self) -> MemoryReport:
        with self._lock:
            rows = tuple(PendingEntry(e.label, e.microbatch, e.state.value, e.nbytes)
                         for e in self._entries.values())
            return MemoryReport(self._live, self._peak, rows)

    def begin_step(self) -> None:
        """Check that the previous step left nothing behind, and reset the peak.

        Raises :class:`LeakError` listing every entry still held: a p1 whose p2 never ran
        (its gradient is missing from ``.grad``), or a forward whose backward never ran (its
        output is still referenced: a forgotten backward, or an output that reaches no loss
        kept alive by a variable or a module attribute).
        """
        if self._entries:
            states = {e.state for e in self._entries.values()}
            causes = []
            if EntryState.READY in states:
                causes.append("a backward ran but its p2 did not: run twobp.backward_p2(model) for it")
            if EntryState.FORWARD in states:
                causes.append("a split forward's output is still referenced but had no backward: run its "
                              "backward, or drop the reference (an output that reaches no loss is best computed "
                              "outside split_backward, or under torch.no_grad())")
            raise LeakError(
                "saved activations leaked from the previous step: " + "; ".join(causes) + ". "
                + _RECOVER + "\n" + str(self.report()))
        self.reset_peak()

    def clear(self) -> None:
        """Drop every entry (for error recovery); their gradients are lost."""
        with self._lock:
            for e in list(self._entries.values()):
                self._close(e)
            self._peak = self._live


_stores: "weakref.WeakSet[ActivationStore]" = weakref.WeakSet()
_guard_installed = False


def _install_step_guard() -> None:
    """Once per process, on the first split forward: make every optimizer.step(), and every
    GradScaler.unscale_(optimizer) (fp16: it divides .grad by the scale once, so a p2 that lands
    later would stay scaled), check that no p2 is pending for its parameters (their .grad would
    be incomplete)."""
    global _guard_installed
    if _guard_installed:
        return
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(_refuse_pending_p2)
    _guard_unscale()
    _guard_installed = True


def _guard_unscale() -> None:
    """torch has no hook before GradScaler.unscale_: wrap it (once; subclasses inherit it)."""
    scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler is None or getattr(scaler.unscale_, "_twobp_guard", False):
        return
    unscale = scaler.unscale_

    @functools.wraps(unscale)
    def guarded_unscale_(self, optimizer):
        _refuse_pending_p2(optimizer, (), {}, what="GradScaler.unscale_(optimizer) (which GradScaler.step runs too)")
        return unscale(self, optimizer)

    guarded_unscale_._twobp_guard = True
    scaler.unscale_ = guarded_unscale_


def _refuse_pending_p2(optimizer, args, kwargs, what: str = "optimizer.step()") -> None:
    # ready entries only: their p1 ran, so .grad lacks their part until p2. A forward whose
    # backward has not run owes nothing yet (torch steps past a graph that is still alive too;
    # if its backward runs later, p2 refuses the weights this step changed).
    pending = [e for st in list(_stores) if st._entries for e in st.entries() if e.state is EntryState.READY]
    if not pending:
        return
    mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
    owed = sorted({e.label for e in pending
                   if any(p is not None and need and id(p) in mine for p, need in zip(e.params, e.param_mask))})
    if owed:
        raise RuntimeError(
            f"{what} while the weight gradients (p2) of {', '.join(owed[:4])}"
            f"{' ...' if len(owed) > 4 else ''} are still pending: their .grad is incomplete. Run "
            "twobp.backward_p2(model) first (a PipelineExecutor with carried P2: executor.flush(), which also "
            "steps the optimizer).")


_default = ActivationStore()


def default_store() -> ActivationStore:
    """The process-wide store used by twobp modules."""
    return _default


def memory_report() -> MemoryReport:
    """Live bytes, peak bytes and pending entries of the default store."""
    return _default.report()
