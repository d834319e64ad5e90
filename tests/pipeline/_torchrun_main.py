"""Entry point for the torchrun test: init_from_env, one 1F1B-2BP step, compare on rank 0."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _workers as W  # noqa: E402

from twobp.pipeline import PipelineExecutor, init_from_env, make_schedule  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    rank, world = init_from_env(timeout=60)
    sched = make_schedule("1f1b", stages=world, microbatches=4, twobp=True)
    ex = PipelineExecutor(W.build_blocks(3), W.loss_fn, schedule=sched, timeout=60)
    x, y = W.make_batch(3, 9)
    res = ex.step(x, y, measure=False)
    ref = W.reference(3, 9)
    for k, p in ex.named_parameters():
        torch.testing.assert_close(p.grad, ref["grads"][k], rtol=1e-5, atol=1e-6)
    assert abs(res.loss - ref["loss"]) < 1e-6 and res.store_empty
    print(f"rank {rank}/{world} OK loss={res.loss:.6f}", flush=True)


if __name__ == "__main__":
    main()
