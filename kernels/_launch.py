"""What every launcher in this package shares: interpreter detection, argument checks,
and the device-side micro-batch table of batched p2.

No kernels here and no state beyond the import-time interpreter flag.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton

__all__ = ["INTERPRET", "DTYPES", "as_list", "check_devices", "check_dtype", "check_tensor", "device_table"]


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (decided when triton is imported)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        try:
            return bool(knobs.runtime.interpret)
        except AttributeError:  # a Triton without the runtime.interpret knob
            pass
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = _interpreting()
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, ndim: int, hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}{hint}")


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype], why: str) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name} has dtype {t.dtype}, expected {names} ({why})")


def check_devices(family: str, **tensors: torch.Tensor | None) -> torch.device:
    """The one device all given tensors are on, where ``family``'s kernels can run."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}; move them with .to(device)")
    device = next(iter(devices))
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise ValueError(
            f"tensors are on {device}: the Triton {family} kernels need CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported (otherwise use the torch reference backend)")
    return device


def as_list(name: str, v) -> list[torch.Tensor]:
    """A tensor or a sequence of tensors (one per micro-batch), as a list."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
        return list(v)
    raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(v).__name__}")


def device_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """The batched-p2 micro-batch table (one int64 row per micro-batch) on ``device``.

    On CUDA it goes through pinned memory with a non-blocking copy, ordered on the current
    stream, so the host does not wait for queued GPU work (a copy from pageable memory
    would synchronise the stream). Torch's pinned-memory cache keeps the host buffer alive
    until the copy has run.
    """
    if device.type != "cuda":
        return torch.tensor(rows, dtype=torch.int64, device=device)
    return torch.tensor(rows, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
