"""keep_freed_host_memory: after it, a repeated pattern of large CPU allocations (what a training
step does with its activations) stops page-faulting; before it, glibc hands the memory back to the
kernel and faults it in again every time."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                                reason="tunes glibc's malloc only")

_PATTERN = textwrap.dedent("""
    import resource, sys, torch
    import twobp
    if sys.argv[1] == "tuned":
        assert twobp.keep_freed_host_memory() is True
    elif sys.argv[1] == "returning":  # what glibc does before its adaptive threshold has grown
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
        assert mallopt(-3, 128 << 10) and mallopt(-1, 128 << 10)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sizes = [(1 + (7 * k) % 24) << 20 for k in range(12)]  # 1-24 MiB, 138 MiB held at once
    for rep in range(8):
        if rep == 4:  # the heap has grown to the pattern's peak by now
            f0 = faults()
        held = [torch.empty(s // 4).fill_(1.0) for s in sizes]
        del held
    print((faults() - f0) / 4)
""")


def _faults_per_round(mode: str) -> float:
    env = dict(os.environ)
    env.pop("TWOBP_KEEP_FREED_MEMORY", None)
    out = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


def test_tuned_malloc_reuses_freed_activation_memory_without_page_faults():
    pages = (sum((1 + (7 * k) % 24) for k in range(12)) << 20) // 4096
    tuned, returning = _faults_per_round("tuned"), _faults_per_round("returning")
    assert tuned < 0.05 * pages, (tuned, pages)  # 0 here; 512 (1.4%) seen once in CI
    # The control shows this counter does see the faults when freed memory goes back to the kernel.
    # glibc's own default is not the control: its adaptive threshold may have grown past the
    # pattern's blocks by round 4 (CI measured 0 faults for it once), so it proves nothing either way.
    assert returning > 5 * max(tuned, 1.0), (returning, tuned)


def test_env_switch_turns_it_off_and_force_overrides():
    code = ("import twobp.host_memory as h; a = h.keep_freed_host_memory(); "
            "b = h.keep_freed_host_memory(force=True); print(a, b)")
    env = {**os.environ, "TWOBP_KEEP_FREED_MEMORY": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def _executor_tunes_malloc(rank, world):
    import torch.nn as nn

    from twobp import host_memory
    from twobp.pipeline import PipelineExecutor, make_schedule

    before = host_memory._applied
    PipelineExecutor([nn.Linear(4, 4)], nn.functional.mse_loss, schedule=make_schedule("1f1b", stages=1, microbatches=2,
                                                                                      twobp=False))
    return before, host_memory._applied


@pytest.mark.timeout(120)
def test_cpu_pipeline_executor_keeps_freed_memory_unless_switched_off():
    from twobp.pipeline import spawn

    assert spawn(_executor_tunes_malloc, world_size=1, timeout=30) == [(None, True)]
    off = spawn(_executor_tunes_malloc, world_size=1, timeout=30, env={"TWOBP_KEEP_FREED_MEMORY": "0"})
    assert off == [(None, None)]
