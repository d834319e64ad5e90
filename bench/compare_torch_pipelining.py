"""twobp against torch.distributed.pipelining on the same model, data and machine, in one run.

For each model and micro-batch count given, one process group of ``--stages`` gloo ranks
(one thread each) runs every contender of :mod:`twobp.benchmarks.pipeline_compare`,
alternating step by step:

* twobp: 1F1B, 1F1B + 2BP, ZB-H1 + 2BP and auto + 2BP on the twobp modules (2BP schedules
  carry trailing P2 into the next step where the measured costs say so);
* torch: Schedule1F1B, ScheduleInterleavedZeroBubble and ScheduleZBVZeroBubble on the same
  model with torch's own modules (``twobp.revert``: nn.Linear, nn.RMSNorm / nn.LayerNorm,
  SDPA, nn.Conv2d; the same weights).

It writes a markdown report (``--out``): per configuration the throughput table (paired
ratios against torch's Schedule1F1B and against torch's best, with their range), the peak
saved-activation bytes per rank, the per-step losses check, and where each contender's time
goes per rank; and, with ``--json``, one row per (configuration, implementation, schedule).

    python bench/compare_torch_pipelining.py --model llama --preset small --microbatches 4,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from twobp.benchmarks.pipeline_compare import (DEFAULT_OURS, DEFAULT_TORCH, CompareConfig, ContenderResult,
                                               loss_gaps_per_step, losses_agree, paired_ratio, run_compare,
                                               simulated_gain)
from twobp.store import format_bytes

DEFAULTS = {  # model -> (preset, global batch): compute-bound at one CPU thread per rank
    "llama": ("small", 8),
    "bert": ("cpu", 8),
    "resnet": ("cpu", 32),
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _unit(model: str) -> str:
    return "samples" if model == "resnet" else "tokens"


def _realised(gain: dict, short: bool = False) -> str:
    """The share of auto's simulated gain the run realised, or why there is none to realise."""
    if not gain["simulated"] > 1:
        return "no gain simulated" if short else "the simulator predicts no gain on these costs"
    return f"{gain['realised']:.0%}" if short else f"realises {gain['realised']:.0%} of the simulated gain"


def _plan_fidelity(gain: dict) -> str:
    """Where the shortfall lies: the costs grew in the timed steps, or the executor missed its plan."""
    if "plan_step" not in gain:
        return ""
    return (f" Its timed steps measured compute {gain['cost_growth'] - 1:+.1%} against the probe's costs; "
            f"on those costs the same plan takes {gain['plan_step'] * 1e3:,.0f} ms a step (optimizer "
            f"included) and the run took {gain['step'] * 1e3:,.0f} ms: the executor ran its plan at "
            f"{gain['plan_step'] / gain['step']:.1%} of the simulated speed.")


def _items(cfg: CompareConfig) -> int:
    from twobp import models

    if cfg.model == "resnet":
        return cfg.batch_size
    return cfg.batch_size * models.config(cfg.model, cfg.preset).seq_len


def throughput_table(cfg: CompareConfig, results: list[ContenderResult]) -> tuple[str, dict]:
    """The markdown table and the headline ratios of one configuration."""
    ok = [r for r in results if r.error is None]
    ref = next((r for r in ok if r.contender.label == "torch Schedule1F1B"), None)
    torch_rows = [r for r in ok if r.contender.implementation == "torch" and r.contender.modules == "torch"]
    best_torch = min(torch_rows, key=lambda r: r.median_step) if torch_rows else None
    ours_2bp = [r for r in ok if r.contender.twobp]
    best_ours = min(ours_2bp, key=lambda r: r.median_step) if ours_2bp else None
    unit = _unit(cfg.model)
    items = _items(cfg)
    lines = [f"| implementation | schedule | carry | fused B | {unit}/s | median step | vs torch Schedule1F1B (paired: median "
             f"[min, max]) | vs torch's best ({best_torch.contender.schedule if best_torch else '-'}) | "
             "peak saved activations per rank | final loss |",
             "|---|---|---|---|---:|---:|---|---|---|---:|"]
    for r in results:
        c = r.contender
        name = c.schedule if c.implementation == "torch" else (c.base_schedule + (" +2BP" if c.twobp else ""))
        if c.implementation == "torch" and c.modules == "twobp":
            name += " (twobp modules)"
        if r.extra.get("memory_cap") is not None:
            name += f" (cap {r.extra['memory_cap']})"
        if r.error is not None:
            lines.append(f"| {c.implementation} | {name} | | | failed | | `{r.error[:120]}` | | | |")
            continue
        vs_ref = "{:.3f}x [{:.3f}, {:.3f}]".format(*paired_ratio(r, ref)) if ref else "-"
        vs_best = "{:.3f}x".format(paired_ratio(r, best_torch)[0]) if best_torch else "-"
        mem = " / ".join(format_bytes(b) for b in r.peak_saved_bytes) if r.peak_saved_bytes else "-"
        carry = ",".join(map(str, r.extra.get("carry") or [])) or "-"
        fused = r.extra.get("fused")
        fused = f"{fused[0]} of {fused[1]}" if fused else "-"
        lines.append(f"| {c.implementation} | {name} | {carry} | {fused} | {items / r.median_step:,.0f} | "
                     f"{r.median_step * 1e3:,.0f} ms | {vs_ref} | {vs_best} | {mem} | {r.losses[-1]:.5f} |")
    head = {}
    if best_ours and best_torch:
        head = dict(best_ours=best_ours.contender.label, best_torch=best_torch.contender.label,
                    best_ours_vs_best_torch=paired_ratio(best_ours, best_torch)[0],
                    best_ours_peak=max(best_ours.peak_saved_bytes or [0]))
        zb = [r for r in torch_rows if "ZeroBubble" in r.contender.schedule and r.peak_saved_bytes]
        if zb:
            head["torch_zb_min_peak"] = limit = min(max(r.peak_saved_bytes) for r in zb)
            # the bar: faster at no more peak saved bytes than torch's leanest ZB schedule
            lean = [r for r in ours_2bp if r.peak_saved_bytes and max(r.peak_saved_bytes) <= limit]
            if lean:
                best_lean = min(lean, key=lambda r: r.median_step)
                head["best_lean"] = best_lean.contender.label
                head["best_lean_vs_best_torch"] = paired_ratio(best_lean, best_torch)[0]
    if best_ours and best_torch and best_ours.breakdown:
        # No placement of our ops beats the busiest rank's compute: the most a schedule of ours could
        # gain on torch's best at these op costs (torch's step over that bound)
        head["ours_work_bound_vs_best_torch"] = best_torch.median_step / max(busy_seconds(bd) for bd in best_ours.breakdown)
    ours_plain = next((r for r in ok if r.contender.label == "twobp 1f1b"), None)
    if ours_plain and ref:
        head["ours_1f1b_vs_torch_1f1b"] = paired_ratio(ours_plain, ref)[0]
    return "\n".join(lines), head


BUSY_KINDS = ("F", "B", "P1", "P2", "W", "optim")
"""Breakdown kinds that are a rank's own compute (the rest is waiting, sending and overhead)."""


def busy_seconds(bd: dict) -> float:
    """A rank's compute per step (median per kind, summed): the step no schedule can beat on it."""
    return sum(bd.get(k, 0.0) for k in BUSY_KINDS)


def breakdown_table(results: list[ContenderResult]) -> str:
    """Median ms per kind per rank: where each contender's step goes; busy = compute / wall."""
    kinds = ("F", "B", "P1", "P2", "W", "wait", "send", "optim", "other")
    lines = ["| contender | rank | wall | " + " | ".join(kinds) + " | busy |",
             "|---|---:|---:|" + "---:|" * len(kinds) + "---:|"]
    for r in results:
        if r.error is not None:
            continue
        for rank, bd in enumerate(r.breakdown):
            busy = busy_seconds(bd) / bd["wall"] if bd.get("wall") else float("nan")
            lines.append(f"| {r.contender.label} | {rank} | {bd['wall'] * 1e3:,.0f} | "
                         + " | ".join(f"{bd.get(k, 0.0) * 1e3:,.0f}" if bd.get(k) else "" for k in kinds)
                         + f" | {busy:.0%} |")
    return "\n".join(lines)


def json_rows(cfg: CompareConfig, results: list[ContenderResult]) -> list[dict]:
    unit = _unit(cfg.model)
    items = _items(cfg)
    ref = next((r for r in results if r.error is None and r.contender.label == "torch Schedule1F1B"), None)
    rows = []
    for r in results:
        c = r.contender
        row = dict(model=cfg.model, preset=cfg.preset, microbatches=cfg.microbatches, batch_size=cfg.batch_size,
                   stages=cfg.stages, implementation=c.implementation,
                   schedule=c.schedule if c.implementation == "torch" else c.base_schedule, twobp=c.twobp,
                   modules=c.modules)
        if r.error is not None:
            row["error"] = r.error
        else:
            row.update({f"{unit}_per_s": items / r.median_step, "median_step_s": r.median_step,
                        "step_seconds": r.step_seconds, "peak_saved_bytes": r.peak_saved_bytes,
                        "loss": r.losses[-1], "losses": r.losses, "carry": r.extra.get("carry"),
                        "fused_backwards": r.extra.get("fused"),
                        "memory_cap": r.extra.get("memory_cap"), "cap_search": r.extra.get("cap_search"),
                        "breakdown_s": r.breakdown,
                        "vs_torch_1f1b": paired_ratio(r, ref)[0] if ref else None})
        rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="examples:\n"
                                       "  python bench/compare_torch_pipelining.py --model llama --microbatches 4,8\n"
                                       "  python bench/compare_torch_pipelining.py --model bert --rounds 4 --json r.json",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama", help="comma list of llama, bert, resnet (default llama)")
    p.add_argument("--preset", default=None, help="size preset (default per model: " + ", ".join(
        f"{m} {d[0]}" for m, d in DEFAULTS.items()) + ")")
    p.add_argument("--microbatches", default="4", help="comma list of micro-batch counts, e.g. 4,8")
    p.add_argument("--batch-size", type=int, default=None, help="sequences/images per step (default per model: "
                   + ", ".join(f"{m} {d[1]}" for m, d in DEFAULTS.items()) + ")")
    p.add_argument("--stages", type=int, default=2, help="pipeline ranks (default 2)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds, one step of every contender each")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--ours", default=",".join(DEFAULT_OURS), help="twobp schedules (suffix -2bp: split); auto-h1 is auto held to ZB-H1's memory (at most p micro-batches per rank); auto-x2 places over two chunks per rank (looped), auto-x2h1 both; auto-v over two chunks per rank in the V layout (as torch's ScheduleZBVZeroBubble), auto-vh1 that within 1F1B's memory; auto@N, auto-x2@N, auto-v@N hold at most N micro-batch chunks per rank (e.g. auto-v@6-2bp); auto@zb, auto-x2@zb, auto-v@zb hold the largest N whose measured peak fits torch's leanest zero-bubble schedule's, in the same run")
    p.add_argument("--torch", default=",".join(DEFAULT_TORCH), help="torch.distributed.pipelining schedules")
    p.add_argument("--torch-with-twobp-modules", action="store_true",
                   help="also run torch's Schedule1F1B on the twobp modules (the runtimes alone compared)")
    p.add_argument("--no-overlap-steps", action="store_true", help="twobp: never carry P2 into the next step")
    p.add_argument("--cut", choices=("balanced", "equal"), default="balanced",
                   help="stage cut, the same for both runtimes: balanced by each block's measured forward + backward "
                        "time (default), or equal block counts")
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc as it is on every rank (default: every rank, both runtimes, keeps freed "
                        "memory in the process, twobp.keep_freed_host_memory, so held activations are not "
                        "page-faulted back)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (all contenders)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a rank waits for a silent peer")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative loss gap counted as equal")
    p.add_argument("--out", default="bench/results/compare_torch_pipelining.md", help="markdown report path")
    p.add_argument("--json", default=None, metavar="PATH", help="also write one JSON row per contender here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also run one step per contender under torch.profiler and write its op table per rank here")
    return p.parse_args(argv)


def _ratio(x: float | None) -> str:
    """A summary cell: the ratio, or '-' where the run had no contender to form it."""
    return "-" if x is None or x != x else f"{x:.3f}x"


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    for m in models:
        if m not in DEFAULTS:
            raise SystemExit(f"--model: unknown {m!r}; choose from {', '.join(DEFAULTS)}")
    try:
        mbs = [int(x) for x in args.microbatches.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--microbatches must be a comma list of ints, got {args.microbatches!r}") from None
    out = Path(args.out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = []
    for model in models:
        preset = args.preset or DEFAULTS[model][0]
        for m in mbs:
            try:
                configs.append(CompareConfig(
                    model=model, preset=preset, stages=args.stages, microbatches=m,
                    batch_size=args.batch_size or DEFAULTS[model][1], rounds=args.rounds, warmup=args.warmup,
                    lr=args.lr, seed=args.seed, timeout=args.timeout,
                    ours=tuple(s for s in args.ours.split(",") if s),
                    torch_schedules=tuple(s for s in args.torch.split(",") if s),
                    torch_with_twobp_modules=args.torch_with_twobp_modules,
                    overlap_steps=not args.no_overlap_steps, profile=args.profile is not None,
                    keep_freed_memory=not args.malloc_default, cut=args.cut))
            except ValueError as e:
                raise SystemExit(f"compare_torch_pipelining: {e}") from None
    import torch

    sections, rows, heads, ok = [], [], [], True
    t_all = time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {cfg.model}/{cfg.preset}, m={cfg.microbatches}, batch {cfg.batch_size}: "
              f"{len(cfg.contenders())} contenders x {cfg.rounds} rounds", flush=True)
        t0 = time.perf_counter()
        results = run_compare(cfg)
        gap = losses_agree(results)
        ok &= gap <= args.rtol
        table, head = throughput_table(cfg, results)
        heads.append((cfg, head))
        rows += json_rows(cfg, results)
        costs = next((r.extra.get("costs") for r in results if r.extra.get("costs")), None)
        gain = simulated_gain(results, cfg)
        head["auto_gain"] = gain
        sections += [f"## {cfg.model}/{cfg.preset}, m = {cfg.microbatches}, batch {cfg.batch_size}", "",
                     f"Losses: largest relative gap of any contender's per-step loss vs the first = {gap:.1e} "
                     f"({'equal' if gap <= args.rtol else 'NOT equal'} at rtol {args.rtol:g}"
                     + ("" if gap <= args.rtol else "; per step: " + ", ".join(
                         f"{g:.0e}" for g in loss_gaps_per_step(results))) + "). "
                     f"Run time {time.perf_counter() - t0:.0f} s.", "", table, "",
                     "Where the time goes (median ms per step per rank; wait = receives and waits on peers, "
                     "the step's closing barrier included; other = the runtime's own Python, the loss, "
                     "allocation):", "", breakdown_table(results), ""]
        cuts = next((r.extra.get("cuts") for r in results if r.extra.get("cuts")), None)
        if cuts:
            sections += [f"Stage cut ({cfg.cut}; block bounds, the same for both runtimes): "
                         + "; ".join(f"{n} stages {list(b)}" for n, b in sorted(cuts.items(), key=lambda kv: int(kv[0]))), ""]
        if costs:
            sections += [f"Per-stage costs twobp measured for auto and carry (s per micro-batch): "
                         f"`{json.dumps({k: v for k, v in costs.items()})}`", ""]
        if gain:
            sections += [f"auto on these costs: simulated {gain['simulated']:.3f}x over our 1F1B, measured "
                         f"{gain['measured']:.3f}x: {_realised(gain)}." + _plan_fidelity(gain), ""]
        print(table, flush=True)
        if args.profile:
            folder = Path(args.profile)
            folder.mkdir(parents=True, exist_ok=True)
            for r in results:
                for rank, text in enumerate(r.extra.get("profiles") or []):
                    if text:
                        slug = "".join(ch if ch.isalnum() else "-" for ch in r.contender.label)
                        (folder / f"{cfg.model}-m{cfg.microbatches}-{slug}-rank{rank}.txt").write_text(text)
    summary = ["| model | m | best twobp | best torch | best twobp vs best torch | twobp 1F1B vs torch 1F1B | "
               "peak saved (best twobp, max rank) | smallest peak of torch's ZB schedules | best twobp within "
               "that peak: vs best torch | auto: measured / simulated gain over our 1F1B | bound: torch's best over "
               "our best's busiest-rank compute |",
               "|---|---:|---|---|---:|---:|---|---|---|---|---:|"]
    for cfg, h in heads:
        summary.append(f"| {cfg.model}/{cfg.preset} | {cfg.microbatches} | {h.get('best_ours', '-')} | "
                       f"{h.get('best_torch', '-')} | {_ratio(h.get('best_ours_vs_best_torch'))} | "
                       f"{_ratio(h.get('ours_1f1b_vs_torch_1f1b'))} | "
                       f"{format_bytes(h['best_ours_peak']) if 'best_ours_peak' in h else '-'} | "
                       f"{format_bytes(h['torch_zb_min_peak']) if 'torch_zb_min_peak' in h else '-'} | "
                       + (f"{h['best_lean']}: {h['best_lean_vs_best_torch']:.3f}x | " if "best_lean" in h else "- | ")
                       + (f"{h['auto_gain']['measured']:.3f}x / {h['auto_gain']['simulated']:.3f}x "
                          f"({_realised(h['auto_gain'], short=True)})" if h.get("auto_gain") else "-")
                       + (f" | {h['ours_work_bound_vs_best_torch']:.3f}x |" if "ours_work_bound_vs_best_torch" in h
                          else " | - |"))
    text = "\n".join([
        "# twobp vs torch.distributed.pipelining",
        "",
        f"- machine: {cpu_model()} ({os.cpu_count()} logical CPUs), {args.stages} gloo ranks with 1 thread each; "
        f"torch {torch.__version__}",
        f"- command: `{command}`",
        f"- method: all contenders in the same processes, alternating step by step ({args.rounds} timed rounds "
        f"after {args.warmup} warm-up, order rotated per round); step = rank 0's wall time between barriers "
        "around schedule + optimizer step; ratios are medians of per-round ratios. Memory: peak bytes of "
        "saved activations per rank (autograd's saved tensors + the twobp store, storages once), one extra step. "
        "Fused B: of a 2BP schedule's backwards (micro-batch x chunk), how many auto kept fused (the measured B "
        "was cheaper than P1 + P2 and the P2 would have filled no idle time).",
        "- host allocator, every rank and contender: " + ("glibc's default (`--malloc-default`)" if args.malloc_default
                                                          else "freed memory kept in the process "
                                                               "(`twobp.keep_freed_host_memory`)"),
        f"- whole run: {time.perf_counter() - t_all:.0f} s",
        "",
        "## Summary",
        "",
        *summary,
        "",
        "Bound: torch's best step divided by the compute (F, B, P1, P2, W, optimizer; median per kind) on the "
        "busiest rank of our best contender. No placement of those same ops does better, so it is the most any "
        "schedule of ours could gain on torch's best without faster ops; a ratio near it means the schedule has "
        "left nothing idle.",
        "",
        *sections,
    ])
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(summary))
    print(f"wrote {out}" + (f" and {args.json}" if args.json else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
