"""bench/pipeline_cpu.py still runs end to end (tiny settings)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.mark.timeout(180)
def test_pipeline_cpu_bench_runs(tmp_path):
    import pipeline_cpu

    out = tmp_path / "table.md"
    assert pipeline_cpu.main(["--blocks", "2", "--width", "16", "--rows", "2",
                              "--microbatches", "4", "--warmup", "1", "--repeats", "1",
                              "--out", str(out)]) == 0
    text = out.read_text()
    for name in ("| 1f1b |", "| 1f1b-2bp |", "| zb-h1-2bp |", "| auto-2bp |", "machine:"):
        assert name in text, text
