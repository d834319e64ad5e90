"""Cut a model given as a sequence of blocks into contiguous pipeline stages.

``blocks`` is an ``nn.Sequential``, a list of modules, or a list of zero-argument
factories returning modules (then a rank builds only the blocks of its own stages).
Stage ``s`` gets blocks ``bounds[s] .. bounds[s+1]-1`` and is returned as an
``nn.Sequential`` whose children keep their global index as name, so a parameter's
qualified name (``"3.weight"``) is the same in a stage as in the whole model.

Balancing:

* by count: ``n`` blocks over ``S`` stages, the first ``n mod S`` stages get one more;
* by cost (``costs[i]`` = time of block i): the contiguous split minimising the largest
  stage sum (the linear-partition problem), solved exactly by dynamic programming in
  ``O(S n^2)``.

Parameters shared between blocks of stages on *different ranks* (a tied embedding and
output head, say) are rejected with :class:`SharedParameterError`: their gradient would
be split between two processes. Sharing within one rank (same stage, or two chunks of one
rank) is fine: autograd accumulates both uses into the one ``.grad``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from torch import nn

from .actions import place

__all__ = ["Partition", "partition_blocks", "SharedParameterError", "balance"]

BlockLike = Union[nn.Module, Callable[[], nn.Module]]


class SharedParameterError(ValueError):
    """A parameter is used by stages on two ranks."""


@dataclass(frozen=True)
class Partition:
    """Block boundaries: stage ``s`` holds blocks ``bounds[s]:bounds[s+1]``."""

    bounds: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    def blocks_of(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])


def balance(n_blocks: int, num_stages: int, costs: Sequence[float] | None = None) -> Partition:
    """Contiguous split of ``n_blocks`` into ``num_stages`` non-empty stages (module doc)."""
    if num_stages < 1 or n_blocks < num_stages:
        raise ValueError(
            f"cannot cut {n_blocks} blocks into {num_stages} stages: every stage needs at least "
            "one block; use fewer stages or chunks, or split the model into more blocks")
    if costs is None:
        q, rem = divmod(n_blocks, num_stages)
        bounds = [0]
        for s in range(num_stages):
            bounds.append(bounds[-1] + q + (1 if s < rem else 0))
        return Partition(tuple(bounds))
    costs = [float(c) for c in costs]
    if len(costs) != n_blocks or any(c < 0 for c in costs):
        raise ValueError(f"partition costs must be {n_blocks} numbers >= 0, got {costs}")

    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: smallest possible largest stage sum putting blocks 0..j-1 into k stages.
    best = [[inf] * (n_blocks + 1) for _ in range(num_stages + 1)]
    cut_at = [[0] * (n_blocks + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n_blocks + 1):
            for i in range(k - 1, j):
                val = max(best[k - 1][i], prefix[j] - prefix[i])
                if val < best[k][j] - 1e-12:  # strict: ties keep the earliest cut
                    best[k][j], cut_at[k][j] = val, i
    bounds = [n_blocks]
    for k in range(num_stages, 0, -1):
        bounds.append(cut_at[k][bounds[-1]])
    return Partition(tuple(reversed(bounds)))


def _owner_map(blocks: Sequence[BlockLike]) -> dict[int, list[tuple[int, str]]]:
    seen: dict[int, list[tuple[int, str]]] = {}
    for i, b in enumerate(blocks):
        if isinstance(b, nn.Module):
            for name, prm in b.named_parameters(remove_duplicate=False):
                seen.setdefault(id(prm), []).append((i, f"{i}.{name}"))
    return seen


@dataclass(frozen=True)
class SharedAcrossRanks:
    """A parameter used by blocks that live on more than one pipeline rank."""

    names: tuple[str, ...]
    """``"<block>.<name>"`` of every use, in block order."""
    blocks: tuple[int, ...]
    """Block indices that use it."""
    ranks: tuple[int, ...]
    """Pipeline ranks holding a copy (the schedule's layout says which rank runs a stage)."""


def shared_across_ranks(blocks: Sequence[BlockLike], part: Partition, *, ranks: int,
                        layout: str = "loop") -> list[SharedAcrossRanks]:
    """Parameters shared by blocks on different ranks, in the order of their first block
    (the same on every rank that builds the same blocks). ``layout``: how stages map to
    ranks (:data:`~.actions.LAYOUTS`)."""
    stage_of_block = {}
    for s in range(part.num_stages):
        for i in part.blocks_of(s):
            stage_of_block[i] = s
    out = []
    for uses in _owner_map(blocks).values():
        stages = sorted({stage_of_block[i] for i, _ in uses})
        rank_set = tuple(sorted({place(s, ranks, layout)[0] for s in stages}))
        if len(rank_set) > 1:
            out.append(SharedAcrossRanks(tuple(n for _, n in uses), tuple(sorted({i for i, _ in uses})), rank_set))
    return sorted(out, key=lambda x: (x.blocks, x.names))


def check_shared_parameters(blocks: Sequence[BlockLike], part: Partition, *, ranks: int,
                            layout: str = "loop") -> None:
    """Raise :class:`SharedParameterError` naming a parameter used on two ranks (for callers
    that cannot synchronise it; the executor all-reduces such tied copies instead)."""
    shared = shared_across_ranks(blocks, part, ranks=ranks, layout=layout)
    if shared:
        first = shared[0]
        raise SharedParameterError(
            f"parameter {' and '.join(first.names)} is shared by blocks {list(first.blocks)} on ranks "
            f"{list(first.ranks)}; its gradient would be split across processes. Put those blocks on one "
            "rank (change the partition), or run them with twobp's PipelineExecutor, which keeps a copy "
            "on each rank and sums their gradients")


def partition_blocks(blocks: Sequence[BlockLike] | nn.Sequential, *, num_stages: int, ranks: int,
                     stages_wanted: Sequence[int], costs: Sequence[float] | None = None,
                     bounds: Sequence[int] | None = None,
                     allow_shared: bool = False, layout: str = "loop") -> tuple[Partition, dict[int, nn.Sequential]]:
    """Cut ``blocks`` into ``num_stages`` stages and build those in ``stages_wanted``.

    ``ranks``, ``layout``: pipeline ranks and how stages map to them (stage s on rank ``s % ranks``
    in the looped layout, :data:`~.actions.LAYOUTS`), for the sharing check.
    ``bounds``: explicit boundaries (``num_stages + 1`` ints from 0 to ``len(blocks)``).
    Returns the partition and ``{stage: nn.Sequential}`` for the wanted stages.
    """
    blocks = list(blocks.children()) if isinstance(blocks, nn.Sequential) else list(blocks)
    if not blocks:
        raise ValueError("the model has no blocks; pass an nn.Sequential or a list of modules")
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module) and not callable(b):
            raise TypeError(f"block {i} is a {type(b).__name__}: give modules or factories")
    if bounds is not None:
        bounds = tuple(int(x) for x in bounds)
        if (len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != len(blocks)
                or any(b >= c for b, c in zip(bounds, bounds[1:]))):
            raise ValueError(f"bounds must rise strictly from 0 to {len(blocks)} in "
                             f"{num_stages + 1} entries, got {list(bounds)}")
        part = Partition(bounds)
    else:
        part = balance(len(blocks), num_stages, costs)
    if not allow_shared:
        check_shared_parameters(blocks, part, ranks=ranks, layout=layout)
    built = {}
    for s in stages_wanted:
        mods = OrderedDict()
        for i in part.blocks_of(s):
            b = blocks[i]
            mods[str(i)] = b if isinstance(b, nn.Module) else b()
            if not isinstance(mods[str(i)], nn.Module):
                raise TypeError(f"factory for block {i} returned {type(mods[str(i)]).__name__}, "
                                "not an nn.Module")
        built[s] = nn.Sequential(mods)
    return part, built
