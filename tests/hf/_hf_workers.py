"""Workers for the Hugging Face pipeline test (imported by spawned children: no pytest, no work
at import time). Tiny configs, random weights from a seed, nothing downloaded."""

from __future__ import annotations

import torch
from torch import nn

import twobp
import twobp.hf
from twobp.pipeline import PipelineExecutor, make_schedule

ROWS, SEQ, V = 8, 9, 48


def build(name: str, seed: int) -> nn.Module:
    import transformers as T

    if name == "llama":
        cfg = T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        cls = T.LlamaForCausalLM
    else:
        cfg = T.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=32, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        cls = T.BertForMaskedLM
    torch.manual_seed(seed)
    return twobp.convert(cls(cfg).train())


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, V, (ROWS, SEQ), generator=g)
    return ids, torch.randint(0, V, (ROWS, SEQ), generator=g)  # MLM labels: every position counts


def reference(name: str, seed: int) -> dict:
    """One process: the blocks composed, the full batch."""
    model = build(name, seed)
    seq = nn.Sequential(*twobp.hf.pipeline_blocks(model))
    ids, labels = batch(seed)
    loss = twobp.hf.loss_for(model)(seq(ids), ids if name == "llama" else labels)
    loss.backward()
    return {"loss": float(loss.detach()), "grads": {k: p.grad.clone() for k, p in seq.named_parameters(remove_duplicate=False)}}


def run(rank: int, world: int, cases: list[tuple], seed: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    for case in cases:
        name, schedule, use_2bp, chunks = case
        model = build(name, seed)
        sched = make_schedule(schedule, stages=world, microbatches=4, twobp=use_2bp, chunks=chunks)
        ex = PipelineExecutor(twobp.hf.pipeline_blocks(model), twobp.hf.loss_for(model), schedule=sched, timeout=60)
        ids, labels = batch(seed)
        res = ex.step(ids, ids if name == "llama" else labels, measure=False)
        grads = {k: p.grad.clone() for s in ex.stages.values()
                 for k, p in s.named_parameters(remove_duplicate=False) if p.grad is not None}
        out[case] = {"loss": res.loss, "grads": grads, "peak": res.peak_store_bytes,
                     "empty": res.store_empty and ex.store.is_empty()}
    return out
