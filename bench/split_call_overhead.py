"""One split linear call with cold caches: what the split machinery costs around the GEMM.

A stage's split forward measures 1-4% above torch's modules (`bench/stage_overhead.py`),
more than the Python a split call costs with warm caches (run it at a tiny shape, e.g.
``--rows 2 --in-features 16 --out-features 16``, to see that figure). In a model every op call
follows a GEMM that has pushed the interpreter's code and data out of the caches, so each
Python operation costs several times its warm figure. This bench reproduces that: one
linear at a model's shape (llama/small's gate projection by default: 2 x 256 rows,
512 -> 1376, no bias), timed one call at a time with a GEMM between calls, contenders in
shuffled order per round, medians:

* **F split**: the twin's forward inside ``split_backward`` (the region opened outside
  the timer, as a stage opens it once for all its ops);
* **F torch**: ``nn.Linear`` on the same weight (torch's own autograd node);
* **F inner**: the ``F.linear`` the split forward itself calls, timed inside it: the
  GEMM alone, so ``F split - F inner`` is the Python around it;
* **P1**, **P2**: the split backward's two halves; **B torch**: torch's fused backward.

    python bench/split_call_overhead.py [--rounds 300] [--rows 512] [--out PATH]
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

from twobp.benchmarks.args import positive_int


def measure(rows: int, k: int, n: int, rounds: int, warmup: int = 20) -> dict[str, float]:
    """Median microseconds per call of each part (keys: see the module docstring)."""
    import torch

    import twobp
    import twobp.ops.linear as linear_op

    torch.set_num_threads(1)
    twobp.keep_freed_host_memory()
    torch.manual_seed(0)
    ours = twobp.TwoBPLinear(k, n, bias=False)
    theirs = torch.nn.Linear(k, n, bias=False)
    theirs.weight = ours.weight
    x = torch.randn(rows, k, requires_grad=True)
    dy = torch.randn(rows, n)
    store = twobp.ActivationStore()
    times: dict[str, list[float]] = {part: [] for part in ("F split", "F inner", "F torch", "P1", "P2", "B torch")}
    gemm = linear_op.linear_fwd_ref

    def timed_gemm(*args):
        t0 = time.perf_counter()
        y = gemm(*args)
        times["F inner"].append(time.perf_counter() - t0)
        return y

    def split():
        with twobp.split_backward(microbatch=0, store=store):
            t0 = time.perf_counter()
            y = ours(x)
            t1 = time.perf_counter()
        t2 = time.perf_counter()
        y.backward(dy)
        t3 = time.perf_counter()
        twobp.backward_p2(ours, microbatches=[0], store=store)
        t4 = time.perf_counter()
        times["F split"].append(t1 - t0)
        times["P1"].append(t3 - t2)
        times["P2"].append(t4 - t3)

    def plain():
        t0 = time.perf_counter()
        y = theirs(x)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        times["F torch"].append(t1 - t0)
        times["B torch"].append(t2 - t1)

    contenders = [split, plain]
    rng = random.Random(0)
    linear_op.linear_fwd_ref = timed_gemm
    try:
        for i in range(warmup + rounds):
            if i == warmup:
                for v in times.values():
                    v.clear()
            rng.shuffle(contenders)
            for fn in contenders:
                fn()
            ours.weight.grad = None
            x.grad = None
    finally:
        linear_op.linear_fwd_ref = gemm
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def report(med: dict[str, float], rows: int, k: int, n: int, rounds: int, command: str) -> str:
    import torch

    from twobp.benchmarks.timing import machine_name

    around = med["F split"] - med["F inner"]
    lines = ["# One split linear call, cold caches", "",
             f"- machine: {machine_name(torch.device('cpu'))}, 1 thread; torch {torch.__version__}",
             f"- command: `{command}`",
             f"- shape: x [{rows}, {k}], W [{n}, {k}], no bias; {rounds} rounds, a GEMM between any two calls; "
             "medians in microseconds",
             "",
             "| F torch | F split | F inner (its GEMM) | F split - F inner | B torch | P1 | P2 | P1 + P2 - B torch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {med['F torch']:.0f} | {med['F split']:.0f} ({med['F split'] / med['F torch']:.3f}x) | "
             f"{med['F inner']:.0f} | {around:.0f} | {med['B torch']:.0f} | {med['P1']:.0f} | {med['P2']:.0f} | "
             f"{med['P1'] + med['P2'] - med['B torch']:.0f} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=positive_int, default=512, help="rows of x (default 512: 2 x 256 tokens)")
    ap.add_argument("--in-features", type=positive_int, default=512, help="K (default 512)")
    ap.add_argument("--out-features", type=positive_int, default=1376, help="N (default 1376)")
    ap.add_argument("--rounds", type=positive_int, default=300, help="timed rounds (default 300)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = ap.parse_args(argv)
    med = measure(args.rows, args.in_features, args.out_features, args.rounds)
    command = "python bench/split_call_overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report(med, args.rows, args.in_features, args.out_features, args.rounds, command)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
