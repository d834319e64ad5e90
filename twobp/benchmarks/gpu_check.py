"""Every GPU check in one call: environment, kernel correctness, microbenchmarks, and the
per-layer F / P1 / P2 costs that predict the paper's 4-stage pipeline gain.

Run by ``bench/gpu_check.sh`` (see ../shared/design/GPU.md for why it is one script).
``--dry-run`` does the same on the CPU at tiny sizes (Triton's interpreter for the
kernels, the torch reference for timings), so a GPU run never fails on a typo.

Writes into ``--out``: ``env.md``, ``correctness.csv``, ``kernels.md``/``kernels.csv``,
``layers.csv``, ``prediction.md`` and ``summary.md`` (everything, in one page).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .correctness import ODD_CASES, check_ops
from .kernels import format_table, run_kernel_bench, write_results
from .timing import machine_name

__all__ = ["main"]


def _env(device: torch.device) -> str:
    import triton

    lines = [f"- device: {machine_name(device)}",
             f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
             f"python {platform.python_version()}",
             f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"- {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
                     f"capability {p.major}.{p.minor}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<card>-<date>/)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreter: checks the script itself")
    ap.add_argument("--skip", nargs="*", default=[], choices=["correctness", "kernels", "layers"],
                    help="sections to skip")
    args = ap.parse_args(argv)

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        dtypes = [torch.float32, torch.float16]
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
    slug = "".join(c if c.isalnum() else "-" for c in machine_name(device).split("(")[0].strip().lower())
    out = args.out or Path("bench/results") / f"{slug.strip('-')[:40]}-{_dt.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = [f"# twobp GPU check{' (CPU dry run)' if args.dry_run else ''}", "", _env(device), ""]
    print("\n".join(summary), flush=True)
    (out / "env.md").write_text("\n".join(summary) + "\n")
    failures = 0

    if "correctness" not in args.skip:
        print("== correctness vs float64 autograd (relative error by norm) ==", flush=True)
        rows = check_ops(ODD_CASES(), device, dtypes)
        with (out / "correctness.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["op", "shape", "dtype", "output", "rel_err", "tol", "ok"])
            for r in rows:
                w.writerow([r.op, r.shape, r.dtype, r.output, f"{r.rel_err:.3e}", r.tol, r.ok])
        bad = [r for r in rows if not r.ok]
        failures += len(bad)
        summary += ["## Correctness", "", f"{len(rows) - len(bad)} of {len(rows)} outputs within tolerance.", ""]
        summary += [f"- FAIL {r.op} {r.shape} {r.dtype} {r.output}: {r.rel_err:.3e} > {r.tol}" for r in bad]

    if "kernels" not in args.skip:
        print(f"== microbenchmarks ({time.perf_counter() - t0:.0f} s in) ==", flush=True)
        dtype = torch.float32 if args.dry_run else torch.bfloat16
        kw = dict(tokens=32, images=1, reps=1) if args.dry_run else dict(tokens=8192, images=32, reps=5)
        if args.dry_run:
            from ..backend import use_backend

            with use_backend("torch"):
                krows = run_kernel_bench(device=device, dtype=dtype, micro=2, **kw)
        else:
            krows = run_kernel_bench(device=device, dtype=dtype, micro=4, **kw)
        write_results(krows, out, f"# kernels, {machine_name(device)}, {dtype}")
        summary += ["## Kernels vs torch", "", format_table(krows), ""]

    if "layers" not in args.skip:
        print(f"== per-layer F/P1/P2 and predicted pipeline gain ({time.perf_counter() - t0:.0f} s in) ==",
              flush=True)
        from .layer_costs import predict_pipeline_gain

        text = predict_pipeline_gain(device=device, out=out, dry_run=args.dry_run)
        summary += [text, ""]

    summary.append(f"total time: {time.perf_counter() - t0:.0f} s")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary[4:]))
    print(f"wrote {out}/")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
