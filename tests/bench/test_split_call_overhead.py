"""bench/split_call_overhead.py times one split linear call's parts against torch's and reports them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "split_call_overhead.py"


@pytest.mark.timeout(120)
def test_split_call_overhead_reports_every_part(tmp_path):
    out = tmp_path / "call.md"
    proc = subprocess.run([sys.executable, str(BENCH), "--rows", "8", "--in-features", "16", "--out-features", "24",
                           "--rounds", "3", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = [r for r in out.read_text().splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert len(row) == 1, out.read_text()
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    assert len(cells) == 8, cells
    f_torch, f_split, f_inner = float(cells[0]), float(cells[1].split()[0]), float(cells[2])
    assert 0 < f_inner <= f_split and f_torch > 0, cells  # the GEMM is timed inside the split forward
    assert all(float(c) > 0 for c in (cells[4], cells[5], cells[6])), cells


def test_split_call_overhead_refuses_a_zero_size():
    proc = subprocess.run([sys.executable, str(BENCH), "--rows", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr
