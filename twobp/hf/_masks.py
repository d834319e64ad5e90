"""The attention masks a Hugging Face decoder layer expects, built per block from the hidden state.

A pipeline block sees one tensor (the hidden state [B, S, D]); positions are 0..S-1 and
there is no padding mask, so every mask follows from the config and the shape, and each
layer's block builds its own with transformers' own mask functions (what the model's
forward would pass it: None where SDPA's is_causal suffices, a 4-D mask otherwise).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

__all__ = ["decoder_mask", "positions"]


def positions(hidden: Tensor) -> Tensor:
    """Position ids [1, S] of a hidden state [B, S, D] (no cache, no padding)."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _call(fn, config, hidden: Tensor, position_ids: Tensor):
    params = inspect.signature(fn).parameters
    kw = {"config": config, "inputs_embeds": hidden, "attention_mask": None, "position_ids": position_ids}
    for name in ("cache", "past_key_values"):  # renamed (transformers 5.x: cache); give only one, as
        if name in params:                       # newer versions warn when the deprecated alias is set too
            kw[name] = None
            break
    if "cache_position" in params:
        kw["cache_position"] = position_ids[0]
    return fn(**{k: v for k, v in kw.items() if k in params})


def decoder_mask(config, layer_index: int, hidden: Tensor, position_ids: Tensor):
    """The mask decoder layer ``layer_index`` of a model with ``config`` gets: sliding-window
    causal for the layers the config makes sliding (``layer_types``, or Mistral/Mixtral's
    ``sliding_window``), causal otherwise."""
    from transformers import masking_utils as mu

    types = getattr(config, "layer_types", None)
    if types:
        sliding = types[layer_index] == "sliding_attention"
    else:
        sliding = config.model_type in ("mistral", "mixtral") and getattr(config, "sliding_window", None) is not None
    fn = mu.create_sliding_window_causal_mask if sliding else mu.create_causal_mask
    return _call(fn, config, hidden, position_ids)
