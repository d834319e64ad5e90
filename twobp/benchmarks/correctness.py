"""Correctness of every split op against float64 torch autograd, on any device.

For each op at an odd shape and each dtype: run our forward, dX (p1) and dW (p2, accumulated
into non-zero buffers), compute the same with torch autograd in float64 from the same
inputs, and report the relative error by norm of every output. p2 is checked twice: over the
whole batch as one micro-batch, and batched over two micro-batches (the first rows / images
and the rest) in one call, which is the micro-batch-table path of the kernels. Fresh random
inputs (never zeros). Before each launch the caching allocator is *poisoned*: a block is
filled with NaN and released, so an output element a kernel forgets to write comes back NaN
and fails. The cases include an aligned linear shape, which Hopper runs on the TMA kernels.

Used by ``bench/gpu_check.sh`` on CUDA (bf16, fp16, fp32) and dry-run on CPU.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["CheckRow", "check_ops", "ODD_CASES", "TOLERANCE"]

# relative error by norm that passes, per dtype (a few ulps of the dtype over long reductions)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class CheckRow:
    op: str
    shape: str
    dtype: str
    output: str
    rel_err: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.rel_err) and self.rel_err <= self.tol


def _poison_allocator(device: torch.device, nbytes: int = 64 << 20) -> None:
    if device.type == "cuda":
        torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(float("nan"))
        # released to the caching allocator still NaN-filled; the next outputs reuse it


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def ODD_CASES():
    """Small odd shapes, cheap enough for the interpreter, covering every op family."""
    from .kernels import (_attention_case, _causal_conv1d_case, _conv_case, _embedding_case, _layer_norm_case,
                          _linear_case, _rms_norm_case, _scan_case)

    return [
        _linear_case("odd", 37, 53, 29),
        _linear_case("aligned", 200, 96, 80),  # 16-byte rows: the TMA kernels on sm_90
        _layer_norm_case("odd", 37, 53),
        _rms_norm_case("odd", 37, 53),
        _attention_case("odd", 2, 37, 4, 2, 32, True),
        _attention_case("odd", 1, 45, 2, 2, 16, False),
        _conv_case("odd", 2, 3, 9, 5, 3, 2),
        _embedding_case("odd", 45, 37, 29),  # repeats, the padding row, masked lanes
        _causal_conv1d_case("odd", 2, 37, 21, 4),
        _scan_case("odd", 2, 37, 11, 5, 16),  # L over three chunks, the last one partial
    ]


@contextlib.contextmanager
def _ieee_fp32():
    """fp32 is checked as fp32: torch's TF32 switches off for the check (the kernels follow them;
    cuDNN's is on by default, and a TF32 product is only good to about 1e-3)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def check_ops(cases: Sequence, device: torch.device, dtypes: Sequence[torch.dtype], *,
              progress=print) -> list[CheckRow]:
    rows: list[CheckRow] = []
    for case in cases:
        for dtype in dtypes:
            try:
                with _ieee_fp32():
                    new = _check_case(case, device, dtype)
            except (ImportError, NotImplementedError) as e:
                progress(f"  {case.op_name} {case.shape} {dtype}: skipped ({e})")
                continue
            rows.extend(new)
            worst = max(new, key=lambda r: r.rel_err / r.tol)
            progress(f"  {case.op_name:<10} {case.shape:<40} {str(dtype):<15} "
                     f"{'ok  ' if all(r.ok for r in new) else 'FAIL'} worst {worst.output} {worst.rel_err:.2e}")
    return rows


def _check_case(case, device: torch.device, dtype: torch.dtype) -> list[CheckRow]:
    gen = torch.Generator().manual_seed(1234)
    op, inputs, params = case.build(torch.device("cpu"), torch.float32, gen)
    # floating inputs in the dtype under test; integer ones (embedding ids) as they are
    inputs = tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs)
    # trainable, so the ops save what p2 needs; the ops themselves run outside autograd
    params = tuple(p.to(device, dtype).requires_grad_() if p is not None else None for p in params)
    with torch.no_grad():
        dy = torch.randn(case.torch_fn(*inputs, *params).shape, generator=gen).to(device, dtype)
        return _check_outputs(case, op, inputs, params, dy, gen, device, dtype)


def _check_outputs(case, op, inputs, params, dy, gen, device, dtype) -> list[CheckRow]:
    _poison_allocator(device)
    y, p1, _ = op.forward(inputs, params, save_p1=True, save_p2=True)
    p2 = op.forward(inputs, params, save_p1=False, save_p2=True)[2]  # the deferred p2's own set
    _poison_allocator(device)
    dxs = op.input_grads(dy, p1, params, tuple(True for _ in inputs))
    start = [torch.randn(p.shape, generator=gen).to(device, torch.float32) if p is not None else None
             for p in params]
    grads = [s.clone() if s is not None else None for s in start]
    if any(g is not None for g in grads):
        _poison_allocator(device)
        op.param_grads([dy], [p2], grads)

    x64 = [t.detach().double().cpu().requires_grad_() if t.is_floating_point() else t.cpu() for t in inputs]
    p64 = [p.detach().double().cpu().requires_grad_() if p is not None else None for p in params]
    with torch.enable_grad():
        y64 = case.torch_fn(*x64, *p64)
        wrt = [t for t in x64 if t.requires_grad] + [p for p in p64 if p is not None]
        g64 = torch.autograd.grad(y64, wrt, dy.double().cpu())
    tol = TOLERANCE[dtype]
    rows = [CheckRow(case.op_name, case.shape, str(dtype).replace("torch.", ""), "y", _rel(y, y64), tol)]
    gi = 0
    for i, dx in enumerate(dxs):
        if not x64[i].requires_grad:  # integer ids: no input gradient, and the op must say so
            if dx is not None:
                raise AssertionError(f"{case.op_name}: input {i} is integer but input_grads returned a tensor")
            continue
        rows.append(CheckRow(case.op_name, case.shape, str(dtype).replace("torch.", ""), f"dx{i}",
                             _rel(dx, g64[gi]), tol))
        gi += 1
    batched = _batched_p2(op, inputs, params, dy, start, device)
    for j, (g, s) in enumerate(zip(grads, start)):
        if g is None:
            continue
        rows.append(CheckRow(case.op_name, case.shape, str(dtype).replace("torch.", ""), f"dparam{j}",
                             _rel(g - s, g64[gi]), tol))
        if batched is not None:
            rows.append(CheckRow(case.op_name, case.shape, str(dtype).replace("torch.", ""), f"dparam{j} batched x2",
                                 _rel(batched[j] - s, g64[gi]), tol))
        gi += 1
    return rows


def _batched_p2(op, inputs, params, dy, start, device):
    """p2 over two micro-batches (the batch split along dim 0) in one param_grads call, into
    copies of ``start``; None when the op has no parameters or the batch has one row."""
    if all(p is None for p in params) or inputs[0].shape[0] < 2:
        return None
    halves = [torch.tensor_split(t, 2, dim=0) for t in (*inputs, dy)]
    saved = []
    for i in range(2):
        _, _, p2_i = op.forward(tuple(h[i] for h in halves[:-1]), params, save_p1=False, save_p2=True)
        saved.append(p2_i)
    grads = [s.clone() if s is not None else None for s in start]
    _poison_allocator(device)
    op.param_grads([halves[-1][0], halves[-1][1]], saved, grads)
    return grads
