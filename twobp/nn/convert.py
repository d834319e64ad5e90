"""convert(model): swap torch layers for their twobp twins, in place, keeping the weights.

What is swapped, and how:

* ``nn.Linear``, ``nn.Embedding`` (dense gradients), ``nn.LayerNorm`` / ``nn.RMSNorm``
  (1-D normalized_shape), ``nn.Conv2d`` (groups=1, zero padding) and
  ``nn.MultiheadAttention`` (no add_bias_kv / add_zero_attn; self- or cross-attention,
  either layout, packed or separate q/k/v weights, any mask, dropout) change class in
  place (``module.__class__``). Their twins hold no extra state, so the module keeps its
  Parameter objects, buffers, hooks and ``requires_grad``: tied weights stay tied,
  optimizers keep working.
* A subclass of one of those whose own forward calls ``super().forward`` (or that has no
  forward of its own), such as Hugging Face's scaled embeddings, becomes a subclass of
  both, so its ``super().forward`` is the twin's.
* Hugging Face layers, when the model comes from transformers (which twobp never
  imports itself): ``Conv1D`` (GPT-2) and the RMSNorm classes written as Llama's or T5's
  (see :mod:`twobp.nn.hf`).

Anything else is left as it is and listed with the reason; its parameter gradients are
then computed by autograd during p1 (still correct, just not deferred). Classes we do not
know (a model's own RMSNorm, say) can be converted by passing ``extra={Cls: factory}``.

The report also names every tied parameter once (all its names) with where its gradient
runs, and the share of parameter elements whose gradient is deferred to p2.
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
    """What :func:`convert` did (or would do, with ``dry_run=True``).

    ``swapped``: (name, from class, to class). ``left``: (name, class, why) for modules
    with parameters of their own that keep computing their gradients in p1. ``tied``:
    (every name of one parameter, where its gradient runs). ``deferred_elements`` /
    ``total_elements``: parameter elements whose gradient p2 computes (every use of the
    parameter is in a twobp module) / all of them, each parameter counted once.
    """

    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    tied: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    deferred_elements: int = 0
    total_elements: int = 0

    @property
    def deferred_share(self) -> float:
        """Share of parameter elements whose gradient is deferred to p2 (0 with no parameters)."""
        return self.deferred_elements / self.total_elements if self.total_elements else 0.0

    def __str__(self) -> str:
        lines = [f"twobp.convert: swapped {len(self.swapped)} modules, left {len(self.left)} with parameters; "
                 f"{self.deferred_share:.1%} of {self.total_elements:,} parameter elements deferred to p2"]
        lines += [f"  swapped {n or '<root>'}: {a} -> {b}" for n, a, b in self.swapped]
        lines += [f"  left    {n or '<root>'}: {t} ({why})" for n, t, why in self.left]
        lines += [f"  tied    {' = '.join(names)}: {where}" for names, where in self.tied]
        return "\n".join(lines)


def _twin_classes() -> dict[type, type]:
    from .attention import TwoBPAttention
    from .conv import TwoBPConv2d
    from .embedding import TwoBPEmbedding
    from .norm import TwoBPLayerNorm, TwoBPRMSNorm
    from .torch_attention import TorchAttention

    twins: dict[type, type] = {nn.Linear: TwoBPLinear, nn.LayerNorm: TwoBPLayerNorm, nn.Conv2d: TwoBPConv2d,
                               nn.Embedding: TwoBPEmbedding, nn.MultiheadAttention: TwoBPAttention,
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
    if isinstance(m, nn.Embedding) and m.sparse:
        return "sparse=True (sparse gradients); 2BP defers dense gradients only"
    if isinstance(m, nn.MultiheadAttention):
        if m.bias_k is not None or m.add_zero_attn:
            return "add_bias_kv/add_zero_attn are not supported"
    return None


def _calls_super_forward(cls: type) -> bool:
    """Whether ``cls`` has no forward of its own, or one that calls ``super().forward``."""
    forward = cls.__dict__.get("forward")
    if forward is None:
        return True
    code = getattr(forward, "__code__", None)
    return code is not None and "super" in code.co_names and "forward" in code.co_names


_subclass_twins: dict[tuple[type, type], type] = {}


def _subclass_twin(cls: type, twin: type) -> type:
    """``cls`` with ``twin`` under it: [cls, twin, ..., torch base]; cached per pair."""
    key = (cls, twin)
    if key not in _subclass_twins:
        _subclass_twins[key] = type(f"TwoBP{cls.__name__}", (cls, twin), {
            "__module__": __name__, "_twobp_reverts_to": cls,
            "__doc__": f"{cls.__name__} on top of {twin.__name__}: its super().forward is the twin's."})
    return _subclass_twins[key]


def _hf_twin(m: nn.Module) -> tuple[type | None, str | None]:
    from .hf import hf_twin_class, is_hf_class

    if not is_hf_class(type(m)):
        return None, None
    return hf_twin_class(m)


def convert(model: nn.Module, *, extra: Mapping[type, Callable[[nn.Module], nn.Module]] | None = None,
            return_report: bool = False, verbose: bool = False, dry_run: bool = False):
    """Swap the layers of ``model`` for their twobp twins, in place and recursively.

    Returns the model (a new object only when the root itself had to be replaced), or
    ``(model, ConversionReport)`` with ``return_report=True``. ``extra`` maps further
    classes to a factory building their twin (it must reuse the Parameter objects).
    ``dry_run=True`` changes nothing and reports what a conversion would do.
    Logs the report at INFO (printed with ``verbose=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    twins = _twin_classes()
    extra = dict(extra or {})
    report = ConversionReport()
    twin_ids: set[int] = set()  # modules that are (or, dry, would be) twobp modules
    left: list[tuple[str, nn.Module, str]] = []

    def swap(name: str, m: nn.Module, to: type) -> None:
        report.swapped.append((name, type(m).__name__, to.__name__))
        twin_ids.add(id(m))
        if not dry_run:
            m.__class__ = to

    def visit_children(name: str, m: nn.Module) -> None:
        for child_name, child in list(m.named_children()):
            new = visit(f"{name}.{child_name}" if name else child_name, child)
            if new is not child:
                setattr(m, child_name, new)

    def visit(name: str, m: nn.Module) -> nn.Module:
        kind = type(m)
        if isinstance(m, TwoBPModule):
            twin_ids.add(id(m))
            return m
        if kind in extra:
            twin_ids.add(id(m))
            if dry_run:
                report.swapped.append((name, kind.__name__, "(extra factory)"))
                return m
            new = extra[kind](m)
            report.swapped.append((name, kind.__name__, type(new).__name__))
            twin_ids.add(id(new))
            return new
        twin, why = (twins.get(kind), None) if kind in twins else _hf_twin(m)
        if twin is None and why is None:
            base = next((b for b in twins if isinstance(m, b) and b is not nn.MultiheadAttention), None)
            if base is not None and _calls_super_forward(kind):
                twin = _subclass_twin(kind, twins[base])
            elif base is not None:
                why = f"subclass of {base.__name__} with its own forward (not calling super().forward)"
        if twin is not None:
            why = _why_not_swappable(m)
            if why is None:
                swap(name, m, twin)
            else:
                left.append((name, m, why))
            visit_children(name, m)  # e.g. an attention's out_proj
            return m
        visit_children(name, m)
        if next(m.parameters(recurse=False), None) is not None:
            left.append((name, m, why or "no twobp twin for this class; pass extra={cls: factory} to convert it"))
        return m

    model = visit("", model)
    _account(model, report, twin_ids, left)
    if not dry_run:
        label_modules(model)
    log.info("%s", report)
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _account(model: nn.Module, report: ConversionReport, twin_ids: set[int],
             left: list[tuple[str, nn.Module, str]]) -> None:
    """Fill ``left`` (with what runs in p1), ``tied`` and the deferred share of ``report``."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    params: dict[int, nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append((f"{mod_name}.{pname}" if mod_name else pname, mod))
            params[id(p)] = p

    def in_twin(mod: nn.Module) -> bool:
        return id(mod) in twin_ids

    for pid, hs in holders.items():
        n = params[pid].numel()
        report.total_elements += n
        twin_names = [name for name, mod in hs if in_twin(mod)]
        other = [name for name, mod in hs if not in_twin(mod)]
        if twin_names and not other:
            report.deferred_elements += n
        if len({id(mod) for _, mod in hs}) > 1 or len(hs) > 1:
            names = tuple(name for name, _ in hs)
            if twin_names and other:
                where = (f"p2 (its uses in twobp modules: {', '.join(_owner(x) for x in twin_names)}); any use by "
                         f"{', '.join(_owner(x) for x in other)} (not converted) runs in p1")
            elif twin_names:
                where = "p2 (every holder is a twobp module: the whole gradient is deferred)"
            else:
                where = "p1 (no holder is a twobp module)"
            report.tied.append((names, where))
    for name, mod, why in left:
        own = [(pname, p) for pname, p in mod.named_parameters(recurse=False)]
        mine = [pname for pname, p in own if not any(in_twin(h) for _, h in holders[id(p)])]
        if not mine:
            continue  # every parameter it holds is a twobp module's too: listed under tied
        shared = [pname for pname, _ in own if pname not in mine]
        tail = f"; {shared} tied to twobp modules (see tied)" if shared else ""
        report.left.append((name, type(mod).__name__, f"{why}; grads of {mine} run in p1{tail}"))


def _owner(qualified: str) -> str:
    return qualified.rpartition(".")[0] or "<root>"


def _torch_classes() -> dict[type, type]:
    from .attention import TwoBPAttention
    from .conv import TwoBPConv2d
    from .embedding import TwoBPEmbedding
    from .norm import TwoBPLayerNorm, TwoBPRMSNorm
    from .torch_attention import TorchAttention

    back: dict[type, type] = {TwoBPLinear: nn.Linear, TwoBPLayerNorm: nn.LayerNorm, TwoBPConv2d: nn.Conv2d,
                              TwoBPEmbedding: nn.Embedding, TwoBPAttention: TorchAttention}
    if hasattr(nn, "RMSNorm"):
        back[TwoBPRMSNorm] = nn.RMSNorm
    return back


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`, in place: every twobp module becomes its torch twin
    by a class swap (same Parameter objects, buffers and hooks), so the model runs on
    torch's own modules and autograd alone. :class:`TwoBPAttention` becomes
    :class:`~twobp.nn.torch_attention.TorchAttention` (torch's nn.MultiheadAttention for
    anything but its own extensions, which run through ``F.scaled_dot_product_attention``:
    nn.MultiheadAttention has no GQA or rotary); twins of Hugging Face layers and of
    torch subclasses go back to their own class.

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
        elif "_twobp_reverts_to" in cls.__dict__:
            m.__class__ = cls.__dict__["_twobp_reverts_to"]
        elif isinstance(m, TwoBPModule):
            raise TypeError(f"revert: no torch twin known for {cls.__name__} (a subclass of a twobp module); "
                            "swap it back by hand")
    return model
