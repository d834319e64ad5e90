"""Keep freed host memory in the process, so CPU training does not page-fault its activations back.

glibc's malloc serves large blocks with ``mmap`` and hands freed memory back to the kernel
(``munmap``, heap trimming); the next allocation of that size page-faults every 4 KiB page in
again and the kernel zeroes it. A training step frees and re-allocates the same activation
sizes every micro-batch, so on a CPU it pays those faults over and over, and the more a schedule
holds at once (2BP's deferred weight-gradient inputs, zero-bubble schedules) the more of its
blocks fall past glibc's adaptive mmap threshold. Measured on a 2-core EPYC, one thread, the
ResNet/cpu model holding 8 micro-batches (``bench/cpu_held_memory.py``): 143k minor faults per
step and 0.74x the speed of the same work in 1F1B order; with freed memory kept, 1k faults and
0.84x (the rest is the split itself and the cache; ``bench/results/where-the-time-goes.md``).

:func:`keep_freed_host_memory` fixes glibc's mmap threshold at its largest (32 MiB: smaller
blocks come from the heap and are reused) and turns heap trimming off. The process keeps its
peak footprint instead of returning it between micro-batches: the trade every caching allocator
(CUDA's included) makes. It is process-wide and only touches glibc; elsewhere it does nothing.
:class:`~twobp.pipeline.PipelineExecutor` calls it on CPU unless ``TWOBP_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["keep_freed_host_memory", "MMAP_THRESHOLD", "ENV_SWITCH"]

ENV_SWITCH = "TWOBP_KEEP_FREED_MEMORY"
"""Set to ``0`` to leave glibc's malloc as it is (the executor then does not call it)."""

MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the heap; glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_applied: bool | None = None


def keep_freed_host_memory(*, force: bool = False) -> bool:
    """Tune glibc's malloc to keep freed memory (module docstring). Idempotent; returns whether
    the process's malloc is now tuned: False off Linux/glibc, or when ``TWOBP_KEEP_FREED_MEMORY=0``
    unless ``force``."""
    global _applied
    if _applied is not None and not force:
        return _applied
    if not force and os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    ok = False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _applied = ok
    return ok
