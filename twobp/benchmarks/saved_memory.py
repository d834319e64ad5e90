"""Peak bytes of saved activations, measured the same way for any runtime.

"Saved activations" are the tensors kept from a forward for its backward: what autograd
saves (every ``save_for_backward`` and built-in op, seen through
:func:`torch.autograd.graph.saved_tensors_hooks`) plus what the twobp activation store
holds between forward, p1 and p2. Both count *storages*, each once however many saved
tensors view it, so a tensor held by autograd and by the store is not counted twice.

This is the figure that differs between pipeline schedules and runtimes (parameters,
gradients and optimizer state do not), and it works on CPU, where no allocator statistics
exist. It is a pure-Python hook on every saved tensor: measure in steps of their own, not
in timed ones.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["SavedActivationMeter"]


def _key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class _Packed:
    """What autograd keeps instead of a saved tensor while the meter is on."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedActivationMeter:
    """``with SavedActivationMeter(store) as meter: ...``; then ``meter.peak_bytes``.

    ``store``: the twobp :class:`~twobp.store.ActivationStore` to include (None: autograd
    only). ``exclude``: tensors whose storages are not activations (the model's
    parameters, which ops save for their input gradient); they are never counted.
    Saved tensors packed inside the block are tracked until autograd frees them, even
    after the block ends; ``peak_bytes`` is the largest union of live storages seen at
    any pack or free.
    """

    def __init__(self, store=None, exclude=()):
        self.store = store
        self._exclude = {_key(t) for t in exclude}
        self._live: dict[tuple[int, int], int] = {}  # storage -> saved tensors alive on it
        self.peak_bytes = 0
        self._hooks = None

    def _sample(self) -> None:
        keys = set(self._live)
        if self.store is not None:
            keys.update(self.store.held_storages())
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in keys))

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
            return t
        k = _key(t)
        if k in self._exclude:
            return t
        self._live[k] = self._live.get(k, 0) + 1
        packed = _Packed(t)
        weakref.finalize(packed, self._release, k)
        self._sample()
        return packed

    def _release(self, k: tuple[int, int]) -> None:
        self._sample()  # the peak includes the moment just before autograd lets go
        n = self._live.get(k, 0) - 1
        if n <= 0:
            self._live.pop(k, None)
        else:
            self._live[k] = n

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def reset(self) -> None:
        """Start a new peak from what is live now."""
        self.peak_bytes = 0
        self._sample()

    def __enter__(self) -> "SavedActivationMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self.reset()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._sample()
