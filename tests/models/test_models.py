"""The models: tiny presets run and split correctly, big presets have the right sizes."""

import copy

import pytest
import torch
from torch import nn

import twobp
import twobp.models as models
from checks import assert_close
from twobp.data import IGNORE_INDEX
from twobp.nn.base import TwoBPModule

NAMES = ["llama", "bert", "resnet"]


def _tiny(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build(name, "tiny", **overrides)


def _batch(model, batch_size, seed=1):
    return model.example_batch(batch_size, generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


# ---- building, running, composing -------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward_backward(name):
    model = _tiny(name)
    x, y = _batch(model, 3)
    out = model(x)
    if name == "resnet":
        assert out.shape == (3, model.config.num_classes)
    else:
        assert out.shape == (3, model.config.seq_len, model.config.vocab_size)
    loss = model.loss_fn(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {n}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: gradient of {n} is zero/non-finite"


@pytest.mark.parametrize("name", NAMES)
def test_blocks_compose_to_the_model(name):
    model = _tiny(name).eval()
    x, _ = _batch(model, 2)
    blocks = model.blocks()
    assert all(isinstance(b, nn.Module) for b in blocks) and len(blocks) >= 3
    z = x
    for b in blocks:
        z = b(z)
        assert isinstance(z, torch.Tensor)
    torch.testing.assert_close(z, model(x), rtol=0, atol=0)
    # every parameter lives in some block; only a tied weight lives in two
    in_blocks = [id(p) for b in blocks for p in b.parameters()]
    assert set(in_blocks) == {id(p) for p in model.parameters()}
    assert len(in_blocks) == len(set(in_blocks)) + (1 if model.tied else 0)


@pytest.mark.parametrize("name", NAMES)
def test_built_from_twobp_modules_no_conversion_needed(name):
    model = _tiny(name)
    for mod_name, m in model.named_modules():
        if next(m.parameters(recurse=False), None) is not None:
            # embeddings (lookups) and BatchNorm are torch's own: their grads run in p1 by design
            assert isinstance(m, (TwoBPModule, nn.Embedding, nn.BatchNorm2d)), f"{mod_name}: {type(m).__name__}"
    convert = pytest.importorskip("twobp.nn.convert").convert
    _, report = convert(copy.deepcopy(model), return_report=True)
    # only the embedding lookups (torch's own in our models) have a twin left to swap in
    assert [to for _, _, to in report.swapped if to != "TwoBPEmbedding"] == []


@pytest.mark.parametrize("name", NAMES)
def test_example_batch_is_deterministic_and_labelled(name):
    model = _tiny(name)
    x1, y1 = _batch(model, 4, seed=7)
    x2, y2 = _batch(model, 4, seed=7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, _batch(model, 4, seed=8)[0])
    if name == "llama":
        torch.testing.assert_close(x1[:, 1:], y1[:, :-1])
    if name == "bert":
        masked = y1 != IGNORE_INDEX
        k = round(model.config.mask_prob * model.config.seq_len)
        assert (masked.sum(1) == k).all()
        assert (x1[masked] == model.config.mask_token_id).all()


# ---- split mode -------------------------------------------------------------------------

def _split_params(model):
    """Parameters whose dW must wait for p2: owned by twobp modules, not shared with a lookup."""
    early = {id(p) for m in model.modules() if not isinstance(m, TwoBPModule) for p in m.parameters(recurse=False)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in early]


@pytest.mark.parametrize("name", NAMES)
def test_split_mode_matches_normal_mode(name):
    model = _tiny(name)
    twin = copy.deepcopy(model)
    x, y = _batch(model, 3)
    with twobp.use_backend("torch"):
        model.loss_fn(model(x), y).backward()
        with twobp.split_backward(microbatch=0):
            loss = twin.loss_fn(twin(x), y)
        loss.backward()  # p1 only
        waiting = _split_params(twin)
        assert waiting and all(p.grad is None for _, p in waiting), "p1 touched a deferred weight gradient"
        if name == "resnet":  # BatchNorm's gamma/beta: autograd, in p1
            assert twin.stem.bn.weight.grad is not None
        assert twobp.backward_p2(twin) > 0
    assert twobp.default_store().is_empty()
    expected = _grads(model)
    for n, g in _grads(twin).items():
        assert_close(g, expected[n].double(), torch.float32, name=f"{name}.{n}.grad")


@pytest.mark.parametrize("name", NAMES)
def test_microbatches_in_split_mode_match_one_batch(name):
    """Two micro-batches (loss / 2 each), p2 batched over both == the whole batch at once.

    The ResNet runs in eval mode: in train mode BatchNorm's statistics depend on the
    micro-batch (see twobp.models.resnet).
    """
    model = _tiny(name)
    if name == "resnet":
        model.eval()
    twin = copy.deepcopy(model)
    x, y = _batch(model, 4)
    with twobp.use_backend("torch"):
        model.loss_fn(model(x), y).backward()
        for mb, (xm, ym) in enumerate(zip(x.chunk(2), y.chunk(2))):
            with twobp.split_backward(microbatch=mb):
                loss = twin.loss_fn(twin(xm), ym) / 2
            loss.backward()
        assert twobp.pending_microbatches(twin) == [0, 1]
        twobp.backward_p2(twin, batched=True)
    assert twobp.default_store().is_empty()
    expected = _grads(model)
    for n, g in _grads(twin).items():
        assert_close(g, expected[n].double(), torch.float32, name=f"{name}.{n}.grad")


MICRO = {  # one block of each, small enough for Triton's interpreter (about 1 s each)
    "llama": dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, seq_len=16, vocab_size=64),
    "bert": dict(dim=32, n_layers=1, n_heads=2, ffn_dim=48, seq_len=16, vocab_size=64),
    "resnet": dict(layers=(1, 1), width=4, image_size=8, num_classes=5),
}


@pytest.mark.parametrize("name", NAMES)
def test_split_mode_on_the_triton_kernels_matches_torch(name):
    """The same model on the Triton kernels (interpreter), split, against the torch reference, whole."""
    model = _tiny(name, **MICRO[name])
    twin = copy.deepcopy(model)
    x, y = _batch(model, 2)
    with twobp.use_backend("torch"):
        model.loss_fn(model(x), y).backward()
    with twobp.use_backend("triton"):
        with twobp.split_backward(microbatch=0):
            loss = twin.loss_fn(twin(x), y)
        loss.backward()
        twobp.backward_p2(twin)
    assert twobp.default_store().is_empty()
    expected = _grads(model)
    for n, g in _grads(twin).items():
        assert_close(g, expected[n].double(), torch.float32, name=f"{name}.{n}.grad")


# ---- tying ------------------------------------------------------------------------------

def test_tied_head_shares_the_embedding_parameter():
    untied = _tiny("llama")
    assert not untied.tied and untied.shared_parameters() == {}
    tied = _tiny("llama", tie_embeddings=True)
    assert tied.tied
    assert tied.head.proj.weight is tied.embed.weight
    last = len(tied.blocks()) - 1
    assert tied.shared_parameters() == {"0.weight": [0, last]}
    c = tied.config
    assert tied.num_parameters() == untied.num_parameters() - c.vocab_size * c.dim
    assert tied.flops_per_sample() == untied.flops_per_sample()  # the head's matmul is still there
    bert = _tiny("bert")
    assert bert.tied and bert.head.decoder.weight is bert.embeddings.tok.weight
    # a tied weight gets both gradients: lookup's (p1) plus head's (p2)
    x, y = _batch(tied, 2)
    ref = copy.deepcopy(tied)
    with twobp.use_backend("torch"):
        ref.loss_fn(ref(x), y).backward()
        with twobp.split_backward(microbatch=0):
            loss = tied.loss_fn(tied(x), y)
        loss.backward()
        twobp.backward_p2(tied)
    assert_close(tied.embed.weight.grad, ref.embed.weight.grad.double(), torch.float32, name="tied grad")


# ---- sizes and FLOPs --------------------------------------------------------------------

def _llama_params(c):
    kv = c.n_kv_heads * c.head_dim
    attn = 2 * c.dim * c.dim + 2 * c.dim * kv  # q, o; k, v (no biases)
    layer = attn + 3 * c.dim * c.ffn_dim + 2 * c.dim  # + SwiGLU + two RMSNorm weights
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + c.n_layers * layer + c.dim + head


def _bert_params(c):
    d, f, v = c.dim, c.ffn_dim, c.vocab_size
    embeddings = v * d + c.seq_len * d + 2 * d
    layer = (4 * d * d + 4 * d) + 2 * d + (2 * d * f + f + d) + 2 * d
    head = (d * d + d) + 2 * d + (0 if c.tie_embeddings else v * d) + v
    return embeddings + c.n_layers * layer + head


def _resnet_params(c):
    total = c.in_channels * c.width * (49 if c.stem == "imagenet" else 9) + 2 * c.width
    in_ch = c.width
    for stage, n in enumerate(c.layers):
        mid = c.width * 2**stage
        out = 4 * mid
        for i in range(n):
            total += in_ch * mid + 9 * mid * mid + mid * out + 2 * (mid + mid + out)  # convs + BNs
            if i == 0 and (stage > 0 or in_ch != out):
                total += in_ch * out + 2 * out  # projection shortcut + BN
            in_ch = out
    return total + in_ch * c.num_classes + c.num_classes


@pytest.mark.parametrize("name, preset, formula, known", [
    ("llama", "7b", _llama_params, 6_738_415_616),  # LLaMa-7B
    ("llama", "1b", _llama_params, 1_100_048_384),  # TinyLlama-1.1B
    ("llama", "tiny", _llama_params, None),
    ("bert", "large", _bert_params, None),
    ("bert", "base", _bert_params, None),
    ("bert", "tiny", _bert_params, None),
    ("resnet", "152", _resnet_params, 60_192_808),  # torchvision resnet152
    ("resnet", "50", _resnet_params, 25_557_032),  # torchvision resnet50
    ("resnet", "tiny", _resnet_params, None),
])
def test_parameter_count_matches_formula_without_allocating(name, preset, formula, known):
    model = models.build(name, preset, device="meta")
    assert all(p.is_meta for p in model.parameters())
    n = model.num_parameters()
    assert n == formula(model.config)
    if known is not None:
        assert n == known


def test_bert_untied_head_adds_the_decoder():
    tied = models.build("bert", "large", device="meta")
    untied = models.build("bert", "large", device="meta", tie_embeddings=False)
    assert untied.num_parameters() == _bert_params(untied.config) == tied.num_parameters() + 30522 * 1024


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_transformer_flops_match_the_formula(name):
    model = _tiny(name)
    c = model.config
    lookup = c.vocab_size * c.dim if not c.tie_embeddings else 0
    if name == "bert":
        lookup += c.seq_len * c.dim  # learned positions: a lookup too
    n_matmul = model.num_parameters() - lookup
    expected = 6 * n_matmul * c.seq_len + 12 * c.n_layers * c.seq_len**2 * c.dim
    assert model.flops_per_sample() == expected > 0


def test_resnet_flops_match_the_layer_shapes():
    """Multiply-adds counted from the real output shapes of every conv and linear."""
    model = _tiny("resnet").eval()
    counted = []

    def hook(m, inp, out):
        if isinstance(m, nn.Linear):
            per_output = m.in_features
        else:
            per_output = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        counted.append(out[0].numel() * per_output)  # one image

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(_batch(model, 1)[0])
    assert model.forward_macs() == sum(counted)
    assert model.flops_per_sample() == 6 * sum(counted) > 0
    # ResNet-50 at 224x224: 4.09 G multiply-adds, the figure torchvision quotes
    assert models.build("resnet", "50", device="meta").forward_macs() == pytest.approx(4.09e9, rel=2e-3)


def test_every_preset_builds_on_meta():
    for name in models.model_names():
        sizes = []
        for preset in models.presets(name):
            model = models.build(name, preset, device="meta")
            assert model.flops_per_sample() > 0
            sizes.append(model.num_parameters())
        assert sizes == sorted(sizes), f"{name} presets are not smallest first: {sizes}"


# ---- configs and the registry -----------------------------------------------------------

@pytest.mark.parametrize("name, overrides, field", [
    ("llama", dict(dim=65), "dim"),
    ("llama", dict(n_kv_heads=3), "n_kv_heads"),
    ("llama", dict(dim=60, n_heads=4, n_kv_heads=2), "head dim"),  # 15: odd, no RoPE
    ("llama", dict(n_layers=0), "n_layers"),
    ("bert", dict(mask_token_id=256), "mask_token_id"),
    ("bert", dict(n_heads=5), "n_heads"),
    ("resnet", dict(layers=(2, 0)), "layers"),
    ("resnet", dict(stem="tiny"), "stem"),
    ("resnet", dict(width=True), "width"),
])
def test_config_errors_name_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=field):
        models.build(name, "tiny", device="meta", **overrides)


def test_registry_errors_and_overrides():
    with pytest.raises(ValueError, match="known: llama, bert, resnet"):
        models.build("gpt", "tiny")
    with pytest.raises(ValueError, match="unknown preset '3b'"):
        models.build("llama", "3b")
    with pytest.raises(ValueError, match="no field"):
        models.build("llama", "tiny", hidden=3)
    assert models.presets("llama") == ["tiny", "small", "1b", "7b"]
    m = models.build("llama", "tiny", device="meta", n_layers=2)
    assert m.config.n_layers == 2 and len(m.blocks()) == 4


def test_loss_fn_checks_shapes():
    out = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match="target of shape"):
        models.TwoBPModel.loss_fn(out, torch.zeros(2, 7, dtype=torch.long))


def test_per_rank_construction_allocates_only_its_share():
    """A 4-stage LLaMa-7B cut (on the meta device): every rank within 10% of a quarter of the
    parameters. build_blocks allocates exactly its blocks' parameters (counted on a real,
    smaller model), with values equal to the whole model built with the same seed."""
    from twobp.pipeline.partition import balance

    meta = models.build("llama", "7b", device="meta")
    total = meta.num_parameters()
    part = balance(len(meta.blocks()), 4)
    for r in range(4):
        own = sum(p.numel() for i in part.blocks_of(r) for p in meta.blocks()[i].parameters())
        assert abs(own - total / 4) <= 0.10 * total / 4, f"rank {r}: {own / 1e9:.2f} B of {total / 1e9:.2f} B"
    whole = models.build("llama", "tiny", seed=11)
    part = balance(len(whole.blocks()), 4)
    seen = 0
    for r in range(4):
        mine = list(part.blocks_of(r))
        rank_model = models.build_blocks("llama", "tiny", blocks=mine, seed=11)
        real = [p for p in rank_model.parameters() if not p.is_meta]
        assert sum(p.numel() for p in real) == sum(p.numel() for i in mine for p in whole.blocks()[i].parameters())
        for i in mine:
            for (name, a), b in zip(whole.blocks()[i].state_dict().items(), rank_model.blocks()[i].state_dict().values()):
                assert torch.equal(a, b), f"block {i} {name} differs from the whole model's"
        seen += sum(p.numel() for p in real)
    assert seen == whole.num_parameters()
    with pytest.raises(ValueError, match="has blocks 0..5"):
        models.build_blocks("llama", "tiny", blocks=[9], seed=0)
