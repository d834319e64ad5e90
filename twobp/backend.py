"""Which implementation of the split contract runs: Triton kernels or the torch reference.

The rule, in order:

1. ``with twobp.use_backend("torch" | "triton"):`` forces one (tests use this).
2. The environment variable ``TWOBP_BACKEND=torch|triton`` forces one (read on the first
   op; :func:`reload_environment` reads it, and ``TRITON_INTERPRET``, again).
3. CUDA tensors take Triton.
4. CPU tensors take the torch reference, unless ``TRITON_INTERPRET=1`` is set, in which
   case they run the real Triton kernels through Triton's interpreter (how CPU tests
   exercise the kernels).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Literal

import torch

__all__ = ["Backend", "forced_backend", "pinned_backend", "resolve_backend", "gemm_backend", "use_backend",
           "triton_available", "reload_environment"]

Backend = Literal["torch", "triton"]
_VALID = ("torch", "triton")
_local = threading.local()


_env: dict[str, str | None] = {}  # the two variables, read once (see reload_environment)


def reload_environment() -> None:
    """Read ``TWOBP_BACKEND`` and ``TRITON_INTERPRET`` again. They are read once, on the first
    op, because this sits on every op's path; call this after changing them at run time."""
    _env["backend"] = os.environ.get("TWOBP_BACKEND") or None
    _env["interpret"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreting() -> bool:
    if not _env:
        reload_environment()
    return bool(_env["interpret"])


def triton_available() -> bool:
    """True when Triton is importable and can run here (a GPU, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpreting()


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Force a backend for the calls made inside the block (per thread)."""
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {name!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def forced_backend() -> Backend | None:
    """The backend :func:`use_backend` forces on this thread, if any."""
    return getattr(_local, "forced", None)


@contextlib.contextmanager
def pinned_backend(name: Backend | None) -> Iterator[None]:
    """:func:`use_backend` when ``name`` is set; nothing otherwise. The autograd engine runs the
    backward of CUDA tensors on its own device thread, where the forward's (per-thread)
    ``use_backend`` is not in force: split ops pin the forward's choice around their backward."""
    if name is None:
        yield
        return
    with use_backend(name):
        yield


def resolve_backend(device: torch.device) -> Backend:
    """The backend that runs ops on tensors of ``device`` (see the module docstring)."""
    forced = getattr(_local, "forced", None)
    if forced is None:  # the common case first: this sits on every op call's path
        if not _env:
            reload_environment()
        forced = _env["backend"]
        if forced is None:
            kind = device.type
            return "triton" if kind == "cuda" or (kind == "cpu" and _env["interpret"]) else "torch"
    if forced not in _VALID:
        raise ValueError(f"TWOBP_BACKEND must be one of {_VALID}, got {forced!r}")
    if forced == "triton" and device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "the triton backend on CPU tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing twobp, or use the torch backend")
    return forced  # type: ignore[return-value]


def gemm_backend(device: torch.device, dtype: torch.dtype, what: str) -> Backend:
    """:func:`resolve_backend` for ops built on ``tl.dot`` (linear, attention, conv), which
    refuses bf16 on Triton's CPU interpreter: its ``tl.dot`` computes bf16 wrongly (Triton
    3.9 multiplies the raw bit patterns; outputs around 9e9), so a result would be garbage."""
    backend = resolve_backend(device)
    if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu" and _interpreting():
        raise RuntimeError(
            f"{what}: bfloat16 on Triton's CPU interpreter (TRITON_INTERPRET=1) is refused: the interpreter's "
            "tl.dot computes bf16 wrongly, so the kernel would return garbage. Use float32 or float16 with the "
            "interpreter, or the torch backend for bf16 on CPU (twobp.use_backend('torch') or TWOBP_BACKEND=torch); "
            "on a GPU the kernels run bf16 natively")
    return backend
