"""Hugging Face models as real clients of the split: ALBERT's shared layers and
gradient_checkpointing_enable() (tiny configs, random weights, nothing downloaded)."""

import warnings

import pytest
import torch

import twobp

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    ours = transformers.LlamaForCausalLM(cfg)
    ours.load_state_dict(ref.state_dict())
    return ref, twobp.convert(ours)


def _assert_same_grads(ref, ours):
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_albert_shared_layers_defer_every_call_in_split_mode():
    cfg = transformers.AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=37, max_position_embeddings=20,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ref = transformers.AlbertModel(cfg)
    ours = transformers.AlbertModel(cfg)
    ours.load_state_dict(ref.state_dict())
    ours = twobp.convert(ours)
    ids = torch.randint(0, 50, (2, 9))
    ref(ids).last_hidden_state.square().mean().backward()
    with twobp.split_backward(microbatch=0):
        out = ours(ids).last_hidden_state
    out.square().mean().backward()
    layer = ours.encoder.albert_layer_groups[0].albert_layers[0]
    assert layer.ffn.weight.grad is None, "p1 leaves the shared layer's weights to p2"
    # the one shared layer ran three times: each call is its own entry, all run by p2
    def split_modules(root):
        return {id(m) for m in root.modules() if isinstance(m, twobp.TwoBPModule)
                and any(p.requires_grad for p in m.parameters(recurse=False))}

    in_layer = split_modules(layer)
    outside = split_modules(ours) - in_layer - split_modules(ours.pooler)  # the pooler's output is unused
    assert twobp.backward_p2(ours, microbatches=0) == 3 * len(in_layer) + len(outside)
    _assert_same_grads(ref, ours)


@pytest.mark.parametrize("reentrant", [False, True, None], ids=["non-reentrant", "reentrant", "default"])
def test_gradient_checkpointing_enable_in_split_mode(reentrant):
    ref, ours = _llama()
    ids = torch.randint(0, 64, (2, 9))
    ref(ids, labels=ids).loss.backward()
    kwargs = None if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # HF 5 renames the method
        ours.gradient_checkpointing_enable(**(kwargs or {}))
    ours.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with twobp.split_backward(microbatch=0):
            loss = ours(ids, labels=ids).loss
        loss.backward()
        deferred = twobp.backward_p2(ours, microbatches=0)
    off = [w for w in caught if "use_reentrant=True" in str(w.message)]
    assert twobp.default_store().is_empty()
    if reentrant:
        assert off, "the split silently off under reentrant checkpointing must be said"
        assert deferred == 3, "only the embedding, final norm and lm_head, outside the checkpointed layers, defer"
    else:
        assert not off and deferred >= 7 * 2, "every projection of both layers deferred under checkpointing"
    _assert_same_grads(ref, ours)
