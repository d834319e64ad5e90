"""Shared assertions: compare against float64 references with per-dtype tolerances."""

from __future__ import annotations

import torch

# (relative error by norm, elementwise atol, elementwise rtol) per compute dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4, 1e-4),
    torch.float16: (2e-3, 2e-2, 2e-2),
    torch.bfloat16: (1.6e-2, 8e-2, 5e-2),
}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer with NaN so elements a kernel forgets to write fail every comparison."""
    return t.fill_(float("nan"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 *, name: str = "tensor", scale: float = 1.0) -> None:
    """Assert ``actual`` matches the float64 ``expected``.

    Checks the relative error by norm (the headline figure) and every element with
    atol/rtol, naming the worst element on failure. ``scale`` loosens a tolerance for
    reductions that are long compared to the dtype's precision.
    """
    dtype = dtype or actual.dtype
    rel_tol, atol, rtol = (v * scale for v in TOLERANCES[dtype])
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite elements (unwritten?)"
    denom = e.norm().clamp_min(1e-30)
    rel = ((a - e).norm() / denom).item()
    err = (a - e).abs()
    bound = atol * max(1.0, e.abs().max().item()) + rtol * e.abs()
    bad = err > bound
    if rel > rel_tol or bad.any():
        idx = torch.nonzero(bad)[:5].tolist() if bad.any() else []
        worst = int(err.argmax())
        raise AssertionError(
            f"{name} ({dtype}): relative error by norm {rel:.3g} (tol {rel_tol:.3g}); "
            f"{int(bad.sum())} of {a.numel()} elements out of tolerance, e.g. at {idx}; "
            f"worst flat index {worst}: got {a.flatten()[worst].item():.6g}, "
            f"expected {e.flatten()[worst].item():.6g}")


def assert_covers_all_work(schedule, split: bool | None) -> None:
    """Every (micro-batch, chunk) of every rank has exactly one F and its backward exactly once:
    P1 and P2 (``split=True``), B (``False``), or either (``None``: auto may keep some fused)."""
    import itertools

    for r, acts in enumerate(schedule.ranks):
        counts: dict = {}
        for a in acts:
            for mb in a.mbs:
                counts[(a.kind, mb, a.chunk)] = counts.get((a.kind, mb, a.chunk), 0) + 1
        for mb, c in itertools.product(range(schedule.microbatches), range(schedule.chunks)):
            got = {k: counts.get((k, mb, c), 0) for k in ("F", "B", "P1", "P2")}
            fused, halves = got == {"F": 1, "B": 1, "P1": 0, "P2": 0}, got == {"F": 1, "B": 0, "P1": 1, "P2": 1}
            ok = halves if split else fused if split is False else fused or halves
            assert ok, f"rank {r}, micro-batch {mb}, chunk {c}: {got}"
