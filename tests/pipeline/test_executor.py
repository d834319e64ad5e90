"""The executor against one process running the whole model, on 2 and 4 gloo ranks.

One spawn per world size runs every case (schedule x 2BP) and returns losses, gradients
and store states to the parent, which compares them with single-process autograd.
"""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from twobp.pipeline import Costs, SCHEDULE_NAMES, Timeline, WorkerError, make_schedule, simulate, spawn
from twobp.pipeline.partition import SharedParameterError, balance, partition_blocks

sys.path.insert(0, str(Path(__file__).parent))
import _workers as W  # noqa: E402

SEED = 7
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cases_for(world):
    m = 2 * world
    out = [(name, use_2bp, 2 if name == "interleaved-1f1b" else 1, m, None)
           for name in SCHEDULE_NAMES for use_2bp in (False, True)
           if use_2bp or name not in ("zb-h1", "auto")]  # those two place P2: 2BP only
    out += [("gpipe", True, 2, m, None), ("auto", True, 2, m, None), ("1f1b", True, 1, m, 0.1),
            # the per-direction process groups NCCL uses, exercised here on gloo
            ("interleaved-1f1b", True, 2, m, None, "channels"),
            # the V layout: rank 0 holds the first and the last stage, rank p-1 hands stage
            # p-1's output to stage p locally
            ("auto", True, 2, m, None, "v"), ("gpipe", False, 2, m, None, "v"), ("auto", True, 2, m, 0.1, "v"),
            ("auto", True, 2, m, None, "v", "channels", "fifo"),
            # fused and split backwards in one schedule (auto where B < P1 + P2)
            ("auto", True, 1, m, 0.1, "fuse"), ("auto", True, 2, m, None, "v", "fuse")]
    return out


def batch_rows(world):
    return 4 * world + 1  # micro-batches of unequal size: the loss scaling must handle it


_RUNS = {}


def run_world(world):
    if world not in _RUNS:
        t0 = time.monotonic()
        res = spawn(W.run_cases, world_size=world,
                    args=(cases_for(world), SEED, batch_rows(world)),
                    timeout=60, join_timeout=200, env=ENV)
        _RUNS[world] = (res, time.monotonic() - t0)
    return _RUNS[world][0]


def _ids(cases):
    return [f"{n}{'-2bp' if b else ''}-v{c}{'-sgd' if lr else ''}{''.join('-' + f[:2] for f in rest)}"
            for n, b, c, m, lr, *rest in cases]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_every_schedule_equals_single_process_autograd(world):
    results = run_world(world)
    ref = W.reference(SEED, batch_rows(world))
    ref_sgd = W.reference(SEED, batch_rows(world), lr=0.1)
    small = W.reference(SEED, batch_rows(world), drop_last=True)["loss"]
    first = cases_for(world)[0]
    for r in results:  # a step with another batch shape between two with the same
        assert r[first]["small_loss"] == pytest.approx(small, rel=1e-6)
    for case, cid in zip(cases_for(world), _ids(cases_for(world))):
        per_rank = [r[case] for r in results]
        for r, got in enumerate(per_rank):
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-7), (cid, r)
            assert got["store_empty"], f"{cid}: rank {r} left saved activations"
        # the split really happened: p2's inputs sat in the store between P1 and P2 (on the
        # ranks with twobp weights; a LayerNorm/Tanh-only stage has none)
        peaks = [got["peak_store_bytes"] for got in per_rank]
        assert (sum(peaks) > 0) == case[1], (cid, peaks)
        grads = {}
        for got in per_rank:
            assert not set(grads) & set(got["grads"]), f"{cid}: a parameter on two ranks"
            grads.update(got["grads"])
        assert set(grads) == set(ref["grads"]), cid
        for k, g in ref["grads"].items():
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k: f"{cid} [{k}]: {m}")
        if case[4] is not None:
            params = {}
            for got in per_rank:
                params.update(got["params"])
            for k, p in ref_sgd["params"].items():
                torch.testing.assert_close(params[k], p, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(300)
def test_measured_costs_and_timeline(tmp_path):
    results = run_world(2)
    first = cases_for(2)[0]
    got = results[0][first]
    assert got["costs"] == results[1][first]["costs"]
    trace = got["trace"]
    (tmp_path / "t.json").write_text(json.dumps(trace))
    tl = Timeline.load(tmp_path / "t.json")
    sched = make_schedule(first[0], stages=2, microbatches=first[3], twobp=first[1])
    compute = [e for e in tl.events if e.kind in ("F", "B", "P1", "P2")]
    assert len(compute) == sum(len(a) for a in sched.ranks)
    assert {e.kind for e in tl.events} <= {"F", "B", "recv", "send"}
    for r in range(2):  # per rank, events do not overlap and follow the schedule's order
        mine = sorted((e for e in compute if e.rank == r), key=lambda e: e.start)
        assert [e.name for e in mine] == [str(a) for a in sched.ranks[r]]
        assert all(a.end <= b.start + 1e-9 for a, b in zip(mine, mine[1:]))
        # the step ends waiting on peers (sends completing, the loss broadcast): shown as waits
        ends = [e.name for e in tl.events if e.rank == r and e.kind == "recv" and e.start >= mine[-1].end - 1e-9]
        assert ends[-2:] == ["sends completing", "loss broadcast"], ends
    # a fused run measures F and B; a 2BP run F, P1, P2: the form auto consumes
    assert set(got["costs"]) == {"F", "B", "comm"}
    split = results[0][cases_for(2)[1]]["costs"]
    assert set(split) == {"F", "P1", "P2", "comm"}
    assert all(len(split[k]) == 2 and min(split[k]) > 0 for k in ("F", "P1", "P2"))
    assert results[0][cases_for(2)[2]]["costs"] is None  # measure=False
    costs = Costs.from_mapping(split)
    auto = make_schedule("auto", stages=2, microbatches=4, twobp=True, costs=costs)
    assert simulate(auto, costs).makespan > 0


@pytest.mark.timeout(300)
def test_tied_parameters_across_ranks_are_kept_in_sync():
    """A weight shared by the first and the last block on different ranks: each rank keeps a
    copy and their gradients are summed, so the step equals one process's."""
    out = run_world(2)[0]["tied"]
    ref = W.tied_reference(0, 5)
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    torch.testing.assert_close(out["grad"], ref["grads"]["0.weight"], rtol=1e-5, atol=1e-7)
    blocks = W.tied_blocks(0)
    with pytest.raises(SharedParameterError, match=r"0\.weight and 3\.weight .*PipelineExecutor"):
        partition_blocks(blocks, num_stages=2, ranks=2, stages_wanted=[0])
    # on one rank (two chunks of it) sharing is fine: autograd sums both uses
    part, built = partition_blocks(blocks, num_stages=2, ranks=1, stages_wanted=[0, 1])
    assert built[0]._modules["0"].weight is built[1]._modules["3"].weight


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_data_parallel_x_pipeline_equals_one_process():
    """pp = 2 x dp = 2 (4 gloo processes), every schedule with and without 2BP (interleaved and
    auto in the V layout on 2 chunks per rank): the loss
    averaged over replicas and every gradient equal one process on the full batch; the
    replica all-reduces appear in the timeline; the store is empty after."""
    cases = [(name, b) for name in SCHEDULE_NAMES for b in (False, True) if b or name not in ("zb-h1", "auto")]
    cases.append(("auto", True, "v"))  # two chunks per rank in the V layout
    per_rank = spawn(W.run_dp, world_size=4, args=(2, 2, cases, SEED, 8), timeout=60, join_timeout=500, env=ENV)
    ref = W.reference(SEED, 8)
    for rank, out in enumerate(per_rank):
        for case in cases:
            got = out[case]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), (rank, case)
            assert got["store_empty"], (rank, case)
            for k, g in got["grads"].items():
                torch.testing.assert_close(g, ref["grads"][k], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {case} {k}")
        assert "allreduce" in out[("1f1b", False)]["kinds"]
    names = set().union(*(out[cases[0]]["grads"] for out in per_rank))
    assert names == set(ref["grads"]), "every parameter has its gradient on some rank"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world,name,use_2bp", [(2, "1f1b", True), (4, "1f1b", False), (4, "zb-h1", True)])
def test_tied_llama_built_per_rank_trains_like_one_process(world, name, use_2bp):
    """llama with tie_embeddings over 2 and 4 stages, each rank building only its blocks:
    the losses of 3 clipped AdamW steps equal one process's, the tied copies on the first and
    last rank are bit-identical afterwards, and each rank materialised only its own share."""
    from twobp import models
    from twobp.data import ByteCorpus

    per_rank = spawn(W.run_tied_llama, world_size=world, args=(name, use_2bp, 3), timeout=60, join_timeout=500,
                     env=ENV)
    model = models.build("llama", "tiny", seed=5, tie_embeddings=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = ByteCorpus(seq_len=model.config.seq_len + 1)
    want = []
    for step in range(3):
        x, y = data.batch(step, 8, seed=0)
        loss = model.loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        want.append(float(loss.detach()))
    first, last = per_rank[0], per_rank[-1]
    assert first["losses"] == pytest.approx(want, rel=2e-5)
    assert len(first["tied"]) == len(last["tied"]) == 1
    assert torch.equal(first["tied"][0], last["tied"][0]), "the tied copies drifted apart"
    # three AdamW steps of lr 1e-2 from gradients summed in another order: agree to 0.2% of a step
    torch.testing.assert_close(first["tied"][0], model.embed.weight.detach(), rtol=1e-4, atol=2e-5)
    for out in per_rank:  # (the last rank's own head block holds the tied weight)
        assert out["materialised"] == out["own"], "a rank allocated more than its own blocks"


def test_partition_balance():
    assert balance(7, 3).bounds == (0, 3, 5, 7)
    assert balance(6, 3, [1, 1, 1, 1, 1, 5]).bounds == (0, 2, 5, 6)
    assert balance(5, 2, [5, 1, 1, 1, 1]).bounds == (0, 1, 5)
    with pytest.raises(ValueError, match="cannot cut 3 blocks into 4 stages"):
        balance(3, 4)
    with pytest.raises(ValueError, match="bounds must rise"):
        partition_blocks(W.build_blocks(0), num_stages=2, ranks=2, stages_wanted=[0],
                         bounds=[0, 9, 8])
    made = []

    def factory(i):
        def build():
            made.append(i)
            return torch.nn.Linear(2, 2)
        return build

    part, built = partition_blocks([factory(i) for i in range(6)], num_stages=3, ranks=3,
                                   stages_wanted=[1])
    assert made == [2, 3] and list(built[1]._modules) == ["2", "3"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,culprit,pattern", [
    ("exit", 1, r"pipeline rank 1 died \(exit code 3\)"),
    ("hang", 0, r"rank 0 failed in training step 1 at action \d+ \(RB0\.0\)(.|\n)*(no message from rank 1 within 3 s|receive from rank 1 failed)"),
])
def test_dead_or_silent_rank_fails_fast_with_a_clear_error(mode, culprit, pattern):
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn(W.die_or_hang, world_size=2, args=(mode,), timeout=3, join_timeout=90, env=ENV)
    took = time.monotonic() - t0
    assert info.value.rank == culprit
    assert __import__("re").search(pattern, str(info.value)), str(info.value)
    assert took < 60, f"took {took:.0f} s"


@pytest.mark.timeout(150)
def test_under_torchrun():
    import os
    import subprocess

    from twobp.pipeline.launch import free_port

    script = Path(__file__).parent / "_torchrun_main.py"
    env = {**os.environ, **ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(script)],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0/2 OK" in proc.stdout and "rank 1/2 OK" in proc.stdout


@pytest.mark.timeout(120)
def test_single_rank_local_handoff_and_tied_weights_on_one_rank():
    (got,) = spawn(W.run_single_rank, world_size=1, args=(SEED, 7), timeout=30,
                   join_timeout=100, env=ENV)
    ref = W.tied_reference(SEED, 7)
    assert set(got) == {"interleaved-1f1b-2bp", "gpipe", "auto-2bp"}
    for name, res in got.items():
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
        assert res["store_empty"], name
        # the tied weight appears once, under the embedding's name, with both uses summed
        assert set(res["grads"]) == {"0.weight", "1.0.weight", "1.0.bias", "2.weight", "2.bias"}
        for k, g in res["grads"].items():
            torch.testing.assert_close(g, ref["grads"][k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,m", [("auto", 4), ("1f1b", 3)])
def test_carried_p2_trains_exactly_like_the_plain_step(name, m):
    """overlap_steps: a rank's carried P2 and optimizer step run at the start of the next
    step. Over several AdamW steps with an lr scheduler the losses and final weights must be
    bit-identical to the run without carry; stepping the optimizer by hand while P2 is owed
    is refused; flush() leaves nothing owed and the store empty."""
    per_rank = spawn(W.run_overlap, world_size=2, args=(0, 8, 4, name, m), timeout=60, join_timeout=240)
    for rank, out in enumerate(per_rank):
        plain, over = out[False], out[True]
        assert plain["losses"] == over["losses"]
        for k, p in plain["params"].items():
            assert torch.equal(p, over["params"][k]), f"rank {rank} {k} differs after carried steps"
        assert plain["lr"] == over["lr"] == 1e-2 * 0.5 ** 4, "the lr scheduler stepped once per step"
        assert over["store_empty"] and not over["owes_after_flush"]
        assert plain["carried"] == [0, 0, 0, 0]
    carrying = per_rank[1][True]
    if name == "auto":
        assert "carry=0," in carrying["schedule"], carrying["schedule"]
        assert carrying["carried"][0] > 0
        assert "flush()" in carrying["refused"]
        assert "optim" in carrying["kinds"] and "P2" in carrying["kinds"]


@pytest.mark.timeout(300)
def test_replicas_with_different_plans_are_refused_and_agree_costs_gives_one_plan():
    """pp = 2 x dp = 2: replica 0 carries P2 into the next step and replica 1 does not (what each
    replica's own measured costs can decide). Their gradient all-reduces would meet out of order
    (gloo aborted with a size mismatch, about one run in five under load); every rank refuses the
    plans at construction instead, naming agree_costs. agree_costs hands every replica the mean
    of their costs, and identical plans build."""
    a = {"F": [1.0, 2.0], "P1": [1.0, 1.0], "P2": [0.5, 0.5], "comm": 0.01}
    b = {"F": [3.0, 2.0], "P1": [2.0, 1.0], "P2": [0.5, 1.5], "comm": 0.03}
    mean = {"F": [2.0, 2.0], "P1": [1.5, 1.0], "P2": [0.5, 1.0], "comm": 0.02}
    differ = spawn(W.run_dp_plans, world_size=4, args=(True, [a, b]), timeout=60, join_timeout=200, env=ENV)
    for out in differ:
        assert out["agreed"].keys() == mean.keys()
        for kind, want in mean.items():
            assert out["agreed"][kind] == pytest.approx(want), kind
        assert out["error"] is not None and "replicas run different pipeline schedules" in out["error"]
        assert "carry=0,1" in out["error"] and "agree_costs" in out["error"]
    same = spawn(W.run_dp_plans, world_size=4, args=(False, [a, b]), timeout=60, join_timeout=200, env=ENV)
    assert all(out["error"] is None for out in same)


@pytest.mark.timeout(300)
def test_pipeline_ranks_given_different_schedules_are_refused_on_every_rank():
    """Rank 0 built with 1F1B + 2BP and rank 1 with GPipe + 2BP (what each rank planning auto on
    its own costs can amount to): both refuse at construction, naming both plans, instead of
    failing at the first receive's timeout. The same schedule on both builds."""
    errors = spawn(W.run_ranks_plans, world_size=2, args=(["1f1b", "gpipe"],), timeout=60, join_timeout=200, env=ENV)
    for err in errors:
        assert err is not None and "ranks were given different schedules or stage cuts" in err
        assert "name=1f1b-2bp" in err and "name=gpipe-2bp" in err
    assert spawn(W.run_ranks_plans, world_size=2, args=(["1f1b", "1f1b"],), timeout=60, join_timeout=200,
                 env=ENV) == [None, None]


def test_describe_plans_names_what_differs():
    """The refusal's text: each plan's head; the settings line where only it differs; and a note
    when the heads match and only the action lists differ."""
    from twobp.pipeline.grad_sync import describe_plans

    a, b = "schedule name=x\nrank 0: F0.0\noverlap_steps=True", "schedule name=x\nrank 0: F0.0\noverlap_steps=False"
    assert describe_plans([a, b], "rank") == ("rank 0: 'schedule name=x overlap_steps=True'; "
                                              "rank 1: 'schedule name=x overlap_steps=False'")
    c = "schedule name=x\nrank 0: B0.0\noverlap_steps=True"
    assert describe_plans([a, c], "replica").endswith("; the same head, different action lists")
    assert describe_plans(["schedule name=x\nq", "schedule name=y\nq"], "replica") == \
        "replica 0: 'schedule name=x'; replica 1: 'schedule name=y'"
