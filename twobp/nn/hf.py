"""Twins for Hugging Face transformers' own layers, which :func:`twobp.convert` finds.

transformers is not a dependency of twobp: nothing here imports it until a module of a
transformers class is met (so transformers is already imported by then).

* ``transformers.pytorch_utils.Conv1D`` (GPT-2 and its relatives), y = x W + b with
  W [in, out]: :func:`conv1d_twin` builds ``TwoBPConv1D``, a subclass of it whose forward
  is :class:`~twobp.ops.conv1d.Conv1DOp` (the linear kernels on Wᵀ's strides).
* RMSNorm classes whose forward is, code for code, Llama's (``LlamaRMSNorm``: Mistral,
  Qwen2/3, Phi-3, Mixtral, ...) or T5's (``T5LayerNorm``: T5, mT5, LongT5, ...):
  y = w · x / sqrt(mean(x²) + eps) over the last dim, with ``weight`` [N] and
  ``variance_epsilon``. Their twin is a subclass whose forward is the split RMSNorm op,
  so dw is deferred to p2. Equal to HF's in fp32/fp64 (HF computes fp64 inputs in fp32;
  the twin in fp64). In fp16/bf16 the twin rounds once (x̂ · w in fp32, then to the
  output dtype) where HF rounds x̂ first: within one unit in the last place. The output
  dtype is HF's (Llama: promote(weight, input); T5: the weight's if half, else fp32 or wider).
* Anything else of transformers with parameters of its own is left by convert with the
  reason (GemmaRMSNorm, say: its weight enters as 1 + w).

Each twin class records the class it reverts to (``_twobp_reverts_to``), so
:func:`twobp.revert` swaps it back.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn

from ..ops.conv1d import Conv1DOp
from ..ops.norm import RMSNormOp
from .base import TwoBPModule

__all__ = ["conv1d_twin", "hf_twin_class", "is_hf_class"]

_CONV1D = Conv1DOp()


def is_hf_class(cls: type) -> bool:
    """Whether ``cls`` comes from the transformers package."""
    return (getattr(cls, "__module__", "") or "").split(".")[0] == "transformers"


def _same_code(f, g) -> bool:
    """Whether two functions have the same code (HF's modular copies are byte-identical)."""
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return a is not None and b is not None and (a.co_code, a.co_consts, a.co_names, a.co_varnames) == \
        (b.co_code, b.co_consts, b.co_names, b.co_varnames)


def _conv1d_forward(self, x: Tensor) -> Tensor:
    return self._split(_CONV1D, (x,), (self.weight, self.bias))


def _rms_forward(form: str):
    def forward(self, hidden_states: Tensor) -> Tensor:
        w, x = self.weight, hidden_states
        if x.dtype != w.dtype:
            if not (x.is_floating_point() and w.dtype.itemsize > x.dtype.itemsize):
                raise NotImplementedError(
                    f"{type(self).__name__}: input dtype {x.dtype} with a narrower weight ({w.dtype}) is not "
                    "supported by the twin; cast the module to the input dtype, or twobp.revert(model)")
            x = x.to(w.dtype)  # a half input with wider weights (autocast): normalised in the weight's dtype
        op = RMSNormOp(eps=float(self.variance_epsilon), normalized_size=w.shape[0])
        y = self._split(op, (x,), (w,))
        if form == "llama":
            want = torch.promote_types(w.dtype, hidden_states.dtype)
        else:  # T5: half weights give half, others fp32 or wider
            want = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else \
                torch.promote_types(w.dtype, torch.promote_types(hidden_states.dtype, torch.float32))
        return y if y.dtype == want else y.to(want)

    forward.__name__ = "forward"
    return forward


@functools.lru_cache(maxsize=None)
def conv1d_twin() -> type:
    """``TwoBPConv1D``: transformers' Conv1D whose backward splits (built on first use)."""
    from transformers.pytorch_utils import Conv1D

    return type("TwoBPConv1D", (TwoBPModule, Conv1D), {
        "__doc__": "Drop-in for transformers' Conv1D (y = x W + b, W [nx, nf]): same parameters and "
                   "state_dict; inside twobp.split_backward its dW, db wait for twobp.backward_p2.",
        "forward": _conv1d_forward, "_twobp_reverts_to": Conv1D, "__module__": __name__})


@functools.lru_cache(maxsize=None)
def _rms_references() -> dict[str, Callable]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return {"llama": LlamaRMSNorm.forward, "t5": T5LayerNorm.forward}


@functools.lru_cache(maxsize=None)
def _rms_twin(cls: type, form: str) -> type:
    return type(f"TwoBP{cls.__name__}", (TwoBPModule, cls), {
        "__doc__": f"{cls.__name__} whose weight gradient is deferred to p2 (see twobp.nn.hf).",
        "forward": _rms_forward(form), "_twobp_reverts_to": cls, "__module__": __name__})


def hf_twin_class(m: nn.Module) -> tuple[type | None, str | None]:
    """(twin class, None) for a transformers module convert can swap by class, or (None,
    why not) for one with parameters it cannot, or (None, None) for one it does not know."""
    cls = type(m)
    if not is_hf_class(cls):
        return None, None
    if cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils":
        return conv1d_twin(), None
    forward = cls.__dict__.get("forward")
    if forward is None:
        return None, None
    for form, ref in _rms_references().items():
        if _same_code(forward, ref):
            w = getattr(m, "weight", None)
            if not isinstance(w, nn.Parameter) or w.dim() != 1 or not hasattr(m, "variance_epsilon"):
                return None, f"{form}-style RMSNorm without a 1-D weight and variance_epsilon"
            return _rms_twin(cls, form), None
    return None, None
