"""Checkpoints of a pipelined model: one state dict per stage, reassembled at will.

Each rank writes ``stage-<rank>.pt`` with the state of its blocks, keyed as in
``nn.Sequential(*model.blocks())`` (``"<block index>.<name inside the block>"``), so the
files of all ranks together are the whole model, whatever the stage count was.
:func:`load_full_state_dict` merges them; :func:`to_model_state_dict` renames the keys to
the model's own ``state_dict``; :func:`load_stage_state` loads into a pipeline cut
differently from the one that saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["save_stage_state", "load_full_state_dict", "load_stage_state", "to_model_state_dict",
           "save_training_state", "load_training_state"]


def save_stage_state(executor: Any, folder: str | Path) -> Path:
    """Write this rank's blocks to ``folder/stage-<rank>.pt`` (every rank calls it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for chunk in sorted(executor.stages):
        state.update({k: v.detach().cpu() for k, v in executor.stages[chunk].state_dict().items()})
    path = folder / f"stage-{executor.rank}.pt"
    torch.save(state, path)
    if executor.rank == 0:  # a run with more stages left files here: they would repeat keys on load
        for old in [*folder.glob("stage-*.pt"), *folder.glob("optim-*.pt")]:
            index = old.stem.partition("-")[2]
            if index.isdigit() and int(index) >= executor.schedule.stages:
                old.unlink()
    if dist.is_initialized():
        dist.barrier(group=executor.group)
    return path


def load_full_state_dict(folder: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Merge every ``stage-*.pt`` in ``folder`` into the blocks' state dict (``mmap``: map the
    files instead of reading them, for a look at keys and shapes)."""
    files = sorted(Path(folder).glob("stage-*.pt"))
    if not files:
        raise FileNotFoundError(f"no stage-*.pt files in {folder}; save with --checkpoint {folder} first")
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        part = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
        clash = set(part) & set(merged)
        if clash:
            raise ValueError(f"{f.name} repeats keys another stage file has, e.g. {sorted(clash)[:3]}; "
                             "mixing files from different runs?")
        merged.update(part)
    return merged


def load_stage_state(executor: Any, folder: str | Path) -> None:
    """Load this rank's blocks from a checkpoint saved with any stage count."""
    merged = load_full_state_dict(folder)
    for chunk in sorted(executor.stages):
        stage: nn.Module = executor.stages[chunk]
        wanted = stage.state_dict().keys()
        missing = [k for k in wanted if k not in merged]
        if missing:
            raise ValueError(f"checkpoint {folder} lacks {len(missing)} keys of this stage, e.g. {missing[:3]}; "
                             "was it saved from the same model and preset?")
        stage.load_state_dict({k: merged[k] for k in wanted}, strict=True)
    executor._sync.check_tied_agree(f"after loading checkpoint {folder}")


def to_model_state_dict(model: nn.Module, blocks_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename block-indexed keys to ``model.state_dict()``'s own names (tied tensors map to every name)."""
    seq = nn.Sequential(*model.blocks())
    by_identity = {id(t): k for k, t in seq.state_dict(keep_vars=True).items()}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = by_identity.get(id(t))
        if key is None or key not in blocks_state:
            raise ValueError(f"model tensor {name!r} has no entry in the checkpoint")
        out[name] = blocks_state[key]
    return out


def _optimizer_state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """(optimizer state, fp32 master or None) of model parameter ``p``; MasterWeights keeps both
    on the master it steps."""
    inner = getattr(optimizer, "inner", None)
    if inner is None:
        return optimizer.state.get(p, {}), None
    master = optimizer.master(p)
    return inner.state.get(master, {}), (master if master is not p else None)


def save_training_state(executor: Any, folder: str | Path, optimizer: torch.optim.Optimizer, *,
                        steps_done: int, grad_scaler: Any = None) -> Path:
    """Write what continuing the run needs besides the weights to ``folder/optim-<rank>.pt``:
    the optimizer's state per parameter, keyed by the parameter's global name (so it loads
    into any stage count), fp32 masters of :class:`twobp.MasterWeights`, the fp16 loss scale and
    the steps done (the data position). The groups' settings (the lr) are not: a resumed job
    runs with its own --lr."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {}
    for name, p in executor.named_parameters():
        state, master = _optimizer_state_of(optimizer, p)
        by_name[name] = {"state": {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()},
                         "master": None if master is None else master.detach().cpu().clone()}
    payload = {"by_name": by_name, "steps_done": int(steps_done),
               "scaler": grad_scaler.state_dict() if grad_scaler is not None else None}
    path = folder / f"optim-{executor.rank}.pt"
    torch.save(payload, path)
    if dist.is_initialized():
        dist.barrier(group=executor.group)
    return path


def load_training_state(executor: Any, folder: str | Path, optimizer: torch.optim.Optimizer,
                        grad_scaler: Any = None) -> int | None:
    """Restore what :func:`save_training_state` wrote into ``optimizer`` (and ``grad_scaler``)
    for this rank's parameters; returns the steps done, or None for a checkpoint of weights only
    (the optimizer then starts fresh)."""
    files = sorted(Path(folder).glob("optim-*.pt"))
    if not files:
        return None
    merged: dict[str, dict] = {}
    steps = scaler = None
    for f in files:
        part = torch.load(f, map_location="cpu", weights_only=False)
        merged.update(part["by_name"])
        steps, scaler = part["steps_done"], part["scaler"]
    missing = [n for n, _ in executor.named_parameters() if n not in merged]
    if missing:
        raise ValueError(f"checkpoint {folder} has no optimizer state for {len(missing)} parameters, e.g. {missing[:3]}")
    inner = getattr(optimizer, "inner", None)
    with torch.no_grad():
        for name, p in executor.named_parameters():
            saved = merged[name]
            key = optimizer.master(p) if inner is not None else p
            if saved["master"] is not None and key is not p:
                key.copy_(saved["master"])
            if saved["state"]:
                (inner or optimizer).state[key] = {k: (v.to(key.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                                   for k, v in saved["state"].items()}
    if grad_scaler is not None and scaler is not None:
        grad_scaler.load_state_dict(scaler)
    return steps

