"""twobp stages inside torch.distributed.pipelining: TwoBPPipelineStage under torch's own schedules
(zero-bubble I/W split, V shape, and plain full backward) gives one process's loss and gradients,
its I step leaves the twins' weight gradients to W, and torch's retain_graph input step is never used."""

import pytest
import torch
from torch import nn

from twobp.pipeline import spawn

SCHEDULES = ["ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble", "Schedule1F1B", "ScheduleInterleaved1F1B"]
M = 4


def _model():
    from twobp import models

    torch.manual_seed(0)
    return models.build("llama", "tiny", n_layers=2)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (8, 16), generator=g)
    return x, torch.randint(0, 256, (8, 16), generator=g)


def _stage_ids(name, rank, world):
    per_rank = 1 if name == "Schedule1F1B" else 2
    n = world * per_rank
    if name == "ScheduleZBVZeroBubble":
        return [rank, n - 1 - rank], n
    return [s for s in range(n) if s % world == rank], n


def _worker(rank, world, ours):
    return {name: _one(rank, world, name, ours) for name in SCHEDULES}


def _one(rank, world, name, ours):
    import torch.distributed.pipelining as tp
    import torch.distributed.pipelining.stage as tstage

    import twobp
    from twobp.pipeline.partition import balance
    from twobp.pipeline.torch_runtime import TwoBPPipelineStage

    torch.set_num_threads(1)
    model = _model()
    if not ours:
        twobp.revert(model)
    blocks = model.blocks()
    mine, n = _stage_ids(name, rank, world)
    part = balance(len(blocks), n)
    cls = TwoBPPipelineStage if ours else tp.PipelineStage
    stages = [cls(nn.Sequential(*(blocks[i] for i in part.blocks_of(s))), s, n, torch.device("cpu")) for s in mine]
    calls = {"input": 0, "w_before_p2": []}
    real = tstage.stage_backward_input

    def counted(*a, **k):
        calls["input"] += 1
        return real(*a, **k)

    tstage.stage_backward_input = counted  # this process only; restored below
    if ours:  # after I, before W: the twins' weights must still have no gradient
        for st in stages:
            real_w = st.backward_weight_one_chunk

            def w(mb, last_backward=False, st=st, real_w=real_w):
                calls["w_before_p2"].append(all(p.grad is None for m in st.submod.modules()
                                                if isinstance(m, twobp.TwoBPModule) for p in m.parameters(False))
                                            if mb == 0 else True)
                return real_w(mb, last_backward=last_backward)

            st.backward_weight_one_chunk = w
    sched = getattr(tp, name)(stages if len(stages) > 1 else stages[0], M, loss_fn=model.loss_fn)
    x, y = _batch()
    losses = []
    kw = dict(target=y, losses=losses) if n - 1 in mine else {}
    try:
        sched.step(x, **kw) if 0 in mine else sched.step(**kw)
    finally:
        tstage.stage_backward_input = real
    grads = {f"{i}.{k}": p.grad.clone() for s in mine for i in part.blocks_of(s)
             for k, p in blocks[i].named_parameters() if p.grad is not None}
    empty = all(st.store.is_empty() for st in stages) if ours else True
    loss = float(torch.stack([l.detach() for l in losses]).mean()) if losses else None
    return loss, grads, calls, empty


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("ours", [True, False], ids=["twobp-stage", "torch-stage"])
def test_torch_schedules_with_twobp_stages_equal_one_process(ours):
    model = _model()
    x, y = _batch()
    loss = model.loss_fn(model(x), y)
    loss.backward()
    ref = {f"{i}.{k}": p.grad for i, b in enumerate(model.blocks()) for k, p in b.named_parameters()}
    per_rank = spawn(_worker, world_size=2, args=(ours,), timeout=60, join_timeout=220, env={"OMP_NUM_THREADS": "1"})
    for name in SCHEDULES:
        got_loss = next(r[name][0] for r in per_rank if r[name][0] is not None)
        assert got_loss == pytest.approx(loss.item(), rel=1e-5), name
        grads = {}
        for r in per_rank:
            _, g, calls, empty = r[name]
            grads.update(g)
            assert empty, f"{name}: every p2 ran, the stores are empty after the step"
            if ours:
                assert calls["input"] == 0, f"{name}: I never runs torch's retain_graph stage_backward_input"
                assert all(calls["w_before_p2"]), f"{name}: I left the twins' weight gradients to W"
                if "ZeroBubble" in name:
                    assert calls["w_before_p2"], f"{name}: the zero-bubble schedule ran W steps"
            elif "ZeroBubble" in name:
                assert calls["input"] > 0, f"{name}: torch's own stage splits with stage_backward_input"
        assert set(grads) == set(ref), name
        for k, g in ref.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{name} [{k}]: {m}")
