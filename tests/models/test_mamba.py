"""The Mamba model: sizes, init, blocks, and its split (every block gradient deferred to p2)."""

import copy
import math

import pytest
import torch
from torch import nn

import twobp
import twobp.models as models
from checks import assert_close
from twobp.nn.base import TwoBPModule
from twobp.nn.causal_conv1d import TwoBPCausalConv1d
from twobp.nn.mamba_scan import TwoBPSelectiveScan

# one block, small enough for Triton's interpreter; L = 21 crosses a scan chunk of 16
MICRO = dict(d_model=8, n_layers=1, d_state=4, seq_len=21, vocab_size=64, scan_chunk=16)


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build("mamba", "tiny", **overrides)


def _batch(model, batch_size, seed=1):
    return model.example_batch(batch_size, generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


# ---- sizes ------------------------------------------------------------------------------

def test_presets_have_mamba_sizes():
    """Parameter counts of the Mamba paper's family (Gu and Dao 2023, table 12: 130M .. 1.4B),
    with the tied, padded 50280-row embedding."""
    counts = {p: models.build("mamba", p, device="meta").num_parameters() for p in ("130m", "370m", "790m", "1.4b")}
    assert counts == {"130m": 129_135_360, "370m": 371_516_416, "790m": 793_204_224, "1.4b": 1_372_178_432}
    big = models.build("mamba", "1.4b", device="meta")
    c = big.config
    assert (c.d_model, c.n_layers, c.d_state, c.expand, c.d_conv, c.dt_rank) == (2048, 48, 16, 2, 4, 128)
    assert c.padded_vocab == 50280 and big.embed.weight.shape == (50280, 2048) and big.tied
    layer = big.layers[0].mixer
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"in_proj.weight": (8192, 2048), "conv1d.weight": (4096, 1, 4), "conv1d.bias": (4096,),
                      "x_proj.weight": (160, 4096), "dt_proj.weight": (4096, 128), "dt_proj.bias": (4096,),
                      "scan.A_log": (4096, 16), "scan.D": (4096,), "out_proj.weight": (2048, 4096)}
    # FLOPs: 6 per matmul weight per token (the tied head once) + scan and conv per layer
    mm = 48 * (2048 * 8192 + 4096 * 160 + 128 * 4096 + 4096 * 2048) + 50280 * 2048
    assert big.flops_per_sample() == 6 * mm * 1024 + 48 * 3 * (7 * 4096 * 16 + 2 * 4 * 4096) * 1024


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="scan_chunk"):
        models.config("mamba", "tiny", scan_chunk=20)
    with pytest.raises(ValueError, match="d_state"):
        models.config("mamba", "tiny", d_state=0)
    with pytest.raises(ValueError, match="dt_min"):
        models.config("mamba", "tiny", dt_min=0.5, dt_max=0.1)


# ---- building, init, composing ----------------------------------------------------------

def test_init_rule_and_seeded_blocks():
    model = models.build("mamba", "tiny", seed=3)
    c = model.config
    mixer = model.layers[1].mixer
    assert torch.equal(mixer.scan.A_log, torch.log(torch.arange(1.0, c.d_state + 1)).expand(c.d_inner, -1))
    assert torch.equal(mixer.scan.D, torch.ones(c.d_inner))
    dt = nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= c.dt_init_floor * 0.999 and dt.max() <= c.dt_max * 1.001 and dt.max() > 10 * dt.min()
    assert mixer.dt_proj.weight.abs().max() <= c.dt_rank ** -0.5
    assert mixer.in_proj.weight.abs().max() <= 1 / math.sqrt(c.d_model)
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(c.d_inner * c.n_layers)
    assert mixer.conv1d.weight.abs().max() <= 1 / math.sqrt(c.d_conv)
    assert 0.015 < model.embed.weight.std() < 0.025 and model.head.proj.weight is model.embed.weight
    part = models.build_blocks("mamba", "tiny", blocks=[2], seed=3)
    for (n, p), (_, q) in zip(model.layers[1].named_parameters(), part.layers[1].named_parameters()):
        assert torch.equal(p, q), n
    assert part.layers[0].mixer.in_proj.weight.is_meta


def test_blocks_compose_and_every_parameter_is_in_a_twobp_module():
    model = _tiny().eval()
    x, y = _batch(model, 2)
    z = x
    for block in model.blocks():
        z = block(z)
    torch.testing.assert_close(z, model(x), rtol=0, atol=0)
    assert z.shape == (2, model.config.seq_len, model.config.padded_vocab)
    for name, m in model.named_modules():
        if next(m.parameters(recurse=False), None) is not None:
            assert isinstance(m, TwoBPModule), f"{name}: {type(m).__name__}"
    assert model.shared_parameters() == {"0.weight": [0, len(model.blocks()) - 1]}


# ---- split mode -------------------------------------------------------------------------

@pytest.mark.parametrize("dparams_in_p1", [False, True], ids=["p2-recomputes", "p1-partials"])
def test_split_defers_every_block_gradient_and_matches_normal_mode(dparams_in_p1):
    model = _tiny(scan_dparams_in_p1=dparams_in_p1)
    twin = copy.deepcopy(model)
    x, y = _batch(model, 4)
    with twobp.use_backend("torch"):
        model.loss_fn(model(x), y).backward()
        for mb, (xm, ym) in enumerate(zip(x.chunk(2), y.chunk(2))):
            with twobp.split_backward(microbatch=mb):
                loss = twin.loss_fn(twin(xm), ym) / 2
            loss.backward()  # p1 only
        early = [n for n, p in twin.named_parameters() if p.grad is not None]
        assert early == [], f"gradients written in p1: {early}"  # everything, the tied embedding too, waits
        assert twobp.pending_microbatches(twin) == [0, 1]
        twobp.backward_p2(twin, batched=True)
    assert twobp.default_store().is_empty()
    expected = _grads(model)
    for n, g in _grads(twin).items():
        assert_close(g, expected[n].double(), torch.float32, name=f"mamba.{n}.grad")


def test_split_on_the_triton_kernels_matches_torch():
    """One block on the Triton kernels (interpreter), split, against the torch reference, whole."""
    model = _tiny(**MICRO)
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
        assert_close(g, expected[n].double(), torch.float32, name=f"mamba.{n}.grad")


def test_scan_keeps_only_boundary_states_until_p2_when_p2_recomputes():
    """scan_dparams_in_p1=False: the scan's store entry holds u, Δ, B/C (x_proj's output), dy and
    H [b, ceil(L/chunk)-1, E, N] until p2 walks time again."""
    model = _tiny(scan_dparams_in_p1=False)  # seq 64, chunk 32: one boundary state
    x, _ = _batch(model, 2)
    scan = model.layers[0].mixer.scan
    with twobp.split_backward(microbatch=0):
        out = model(x)
    entry = next(e for e in twobp.default_store().entries([scan], None))
    H = entry.p2["H"]
    c = model.config
    assert H.shape == (2, 1, c.d_inner, c.d_state) and H.dtype == torch.float32
    assert set(entry.p2) == {"u", "delta", "B", "C", "H", "A_log"}
    out.sum().backward()
    twobp.backward_p2(model)


def test_scan_keeps_only_fp32_partials_between_p1_and_p2_by_default():
    """The default (scan_dparams_in_p1): the forward parks nothing for the scan's p2; p1's walk
    leaves dA_log [E, N] and dD [E] partials in fp32, and p2 adds them into .grad."""
    model = _tiny()
    assert model.config.scan_dparams_in_p1
    x, _ = _batch(model, 2)
    scan = model.layers[0].mixer.scan
    with twobp.split_backward(microbatch=0):
        out = model(x)
    (entry,) = twobp.default_store().entries([scan], None)
    assert dict(entry.p2) == {}
    out.sum().backward()
    (entry,) = twobp.default_store().entries([scan], None)
    c = model.config
    assert {k: (tuple(v.shape), v.dtype) for k, v in entry.p2.items()} == {
        "dA_log": ((c.d_inner, c.d_state), torch.float32), "dD": ((c.d_inner,), torch.float32)}
    assert scan.A_log.grad is None and scan.D.grad is None  # deferred: nothing in .grad before p2
    twobp.backward_p2(model)
    assert scan.A_log.grad is not None and scan.D.grad is not None


# ---- the modules --------------------------------------------------------------------------

def test_causal_conv1d_is_nn_conv1d_cut_to_causal():
    torch.manual_seed(0)
    conv = TwoBPCausalConv1d(6, 4)
    ref = nn.Conv1d(6, 6, 4, groups=6, padding=3)
    assert [(n, p.shape) for n, p in conv.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 9, 6, requires_grad=True)
    y = conv(x)
    torch.testing.assert_close(y, ref(x.transpose(1, 2))[..., :9].transpose(1, 2))
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)  # double backward: a differentiable recompute
    (gx_ref,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    assert gx.requires_grad and torch.equal(gx, gx_ref)
    with pytest.raises(ValueError, match="channels-last"):
        conv(torch.randn(2, 6, 9))


def test_selective_scan_module_double_backward_and_dtype_casts():
    torch.manual_seed(0)
    scan = TwoBPSelectiveScan(5, 3, chunk=16).double()
    u = torch.randn(1, 7, 5, dtype=torch.float64, requires_grad=True)
    delta = nn.functional.softplus(torch.randn(1, 7, 5, dtype=torch.float64)).requires_grad_()
    B, C = torch.randn(1, 7, 3, dtype=torch.float64), torch.randn(1, 7, 3, dtype=torch.float64)
    A_log = scan.A_log.detach().clone().requires_grad_()
    D = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(u, d, a, dd):
        return torch.func.functional_call(scan, {"A_log": a, "D": dd}, (u, d, B, C))

    assert torch.autograd.gradcheck(f, (u, delta, A_log, D))  # the fused backward: all six gradients
    assert torch.autograd.gradgradcheck(f, (u, delta, A_log, D))
    y = scan(u.float(), delta, B, C.float())  # Δ, B in fp64 are cast to u's dtype
    assert y.dtype == torch.float32
    assert "chunk=16" in repr(scan)
