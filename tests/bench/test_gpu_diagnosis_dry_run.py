"""The GPU diagnosis scripts run end to end on a CPU (torch backend, tiny blocks), and the block
costs are timed at the micro-batch they are asked for."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(script, tmp_path):
    env = {**os.environ}
    env.pop("TWOBP_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(300)
def test_gpu_profile_blocks_dry_run_writes_every_phase_of_both_blocks(tmp_path):
    _run("gpu_profile_blocks.py", tmp_path)
    rows = [r for r in (tmp_path / "blocks.md").read_text().splitlines()[2:] if r.startswith("|")]
    phases = {tuple(c.strip() for c in r.split("|")[1:3]) for r in rows}
    assert phases == {(b, p) for b in ("llama-tiny-b1-torch", "bert-tiny-b1-torch")
                      for p in ("F split", "P1", "P2", "F plain", "B fused")}, rows
    walls = [float(r.split("|")[3]) for r in rows]
    assert all(w > 0 for w in walls), rows
    assert (tmp_path / "top-llama-tiny-b1-torch.md").exists()


@pytest.mark.timeout(300)
def test_gpu_host_overhead_dry_run_compares_with_torchs_layer_and_profiles(tmp_path):
    _run("gpu_host_overhead.py", tmp_path)
    text = (tmp_path / "host_overhead.md").read_text()
    assert "torch nn.TransformerEncoderLayer F+B" in text and "F+P1+P2" in text
    assert text.count("## cProfile") == 2 and "function calls" in text


@pytest.mark.timeout(300)
def test_gpu_graphs_dry_run_times_all_three_modes_of_both_blocks(tmp_path):
    _run("gpu_graphs.py", tmp_path)
    rows = [r for r in (tmp_path / "graphs.md").read_text().splitlines() if r.startswith("| ") and "ms" not in r]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows]
    assert {(c[0], c[1]) for c in cells} == {(f"{b}-b{n}", m) for b in ("llama-tiny", "bert-tiny") for n in (1, 8)
                                             for m in ("twobp plain", "twobp split (2BP)", "torch modules")}
    assert all(float(c[2]) > 0 for c in cells), cells


def test_block_costs_use_the_micro_batch_asked_for():
    from twobp.benchmarks.layer_costs import GPU_MICROBATCH, _blocks_to_measure, default_microbatch

    assert default_microbatch(torch.device("cpu")) == 1
    assert default_microbatch(torch.device("cuda")) == GPU_MICROBATCH > 1
    for _, _, make, _, seq in _blocks_to_measure(torch.device("cpu"), True, batch=3):
        x = make()
        assert x.shape[:2] == (3, seq)


def test_fp32_is_checked_as_ieee_fp32_whatever_torchs_tf32_switches_say(monkeypatch):
    """On the H200 the conv kernels followed cuDNN's TF32 switch (on by default) and failed fp32's
    1e-4; the correctness check now turns both switches off for its own run, then restores them."""
    from twobp.benchmarks import correctness

    seen = []
    case = correctness.ODD_CASES()[0]
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        monkeypatch.setattr(correctness, "_check_case", lambda case, device, dtype: seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or
            [correctness.CheckRow(case.op_name, case.shape, "float32", "y", 0.0, 1e-4)])
        correctness.check_ops([case], torch.device("cpu"), [torch.float32], progress=lambda *a: None)
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
