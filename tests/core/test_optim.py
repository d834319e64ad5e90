"""MasterWeights: bf16/fp16 parameters, fp32 gradients and fp32 optimizer state."""

import pytest
import torch
from torch import nn

import twobp
from twobp.optim import MasterWeights


def _models(dtype):
    torch.manual_seed(0)
    ref = nn.Sequential(twobp.TwoBPLinear(8, 16), nn.Tanh(), twobp.TwoBPLinear(16, 4))
    low = nn.Sequential(twobp.TwoBPLinear(8, 16), nn.Tanh(), twobp.TwoBPLinear(16, 4))
    low.load_state_dict(ref.state_dict())
    low.to(dtype)
    with torch.no_grad():  # start from the same (rounded) values
        for p, q in zip(ref.parameters(), low.parameters()):
            p.copy_(q.float())
    return ref, low


@pytest.mark.parametrize("split", [False, True], ids=["normal", "split"])
def test_bf16_params_fp32_masters_track_an_fp32_run(split):
    ref, low = _models(torch.bfloat16)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = MasterWeights(low.parameters(), torch.optim.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=1, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(6, 8, generator=gen)
        ref(x).square().mean().backward()
        if split:
            with twobp.split_backward(microbatch=0):
                y = low(x.bfloat16())
            y.float().square().mean().backward()
            twobp.backward_p2(low)
        else:
            low(x.bfloat16()).float().square().mean().backward()
        assert all(p.grad.dtype == torch.float32 for p in low.parameters()), "fp32 gradients"
        opt_ref.step()
        opt.step()
        sched.step()
        sched_ref.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    # the scheduler's lr reaches the inner optimizer at the step that uses it
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 16)
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    for p, q in zip(low.parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16 and opt.master(p).dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in opt.inner.state[opt.master(p)].values() if v.dim())
        torch.testing.assert_close(opt.master(p), q, rtol=5e-2, atol=5e-3)
        torch.testing.assert_close(p, opt.master(p).bfloat16())
    state = opt.state_dict()
    opt2 = MasterWeights(low.parameters(), torch.optim.AdamW, lr=1e-2)
    opt2.load_state_dict(state)
    torch.testing.assert_close(opt2.master(next(low.parameters())), opt.master(next(low.parameters())))


def test_fp16_with_a_grad_scaler_skips_an_overflowing_step():
    _, low = _models(torch.float16)
    opt = MasterWeights(low.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in low.parameters()]
    x = torch.randn(4, 8).half()
    with twobp.split_backward(microbatch=0):
        loss = low(x).float().square().mean()
    scaler.scale(loss * float("inf")).backward()  # an overflow: the step must be skipped
    twobp.backward_p2(low)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, low.parameters()))
    assert scaler.get_scale() < 2.0 ** 10
    opt.zero_grad()
    with twobp.split_backward(microbatch=1):
        loss = low(x).float().square().mean()
    scaler.scale(loss).backward()
    twobp.backward_p2(low)
    scaler.step(opt)
    assert not all(torch.equal(a, b) for a, b in zip(before, low.parameters()))


def test_stepping_with_pending_p2_is_refused_through_the_wrapper():
    _, low = _models(torch.bfloat16)
    opt = MasterWeights(low.parameters(), torch.optim.AdamW, lr=1e-3)
    with twobp.split_backward(microbatch=0):
        y = low(torch.randn(2, 8).bfloat16())
    y.float().sum().backward()
    with pytest.raises(RuntimeError, match="still pending"):
        opt.step()
    twobp.backward_p2(low)
    opt.step()


def _bf16_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return twobp.convert(nn.Sequential(nn.Linear(4, 4))).to(torch.bfloat16)


def test_a_resumed_lr_schedule_steps_with_the_scheduled_lr():
    """The groups' settings (an LR scheduler's lr) are part of the state: a resumed run's next
    step equals the uninterrupted run's (it stepped with the initial lr before)."""
    import copy

    x = torch.randn(3, 4, dtype=torch.bfloat16)

    def make():
        m = _bf16_linear()
        opt = MasterWeights(m.parameters(), torch.optim.SGD, lr=1.0)
        return m, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)

    m1, o1, s1 = make()
    for _ in range(3):
        o1.zero_grad()
        m1(x).float().sum().backward()
        o1.step()
        s1.step()
    saved = copy.deepcopy({"m": m1.state_dict(), "o": o1.state_dict(), "s": s1.state_dict()})
    m2, o2, s2 = make()
    m2.load_state_dict(saved["m"])
    o2.load_state_dict(saved["o"])
    s2.load_state_dict(saved["s"])
    assert o2.param_groups[0]["lr"] == pytest.approx(1e-3)
    for o, m in ((o1, m1), (o2, m2)):
        o.zero_grad()
        m(x).float().sum().backward()
        o.step()
    assert torch.equal(m1[0].weight, m2[0].weight)


def test_weights_loaded_after_the_optimizer_was_built_are_the_ones_stepped():
    m = _bf16_linear()
    opt = MasterWeights(m.parameters(), torch.optim.SGD, lr=0.0)  # a step changes nothing
    m.load_state_dict({k: torch.full_like(v, 0.5) for k, v in m.state_dict().items()})
    with twobp.split_backward(microbatch=0):
        loss = m(torch.randn(3, 4, dtype=torch.bfloat16)).float().sum()
    loss.backward()
    twobp.backward_p2(m)
    opt.step()
    assert torch.all(m[0].weight == 0.5) and torch.all(opt.master(m[0].weight) == 0.5)


def test_parameter_groups_and_a_closure_work_as_with_any_optimizer():
    m = _bf16_linear()
    opt = MasterWeights([{"params": [m[0].weight], "weight_decay": 0.1}, {"params": [m[0].bias], "weight_decay": 0.0}],
                        torch.optim.AdamW, lr=1e-2)
    assert [g["weight_decay"] for g in opt.inner.param_groups] == [0.1, 0.0]
    x = torch.randn(3, 4, dtype=torch.bfloat16)

    def closure():
        opt.zero_grad()
        loss = m(x).float().sum()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)


def test_unscaling_with_pending_p2_is_refused():
    """GradScaler.unscale_ divides .grad by the scale once: a p2 landing after it would stay
    scaled (and a clip in between sees p1's gradients only)."""
    m = twobp.convert(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with twobp.split_backward(microbatch=0):
        loss = m(torch.randn(3, 4)).sum()
    scaler.scale(loss).backward()
    with pytest.raises(RuntimeError, match=r"GradScaler.unscale_\(optimizer\).*still pending.*backward_p2"):
        scaler.unscale_(opt)
    twobp.backward_p2(m)
    scaler.unscale_(opt)  # after p2: as usual
    scaler.step(opt)
    scaler.update()
