"""Where a block's time goes on a GPU: F / P1 / P2 (split) and F / B (plain) of a LLaMa-7B and a
BERT-Large block, on the Triton kernels and on the torch backend (cuBLAS, SDPA, torch's norms),
each phase timed (wall, synchronised) and profiled (sum of GPU kernel time, kernel count).

    python bench/gpu_profile_blocks.py --out DIR        # on a GPU, about 1-2 minutes
    python bench/gpu_profile_blocks.py --dry-run        # CPU, torch backend, tiny blocks

A phase whose wall time is far above its summed kernel time is bound by the host (launches,
Python); one whose kernel time is far above the FLOP floor is bound by its kernels. Writes
``blocks.md`` (the table), ``blocks.csv`` and per phase the top kernels by GPU time.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch


def _phases(block, make, mb):
    """The five phases of one micro-batch as closures run in order: split F, P1, P2; plain F, B."""
    from twobp import backward_p2, split_backward

    st: dict = {}

    def f_split():
        st["x"] = make().requires_grad_()
        with split_backward(microbatch=mb):
            st["y"] = block(st["x"])
        st["dy"] = torch.randn_like(st["y"])

    def p1():
        st["y"].backward(st["dy"])

    def p2():
        backward_p2(block)

    def f_plain():
        st["x2"] = make().requires_grad_()
        st["y2"] = block(st["x2"])

    def b_fused():
        st["y2"].backward(st["dy"])
        block.zero_grad(set_to_none=True)

    return [("F split", f_split), ("P1", p1), ("P2", p2), ("F plain", f_plain), ("B fused", b_fused)]


def _kernel_us(prof) -> tuple[float, int]:
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in ev), len(ev)


def profile_block(label, block, make, device, reps: int, out: Path | None) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    from twobp.benchmarks.layer_costs import _sync

    walls: dict[str, list[float]] = {}
    for i in range(reps + 2):
        for name, fn in _phases(block, make, i):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= 2:
                walls.setdefault(name, []).append(time.perf_counter() - t0)
    rows = []
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tops = []
    for name, fn in _phases(block, make, 10_000):
        _sync(device)
        with profile(activities=acts) as prof:
            fn()
            _sync(device)
        k_us, n = _kernel_us(prof)
        wall = statistics.median(walls[name]) * 1e3
        rows.append({"block": label, "phase": name, "wall_ms": round(wall, 3), "kernel_ms": round(k_us / 1e3, 3),
                     "kernels": n, "host_bound_share": round(max(0.0, 1 - k_us / 1e3 / wall), 3) if wall else 0})
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tops.append(f"### {label}: {name}\n\n```\n{prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60)}\n```\n")
    if out is not None:
        (out / f"top-{label}.md").write_text("\n".join(tops))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.batch < 1:
        ap.error(f"--reps and --batch must be >= 1, got --reps {args.reps} --batch {args.batch}")
    import twobp
    from twobp.benchmarks.layer_costs import _blocks_to_measure

    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    backends = ["torch"] if args.dry_run else ["triton", "torch"]
    rows = []
    for backend in backends:
        with twobp.use_backend(backend):
            for label, block, make, _, _ in _blocks_to_measure(device, args.dry_run, args.batch)[:2]:
                label = f"{label}-b{args.batch}"
                r = profile_block(f"{label}-{backend}", block, make, device, 2 if args.dry_run else args.reps, args.out)
                for x in r:
                    print(f"{x['block']:24s} {x['phase']:8s} wall {x['wall_ms']:8.3f} ms  kernels {x['kernel_ms']:8.3f} ms"
                          f"  ({x['kernels']} launches, host-bound {x['host_bound_share']:.0%})", flush=True)
                rows += r
    if args.out:
        with (args.out / "blocks.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        md = ["| block | phase | wall ms | GPU kernel ms | launches | host-bound share |", "|---|---|---:|---:|---:|---:|"]
        md += [f"| {r['block']} | {r['phase']} | {r['wall_ms']} | {r['kernel_ms']} | {r['kernels']} | "
               f"{r['host_bound_share']:.0%} |" for r in rows]
        (args.out / "blocks.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
