"""twobp train/compare --hf-config: a Hugging Face model from a local config (a config.json or a
model type name with overrides), random weights, nothing downloaded; errors before any rank starts."""

import json

import pytest

from twobp.cli import main
from twobp.train import JobConfig

transformers = pytest.importorskip("transformers")

TINY = ("llama:vocab_size=256,hidden_size=32,intermediate_size=48,num_hidden_layers=2,num_attention_heads=4,"
        "num_key_value_heads=2,max_position_embeddings=16")


def test_preflight_names_the_fix_before_spawning():
    with pytest.raises(ValueError, match="--hf-config nope: .*neither a config.json path"):
        JobConfig(hf_config="nope").preflight()
    with pytest.raises(ValueError, match="fewer than --stages x --chunks"):
        JobConfig(hf_config=TINY, stages=2, chunks=3).preflight()
    with pytest.raises(ValueError, match="no ready splitter for model_type='t5'"):
        JobConfig(hf_config="t5:num_layers=1").preflight()
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        JobConfig(hf_config=TINY, tie_embeddings=True).preflight()
    with pytest.raises(ValueError, match=r"LlamaConfig.hidden_size refuses 'abc' .*give it a value of the field's type"):
        JobConfig(hf_config="llama:hidden_size=abc").preflight()  # transformers' own validation error, named


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_trains_a_config_json_and_the_schedules_agree(tmp_path, capsys):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    cfg.save_pretrained(tmp_path / "bert")
    out = tmp_path / "out"
    rc = main(["compare", "--hf-config", str(tmp_path / "bert"), "--stages", "2", "--schedules", "1f1b,1f1b-2bp",
               "--steps", "3", "--warmup", "1", "--batch-size", "4", "--microbatches", "2", "--no-overlap-steps",
               "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "hf:" in text and "losses agree across schedules: yes" in text
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["twobp"] for r in rows] == [False, True]
    assert rows[1]["peak_bytes"] > 0 and rows[0]["peak_bytes"] == 0, "2BP deferred into the store; plain did not"
    assert all(r["store_empty"] for r in rows)
