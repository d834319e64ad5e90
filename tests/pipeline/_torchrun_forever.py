"""One torchrun rank of the fault tests: trains until killed (see _workers.train_forever)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _workers as W  # noqa: E402
from twobp.pipeline import init_from_env  # noqa: E402

if __name__ == "__main__":
    rank, world = init_from_env(backend="gloo", timeout=30)
    W.train_forever(rank, world, sys.argv[1], 120.0)
