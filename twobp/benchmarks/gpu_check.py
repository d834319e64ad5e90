"""Every GPU check in one call, sized for a short GPU lease: ``bench/gpu_check.sh``.

Phases, in this order, each writing its files into ``--out`` the moment it ends (a timeout
still leaves everything done so far), and ``summary.md`` rewritten after every phase:

1. ``1-env.md``: GPU, torch, triton, CUDA, SMs;
2. ``2-correctness.{csv,md}``: every kernel in bf16, fp16 and fp32 against float64 autograd
   (forward, dX, dW, and dW batched over two micro-batches), poisoned outputs;
3. ``3-linear.{md,csv}``: linear fwd / dX / dW / batched dW against cuBLAS at LLaMa-7B
   shapes (8192 tokens, 4096 <-> 11008), bf16; on Hopper also the TMA kernels against the
   pointer kernels (``3-linear-tma.md``);
4. ``4-attention.{md,csv}``: flash attention fwd / backward against SDPA's flash backend at
   LLaMa-7B's head dim 128, causal;
5. ``5-norms-conv.{md,csv}``: RMSNorm (7B), LayerNorm (BERT-Large), ResNet-152 convs;
6. ``6-layers.{csv,md}``: per-block F / P1 / P2 of a LLaMa-7B, a BERT-Large and a Mamba-1.4B block;
7. ``7-prediction.md``: the simulator's prediction for 4 stages (labelled a prediction).

Time: autotuning is what costs on a fresh machine (every config is compiled, then timed), so
the correctness phase runs one config per kernel and the benchmarks at most
``--autotune-configs`` (default 3) per autotuning key, the first of each kernel's list
(``TWOBP_AUTOTUNE_MAX_CONFIGS``; the lists are ordered best first). ``--deadline`` (Unix
time; the shell script passes its start + 6 min less a margin) skips what would not finish.

``--dry-run`` does the same on the CPU at tiny sizes (Triton's interpreter for correctness,
the torch reference for timings), so a GPU run never fails on a typo.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .correctness import ODD_CASES, check_ops
from .kernels import _attention_case, _conv_case, _layer_norm_case, _linear_case, _rms_norm_case
from .kernels import BenchRow, format_table, run_kernel_bench, write_results
from .timing import machine_name, median_seconds

__all__ = ["main", "PHASES"]

PHASES = ("correctness", "linear", "attention", "norms-conv", "layers", "prediction")
_MIN_SECONDS = {"correctness": 20, "linear": 25, "attention": 15, "norms-conv": 20, "layers": 15, "prediction": 1}


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


class _Autotune:
    """Caps autotuning at n configs per key (TWOBP_AUTOTUNE_MAX_CONFIGS) inside a with block."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.old = os.environ.get("TWOBP_AUTOTUNE_MAX_CONFIGS")
        if self.n:
            os.environ["TWOBP_AUTOTUNE_MAX_CONFIGS"] = str(self.n)

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("TWOBP_AUTOTUNE_MAX_CONFIGS", None)
        else:
            os.environ["TWOBP_AUTOTUNE_MAX_CONFIGS"] = self.old
        return False


def _compact(rows: list[BenchRow]) -> list[str]:
    """One line per (op, shape): each phase's speed relative to torch (above 1: ours faster)."""
    lines, order = {}, []
    for r in rows:
        key = f"{r.op} {r.shape}"
        if key not in lines:
            lines[key], order = [], order + [key]
        phase = r.phase.split(" (")[0].replace("dw batched", "batched dW")
        ratio = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        rate = f" ({r.rate:.0f} {r.unit})" if r.rate is not None and r.rate >= 1 else ""
        lines[key].append(f"{phase} {ratio}{rate}")
    return [f"- {k}: " + ", ".join(lines[k]) for k in order]


class _Run:
    """The output folder, the time budget and the running summary."""

    def __init__(self, out: Path, deadline: float | None, header: list[str]):
        self.out, self.deadline, self.t0 = out, deadline, time.time()
        self.summary = header + [""]
        self.timings: list[str] = []
        self.failures = 0

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def monotonic_deadline(self) -> float | None:
        return None if self.deadline is None else time.monotonic() + self.left()

    def phase(self, name: str, fn: Callable[[], list[str]]) -> None:
        if self.left() < _MIN_SECONDS[name]:
            self.summary += [f"## {name}: skipped, {self.left():.0f} s left", ""]
            self.timings.append(f"{name} skipped")
            self.write_summary()
            return
        print(f"== {name} ({time.time() - self.t0:.0f} s in, {self.left():.0f} s left) ==", flush=True)
        t = time.time()
        try:
            lines = fn()
        except Exception as e:  # noqa: BLE001  (one failing phase must not lose the others)
            self.failures += 1
            lines = [f"FAILED: {type(e).__name__}: {e}"]
            print(f"  {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        self.timings.append(f"{name} {time.time() - t:.0f} s")
        self.summary += [f"## {name}"] + lines + [""]
        self.write_summary()

    def write_summary(self) -> None:
        text = self.summary + [f"phase times: {', '.join(self.timings)}; total {time.time() - self.t0:.0f} s"]
        (self.out / "summary.md").write_text("\n".join(text) + "\n")


def _correctness(run: _Run, device, dtypes) -> list[str]:
    with _Autotune(1):
        rows = check_ops(ODD_CASES(), device, dtypes)
    with (run.out / "2-correctness.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "shape", "dtype", "output", "rel_err", "tol", "ok"])
        for r in rows:
            w.writerow([r.op, r.shape, r.dtype, r.output, f"{r.rel_err:.3e}", r.tol, r.ok])
    bad = [r for r in rows if not r.ok]
    run.failures += len(bad)
    md = ["| op | shape | dtype | output | rel. error | tolerance | ok |", "|---|---|---|---|---:|---:|---|"]
    md += [f"| {r.op} | {r.shape} | {r.dtype} | {r.output} | {r.rel_err:.2e} | {r.tol:g} | {r.ok} |" for r in rows]
    (run.out / "2-correctness.md").write_text("# Correctness against float64\n\n" + "\n".join(md) + "\n")
    worst = {}
    for r in rows:
        if r.dtype not in worst or r.rel_err / r.tol > worst[r.dtype].rel_err / worst[r.dtype].tol:
            worst[r.dtype] = r
    lines = [f"{len(rows) - len(bad)} of {len(rows)} outputs within tolerance; worst per dtype: "
             + ", ".join(f"{d} {w.op} {w.output} {w.rel_err:.1e} (tol {w.tol:g})" for d, w in worst.items())]
    return lines + [f"- FAIL {r.op} {r.shape} {r.dtype} {r.output}: {r.rel_err:.3e} > {r.tol}" for r in bad[:8]]


def _bench(run: _Run, stem: str, title: str, cases, device, dtype, dry_run: bool, autotune: int) -> list[str]:
    kw = dict(reps=1, micro=2) if dry_run else dict(reps=5, micro=4)
    if dry_run:
        from ..backend import use_backend

        with use_backend("torch"):
            rows = run_kernel_bench(device=device, dtype=dtype, cases=cases, **kw)
    else:
        with _Autotune(autotune):
            rows = run_kernel_bench(device=device, dtype=dtype, cases=cases, deadline=run.monotonic_deadline(), **kw)
    write_results(rows, run.out, f"# {title}, {machine_name(device)}, {dtype}", stem=stem)
    return _compact(rows) if rows else ["no case finished"]


def _tma_vs_pointer(run: _Run, device, dtype, m: int, k: int, n: int, autotune: int) -> list[str]:
    """Hopper only: the TMA kernels against the pointer kernels at one 7B shape."""
    from ..kernels.linear import linear_dw, linear_dx, linear_fwd

    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    dy = torch.randn(m, n, device=device, dtype=dtype)
    dw = torch.zeros(n, k, device=device, dtype=torch.float32)
    flops = 2.0 * m * n * k
    out = ["| phase | TMA ms | pointer ms | TMA speed-up | TMA TFLOP/s |", "|---|---:|---:|---:|---:|"]
    lines = []
    with _Autotune(autotune):
        for phase, fn in (("fwd", lambda t: linear_fwd(x, w, tma=t)), ("dx", lambda t: linear_dx(dy, w, tma=t)),
                          ("dw", lambda t: linear_dw(x, dy, dw, tma=t))):
            if run.left() < 10:
                break
            t_tma = median_seconds(lambda: fn(True), device=device) * 1e3
            t_ptr = median_seconds(lambda: fn(False), device=device) * 1e3
            out.append(f"| {phase} | {t_tma:.3f} | {t_ptr:.3f} | {t_ptr / t_tma:.2f}x | {flops / t_tma / 1e9:.0f} |")
            lines.append(f"{phase} {t_ptr / t_tma:.2f}x")
    (run.out / "3-linear-tma.md").write_text(f"# TMA vs pointer kernels, linear {m}x{k}->{n}, {dtype}\n\n"
                                              + "\n".join(out) + "\n")
    return [f"- TMA kernels vs pointer kernels ({m}x{k}->{n}): " + ", ".join(lines)]


def _layers(run: _Run, device, dry_run: bool, store: dict) -> list[str]:
    from .layer_costs import default_microbatch, measure_blocks, write_layers

    batch = default_microbatch(device)
    rows = measure_blocks(device=device, dry_run=dry_run, batch=batch)
    store["layers"], store["batch"] = rows, batch
    write_layers(rows, run.out / "6-layers.csv")
    lines = [f"- {label}: F {c['F'] * 1e3:.2f} ms, P1 {c['P1'] * 1e3:.2f} ms, P2 {c['P2'] * 1e3:.2f} ms, "
             f"fused B {c['B'] * 1e3:.2f} ms per block ({batch} x {seq} tokens)" for label, seq, _, c in rows]
    (run.out / "6-layers.md").write_text("# Per-block costs\n\n" + "\n".join(lines) + "\n")
    return lines


def _prediction(run: _Run, device, store: dict) -> list[str]:
    from .layer_costs import prediction_markdown

    if "layers" not in store:
        return ["no block costs measured"]
    text, short = prediction_markdown(store["layers"], device=device, stages=4, batch=store["batch"])
    (run.out / "7-prediction.md").write_text(text + "\n")
    return [f"- {s}" for s in short]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<card>-<date>/)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreter: checks the script itself")
    ap.add_argument("--skip", nargs="*", default=[], choices=PHASES, help="phases to skip")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time by which to be done (default: 5.5 min from now on a GPU, none in a dry run)")
    ap.add_argument("--autotune-configs", type=int, default=3, help="most configs timed per autotuning key")
    args = ap.parse_args(argv)

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        dtypes = [torch.float32, torch.float16]
        deadline = args.deadline
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        dtypes = [torch.bfloat16, torch.float16, torch.float32]
        deadline = args.deadline if args.deadline is not None else time.time() + 330
    slug = "".join(c if c.isalnum() else "-" for c in machine_name(device).split("(")[0].strip().lower())
    out = args.out or Path("bench/results") / f"{slug.strip('-')[:40]}-{_dt.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)

    header = [f"# twobp GPU check{' (CPU dry run)' if args.dry_run else ''}", "", _env(device)]
    (out / "1-env.md").write_text("\n".join(header) + "\n")
    header += ["", "Ratios are torch's time / ours (above 1: ours faster); autotuning capped at "
               f"{args.autotune_configs} configs per key" + (" (dry run: torch reference timed)" if args.dry_run else "")]
    print("\n".join(header), flush=True)
    run = _Run(out, deadline, header)
    run.write_summary()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # the shell's timeout: still write the summary

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    tokens, images = (32, 1) if args.dry_run else (8192, 32)
    seq7b = min(1024, tokens)
    store: dict = {}
    phases = {
        "correctness": lambda: _correctness(run, device, dtypes),
        "linear": lambda: _bench(run, "3-linear", "linear vs cuBLAS, LLaMa-7B", [
            _linear_case("llama7b up", tokens, 4096 if not args.dry_run else 64, 11008 if not args.dry_run else 96),
            _linear_case("llama7b down", tokens, 11008 if not args.dry_run else 96, 4096 if not args.dry_run else 64),
        ], device, dtype, args.dry_run, args.autotune_configs) + (
            _tma_vs_pointer(run, device, dtype, tokens, 4096, 11008, args.autotune_configs)
            if not args.dry_run and torch.cuda.get_device_capability(device)[0] == 9 else []),
        "attention": lambda: _bench(run, "4-attention", "attention vs SDPA flash, LLaMa-7B", [
            _attention_case("llama7b", max(1, tokens // seq7b), seq7b, 32 if not args.dry_run else 2,
                            32 if not args.dry_run else 2, 128 if not args.dry_run else 16, True),
        ], device, dtype, args.dry_run, args.autotune_configs),
        "norms-conv": lambda: _bench(run, "5-norms-conv", "norms and convs vs torch / cuDNN", [
            _rms_norm_case("llama7b", tokens, 4096 if not args.dry_run else 64),
            _layer_norm_case("bert-large", tokens, 1024 if not args.dry_run else 48),
            _conv_case("resnet152 conv2 3x3", images, 64 if not args.dry_run else 4, 56 if not args.dry_run else 8,
                       64 if not args.dry_run else 4, 3, 1),
            _conv_case("resnet152 conv4 1x1", images, 1024 if not args.dry_run else 8, 14 if not args.dry_run else 6,
                       256 if not args.dry_run else 4, 1, 1),
            _conv_case("resnet152 conv4 3x3", images, 256 if not args.dry_run else 4, 14 if not args.dry_run else 6,
                       256 if not args.dry_run else 4, 3, 1),
        ], device, dtype, args.dry_run, args.autotune_configs),
        "layers": lambda: _layers(run, device, args.dry_run, store),
        "prediction": lambda: _prediction(run, device, store),
    }
    try:
        for name in PHASES:
            if name in args.skip:
                run.summary += [f"## {name}: skipped (--skip)", ""]
                continue
            run.phase(name, phases[name])
    finally:
        run.write_summary()
        print("\n".join(run.summary[len(header):]))
        print(f"phase times: {', '.join(run.timings)}; total {time.time() - run.t0:.0f} s")
        print(f"wrote {out}/", flush=True)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
