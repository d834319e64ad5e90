"""The full AOT sweep: every kernel x model shape x autotune config x dtype, compiled for
sm_90 (H100/H200) and sm_80 (A100) without a GPU, into bench/results/aot-sweep.md.

    python bench/aot_sweep.py                      # the full sweep (about 30 min on 2 cores)
    python bench/aot_sweep.py --ci                 # the CI subset (tests/kernels/test_compile_targets.py)
    python bench/aot_sweep.py --families linear --dtypes bf16 --out /tmp/linear.md

Exit status 1 when a config the launchers keep is not clean (see twobp/benchmarks/aot_report.py).
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: the kernels must be JIT functions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

from twobp.benchmarks.aot_report import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).resolve().parent / "results" / "aot-sweep.md")]
    sys.exit(main(argv))
