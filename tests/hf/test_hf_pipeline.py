"""Hugging Face models pipelined with twobp.hf.pipeline_blocks: the blocks compose to the model's
own forward (every ready family), and an HF Llama and an HF BERT over 2 gloo ranks, for every
schedule with and without 2BP, give one process's loss and gradients (tied weights included)."""

import sys
from pathlib import Path

import pytest
import torch

import twobp
import twobp.hf
from twobp.pipeline import SCHEDULE_NAMES, spawn

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import _hf_workers as W  # noqa: E402
from test_hf_families import _tiny  # noqa: E402

SEED = 3


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma", "phi", "gpt-neox", "gpt2", "bert",
                                  "roberta"])
def test_blocks_compose_to_the_model(name):
    """Embedding, layers (positions, rotary, causal / sliding-window mask built per block), head:
    the composition is the model's logits, and loss_for(model) its labels= loss."""
    cls, cfg, inputs = _tiny(name)
    torch.manual_seed(0)
    model = twobp.convert(cls(cfg).train())
    blocks = twobp.hf.pipeline_blocks(model)
    assert len(blocks) == cfg.num_hidden_layers + 2
    batch = inputs(torch.Generator().manual_seed(1))
    h = batch["input_ids"]
    for b in blocks:
        h = b(h)
    torch.testing.assert_close(h, model(input_ids=batch["input_ids"]).logits, rtol=0, atol=0)
    torch.testing.assert_close(twobp.hf.loss_for(model)(h, batch["labels"]), model(**batch).loss)


def test_unknown_models_are_refused_with_the_fix():
    cls, cfg, _ = _tiny("t5")
    with pytest.raises(NotImplementedError, match="twobp.pipeline.pipeline_blocks"):
        twobp.hf.pipeline_blocks(cls(cfg))
    with pytest.raises(ValueError, match="neither a config.json path nor a transformers model type"):
        twobp.hf.load_config("no-such-model-type")
    with pytest.raises(ValueError, match="has no field 'hiden_size'"):
        twobp.hf.load_config("llama:hiden_size=8")


def _cases():
    return [(model, name, use_2bp, 2 if name == "interleaved-1f1b" else 1)
            for model in ("llama", "bert") for name in SCHEDULE_NAMES for use_2bp in (False, True)
            if use_2bp or name not in ("zb-h1", "auto")]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_llama_and_bert_over_two_gloo_ranks_equal_one_process():
    cases = _cases()
    per_rank = spawn(W.run, world_size=2, args=(cases, SEED), timeout=60, join_timeout=400,
                     env={"OMP_NUM_THREADS": "1"})
    refs = {name: W.reference(name, SEED) for name in ("llama", "bert")}
    for case in cases:
        ref = refs[case[0]]
        got = [r[case] for r in per_rank]
        for r, g in enumerate(got):
            assert g["loss"] == pytest.approx(ref["loss"], rel=1e-6), (case, r)
            assert g["empty"], f"{case}: rank {r} left saved activations"
            assert (g["peak"] > 0) == case[2], f"{case}: rank {r}'s store {'un' if case[2] else ''}used"
        grads = {}
        for g in got:
            grads.update(g["grads"])
        assert set(grads) == set(ref["grads"]), case
        for k, want in ref["grads"].items():
            torch.testing.assert_close(grads[k], want, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{case} [{k}]: {m}")
