"""Models built from twobp modules, by name and preset: ``build("llama", "tiny")``.

============  =====================================  ==================================
name          presets (smallest first)               data
============  =====================================  ==================================
``llama``     tiny, small, 1b, 7b                    bytes (:class:`twobp.data.ByteCorpus`)
``bert``      tiny, small, base, large               masked bytes or synthetic tokens
``resnet``    tiny, small, 50, 101, 152              synthetic images
``mamba``     tiny, small, 130m, 370m, 790m, 1.4b    bytes (:class:`twobp.data.ByteCorpus`)
============  =====================================  ==================================

Every model is a chain of blocks (:class:`~twobp.models.base.TwoBPModel`) that a pipeline
can cut between any two, with ``loss_fn``, ``num_parameters``, ``flops_per_sample`` and
``example_batch``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

from .base import TwoBPModel

__all__ = ["TwoBPModel", "build", "build_blocks", "config", "model_names", "presets"]


def _families() -> dict[str, tuple[type, type, dict[str, dict]]]:
    # imported on demand, so importing twobp.models stays cheap
    from . import bert, llama, mamba, resnet

    return {
        "llama": (llama.LlamaConfig, llama.Llama, llama.PRESETS),
        "bert": (bert.BertConfig, bert.Bert, bert.PRESETS),
        "resnet": (resnet.ResNetConfig, resnet.ResNet, resnet.PRESETS),
        "mamba": (mamba.MambaConfig, mamba.Mamba, mamba.PRESETS),
    }


def model_names() -> list[str]:
    """The model families ``build`` knows."""
    return list(_families())


def _family(name: str) -> tuple[type, type, dict[str, dict]]:
    families = _families()
    if name not in families:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(families)}")
    return families[name]


def presets(name: str) -> list[str]:
    """The presets of model ``name``, smallest first."""
    return list(_family(name)[2])


def config(name: str, preset: str = "tiny", **overrides: Any):
    """The config of ``name``'s ``preset`` with ``overrides`` applied (checked by the config)."""
    cfg_cls, _, table = _family(name)
    if preset not in table:
        raise ValueError(f"unknown preset {preset!r} for {name}; known: {', '.join(table)}")
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{cfg_cls.__name__} has no field(s) {unknown}; fields: {', '.join(sorted(fields))}")
    return cfg_cls(**{**table[preset], **overrides})


def build(name: str, preset: str = "tiny", *, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None, seed: int | None = None, **overrides: Any) -> TwoBPModel:
    """Build model ``name`` at ``preset``, e.g. ``build("llama", "7b", device="meta")``.

    ``overrides`` replace config fields (``build("llama", "tiny", n_layers=8)``). On
    ``device="meta"`` nothing is allocated, which is how to count a large model's
    parameters. ``seed``: initialise every parameter from ``(seed, its name)`` (see
    :meth:`TwoBPModel.init_weights`) rather than from the global RNG, so that
    :func:`build_blocks` with the same seed gives the very same values.
    """
    _, model_cls, _ = _family(name)
    model = model_cls(config(name, preset, **overrides), device=device, dtype=dtype)
    if seed is not None:
        model.init_weights(seed)
    return model


@torch.no_grad()
def build_blocks(name: str, preset: str = "tiny", *, blocks: Iterable[int], seed: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **overrides: Any) -> TwoBPModel:
    """The model with only ``blocks`` (indices into ``model.blocks()``) allocated on
    ``device``; every other block stays on the meta device and costs nothing. Their
    values equal ``build(name, preset, seed=seed)``'s, parameter for parameter.

    What a pipeline rank builds: its own stages. A parameter shared with a block left on
    the meta device (a tied embedding and head) is materialised once and shared by both,
    so a pipeline still sees the tie.
    """
    from torch import nn

    _, model_cls, _ = _family(name)
    device = torch.device(device) if device is not None else torch.get_default_device()
    model = model_cls(config(name, preset, **overrides), device="meta", dtype=dtype)
    slots = model.parameter_slots()  # names and ties, read before anything is replaced
    chain = model.blocks()
    wanted = sorted(set(blocks))
    if any(not 0 <= i < len(chain) for i in wanted):
        raise ValueError(f"build_blocks: {name}/{preset} has blocks 0..{len(chain) - 1}, got {wanted}")
    real: dict[int, nn.Parameter] = {}
    for i in wanted:
        for mod in chain[i].modules():
            for pname, p in mod._parameters.items():
                if p is not None and id(p) not in real:
                    real[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            for bname, b in list(mod._buffers.items()):
                if b is not None and b.is_meta:
                    mod._buffers[bname] = torch.zeros_like(b, device=device)
            if isinstance(mod, nn.modules.batchnorm._NormBase):
                mod.reset_running_stats()
    for mod in model.modules():  # every holder of a materialised parameter gets the real one
        for pname, p in list(mod._parameters.items()):
            if p is not None and id(p) in real:
                mod._parameters[pname] = real[id(p)]
    model._init_each(seed, [(n, m, a, real[id(p)]) for n, m, a, p in slots if id(p) in real])
    return model
