"""bench/mamba_gpu_check.py --dry-run: the Mamba GPU check runs end to end on a CPU (the scan and
the conv under the interpreter in fp32/fp16, the block costs on the torch reference)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_mamba_gpu_check_dry_run_checks_both_kernels_and_predicts(tmp_path):
    env = {**os.environ}
    env.pop("TWOBP_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mamba_gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "mamba_correctness.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| selective_scan") or
            line.startswith("| causal_conv1d")]
    # y, four input gradients and two parameter gradients (each also batched) for the scan; y, dx,
    # dW, db (dW, db batched) for the conv; in fp32 and fp16
    assert len(rows) == 2 * (1 + 4 + 4) + 2 * (1 + 1 + 4), table
    assert all(line.rstrip().endswith("| ok |") for line in rows), table
    assert "PREDICTED, not measured" in proc.stdout
