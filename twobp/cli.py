"""The `twobp` command: run, train, compare, simulate and bench.

    twobp run                  the embedded default job (see `twobp run --help`)
    twobp bench kernels        dX vs dW kernel microbenchmarks against torch
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="twobp",
        description="2-stage backpropagation: split dX/dW kernels and a pipeline runtime that runs the "
                    "deferred weight gradients (p2) in the pipeline's idle time.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench", help="microbenchmarks", description="Microbenchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    from .benchmarks import kernels

    k = bench_sub.add_parser("kernels", help="fwd / dX (p1) / dW (p2) / batched dW of every op vs torch",
                             description=kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_arguments(k)
    k.set_defaults(func=kernels.main)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
