"""What a 2-core CPU leaves for a pipeline schedule to win: GEMM headroom, batched P2, contention.

Issue 8 asks our best 2BP schedule for 1.10x the best of torch's schedules on 2 ranks x 1 thread.
Both runtimes call the same aten kernels, so a schedule can only win the time torch's schedule
leaves idle, unless our ops are faster. This bench measures the three things that decide whether
they can be, at llama/small's shapes (one thread, fp32):

1. **GEMM headroom.** GFLOP/s of every linear's forward / dX / dW GEMM at the model's shapes
   against a large square GEMM on the same core (the practical peak). Near 1.0 means no
   kernel of ours could do the model's GEMMs faster on this core.
2. **Batched P2.** The weight gradients of m micro-batches as one GEMM over the concatenated
   rows (what the 2BP authors' code does) against one ``addmm_`` per micro-batch (what the torch
   backend does): whether deferring P2 buys a faster GEMM on a CPU.
3. **Contention.** The same ops timed while the other core is idle, runs GEMMs, or runs
   memory-bound elementwise ops (a second process, as the second pipeline rank is). A schedule
   that keeps both ranks busier also makes each rank's ops slower; the per-kind compute of a
   full pipeline is larger than a half-idle one's.

    python bench/cpu_ceiling.py [--rows 512] [--microbatches 4] [--reps 15] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# llama/small (twobp.models.llama PRESETS["small"]): dim 512, 8 heads of 64, 4 KV heads, SwiGLU 1376
LINEARS = {"q": (512, 512), "k": (512, 256), "v": (512, 256), "o": (512, 512),
           "gate": (512, 1376), "up": (512, 1376), "down": (1376, 512)}  # name: (in, out)


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def load(kind: str) -> None:
    """The second core's work until killed: GEMMs, or memory-bound elementwise ops."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(512, 1376), torch.randn(1376, 512)
    g, u = torch.randn(512, 1376), torch.randn(512, 1376)
    while True:
        if kind == "gemm":
            a @ b
        else:
            torch.nn.functional.silu(g) * u


def gemm_headroom(rows: int, reps: int) -> list[tuple[str, float, float]]:
    """(what, ms, GFLOP/s) for every linear's three GEMMs, and the square reference first."""
    import torch

    out = []
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = _median_ms(lambda: a @ b, max(3, reps // 3))
    out.append((f"square {n}^3 (reference)", ms, 2 * n ** 3 / ms / 1e6))
    for name, (k, n_out) in LINEARS.items():
        x, w, dy = torch.randn(rows, k), torch.randn(n_out, k), torch.randn(rows, n_out)
        dw = torch.zeros(n_out, k)
        flops = 2 * rows * k * n_out
        for what, fn in (("fwd X W^T", lambda: x @ w.t()), ("dX = dY W", lambda: dy @ w),
                         ("dW += dY^T X", lambda: dw.addmm_(dy.t(), x))):
            ms = _median_ms(fn, reps)
            out.append((f"{name} {what}", ms, flops / ms / 1e6))
    return out


def batched_p2(rows: int, m: int, reps: int) -> list[tuple[str, float, float, float]]:
    """(linear, per-micro-batch addmm_ ms, one GEMM over concatenated rows ms, same with the cat)."""
    import torch

    out = []
    for name, (k, n_out) in LINEARS.items():
        xs = [torch.randn(rows, k) for _ in range(m)]
        dys = [torch.randn(rows, n_out) for _ in range(m)]
        dw = torch.zeros(n_out, k)
        x_all, dy_all = torch.cat(xs), torch.cat(dys)

        def each():
            for x, dy in zip(xs, dys):
                dw.addmm_(dy.t(), x)

        out.append((name, _median_ms(each, reps), _median_ms(lambda: dw.addmm_(dy_all.t(), x_all), reps),
                    _median_ms(lambda: dw.addmm_(torch.cat(dys).t(), torch.cat(xs)), reps)))
    return out


def contention(rows: int, reps: int) -> dict[str, dict[str, float]]:
    """ms per op with the other core idle, busy with GEMMs, busy with elementwise ops."""
    import torch

    g, u, dy = torch.randn(rows, 1376), torch.randn(rows, 1376), torch.randn(rows, 1376)
    x, w = torch.randn(rows, 512), torch.randn(1376, 512)
    q = torch.randn(rows // 256 or 1, 8, 256, 64)
    ops = {
        "GEMM gate fwd": lambda: x @ w.t(),
        "silu(gate) * up": lambda: torch.nn.functional.silu(g) * u,
        "silu backward": lambda: torch.ops.aten.silu_backward(dy, g),
        "sdpa causal fwd": lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True),
    }
    res: dict[str, dict[str, float]] = {}
    for other in ("idle", "gemm", "elementwise"):
        proc = None
        if other != "idle":
            proc = subprocess.Popen([sys.executable, __file__, "--load", other])
            time.sleep(1.5)  # the interpreter and torch import, then the loop runs
        try:
            res[other] = {name: _median_ms(fn, reps) for name, fn in ops.items()}
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--rows", type=int, default=512,
                    help="rows (tokens) per micro-batch: llama/small, batch 8, m = 4 has 512")
    ap.add_argument("--microbatches", type=int, default=4, help="micro-batches batched in one P2")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per figure (medians)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the tables")
    ap.add_argument("--load", choices=("gemm", "elementwise"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load:
        load(args.load)
        return 0
    if min(args.rows, args.microbatches, args.reps) < 1:
        ap.error("--rows, --microbatches and --reps must be >= 1")
    import torch

    from twobp.benchmarks.timing import machine_name

    torch.set_num_threads(1)
    lines = [f"Machine: {machine_name(torch.device('cpu'))}; torch {torch.__version__}; one thread, fp32; "
             f"llama/small shapes, {args.rows} rows per micro-batch; medians of {args.reps}; "
             f"`python bench/cpu_ceiling.py --rows {args.rows} --microbatches {args.microbatches}`", ""]

    print("1/3 GEMM headroom", flush=True)
    rows = gemm_headroom(args.rows, args.reps)
    peak = rows[0][2]
    lines += ["## 1. GEMM headroom", "", "| GEMM | ms | GFLOP/s | of the square reference |",
              "|---|---:|---:|---:|"]
    lines += [f"| {what} | {ms:.2f} | {gf:.0f} | {gf / peak:.2f} |" for what, ms, gf in rows]
    model = [gf for what, _, gf in rows[1:]]
    lines += ["", f"The model's GEMMs run at {min(model) / peak:.2f}-{max(model) / peak:.2f} of the square "
              f"reference ({peak:.0f} GFLOP/s).", ""]

    print("2/3 batched P2", flush=True)
    bp = batched_p2(args.rows, args.microbatches, args.reps)
    lines += ["## 2. Batched P2", "",
              f"| linear | {args.microbatches} x addmm_ ms | one GEMM, rows concatenated ms | with the concatenation ms "
              "| batched speedup (with concatenation) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {a:.2f} | {b:.2f} | {c:.2f} | {a / c:.3f}x |" for n, a, b, c in bp]
    each, cat = sum(r[1] for r in bp), sum(r[3] for r in bp)
    lines += [f"| all | {each:.1f} | {sum(r[2] for r in bp):.1f} | {cat:.1f} | {each / cat:.3f}x |", ""]

    print("3/3 contention", flush=True)
    ct = contention(args.rows, args.reps)
    lines += ["## 3. Contention: the same op while the other core works", "",
              "| op | other core idle ms | other core GEMMs | other core elementwise |", "|---|---:|---:|---:|"]
    for name, idle in ct["idle"].items():
        lines.append(f"| {name} | {idle:.2f} | {ct['gemm'][name] / idle:.2f}x | "
                     f"{ct['elementwise'][name] / idle:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
