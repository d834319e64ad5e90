"""bench/gpu_check.sh must never fail on a GPU for a reason a CPU could have shown: run
its CPU dry run end to end and check what each phase writes, in order."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHASE_FILES = ["1-env.md", "2-correctness.csv", "2-correctness.md", "3-linear.md", "3-linear.csv",
               "4-attention.md", "4-attention.csv", "5-norms-conv.md", "5-norms-conv.csv", "6-layers.csv",
               "6-layers.md", "7-prediction.md"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_writes_every_phase_in_order(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHON": sys.executable,
           "TWOBP_SKIP_INSTALL": "1"}  # the test session's install is the one under test
    env.pop("TWOBP_BACKEND", None)  # the dry run must exercise the Triton kernels (interpreted)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in PHASE_FILES + ["summary.md"]:
        assert (tmp_path / name).stat().st_size > 0, name
    # each phase's files are written when it ends: modification times follow the phase order
    mtimes = [(tmp_path / name).stat().st_mtime_ns for name in PHASE_FILES]
    assert mtimes == sorted(mtimes), list(zip(PHASE_FILES, mtimes))

    with (tmp_path / "2-correctness.csv").open() as f:
        rows = list(csv.DictReader(f))
    ops = {r["op"] for r in rows}
    assert ops == {"linear", "layernorm", "rmsnorm", "attention", "conv2d", "embedding", "causal_conv1d",
                   "selective_scan"}, ops
    assert all(r["ok"] == "True" for r in rows), [r for r in rows if r["ok"] != "True"]
    assert any(r["output"].endswith("batched x2") for r in rows), "batched p2 was not checked"
    layers = (tmp_path / "6-layers.md").read_text()
    for block in ("llama-tiny", "bert-tiny", "mamba-tiny"):
        assert block in layers, f"{block} missing from the per-block costs:\n{layers}"
    assert "PREDICTION" in (tmp_path / "7-prediction.md").read_text()
    summary = (tmp_path / "summary.md").read_text().splitlines()
    assert len(summary) <= 45, f"the summary is {len(summary)} lines, more than one screen"
    for phase in ("correctness", "linear", "attention", "norms-conv", "layers", "prediction"):
        assert f"## {phase}" in summary, phase
    assert not any("FAILED" in line for line in summary), "\n".join(summary)


def test_gpu_check_phase_timeout_skips_and_still_summarises(tmp_path):
    """With the deadline already past, every phase is skipped and summary.md says so."""
    import time

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("TWOBP_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "twobp.benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path),
                           "--deadline", str(time.time() - 1)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    skipped = [line for line in summary.splitlines() if line.startswith("## ") and "skipped" in line]
    assert len(skipped) == 6, summary
    assert (tmp_path / "1-env.md").exists()


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_lease.sh"])
def test_the_gpu_scripts_answer_help_without_running_anything(script, tmp_path):
    """--help prints the usage and exits 0; it is not taken for the output folder."""
    proc = subprocess.run(["bash", str(ROOT / "bench" / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"bench/{script}" in proc.stdout and "--dry-run" in proc.stdout and "PYTHON" in proc.stdout
    assert not (tmp_path / "--help").exists() and not (ROOT / "--help").exists()
