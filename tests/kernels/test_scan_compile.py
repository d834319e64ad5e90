"""The selective-scan, causal-conv1d and embedding-dW kernels compile for Hopper and Ampere without a GPU.

A subprocess with the interpreter off compiles each kernel at the launchers' GPU configs
(_compile_mamba_kernels.py; sm_90 in fp16 and bf16, sm_80 in bf16, d_state 16): it must
compile, spill nothing and need no stack frame. ``python tests/kernels/_compile_mamba_kernels.py
sm_90:fp32 N=64`` (TRITON_INTERPRET=0) reports fp32 and d_state 64 as well: no spills there either
when this was written.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def rows():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "_compile_mamba_kernels.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"the compile run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(660)
def test_every_kernel_compiles_for_sm90_and_sm80(rows):
    failed = [f"{r['kernel']} {r['target']} {r['dtype']}: {r.get('error')}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {(r["target"], r["dtype"]) for r in rows} == {("sm_90", "fp16"), ("sm_90", "bf16"), ("sm_80", "bf16")}
    assert len({r["kernel"] for r in rows}) == 9


def test_16bit_compiles_spill_nothing(rows):
    bad = [f"{r['kernel']} {r['target']} {r['dtype']}: {r['spill_stores']} B spill stores, {r['stack']} B stack"
           for r in rows if r["ok"] and (r["spill_stores"] or r["spill_loads"] or r["stack"])]
    assert not bad, "\n".join(bad)
    assert all(r["registers"] > 0 for r in rows if r["ok"]), "no ptxas log captured"
