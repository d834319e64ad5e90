"""Every kernel family compiles for Hopper (sm_90) and Ampere (sm_80), without a GPU.

Triton compiles ahead of time for an explicit target (twobp/benchmarks/aot.py); this runs the
CI subset of the AOT sweep (twobp/benchmarks/aot_cases.py: per kernel and target, the riskiest
config the launchers keep at the model shapes, in one 16-bit dtype and in fp32) in a
subprocess with the interpreter off, and checks what ptxas and the PTX say:

* it compiles;
* bf16/fp16: no spill bytes and no stack frame;
* shared memory within the per-block limit, 227 KB on sm_90 and 163 KB on sm_80;
* on sm_90, every tensor-core kernel uses wgmma, and the TMA GEMMs use TMA
  (cp.async.bulk.tensor) as well;
* conv dW on ResNet's 56x56 maps is pipelined through cp.async.

The full sweep, every config of every list at every model shape, is bench/aot_sweep.py and
its result bench/results/aot-sweep.md; the last test checks that the committed sweep covers,
as clean, every config the launchers keep now (so a config edit without a sweep fails here).
Results are cached by Triton's own cache key under ~/.cache/twobp/aot (TWOBP_AOT_CACHE).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


def _run_report(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run([sys.executable, "-m", "twobp.benchmarks.aot_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=840)


@pytest.fixture(scope="module")
def ci_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "ci.json"
    proc = _run_report(["--ci", "--json", str(out)], out.parent)
    if not out.exists():
        pytest.fail(f"the AOT compile run wrote nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    rows = json.loads(out.read_text())
    assert rows, "the CI subset is empty"
    return rows


def _label(r: dict) -> str:
    return f"{r['family']} {r['kernel']} [{r['case']}] {r['dtype']} {r['target']} {r['config']}"


@pytest.mark.timeout(900)
def test_every_family_compiles_for_both_targets(ci_rows):
    seen = {(r["family"], r["target"]) for r in ci_rows}
    for family in ("linear", "norm", "attention", "conv"):
        for target in ("sm_90", "sm_80"):
            assert (family, target) in seen, f"no {family} compile for {target}"
    assert ("linear_tma", "sm_90") in seen
    failed = [f"{_label(r)}: {r['error'][:300]}" for r in ci_rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {r["dtype"] for r in ci_rows} == {"bf16", "fp16", "fp32"}


def test_16bit_compiles_spill_nothing(ci_rows):
    bad = [f"{_label(r)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B loads, {r['stack']} B stack"
           for r in ci_rows if r["dtype"] != "fp32" and (r["spill_stores"] or r["spill_loads"] or r["stack"])]
    assert not bad, "\n".join(bad)


def test_shared_memory_fits_the_target(ci_rows):
    bad = [f"{_label(r)}: {r['shared']} B > {SHARED_LIMIT[r['target']]} B" for r in ci_rows
           if r["shared"] > SHARED_LIMIT[r["target"]]]
    assert not bad, "\n".join(bad)
    assert any(r["shared"] > 64 * 1024 for r in ci_rows), "no compile used much shared memory: is it measured?"


def test_fp32_ieee_at_head_dim_128_keeps_clean_configs_on_a100(ci_rows):
    """The A100 fp32 attention backward at D = 128 once had no config that fit."""
    rows = [r for r in ci_rows if r["family"] == "attention" and r["dtype"] == "fp32" and r["target"] == "sm_80"
            and "D128" in r["case"] and r["kernel"] in ("bwd dq", "bwd dkdv")]
    assert {r["kernel"] for r in rows} == {"bwd dq", "bwd dkdv"}
    assert all(r["clean"] for r in rows), [(_label(r), r["problems"]) for r in rows]


def test_sm90_tensor_core_kernels_use_wgmma(ci_rows):
    rows = [r for r in ci_rows if r["target"] == "sm_90" and r["tensor_core"]]
    assert len(rows) >= 10
    bad = [_label(r) + (" (mma.sync)" if r["mma_sync"] else "") for r in rows if not r["wgmma"]]
    assert not bad, "\n".join(bad)
    # and sm_80 has no wgmma to offer: its tensor-core kernels use mma.sync
    assert all(r["mma_sync"] and not r["wgmma"] for r in ci_rows
               if r["target"] == "sm_80" and r["tensor_core"]), "sm_80 PTX with wgmma, or without mma.sync"


def test_sm90_linear_gemms_use_tma_and_wgmma(ci_rows):
    rows = [r for r in ci_rows if r["family"] == "linear_tma"]
    kernels = {r["kernel"].split(" ")[0] for r in rows}
    assert kernels == {"fwd", "dx", "dw"}, kernels
    assert any("table" in r["kernel"] for r in rows), "the batched (micro-batch table) dW was not compiled"
    bad = [_label(r) for r in rows if r["dtype"] != "fp32" and not (r["tma"] and r["wgmma"])]
    assert not bad, "no cp.async.bulk.tensor + wgmma in:\n" + "\n".join(bad)
    # the pointer kernels use no TMA: the check above measures something
    assert not any(r["tma"] for r in ci_rows if r["family"] == "linear")


def test_conv_dw_on_large_maps_is_pipelined(ci_rows):
    rows = [r for r in ci_rows if r["family"] == "conv" and r["kernel"] == "dw" and r["dtype"] != "fp32"]
    assert rows
    flat = [r for r in rows if re.search(r"x(56|28)x", r["case"]) and "split" in r["case"]]
    if not flat:
        pytest.skip("the CI pick for conv dW was not a 56x56 or 28x28 map")
    assert all(r["cp_async"] for r in flat), [_label(r) for r in flat if not r["cp_async"]]


@pytest.mark.timeout(300)
def test_committed_sweep_covers_every_kept_config(tmp_path):
    """bench/results/aot-sweep.md must list, as kept and clean, every config the launchers keep
    at the model shapes now: edit a config list, rerun `python bench/aot_sweep.py`."""
    sweep = ROOT / "bench" / "results" / "aot-sweep.md"
    assert sweep.exists(), "bench/results/aot-sweep.md is missing: run python bench/aot_sweep.py"
    out = tmp_path / "kept.json"
    proc = _run_report(["--list-kept", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = json.loads(out.read_text())
    rows = {}
    for line in sweep.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 15 and cells[6] in ("yes", "no") and cells[0] != "family":
            rows[tuple(cells[:6])] = (cells[6], cells[14])
    missing, unclean = [], []
    for k in kept:
        key = (k["family"], k["kernel"], k["case"], k["dtype"], k["target"], k["config"])
        if key not in rows or rows[key][0] != "yes":
            missing.append(" ".join(key))
        elif rows[key][1] != "yes" and not (k["dtype"] == "fp32" and rows[key][1].startswith(("spills", "stack"))):
            unclean.append(" ".join(key) + ": " + rows[key][1])
    assert not missing, f"{len(missing)} kept configs are not in the committed sweep, e.g.\n" + "\n".join(missing[:20])
    assert not unclean, "kept configs the sweep found unclean:\n" + "\n".join(unclean[:20])
