"""twobp: 2-stage backpropagation (2BP) at the level of the kernels.

A layer's backward splits into p1 (dX, which the previous pipeline stage waits for) and
p2 (dW, which nobody waits for until the optimizer step). twobp runs p1 at once and lets
a pipeline schedule put p2 into its idle time.

Public API:

* modules: :class:`TwoBPLinear`, :class:`TwoBPEmbedding`, :class:`TwoBPLayerNorm`,
  :class:`TwoBPRMSNorm`, :class:`TwoBPConv2d`, :class:`TwoBPAttention`, and Mamba's
  :class:`TwoBPCausalConv1d` and :class:`TwoBPSelectiveScan`; :func:`convert` swaps
  them (and Hugging Face's Conv1D and RMSNorm classes) into a model, with a
  :class:`ConversionReport`; :func:`revert` swaps them back to torch's own modules
* :func:`split_backward`, :func:`backward_p2`: the split itself
* :func:`memory_report`, :func:`default_store`, :class:`ActivationStore`, :class:`LeakError`
* :func:`use_backend`: force the Triton kernels or the torch reference
* :class:`MasterWeights`: bf16/fp16 parameters with fp32 master weights and optimizer state
* :func:`keep_freed_host_memory`: stop glibc's malloc from page-faulting CPU activations back
  (the pipeline executor calls it on CPU)
"""

from .backend import resolve_backend, use_backend
from .host_memory import keep_freed_host_memory
from .optim import MasterWeights
from .nn import (ConversionReport, TwoBPAttention, TwoBPCausalConv1d, TwoBPConv2d, TwoBPEmbedding, TwoBPLayerNorm,
                 TwoBPLinear, TwoBPModule, TwoBPRMSNorm, TwoBPSelectiveScan, convert, label_modules, revert)
from .split import backward_p2, pending_microbatches, split_backward
from .store import ActivationStore, LeakError, MemoryReport, default_store, memory_report

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "ConversionReport",
    "LeakError",
    "MasterWeights",
    "MemoryReport",
    "TwoBPAttention",
    "TwoBPCausalConv1d",
    "TwoBPConv2d",
    "TwoBPEmbedding",
    "TwoBPLayerNorm",
    "TwoBPLinear",
    "TwoBPModule",
    "TwoBPRMSNorm",
    "TwoBPSelectiveScan",
    "backward_p2",
    "convert",
    "default_store",
    "keep_freed_host_memory",
    "label_modules",
    "memory_report",
    "pending_microbatches",
    "resolve_backend",
    "revert",
    "split_backward",
    "use_backend",
]
