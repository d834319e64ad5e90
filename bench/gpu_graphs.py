"""How much of a block's wall time CUDA graphs give back, and whether a split step captures.

For a LLaMa-7B and a BERT-Large block (Triton kernels, bf16) at 1 and 8 sequences per micro-batch:
the wall time of one training micro-batch run eagerly and replayed from a ``torch.cuda.CUDAGraph``,
for three ways to run it: twobp plain (F + fused B), twobp split (F + P1 + P2, the 2BP step) and
the same weights in torch's own modules (``twobp.revert``: nn.Linear, norms, SDPA). The replay is
the kernels alone, so ``eager / replay`` is the share of the wall the host costs. Each captured
step's gradients (every weight and the input) are checked against the eager step's.

    python bench/gpu_graphs.py --out DIR      # on a GPU, about a minute after the kernels compile
    python bench/gpu_graphs.py --dry-run      # CPU, tiny blocks, eager only (no graphs on a CPU)

Written after bench/gpu_host_overhead.py found the BERT-Large block bound by Triton's Python
launch path on an H200 (7.9 ms eager against torch's 3.5 ms).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch


def _steps(block, x, dy):
    """{mode: closure running one micro-batch's forward and backward}; grads accumulate."""
    from twobp import backward_p2, split_backward

    def plain():
        block(x).backward(dy)

    def split():
        with split_backward(microbatch=0):
            y = block(x)
        y.backward(dy)
        backward_p2(block)

    return {"plain": plain, "split": split}


def _grads(block, x) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in block.parameters()] + [x.grad.detach().clone()]


def _clear(block, x) -> None:
    block.zero_grad(set_to_none=True)
    x.grad = None


def _worst_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-12))
               for u, v in zip(a, b))


def graphed(step, block, x, device) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """Capture ``step`` after a warm-up on a side stream (autotuning, allocator), with every grad
    None, so each replay writes exactly one micro-batch's gradients. Returns (graph, eager grads)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
        _clear(block, x)
        step()
        eager = _grads(block, x)
    torch.cuda.current_stream(device).wait_stream(side)
    _clear(block, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph, eager


def measure(label, block, make, device, dry_run: bool, progress=print) -> list[dict]:
    import twobp
    from twobp.benchmarks.timing import median_seconds

    torch.manual_seed(0)
    x = make().requires_grad_()
    dy = torch.randn_like(x)
    twin = twobp.revert(copy.deepcopy(block))
    steps = _steps(block, x, dy)
    cases = [("twobp plain", block, steps["plain"]),
             ("twobp split (2BP)", block, steps["split"]),
             ("torch modules", twin, lambda: twin(x).backward(dy))]
    rows = []
    for mode, mod, step in cases:
        eager_s = median_seconds(step, device=device)
        row = {"block": label, "mode": mode, "eager_ms": round(eager_s * 1e3, 3),
               "graph_ms": None, "host_share": None, "graph_grads_rel_err": None, "note": ""}
        if not dry_run:
            try:
                graph, eager_grads = graphed(step, mod, x, device)
                graph.replay()
                torch.cuda.synchronize(device)
                row["graph_grads_rel_err"] = float(f"{_worst_rel(_grads(mod, x), eager_grads):.2e}")
                replay_s = median_seconds(graph.replay, device=device)
                row["graph_ms"] = round(replay_s * 1e3, 3)
                row["host_share"] = round(max(0.0, 1 - replay_s / eager_s), 3)
                del graph
            except Exception as e:  # a step that cannot be captured is itself the finding
                row["note"] = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            _clear(mod, x)
        progress(f"{label:16s} {mode:18s} eager {row['eager_ms']:8.3f} ms  graph {row['graph_ms']} ms  "
                 f"grads {row['graph_grads_rel_err']} {row['note']}")
        rows.append(row)
    return rows


def _table(rows: list[dict], device: torch.device, args) -> str:
    from twobp.benchmarks.timing import machine_name

    md = [f"Machine: {machine_name(device)}; torch {torch.__version__}; "
          f"`python bench/gpu_graphs.py{' --dry-run' if args.dry_run else ''} --batches {args.batches}`", "",
          "| block | mode | eager ms | CUDA graph ms | host share of eager | graph grads vs eager (max rel) | note |",
          "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        share = "" if r["host_share"] is None else f"{r['host_share']:.0%}"
        md.append(f"| {r['block']} | {r['mode']} | {r['eager_ms']} | {r['graph_ms'] or ''} | {share} | "
                  f"{'' if r['graph_grads_rel_err'] is None else r['graph_grads_rel_err']} | {r['note']} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for graphs.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, torch backend, tiny blocks, eager only")
    ap.add_argument("--batches", default="1,8", help="sequences per micro-batch, comma-separated")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches takes integers like 1,8, got {args.batches!r}")
    if min(batches) < 1:
        ap.error(f"--batches must be >= 1, got {args.batches}")
    import twobp
    from twobp.benchmarks.layer_costs import _blocks_to_measure

    device = torch.device("cpu" if args.dry_run else "cuda")
    rows: list[dict] = []
    with twobp.use_backend("torch" if args.dry_run else "triton"):
        for b in batches:
            for label, block, make, _, _ in _blocks_to_measure(device, args.dry_run, b)[:2]:
                rows += measure(f"{label}-b{b}", block, make, device, args.dry_run)
                del block
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if args.out:  # after every block: a run cut short still leaves its rows
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / "graphs.md").write_text(_table(rows, device, args))
    print(_table(rows, device, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
