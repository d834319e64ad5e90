"""Per-block F / P1 / P2 of a Mamba block, the selective scan's own split costs, and the
4-stage pipeline gain they PREDICT.

Measured on one device (``--device cuda`` runs the Triton kernels, ``cpu`` the torch
reference), one micro-batch of one sequence:

* one Mamba block (RMSNorm, in_proj, conv, x_proj, dt_proj, scan, out_proj, residual):
  F (split forward), P1 (input gradients), P2 (every weight gradient, ``backward_p2``) and
  B (the fused backward of a plain forward), medians of ``--reps`` timed repetitions after
  ``--warmup`` (``twobp.benchmarks.layer_costs.measure_block``); once as the model runs it
  (``scan_dparams_in_p1``, the default: p1's walk also reduces dA_log and dD, p2 only adds
  them) and once with the scan's p2 recomputing them from the boundary states;
* the scan alone: forward, p1 (du, dΔ, dB, dC), p2 (dA_log, dD, recomputed from the saved
  boundary states) and the fused walk (all six at once, what the unsplit backward runs).
  **Extra compute the split pays** = p1 + p2 - fused: p2's second walk over time.

The simulator then runs 1F1B, 1F1B +2BP, ZB-H1 and auto on a stage of n_layers / stages
blocks (free communication, embedding and head left out): a PREDICTION of the multi-GPU
gain from single-device costs, labelled so wherever it is printed.

    python bench/mamba_block_costs.py --device cuda --out bench/results/mamba-<card>   # the 1.4b block, bf16
    python bench/mamba_block_costs.py --device cpu --dtype fp32 --out ...            # torch reference on CPU
    python bench/mamba_block_costs.py --dry-run                                      # tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from twobp import models
from twobp.benchmarks.layer_costs import measure_block
from twobp.models.mamba import MambaBlock
from twobp.ops.scan import SelectiveScanOp, scan_boundary_states
from twobp.pipeline import make_schedule, simulate

# ---- settings ---------------------------------------------------------------------------
PRESET = "1.4b"  # Mamba-1.4B: d_model 2048, 48 layers, d_state 16, expand 2, seq 1024
STAGES = 4
MICROBATCHES = (4, 8)
SCHEDULES = (("1f1b", False), ("1f1b", True), ("zb-h1", True), ("auto", True))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, reps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_scan(cfg, *, device: torch.device, dtype: torch.dtype, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds of the scan's forward, p1, p2 and fused walk at the block's shapes (one sequence)."""
    E, N, L = cfg.d_inner, cfg.d_state, cfg.seq_len
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, L, E, generator=g).to(device, dtype)
    delta = torch.nn.functional.softplus(torch.randn(1, L, E, generator=g) - 3).to(device, dtype)
    B, C = (torch.randn(1, L, N, generator=g).to(device, dtype) for _ in range(2))
    A_log = torch.log(torch.arange(1.0, N + 1)).expand(E, N).contiguous().to(device).requires_grad_()
    D = torch.ones(E, device=device, requires_grad=True)
    dy = torch.randn(1, L, E, generator=g).to(device, dtype)
    op = SelectiveScanOp(chunk=cfg.scan_chunk)
    params = (A_log, D)
    _, p1, p2 = op.forward((u, delta, B, C), params, save_p1=True, save_p2=True)
    grads = [torch.zeros_like(A_log), torch.zeros_like(D)]
    needs = (True,) * 4
    return {
        "fwd": _median_time(lambda: op.forward((u, delta, B, C), params, save_p1=True, save_p2=True),
                            device, reps, warmup),
        "p1": _median_time(lambda: op.input_grads(dy, p1, params, needs), device, reps, warmup),
        "p2": _median_time(lambda: op.param_grads([dy], [p2], grads), device, reps, warmup),
        "fused": _median_time(lambda: op.fused_grads(dy, p1, p2, params, needs, (True, True)), device, reps, warmup),
    }


def predict(costs_block: dict[str, float], n_layers: int) -> list[tuple]:
    """[(schedule, 2BP, micro-batches, makespan s, bubble, gain vs 1F1B)] for STAGES stages: PREDICTED."""
    per_stage = max(1, n_layers // STAGES)
    costs = {k: per_stage * costs_block[k] for k in ("F", "P1", "P2", "B")}
    rows = []
    for m in MICROBATCHES:
        base = simulate(make_schedule("1f1b", stages=STAGES, microbatches=m, twobp=False), costs)
        for name, twobp in SCHEDULES:
            r = simulate(make_schedule(name, stages=STAGES, microbatches=m, twobp=twobp, costs=costs), costs)
            rows.append((name, twobp, m, r.makespan, r.bubble_fraction, base.makespan / r.makespan))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--preset", default=PRESET)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--dry-run", action="store_true", help="the tiny preset on CPU, 1 rep: checks the script")
    ap.add_argument("--out", type=Path, default=None, help="folder for mamba_block.md and mamba_block.csv")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.preset, args.reps, args.warmup = "cpu", "tiny", 1, 1
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = models.config("mamba", args.preset)
    from twobp.backend import resolve_backend

    backend = {"triton": "Triton kernels", "torch": "torch reference"}[resolve_backend(device)]
    if backend == "Triton kernels" and device.type == "cpu":
        backend += " under the interpreter (times mean nothing)"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"mamba/{args.preset} block on {device} ({where}, {backend}), {str(dtype).replace('torch.', '')}, "
          f"1 sequence of {cfg.seq_len} tokens; {args.reps} reps after {args.warmup} warm-up", flush=True)

    def block_costs(block_cfg):
        torch.manual_seed(0)
        block = MambaBlock(block_cfg, device=device, dtype=dtype)
        for p in block.mixer.scan.parameters():  # A_log, D in fp32, as Mamba keeps them
            p.data = p.data.float()
        return measure_block(block, lambda: torch.randn(1, cfg.seq_len, cfg.d_model, device=device, dtype=dtype),
                             device=device, reps=args.reps, warmup=args.warmup)

    c = block_costs(cfg)  # the model's default: the scan's dparams reduced in p1
    cp = block_costs(models.config("mamba", args.preset, scan_dparams_in_p1=not cfg.scan_dparams_in_p1))
    s = measure_scan(cfg, device=device, dtype=dtype, reps=args.reps, warmup=args.warmup)
    extra = s["p1"] + s["p2"] - s["fused"]
    H = scan_boundary_states(cfg.seq_len, cfg.scan_chunk) * cfg.d_inner * cfg.d_state * 4
    all_h = cfg.seq_len * cfg.d_inner * cfg.d_state * 4
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    lines = [
        f"# Mamba/{args.preset} block: F / P1 / P2, and the predicted {STAGES}-stage gain", "",
        f"{datetime.date.today()}, {device} ({where}), {backend}, {str(dtype).replace('torch.', '')}, "
        f"torch {torch.__version__}; one sequence of {cfg.seq_len} tokens; medians of {args.reps} reps.",
        f"Command: `python bench/mamba_block_costs.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        "| what | F ms | P1 ms | P2 ms | fused B ms | P1 + P2 vs B |", "|---|---:|---:|---:|---:|---:|",
        f"| one block (scan dparams in p1, the default) | {ms(c['F'])} | {ms(c['P1'])} | {ms(c['P2'])} | {ms(c['B'])} | "
        f"{(c['P1'] + c['P2']) / c['B']:.2f}x |",
        f"| one block, scan p2 recomputes | {ms(cp['F'])} | {ms(cp['P1'])} | {ms(cp['P2'])} | {ms(cp['B'])} | "
        f"{(cp['P1'] + cp['P2']) / cp['B']:.2f}x |",
        f"| its scan | {ms(s['fwd'])} | {ms(s['p1'])} | {ms(s['p2'])} | {ms(s['fused'])} | "
        f"{(s['p1'] + s['p2']) / s['fused']:.2f}x |", "",
        f"The scan's split pays {ms(extra)} ms more than its fused walk (p1 + p2 - fused), "
        f"{extra / s['fused']:.0%} of the fused walk, {extra / (c['P1'] + c['P2']):.1%} of the block's P1 + P2: "
        f"p2 walks time again to recompute the states (from boundary states every {cfg.scan_chunk} steps: "
        f"{H / 2**20:.2f} MiB per sequence against {all_h / 2**20:.2f} MiB for every state) and s.", "",
        f"## PREDICTED, not measured: {STAGES} stages of {max(1, cfg.n_layers // STAGES)} blocks "
        "(simulator on the costs above, free communication, embedding and head left out)", "",
        "| schedule | 2BP | micro-batches | predicted step ms | bubble | predicted gain vs 1F1B |",
        "|---|---|---:|---:|---:|---:|"]
    rows = predict(c, cfg.n_layers)
    for name, twobp, m, makespan, bubble, gain in rows:
        lines.append(f"| {name} | {'yes' if twobp else 'no'} | {m} | {makespan * 1e3:.1f} | {bubble:.1%} | {gain:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mamba_block.md").write_text(text)
        with (args.out / "mamba_block.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["what", "F_ms", "P1_ms", "P2_ms", "B_ms"])
            w.writerow([f"mamba-{args.preset} block", *(ms(c[k]) for k in ("F", "P1", "P2", "B"))])
            w.writerow([f"mamba-{args.preset} block scan-p2-recomputes", *(ms(cp[k]) for k in ("F", "P1", "P2", "B"))])
            w.writerow([f"mamba-{args.preset} scan", *(ms(s[k]) for k in ("fwd", "p1", "p2", "fused"))])
        print(f"wrote {args.out / 'mamba_block.md'} and mamba_block.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
