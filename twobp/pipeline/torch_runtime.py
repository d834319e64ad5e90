"""twobp stages inside torch.distributed.pipelining: torch's I step is p1, its W step is p2.

torch's zero-bubble schedules (``ScheduleInterleavedZeroBubble``, ``ScheduleZBVZeroBubble``,
``ScheduleInterleaved1F1B`` with split backward, ...) call, per stage and micro-batch,
``forward_one_chunk`` (F), ``backward_one_chunk(full_backward=False)`` (I: input gradient)
and later ``backward_weight_one_chunk`` (W: weight gradient). torch's own stage does I with
``autograd.grad(..., retain_graph=True)`` over the stage output, so the **whole** autograd
graph of the micro-batch (every saved activation) stays alive until W, and W walks it again.

:class:`TwoBPPipelineStage` is a ``PipelineStage`` whose modules are twobp twins
(:func:`twobp.convert`):

* **F** runs the stage's forward inside ``twobp.split_backward(microbatch=i)`` (with its
  own activation store);
* **I** is an ordinary backward through the stage output, without ``retain_graph``: the
  twins compute dX only (p1), park x and dY in the store, and autograd frees the graph at
  once; gradients of parameters outside twobp modules are computed there too;
* **W** is ``twobp.backward_p2(stage, microbatches=[i])``: dW from the stored x and dY, the
  graph long gone;
* a full backward (``B`` in a schedule) is I then W at once.

Everything else (communication, loss, gradient scaling by the number of micro-batches,
schedules, their CSV action format) is torch's. The stage refuses DDP/FSDP-wrapped modules
(2BP computes weight gradients after the backward; see :func:`twobp.backward_p2`).

    stage = TwoBPPipelineStage(twobp.convert(my_stage_module), stage_index, num_stages, device)
    schedule = ScheduleZBVZeroBubble([stage_a, stage_b], n_microbatches, loss_fn=loss_fn)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.pipelining import PipelineStage

from ..split import backward_p2, split_backward
from ..store import ActivationStore

__all__ = ["TwoBPPipelineStage"]


class TwoBPPipelineStage(PipelineStage):
    """A :class:`torch.distributed.pipelining.PipelineStage` whose I step is twobp's p1 and
    whose W step is twobp's p2 (see the module docstring). Same constructor as torch's, plus
    ``store``: the activation store of its split forwards (default: one of its own)."""

    def __init__(self, submodule: torch.nn.Module, stage_index: int, num_stages: int, device: torch.device,
                 *args: Any, store: ActivationStore | None = None, **kwargs: Any) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(submodule, (DistributedDataParallel, FSDPModule)):
            raise NotImplementedError(
                "TwoBPPipelineStage: a DDP/FSDP-wrapped stage module cannot defer its weight gradients (those "
                "wrappers reduce gradients in autograd hooks, before W runs); pass the bare module and average "
                "gradients after the schedule's step, or use twobp's PipelineExecutor(mesh=...)")
        super().__init__(submodule, stage_index, num_stages, device, *args, **kwargs)
        self.store = store if store is not None else ActivationStore()
        self._owed_w: set[int] = set()

    # F: the forward inside a split region, so the twins park what p2 needs
    def forward_one_chunk(self, fwd_chunk_id: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
                          save_forward_output: bool = True):
        if not self.has_backward:
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        with split_backward(microbatch=fwd_chunk_id, store=self.store):
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)

    # I: torch's plain (full) backward through the stage output; the split forward makes it p1
    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        if not self.has_backward:
            return
        super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=True, last_backward=last_backward)
        if full_backward:
            self._p2(bwd_chunk_id)
        else:
            self._owed_w.add(bwd_chunk_id)

    # W: p2 of this micro-batch from the store
    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward=False):
        if not self.has_backward:
            return
        if bwd_chunk_id not in self._owed_w:
            raise RuntimeError(
                f"{self.log_prefix} W of micro-batch {bwd_chunk_id} without its I: run "
                "backward_one_chunk(full_backward=False) for it first")
        self._owed_w.discard(bwd_chunk_id)
        self._p2(bwd_chunk_id)

    def _p2(self, mb: int) -> None:
        if any(e.microbatch == mb for e in self.store.entries()):
            backward_p2(self.submod, microbatches=[mb], store=self.store)

    def clear_runtime_states(self) -> None:
        """torch's per-step reset; also checks the previous step left no p2 behind (LeakError)."""
        super().clear_runtime_states()
        if self._owed_w:
            raise RuntimeError(f"{self.log_prefix} the previous step left W of micro-batches {sorted(self._owed_w)} "
                               "undone: every I needs its W in the same step")
        self.store.begin_step()
