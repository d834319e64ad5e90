"""Split mode composed with what a user may change between a forward, its p1 and its p2:
parameters frozen, unfrozen or replaced per micro-batch, a reused gradient buffer, computed
(non-leaf) weights, torch.func transforms and forward-mode AD, and backwards restricted to
the parameters. Each case was silently wrong, lost a gradient, or failed with an error that
did not name the cause, before the fix it tests; the reference is torch autograd in float64."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import twobp


def _linear_pair(seed: int = 0):
    torch.manual_seed(seed)
    ref = nn.Linear(6, 5).double()
    return ref, twobp.convert(copy.deepcopy(ref))


def _inputs(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, dtype=torch.float64, generator=g) for _ in range(n)]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("frozen_first", [False, True], ids=["mb1-frozen", "mb0-frozen"])
def test_p2_gives_each_microbatch_the_flags_its_forward_saw(batched, frozen_first):
    ref, ours = _linear_pair()
    xs = _inputs(2)
    outs_ref, outs_ours = [], []
    for i, x in enumerate(xs):
        frozen = (i == 0) == frozen_first
        for m in (ref, ours):
            m.weight.requires_grad_(not frozen)
        outs_ref.append(ref(x).pow(2).sum())
        with twobp.split_backward(microbatch=i):
            outs_ours.append(ours(x).pow(2).sum())
    for m in (ref, ours):
        m.weight.requires_grad_(True)  # unfrozen again before any backward
    for a, b in zip(outs_ref, outs_ours):
        a.backward()
        b.backward()
    twobp.backward_p2(ours, batched=batched)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)


def test_a_parameter_replaced_between_microbatches_gets_the_gradient_of_its_own_forwards():
    ref, ours = _linear_pair()
    x0, x1 = _inputs(2)
    old_ref, old_ours = ref.weight, ours.weight
    with twobp.split_backward(microbatch=0):
        l0 = ours(x0).pow(2).sum()
    r0 = ref(x0).pow(2).sum()
    new = torch.randn(5, 6, dtype=torch.float64)
    ref.weight, ours.weight = nn.Parameter(new.clone()), nn.Parameter(new.clone())
    with twobp.split_backward(microbatch=1):
        l1 = ours(x1).pow(2).sum()
    r1 = ref(x1).pow(2).sum()
    for loss in (r0, r1, l0, l1):
        loss.backward()
    twobp.backward_p2(ours)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(old_ours.grad, old_ref.grad, rtol=1e-12, atol=1e-12)


def test_requires_grad_turned_off_before_p1_gives_no_gradient_as_under_torch():
    ref, ours = _linear_pair()
    (x,) = _inputs(1)
    r = ref(x).pow(2).sum()
    with twobp.split_backward(microbatch=0):
        o = ours(x).pow(2).sum()
    for m in (ref, ours):
        m.weight.requires_grad_(False)
    r.backward()
    o.backward()
    twobp.backward_p2(ours)
    assert ref.weight.grad is None and ours.weight.grad is None
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)
    assert twobp.default_store().is_empty()


def test_a_gradient_buffer_reused_before_p2_is_refused_and_a_fresh_one_is_exact():
    ref, ours = _linear_pair()
    xs = _inputs(2)
    g = torch.Generator().manual_seed(2)
    gs = [torch.randn(4, 5, dtype=torch.float64, generator=g) for _ in xs]
    recv = torch.empty(4, 5, dtype=torch.float64)  # one receive buffer for every micro-batch
    for i, (x, dy) in enumerate(zip(xs, gs)):
        with twobp.split_backward(microbatch=i):
            y = ours(x)
        recv.copy_(dy)
        y.backward(recv)
    with pytest.raises(RuntimeError, match=r"modified in place before p2.*g\.clone\(\)"):
        twobp.backward_p2(ours)
    twobp.default_store().clear()
    ours.zero_grad(set_to_none=True)
    for i, (x, dy) in enumerate(zip(xs, gs)):
        ref(x).backward(dy)
        with twobp.split_backward(microbatch=i):
            y = ours(x)
        recv.copy_(dy)
        y.backward(recv.clone())  # the fix the error names
    twobp.backward_p2(ours)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)


def test_a_computed_weight_in_a_split_region_sends_its_gradient_through_autograd():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    ref = weight_norm(nn.Linear(6, 3).double())
    ours = twobp.convert(copy.deepcopy(ref))
    (x,) = _inputs(1)
    ref(x).pow(2).sum().backward()
    with pytest.warns(UserWarning, match="weight computed by autograd"):
        with twobp.split_backward(microbatch=0):
            loss = ours(x).pow(2).sum()
    loss.backward()
    assert twobp.default_store().is_empty(), "nothing is deferred for this call"
    got = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_functional_call_with_derived_weights_in_a_split_region_reaches_the_originals():
    ref, ours = _linear_pair()
    (x,) = _inputs(1)
    grads = []
    for m, split in ((ref, False), (ours, True)):
        params = {n: p * 0.9 for n, p in m.named_parameters()}  # MAML-style fast weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if split:
                with twobp.split_backward(microbatch=0):
                    loss = functional_call(m, params, (x,)).pow(2).sum()
            else:
                loss = functional_call(m, params, (x,)).pow(2).sum()
        loss.backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def _func_cases():
    return {"linear": (nn.Linear(6, 4), torch.randn(3, 6)),
            "layernorm": (nn.LayerNorm(6), torch.randn(3, 6)),
            "rmsnorm": (nn.RMSNorm(6), torch.randn(3, 6)),
            "conv2d": (nn.Conv2d(2, 3, 3), torch.randn(2, 2, 5, 5))}


@pytest.mark.parametrize("name", ["linear", "layernorm", "rmsnorm", "conv2d"])
def test_torch_func_transforms_and_forward_ad_see_the_twins_as_torch(name):
    torch.manual_seed(0)
    ref, x = _func_cases()[name]
    ref, x = ref.double(), x.double()
    ours = twobp.convert(copy.deepcopy(ref))
    params = [{n: p.detach() for n, p in m.named_parameters()} for m in (ref, ours)]

    def loss(m):
        return lambda p, xi: functional_call(m, p, (xi,)).pow(2).sum()

    for ps, (a, b) in [(params, (grad(loss(ref))(params[0], x), grad(loss(ours))(params[1], x)))]:
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-12)
    xb = x.unsqueeze(1)
    per_ref = vmap(grad(loss(ref)), in_dims=(None, 0))(params[0], xb)
    per_ours = vmap(grad(loss(ours)), in_dims=(None, 0))(params[1], xb)
    for k in per_ref:
        torch.testing.assert_close(per_ours[k], per_ref[k], rtol=1e-12, atol=1e-12)
    t = torch.randn_like(x)
    torch.testing.assert_close(jvp(ours, (x,), (t,))[1], jvp(ref, (x,), (t,))[1], rtol=1e-12, atol=1e-12)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        tangents = [fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent for m in (ref, ours)]
    torch.testing.assert_close(tangents[1], tangents[0], rtol=1e-12, atol=1e-12)


def test_a_torch_func_transform_inside_a_split_region_is_refused_by_name():
    _, ours = _linear_pair()
    (x,) = _inputs(1)
    params = {n: p.detach() for n, p in ours.named_parameters()}
    with twobp.split_backward(microbatch=0):
        with pytest.raises(NotImplementedError, match="torch.func transform .* inside twobp.split_backward"):
            grad(lambda p: functional_call(ours, p, (x,)).sum())(params)
    assert twobp.default_store().is_empty()


def test_a_backward_restricted_to_the_parameters_is_named_when_p2_is_asked_for():
    _, ours = _linear_pair()
    (x,) = _inputs(1)
    with twobp.split_backward(microbatch=0):
        loss = nn.Sequential(ours, nn.Tanh())(x).sum()
    loss.backward(inputs=[ours.bias])  # the split forward's p1 never runs
    assert ours.bias.grad is None
    with pytest.raises(RuntimeError, match=r"before its p1.*inputs=\[\.\.\.\].*backward_p2"):
        twobp.backward_p2(ours, microbatches=0)
    twobp.default_store().clear()


def test_a_split_output_that_never_reaches_a_loss_leaves_nothing_behind():
    """Its graph is freed with no backward: the entry goes with it, and p2 of the same
    micro-batch accumulates only the calls whose outputs reached the loss."""
    import gc

    ref, ours = _linear_pair()
    x_used, x_dropped = _inputs(2)
    store = twobp.ActivationStore()
    with twobp.split_backward(microbatch=0, store=store):
        used = ours(x_used).pow(2).sum()
        dropped = ours(x_dropped)
    assert len(store.entries()) == 2
    del dropped
    gc.collect()
    assert [e.state.value for e in store.entries()] == ["forward"]
    used.backward()
    twobp.backward_p2(ours, store=store)
    assert store.is_empty() and store.live_bytes == 0
    ref(x_used).pow(2).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("input_needs_grad", [False, True], ids=["first-layer", "inner-layer"])
def test_split_call_is_exact_whether_or_not_its_input_needs_a_gradient(input_needs_grad):
    """A first layer (no input needs a gradient) still runs p1, which readies its p2."""
    ref, ours = _linear_pair()
    (x,) = _inputs(1)
    xr, xo = x.clone().requires_grad_(input_needs_grad), x.clone().requires_grad_(input_needs_grad)
    ref(xr).pow(2).sum().backward()
    with twobp.split_backward(microbatch=0):
        loss = ours(xo).pow(2).sum()
    loss.backward()
    assert ours.weight.grad is None  # deferred to p2
    twobp.backward_p2(ours)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)
    if input_needs_grad:
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-12, atol=1e-12)


def test_a_weight_edited_in_place_between_forward_and_p1_is_caught_by_autograd():
    """The node saves the parameter itself (it is not one of its inputs in a split region):
    an in-place edit before p1 raises torch's own version error, as for nn.Linear."""
    _, ours = _linear_pair()
    (x,) = _inputs(1)
    with twobp.split_backward(microbatch=0):
        loss = ours(x.requires_grad_()).pow(2).sum()
    with torch.no_grad():
        ours.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    twobp.default_store().clear()


@pytest.mark.parametrize("explicit", [True, False], ids=["microbatches=[0]", "microbatches=None"])
def test_an_unused_output_still_referenced_waits_without_blocking_p2_or_the_optimizer(explicit):
    """An auxiliary output that reaches no loss but is kept in a variable: torch keeps its graph
    and steps regardless. p2 of its micro-batch runs what the loss's backward readied (exact),
    optimizer.step() is allowed (nothing is owed), the entry goes when the output does, and
    a step that begins while it is still referenced names that cause."""
    import gc

    ref, ours = _linear_pair()
    (x,) = _inputs(1)
    store = twobp.ActivationStore()
    with twobp.split_backward(microbatch=0, store=store):
        loss = ours(x).pow(2).sum()
        aux = ours(x * 2)  # reaches no loss, still referenced
    loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twobp.backward_p2(ours, microbatches=[0] if explicit else None, store=store)
    assert not caught, [str(w.message) for w in caught]
    ref(x).pow(2).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    with pytest.raises(twobp.LeakError, match="output is still referenced but had no backward"):
        store.begin_step()
    del aux
    gc.collect()
    assert store.is_empty()
    store.begin_step()


@pytest.mark.parametrize("how", ["backward(inputs=[x])", "autograd.grad(loss, x)"])
def test_a_backward_restricted_to_the_inputs_is_p1_and_owes_p2(how):
    """The input gradient equals torch's; the weight gradient is owed to backward_p2 (torch's
    split I/W shape): optimizer.step() refuses until it ran, and then it is exact."""
    ref, ours = _linear_pair()
    (x,) = _inputs(1)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).pow(2).sum().backward()
    with twobp.split_backward(microbatch=0):
        loss = ours(xo).pow(2).sum()
    if how.startswith("backward"):
        loss.backward(inputs=[xo])
        gx = xo.grad
    else:
        (gx,) = torch.autograd.grad(loss, xo)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-12, atol=1e-12)
    assert ours.weight.grad is None
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="still pending"):
        opt.step()
    twobp.backward_p2(ours)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    opt.step()
