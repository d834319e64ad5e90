"""The README's "Any model" example, run exactly as written (a fresh interpreter, 2 spawned ranks)."""

import subprocess
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLE = """\
import torch, transformers, twobp, twobp.hf
from twobp.pipeline import PipelineExecutor, make_schedule, spawn


def train(rank, world):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)  # every rank builds the same weights
    model, report = twobp.convert(transformers.LlamaForCausalLM(cfg), return_report=True)
    ex = PipelineExecutor(twobp.hf.pipeline_blocks(model), twobp.hf.causal_lm_loss,
                          schedule=make_schedule("1f1b", stages=world, microbatches=4, twobp=True))
    opt = torch.optim.AdamW(ex.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    losses = [ex.step(ids, ids, optimizer=opt).loss for _ in range(3)]  # labels = ids, shifted inside
    return f"{report.deferred_share:.1%} of weights deferred; losses {[round(l, 4) for l in losses]}"


if __name__ == "__main__":
    print(spawn(train, world_size=2)[0])
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_readme_hf_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(EXAMPLE)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "100.0% of weights deferred; losses [" in done.stdout, done.stdout
