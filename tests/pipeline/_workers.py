"""Worker functions and models for the multi-process pipeline tests (imported by spawned
children, so kept free of pytest and of work at import time)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

import twobp
from twobp.pipeline import PipelineExecutor, make_schedule
from twobp.pipeline.lowering import receive_in_send_order

D_IN, D, N_OUT, N_BLOCKS = 6, 12, 5, 8


def build_blocks(seed: int) -> list[nn.Module]:
    """Eight blocks: twobp linears, a torch LayerNorm (grads at p1 time), a parameter-free
    block (a stage with no p2 at all), and odd widths."""
    torch.manual_seed(seed)
    return [
        nn.Sequential(twobp.TwoBPLinear(D_IN, D), nn.GELU()),
        nn.Sequential(twobp.TwoBPLinear(D, D), nn.Tanh()),
        nn.LayerNorm(D),
        nn.Tanh(),
        nn.Sequential(twobp.TwoBPLinear(D, D, bias=False), nn.ReLU(), twobp.TwoBPLinear(D, D)),
        nn.Sequential(twobp.TwoBPLinear(D, D), nn.SiLU()),
        twobp.TwoBPLinear(D, D),
        twobp.TwoBPLinear(D, N_OUT),
    ]


def make_batch(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n, D_IN, generator=g), torch.randint(0, N_OUT, (n,), generator=g)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, target)


def reference(seed: int, n: int, lr: float | None = None, drop_last: bool = False) -> dict:
    """One process, whole model, full batch: the ground truth."""
    model = nn.Sequential(*build_blocks(seed))
    x, y = make_batch(seed, n)
    if drop_last:
        x, y = x[:-1], y[:-1]
    loss = loss_fn(model(x), y)
    loss.backward()
    out = {"loss": float(loss.detach()), "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
    if lr is not None:
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        out["params"] = {k: p.detach().clone() for k, p in model.named_parameters()}
    return out


def run_cases(rank: int, world: int, cases: list[tuple], seed: int, n: int) -> dict:
    """Run every (name, twobp, chunks, m, lr, *flags) case once (flags: "channels" for one-way
    channels, "v" for the V layout, "fifo" for receive_in_send_order, "fuse" for auto on costs with
    a cheaper fused backward); return per case this rank's loss,
    grads (global names), params after an SGD step when lr is set, and store state; and
    under "tied" what building a model with a tied embedding/head said."""
    torch.set_num_threads(1)
    out = {"tied": tied_case(rank, world)}
    for case in cases:
        name, use_2bp, chunks, m, lr = case[:5]
        # "fuse": costs where a fused backward is cheaper, so auto mixes B with P1/P2
        costs = dict(F=1, P1=1, P2=1, B=1.9, comm=0.02) if "fuse" in case[5:] else None
        sched = make_schedule(name, stages=world, microbatches=m, twobp=use_2bp, chunks=chunks, costs=costs,
                              layout="v" if "v" in case[5:] else "loop")
        if "fuse" in case[5:]:
            assert {a.kind for acts in sched.ranks for a in acts} >= {"B", "P1", "P2"}, sched
        if "fifo" in case[5:]:  # explicit form, receives in send order: what the executor runs on NCCL
            sched = receive_in_send_order(sched)
        ex = PipelineExecutor(build_blocks(seed), loss_fn, schedule=sched, timeout=60,
                              one_way_channels="channels" in case)
        opt = torch.optim.SGD(ex.parameters(), lr=lr) if lr is not None else None
        x, y = make_batch(seed, n)
        res = ex.step(x, y, optimizer=opt, measure=case in cases[:2])
        measured = (res.costs, res.timeline)
        small_loss = None
        if lr is None:
            if case == cases[0]:  # another batch shape: headers come back, then go again
                small_loss = ex.step(x[:-1], y[:-1], measure=False).loss
            # Again: this step sends without shape headers (learned in the first).
            res = ex.step(x, y, measure=False)
        out[case] = {
            "small_loss": small_loss,
            "loss": res.loss,
            "grads": {k: p.grad.clone() for k, p in ex.named_parameters() if p.grad is not None},
            "params": {k: p.detach().clone() for k, p in ex.named_parameters()},
            "store_empty": res.store_empty and ex.store.is_empty() and twobp.default_store().is_empty(),
            "peak_store_bytes": res.peak_store_bytes,
            "costs": measured[0],
            "trace": measured[1].to_trace() if measured[1] is not None else None,
        }
    return out


def die_or_hang(rank: int, world: int, mode: str) -> str:
    """Rank 1 dies before building its executor (``exit``) or builds it and never answers in
    the step (``hang``); rank 0 runs a step."""
    torch.set_num_threads(1)
    if rank == 1 and mode == "exit":
        os._exit(3)
    sched = make_schedule("1f1b", stages=world, microbatches=4, twobp=True)
    ex = PipelineExecutor(build_blocks(0), loss_fn, schedule=sched, timeout=3)
    if rank == 1:
        time.sleep(600)
    x, y = make_batch(0, 8)
    ex.step(x, y, measure=False)
    return "finished?"


def tied_blocks(seed: int, vocab: int = 11) -> list[nn.Module]:
    torch.manual_seed(seed)
    emb = nn.Embedding(vocab, D)
    head = twobp.TwoBPLinear(D, vocab, bias=False)
    head.weight = emb.weight  # tied input embedding and output head
    return [emb, nn.Sequential(twobp.TwoBPLinear(D, D), nn.Tanh()), twobp.TwoBPLinear(D, D), head]


def tied_case(rank: int, world: int) -> dict:
    """The tied embedding/head split over ``world`` ranks: one step's loss, and the tied
    weight's gradient on rank 0 (the sum over both uses after the executor's sync)."""
    sched = make_schedule("1f1b", stages=world, microbatches=2, twobp=True)
    ex = PipelineExecutor(tied_blocks(0), tied_loss, schedule=sched, timeout=60)
    ref = tied_reference(0, 5)
    res = ex.step(ref["ids"], ref["tgt"], measure=False)
    grad = ex.tied_parameters[0].grad.clone() if ex.tied_parameters else None
    return {"loss": res.loss, "grad": grad}


def tied_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())


def tied_reference(seed: int, n: int, t: int = 3, vocab: int = 11) -> dict:
    model = nn.Sequential(*tied_blocks(seed, vocab))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    tgt = torch.randint(0, vocab, (n, t), generator=g)
    loss = tied_loss(model(ids), tgt)
    loss.backward()
    return {"loss": float(loss.detach()), "ids": ids, "tgt": tgt,
            "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}


def run_single_rank(rank: int, world: int, seed: int, n: int) -> dict:
    """World of one: chunks on one rank hand activations over locally, and a tied
    embedding/head (both on this rank) is accepted and gets the sum of both gradients."""
    torch.set_num_threads(1)
    ref = tied_reference(seed, n)
    out = {}
    for name, use_2bp, chunks in [("interleaved-1f1b", True, 2), ("gpipe", False, 4),
                                  ("auto", True, 2)]:
        sched = make_schedule(name, stages=1, microbatches=3, twobp=use_2bp, chunks=chunks)
        ex = PipelineExecutor(tied_blocks(seed), tied_loss, schedule=sched, timeout=30)
        res = ex.step(ref["ids"], ref["tgt"], measure=True)
        out[sched.name] = {"loss": res.loss, "store_empty": res.store_empty,
                           "grads": {k: p.grad.clone() for k, p in ex.named_parameters()}}
    return out


def run_overlap(rank: int, world: int, seed: int, n: int, steps: int, name: str, m: int) -> dict:
    """Train ``steps`` AdamW steps (with an lr scheduler) twice from the same weights: with
    carried P2 (overlap_steps) and without. Returns both runs' losses and final weights,
    what each step carried, whether stepping the optimizer by hand was refused, and the
    timeline kinds of the carrying run's last step."""
    torch.set_num_threads(1)
    out = {}
    for overlap in (False, True):
        sched = make_schedule(name, stages=world, microbatches=m, twobp=True, overlap_steps=overlap,
                              costs={"F": 1.0, "P1": 1.2, "P2": 0.6})
        ex = PipelineExecutor(build_blocks(seed), loss_fn, schedule=sched, timeout=60, overlap_steps=overlap)
        opt = torch.optim.AdamW(ex.parameters(), lr=1e-2)
        lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        losses, carried, refused, kinds = [], [], None, None
        for step in range(steps):
            x, y = make_batch(seed + step, n)
            res = ex.step(x, y, optimizer=opt, lr_scheduler=lr_sched, measure=step == steps - 1)
            losses.append(res.loss)
            carried.append(res.carried)
            if step == 0 and ex.owes:
                try:
                    opt.step()
                    refused = "not refused"
                except RuntimeError as e:
                    refused = str(e)
            if res.timeline is not None:
                kinds = sorted({e.kind for e in res.timeline.events if e.rank == rank})
        ex.flush()
        out[overlap] = {
            "schedule": str(sched), "losses": losses, "carried": carried, "refused": refused,
            "kinds": kinds, "owes_after_flush": ex.owes, "lr": opt.param_groups[0]["lr"],
            "store_empty": ex.store.is_empty(),
            "params": {k: p.detach().clone() for k, p in ex.named_parameters()},
        }
    return out


def train_forever(rank: int, world: int, pid_dir: str, seconds: float = 120.0) -> int:
    """Write this rank's pid to ``pid_dir/rank<r>.pid``, then train 1F1B + 2BP steps for up to
    ``seconds`` (fault tests kill or stop a rank, or the launcher, meanwhile)."""
    from pathlib import Path

    torch.set_num_threads(1)
    sched = make_schedule("1f1b", stages=world, microbatches=4, twobp=True)
    ex = PipelineExecutor(build_blocks(0), loss_fn, schedule=sched, timeout=3)
    opt = torch.optim.SGD(ex.parameters(), lr=1e-3)
    x, y = make_batch(0, 8)
    ex.step(x, y, optimizer=opt, measure=False)
    Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    steps, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        ex.step(x, y, optimizer=opt, measure=False)
        steps += 1
    return steps


def run_dp(rank: int, world: int, pp: int, dp: int, cases: list[tuple], seed: int, n: int) -> dict:
    """pp x dp ranks: every (name, 2BP[, layout]) case one step on this replica's half of the batch;
    the loss averaged over replicas and this rank's gradients, by global name."""
    import torch.distributed as dist

    from twobp.pipeline import init_mesh, replica_slice

    torch.set_num_threads(1)
    mesh = init_mesh(pp=pp, dp=dp)
    out = {}
    for name, use_2bp, *layout in cases:
        layout = layout[0] if layout else "loop"
        chunks = 2 if name == "interleaved-1f1b" or layout == "v" else 1
        sched = make_schedule(name, stages=pp, microbatches=2 * pp, twobp=use_2bp, chunks=chunks, layout=layout)
        ex = PipelineExecutor(build_blocks(seed), loss_fn, schedule=sched, timeout=60, mesh=mesh, bucket_mb=1e-4)
        x, y = make_batch(seed, n)
        res = ex.step(replica_slice(x, mesh), replica_slice(y, mesh), measure=(name == "1f1b"))
        loss = torch.tensor(res.loss, dtype=torch.float64)
        dist.all_reduce(loss, group=mesh.get_group("dp"))
        out[(name, use_2bp, layout) if layout != "loop" else (name, use_2bp)] = {
            "loss": float(loss) / dp,
            "grads": {k: p.grad.clone() for k, p in ex.named_parameters() if p.grad is not None},
            "store_empty": res.store_empty and ex.store.is_empty(),
            "kinds": sorted({e.kind for e in res.timeline.events}) if res.timeline is not None else None,
        }
    return out


def run_tied_llama(rank: int, world: int, name: str, use_2bp: bool, steps: int) -> dict:
    """The llama model with tied embedding/head over ``world`` stages, each rank building only
    its own blocks: losses of ``steps`` AdamW steps and the tied copies after them."""
    from twobp import models
    from twobp.data import ByteCorpus
    from twobp.pipeline.partition import balance

    torch.set_num_threads(1)
    meta = models.build("llama", "tiny", device="meta", tie_embeddings=True)
    part = balance(len(meta.blocks()), world)
    mine = list(part.blocks_of(rank))
    model = models.build_blocks("llama", "tiny", blocks=mine, seed=5, tie_embeddings=True)
    sched = make_schedule(name, stages=world, microbatches=4, twobp=use_2bp)
    ex = PipelineExecutor(model.blocks(), model.loss_fn, schedule=sched, timeout=60, bounds=part.bounds)
    opt = torch.optim.AdamW(ex.parameters(), lr=1e-2)
    data = ByteCorpus(seq_len=model.config.seq_len + 1)
    losses = []
    for step in range(steps):
        x, y = data.batch(step, 8, seed=0)
        losses.append(ex.step(x, y, optimizer=opt, measure=False, clip_grad_norm=1.0).loss)
    ex.flush()
    return {"losses": losses, "tied": [p.detach().clone() for p in ex.tied_parameters],
            "materialised": sum(p.numel() for p in model.parameters() if not p.is_meta),
            "own": sum(p.numel() for i in mine for p in meta.blocks()[i].parameters())}


def run_dp_plans(rank: int, world: int, carry_on_replica0: bool, costs_by_replica: list[dict]) -> dict:
    """pp = 2 x dp = 2: ``agree_costs`` of each replica's own costs, then an executor whose 1F1B +
    2BP schedule carries P2 on replica 0 only (when asked), so the replicas' plans differ."""
    from twobp.pipeline import agree_costs, init_mesh

    torch.set_num_threads(1)
    mesh = init_mesh(pp=2, dp=2)
    replica = mesh.get_local_rank("dp")
    agreed = agree_costs(costs_by_replica[replica], mesh)
    sched = make_schedule("1f1b", stages=2, microbatches=4, twobp=True)
    if carry_on_replica0 and replica == 0:
        sched = sched.replace(carry=(0, 1))
    try:
        PipelineExecutor(build_blocks(7), loss_fn, schedule=sched, timeout=60, mesh=mesh, overlap_steps=True)
    except ValueError as e:
        return {"agreed": agreed, "error": str(e)}
    return {"agreed": agreed, "error": None}


def run_ranks_plans(rank: int, world: int, names: list[str]) -> str | None:
    """Each pipeline rank builds its executor with its own schedule name; the error text, if any."""
    torch.set_num_threads(1)
    sched = make_schedule(names[rank], stages=world, microbatches=4, twobp=True)
    try:
        PipelineExecutor(build_blocks(7), loss_fn, schedule=sched, timeout=60)
    except ValueError as e:
        return str(e)
    return None


# ---- what a user may change between or around steps (tests/pipeline/test_user_edits.py) ----
def two_batches(vocab: int = 11) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (4, 3), generator=g), torch.randint(0, vocab, (4, 3), generator=g))
            for _ in range(2)]


def accumulate_tied(rank: int, world: int, pp: int, dp: int, use_2bp: bool) -> dict:
    """Gradient accumulation over two step() calls (the second with zero_grad=False), the
    embedding tied to the head across ranks, pp x dp: this rank's gradients by global name."""
    from twobp.pipeline import init_mesh, replica_slice

    torch.set_num_threads(1)
    mesh = init_mesh(pp=pp, dp=dp)
    ex = PipelineExecutor(tied_blocks(0), tied_loss, schedule=make_schedule("1f1b", stages=pp, microbatches=2,
                                                                            twobp=use_2bp),
                          timeout=60, mesh=mesh, bucket_mb=1e-4)
    for i, (x, y) in enumerate(two_batches()):
        ex.step(replica_slice(x, mesh), replica_slice(y, mesh), measure=False, zero_grad=(i == 0))
    return {k: p.grad.clone() for k, p in ex.named_parameters()}


def padded_targets(vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets mostly ignored in the first rows only: the micro-batches count unequal numbers."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, 6), generator=g)
    tgt = torch.randint(0, vocab, (8, 6), generator=g)
    tgt[:3, 1:] = twobp.data.IGNORE_INDEX
    tgt[4, :] = twobp.data.IGNORE_INDEX  # a row that counts nothing at all
    return ids, tgt


def untied_blocks(seed: int) -> list[nn.Module]:
    blocks = tied_blocks(seed)
    blocks[3].weight = nn.Parameter(blocks[0].weight.detach().clone())
    return blocks


def counted_loss_step(rank: int, world: int, pp: int, dp: int, m: int) -> dict:
    """One step of a loss averaged over counted targets (twobp.hf.masked_lm_loss) on padded
    targets, pp x dp: the replica-mean loss and this rank's gradients."""
    import torch.distributed as dist

    from twobp.hf import masked_lm_loss
    from twobp.pipeline import init_mesh, replica_slice

    torch.set_num_threads(1)
    mesh = init_mesh(pp=pp, dp=dp)
    ex = PipelineExecutor(untied_blocks(0), masked_lm_loss, timeout=60, mesh=mesh, bucket_mb=1e-4,
                          schedule=make_schedule("1f1b", stages=pp, microbatches=m, twobp=True))
    ids, tgt = padded_targets()
    res = ex.step(replica_slice(ids, mesh), replica_slice(tgt, mesh), measure=False)
    loss = torch.tensor(res.loss, dtype=torch.float64)
    dist.all_reduce(loss, group=mesh.get_group("dp"))
    return {"loss": float(loss) / dp, "grads": {k: p.grad.clone() for k, p in ex.named_parameters()}}


def zero_grad_between_carried_steps(rank: int, world: int) -> str | None:
    """auto with carried P2; the user's optimizer.zero_grad() between two steps: the error
    text this rank ends with (None if none)."""
    torch.set_num_threads(1)
    sched = make_schedule("auto", stages=world, microbatches=4, twobp=True, overlap_steps=True,
                          costs={"F": 1.0, "P1": 1.2, "P2": 0.6})
    assert sched.carry, sched.carry
    ex = PipelineExecutor(build_blocks(0), loss_fn, schedule=sched, timeout=10, overlap_steps=True)
    opt = torch.optim.SGD(ex.parameters(), lr=0.1)
    try:
        for step in range(2):
            opt.zero_grad()  # the usual idiom, wrong while a step's P2 is carried
            x, y = make_batch(step, 8)
            ex.step(x, y, optimizer=opt, measure=False)
        ex.flush()
    except Exception as e:  # noqa: BLE001 - the parent reads every rank's outcome
        return f"{type(e).__name__}: {e}"
    return None


def different_cuts(rank: int, world: int) -> str | None:
    """Ranks given different stage bounds (as from block costs each measured on its own)."""
    torch.set_num_threads(1)
    bounds = (0, 3, N_BLOCKS) if rank == 0 else (0, 5, N_BLOCKS)
    try:
        PipelineExecutor(build_blocks(0), loss_fn, schedule=make_schedule("1f1b", stages=world, microbatches=2,
                                                                          twobp=True),
                         timeout=30, bounds=bounds)
    except ValueError as e:
        return str(e)
    return None


def different_tied_copies(rank: int, world: int) -> str | None:
    """Each rank builds the tied model from its own seed: the copies differ."""
    torch.set_num_threads(1)
    try:
        PipelineExecutor(tied_blocks(rank), tied_loss, timeout=30,
                         schedule=make_schedule("1f1b", stages=world, microbatches=2, twobp=True))
    except ValueError as e:
        return str(e)
    return None


_FAIL_ONCE = {"armed": False}


def _loss_failing_once(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if _FAIL_ONCE["armed"]:
        _FAIL_ONCE["armed"] = False
        raise RuntimeError("transient failure in the loss")
    return loss_fn(out, target)


def step_after_a_failed_step(rank: int, world: int) -> list[str]:
    """The last rank's loss raises in step 2; every rank catches it and steps again: what each
    attempt says."""
    torch.set_num_threads(1)
    ex = PipelineExecutor(build_blocks(0), _loss_failing_once, timeout=3,
                          schedule=make_schedule("1f1b", stages=world, microbatches=4, twobp=True))
    x, y = make_batch(0, 8)
    said = [f"ok {ex.step(x, y, measure=False).loss:.6f}"]
    _FAIL_ONCE["armed"] = rank == world - 1
    for _ in range(2):
        try:
            ex.step(x, y, measure=False)
            said.append("ok")
        except Exception as e:  # noqa: BLE001 - the parent reads what each attempt said
            said.append(str(e))
    return said


def scaler_skips_together(rank: int, world: int, carry: bool) -> dict:
    """fp16-style loss scaling where only rank 0 finds an inf (a hook poisons its LayerNorm's
    gradient in step 0): every rank must skip that optimizer step and count it, and take the
    next one. Returns this rank's skip counts and whether its weights moved, per step."""
    torch.set_num_threads(1)
    blocks = build_blocks(0)
    poison = {"on": True}
    blocks[2].weight.register_hook(lambda g: torch.full_like(g, float("inf")) if poison["on"] else g)
    if carry:
        sched = make_schedule("auto", stages=world, microbatches=4, twobp=True, overlap_steps=True,
                              costs={"F": 1.0, "P1": 1.2, "P2": 0.6})
        assert sched.carry, sched.carry
    else:
        sched = make_schedule("1f1b", stages=world, microbatches=4, twobp=True)
    ex = PipelineExecutor(blocks, loss_fn, schedule=sched, timeout=20, overlap_steps=carry)
    opt = torch.optim.SGD(ex.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    out = {"skipped": [], "moved": [], "scale": []}
    for step in range(3):
        before = [p.detach().clone() for p in ex.parameters()]
        ex.step(*make_batch(step, 8), optimizer=opt, grad_scaler=scaler, measure=False)
        if step == 2:
            ex.flush()
        poison["on"] = False
        out["skipped"].append(ex.skipped_steps)
        out["moved"].append(any(not torch.equal(b, p) for b, p in zip(before, ex.parameters())))
        out["scale"].append(float(scaler.get_scale()))
    return out
