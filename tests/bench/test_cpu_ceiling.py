"""bench/cpu_ceiling.py measures all three parts (GEMM headroom, batched P2, contention) and writes them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _rows(text: str, heading: str) -> list[list[str]]:
    part = text.split(heading, 1)[1].split("\n## ", 1)[0]
    table = [r for r in part.splitlines() if r.startswith("| ")]
    return [[c.strip() for c in r.split("|")[1:-1]] for r in table[1:]]  # without the header row


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_cpu_ceiling_writes_every_part_with_figures(tmp_path):
    out = tmp_path / "ceiling.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_ceiling.py"), "--rows", "32",
                           "--microbatches", "2", "--reps", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    gemms = _rows(text, "## 1. GEMM headroom")
    assert len(gemms) == 1 + 7 * 3  # the square reference, then every linear's three GEMMs
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in gemms), gemms
    p2 = _rows(text, "## 2. Batched P2")
    assert [r[0] for r in p2] == ["q", "k", "v", "o", "gate", "up", "down", "all"]
    assert all(r[4].endswith("x") and float(r[4][:-1]) > 0 for r in p2), p2
    contention = _rows(text, "## 3. Contention")
    assert len(contention) == 4
    for r in contention:  # the loaded columns are ratios to the idle one
        assert float(r[1]) > 0 and all(c.endswith("x") and float(c[:-1]) > 0 for c in r[2:]), r


def test_cpu_ceiling_refuses_a_zero_count():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_ceiling.py"), "--reps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--reps" in proc.stderr
