"""bench/stage_overhead.py times every part for each model and reports ratios against torch's modules."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "stage_overhead.py"


@pytest.mark.timeout(300)
def test_stage_overhead_reports_every_part_of_every_model(tmp_path):
    out = tmp_path / "overhead.md"
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "llama,bert,resnet", "--preset", "tiny",
                           "--rows", "2", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in out.read_text().splitlines()
            if r.startswith("| ") and "/tiny" in r]
    assert [r[0] for r in rows] == ["llama/tiny", "bert/tiny", "resnet/tiny"]
    for r in rows:
        assert len(r) == 10, r
        for cell in (r[3], r[4], r[6], r[9]):  # the ratio cells: "<ms> ms (<ratio>x)"
            ratio = float(cell.split("(")[1].rstrip("x)"))
            assert 0 < ratio < 100, r
        for cell in (r[2], r[5], r[7], r[8]):
            assert float(cell.split()[0]) > 0, r


def test_stage_overhead_names_an_unknown_model():
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "gpt9"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown ['gpt9']" in proc.stderr and "llama, bert, resnet" in proc.stderr
