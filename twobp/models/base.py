"""What every twobp model shares: a chain of blocks, one loss, sizes, FLOPs, example inputs.

A pipeline cuts a model between blocks, so each model is written as a chain:
``model(x) == blocks[-1](... blocks[1](blocks[0](x)))``, where every block maps one tensor to
one tensor. The embedding is the first block and the head (final norm + projection) the
last. Every parameter of the model lives in exactly one block, except a tied
embedding/head weight, which the first and the last block share (:attr:`TwoBPModel.tied`,
:meth:`TwoBPModel.shared_parameters`): a pipeline that puts those blocks on different
ranks has to reject the model or all-reduce that gradient.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data import IGNORE_INDEX, averages_over, count_targets

__all__ = ["IGNORE_INDEX", "TwoBPModel", "check_positive", "matmul_parameters", "transformer_flops_per_sample"]

def check_positive(config: Any, *fields: str) -> None:
    """Raise ValueError naming the first of ``fields`` of ``config`` that is not a positive int."""
    for f in fields:
        v = getattr(config, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(config).__name__}.{f} must be a positive int, got {v!r}")


class TwoBPModel(nn.Module, abc.ABC):
    """A model that is a chain of blocks (see the module docstring).

    Subclasses set ``name``, keep their config in ``self.config`` and implement
    :meth:`blocks`, :meth:`flops_per_sample` and :meth:`example_batch`.
    """

    name: ClassVar[str] = "model"
    config: Any

    @abc.abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The blocks in order; their composition is :meth:`forward`."""

    @abc.abstractmethod
    def flops_per_sample(self) -> int:
        """Training FLOPs (forward + backward) for one sample, e.g. one sequence."""

    @abc.abstractmethod
    def example_batch(self, batch_size: int, *, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """A synthetic ``(inputs, targets)`` batch of the model's input shape (random data)."""

    # ---- initialisation ---------------------------------------------------------------
    def init_parameter(self, name: str, module: nn.Module, attr: str, p: Tensor) -> None:
        """Give parameter ``p`` (``module.<attr>``, qualified ``name``) its initial values in
        place, drawing from torch's default generator: the model's init rule."""
        raise NotImplementedError(f"{type(self).__name__} has no per-parameter init rule")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter by the model's rule, from the global RNG."""
        self._init_each(None, self.parameter_slots())

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from its own seed, ``(seed, its qualified name)``,
        drawn on the CPU and copied to the parameter's device: its values then depend on
        nothing else, so a model built block by block on many ranks
        (:func:`twobp.models.build_blocks`) equals the model built whole. Meta parameters
        are skipped."""
        self._init_each(seed, self.parameter_slots())

    def parameter_slots(self) -> list[tuple[str, nn.Module, str, Tensor]]:
        """``(qualified name, owning module, attribute, parameter)`` of every parameter, a
        tied one once under its first name (the name its init seed derives from)."""
        modules = dict(self.named_modules())
        out = []
        for name, p in self.named_parameters():
            owner, _, attr = name.rpartition(".")
            out.append((name, modules[owner], attr, p))
        return out

    def _init_each(self, seed: int | None, slots) -> None:
        import zlib

        for name, module, attr, p in slots:
            if p.is_meta:
                continue
            if seed is None:
                self.init_parameter(name, module, attr, p)
                continue
            tmp = torch.empty(p.shape, dtype=p.dtype)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                self.init_parameter(name, module, attr, tmp)
            p.copy_(tmp)

    @property
    def tied(self) -> bool:
        """True when the first and last block share the embedding weight."""
        return bool(getattr(self.config, "tie_embeddings", False))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks():
            x = block(x)
        return x

    @staticmethod
    @averages_over(count_targets)
    def loss_fn(output: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy over every target that is not ``IGNORE_INDEX``.

        ``output`` [..., C] logits, ``target`` [...] class ids: tokens [B, S] for the
        language models, images' labels [B] for the ResNet.
        """
        if output.shape[:-1] != target.shape:
            raise ValueError(f"loss_fn: output {tuple(output.shape)} needs target of shape "
                             f"{tuple(output.shape[:-1])}, got {tuple(target.shape)}")
        return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]).float(),
                                           target.reshape(-1), ignore_index=IGNORE_INDEX)

    def num_parameters(self) -> int:
        """Number of parameters, a tied weight counted once."""
        return sum(p.numel() for p in self.parameters())

    def shared_parameters(self) -> dict[str, list[int]]:
        """Parameters held by more than one block: ``{name in the first block: [block indices]}``."""
        owners: dict[int, tuple[str, list[int]]] = {}
        for i, block in enumerate(self.blocks()):
            for name, p in block.named_parameters():
                entry = owners.setdefault(id(p), (f"{i}.{name}", []))
                if i not in entry[1]:
                    entry[1].append(i)
        return {name: idx for name, idx in owners.values() if len(idx) > 1}

    def extra_repr(self) -> str:
        return str(self.config)


def matmul_parameters(model: TwoBPModel, lookups: list[nn.Embedding]) -> int:
    """Parameters that multiply activations: all but the embedding tables used only as lookups.

    A tied table is also the head's matrix, so it stays counted: tied and untied models of
    one shape cost the same FLOPs.
    """
    head = {id(p) for p in model.blocks()[-1].parameters()}
    skip = sum(e.weight.numel() for e in lookups if id(e.weight) not in head)
    return model.num_parameters() - skip


def transformer_flops_per_sample(n_params: int, n_layers: int, seq_len: int, dim: int) -> int:
    """Training FLOPs (forward + backward) of one sequence of ``seq_len`` tokens.

    ``6 N T + 12 L T² d``: 6 FLOPs per parameter per token (2 forward, 4 backward: dX and
    dW) and, for attention's QKᵀ and AV, 12 L T d per token (Kaplan et al. 2020, "Scaling
    Laws for Neural Language Models", sec. 2.1; Chowdhery et al. 2022, PaLM, appendix B,
    which writes it 6N + 12 L H Q T per token with H Q = d). ``n_params`` counts the
    parameters in matmuls (:func:`matmul_parameters`). The attention term ignores the causal
    mask, as the PaLM convention for MFU does.
    """
    return 6 * n_params * seq_len + 12 * n_layers * seq_len * seq_len * dim
