"""The `twobp` command and the training jobs behind it, on 2 gloo ranks (CPU)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from twobp.checkpoint import load_full_state_dict, to_model_state_dict
from twobp.cli import main
from twobp.train import JobConfig, Variant, losses_agree, run_job


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_runs_schedules_that_agree_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    rc = main(["compare", "--schedules", "1f1b,1f1b-2bp,gpipe-2bp", "--steps", "3", "--warmup", "1",
               "--out", str(out), "--json", str(tmp_path / "r.json"), "--checkpoint", str(tmp_path / "ck"),
               "--quiet", "--timeout", "60"])
    assert rc == 0
    payload = json.loads((tmp_path / "r.json").read_text())
    rows = payload["rows"]
    assert [(r["schedule"], r["twobp"]) for r in rows] == [("1f1b", False), ("1f1b", True), ("gpipe", True)]
    assert [r["memory_limit"] for r in rows] == [None, None, None]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 <= r["bubble_fraction"] < 1 and r["store_empty"]
        assert r["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    assert rows[0]["peak_bytes"] == 0, "plain 1F1B keeps nothing in the store"
    assert rows[1]["peak_bytes"] > 0, "2BP holds x and dy between p1 and p2"
    try:
        import matplotlib  # noqa: F401  (the `plot` extra)
    except ImportError:
        assert not (out / "timeline-compare.png").exists()
    else:
        assert (out / "timeline-compare.png").stat().st_size > 0
    trace = json.loads((out / "timeline-1f1b-2BP.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("P2") for n in names) and any(n.startswith("P1") for n in names)

    # per-stage checkpoint: reassembles into the full model's state_dict
    from twobp import models

    torch.manual_seed(0)
    model = models.build("llama", "tiny", tie_embeddings=False)
    full = to_model_state_dict(model, load_full_state_dict(tmp_path / "ck"))
    assert set(full) == set(model.state_dict())
    model.load_state_dict(full)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_loads_into_a_different_stage_count(tmp_path):
    base = dict(steps=2, warmup=0, microbatches=4, batch_size=8, timeout=60.0, quiet=True, out=None)
    run_job(JobConfig(stages=2, variants=(Variant("1f1b", True),), checkpoint=str(tmp_path / "ck"), **base))
    saved = load_full_state_dict(tmp_path / "ck")
    # resume on 4 stages and save right away with lr 0: the weights must come back unchanged
    run_job(JobConfig(stages=4, variants=(Variant("1f1b", False),), resume=str(tmp_path / "ck"), lr=0.0,
                      checkpoint=str(tmp_path / "ck4"), **{**base, "steps": 1}))
    again = load_full_state_dict(tmp_path / "ck4")
    assert set(saved) == set(again)
    for k in saved:
        torch.testing.assert_close(again[k], saved[k], msg=k)


def test_bad_configurations_get_one_line_errors():
    with pytest.raises(SystemExit, match="--batch-size 2 cannot make 4 micro-batches"):
        main(["run", "--batch-size", "2", "--microbatches", "4"])
    with pytest.raises(SystemExit, match="warmup"):
        main(["run", "--steps", "2", "--warmup", "5"])
    with pytest.raises(SystemExit):
        main(["compare", "--schedules", "zb-h1"])  # argparse: zb-h1 needs -2bp
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs 2 GPUs"):
            main(["run", "--device", "cuda"])


def test_losses_agree_detects_a_gap():
    from twobp.train import VariantResult

    def r(losses):
        return VariantResult("1f1b", False, losses, [1.0], 10, "tokens", 0.1, [0], True)

    assert losses_agree([r([1.0, 0.9]), r([1.0, 0.9])]).ok
    assert not losses_agree([r([1.0, 0.9]), r([1.0, 0.95])]).ok
    # a diverged run, or one curve shorter, is no agreement (NaN used to compare as equal)
    nan = float("nan")
    assert "not finite" in losses_agree([r([5.5, nan]), r([5.5, nan])]).text
    assert not losses_agree([r([5.5, 4.0]), r([5.5, nan])]).ok
    assert not losses_agree([r([5.5, 4.0, 3.0]), r([5.5, 4.0])]).ok
    assert not losses_agree([r([5.5, nan])]).ok and losses_agree([r([5.5, 4.0])]).ok  # one schedule: finite
    # bf16 keeps 8 mantissa bits: 2.7e-4 is rounding there, a disagreement in fp32
    assert losses_agree([r([5.21193, 4.9]), r([5.21334, 4.9])], "bf16").ok
    assert not losses_agree([r([5.21193, 4.9]), r([5.21334, 4.9])], "fp32").ok
    # rounding drift after the checked steps is reported, not failed
    ok = losses_agree([r([1.0] * 5 + [0.5]), r([1.0] * 5 + [0.6])])
    assert ok.ok and "drift" in ok.text
    # dropout draws different masks per schedule: not checked, and said so
    said = losses_agree([r([1.0]), r([1.1])], dropout="dropout (p = 0.1)")
    assert said.ok and said.text.startswith("not checked: dropout (p = 0.1)")


def test_dropout_in_finds_modules_and_hugging_face_config_probabilities():
    from torch import nn

    from twobp.train import dropout_in

    assert dropout_in(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))) is None
    assert dropout_in(nn.Sequential(nn.Dropout(0.1))) == "dropout (p = 0.1)"
    m = nn.Linear(2, 2)
    m.config = type("Cfg", (), {})()
    m.config.attention_dropout, m.config.resid_pdrop = 0.0, 0.2
    assert dropout_in(m) == "dropout (p = 0.2)"
    job = type("Job", (), {})()  # twobp.hf's job model: not a module, holds one and its config
    job.model, job.hf_config = nn.Sequential(nn.Dropout(0.1)), None
    assert dropout_in(job) == "dropout (p = 0.1)"


def test_help_explains_every_command():
    for cmd in (["--help"], ["run", "--help"], ["train", "--help"], ["compare", "--help"],
                ["bench", "kernels", "--help"], ["simulate", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "twobp.cli", *cmd], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert "usage:" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dp2_gives_the_losses_of_dp1_on_the_same_global_batch():
    """`train --dp 2 --stages 2` (4 processes): the same per-step losses as --dp 1 on the same
    global batch, with the tied embedding/head across ranks and global-norm clipping on."""
    base = dict(stages=2, microbatches=2, batch_size=8, steps=3, warmup=1, timeout=60.0, quiet=True, out=None,
                variants=(Variant("1f1b", True), Variant("1f1b", False)), tie_embeddings=True, clip_grad_norm=0.5)
    one = run_job(JobConfig(dp=1, **base))
    two = run_job(JobConfig(dp=2, **base))
    for a, b in zip(one, two):
        assert b.replicas == 2
        assert b.losses == pytest.approx(a.losses, rel=1e-5), (a.label, a.losses, b.losses)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bf16_and_fp16_jobs_train():
    for dtype in ("bf16", "fp16"):
        res = run_job(JobConfig(stages=2, microbatches=2, batch_size=4, steps=3, warmup=1, timeout=60.0, quiet=True,
                                out=None, dtype=dtype, variants=(Variant("1f1b", True),)))
        losses = res[0].losses
        assert all(l == l and l < 7 for l in losses), (dtype, losses)  # finite, and a byte LM's ln(256) ≈ 5.5
        assert losses[-1] < losses[0], (dtype, losses)
        from twobp.train import format_results

        table = format_results(res)
        if dtype == "fp16":  # loss scaling: the steps it skipped are counted and shown
            assert res[0].skipped_steps in (0, 1, 2), res[0].skipped_steps
            assert "steps skipped (fp16 inf/nan)" in table and f"| {res[0].skipped_steps} of 3 |" in table, table
        else:
            assert res[0].skipped_steps is None and "skipped" not in table, table


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_v_layout_job_probes_costs_and_trains_like_the_looped_one(tmp_path):
    """`compare --chunks 2 --layout v`: auto is placed on costs a V-shaped probe measured (1F1B
    cannot run two chunks per rank), and every schedule's losses equal the looped layout's, with
    the tied embedding and head on one rank in the V (stepped once) and on two in the loop."""
    from twobp.train import probe_schedule

    base = dict(stages=2, chunks=2, steps=2, warmup=0, microbatches=4, batch_size=8, timeout=60.0, quiet=True,
                out=None)
    assert probe_schedule(JobConfig(**base)) == "interleaved-1f1b"
    assert probe_schedule(JobConfig(**base, layout="v")) == "gpipe"
    assert probe_schedule(JobConfig(**{**base, "chunks": 1})) == "1f1b"
    v = run_job(JobConfig(**base, layout="v", tie_embeddings=True,
                          variants=(Variant("gpipe", False), Variant("auto", True))))
    loop = run_job(JobConfig(**base, tie_embeddings=True, variants=(Variant("interleaved-1f1b", True),)))
    for r in v:
        assert r.losses == pytest.approx(loop[0].losses, rel=1e-5)


def test_v_layout_takes_only_schedules_that_place_chunks_in_a_v():
    with pytest.raises(SystemExit, match="1f1b places chunks in the looped layout"):
        main(["run", "--chunks", "2", "--layout", "v", "--schedules", "1f1b"])
    with pytest.raises(SystemExit, match="needs --chunks >= 2 .*add --chunks 2"):
        main(["run", "--layout", "v", "--schedules", "auto-2bp"])


def test_auto_takes_a_memory_cap_on_the_command_line():
    from twobp.cli import _parse_variants

    got = _parse_variants("1f1b,auto@2-2bp,auto-2bp")
    assert got == (Variant("1f1b", False), Variant("auto", True, 2), Variant("auto", True))
    assert [v.label for v in got] == ["1f1b", "auto@2 +2BP", "auto +2BP"]
    for bad in ("zb-h1@2-2bp", "auto@0-2bp", "auto@x-2bp", "auto@-2bp"):
        with pytest.raises(Exception, match=r"auto@N"):
            _parse_variants(bad)
    with pytest.raises(Exception, match="write auto@3-2bp"):
        _parse_variants("auto@3")
    with pytest.raises(ValueError, match="memory_limit is for auto only"):
        JobConfig(variants=(Variant("1f1b", True, 2),)).preflight()
    assert main(["train", "--schedule", "1f1b@2", "--quiet"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_memory_capped_auto_trains_the_same_model_in_no_more_saved_memory():
    """auto@1 holds one micro-batch's P2 set per rank at a time: the same losses as 1F1B, and a
    store peak no larger than 1F1B + 2BP's, whose first rank holds several."""
    base = dict(stages=2, steps=2, warmup=0, microbatches=4, batch_size=8, timeout=60.0, quiet=True, out=None)
    res = run_job(JobConfig(**base, variants=(Variant("1f1b", False), Variant("1f1b", True),
                                              Variant("auto", True, 1))))
    plain, split, capped = res
    assert capped.label == "auto@1 +2BP" and capped.memory_limit == 1 and capped.store_empty
    from twobp.train import format_results

    assert "| auto@1 | yes |" in format_results(res)

    assert capped.losses == pytest.approx(plain.losses, rel=1e-5)
    assert all(c <= s for c, s in zip(capped.peak_bytes, split.peak_bytes)), (capped.peak_bytes, split.peak_bytes)
    assert capped.peak_bytes[0] < split.peak_bytes[0], (capped.peak_bytes, split.peak_bytes)


def test_the_realised_gain_of_a_capped_auto_is_measured_against_the_capped_placement():
    """At p = 2, m = 4 with equal costs free auto simulates 1.154x over 1F1B and auto@1 0.750x
    (one micro-batch held per rank serialises the pipeline): the report must use the latter."""
    from twobp.train import VariantResult, realised_gain

    costs = {"F": 1.0, "P1": 1.0, "P2": 1.0, "B": 2.0, "comm": 0.0}

    def r(schedule, twobp, limit=None):
        return VariantResult(schedule, twobp, [1.0], [1.0], 10, "tokens", 0.1, [0], True,
                             costs=costs if twobp else None, memory_limit=limit)

    text = realised_gain([r("1f1b", False), r("auto", True), r("auto", True, 1)],
                         JobConfig(stages=2, microbatches=4))
    lines = text.splitlines()
    assert lines[0].startswith("auto +2BP: simulated 1.154x"), text
    assert lines[1].startswith("auto@1 +2BP: simulated 0.750x"), text


@pytest.mark.parametrize("step_seconds, expected", [
    ([1.0, 1.0, 1.0, 1.0], "within noise of no gain"),  # a short run: 1.00x, the IQR holds 1
    ([1.2, 0.8, 1.1, 0.9], "within noise of no gain"),  # measured 1.0x, spread both ways
    ([0.9, 0.91, 0.9, 0.92], "realises 68% of the simulated gain"),  # 1.105x of a simulated 1.154x
])
def test_the_share_of_the_simulated_gain_is_said_only_where_the_measurement_resolves_it(step_seconds, expected):
    """A measured speedup whose interquartile range holds 1.0 gives no share (a median of 0.99x
    against a simulated 1.001x would read -900%)."""
    from twobp.train import VariantResult, realised_gain

    costs = {"F": 1.0, "P1": 1.0, "P2": 1.0, "B": 2.0, "comm": 0.0}
    base = VariantResult("1f1b", False, [1.0], [1.0] * 4, 10, "tokens", 0.1, [0], True)
    ours = VariantResult("1f1b", True, [1.0], step_seconds, 10, "tokens", 0.1, [0], True, costs=costs)
    text = realised_gain([base, ours], JobConfig(stages=2, microbatches=4))
    assert expected in text, text
    assert "-" not in text.split("measured")[1], text


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_the_run_it_was_saved_from(tmp_path, dtype):
    """3 steps, checkpoint, 3 more from it (on 3 stages instead of 2) give the losses of one
    6-step run: the optimizer state (AdamW moments, bf16's fp32 masters) and the data position
    travel with the weights."""
    base = dict(model="llama", preset="tiny", microbatches=4, batch_size=8, warmup=0, quiet=True, out=None,
                timeout=120.0, dtype=dtype, variants=(Variant("1f1b", True),))
    whole = run_job(JobConfig(stages=2, steps=6, **base))[0].losses
    run_job(JobConfig(stages=2, steps=3, checkpoint=str(tmp_path / "ck"), **base))
    rest = run_job(JobConfig(stages=3, steps=3, resume=str(tmp_path / "ck"), **base))[0].losses
    assert rest == pytest.approx(whole[3:], rel=1e-6), (whole, rest)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_image_batches_take_the_jobs_dtype_and_a_smaller_run_replaces_a_bigger_ones_checkpoint(tmp_path):
    """ResNet under bf16 got fp32 images (its batch source was the fp32 meta model) and failed
    after spawning; a 2-stage checkpoint written over a 3-stage one left stage-2.pt behind,
    whose keys repeated on load."""
    small = dict(microbatches=2, batch_size=4, steps=2, warmup=0, quiet=True, out=None, timeout=120.0,
                 variants=(Variant("1f1b", True),))
    res = run_job(JobConfig(model="resnet", preset="tiny", dtype="bf16", **small))
    assert all(math.isfinite(v) for v in res[0].losses)
    ck = str(tmp_path / "ck")
    run_job(JobConfig(stages=3, checkpoint=ck, **small))
    run_job(JobConfig(stages=2, checkpoint=ck, **small))
    assert sorted(p.name for p in (tmp_path / "ck").glob("stage-*.pt")) == ["stage-0.pt", "stage-1.pt"]
    run_job(JobConfig(stages=2, resume=ck, **small))  # loads: no repeated keys
