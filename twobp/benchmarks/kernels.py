"""`twobp bench kernels`: fwd, dX (p1), dW (p2) and batched dW of every split op, against torch.

For each op at model shapes it times

* ours: the op's ``forward``, ``input_grads`` (p1), ``param_grads`` (p2) and the batched
  p2 over ``m`` micro-batches in one call vs ``m`` separate calls;
* torch: the same function through torch's own ops and autograd, with ``autograd.grad``
  asked for the input gradient only (dX), the parameter gradients only (dW), or both.

Work per call (the floor each figure is compared with):

* linear: 2·M·N·K FLOPs in each of fwd, dX and dW (M rows, K in, N out);
* norms: bytes moved, fwd 2·M·N, dX 3·M·N, dW 2·M·N elements (x, dy, out), plus the
  fp32 row statistics;
* attention: fwd 4·B·H·S²·D FLOPs (half when causal), dX 2.5x that (Dao, FlashAttention-2);
* conv2d: 2·N·OH·OW·O·C·KH·KW FLOPs in each of fwd, dX and dW.

On a CPU the "ours" column runs the torch reference backend (the Triton kernels need a
GPU, or the far-too-slow interpreter), the token counts are cut down, and the table says
so: those figures time the split bookkeeping, not the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..backend import resolve_backend
from .timing import machine_name, median_seconds

__all__ = ["BenchRow", "OpCase", "default_cases", "run_kernel_bench", "main"]


@dataclass(frozen=True)
class OpCase:
    """One op at one shape: how to build it, what torch computes, and its work per phase."""

    op_name: str
    shape: str
    build: Callable[[torch.device, torch.dtype, torch.Generator], tuple]  # -> (op, inputs, params)
    torch_fn: Callable[..., torch.Tensor]  # (*inputs, *params) -> y, through torch's own ops
    work: dict[str, float]  # phase -> FLOPs or bytes
    unit: str  # "TFLOP/s" or "GB/s"


@dataclass(frozen=True)
class BenchRow:
    op: str
    shape: str
    phase: str
    ours_ms: float
    torch_ms: float | None
    rate: float | None  # ours, in ``unit``
    unit: str
    backend: str

    @property
    def speedup(self) -> float | None:
        """torch time / our time: above 1 means ours is faster."""
        return None if self.torch_ms is None else self.torch_ms / self.ours_ms


def _rand(shape, device, dtype, gen):
    return torch.randn(shape, device=device, dtype=dtype, generator=gen if device.type == "cpu" else None)


# ---- the cases -------------------------------------------------------------------------
def _linear_case(label: str, m: int, k: int, n: int) -> OpCase:
    def build(device, dtype, gen):
        from ..ops.linear import LinearOp

        x = _rand((m, k), device, dtype, gen)
        w = _rand((n, k), device, dtype, gen) / math.sqrt(k)
        b = _rand((n,), device, dtype, gen)
        return LinearOp(), (x,), (w, b)

    flops = 2.0 * m * n * k
    return OpCase("linear", f"{label} {m}x{k}->{n}", build, F.linear,
                  {"fwd": flops, "dx": flops, "dw": flops}, "TFLOP/s")


def _layer_norm_case(label: str, m: int, n: int) -> OpCase:
    def build(device, dtype, gen):
        from ..ops.norm import LayerNormOp

        return LayerNormOp(eps=1e-5), (_rand((m, n), device, dtype, gen),), (
            1 + 0.1 * _rand((n,), device, dtype, gen), 0.1 * _rand((n,), device, dtype, gen))

    return OpCase("layernorm", f"{label} {m}x{n}", build, lambda x, w, b: F.layer_norm(x, (n,), w, b, 1e-5),
                  {"fwd": 2.0 * m * n, "dx": 3.0 * m * n, "dw": 2.0 * m * n}, "GB/s")


def _rms_norm_case(label: str, m: int, n: int) -> OpCase:
    def build(device, dtype, gen):
        from ..ops.norm import RMSNormOp

        return RMSNormOp(eps=1e-6), (_rand((m, n), device, dtype, gen),), (1 + 0.1 * _rand((n,), device, dtype, gen),)

    return OpCase("rmsnorm", f"{label} {m}x{n}", build, lambda x, w: F.rms_norm(x, (n,), w, 1e-6),
                  {"fwd": 2.0 * m * n, "dx": 3.0 * m * n, "dw": 2.0 * m * n}, "GB/s")


def _attention_case(label: str, b: int, s: int, h: int, hkv: int, d: int, causal: bool) -> OpCase:
    def build(device, dtype, gen):
        from ..ops.attention import AttentionCoreOp

        q = _rand((b, s, h, d), device, dtype, gen)
        k = _rand((b, s, hkv, d), device, dtype, gen)
        v = _rand((b, s, hkv, d), device, dtype, gen)
        return AttentionCoreOp(causal=causal), (q, k, v), ()

    def torch_fn(q, k, v):
        # SDPA wants [B, H, S, D]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal, enable_gqa=hkv != h).transpose(1, 2)

    fwd = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return OpCase("attention", f"{label} B{b} S{s} H{h}/{hkv} D{d}{' causal' if causal else ''}", build,
                  torch_fn, {"fwd": fwd, "dx": 2.5 * fwd}, "TFLOP/s")


def _flash(q: torch.Tensor):
    """SDPA restricted to flash attention for 16-bit CUDA tensors; any backend otherwise."""
    if q.device.type != "cuda" or q.dtype == torch.float32:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _conv_case(label: str, n: int, c: int, hw: int, o: int, k: int, stride: int) -> OpCase:
    pad = k // 2

    def build(device, dtype, gen):
        from ..ops.conv import Conv2dOp

        x = _rand((n, c, hw, hw), device, dtype, gen)
        w = _rand((o, c, k, k), device, dtype, gen) / math.sqrt(c * k * k)
        return Conv2dOp(stride=(stride, stride), padding=(pad, pad), dilation=(1, 1)), (x,), (w, None)

    oh = (hw + 2 * pad - k) // stride + 1
    flops = 2.0 * n * oh * oh * o * c * k * k
    return OpCase("conv2d", f"{label} N{n} {c}x{hw}x{hw} -> {o} k{k} s{stride}", build,
                  lambda x, w, b: F.conv2d(x, w, b, stride, pad),
                  {"fwd": flops, "dx": flops, "dw": flops}, "TFLOP/s")


def _embedding_case(label: str, tokens: int, vocab: int, dim: int) -> OpCase:
    """Lookup of ``tokens`` ids (repeats and the padding row included) in a [vocab, dim] table;
    no input gradient, the whole dW (a scatter-add of dy rows) is p2."""

    def build(device, dtype, gen):
        from ..ops.embedding import EmbeddingOp

        ids = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
        return EmbeddingOp(padding_idx=1), (ids,), (_rand((vocab, dim), device, dtype, gen),)

    return OpCase("embedding", f"{label} {tokens} ids in {vocab}x{dim}", build,
                  lambda ids, w: F.embedding(ids, w, 1), {"fwd": 2.0 * tokens * dim, "dw": 2.0 * tokens * dim},
                  "GB/s")


def _causal_conv1d_case(label: str, b: int, length: int, channels: int, k: int) -> OpCase:
    """Mamba's depthwise causal conv1d, channels-last [b, L, C], weight [C, 1, k], bias [C]."""

    def build(device, dtype, gen):
        from ..ops.causal_conv1d import CausalConv1dOp

        x = _rand((b, length, channels), device, dtype, gen)
        return CausalConv1dOp(), (x,), (0.5 * _rand((channels, 1, k), device, dtype, gen),
                                        _rand((channels,), device, dtype, gen))

    def torch_fn(x, w, bias):
        return F.conv1d(x.transpose(1, 2), w, bias, padding=k - 1, groups=channels)[..., :length].transpose(1, 2)

    flops = 2.0 * b * length * channels * k
    return OpCase("causal_conv1d", f"{label} B{b} L{length} C{channels} k{k}", build, torch_fn,
                  {"fwd": flops, "dx": flops, "dw": flops}, "TFLOP/s")


def _scan_case(label: str, b: int, length: int, e: int, n: int, chunk: int) -> OpCase:
    """The selective scan (Mamba S6): inputs u, Δ [b, L, E], B, C [b, L, N]; parameters A_log
    [E, N], D [E]; states saved every ``chunk`` steps. Work: about 9 FLOPs per (t, e, n) forward."""

    def build(device, dtype, gen):
        from ..ops.scan import SelectiveScanOp

        u = _rand((b, length, e), device, dtype, gen)
        delta = F.softplus(_rand((b, length, e), device, torch.float32, gen) - 1).to(dtype)
        B, C = _rand((b, length, n), device, dtype, gen), _rand((b, length, n), device, dtype, gen)
        a_log = torch.log(torch.rand((e, n), generator=gen) * 3.5 + 0.5).to(device, dtype)
        return SelectiveScanOp(chunk=chunk), (u, delta, B, C), (a_log, _rand((e,), device, dtype, gen))

    def torch_fn(u, delta, B, C, a_log, D):
        A = -torch.exp(a_log)
        h = u.new_zeros(u.shape[0], e, n)
        ys = []
        for t in range(length):
            h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
        return torch.stack(ys, 1)

    flops = 9.0 * b * length * e * n
    return OpCase("selective_scan", f"{label} B{b} L{length} E{e} N{n} chunk{chunk}", build, torch_fn,
                  {"fwd": flops, "dx": 2 * flops, "dw": 2 * flops}, "TFLOP/s")


def default_cases(tokens: int, images: int) -> list[OpCase]:
    """The paper's model shapes (LLaMa-7B and BERT-Large layers, ResNet-152 convolutions) and
    the CPU pipeline benchmarks' llama/small layer (2 sequences of 256 tokens per micro-batch)."""
    seq7b, seqbert = min(1024, tokens), min(512, tokens)
    return [
        _linear_case("llama-small gate/up", 512, 512, 1376),
        _linear_case("llama-small down", 512, 1376, 512),
        _rms_norm_case("llama-small", 512, 512),
        _attention_case("llama-small", 2, 256, 8, 4, 64, True),
        _linear_case("llama7b up", tokens, 4096, 11008),
        _linear_case("llama7b down", tokens, 11008, 4096),
        _linear_case("bert-large ffn1", tokens, 1024, 4096),
        _linear_case("bert-large ffn2", tokens, 4096, 1024),
        _rms_norm_case("llama7b", tokens, 4096),
        _layer_norm_case("bert-large", tokens, 1024),
        _attention_case("llama7b", max(1, tokens // seq7b), seq7b, 32, 32, 128, True),
        _attention_case("bert-large", max(1, tokens // seqbert), seqbert, 16, 16, 64, False),
        _conv_case("resnet152 conv2 3x3", images, 64, 56, 64, 3, 1),
        _conv_case("resnet152 conv4 1x1", images, 1024, 14, 256, 1, 1),
        _conv_case("resnet152 conv4 3x3", images, 256, 14, 256, 3, 1),
    ]


# ---- timing one case -------------------------------------------------------------------
def _bench_case(case: OpCase, device: torch.device, dtype: torch.dtype, micro: int, reps: int) -> list[BenchRow]:
    gen = torch.Generator().manual_seed(0)
    op, inputs, params = case.build(device, dtype, gen)
    # ops save for p2 only what a trainable parameter needs; the ops themselves run under no_grad
    params = tuple(p.requires_grad_() if p is not None else None for p in params)
    backend = resolve_backend(device)
    with torch.no_grad():
        return _bench_phases(case, op, inputs, params, device, dtype, micro, reps, backend)


def _rate(case: OpCase, phase: str, ms: float, dtype: torch.dtype) -> float | None:
    """Work per second in the case's unit (norm work is counted in elements, so x bytes/element)."""
    work = case.work.get(phase)
    if not work:
        return None
    if case.unit == "GB/s":
        return work * (torch.finfo(dtype).bits / 8) / (ms * 1e-3) / 1e9
    return work / (ms * 1e-3) / 1e12


def _bench_phases(case, op, inputs, params, device, dtype, micro, reps, backend) -> list[BenchRow]:
    y, p1, p2_fused = op.forward(inputs, params, save_p1=True, save_p2=True)
    # p2's own saved set, as a deferred p2 reads it (an op may fold its p2 into p1 when both are
    # saved together, e.g. LayerNorm on the torch backend; its p2 set is then empty)
    p2 = op.forward(inputs, params, save_p1=False, save_p2=True)[2]
    dy = torch.randn_like(y)
    needs = tuple(True for _ in inputs)
    grads = [torch.zeros_like(p, dtype=torch.float32) if p is not None else None for p in params]
    has_dw = any(g is not None for g in grads)

    t_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    t_params = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    with torch.enable_grad():
        t_y = case.torch_fn(*t_inputs, *t_params)
    t_p = [p for p in t_params if p is not None]

    def t_grad(wrt):
        def run():
            with torch.enable_grad():
                return torch.autograd.grad(t_y, wrt, dy, retain_graph=True)
        return run

    def time(fn):
        return median_seconds(fn, device=device, reps=reps) * 1e3

    phases: list[tuple[str, Callable, Callable | None, float | None]] = [
        ("fwd", lambda: op.forward(inputs, params, save_p1=False, save_p2=False),
         lambda: case.torch_fn(*inputs, *params), case.work.get("fwd")),
        ("dx (p1)", lambda: op.input_grads(dy, p1, params, needs), t_grad(t_inputs), case.work.get("dx")),
    ]
    if has_dw:
        phases.append(("dw (p2)", lambda: op.param_grads([dy], [p2], grads), t_grad(t_p), case.work.get("dw")))
        phases.append(("dx+dw", lambda: (op.input_grads(dy, p1, params, needs), op.param_grads([dy], [p2], grads)),
                       t_grad(t_inputs + t_p), None))
        p_needs = tuple(p is not None for p in params)
        phases.append(("fused (normal mode)", lambda: op.fused_grads(dy, p1, p2_fused, params, needs, p_needs),
                       t_grad(t_inputs + t_p), None))
    rows = []
    for phase, ours, theirs, work in phases:
        ms = time(ours)
        tms = time(theirs) if theirs is not None else None
        rate = _rate(case, phase.split()[0], ms, dtype)
        rows.append(BenchRow(case.op_name, case.shape, phase, ms, tms, rate, case.unit, backend))

    micro = min(micro, inputs[0].shape[0])
    if has_dw and micro > 1:
        # batched p2: m micro-batches of rows/m each, one call vs m calls (same total work)
        splits = [torch.tensor_split(t, micro, dim=0) for t in (*inputs, dy)]
        saved = []
        for i in range(micro):
            _, _, p2_i = op.forward(tuple(s[i] for s in splits[:-1]), params, save_p1=False, save_p2=True)
            saved.append(p2_i)
        dys = [s for s in splits[-1]]
        one = time(lambda: op.param_grads(dys, saved, grads))
        many = time(lambda: [op.param_grads([d], [s], grads) for d, s in zip(dys, saved)])
        rate = _rate(case, "dw", one, dtype)
        rows.append(BenchRow(case.op_name, case.shape, f"dw batched x{micro} (vs {micro} calls)",
                             one, many, rate, case.unit, backend))
    return rows


def run_kernel_bench(*, device: torch.device, dtype: torch.dtype, tokens: int = 0, images: int = 0, micro: int = 4,
                     reps: int = 5, ops: Sequence[str] | None = None, progress: Callable[[str], None] = print,
                     cases: Sequence[OpCase] | None = None, deadline: float | None = None) -> list[BenchRow]:
    """Time every case (``cases``, else the default ones, or those of ``ops``); ``progress``
    gets one line per case. Past ``deadline`` (time.monotonic()) the remaining cases are skipped."""
    import time

    rows: list[BenchRow] = []
    if cases is None:
        cases = [c for c in default_cases(tokens, images) if ops is None or c.op_name in ops]
    for i, case in enumerate(cases, 1):
        if deadline is not None and time.monotonic() > deadline:
            progress(f"[{i}/{len(cases)}] {case.op_name} {case.shape}: skipped, out of time")
            continue
        progress(f"[{i}/{len(cases)}] {case.op_name} {case.shape}")
        try:
            rows.extend(_bench_case(case, device, dtype, micro, reps))
        except (ImportError, NotImplementedError) as e:
            progress(f"    skipped: {e}")
    return rows


# ---- output ----------------------------------------------------------------------------
def format_table(rows: Sequence[BenchRow]) -> str:
    """Markdown table: ms, rate and the speed ratio to torch (above 1: ours faster)."""
    out = ["| op | shape | phase | ours ms | torch ms | ours/torch speed | ours rate |",
           "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        tms = f"{r.torch_ms:.3f}" if r.torch_ms is not None else "-"
        sp = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        rate = f"{r.rate:.2f} {r.unit}" if r.rate is not None else "-"
        out.append(f"| {r.op} | {r.shape} | {r.phase} | {r.ours_ms:.3f} | {tms} | {sp} | {rate} |")
    return "\n".join(out)


def write_results(rows: Sequence[BenchRow], out_dir: Path, header: str, stem: str = "kernels") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, cs = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md.write_text(header + "\n\n" + format_table(rows) + "\n")
    with cs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "shape", "phase", "backend", "ours_ms", "torch_ms", "speedup_vs_torch", "rate", "unit"])
        for r in rows:
            w.writerow([r.op, r.shape, r.phase, r.backend, f"{r.ours_ms:.4f}",
                        "" if r.torch_ms is None else f"{r.torch_ms:.4f}",
                        "" if r.speedup is None else f"{r.speedup:.3f}",
                        "" if r.rate is None else f"{r.rate:.3f}", r.unit])
    return md, cs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (Triton kernels) or cpu (torch reference backend); default: cuda if present")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="activation dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--tokens", type=int, default=None,
                   help="rows per linear/norm call (default: 8192 on cuda, 256 on cpu)")
    p.add_argument("--images", type=int, default=None, help="batch of the conv cases (default: 32 cuda, 2 cpu)")
    p.add_argument("--microbatches", type=int, default=4, help="m for the batched-dW comparison")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure on CPU (median)")
    p.add_argument("--ops", nargs="*", default=None,
                   choices=["linear", "layernorm", "rmsnorm", "attention", "conv2d"], help="subset of ops")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for kernels.md / kernels.csv (default: bench/results/<machine>-<date>/)")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("twobp bench kernels: --device cuda but no CUDA device is visible; use --device cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tokens = args.tokens or (8192 if device.type == "cuda" else 256)
    images = args.images or (32 if device.type == "cuda" else 2)
    machine = machine_name(device)
    backend = resolve_backend(device)
    note = ("" if backend == "triton" else
            "\n\nCPU run: 'ours' is the torch reference backend of the split contract, not the Triton "
            "kernels; figures time the split bookkeeping against fused autograd, with token counts cut down. "
            "Outside a split region the twins of linear, LayerNorm, RMSNorm, conv2d and embedding run torch's own op "
            "on this backend; their 'fused' row times the contract's fused backward, which runs there only "
            "under saved-tensor hooks (checkpointing).")
    header = (f"# twobp kernel benchmark\n\nmachine: {machine}; backend: {backend}; dtype: {dtype}; "
              f"tokens: {tokens}; images: {images}; torch {torch.__version__}; "
              f"date: {_dt.date.today().isoformat()}\n\ncommand: `twobp bench kernels "
              f"--device {device.type} --tokens {tokens} --images {images}`{note}")
    print(header.replace("# ", "", 1))
    rows = run_kernel_bench(device=device, dtype=dtype, tokens=tokens, images=images,
                            micro=args.microbatches, reps=args.reps, ops=args.ops)
    print(format_table(rows))
    slug = "".join(ch if ch.isalnum() else "-" for ch in machine.split("(")[0].strip().lower()).strip("-")
    out = args.out or Path("bench/results") / f"{slug[:40]}-{_dt.date.today().isoformat()}"
    md, cs = write_results(rows, out, header)
    print(f"wrote {md} and {cs}")
    return 0
