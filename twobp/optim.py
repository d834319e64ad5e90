"""Mixed precision training: bf16 / fp16 parameters, fp32 gradients, fp32 optimizer state.

:class:`MasterWeights` wraps any torch optimizer. The model keeps its parameters in bf16 (or
fp16): forward and backward run in that dtype, half the memory and bandwidth. Their
gradients accumulate in fp32 (``Tensor.grad_dtype``, torch >= 2.10; twobp's p2 writes into
fp32 ``.grad`` buffers too). The optimizer steps fp32 *master* copies of the parameters with
fp32 state and copies the result back, rounded once per step, so small updates are not
lost to bf16's 8-bit mantissa.

It is a ``torch.optim.Optimizer`` whose ``param_groups`` hold the model's own parameters, so
LR schedulers, ``torch.amp.GradScaler`` (fp16: unscale, inf check, skip) and twobp's guard
against stepping with weight gradients still pending all work on it unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["MasterWeights"]


class MasterWeights(torch.optim.Optimizer):
    """``MasterWeights(model.parameters(), torch.optim.AdamW, lr=3e-3)``: ``optimizer_cls``
    with its keyword arguments, stepping fp32 masters of low-precision parameters (fp32
    parameters are their own masters). ``params`` may be parameter groups (dicts), as for any
    torch optimizer.

    A low-precision parameter changed outside the optimizer (``model.load_state_dict`` after the
    optimizer was built, an in-place edit) is seen by its version counter at the next step, and
    its master is refreshed from it first: the step starts from the weights the model holds, as a
    plain optimizer's would."""

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], optimizer_cls: Callable[..., torch.optim.Optimizer] =
                 torch.optim.AdamW, **kwargs: Any) -> None:
        params = list(params)
        if not params:
            raise ValueError("MasterWeights got no parameters")
        super().__init__(params, dict(kwargs))
        self._masters: dict[int, nn.Parameter] = {}
        self._versions: dict[int, int] = {}  # a low-precision parameter's version when its master matched it
        for p in self._params():
            if p.dtype in (torch.float16, torch.bfloat16):
                if hasattr(p, "grad_dtype"):
                    p.grad_dtype = torch.float32
                self._masters[id(p)] = nn.Parameter(p.detach().float().clone())
                self._versions[id(p)] = p._version
            else:
                self._masters[id(p)] = p
        self.inner = optimizer_cls([{**{k: v for k, v in g.items() if k != "params"},
                                     "params": [self._masters[id(p)] for p in g["params"]]}
                                    for g in self.param_groups], **kwargs)

    def _params(self):
        return (p for g in self.param_groups for p in g["params"])

    def master(self, p: nn.Parameter) -> nn.Parameter:
        """The fp32 copy the optimizer steps for model parameter ``p``."""
        return self._masters[id(p)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in group.items() if k != "params"})  # an lr scheduler's changes
            for p in group["params"]:
                m = self._masters[id(p)]
                if m is not p:
                    if p._version != self._versions[id(p)]:  # loaded or edited since: start from it
                        m.copy_(p)
                    m.grad = None if p.grad is None else p.grad.to(torch.float32)
        self.inner.step()
        for p in self._params():
            m = self._masters[id(p)]
            if m is not p:
                if m.grad is not None:
                    p.copy_(m)
                self._versions[id(p)] = p._version
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The inner optimizer's state, the fp32 masters, and the groups' settings (an LR
        scheduler's current lr lives there)."""
        return {"inner": self.inner.state_dict(),
                "masters": [self._masters[id(p)].detach().clone() for p in self._params()],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        for group, saved in zip(self.param_groups, state.get("param_groups", ())):
            group.update(saved)
        with torch.no_grad():
            for p, saved in zip(self._params(), state["masters"]):
                self._masters[id(p)].copy_(saved)
                if self._masters[id(p)] is not p:
                    p.copy_(saved)
                    self._versions[id(p)] = p._version
