"""PREDICTED step times of the 2BP paper's setting (LLaMa-7B, 4 pipeline stages, and 4
stages x 2 data-parallel replicas) from the simulator, data-parallel all-reduce included.

Nothing here is measured. Per-stage F / P1 / P2 come from FLOP counts at an assumed
achieved throughput per GPU; the all-reduce from gradient bytes at an assumed bus
bandwidth. Every assumption is a flag and is printed with the table. When a GPU check has
run (``bench/gpu_check.sh``), feed its measured per-block costs instead (``--costs-json``).

FLOPs per micro-batch of T tokens on a stage whose matmuls hold N parameters and which
has L attention layers (dim d, causal):

* F  = 2 N T + 2 L T^2 d            (GEMMs; QK^T and AV at half for the causal mask)
* P1 = 2 N T + 5 L T^2 d            (dX GEMMs; attention backward ~2.5x its forward, all dX)
* P2 = 2 N T                        (dW GEMMs)
* all-reduce = 2 (dp - 1) / dp x grad bytes of the stage / bus bandwidth   (ring)

    python bench/predict_llama7b.py --out bench/results/predicted-llama7b.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from twobp import models
from twobp.pipeline import Costs, make_schedule, simulate
from twobp.pipeline.overlap import period
from twobp.pipeline.partition import balance


def stage_flops(stages: int, tokens: int) -> list[tuple[float, float, float, int]]:
    """(F, P1, P2 FLOPs, parameters) per stage of LLaMa-7B cut by block count."""
    model = models.build("llama", "7b", device="meta")
    cfg = model.config
    blocks = model.blocks()
    part = balance(len(blocks), stages)
    out = []
    for s in range(stages):
        n_mm = n_all = layers = 0
        for i in part.blocks_of(s):
            b = blocks[i]
            n = sum(p.numel() for p in b.parameters())
            n_all += n
            if i == 0:
                continue  # the embedding is a lookup: no matmul FLOPs
            n_mm += sum(p.numel() for p in b.parameters() if p.dim() > 1)
            layers += 1 if i < len(blocks) - 1 else 0
        attn = layers * tokens * tokens * cfg.dim
        out.append((2 * n_mm * tokens + 2 * attn, 2 * n_mm * tokens + 5 * attn, 2 * n_mm * tokens, n_all))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch (one sequence of 1024)")
    p.add_argument("--tflops", type=float, default=600.0,
                   help="assumed achieved dense bf16 TFLOP/s per GPU (H100 peak 989; ~795 reached in practice)")
    p.add_argument("--busbw", type=float, default=150.0, help="assumed all-reduce bus bandwidth, GB/s")
    p.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient element (fp32 master gradients)")
    p.add_argument("--comm", type=float, default=20e-6, help="assumed point-to-point latency between stages, s")
    p.add_argument("--out", default="bench/results/predicted-llama7b.md")
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])

    per = stage_flops(args.stages, args.tokens)
    rate = args.tflops * 1e12
    lines = ["# PREDICTED: LLaMa-7B, 2BP pipeline schedules, from the simulator (not measured)", "",
             f"- command: `{command}`",
             f"- assumptions: {args.tflops:g} TFLOP/s achieved per GPU, micro-batch = {args.tokens} tokens, "
             f"m = {args.microbatches}, p2p latency {args.comm * 1e6:g} us, all-reduce bus bandwidth "
             f"{args.busbw:g} GB/s on {args.grad_bytes}-byte gradients",
             "- per-stage costs (ms per micro-batch): "
             + "; ".join(f"stage {s}: F {f / rate * 1e3:.2f}, P1 {a / rate * 1e3:.2f}, P2 {w / rate * 1e3:.2f}, "
                         f"{n / 1e9:.2f} B params" for s, (f, a, w, n) in enumerate(per)),
             ""]
    rows = {}
    for dp in (1, 2):
        ar = [2 * (dp - 1) / dp * args.grad_bytes * n / (args.busbw * 1e9) for *_, n in per]
        costs = Costs(F=[f / rate for f, *_ in per], P1=[a / rate for _, a, _, _ in per],
                      P2=[w / rate for _, _, w, _ in per], comm=args.comm, allreduce=ar)
        lines += [f"## {args.stages} stages x {dp} replica{'s' if dp > 1 else ''}"
                  + (f" (all-reduce {max(ar) * 1e3:.1f} ms per stage, overlapped where the schedule allows)"
                     if dp > 1 else ""), "",
                  "| schedule | carry | step (ms) | vs 1F1B | tokens/s per GPU |", "|---|---|---:|---:|---:|"]
        base = None
        for name, twobp, carry in (("1f1b", False, False), ("1f1b", True, False), ("zb-h1", True, False),
                                   ("auto", True, False), ("auto", True, True)):
            if carry and dp > 1:
                continue  # the period model has no all-reduce: carried P2 is shown for one pipeline
            sched = make_schedule(name, stages=args.stages, microbatches=args.microbatches, twobp=twobp,
                                  costs=costs, overlap_steps=carry)
            step = period(sched, costs) if carry else simulate(sched, costs).makespan
            base = base or step
            label = f"{name}{' +2BP' if twobp else ''}"
            tps = args.microbatches * args.tokens / step / args.stages
            rows[(dp, label, carry)] = step
            lines.append(f"| {label} | {list(sched.carry) if sched.carry else '-'} | {step * 1e3:.1f} | "
                         f"{base / step:.3f}x | {tps:,.0f} |")
        lines.append("")
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({f"dp{k[0]} {k[1]}{' carry' if k[2] else ''}": v
                                                             for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
