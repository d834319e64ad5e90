"""Timing: medians, with warm-up kept out of the figures.

On CUDA this is ``triton.testing.do_bench`` (median over CUDA-event timings, L2 flushed
between runs). On CPU it is ``time.perf_counter`` around each call, median of ``reps``.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds", "machine_name"]


def median_seconds(fn: Callable[[], object], *, device: torch.device, warmup: int = 2, reps: int = 5,
                   min_sample: float = 0.05) -> float:
    """Median wall time of ``fn()`` in seconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    # Some machines tick their clock coarsely (4 ms seen here): repeat fn inside each timed
    # sample until the sample lasts at least min_sample seconds, then divide.
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(min_sample / once))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} torch threads)"
