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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_torch_pipelining_runs_and_writes_the_asked_rows(tmp_path):
    """Every contender of both runtimes runs on the tiny llama, the losses agree, and the
    JSON has one row per (implementation, schedule) with the fields the report promises."""
    import json

    import compare_torch_pipelining as bench

    out, js = tmp_path / "r.md", tmp_path / "r.json"
    assert bench.main(["--model", "llama", "--preset", "tiny", "--microbatches", "4", "--batch-size", "8",
                       "--rounds", "2", "--warmup", "1", "--out", str(out), "--json", str(js),
                       "--timeout", "60"]) == 0
    rows = json.loads(js.read_text())
    got = {(r["implementation"], r["schedule"], r["twobp"]) for r in rows}
    assert got == {("twobp", "1f1b", False), ("twobp", "1f1b", True), ("twobp", "zb-h1", True),
                   ("twobp", "auto-h1", True), ("twobp", "auto", True), ("twobp", "auto@zb", True),
                   ("twobp", "auto-vh1", True), ("twobp", "auto-v", True), ("twobp", "auto-v@zb", True),
                   ("torch", "Schedule1F1B", False),
                   ("torch", "ScheduleInterleavedZeroBubble", False), ("torch", "ScheduleZBVZeroBubble", False)}
    for r in rows:
        assert "error" not in r, r
        if r["implementation"] == "twobp" and r["twobp"]:  # every backward counted once, fused or split
            chunks = 2 if r["schedule"] in ("auto-v", "auto-vh1", "auto-v@zb") else 1
            assert r["fused_backwards"][1] == 2 * 4 * chunks and 0 <= r["fused_backwards"][0] <= 2 * 4 * chunks, r
        else:
            assert r["fused_backwards"] is None, r
        assert r["tokens_per_s"] > 0 and len(r["peak_saved_bytes"]) == 2 and min(r["peak_saved_bytes"]) > 0
        assert r["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)
        assert set(r["breakdown_s"][0]) >= {"wall", "F", "wait", "other"}
        for bd in r["breakdown_s"]:  # the closing barrier's wait is counted once, as wait: parts <= wall
            measured = sum(v for k, v in bd.items() if k not in ("wall", "other"))
            assert measured <= bd["wall"] * 1.05 + 1e-3, bd
    # auto-h1 holds what ZB-H1 holds (at most p micro-batches per rank), unlike auto
    peak = {r["schedule"]: max(r["peak_saved_bytes"]) for r in rows if r["implementation"] == "twobp" and r["twobp"]}
    assert peak["auto-h1"] <= peak["zb-h1"] * 1.05, peak
    # the @zb placements hold to torch's leanest zero-bubble peak, by construction
    torch_zb = min(max(r["peak_saved_bytes"]) for r in rows if "ZeroBubble" in r["schedule"])
    assert peak["auto@zb"] <= torch_zb and peak["auto-v@zb"] <= torch_zb, (peak, torch_zb)
    # the V layout within 1F1B's memory holds no more than torch's ZB-V on the same cut
    torch_zbv = next(max(r["peak_saved_bytes"]) for r in rows if r["schedule"] == "ScheduleZBVZeroBubble")
    assert peak["auto-vh1"] <= torch_zbv * 1.05, (peak, torch_zbv)
    text = out.read_text()
    assert "## Summary" in text and "Where the time goes" in text and "machine:" in text
    assert "host allocator, every rank and contender: freed memory kept in the process" in text
    assert "Stage cut (balanced; block bounds, the same for both runtimes): 2 stages [0, " in text, text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_auto_at_zb_holds_the_largest_cap_whose_measured_peak_fits_torchs_zero_bubble(tmp_path):
    """auto@zb measures torch's leanest zero-bubble peak in the run and walks the cap down from
    no cap until a measured peak fits: it runs at that cap, within that peak, with equal losses."""
    import json

    import compare_torch_pipelining as bench

    out, js = tmp_path / "r.md", tmp_path / "r.json"
    assert bench.main(["--model", "llama", "--preset", "tiny", "--microbatches", "4", "--batch-size", "8",
                       "--rounds", "1", "--warmup", "1", "--out", str(out), "--json", str(js), "--timeout", "60",
                       "--ours", "auto-2bp,auto@zb-2bp,auto-v@zb-2bp",
                       "--torch", "Schedule1F1B,ScheduleZBVZeroBubble"]) == 0
    rows = {(r["implementation"], r["schedule"]): r for r in json.loads(js.read_text())}
    budget = max(rows["torch", "ScheduleZBVZeroBubble"]["peak_saved_bytes"])
    for name, chunks in (("auto@zb", 1), ("auto-v@zb", 2)):
        r = rows["twobp", name]
        assert "error" not in r, r
        caps = [n for n, _ in r["cap_search"]]
        assert caps == list(range(4 * chunks, r["memory_cap"] - 1, -1)), r["cap_search"]
        assert r["cap_search"][-1][1] <= budget < min((b for _, b in r["cap_search"][:-1]), default=budget + 1)
        assert max(r["peak_saved_bytes"]) <= budget, (r["peak_saved_bytes"], budget)
        assert r["loss"] == pytest.approx(rows["twobp", "auto"]["loss"], rel=1e-4)
    assert "auto@zb +2BP (cap " in out.read_text()


def test_auto_at_zb_needs_a_torch_zero_bubble_schedule_in_the_run():
    from twobp.benchmarks.pipeline_compare import CompareConfig

    with pytest.raises(ValueError, match="add ScheduleInterleavedZeroBubble or ScheduleZBVZeroBubble"):
        CompareConfig(ours=("auto@zb-2bp",), torch_schedules=("Schedule1F1B",))
    with pytest.raises(ValueError, match="needs 2BP"):
        CompareConfig(ours=("auto@zb",))


def test_loss_gaps_per_step_show_where_contenders_part():
    """Per step, the largest relative gap to the first contender; errored contenders are left
    out, and losses_agree is the largest of them."""
    from twobp.benchmarks.pipeline_compare import Contender, ContenderResult, loss_gaps_per_step, losses_agree

    def res(losses, error=None):
        return ContenderResult(Contender("twobp", "1f1b"), losses, [1.0], [], None, error=error)

    results = [res([4.0, 2.0, 1.0]), res([4.0, 2.0, 1.001]), res([4.0, 2.2, 1.0]), res([9.0, 9.0, 9.0], "failed")]
    gaps = loss_gaps_per_step(results)
    assert gaps[0] == 0.0
    assert gaps[1] == pytest.approx(0.1)
    assert gaps[2] == pytest.approx(1e-3)
    assert losses_agree(results) == pytest.approx(0.1)
