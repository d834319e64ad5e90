"""Run the AOT sweep and write it up: ``python -m twobp.benchmarks.aot_report [--ci] [--out FILE.md]``.

Compiles the jobs of :mod:`.aot_cases` for sm_90 and sm_80 (see :mod:`.aot`) and writes a
markdown report (a summary per kernel, target and dtype, then one row per compile) and,
with ``--json``, the raw results. Exit status 1 when a config the launchers keep is not
clean, or a (kernel, shape, dtype, target) has no clean config left. ``bench/aot_sweep.py``
runs the full sweep into ``bench/results/aot-sweep.md``; the CI test runs ``--ci``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

__all__ = ["main", "failures"]


def failures(results) -> list[str]:
    """What is wrong in a set of results: kept configs that are not clean, and (kernel, shape,
    dtype, target) with no clean kept config."""
    out = []
    groups = defaultdict(list)
    for r in results:
        j = r.job
        groups[(j.family, j.kernel, j.case, j.dtype, j.target)].append(r)
        if j.kept and not r.clean:
            strict = j.dtype != "fp32"
            problems = r.problems() if strict else [p for p in r.problems() if not p.startswith(("spills", "stack"))]
            if problems:
                out.append(f"{j.family} {j.kernel} [{j.case}] {j.dtype} {j.target} {j.config_label}: "
                           + "; ".join(problems))
    for key, group in groups.items():
        kept = [r for r in group if r.job.kept]
        if kept and not any(r.clean for r in kept):
            out.append(f"{' '.join(key[:2])} [{key[2]}] {key[3]} {key[4]}: no kept config is clean")
    return out


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _ptxas_versions() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    out = []
    for arch in (80, 90):
        tool = get_ptxas(arch)
        try:
            ver = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        except (OSError, IndexError):
            ver = "?"
        out.append(f"sm_{arch}: {Path(tool.path).name} ({ver})")
    return "; ".join(out)


def write_markdown(results, path: Path, command: str, seconds: float) -> None:
    import triton
    import torch

    from .aot import TARGETS

    bad = failures(results)
    lines = [
        "# AOT sweep: every kernel compiled for sm_90 and sm_80, no GPU involved", "",
        f"Command: `{command}` ({seconds / 60:.1f} min, {os.cpu_count()} CPU cores, {platform.machine()}).",
        f"Triton {triton.__version__}, torch {torch.__version__}, ptxas {_ptxas_versions()}; "
        f"{_dt.date.today().isoformat()}.", "",
        "Each row is one `triton.compile` for an explicit target, specialised by Triton's own launch "
        "binder at the model shape (see `twobp/benchmarks/aot.py`). *kept*: the kernel's early config "
        "prune keeps this config for this target and dtype, so the autotuner may time it; configs not "
        "kept are shown for the record. *clean*: compiles, no spills and no stack frame, shared memory "
        f"within {TARGETS['sm_90'].shared_limit // 1024} KB (sm_90) / {TARGETS['sm_80'].shared_limit // 1024} KB "
        "(sm_80), and wgmma on sm_90 wherever tensor cores are expected. fp32 runs with the precision "
        "a default launch uses (ieee for linear and attention, tf32 for conv).", "",
        f"**{len(results)} compiles, {sum(r.ok for r in results)} compiled; "
        f"{sum(r.job.kept for r in results)} kept, of which {sum(r.job.kept and r.clean for r in results)} clean. "
        f"Problems among kept configs: {len(bad)}.**", "",
    ]
    if bad:
        lines += ["Problems:", ""] + [f"- {b}" for b in bad] + [""]
    lines += ["## Summary per kernel, target and dtype", "",
              "| family | kernel | target | dtype | shapes | configs | kept | kept & clean | not kept: why (count) |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    groups = defaultdict(list)
    for r in results:
        groups[(r.job.family, r.job.kernel, r.job.target, r.job.dtype)].append(r)
    for (fam, ker, tgt, dt), group in groups.items():
        why = defaultdict(int)
        for r in group:
            if not r.job.kept:
                for p in (r.problems() or ["clean, pruned (size or class)"]):
                    why[p.split(" (")[0].split(":")[0] if not p.startswith("shared") else "shared overflow"] += 1
        why_s = ", ".join(f"{k} ({v})" for k, v in sorted(why.items())) or "-"
        lines.append(f"| {fam} | {ker} | {tgt} | {dt} | {len({r.job.case for r in group})} | {len(group)} | "
                     f"{sum(r.job.kept for r in group)} | {sum(r.job.kept and r.clean for r in group)} | {why_s} |")
    lines += ["", "## Every compile", "",
              "| family | kernel | shape | dtype | target | config | kept | registers | spills (B) | stack (B) | "
              "shared (KB) | wgmma | TMA | cp.async | clean |",
              "|---|---|---|---|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in results:
        j = r.job
        if r.ok:
            lines.append(f"| {j.family} | {j.kernel} | {j.case} | {j.dtype} | {j.target} | {j.config_label} | "
                         f"{_yn(j.kept)} | {r.registers} | {r.spills} | {r.stack} | {r.shared / 1024:.1f} | "
                         f"{_yn(r.wgmma)} | {_yn(r.tma)} | {_yn(r.cp_async)} | "
                         f"{'yes' if r.clean else '; '.join(r.problems())} |")
        else:
            lines.append(f"| {j.family} | {j.kernel} | {j.case} | {j.dtype} | {j.target} | {j.config_label} | "
                         f"{_yn(j.kept)} | - | - | - | - | - | - | - | {'; '.join(r.problems())} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _to_json(results) -> list[dict]:
    rows = []
    for r in results:
        j = r.job
        rows.append(dict(family=j.family, kernel=j.kernel, case=j.case, dtype=j.dtype, target=j.target,
                         config=j.config_label, kept=j.kept, tensor_core=j.tensor_core, ok=r.ok, error=r.error,
                         registers=r.registers, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                         stack=r.stack, shared=r.shared, wgmma=r.wgmma, mma_sync=r.mma_sync, tma=r.tma,
                         cp_async=r.cp_async, clean=r.clean, problems=r.problems(), seconds=round(r.seconds, 2),
                         cached=r.cached))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aot_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ci", action="store_true", help="the CI subset (the riskiest kept config per kernel and target)")
    ap.add_argument("--families", nargs="*", default=None, choices=["linear", "linear_tma", "norm", "attention", "conv"])
    ap.add_argument("--dtypes", nargs="*", default=None, choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--out", type=Path, default=None, help="markdown report to write")
    ap.add_argument("--json", type=Path, default=None, help="raw results to write as JSON")
    ap.add_argument("--list-kept", type=Path, default=None,
                    help="write the kept jobs (what the sweep must cover) as JSON and exit, compiling nothing")
    args = ap.parse_args(argv)

    from ..kernels._launch import INTERPRET

    if INTERPRET:
        print("aot_report: TRITON_INTERPRET is set, so the kernels are interpreted functions; "
              "run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    from .aot import run_jobs
    from .aot_cases import DTYPES, all_jobs, ci_jobs, FAMILIES

    jobs = all_jobs(tuple(args.families or FAMILIES), tuple(args.dtypes or DTYPES))
    if args.list_kept:
        kept = [dict(family=j.family, kernel=j.kernel, case=j.case, dtype=j.dtype, target=j.target,
                     config=j.config_label) for j in jobs if j.kept]
        args.list_kept.write_text(json.dumps(kept, indent=1))
        return 0
    if args.ci:
        jobs = ci_jobs(jobs)
    t0 = time.perf_counter()

    def progress(res, done, total):
        if not res.ok or (res.job.kept and not res.clean) or done % 50 == 0 or done == total:
            j = res.job
            state = "ok" if res.clean else "; ".join(res.problems())
            print(f"[{done}/{total} {time.perf_counter() - t0:.0f}s] {j.family} {j.kernel} {j.dtype} {j.target} "
                  f"{j.config_label}{'' if j.kept else ' (not kept)'}: {state}", flush=True)

    results = run_jobs(jobs, args.workers, progress)
    seconds = time.perf_counter() - t0
    command = "python bench/aot_sweep.py" + (" --ci" if args.ci else "") + \
        (f" --families {' '.join(args.families)}" if args.families else "") + \
        (f" --dtypes {' '.join(args.dtypes)}" if args.dtypes else "")
    if args.out:
        write_markdown(results, args.out, command, seconds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_to_json(results), indent=1))
    bad = failures(results)
    print(f"{len(results)} compiles in {seconds:.0f} s ({sum(r.cached for r in results)} from the cache); "
          f"{len(bad)} problems among kept configs")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
