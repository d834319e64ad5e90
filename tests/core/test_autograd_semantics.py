"""Every twin against its torch twin in the autograd features a user combines it with:
double backward, in-place edits, activation checkpointing, shared weights, failed forwards,
weak owners and backward_p2's own contract. Each case failed (or misbehaved silently)
before the fix it tests."""

import gc
import warnings

import pytest
import torch
import torch.utils.checkpoint as ckpt
from torch import nn

import twobp
from twobp.nn.attention import TwoBPAttention

torch.backends.mha.set_fastpath_enabled(False)


def _twins():
    """(name, torch module, twobp module with the same weights, input maker)."""
    torch.manual_seed(0)
    out = []
    lin = nn.Linear(6, 5)
    out.append(("linear", lin, twobp.TwoBPLinear(6, 5), lambda: torch.randn(3, 4, 6)))
    ln = nn.LayerNorm(7)
    out.append(("layernorm", ln, twobp.TwoBPLayerNorm(7), lambda: torch.randn(4, 7) * 2 + 0.5))
    rms = nn.RMSNorm(7, eps=1e-6)
    out.append(("rmsnorm", rms, twobp.TwoBPRMSNorm(7, eps=1e-6), lambda: torch.randn(4, 7)))
    conv = nn.Conv2d(3, 4, 3, padding=1)
    out.append(("conv2d", conv, twobp.TwoBPConv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 5, 5)))
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    out.append(("attention", mha, TwoBPAttention(8, 2), lambda: torch.randn(2, 5, 8)))
    for _, ref, ours, _ in out:
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.3)  # non-default values (norm weights, zero biases)
        ours.load_state_dict(ref.state_dict())
        ref.double()
        ours.double()
    return out


def _call(m, x):
    if isinstance(m, nn.MultiheadAttention):
        return m(x, x, x, need_weights=False)[0]
    return m(x)


@pytest.mark.parametrize("case", range(5), ids=["linear", "layernorm", "rmsnorm", "conv2d", "attention"])
def test_double_backward_equals_torch(case):
    name, ref, ours, make = _twins()[case]
    x0 = make().double()
    grads = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for m in (ref, ours):
        x = x0.clone().requires_grad_()
        # torch's own flash/efficient attention kernels have no double backward: its math one does
        with sdpa_kernel(SDPBackend.MATH):
            gx, = torch.autograd.grad(_call(m, x).square().sum(), x, create_graph=True)
            (gx ** 2).sum().backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}})
    for k, want in grads[0].items():
        got = grads[1][k]
        assert (want is None) == (got is None), f"{name} {k}: torch has {want is not None}, twobp {got is not None}"
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"{name} d/d{k}")


def test_attention_double_backward_outside_math_sdpa_behaves_as_torch():
    """Normal mode runs torch's own SDPA for the attention core (no Python node of ours), so
    without sdpa_kernel(MATH) double backward does what torch's module does, error included."""
    _, ref, ours, make = _twins()[4]
    x0 = make().double()
    outcomes = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_()
        try:
            gx, = torch.autograd.grad(_call(m, x).square().sum(), x, create_graph=True)
            (gx ** 2).sum().backward()
            outcomes.append(("ok", x.grad))
        except RuntimeError as e:
            outcomes.append(("error", str(e).split(" is not implemented")[0]))
    assert outcomes[0][0] == outcomes[1][0], outcomes
    if outcomes[0][0] == "ok":
        torch.testing.assert_close(outcomes[1][1], outcomes[0][1], rtol=1e-9, atol=1e-11)
    else:
        assert outcomes[0][1] == outcomes[1][1]


def test_double_backward_in_a_split_region_names_the_cause():
    m = twobp.TwoBPLinear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        y = m(x)
    with pytest.raises(RuntimeError, match="double backward .create_graph=True. through a twobp.split_backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    twobp.default_store().clear()


@pytest.mark.parametrize("split", [False, True], ids=["normal", "split"])
@pytest.mark.parametrize("case", range(4), ids=["linear", "layernorm", "rmsnorm", "conv2d"])
def test_in_place_weight_edit_before_backward_is_caught(case, split):
    name, ref, ours, make = _twins()[case]
    x = make().double().requires_grad_()
    with (twobp.split_backward(microbatch=0) if split else torch.enable_grad()):
        y = _call(ours, x)
    with torch.no_grad():
        ours.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    twobp.default_store().clear()


def test_optimizer_step_before_p2_is_refused():
    m = twobp.TwoBPLinear(4, 3)
    other = nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    free = torch.optim.SGD(other.parameters(), lr=0.1)
    with twobp.split_backward(microbatch=0):
        y = m(torch.randn(2, 4, requires_grad=True))
    y.sum().backward()
    with pytest.raises(RuntimeError, match=r"p2\) of TwoBPLinear are still pending.*backward_p2\(model\) first"):
        opt.step()
    free.step()  # an optimizer of other parameters is not held up
    twobp.backward_p2(m)
    opt.step()


def test_in_place_weight_edit_between_p1_and_p2_is_caught():
    m = twobp.TwoBPLinear(4, 3)
    with twobp.split_backward(microbatch=0):
        y = m(torch.randn(2, 4, requires_grad=True))
    y.sum().backward()
    with torch.no_grad():
        m.weight.add_(1.0)  # the deferred gradient would belong to the old weight
    with pytest.raises(RuntimeError, match=r"modified in place after its forward .*backward_p2 before stepping"):
        twobp.backward_p2(m)
    twobp.default_store().clear()


def test_gradient_hooks_fire_after_p2_as_under_autograd():
    """Tensor hooks see (and may replace) the gradient p2 adds, summed over a tied use;
    post-accumulate-grad hooks fire once per parameter per p2 call with .grad in place;
    nothing fires at p1."""
    torch.manual_seed(5)
    a, b = twobp.TwoBPLinear(4, 4, bias=False), twobp.TwoBPLinear(4, 4, bias=False)
    b.weight = a.weight  # one parameter, two modules
    ref = nn.Linear(4, 4, bias=False)
    ref.weight.data.copy_(a.weight.data)
    x = torch.randn(3, 4)
    seen = {"tensor": [], "post": []}
    for w in (a.weight, ref.weight):
        w.register_hook(lambda g, tag=w is a.weight: (seen["tensor"].append((tag, g.clone())), g * 3)[1])
        w.register_post_accumulate_grad_hook(lambda p, tag=w is a.weight: seen["post"].append((tag, p.grad.clone())))
    ref(ref(x)).square().sum().backward()
    with twobp.split_backward(microbatch=0):
        y = b(a(x))
    y.square().sum().backward()
    assert [t for t, _ in seen["tensor"]] == [False] and [t for t, _ in seen["post"]] == [False], \
        "p1 must not fire the twobp parameter's hooks"
    twobp.backward_p2(nn.ModuleList([a, b]))
    (_, g_ref), (_, g_ours) = seen["tensor"]
    torch.testing.assert_close(g_ours, g_ref)
    (_, post_ref), (_, post_ours) = seen["post"]
    torch.testing.assert_close(post_ours, post_ref)
    torch.testing.assert_close(a.weight.grad, ref.weight.grad)


def test_ddp_and_fsdp_in_split_mode_raise_and_name_the_alternative():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from twobp.pipeline.launch import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        m = DDP(nn.Sequential(twobp.TwoBPLinear(4, 4)))
        with pytest.raises(NotImplementedError, match=r"DistributedDataParallel.*--dp N"):
            with twobp.split_backward(microbatch=0):
                m(torch.randn(2, 4))
        with pytest.raises(NotImplementedError, match=r"DistributedDataParallel model.*dp_group"):
            twobp.backward_p2(m)
        m(torch.randn(2, 4)).sum().backward()  # outside a split region DDP works as usual
        from torch.distributed.fsdp import fully_shard

        sharded = fully_shard(nn.Sequential(twobp.TwoBPLinear(4, 4)))
        with pytest.raises(NotImplementedError, match=r"FSDP \(fully_shard\).*--dp N"):
            twobp.backward_p2(sharded)
    finally:
        dist.destroy_process_group()
    twobp.default_store().clear()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = twobp.TwoBPRMSNorm(8)
        self.up = twobp.TwoBPLinear(8, 16)
        self.down = twobp.TwoBPLinear(16, 8)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.up(self.norm(x))))


def _blocks(n=3):
    torch.manual_seed(1)
    return nn.ModuleList(_Block() for _ in range(n))


def _run(blocks, x, *, checkpoint=None, split=False):
    def fwd():
        h = x
        for b in blocks:
            h = ckpt.checkpoint(b, h, use_reentrant=checkpoint) if checkpoint is not None else b(h)
        return h.square().mean()

    if split:
        with twobp.split_backward(microbatch=0):
            loss = fwd()
    else:
        loss = fwd()
    loss.backward()
    if split:
        twobp.backward_p2(blocks)
    return {n: p.grad.clone() for n, p in blocks.named_parameters()}


def test_non_reentrant_checkpointing_keeps_the_split_and_recomputes_p1():
    x = torch.randn(4, 8, requires_grad=True)
    want = _run(_blocks(), x)
    blocks = _blocks()
    store = twobp.default_store()
    store.reset_peak()
    got = _run(blocks, x, checkpoint=False, split=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert store.is_empty()
    # the store held p2 sets only (x of each linear and norm, their dy after p1): no
    # second entry was opened by the recomputation
    peak_split = store.peak_bytes
    blocks2 = _blocks()
    store.reset_peak()
    _run(blocks2, x, split=True)
    assert store.peak_bytes == peak_split, "checkpointing must not change what p2 keeps"


def test_reentrant_checkpointing_warns_that_the_split_is_off_and_stays_correct():
    x = torch.randn(4, 8, requires_grad=True)
    want = _run(_blocks(), x)
    with pytest.warns(UserWarning, match="use_reentrant=True"):
        got = _run(_blocks(), x, checkpoint=True, split=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_a_module_run_several_times_under_one_microbatch_accumulates_all_calls():
    torch.manual_seed(2)
    shared = twobp.TwoBPLinear(6, 6)
    ref = nn.Linear(6, 6)
    ref.load_state_dict(shared.state_dict())
    x = torch.randn(3, 6)
    for m, split in ((ref, False), (shared, True)):
        with (twobp.split_backward(microbatch=0) if split else torch.enable_grad()):
            h = x
            for _ in range(3):  # ALBERT-style: one layer's weights, three calls
                h = torch.tanh(m(h))
        h.sum().backward()
    assert twobp.backward_p2(shared, microbatches=0) == 3
    torch.testing.assert_close(shared.weight.grad, ref.weight.grad)
    torch.testing.assert_close(shared.bias.grad, ref.bias.grad)


def test_a_failed_forward_leaves_nothing_behind_and_the_retry_works():
    m = nn.Sequential(twobp.TwoBPLinear(4, 4), nn.Linear(5, 2))  # the second layer's shape is wrong
    with pytest.raises(RuntimeError):
        with twobp.split_backward(microbatch=0):
            m(torch.randn(2, 4))
    assert twobp.default_store().is_empty(), "the entries of the failed forward are rolled back"
    m[1] = nn.Linear(4, 2)
    with twobp.split_backward(microbatch=0):
        m(torch.randn(2, 4)).sum().backward()
    assert twobp.backward_p2(m, microbatches=[0]) == 1


def test_the_store_holds_owners_weakly():
    store = twobp.default_store()
    m = twobp.TwoBPLinear(64, 64)
    with twobp.split_backward(microbatch=0):
        y = m(torch.randn(8, 64, requires_grad=True))
    y.sum().backward()
    assert not store.is_empty()
    del m, y
    gc.collect()
    assert store.is_empty() and store.live_bytes == 0, "a deleted module's pending entries go with it"


def test_an_output_that_never_reaches_the_loss_leaves_no_entry():
    used, unused = twobp.TwoBPLinear(4, 4), twobp.TwoBPLinear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        y = used(x)
        unused(x)  # like an HF pooler whose output the loss ignores
    y.sum().backward()
    assert twobp.backward_p2(nn.ModuleList([used, unused])) == 1
    assert twobp.default_store().is_empty()


def test_backward_p2_takes_an_int_and_says_when_nothing_is_pending():
    m = twobp.TwoBPLinear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="nothing is pending for TwoBPLinear"):
        assert twobp.backward_p2(m) == 0
    with twobp.split_backward(microbatch=5):
        y = m(x)
    with pytest.raises(RuntimeError, match="before its p1"):
        twobp.backward_p2(m)
    y.sum().backward()
    assert twobp.backward_p2(m, microbatches=5) == 1
    with pytest.raises(TypeError, match="microbatches must be an int"):
        twobp.backward_p2(m, microbatches=1.5)
    with pytest.raises(TypeError, match="micro-batch ids must be ints"):
        twobp.backward_p2(m, microbatches=["0"])


def test_second_backward_through_a_split_forward_names_retain_graph():
    m = twobp.TwoBPLinear(4, 3)
    with twobp.split_backward(microbatch=0):
        y = m(torch.randn(2, 4, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True and backward twice"):
        y.sum().backward()
    twobp.default_store().clear()


def test_first_layer_without_input_gradient_still_defers():
    """A split module whose input needs no gradient (raw data into the first layer) must
    still run p1 (its node stays in the graph) so that p2 can run."""
    m = twobp.TwoBPLinear(4, 3)
    ref = nn.Linear(4, 3)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4)
    with twobp.split_backward(microbatch=0):
        y = m(x)
    y.square().sum().backward()
    assert m.weight.grad is None
    twobp.backward_p2(m)
    ref(x).square().sum().backward()
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)


def test_a_module_deleted_before_its_backward_still_passes_dx_on():
    x = torch.randn(3, 4, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        y = twobp.TwoBPLinear(4, 2)(x)  # the module object dies here; its graph lives on
    gc.collect()
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert twobp.default_store().is_empty()
