"""A Hugging Face decoder-only language model as pipeline blocks: embedding, one block per
decoder layer, final norm + head; each block maps one tensor to one tensor.

    ids [B, S] --Embedding--> h [B, S, D] --Layer 0--> ... --Layer L-1--> h --Head--> logits [B, S, V]

What the model's own forward does between those, each block redoes from the hidden state:

* **Embedding**: the token embedding (Gemma's scaled one included), GPT-2's learned position
  table (positions 0..S-1) and the embedding dropout (GPT-2, Phi, GPT-NeoX).
* **Layer i**: position ids 0..S-1, the rotary embedding (cos, sin) from the model's own
  rotary module (Llama, Mistral, Qwen2, Gemma, Phi, GPT-NeoX), and the causal mask (or
  the sliding-window one for sliding layers) from transformers' own mask functions; then
  the layer itself, with no cache.
* **Head**: the final norm and the LM head.

No padding mask travels between blocks: batches are unpadded (or pad with tokens the loss
ignores). The blocks hold the model's own modules, so weights, ties (embedding = head) and
``twobp.convert`` twins are the model's; the composition of the blocks equals
``model(ids).logits``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._masks import decoder_mask, positions

__all__ = ["DECODER_TYPES", "DecoderEmbedding", "DecoderHead", "DecoderLayer", "decoder_blocks"]

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "phi")
"""``config.model_type`` values :func:`decoder_blocks` knows (each tested for equality)."""


class DecoderEmbedding(nn.Module):
    """ids [B, S] -> hidden [B, S, D]: token embedding (+ learned positions) (+ dropout)."""

    def __init__(self, embed: nn.Module, positions_table: nn.Module | None = None,
                 dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.embed = embed
        self.positions_table = positions_table
        self.dropout = dropout

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)                                        # (B, S, D)
        if self.positions_table is not None:
            h = h + self.positions_table(positions(h)).to(h.device)  # (1, S, D) broadcast
        return self.dropout(h) if self.dropout is not None else h


class DecoderLayer(nn.Module):
    """hidden [B, S, D] -> hidden: decoder layer ``index`` with its positions, rotary
    embedding and mask built here (module docstring). ``rotary`` is the model's rotary
    module (no parameters; shared by every layer block)."""

    def __init__(self, layer: nn.Module, index: int, config, rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.config = config
        self.rotary = rotary

    def forward(self, h: Tensor) -> Tensor:
        pos = positions(h)
        kw = {"attention_mask": decoder_mask(self.config, self.index, h, pos), "position_ids": pos,
              "use_cache": False}
        if self.rotary is not None:
            kw["position_embeddings"] = self.rotary(h, position_ids=pos)  # (cos, sin)
        out = self.layer(h, **kw)
        return out[0] if isinstance(out, tuple) else out

    def extra_repr(self) -> str:
        return f"index={self.index}"


class DecoderHead(nn.Module):
    """hidden [B, S, D] -> logits [B, S, V]: final norm, then the LM head."""

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))


def _first(obj, *names):
    for n in names:
        m = getattr(obj, n, None)
        if m is not None:
            return m
    return None


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """``[DecoderEmbedding, DecoderLayer x L, DecoderHead]`` of a transformers causal LM
    (``*ForCausalLM`` / ``GPT2LMHeadModel`` of a family in :data:`DECODER_TYPES`)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in DECODER_TYPES:
        raise NotImplementedError(
            f"decoder_blocks: no ready splitter for model_type={kind!r} (known: {', '.join(DECODER_TYPES)}); "
            "write its blocks as modules taking and returning one tensor (or a tuple) and pass them to "
            "twobp.pipeline.pipeline_blocks")
    if getattr(config, "final_logit_softcapping", None):
        raise NotImplementedError("decoder_blocks: final_logit_softcapping is not applied by the head block; "
                                  "set it to None or write the head block yourself")
    base = model.base_model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is model or head is None:
        raise ValueError(f"decoder_blocks needs a causal LM with its head (a *ForCausalLM or GPT2LMHeadModel), got "
                         f"{type(model).__name__}")
    layers = _first(base, "layers", "h")
    norm = _first(base, "norm", "final_layernorm", "final_layer_norm", "ln_f")
    if layers is None or norm is None:
        raise ValueError(f"decoder_blocks: {type(base).__name__} has no layers/h list or final norm where expected")
    embed = DecoderEmbedding(base.get_input_embeddings(), getattr(base, "wpe", None),
                             _first(base, "drop", "embed_dropout", "emb_dropout"))
    rotary = getattr(base, "rotary_emb", None)
    n = config.num_hidden_layers
    return [embed, *(DecoderLayer(layers[i], i, config, rotary) for i in range(n)), DecoderHead(norm, head)]
