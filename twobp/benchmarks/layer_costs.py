"""Per-layer F / P1 / P2 times of the model blocks, and the pipeline gain they predict.

A block's costs are measured on one device:

* ``F``: forward inside ``split_backward`` (saves what p1 and p2 need);
* ``P1``: the backward of that graph: input gradients only;
* ``P2``: ``backward_p2``: every weight gradient of the block;
* ``B``: the fused backward of a plain (unsplit) forward, the baseline's backward.

A stage of ``L / p`` blocks then costs ``L / p`` times that, and the simulator runs the
paper's schedules on those costs: this **predicts** the multi-GPU throughput gain of 2BP
from single-GPU measurements (communication taken as free; embedding and head ignored).
It is labelled a prediction everywhere it is printed.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..split import backward_p2, split_backward

__all__ = ["BlockCosts", "GPU_MICROBATCH", "default_microbatch", "measure_block", "measure_blocks",
           "prediction_markdown", "predict_pipeline_gain", "write_layers"]


class BlockCosts(dict):
    """{'F', 'P1', 'P2', 'B'} in seconds, medians over repetitions."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure_block(block: nn.Module, make_input: Callable[[], torch.Tensor], *, device: torch.device,
                  reps: int = 5, warmup: int = 2) -> BlockCosts:
    """Median F, P1, P2 and fused B of ``block`` on inputs from ``make_input()``."""
    times: dict[str, list[float]] = {"F": [], "P1": [], "P2": [], "B": []}
    for i in range(warmup + reps):
        x = make_input().requires_grad_()
        out: dict[str, torch.Tensor] = {}

        def fwd():
            with split_backward(microbatch=i):
                out["y"] = block(x)

        t_f = _timed(fwd, device)
        dy = torch.randn_like(out["y"])
        t_p1 = _timed(lambda: out["y"].backward(dy), device)
        t_p2 = _timed(lambda: backward_p2(block), device)
        y = block(x)
        t_b = _timed(lambda: y.backward(dy), device)
        block.zero_grad(set_to_none=True)
        if i >= warmup:
            for k, v in zip(("F", "P1", "P2", "B"), (t_f, t_p1, t_p2, t_b)):
                times[k].append(v)
    return BlockCosts({k: statistics.median(v) for k, v in times.items()})


GPU_MICROBATCH = 8
"""Sequences per micro-batch when blocks are timed on a GPU. With one 1024-token sequence an H200
spent 76-97% of a LLaMa-7B or BERT-Large block's wall time on the host (launches, Python), so
its costs measured the host, not the split; eight put LLaMa-7B's kernels at 81-88% of the wall
(bench/results/h200-2026-12-04/README.md)."""


def _blocks_to_measure(device: torch.device, dry_run: bool, batch: int = 1):
    """(label, block, input maker, blocks in the model) for the paper's models: LLaMa-7B,
    BERT-Large and Mamba-1.4B (a micro Mamba in a dry run: its scan under the interpreter
    walks time element by element)."""
    from ..models import config
    from ..models.bert import EncoderBlock
    from ..models.llama import DecoderBlock
    from ..models.mamba import MambaBlock

    dtype = torch.float32 if dry_run else torch.bfloat16
    preset_l, preset_b, preset_m = ("tiny", "tiny", "tiny") if dry_run else ("7b", "large", "1.4b")
    lc, bc = config("llama", preset_l), config("bert", preset_b)
    mc = config("mamba", preset_m, **(dict(d_model=16, d_state=4, seq_len=16, scan_chunk=16) if dry_run else {}))
    out = []
    for label, cfg, cls in ((f"llama-{preset_l}", lc, DecoderBlock), (f"bert-{preset_b}", bc, EncoderBlock),
                            (f"mamba-{preset_m}", mc, MambaBlock)):
        block = cls(cfg, device=device, dtype=dtype)
        seq, dim = cfg.seq_len, getattr(cfg, "dim", None) or cfg.d_model

        def make(dim=dim, seq=seq):
            return torch.randn(batch, seq, dim, device=device, dtype=dtype)

        out.append((label, block, make, cfg.n_layers, seq))
    return out


def default_microbatch(device: torch.device) -> int:
    """Sequences per timed micro-batch: GPU_MICROBATCH on a GPU, one elsewhere."""
    return GPU_MICROBATCH if device.type == "cuda" else 1


def measure_blocks(*, device: torch.device, dry_run: bool = False, batch: int | None = None,
                   progress=print) -> list[tuple]:
    """[(label, seq, n_layers, BlockCosts)] of one LLaMa-7B, one BERT-Large and one Mamba-1.4B block
    (tiny ones in a dry run), micro-batch of ``batch`` sequences (default_microbatch)."""
    batch = default_microbatch(device) if batch is None else batch
    rows = []
    for label, block, make, n_layers, seq in _blocks_to_measure(device, dry_run, batch):
        c = measure_block(block, make, device=device, reps=2 if dry_run else 5, warmup=1 if dry_run else 2)
        progress(f"  {label}: F {c['F'] * 1e3:.2f} ms, P1 {c['P1'] * 1e3:.2f} ms, P2 {c['P2'] * 1e3:.2f} ms, "
                 f"fused B {c['B'] * 1e3:.2f} ms")
        rows.append((label, seq, n_layers, c))
    return rows


def write_layers(rows: list[tuple], path: Path) -> None:
    """The measured block costs as CSV."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "seq", "F_ms", "P1_ms", "P2_ms", "B_ms"])
        for label, seq, _, c in rows:
            w.writerow([label, seq, *(f"{c[k] * 1e3:.4f}" for k in ("F", "P1", "P2", "B"))])


def prediction_markdown(rows: list[tuple], *, device: torch.device, stages: int = 4,
                        batch: int = 1) -> tuple[str, list[str]]:
    """The simulator's prediction for ``stages`` stages from measured block costs: (markdown,
    one summary line per model)."""
    from ..pipeline import make_schedule, simulate

    lines = ["## Per-layer costs and the predicted pipeline gain (PREDICTION, not a multi-GPU measurement)", "",
             f"One block per model, micro-batch of {batch} sequence{'s' if batch > 1 else ''}, timed on {device}; "
             "a stage holds "
             f"n_layers/{stages} blocks; the simulator runs each schedule on those costs with free "
             "communication. Gain = predicted throughput / plain 1F1B's.", ""]
    short = []
    for label, seq, n_layers, c in rows:
        per_stage = max(1, n_layers // stages)
        costs = {k: per_stage * c[k] for k in ("F", "P1", "P2", "B")}
        lines += [f"### {label}: F {c['F'] * 1e3:.2f} ms, P1 {c['P1'] * 1e3:.2f} ms, P2 {c['P2'] * 1e3:.2f} ms, "
                  f"fused B {c['B'] * 1e3:.2f} ms per block ({per_stage} blocks per stage)", "",
                  "| schedule | 2BP | microbatches | predicted makespan ms | bubble | predicted gain vs 1F1B |",
                  "|---|---|---:|---:|---:|---:|"]
        for m in (stages, 2 * stages):
            base = simulate(make_schedule("1f1b", stages=stages, microbatches=m, twobp=False), costs)
            gains = {}
            for name, twobp in (("gpipe", False), ("gpipe", True), ("1f1b", False), ("1f1b", True),
                                ("zb-h1", True), ("auto", True)):
                sched = make_schedule(name, stages=stages, microbatches=m, twobp=twobp, costs=costs)
                r = simulate(sched, costs)
                gains[(name, twobp)] = base.makespan / r.makespan
                lines.append(f"| {name} | {'yes' if twobp else 'no'} | {m} | {r.makespan * 1e3:.1f} | "
                             f"{r.bubble_fraction:.1%} | {gains[(name, twobp)]:.2f}x |")
            if m == 2 * stages:
                short.append(f"{label}, {stages} stages x {m} micro-batches: 1F1B+2BP {gains[('1f1b', True)]:.2f}x, "
                             f"ZB-H1 {gains[('zb-h1', True)]:.2f}x, auto {gains[('auto', True)]:.2f}x vs 1F1B "
                             "(PREDICTED)")
        lines.append("")
    return "\n".join(lines), short


def predict_pipeline_gain(*, device: torch.device, out: Path, dry_run: bool = False, stages: int = 4) -> str:
    """Measure block costs, write layers.csv and prediction.md, return the markdown."""
    batch = default_microbatch(device)
    rows = measure_blocks(device=device, dry_run=dry_run, batch=batch)
    write_layers(rows, out / "layers.csv")
    text, _ = prediction_markdown(rows, device=device, stages=stages, batch=batch)
    (out / "prediction.md").write_text(text + "\n")
    return text
