"""Models built from twobp modules, by name and preset: ``build("llama", "tiny")``.

============  =====================================  ==================================
name          presets (smallest first)               data
============  =====================================  ==================================
``llama``     tiny, small, 1b, 7b                    bytes (:class:`twobp.data.ByteCorpus`)
``bert``      tiny, small, base, large               masked bytes or synthetic tokens
``resnet``    tiny, small, 50, 101, 152              synthetic images
============  =====================================  ==================================

Every model is a chain of blocks (:class:`~twobp.models.base.TwoBPModel`) that a pipeline
can cut between any two, with ``loss_fn``, ``num_parameters``, ``flops_per_sample`` and
``example_batch``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .base import TwoBPModel

__all__ = ["TwoBPModel", "build", "config", "model_names", "presets"]


def _families() -> dict[str, tuple[type, type, dict[str, dict]]]:
    # imported on demand, so importing twobp.models stays cheap
    from . import bert, llama, resnet

    return {
        "llama": (llama.LlamaConfig, llama.Llama, llama.PRESETS),
        "bert": (bert.BertConfig, bert.Bert, bert.PRESETS),
        "resnet": (resnet.ResNetConfig, resnet.ResNet, resnet.PRESETS),
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
          dtype: torch.dtype | None = None, **overrides: Any) -> TwoBPModel:
    """Build model ``name`` at ``preset``, e.g. ``build("llama", "7b", device="meta")``.

    ``overrides`` replace config fields (``build("llama", "tiny", n_layers=8)``). On
    ``device="meta"`` nothing is allocated, which is how to count a large model's
    parameters.
    """
    _, model_cls, _ = _family(name)
    return model_cls(config(name, preset, **overrides), device=device, dtype=dtype)
