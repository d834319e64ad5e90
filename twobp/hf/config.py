"""Hugging Face configs and models from local files or names, never from the network.

``load_config(spec)``, where ``spec`` is:

* a path to a ``config.json`` file or to a folder holding one, or
* ``NAME`` or ``NAME:key=value,key=value``: a transformers ``model_type`` (``llama``,
  ``gpt2``, ``bert``, ...) whose built-in default config (the family's reference size:
  LLaMa-7B, GPT-2 small, BERT base, ...) is changed by the given keys, e.g.
  ``llama:hidden_size=64,intermediate_size=128,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=2``.
  Values are parsed as Python literals (ints, floats, True/False/None), else kept as text.

Nothing is downloaded: the hub is switched offline for the call and only local files are
read. :func:`build_model` makes the model of a config with random weights (the task head:
causal LM for decoders, masked LM for encoders).
"""

from __future__ import annotations

import ast
import contextlib
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["build_model", "load_config"]


@contextlib.contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(spec: str):
    """The transformers config ``spec`` names (module docstring); ValueError naming the fix."""
    try:
        import transformers
    except ImportError:
        raise ImportError("Hugging Face models need transformers: pip install 'twobp[hf]' "
                          "(or pip install transformers)") from None
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--hf-config needs a path to a config.json (or its folder) or a model type name, "
                         f"got {spec!r}")
    path = Path(spec)
    with _offline():
        if path.is_dir() or path.suffix == ".json":
            file = path / "config.json" if path.is_dir() else path
            if not file.is_file():
                raise ValueError(f"--hf-config {spec}: no config.json there; give a config.json file, a folder "
                                 "holding one, or a model type name such as llama:hidden_size=64,...")
            return transformers.AutoConfig.from_pretrained(str(file), local_files_only=True)
        name, _, rest = spec.partition(":")
        overrides = {}
        for item in filter(None, (t.strip() for t in rest.split(","))):
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--hf-config {spec}: {item!r} is not key=value")
            overrides[key.strip()] = _value(val.strip())
        try:
            cfg = transformers.AutoConfig.for_model(name.strip())
        except ValueError:
            raise ValueError(f"--hf-config {spec}: {name!r} is neither a config.json path nor a transformers "
                             "model type (llama, mistral, qwen2, gemma, gpt2, gpt_neox, phi, bert, roberta, ...)") \
                from None
        for key, val in overrides.items():
            if not hasattr(cfg, key):
                raise ValueError(f"--hf-config {spec}: {type(cfg).__name__} has no field {key!r}")
            try:
                setattr(cfg, key, val)
            except Exception as e:  # noqa: BLE001 - transformers' strict configs raise their own validation types
                why = " ".join(str(e).split())[:240] or type(e).__name__
                raise ValueError(f"{type(cfg).__name__}.{key} refuses {val!r} ({why}); give it a value of the "
                                 "field's type") from None
        return cfg


def build_model(config, *, seed: int = 0, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """The task model of ``config`` with random weights drawn from ``seed`` (the same on every
    process): causal LM for decoder types, masked LM for encoder types."""
    import transformers

    from .decoder import DECODER_TYPES
    from .encoder import ENCODER_TYPES

    if config.model_type in DECODER_TYPES:
        auto = transformers.AutoModelForCausalLM
    elif config.model_type in ENCODER_TYPES:
        auto = transformers.AutoModelForMaskedLM
    else:
        raise ValueError(f"no ready splitter for model_type={config.model_type!r}; known: "
                         f"{', '.join(DECODER_TYPES + ENCODER_TYPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = auto.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.train()
