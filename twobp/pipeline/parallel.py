"""Data parallel x pipeline parallel: the device mesh the executor runs on.

The world is laid out as a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh` with
dims ``("dp", "pp")``: global rank ``d * pp + r`` is pipeline rank ``r`` of replica ``d``.
A :class:`~twobp.pipeline.PipelineExecutor` given ``mesh=`` runs its schedule on its "pp"
row and averages gradients over its "dp" column (see :mod:`.grad_sync`). Under
``torchrun`` across nodes, keep ``pp`` within a node where possible: pipeline messages
are frequent and latency-bound, replica all-reduces are large and overlapped.

Every replica must run **one schedule**: their gradient all-reduces meet in the order each
replica's schedule issues them. A schedule planned on measured costs (``auto``, carried P2)
is planned on :func:`agree_costs` (the replicas' mean), not on each replica's own figures;
the executor checks the replicas' plans at construction and refuses ones that differ.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist

__all__ = ["agree_costs", "init_mesh", "replica_slice"]


def init_mesh(*, pp: int, dp: int = 1, device_type: str | None = None):
    """The ``(dp, pp)`` mesh over the initialised default group (a collective: every rank
    calls it). ``device_type``: ``cuda`` for NCCL, ``cpu`` for gloo (default: by backend)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("init_mesh needs torch.distributed initialised (twobp.pipeline.spawn, or "
                           "init_from_env() under torchrun)")
    for name, v in (("pp", pp), ("dp", dp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"init_mesh: {name} must be a positive int, got {v!r}")
    world = dist.get_world_size()
    if pp * dp != world:
        raise ValueError(f"init_mesh: pp={pp} x dp={dp} = {pp * dp} ranks, but the world has {world}; start "
                         f"{pp * dp} processes or change --stages / --dp")
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return init_device_mesh(device_type, (dp, pp), mesh_dim_names=("dp", "pp"))


def replica_slice(batch: torch.Tensor, mesh) -> torch.Tensor:
    """This replica's share of a global batch (split along dim 0 into ``dp`` equal parts)."""
    dp = mesh.size(0)
    if batch.shape[0] % dp:
        raise ValueError(f"a global batch of {batch.shape[0]} rows does not split into {dp} equal replica "
                         f"shares; use a multiple of {dp}")
    return batch.chunk(dp)[mesh.get_local_rank("dp")]


def agree_costs(costs: Mapping[str, Any], mesh) -> dict:
    """The mean over the mesh's replicas of each replica's measured ``costs`` (the executor's
    mapping form: per kind, a number or one per stage), the same on every replica (a
    collective over the "dp" group; with one replica, ``costs`` as a dict).

    Measured figures differ between replicas (a neighbour's burst, page faults), and so do
    the plans ``auto`` or the carried-P2 choice make of them; replicas running different
    plans would issue their gradient all-reduces in different orders (gloo then fails with
    "Received data size doesn't match expected size", NCCL hangs). Plan on this instead."""
    from .costs import mean_costs

    mine = dict(costs)
    if mesh is None or mesh.size(0) == 1:
        return mine
    gathered: list[Any] = [None] * mesh.size(0)
    dist.all_gather_object(gathered, mine, group=mesh.get_group("dp"))
    if any(set(g) != set(mine) for g in gathered):
        raise ValueError(f"agree_costs: replicas measured different cost kinds: {[sorted(g) for g in gathered]}; "
                         "measure every replica with the same probe schedule")
    return mean_costs(gathered)
