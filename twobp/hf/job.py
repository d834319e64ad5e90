"""A Hugging Face model from a config as a twobp training job's model (``twobp train --hf-config``).

:class:`HFJobModel` has what a job asks of a model: ``blocks()``, ``loss_fn``,
``config.seq_len`` and ``batch_source()``. The model is built from the config with random
weights from the job's seed (every rank builds the same), converted by
:func:`twobp.convert`, and cut by :func:`twobp.hf.pipeline_blocks`.

Data: decoders with a vocabulary of at least 256 train on the bytes of Python's standard
library (:class:`twobp.data.ByteCorpus`, next-byte targets), smaller vocabularies on
synthetic tokens; encoders on synthetic masked tokens (15% masked with id V-1). The
targets come shifted, so the loss is the plain per-position cross-entropy.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

from .config import build_model, load_config
from .decoder import DECODER_TYPES
from .losses import masked_lm_loss

__all__ = ["HFJobModel"]

_MAX_SEQ = 128  # sequence length of the job: the model's positions, at most this


def _max_positions(cfg) -> int | None:
    return next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                 if isinstance(getattr(cfg, k, None), int)), None)


class HFJobModel:
    """A transformers model of ``spec`` (see :func:`twobp.hf.load_config`), converted, as a job's model."""

    def __init__(self, spec: str, *, seed: int = 0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.spec = spec
        self.hf_config = load_config(spec)
        self.decoder = self.hf_config.model_type in DECODER_TYPES
        import twobp

        self.model = twobp.convert(build_model(self.hf_config, seed=seed, device=device, dtype=dtype))
        from . import pipeline_blocks

        self._blocks = pipeline_blocks(self.model)
        positions = _max_positions(self.hf_config) or _MAX_SEQ
        offset = 2 if self.hf_config.model_type == "roberta" else 0  # RoBERTa's positions start after padding_idx
        self.config = SimpleNamespace(seq_len=min(_MAX_SEQ, positions - offset),
                                      vocab_size=self.hf_config.vocab_size, spec=spec)

    def blocks(self) -> list[nn.Module]:
        return self._blocks

    @staticmethod
    def loss_fn(output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy at every position whose target is not -100 (targets come shifted)."""
        return masked_lm_loss(output, target)

    def batch_source(self):
        from ..data import ByteCorpus, SyntheticBatches, mask_tokens, synthetic_tokens

        s, v = self.config.seq_len, self.config.vocab_size
        if self.decoder and v >= ByteCorpus.vocab_size:
            return ByteCorpus(seq_len=s)
        if self.decoder:
            def make(batch_size, generator=None):
                t = synthetic_tokens(batch_size, s + 1, v, generator=generator)
                return t[:, :-1], t[:, 1:]
        else:
            def make(batch_size, generator=None):
                return mask_tokens(synthetic_tokens(batch_size, s, v, generator=generator), mask_token_id=v - 1,
                                   generator=generator)
        return SyntheticBatches(make, name=f"synthetic {self.hf_config.model_type}")

    def __repr__(self) -> str:
        return f"HFJobModel({self.spec!r}: {type(self.model).__name__}, {len(self._blocks)} blocks)"
