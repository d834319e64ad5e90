"""bench/cpu_held_memory.py runs both allocators and all three orders and writes its table."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cpu_held_memory_writes_both_allocators_and_every_order(tmp_path):
    out = tmp_path / "held.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_held_memory.py"), "--model", "resnet",
                           "--microbatches", "2", "--rounds", "1", "--pairs", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [[c.strip() for c in r.split("|")[1:-1]] for r in out.read_text().splitlines() if r.startswith("| ")][1:]
    assert {(r[0], r[1]) for r in rows} == {(a, o) for a in ("glibc default", "freed memory kept")
                                            for o in ("1f1b", "each", "hold")}
    for r in rows:
        assert float(r[5]) > 0 and r[6].endswith("x"), r
        assert (float(r[4]) > 0) == (r[1] != "1f1b"), r  # only the split orders run P2
