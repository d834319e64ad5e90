"""Does one weight-gradient call over several micro-batches beat one call per micro-batch, for
the convolutions of a ResNet stage on this CPU (the 2BP paper's batched P2)?

For each convolution of the model's first ``--blocks`` blocks, at the shapes one micro-batch of
``--images`` images gives it: aten's weight gradient (``convolution_backward`` with the weight
mask only) over ``--microbatches`` micro-batches as that many calls, and as one call over the
concatenated batch (concatenation not timed). One thread; medians of ``--reps``.

    python bench/conv_dw_batch.py [--preset cpu] [--images 4] [--microbatches 4] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from twobp.benchmarks.timing import machine_name, median_seconds
from twobp.models import build


def _dw(conv: torch.nn.Conv2d, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(dy, x, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                               False, [0, 0], conv.groups, [False, True, False])[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", help="ResNet preset")
    ap.add_argument("--blocks", type=int, default=4, help="the model's first blocks to take convolutions from")
    ap.add_argument("--images", type=int, default=4, help="images per micro-batch")
    ap.add_argument("--microbatches", type=int, default=4, help="micro-batches one batched call covers")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (median)")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("resnet", args.preset)
    seen: list[tuple[torch.nn.Conv2d, torch.Size, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].shape, out.shape)))
             for b in model.blocks()[:args.blocks] for m in b.modules() if isinstance(m, torch.nn.Conv2d)]
    x, _ = model.example_batch(args.images)
    with torch.no_grad():
        for b in model.blocks()[:args.blocks]:
            x = b(x)
    for h in hooks:
        h.remove()
    k = args.microbatches
    rows, per_mb, batched = [], 0.0, 0.0
    for conv, xs, ys in seen:
        xb, dyb = torch.randn(k * xs[0], *xs[1:]), torch.randn(k * ys[0], *ys[1:])
        parts = list(zip(xb.chunk(k), dyb.chunk(k)))
        cpu = torch.device("cpu")
        t_sep = median_seconds(lambda: [_dw(conv, a, b) for a, b in parts], device=cpu, reps=args.reps) * 1e3
        t_one = median_seconds(lambda: _dw(conv, xb, dyb), device=cpu, reps=args.reps) * 1e3
        per_mb, batched = per_mb + t_sep, batched + t_one
        rows.append(f"| {tuple(conv.weight.shape)} | {tuple(xs[1:])} | {t_sep:.2f} | {t_one:.2f} | {t_one / t_sep:.2f}x |")
    text = "\n".join([
        "# Convolution weight gradients: one call per micro-batch or one over all",
        "",
        f"- machine: {machine_name(torch.device('cpu'))}, one thread; torch {torch.__version__}",
        f"- command: `python bench/conv_dw_batch.py --preset {args.preset} --blocks {args.blocks} --images "
        f"{args.images} --microbatches {args.microbatches} --reps {args.reps}`",
        "",
        f"| weight | input per image | {k} calls of {args.images} images (ms) | one call of {k * args.images} (ms) | one / per micro-batch |",
        "|---|---|---:|---:|---:|",
        *rows,
        f"| **all {len(seen)}** | | {per_mb:.1f} | {batched:.1f} | **{batched / per_mb:.2f}x** |",
        "",
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
