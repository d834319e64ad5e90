"""Mamba's kernels on a GPU, in one short call: correctness of the selective scan and the
causal conv1d in bf16 / fp16 / fp32 against float64 autograd, then the per-block F / P1 / P2
of a Mamba-1.4B block and the 4-stage prediction (bench/mamba_block_costs.py).

    python bench/mamba_gpu_check.py --out bench/results/mamba-<card>-<date>    # on a GPU, ~1-2 min
    python bench/mamba_gpu_check.py --dry-run                                  # CPU, interpreter, fp32/fp16

Correctness: fresh random inputs at odd shapes (L = 37 over chunks of 16, E and N leaving
masked lanes), forward, p1 and p2 (accumulated into random non-zero buffers, batched over
two micro-batches) through the split ops on the Triton backend; the caching allocator is
poisoned with NaN before each launch so an unwritten element fails; the relative error by
norm of every output against float64 autograd of the definition must be within the dtype's
tolerance. bf16 is only trusted here, on a GPU: the interpreter cannot compute it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

MAMBA_OPS = ("selective_scan", "causal_conv1d")


def check(device, dtype) -> list:
    """CheckRows (twobp.benchmarks.correctness) of the scan and the conv at one dtype: the same
    cases and tolerances as gpu_check's correctness phase, which runs them among every op."""
    from twobp.benchmarks.correctness import ODD_CASES, check_ops

    return check_ops([c for c in ODD_CASES() if c.op_name in MAMBA_OPS], device, [dtype], progress=lambda *a: None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, fp32/fp16, tiny block")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    import twobp

    if args.dry_run:
        device, dtypes = torch.device("cpu"), [torch.float32, torch.float16]
    elif torch.cuda.is_available():
        device, dtypes = torch.device("cuda"), [torch.bfloat16, torch.float16, torch.float32]
    else:
        print("mamba_gpu_check: no CUDA device; use --dry-run", file=sys.stderr)
        return 2
    lines = ["# Mamba kernels: correctness against float64 (relative error by norm)", "",
             "| op | dtype | output | rel. error | tol | ok |", "|---|---|---|---:|---:|---|"]
    bad = 0
    with twobp.use_backend("triton"):
        for dtype in dtypes:
            for r in check(device, dtype):
                bad += not r.ok
                lines.append(f"| {r.op} | {r.dtype} | {r.output} | {r.rel_err:.2e} | {r.tol:.0e} | "
                             f"{'ok' if r.ok else 'FAIL'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mamba_correctness.md").write_text(text)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mamba_block_costs

    # the dry run checks the script, on the torch reference: interpreted kernels take minutes a block
    with twobp.use_backend("torch") if args.dry_run else contextlib.nullcontext():
        rc = mamba_block_costs.main(["--dry-run"] if args.dry_run else
                                    (["--out", str(args.out)] if args.out is not None else []))
    return 1 if bad else rc


if __name__ == "__main__":
    sys.exit(main())
