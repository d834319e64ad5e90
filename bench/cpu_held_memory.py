"""What holding activations costs on a CPU, with glibc's default malloc and with freed memory kept.

One process, one thread, one whole model (no pipeline): m micro-batches run three ways,
  1f1b   F then the fused backward, one micro-batch at a time (nothing held across micro-batches);
  each   split: F, P1, P2 one micro-batch at a time;
  hold   split, all m forwards first, then every P1, then one batched P2 (2BP's peak: what the
         first pipeline stage holds under 1F1B + 2BP or auto at p = 2);
each timed per phase with the process's minor page faults counted, in fresh processes with
glibc's default malloc and with ``twobp.keep_freed_host_memory()``, alternating (``--pairs``). The work is identical in all
three orders, so any difference between them is what the held memory costs.

    python bench/cpu_held_memory.py [--model resnet|llama] [--microbatches 8] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"resnet": ("cpu", 4), "llama": ("small", 2)}  # preset, rows per micro-batch


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(model_name: str, m: int, keep: bool, rounds: int) -> dict:
    import torch

    import twobp
    from twobp import backward_p2, split_backward
    from twobp.models import build
    from twobp.train import batch_source

    torch.set_num_threads(1)
    if keep and not twobp.keep_freed_host_memory(force=True):
        raise SystemExit("cpu_held_memory: this process's malloc is not glibc's, so there is nothing to "
                         "tune; run it on Linux with glibc")
    preset, rows = SIZES[model_name]
    torch.manual_seed(0)
    model = build(model_name, preset)
    data = batch_source(model_name, model)
    mbs = [data.batch(k, rows, seed=0) for k in range(m)]

    def loss(x, y):
        return model.loss_fn(model(x), y)

    def run(order: str) -> dict:
        t = {"F": 0.0, "B": 0.0, "P2": 0.0}
        f0 = _faults()
        if order == "1f1b":
            for x, y in mbs:
                t0 = time.perf_counter(); out = loss(x, y); t["F"] += time.perf_counter() - t0
                t0 = time.perf_counter(); out.backward(); t["B"] += time.perf_counter() - t0
        elif order == "each":
            for k, (x, y) in enumerate(mbs):
                t0 = time.perf_counter()
                with split_backward(microbatch=k):
                    out = loss(x, y)
                t["F"] += time.perf_counter() - t0
                t0 = time.perf_counter(); out.backward(); t["B"] += time.perf_counter() - t0
                t0 = time.perf_counter(); backward_p2(model); t["P2"] += time.perf_counter() - t0
        else:
            outs = []
            for k, (x, y) in enumerate(mbs):
                t0 = time.perf_counter()
                with split_backward(microbatch=k):
                    outs.append(loss(x, y))
                t["F"] += time.perf_counter() - t0
            for out in outs:
                t0 = time.perf_counter(); out.backward(); t["B"] += time.perf_counter() - t0
            del outs
            t0 = time.perf_counter(); backward_p2(model); t["P2"] += time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        t["faults"] = _faults() - f0
        return t

    got: dict[str, list[dict]] = {o: [] for o in ("1f1b", "each", "hold")}
    for r in range(rounds + 1):  # the first round warms up
        for order in got:
            res = run(order)
            if r:
                got[order].append(res)
    return {o: {k: statistics.median(x[k] for x in v) for k in v[0]} for o, v in got.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", choices=sorted(SIZES), default="resnet")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per process (medians)")
    ap.add_argument("--pairs", type=int, default=3, help="processes per allocator, alternating (medians)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    ap.add_argument("--child", choices=("keep", "default"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(args.microbatches, args.rounds, args.pairs) < 1:
        ap.error("--microbatches, --rounds and --pairs must be >= 1")
    if args.child:
        print(json.dumps(child(args.model, args.microbatches, args.child == "keep", args.rounds)))
        return 0
    # The allocator is per process, so the two are compared across processes: alternate them,
    # --pairs times, and take medians, so the machine's drift lands on both alike.
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    for pair in range(args.pairs):
        for alloc in ("default", "keep") if pair % 2 == 0 else ("keep", "default"):
            cmd = [sys.executable, __file__, "--model", args.model, "--microbatches", str(args.microbatches),
                   "--rounds", str(args.rounds), "--child", alloc]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            runs[alloc].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"pair {pair + 1}/{args.pairs}: {alloc} done", flush=True)
    results = {a: {o: {k: statistics.median(r[o][k] for r in rs) for k in rs[0][o]} for o in rs[0]}
               for a, rs in runs.items()}
    import torch

    from twobp.benchmarks.timing import machine_name

    torch.set_num_threads(1)  # as the timed children ran, so the machine line says so
    preset, rows = SIZES[args.model]
    lines = [f"Machine: {machine_name(torch.device('cpu'))}; torch {torch.__version__}; "
             f"{args.model}/{preset}, {args.microbatches} micro-batches of {rows}; medians of {args.rounds} rounds in each of "
             f"{args.pairs} processes per allocator, alternating; "
             f"`python bench/cpu_held_memory.py --model {args.model} --microbatches {args.microbatches}`", "",
             "| malloc | order | F ms | B or P1 ms | P2 ms | total ms | vs 1f1b, same malloc | minor page faults |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for alloc, by in results.items():
        base = sum(by["1f1b"][k] for k in ("F", "B", "P2"))
        for order, t in by.items():
            total = t["F"] + t["B"] + t["P2"]
            lines.append(f"| {'glibc default' if alloc == 'default' else 'freed memory kept'} | {order} | "
                         f"{t['F'] * 1e3:.0f} | {t['B'] * 1e3:.0f} | {t['P2'] * 1e3:.0f} | {total * 1e3:.0f} | "
                         f"{base / total:.3f}x | {t['faults']:,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
