"""bench/gpu_check.sh must never fail on a GPU for a reason a CPU could have shown: run
its CPU dry run end to end and check what it writes."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHON": sys.executable,
           "TWOBP_SKIP_INSTALL": "1"}  # the test session's install is the one under test
    env.pop("TWOBP_BACKEND", None)  # the dry run must exercise the Triton kernels (interpreted)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("env.md", "correctness.csv", "kernels.md", "kernels.csv", "layers.csv", "prediction.md",
                 "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / "correctness.csv").open() as f:
        rows = list(csv.DictReader(f))
    ops = {r["op"] for r in rows}
    assert ops == {"linear", "layernorm", "rmsnorm", "attention", "conv2d"}, ops
    assert all(r["ok"] == "True" for r in rows), [r for r in rows if r["ok"] != "True"]
    assert "PREDICTION" in (tmp_path / "prediction.md").read_text()
