"""bench/replan_auto.py and bench/conv_dw_batch.py run end to end on tiny shapes and report
what they measured: two plans with their steps and a paired ratio; every convolution's two times."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_replan_auto_times_both_plans(tmp_path):
    out = tmp_path / "replan.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "replan_auto.py"), "--preset", "tiny",
                           "--microbatches", "2", "--batch-size", "4", "--rounds", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plans = [r for r in out.read_text().splitlines() if r.startswith("| A `") or r.startswith("| B `")]
    assert len(plans) == 2, out.read_text()
    ratio = plans[1].split("|")[-2].strip()
    assert ratio.endswith("x") and 0 < float(ratio[:-1]) < 100, plans[1]
    for row in plans:
        assert float(row.split("|")[3].split()[0].replace(",", "")) > 0, row  # median step in ms


@pytest.mark.timeout(120)
def test_conv_dw_batch_times_every_convolution(tmp_path):
    out = tmp_path / "conv.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "conv_dw_batch.py"), "--preset", "tiny", "--reps", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [r for r in out.read_text().splitlines() if r.startswith("| (")]
    assert len(rows) >= 4, out.read_text()  # the stem and a bottleneck's three convolutions at least
    total = next(r for r in out.read_text().splitlines() if r.startswith("| **all"))
    assert f"all {len(rows)}" in total
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[4].endswith("x"), r
