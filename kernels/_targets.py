"""Which GPU a launch runs on, and which autotune configs may run there.

A config that is fine on one GPU can fail or crawl on another: a 4-stage 128x128x64 tile
needs more shared memory than an A100 block may have in fp32, and a dot of 32 rows cannot
use Hopper's warpgroup MMA (wgmma needs 64). So every autotuned kernel lists its candidate
configs per *launch class*:

* the architecture, ``"sm_90"`` (Hopper; also datacenter Blackwell, which has as much shared
  memory) or ``"sm_80"`` (Ampere, and every other CUDA GPU);
* the dtype class, ``"16-bit"`` (fp16, bf16) or ``"fp32"``;
* for attention, also the padded head dim.

The autotuner gets the union of all lists; its ``early_config_prune`` keeps only the list of
the launch's class (:meth:`ConfigTable.select`), so a GPU never spends a minute timing a
config that cannot launch there or spills. ``bench/aot_sweep.py`` compiles every list for
sm_90 and sm_80 without a GPU and checks each kept config: it compiles, spills nothing,
fits the target's shared memory and, on sm_90, uses wgmma
(``bench/results/aot-sweep.md``); ``tests/kernels/test_compile_targets.py`` checks a subset
in CI. Only sm_90 and sm_80 are verified; on other GPUs (an RTX card's 99 KB of shared
memory, say) Triton's autotuner still skips any config that fails to launch.

Under the interpreter (CPU tensors) there is no architecture and nothing is pruned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable

import torch
import triton

__all__ = ["ARCHS", "SHARED_LIMIT", "ConfigTable", "arch_of", "class_key", "config_key", "dtype_class", "make_prune", "max_configs"]

ARCHS = ("sm_90", "sm_80")
#: Shared memory one block may opt into, in bytes (CUDA programming guide, per compute capability).
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


def arch_of(device: torch.device) -> str | None:
    """The config class of the GPU ``device`` is on: "sm_90", "sm_80", or None on the CPU."""
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major in (9, 10) else "sm_80"


def dtype_class(dtype: torch.dtype) -> str:
    """"fp32" or "16-bit" (fp16 and bf16 share tiles: same size, same tensor-core shapes)."""
    return "fp32" if dtype == torch.float32 else "16-bit"


def config_key(c: triton.Config) -> tuple:
    """What identifies a config: its meta-parameters, warps and stages."""
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


class ConfigTable:
    """Autotune candidates per launch class.

    Args:
        lists: {class key: [triton.Config, ...]}; a class key is a tuple starting with the
            architecture and the dtype class, e.g. ("sm_90", "16-bit") or ("sm_80", "fp32", 128).
            Every list must be non-empty.
        interpret: the configs used under the interpreter (no architecture, no pruning).
    """

    def __init__(self, lists: dict[tuple, list[triton.Config]], interpret: list[triton.Config] | None = None):
        for key, configs in lists.items():
            if not configs:
                raise ValueError(f"ConfigTable: the list for {key} is empty; every launch class needs a config")
        self.lists = lists
        self.interpret = interpret
        union: dict[tuple, triton.Config] = {}
        for configs in lists.values():
            for c in configs:
                union.setdefault(config_key(c), c)
        #: every candidate, for triton.autotune(configs=...)
        self.configs = list(interpret) if interpret is not None else list(union.values())

    def keys(self) -> Iterable[tuple]:
        return self.lists.keys()

    def allowed(self, key: tuple) -> list[triton.Config]:
        """The list of class ``key``, or a ValueError naming the classes there are."""
        try:
            return self.lists[key]
        except KeyError:
            raise ValueError(f"no autotune configs for launch class {key}; known: {sorted(self.lists)}") from None

    def select(self, configs: list[triton.Config], key: tuple | None) -> list[triton.Config]:
        """The configs among ``configs`` that class ``key`` may use; all of them when ``key`` is None
        (the interpreter)."""
        if key is None or self.interpret is not None:
            return list(configs)
        allowed = {config_key(c) for c in self.allowed(key)}
        return [c for c in configs if config_key(c) in allowed]


def class_key(arch: str | None, dtype: torch.dtype, *extra: Hashable) -> tuple | None:
    """The launch class key (None under the interpreter)."""
    if arch is None:
        return None
    return (arch, dtype_class(dtype), *extra)


_FROM_DEVICE = object()


def max_configs() -> int | None:
    """The cap on autotune candidates from TWOBP_AUTOTUNE_MAX_CONFIGS (None: no cap)."""
    raw = os.environ.get("TWOBP_AUTOTUNE_MAX_CONFIGS", "")
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"TWOBP_AUTOTUNE_MAX_CONFIGS must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"TWOBP_AUTOTUNE_MAX_CONFIGS must be a positive integer, got {raw!r}")
    return n


def make_prune(table: ConfigTable, dtype_arg: str,
               extra: Callable[[dict], tuple] | None = None,
               by_size: Callable[[list[triton.Config], dict], list[triton.Config]] | None = None):
    """An ``early_config_prune`` for ``triton.autotune``: the table's list for the launch's class,
    then (optionally) ``by_size`` on the problem's shape.

    Args:
        table: the kernel's candidates per launch class.
        dtype_arg: the kernel argument whose tensor gives the dtype and the device.
        extra: more of the class key from the launch arguments (e.g. the head dim).
        by_size: drops tiles far larger than the problem; gets the selected configs and all
            launch arguments by name, returns a non-empty list.

    The returned function also takes ``_arch="sm_90"`` to prune for a target without a device
    (what the AOT sweep does with CPU tensors standing in for the arguments).

    ``TWOBP_AUTOTUNE_MAX_CONFIGS=n`` (read at each prune, i.e. once per autotune key) keeps only
    the first n configs of the result: the lists are ordered best first at the model shapes,
    and ``bench/gpu_check.sh`` uses it to fit autotuning into a short GPU lease.
    """
    def for_class(configs, named_args, _arch=_FROM_DEVICE, **kwargs):
        """The configs of the launch's class, before any pruning by size."""
        meta = {**named_args, **kwargs}
        t = meta[dtype_arg]
        arch = arch_of(t.device) if _arch is _FROM_DEVICE else _arch
        return table.select(configs, class_key(arch, t.dtype, *(extra(meta) if extra is not None else ())))

    def prune(configs, named_args, _arch=_FROM_DEVICE, **kwargs):
        kept = for_class(configs, named_args, _arch, **kwargs)
        if by_size is not None:
            kept = by_size(kept, {**named_args, **kwargs})
        cap = max_configs()
        return kept[:cap] if cap else kept

    prune.for_class = for_class  # the AOT sweep tells pruning by class from pruning by size
    return prune
