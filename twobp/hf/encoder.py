"""A Hugging Face BERT-like encoder as pipeline blocks: embeddings, one block per layer, head.

    ids [B, S] --Embeddings--> h [B, S, D] --Layer 0--> ... --Layer L-1--> h --Head--> scores

* **Embeddings**: the model's own embeddings module (word + position + token type (zeros),
  LayerNorm, dropout; RoBERTa's padding-aware positions included).
* **Layer i**: the encoder layer, with no attention mask (bidirectional, unpadded batches).
* **Head**: the masked-LM head (``cls`` of BERT, ``lm_head`` of RoBERTa) -> [B, S, V]; for
  ``BertForSequenceClassification`` the pooler, dropout and classifier -> [B, labels]; for a
  bare encoder model (``BertModel``) the last hidden state itself.

The composition of the blocks equals the model's forward on unpadded ids.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ENCODER_TYPES", "EncoderEmbedding", "EncoderHead", "EncoderLayer", "encoder_blocks"]

ENCODER_TYPES = ("bert", "roberta")
"""``config.model_type`` values :func:`encoder_blocks` knows (each tested for equality)."""


class EncoderEmbedding(nn.Module):
    """ids [B, S] -> hidden [B, S, D] through the model's embeddings module."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, ids: Tensor) -> Tensor:
        return self.embeddings(input_ids=ids)


class EncoderLayer(nn.Module):
    """hidden [B, S, D] -> hidden through one encoder layer, no mask."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, h: Tensor) -> Tensor:
        out = self.layer(h, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out


class EncoderHead(nn.Module):
    """hidden [B, S, D] -> the head's output (module docstring); ``head=None``: identity."""

    def __init__(self, head: nn.Module | None, pooler: nn.Module | None = None,
                 dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head
        self.pooler = pooler
        self.dropout = dropout

    def forward(self, h: Tensor) -> Tensor:
        if self.pooler is not None:
            h = self.pooler(h)                      # (B, D): the first token, dense + tanh
            if self.dropout is not None:
                h = self.dropout(h)
        return self.head(h) if self.head is not None else h


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """``[EncoderEmbedding, EncoderLayer x L, EncoderHead]`` of a BERT-like transformers model
    (``config.model_type`` in :data:`ENCODER_TYPES`): masked LM, BERT sequence classification,
    or the bare encoder."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ENCODER_TYPES:
        raise NotImplementedError(
            f"encoder_blocks: no ready splitter for model_type={kind!r} (known: {', '.join(ENCODER_TYPES)}); "
            "write its blocks as modules taking and returning one tensor (or a tuple) and pass them to "
            "twobp.pipeline.pipeline_blocks")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise NotImplementedError("encoder_blocks: a BERT-like model used as a decoder (is_decoder / "
                                  "add_cross_attention) is not supported; use it as an encoder")
    base = model.base_model
    layers = base.encoder.layer
    if base is model:
        head = EncoderHead(None)
    elif hasattr(model, "cls") or hasattr(model, "lm_head"):
        head = EncoderHead(getattr(model, "cls", None) or model.lm_head)
    elif hasattr(model, "classifier") and getattr(base, "pooler", None) is not None and kind == "bert":
        head = EncoderHead(model.classifier, base.pooler, getattr(model, "dropout", None))
    else:
        raise NotImplementedError(f"encoder_blocks: the head of {type(model).__name__} is not known; supported: "
                                  "masked LM, BertForSequenceClassification, the bare encoder")
    return [EncoderEmbedding(base.embeddings), *(EncoderLayer(layer) for layer in layers), head]
