"""Where the host's time goes in one block: cProfile of forward + backward of a BERT-Large block
(twobp, Triton backend, plain and split) against torch's own nn.TransformerEncoderLayer at the
same size, walls synchronised.

    python bench/gpu_host_overhead.py [--out DIR] [--dry-run]

Written after bench/gpu_profile_blocks.py found a BERT-Large block 85-97% host-bound on an H200.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    import twobp
    from twobp import backward_p2, split_backward
    from twobp.models import config
    from twobp.benchmarks.timing import median_seconds
    from twobp.models.bert import EncoderBlock

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    cfg = config("bert", "tiny" if args.dry_run else "large")
    b = 2 if args.dry_run else 8
    x = torch.randn(b, cfg.seq_len, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    ours = EncoderBlock(cfg, device=device, dtype=dtype)
    ref = torch.nn.TransformerEncoderLayer(cfg.dim, cfg.n_heads, 4 * cfg.dim, dropout=0.0, batch_first=True,
                                           activation="gelu", device=device, dtype=dtype)
    lines = []

    def plain(m):
        def step():
            m(x).backward(dy)
        return step

    def split():
        with split_backward(microbatch=0):
            y = ours(x)
        y.backward(dy)
        backward_p2(ours)

    backend = "torch" if args.dry_run else "triton"
    with twobp.use_backend(backend):
        rows = [("torch nn.TransformerEncoderLayer F+B", median_seconds(plain(ref), device=device)),
                (f"twobp EncoderBlock ({backend}) F+B", median_seconds(plain(ours), device=device)),
                (f"twobp EncoderBlock ({backend}) F+P1+P2", median_seconds(split, device=device))]
        for name, sec in rows:
            lines.append(f"- {name}: {sec * 1e3:.3f} ms wall")
            print(lines[-1], flush=True)
        for name, fn in (("plain", plain(ours)), ("split", split)):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(28)
            lines.append(f"\n## cProfile, twobp {name}, 20 steps, by own time\n\n```\n{s.getvalue()}\n```")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
