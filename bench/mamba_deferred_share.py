"""Which share of Mamba's parameter elements get their gradient in p2 (deferred) and which in p1,
measured by running the split: forward inside ``split_backward``, p1 (``loss.backward()``),
then every parameter whose ``.grad`` is already written is a p1 parameter; ``backward_p2``
must then write all the others.

    python bench/mamba_deferred_share.py                    # Mamba-1.4B, tied (as Mamba), bf16, 16 tokens
    python bench/mamba_deferred_share.py --untied --layers 2

The whole 1.4B model runs on the CPU (bf16 weights: 2.7 GB, gradients as much) on one short
sequence: which gradient lands where does not depend on the length.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import twobp
from twobp import models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1.4b")
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (default: the preset's)")
    ap.add_argument("--untied", action="store_true", help="an untied head (Mamba ties it)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    overrides = dict(seq_len=args.tokens, scan_chunk=16, tie_embeddings=not args.untied)
    if args.layers:
        overrides["n_layers"] = args.layers
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = models.build("mamba", args.preset, dtype=dtype, **overrides)
    x, y = model.example_batch(1, generator=torch.Generator().manual_seed(1))
    with twobp.use_backend("torch"):
        with twobp.split_backward(microbatch=0):
            loss = model.loss_fn(model(x), y)
        loss.backward()  # p1 only
        in_p1 = {n for n, p in model.named_parameters() if p.grad is not None}
        twobp.backward_p2(model)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    if missing:
        raise SystemExit(f"no gradient after p2 for {missing[:5]}")
    total = model.num_parameters()
    p1 = sum(p.numel() for n, p in model.named_parameters() if n in in_p1)
    blocks = model.layers
    block_total = sum(p.numel() for p in blocks.parameters())
    block_p1 = sum(p.numel() for n, p in blocks.named_parameters() if f"layers.{n}" in in_p1)
    c = model.config
    print(f"mamba/{args.preset}{' (' + str(args.layers) + ' layers)' if args.layers else ''}, "
          f"{'untied' if args.untied else 'tied'} head, {args.dtype}, {total:,} parameters "
          f"(d_model {c.d_model}, {c.n_layers} layers, vocab {c.padded_vocab}); {time.perf_counter() - t0:.0f} s")
    print(f"  gradient written in p1: {sorted(in_p1)} = {p1:,} elements ({p1 / total:.1%})")
    print(f"  gradient entirely deferred to p2: {total - p1:,} elements ({(total - p1) / total:.1%} of the model)")
    print(f"  blocks (mixer + norm, all {c.n_layers}): {block_total - block_p1:,} of {block_total:,} deferred "
          f"({(block_total - block_p1) / block_total:.1%})")
    if model.tied:
        where = "in p1 (lookup) and p2 (head)" if "embed.weight" in in_p1 else "both in p2 (lookup's scatter-add, head's matmul)"
        print(f"  the tied embedding/head weight gets its two shares {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
