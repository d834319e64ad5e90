"""Losses for pipelined Hugging Face models, equal to the models' own ``labels=`` losses.

Each returns the mean over the micro-batch's counted tokens, as the executor expects.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..data import IGNORE_INDEX, averages_over, count_targets

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "masked_lm_loss", "classification_loss"]


@averages_over(lambda labels: count_targets(labels[:, 1:]))
def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: logits [B, S, V] at position t predict labels[:, t + 1]
    (the shift inside, as ``model(ids, labels=ids).loss``); mean over labels != -100."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"causal_lm_loss: logits {tuple(logits.shape)} need labels of shape "
                         f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


@averages_over(count_targets)
def masked_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy at every position whose label is not -100: logits [B, S, V], labels [B, S]."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"masked_lm_loss: logits {tuple(logits.shape)} need labels of shape "
                         f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits [B, C] against class ids [B]."""
    return F.cross_entropy(logits.float(), labels)
