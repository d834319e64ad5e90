"""Hugging Face models in twobp's pipeline, in a few lines (transformers is optional).

    model = twobp.convert(transformers.LlamaForCausalLM(config))   # twins: ~100% of dW deferred
    blocks = twobp.hf.pipeline_blocks(model)                          # embedding, layers, head
    ex = PipelineExecutor(blocks, twobp.hf.causal_lm_loss, schedule=make_schedule("1f1b", stages=2,
                          microbatches=4, twobp=True))
    ex.step(ids, ids, optimizer=opt)                                  # labels = ids, shifted inside

* :func:`pipeline_blocks`: a model as blocks that each map one tensor to one tensor;
  :func:`decoder_blocks` (Llama, Mistral, Qwen2/3, Gemma, GPT-2, GPT-NeoX, Phi: embedding,
  decoder layers with positions, rotary embeddings and the causal mask built per block,
  final norm + head) and :func:`encoder_blocks` (BERT, RoBERTa).
* :func:`causal_lm_loss`, :func:`masked_lm_loss`, :func:`classification_loss`: the models'
  own ``labels=`` losses, for the executor; :func:`loss_for` picks one.
* :func:`load_config`, :func:`build_model`: a config from a local file or a model type name
  (never the network), and its model with random weights (``twobp train --hf-config``).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .config import build_model, load_config
from .decoder import DECODER_TYPES, decoder_blocks
from .encoder import ENCODER_TYPES, encoder_blocks
from .losses import IGNORE_INDEX, causal_lm_loss, classification_loss, masked_lm_loss

__all__ = ["DECODER_TYPES", "ENCODER_TYPES", "IGNORE_INDEX", "build_model", "causal_lm_loss", "classification_loss",
           "decoder_blocks", "encoder_blocks", "load_config", "loss_for", "masked_lm_loss", "pipeline_blocks"]


def pipeline_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a transformers model for :class:`twobp.pipeline.PipelineExecutor`:
    :func:`decoder_blocks` or :func:`encoder_blocks` by ``config.model_type``."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in DECODER_TYPES:
        return decoder_blocks(model)
    if kind in ENCODER_TYPES:
        return encoder_blocks(model)
    raise NotImplementedError(
        f"twobp.hf.pipeline_blocks: no ready splitter for model_type={kind!r} (known: "
        f"{', '.join(DECODER_TYPES + ENCODER_TYPES)}); write its blocks as modules taking and returning one "
        "tensor (or a tuple) and pass them to twobp.pipeline.pipeline_blocks")


def loss_for(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss matching the model's head: next-token for causal LMs, masked-token for masked
    LMs, cross-entropy for sequence classification."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in DECODER_TYPES:
        return causal_lm_loss
    if hasattr(model, "classifier"):
        return classification_loss
    return masked_lm_loss
