"""convert(model): swap torch layers for their twobp twins, in place, keeping the weights.

What is swapped, and how:

* ``nn.Linear``, ``nn.LayerNorm`` (1-D normalized_shape), ``nn.RMSNorm`` (1-D) and
  ``nn.Conv2d`` (groups=1, zero padding) change class in place (``module.__class__``).
  Their twins hold no extra state, so the module keeps its Parameter objects, buffers,
  hooks and ``requires_grad``: tied weights stay tied, optimizers keep working.
* ``nn.MultiheadAttention`` with ``batch_first=True``, equal q/k/v dims and no extra
  bias/zero-attention is replaced by a :class:`~twobp.nn.attention.TwoBPAttention` that
  takes over the same Parameter objects. It serves self-attention only; a cross-attention
  call raises NotImplementedError at run time.

Anything else is left as it is and listed with the reason; its parameter gradients are
then computed by autograd during p1 (still correct, just not deferred). Classes we do not
know (a model's own RMSNorm, say) can be converted by passing ``extra={Cls: factory}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from .base import TwoBPModule, label_modules
from .linear import TwoBPLinear

__all__ = ["ConversionReport", "convert", "revert"]

log = logging.getLogger("twobp")


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``swapped`` (name, from, to) and ``left`` (name, type, why)."""

    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"twobp.convert: swapped {len(self.swapped)} modules, left {len(self.left)} with parameters"]
        lines += [f"  swapped {n or '<root>'}: {a} -> {b}" for n, a, b in self.swapped]
        lines += [f"  left    {n or '<root>'}: {t} ({why})" for n, t, why in self.left]
        return "\n".join(lines)


def _twin_classes() -> dict[type, type]:
    from .conv import TwoBPConv2d
    from .norm import TwoBPLayerNorm, TwoBPRMSNorm

    from .attention import TwoBPAttention
    from .torch_attention import TorchAttention

    twins: dict[type, type] = {nn.Linear: TwoBPLinear, nn.LayerNorm: TwoBPLayerNorm, nn.Conv2d: TwoBPConv2d,
                               TorchAttention: TwoBPAttention}  # revert()'s attention swaps straight back
    if hasattr(nn, "RMSNorm"):
        twins[nn.RMSNorm] = TwoBPRMSNorm
    # MultiheadAttention's out_proj is this marker subclass of nn.Linear, with no behaviour of its own
    quant_marker = getattr(nn.modules.linear, "NonDynamicallyQuantizableLinear", None)
    if quant_marker is not None:
        twins[quant_marker] = TwoBPLinear
    return twins


def _why_not_swappable(m: nn.Module) -> str | None:
    if isinstance(m, (nn.LayerNorm,)) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
        if len(m.normalized_shape) != 1:
            return f"normalized_shape {tuple(m.normalized_shape)} spans several dims; only the last dim is supported"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"groups={m.groups}; only groups=1 is supported"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}; only 'zeros' is supported"
    return None


def _why_not_attention(m: nn.MultiheadAttention) -> str | None:
    if not m.batch_first:
        return "batch_first=False; only batch_first=True is supported"
    if not m._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (cross-attention layout)"
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv/add_zero_attn are not supported"
    if m.dropout:
        return f"attention dropout={m.dropout} is not supported"
    return None


def _attention_twin(m: nn.MultiheadAttention) -> nn.Module:
    from .attention import TwoBPAttention

    w = m.in_proj_weight
    new = TwoBPAttention(m.embed_dim, m.num_heads, bias=m.in_proj_bias is not None, batch_first=True,
                         device="meta", dtype=w.dtype)
    new.in_proj_weight = m.in_proj_weight
    new.in_proj_bias = m.in_proj_bias
    new.out_proj.weight = m.out_proj.weight
    new.out_proj.bias = m.out_proj.bias
    new.train(m.training)
    return new


def convert(model: nn.Module, *, extra: Mapping[type, Callable[[nn.Module], nn.Module]] | None = None,
            return_report: bool = False, verbose: bool = False):
    """Swap the layers of ``model`` for their twobp twins, in place and recursively.

    Returns the model (a new object only when the root itself had to be replaced), or
    ``(model, ConversionReport)`` with ``return_report=True``. ``extra`` maps further
    classes to a factory building their twin (it must reuse the Parameter objects).
    Logs the report at INFO (printed with ``verbose=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    twins = _twin_classes()
    extra = dict(extra or {})
    report = ConversionReport()

    def visit(name: str, m: nn.Module) -> nn.Module:
        kind = type(m)
        if isinstance(m, TwoBPModule):
            return m
        if kind in extra:
            new = extra[kind](m)
            report.swapped.append((name, kind.__name__, type(new).__name__))
            return new
        if kind is nn.MultiheadAttention:
            why = _why_not_attention(m)
            if why is None:
                new = _attention_twin(m)
                report.swapped.append((name, kind.__name__, type(new).__name__))
                return new
            report.left.append((name, kind.__name__, why))
            return m
        if kind in twins:
            why = _why_not_swappable(m)
            if why is None:
                m.__class__ = twins[kind]
                report.swapped.append((name, kind.__name__, twins[kind].__name__))
            else:
                report.left.append((name, kind.__name__, why))
            for child_name, child in list(m.named_children()):  # e.g. an attention's out_proj
                new = visit(f"{name}.{child_name}" if name else child_name, child)
                if new is not child:
                    setattr(m, child_name, new)
            return m
        for child_name, child in list(m.named_children()):
            new = visit(f"{name}.{child_name}" if name else child_name, child)
            if new is not child:
                setattr(m, child_name, new)
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if own:
            subclass = next((b.__name__ for b in twins if isinstance(m, b)), None)
            why = (f"subclass of {subclass} with its own forward" if subclass else
                   "no twobp twin for this class; pass extra={cls: factory} to convert it")
            report.left.append((name, kind.__name__, f"{why}; grads of {own} run in p1"))
        return m

    model = visit("", model)
    label_modules(model)
    log.info("%s", report)
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _torch_classes() -> dict[type, type]:
    from .attention import TwoBPAttention
    from .conv import TwoBPConv2d
    from .norm import TwoBPLayerNorm, TwoBPRMSNorm
    from .torch_attention import TorchAttention

    back: dict[type, type] = {TwoBPLinear: nn.Linear, TwoBPLayerNorm: nn.LayerNorm, TwoBPConv2d: nn.Conv2d,
                              TwoBPAttention: TorchAttention}
    if hasattr(nn, "RMSNorm"):
        back[TwoBPRMSNorm] = nn.RMSNorm
    return back


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`, in place: every twobp module becomes its torch twin
    by a class swap (same Parameter objects, buffers and hooks), so the model runs on
    torch's own modules and autograd alone. :class:`TwoBPAttention` becomes
    :class:`~twobp.nn.torch_attention.TorchAttention` (the same math through
    ``F.scaled_dot_product_attention``; ``nn.MultiheadAttention`` has no GQA or rotary).

    For A/B measurements against plain torch on the very same weights, and for handing a
    model to tools that expect torch's classes. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert takes an nn.Module, got {type(model).__name__}")
    back = _torch_classes()
    for m in model.modules():
        cls = type(m)
        if cls in back:
            m.__class__ = back[cls]
        elif isinstance(m, TwoBPModule):
            raise TypeError(f"revert: no torch twin known for {cls.__name__} (a subclass of a twobp module); "
                            "swap it back by hand")
    return model
