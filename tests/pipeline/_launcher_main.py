"""A launcher process for the fault tests: spawns two training ranks and waits."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _workers as W  # noqa: E402
from twobp.pipeline import spawn  # noqa: E402

if __name__ == "__main__":
    spawn(W.train_forever, world_size=2, args=(sys.argv[1], 120.0), timeout=30, join_timeout=300,
          env={"OMP_NUM_THREADS": "1"})
