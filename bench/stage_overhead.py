"""One pipeline stage, one process: twobp's modules against torch's on the same weights and data.

The pipeline comparison measures whole schedules; this bench isolates what each twobp
module costs per call at the model's real shapes, where a schedule cannot hide it. For the
first half of a model's blocks (the stage rank 0 runs in a 2-stage pipeline), on one thread,
alternating the contenders call by call and taking medians:

* **F**: the stage's forward three ways: twobp's modules in normal mode (no split region),
  twobp's inside ``split_backward`` (what a 2BP schedule runs), and torch's modules
  (``twobp.revert``: nn.Linear, nn.RMSNorm / nn.LayerNorm, SDPA, nn.Conv2d).
* **B**: the backward of the same output gradient: twobp normal mode's fused backward,
  twobp's P1 and P2 and their sum, and torch's autograd backward.

A ratio above 1.0 is time our modules add around the same aten kernels: the per-call Python
of the split machinery (the op's autograd Function, the activation store) and what it does
to the caches around each GEMM. Both F and P1 + P2 sit on a 2BP schedule's critical path.

    python bench/stage_overhead.py --model llama [--rounds 10] [--out PATH]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

from twobp.benchmarks.args import positive_int

DEFAULTS = {  # model -> (preset, rows per micro-batch): a micro-batch of the comparison's runs
    "llama": ("small", 2),
    "bert": ("cpu", 2),
    "resnet": ("cpu", 8),
}


def measure(model_name: str, preset: str, rows: int, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each part (keys: F normal/split/torch, B normal, P1, P2, B torch)."""
    import torch

    import twobp
    from twobp import models
    from twobp.nn import revert
    from twobp.train import batch_source

    torch.set_num_threads(1)
    twobp.keep_freed_host_memory()
    cfg = models.config(model_name, preset)
    kw = {"tie_embeddings": False} if hasattr(cfg, "tie_embeddings") else {}
    torch.manual_seed(0)
    ours = models.build(model_name, preset, **kw)
    torch.manual_seed(0)
    theirs = revert(models.build(model_name, preset, **kw))
    cut = len(ours.blocks()) // 2
    ours_stage = torch.nn.Sequential(*ours.blocks()[:cut])
    torch_stage = torch.nn.Sequential(*theirs.blocks()[:cut])
    x, _ = batch_source(model_name, ours).batch(0, rows, seed=0)
    store = twobp.ActivationStore()
    dy = None
    times: dict[str, list[float]] = {}

    def timed(key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(key, []).append(time.perf_counter() - t0)
        return out

    def normal():
        h = timed("F normal", lambda: ours_stage(x))
        timed("B normal", lambda: h.backward(dy))

    def split():
        def fwd():
            with twobp.split_backward(microbatch=0, store=store):
                return ours_stage(x)
        h = timed("F split", fwd)
        timed("P1", lambda: h.backward(dy))
        timed("P2", lambda: twobp.backward_p2(ours_stage, microbatches=[0], store=store))

    def plain():
        h = timed("F torch", lambda: torch_stage(x))
        timed("B torch", lambda: h.backward(dy))

    with torch.no_grad():
        dy = torch.randn_like(ours_stage(x))
    order = [normal, split, plain]
    for i in range(warmup + rounds):
        if i == warmup:
            times.clear()
        for fn in order[i % 3:] + order[:i % 3]:
            fn()
        for stage in (ours_stage, torch_stage):
            stage.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["P1 + P2"] = med["P1"] + med["P2"]
    return med


def report(rows: list[tuple[str, str, int, dict[str, float]]], command: str, seconds: float) -> str:
    import torch

    from twobp.benchmarks.timing import machine_name

    lines = ["# One stage, one process: twobp's modules against torch's", "",
             f"- machine: {machine_name(torch.device('cpu'))}; torch {torch.__version__}",
             f"- command: `{command}`",
             "- method: the first half of the model's blocks, one micro-batch; twobp normal mode, twobp inside "
             "split_backward and torch's modules (twobp.revert, same weights) alternate call by call, order "
             "rotated; medians. Ratios against torch's modules: above 1.0 is time twobp adds around the same "
             "aten kernels.",
             f"- whole run: {seconds:.0f} s", "",
             "| model | rows | F torch | F normal | F split | B torch | B normal | P1 | P2 | P1 + P2 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, preset, n, med in rows:
        ft, bt = med["F torch"], med["B torch"]
        cells = [f"{ft * 1e3:.1f} ms", _vs(med["F normal"], ft), _vs(med["F split"], ft), f"{bt * 1e3:.1f} ms",
                 _vs(med["B normal"], bt), f"{med['P1'] * 1e3:.1f} ms", f"{med['P2'] * 1e3:.1f} ms",
                 _vs(med["P1 + P2"], bt)]
        lines.append(f"| {name}/{preset} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _vs(t: float, ref: float) -> str:
    return f"{t * 1e3:.1f} ms ({t / ref:.3f}x)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama",
                    help="comma-separated models: llama, bert, resnet (default llama)")
    ap.add_argument("--preset", default=None, help="model preset (default: the comparison's: llama small, "
                                                   "bert cpu, resnet cpu)")
    ap.add_argument("--rows", type=positive_int, default=None, help="rows per micro-batch (default: the "
                                                                 "comparison's at m = 4)")
    ap.add_argument("--rounds", type=positive_int, default=10, help="timed rounds (default 10)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = [m for m in names if m not in DEFAULTS]
    if unknown or not names:
        ap.error(f"--model: unknown {unknown or names}; choose from {', '.join(DEFAULTS)}")
    start = time.perf_counter()
    rows = []
    for name in names:
        preset = args.preset or DEFAULTS[name][0]
        n = args.rows or DEFAULTS[name][1]
        print(f"{name}/{preset}, {n} rows, {args.rounds} rounds ...", file=sys.stderr, flush=True)
        rows.append((name, preset, n, measure(name, preset, n, args.rounds)))
    command = "python bench/stage_overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report(rows, command, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
