"""The compile jobs of the AOT sweep: every kernel at the model shapes, per dtype and target.

Shapes are the paper's models: LLaMa-7B (8192 tokens, hidden 4096, FFN 11008, 32 heads of
128, causal; plus a GQA variant with 8 kv heads), BERT-Large (4096 tokens, hidden 1024, FFN
4096, 16 heads of 64, biases, LayerNorm) and ResNet-152 (32 images at 224x224; its stem, 3x3
convs at 56, 14 and 7 pixels, a strided 3x3, 1x1 convs, a strided 1x1 downsample).

Each job builds the argument list the launcher passes (tensors stand in as :class:`Ptr`:
only their dtype and alignment reach the compiler), so Triton's binder specialises it like
the real launch. The configs are every candidate of the kernel's autotuner; ``kept`` says
whether the kernel's own early prune keeps it for that target, dtype and shape, which is
what the autotuner would time. fp32 jobs use the precision a default launch uses: "ieee"
for linear and attention (torch.backends.cuda.matmul.allow_tf32 is off by default), "tf32"
for conv (torch.backends.cudnn.allow_tf32 is on by default).

Import this only where TRITON_INTERPRET is unset: the kernels must be JIT functions.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator

import torch

from .aot import TARGETS, Job, Ptr

__all__ = ["all_jobs", "ci_jobs", "DTYPES", "FAMILIES"]

DTYPES = ("bf16", "fp16", "fp32")
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_H100_SMS = 132  # SM count used for the launchers' SM-dependent choices (H100 SXM / H200)


def _strides(*shape: int) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _config_items(c) -> tuple:
    return tuple(c.kwargs.items()) + (("num_warps", c.num_warps), ("num_stages", c.num_stages))


def _autotuned(family: str, kernel: str, case: str, dtype: str, module: str, attr: str, prune_attr: str | None,
               args: dict, tensor_core: bool, targets: tuple[str, ...] = tuple(TARGETS)) -> Iterator[Job]:
    """One job per candidate config of the autotuner ``module.attr`` and per target; kept
    configs are those ``module.prune_attr`` keeps for that target. ``tensor_core``: the
    kernel's dots should use tensor cores (never for fp32 with exact "ieee" products)."""
    from .aot import _materialise

    mod = importlib.import_module(module)
    tuner = getattr(mod, attr)
    if dtype == "fp32" and args.get("INPUT_PRECISION", args.get("DOT_PRECISION")) == "ieee":
        tensor_core = False
    named = _materialise(tuple(args.items()))
    prune = getattr(mod, prune_attr) if prune_attr is not None else None
    # the configs of this dtype's classes on any target: on one target, the others' configs
    # show (not kept) why a list differs between targets
    relevant = None
    if prune is not None:
        relevant = {_config_items(c) for t in targets for c in prune.for_class(list(tuner.configs), named, _arch=t)}
    for target in targets:
        kept_keys = class_keys = None
        if prune is not None:
            kept_keys = {_config_items(c) for c in prune(list(tuner.configs), named, _arch=target)}
            class_keys = {_config_items(c) for c in prune.for_class(list(tuner.configs), named, _arch=target)}
        for c in tuner.configs:
            items = _config_items(c)
            if relevant is not None and items not in relevant:
                continue
            yield Job(family, kernel, case, dtype, target, module, attr, tuple(args.items()), items,
                      kept_keys is None or items in kept_keys, tensor_core,
                      class_keys is None or items in class_keys)


def _fixed(family: str, kernel: str, case: str, dtype: str, module: str, attr: str, args: dict,
           meta: dict, num_warps: int = 4, num_stages: int = 3) -> Iterator[Job]:
    """Jobs of a kernel launched with fixed meta-parameters (not autotuned)."""
    items = tuple(meta.items()) + (("num_warps", num_warps), ("num_stages", num_stages))
    for target in TARGETS:
        yield Job(family, kernel, case, dtype, target, module, attr, tuple(args.items()), items, True, False, True)


# ---- linear -----------------------------------------------------------------------------
_LINEAR = [("llama-7b up", 8192, 4096, 11008, False), ("bert-large ffn1", 4096, 1024, 4096, True)]


def _precision(dtype: str, conv: bool = False) -> str:
    return "tf32" if (dtype == "fp32" and conv) else "ieee"


def _linear_jobs(dtype: str) -> Iterator[Job]:
    mod = "twobp.kernels.linear"
    p = Ptr(str(_TORCH[dtype]).split(".")[1])
    f32 = Ptr("float32")
    for label, m, k, n, bias in _LINEAR:
        case = f"{label} {m}x{k}->{n}"
        fwd = dict(a_ptr=p, b_ptr=p, c_ptr=p, bias_ptr=p, M=m, N=n, K=k, stride_am=k, stride_ak=1,
                   stride_bk=1, stride_bn=k, stride_cm=n, stride_cn=1, stride_bias=1 if bias else 0,
                   HAS_BIAS=bias, INPUT_PRECISION=_precision(dtype))
        yield from _autotuned("linear", "fwd", case, dtype, mod, "_fwd_matmul", "_prune_fwd", fwd, True)
        dx = dict(a_ptr=p, b_ptr=p, c_ptr=p, bias_ptr=p, M=m, N=k, K=n, stride_am=n, stride_ak=1,
                  stride_bk=k, stride_bn=1, stride_cm=k, stride_cn=1, stride_bias=0,
                  HAS_BIAS=False, INPUT_PRECISION=_precision(dtype))
        yield from _autotuned("linear", "dx", case, dtype, mod, "_dx_matmul", "_prune_dx", dx, True)
        grads = [("input-grad", p)] + ([("fp32-grad", f32)] if dtype != "fp32" else [])
        for grad_label, g in grads:
            for table in (False, True):
                if table and bias:
                    continue  # the table variant once per dtype is enough (same code with bias)
                dw = dict(x_ptr=p, dy_ptr=p, dw_ptr=g, db_ptr=g, mb_table_ptr=Ptr("int64") if table else g,
                          num_mb=4 if table else 1, M=m, N=n, K=k, stride_xm=k, stride_dym=n,
                          stride_dwn=k, stride_dwk=1, stride_db=1 if bias else 0, HAS_BIAS=bias,
                          FROM_TABLE=table, TABLE_ALIGNED=table, INPUT_PRECISION=_precision(dtype))
                name = f"dw{' table' if table else ''} {grad_label}"
                yield from _autotuned("linear", name, case, dtype, mod, "_dw_tuned", "_prune_dw", dw, True)


def _linear_tma_jobs(dtype: str) -> Iterator[Job]:
    """The Hopper kernels of kernels/linear_tma.py, for sm_90 only (the launchers pick them on
    sm_90 for 16-bit inputs; fp32 only on request)."""
    mod = "twobp.kernels.linear_tma"
    p, f32 = Ptr(str(_TORCH[dtype]).split(".")[1]), Ptr("float32")
    for label, m, k, n, bias in _LINEAR:
        case = f"{label} {m}x{k}->{n}"
        fwd = dict(a_ptr=p, b_ptr=p, c_ptr=p, bias_ptr=p, M=m, N=n, K=k, stride_am=k, stride_b=k, stride_cm=n,
                   stride_bias=1 if bias else 0, HAS_BIAS=bias, INPUT_PRECISION=_precision(dtype), B_KN=False)
        yield from _autotuned("linear_tma", "fwd", case, dtype, mod, "_tma_matmul_tuned", "_prune_mm", fwd, True,
                              ("sm_90",))
        dx = dict(a_ptr=p, b_ptr=p, c_ptr=p, bias_ptr=p, M=m, N=k, K=n, stride_am=n, stride_b=k, stride_cm=k,
                  stride_bias=0, HAS_BIAS=False, INPUT_PRECISION=_precision(dtype), B_KN=True)
        yield from _autotuned("linear_tma", "dx", case, dtype, mod, "_tma_matmul_tuned", "_prune_mm", dx, True,
                              ("sm_90",))
        grads = [("input-grad", p)] + ([("fp32-grad", f32)] if dtype != "fp32" else [])
        for grad_label, g in grads:
            for table in (False, True):
                if table and bias:
                    continue
                dw = dict(x_ptr=p, dy_ptr=p, dw_ptr=g, db_ptr=g, mb_table_ptr=Ptr("int64") if table else g,
                          num_mb=4 if table else 1, M=m, N=n, K=k, stride_xm=k, stride_dym=n,
                          stride_dwn=k, stride_dwk=1, stride_db=1 if bias else 0, HAS_BIAS=bias,
                          FROM_TABLE=table, INPUT_PRECISION=_precision(dtype))
                name = f"dw{' table' if table else ''} {grad_label}"
                yield from _autotuned("linear_tma", name, case, dtype, mod, "_tma_dw_tuned", "_prune_dw", dw, True,
                                      ("sm_90",))


# ---- norms ------------------------------------------------------------------------------
_NORMS = [("llama-7b rmsnorm", 8192, 4096, True), ("bert-large layernorm", 4096, 1024, False)]


def _norm_jobs(dtype: str) -> Iterator[Job]:
    mod = "twobp.kernels.norm"
    norm = importlib.import_module(mod)
    p, f32 = Ptr(str(_TORCH[dtype]).split(".")[1]), Ptr("float32")
    for label, m, n, rms in _NORMS:
        case = f"{label} {m}x{n}"
        bm, bn = norm._row_blocks(n)
        fwd = dict(x_ptr=p, y_ptr=p, w_ptr=p, b_ptr=p, mean_ptr=f32, rstd_ptr=f32, stride_xm=n, stride_ym=n,
                   M=m, N=n, eps=1e-5, IS_RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, BLOCK_M=bm, BLOCK_N=bn)
        yield from _row_jobs(case, dtype, mod, "fwd", "_fwd_tuned", fwd)
        dx = dict(dy_ptr=p, x_ptr=p, w_ptr=p, mean_ptr=f32, rstd_ptr=f32, dx_ptr=p, stride_dym=n, stride_xm=n,
                  stride_dxm=n, M=m, N=n, IS_RMS=rms, HAS_WEIGHT=True, BLOCK_M=bm, BLOCK_N=bn)
        yield from _row_jobs(case, dtype, mod, "dx", "_dx_tuned", dx)
        for table in (False, True):
            part = dict(x_ptr=p, dy_ptr=p, mean_ptr=f32, rstd_ptr=f32, mb_table_ptr=Ptr("int64") if table else f32,
                        part_w_ptr=f32, part_b_ptr=f32, num_mb=4 if table else 1, M=m, N=n, stride_xm=n,
                        stride_dym=n, IS_RMS=rms, HAS_DW=True, HAS_DB=not rms, FROM_TABLE=table,
                        TABLE_ALIGNED=table)
            yield from _fixed("norm", f"dw partial{' table' if table else ''}", case, dtype, mod,
                              "_norm_dw_partial_kernel", part,
                              dict(BLOCK_M=norm._DW_BLOCK_M, BLOCK_N=norm._DW_BLOCK_N), num_warps=norm._DW_WARPS)
        red = dict(part_ptr=f32, grad_ptr=f32, P=1056, N=n)
        yield from _fixed("norm", "dw reduce", case, dtype, mod, "_norm_dw_reduce_kernel", red,
                          dict(BLOCK_P=norm._RED_BLOCK_P, BLOCK_N=norm._RED_BLOCK_N), num_warps=norm._RED_WARPS)


def _row_jobs(case: str, dtype: str, module: str, kernel: str, attr: str, args: dict) -> Iterator[Job]:
    from .aot import _materialise

    mod = importlib.import_module(module)
    tuner = getattr(mod, attr)
    kept = mod._prune_warps(list(tuner.configs), _materialise(tuple(args.items())))
    kept_keys = {_config_items(c) for c in kept}
    for target in TARGETS:
        for c in tuner.configs:
            items = _config_items(c)
            yield Job("norm", kernel, case, dtype, target, module, attr, tuple(args.items()), items,
                      items in kept_keys, False, items in kept_keys)


# ---- attention --------------------------------------------------------------------------
_ATTENTION = [  # label, batch, seq, heads, kv heads, head dim, causal
    ("llama-7b", 8, 1024, 32, 32, 128, True),
    ("llama-7b GQA 32/8", 8, 1024, 32, 8, 128, True),
    ("bert-large", 8, 512, 16, 16, 64, False),
]


def _attention_jobs(dtype: str) -> Iterator[Job]:
    mod = "twobp.kernels.attention"
    att = importlib.import_module(mod)
    p, f32 = Ptr(str(_TORCH[dtype]).split(".")[1]), Ptr("float32")
    prec = "ieee" if dtype == "fp32" else None
    for label, b, s, h, hkv, d, causal in _ATTENTION:
        case = f"{label} B{b} S{s} H{h}/{hkv} D{d}{' causal' if causal else ''}"
        row_qkv = (h + 2 * hkv) * d  # q, k, v are views of the packed QKV projection output
        q_str = (s * row_qkv, row_qkv, d)
        o_str = _strides(b, s, h, d)[:3]
        kv_str = (s * row_qkv, row_qkv, d)
        scale = 1.0 / math.sqrt(d)
        common = dict(seq_len=s, num_heads=h, group=h // hkv)
        const = dict(HEAD_DIM=d, HEAD_DIM_P=att._head_dim_p(d), CAUSAL=causal, DOT_PRECISION=prec)
        fwd = dict(q_ptr=p, k_ptr=p, v_ptr=p, o_ptr=p, lse_ptr=f32,
                   **_named_strides(("q", q_str), ("k", kv_str), ("v", kv_str), ("o", o_str)),
                   **common, qk_scale=scale / math.log(2), seq_bucket=1 << (s - 1).bit_length(), **const)
        yield from _autotuned("attention", "fwd", case, dtype, mod, "_attn_fwd_kernel", "_prune_fwd", fwd, True)
        pre = dict(o_ptr=p, do_ptr=p, delta_ptr=f32, **_named_strides(("o", o_str), ("do", o_str)),
                   seq_len=s, num_heads=h, HEAD_DIM=d, HEAD_DIM_P=att._head_dim_p(d))
        yield from _fixed("attention", "bwd preprocess", case, dtype, mod, "_attn_bwd_preprocess_kernel", pre,
                          dict(BLOCK_M=att._PRE_BLOCK_M))
        bwd = dict(q_ptr=p, k_ptr=p, v_ptr=p, do_ptr=p, lse_ptr=f32, delta_ptr=f32)
        dkdv = dict(**bwd, dk_ptr=p, dv_ptr=p,
                    **_named_strides(("q", q_str), ("k", kv_str), ("v", kv_str), ("do", o_str), ("dk", kv_str),
                                     ("dv", kv_str)),
                    **common, sm_scale=scale, qk_scale=scale / math.log(2), seq_bucket=1 << (s - 1).bit_length(),
                    **const)
        yield from _autotuned("attention", "bwd dkdv", case, dtype, mod, "_attn_bwd_dkdv_kernel", "_prune_dkdv",
                              dkdv, True)
        dq = dict(**bwd, dq_ptr=p,
                  **_named_strides(("q", q_str), ("k", kv_str), ("v", kv_str), ("do", o_str), ("dq", q_str)),
                  **common, sm_scale=scale, qk_scale=scale / math.log(2), seq_bucket=1 << (s - 1).bit_length(),
                  **const)
        yield from _autotuned("attention", "bwd dq", case, dtype, mod, "_attn_bwd_dq_kernel", "_prune_dq", dq, True)


def _named_strides(*named: tuple[str, tuple[int, int, int]]) -> dict:
    out = {}
    for name, (sb, ss, sh) in named:
        out.update({f"stride_{name}b": sb, f"stride_{name}s": ss, f"stride_{name}h": sh})
    return out


# ---- conv -------------------------------------------------------------------------------
_CONV = [  # label, batch, in channels, size, out channels, kernel, stride
    ("resnet-152 stem 7x7/2", 32, 3, 224, 64, 7, 2),
    ("resnet-152 conv2 3x3", 32, 64, 56, 64, 3, 1),
    ("resnet-152 conv3 3x3/2", 32, 128, 56, 128, 3, 2),
    ("resnet-152 conv4 3x3", 32, 256, 14, 256, 3, 1),
    ("resnet-152 conv4 1x1", 32, 1024, 14, 256, 1, 1),
    ("resnet-152 conv3 1x1/2 downsample", 32, 256, 56, 512, 1, 2),
]


def _conv_jobs(dtype: str) -> Iterator[Job]:
    mod = "twobp.kernels.conv"
    conv = importlib.import_module(mod)
    p, f32 = Ptr(str(_TORCH[dtype]).split(".")[1]), Ptr("float32")
    prec = _precision(dtype, conv=True)
    for label, n, c, hw, o, k, stride in _CONV:
        pad = k // 2
        oh = (hw + 2 * pad - k) // stride + 1
        case = f"{label} N{n} {c}x{hw}x{hw}->{o}"
        xs, ws, ys = _strides(n, c, hw, hw), _strides(o, c, k, k), _strides(n, o, oh, oh)
        geo = dict(KH=k, KW=k, STRIDE_H=stride, STRIDE_W=stride, PAD_H=pad, PAD_W=pad, DIL_H=1, DIL_W=1)
        fwd = dict(x_ptr=p, w_ptr=p, bias_ptr=p, y_ptr=p, M=n * oh * oh, N=o, K_CHANNELS=c, H=hw, W=hw, OH=oh, OW=oh,
                   **_nchw("x", xs), **_nchw("w", ws, "ochw"), stride_bias=0, **_nchw("y", ys), **geo,
                   HAS_BIAS=False, INPUT_PRECISION=prec)
        yield from _autotuned("conv", "fwd", case, dtype, mod, "_fwd_tuned", "_prune_fwd", fwd, True)
        dx = dict(dy_ptr=p, w_ptr=p, dx_ptr=p, M=n * hw * hw, N=c, K_CHANNELS=o, H=hw, W=hw, OH=oh, OW=oh,
                  **_nchw("dy", ys), **_nchw("w", ws, "ochw"), **_nchw("dx", xs), **geo, INPUT_PRECISION=prec)
        yield from _autotuned("conv", "dx", case, dtype, mod, "_dx_tuned", "_prune_dx", dx, True)
        if label.endswith("conv2 3x3"):
            # the same convs with the weight in channels-last memory (strides 9C, 1, 3C, C): the
            # weight tile's channels are then contiguous, so its loads vectorize and pipeline
            # through cp.async (with NCHW weights they are 2-byte gathers and do not)
            wcl = _nchw("w", (k * k * c, 1, k * c, c), "ochw")
            yield from _autotuned("conv", "fwd W channels-last", case, dtype, mod, "_fwd_tuned", "_prune_fwd",
                                  {**fwd, **wcl}, True)
            yield from _autotuned("conv", "dx W channels-last", case, dtype, mod, "_dx_tuned", "_prune_dx",
                                  {**dx, **wcl}, True)
        split = _pick_split(conv, o, c, k * k, n * oh * oh)
        flat = conv._dw_flat_layout(xs, ys, (hw, hw), (oh, oh), (k, k), (stride, stride), (pad, pad))
        for table in (False, True) if label.endswith("conv2 3x3") else (False,):
            out = p if split == 1 else f32
            ws_str = (0, *ws) if split == 1 else _strides(split, o, c, k, k)
            dw = dict(x_ptr=p, dy_ptr=p, dw_ptr=out, db_ptr=out, mb_table_ptr=Ptr("int64") if table else out,
                      num_mb=4 if table else 1, N_BATCH=n, O=o, C=c, H=hw, W=hw, OH=oh, OW=oh,
                      **_nchw("x", xs), **_nchw("dy", ys),
                      **dict(zip(("stride_dws", "stride_dwo", "stride_dwc", "stride_dwh", "stride_dww"), ws_str)),
                      stride_dbs=0 if split == 1 else o, stride_dbo=1,
                      KW=k, STRIDE_H=stride, STRIDE_W=stride, PAD_H=pad, PAD_W=pad, DIL_H=1, DIL_W=1, SPLIT=split,
                      HAS_BIAS=False, FROM_TABLE=table, ACCUMULATE=split == 1, DY_FLAT=flat[0], X_FLAT=flat[1], HW=oh * oh,
                      INPUT_PRECISION=prec)
            yield from _autotuned("conv", "dw table" if table else "dw", f"{case} split {split}", dtype, mod,
                                  "_dw_tuned", "_prune_dw", dw, True)
        if split > 1:
            red = dict(ws_w_ptr=f32, ws_b_ptr=f32, dw_ptr=p, db_ptr=p, O=o, C=c, KH=k, KW=k, SPLIT=split,
                       stride_dwo=ws[0], stride_dwc=ws[1], stride_dwh=ws[2], stride_dww=ws[3], stride_db=0,
                       HAS_BIAS=False)
            yield from _fixed("conv", "dw reduce", case, dtype, mod, "_conv_dw_reduce_kernel", red,
                              dict(BLOCK=conv._REDUCE_BLOCK))


def _nchw(name: str, strides: tuple[int, ...], axes: str = "nchw") -> dict:
    return {f"stride_{name}{a}": s for a, s in zip(axes, strides)}


def _pick_split(conv, o: int, c: int, taps: int, pixels: int) -> int:
    """conv2d_dw's automatic split, for an H100's SM count (the launcher asks the GPU)."""
    tiles = -(-o // 64) * -(-c // 64) * taps
    want = -(-2 * _H100_SMS // tiles)
    return max(1, min(want, 64, -(-pixels // 512)))


# ---- all --------------------------------------------------------------------------------
FAMILIES = {"linear": _linear_jobs, "linear_tma": _linear_tma_jobs, "norm": _norm_jobs, "attention": _attention_jobs, "conv": _conv_jobs}


def all_jobs(families: tuple[str, ...] = tuple(FAMILIES), dtypes: tuple[str, ...] = DTYPES) -> list[Job]:
    """Every kernel x model shape x candidate config x dtype x target, deduplicated (two jobs
    with the same arguments, config and target compile the same code), less the configs the
    kernel's prune drops for the shape's size (they never run there): the sweep shows the
    configs of every class, kept or not, at every shape where their tiles make sense."""
    seen: dict[tuple, Job] = {}
    for family in families:
        for dtype in dtypes:
            for job in FAMILIES[family](dtype):
                if job.in_class and not job.kept:
                    continue  # pruned by size at this shape
                key = (job.module, job.attr, job.args, job.config, job.target)
                if key not in seen:
                    seen[key] = job
    return list(seen.values())


def _risk(job: Job) -> tuple:
    """The job most likely to spill or overflow first: the widest head dim, then the largest
    tile times pipeline depth, then grouped-query attention, then the widest conv kernel."""
    meta, args = dict(job.config), dict(job.args)
    tile = math.prod(v for k, v in job.config if k.startswith("BLOCK"))
    return (args.get("HEAD_DIM_P", 0), tile * meta.get("num_stages", 1), args.get("group", 1) != 1,
            args.get("KH", 0), -meta.get("num_warps", 4))


def ci_jobs(jobs: list[Job] | None = None) -> list[Job]:
    """A representative subset for CI: per (kernel, target), the riskiest kept job over all
    shapes in one 16-bit dtype (bf16 and fp16 alternate between kernels) and in fp32; less
    the norms in fp32 (no dots: the same code as in 16 bits, wider loads) and the conv
    variants with channels-last weights (the same kernels, other strides), which only the
    full sweep compiles."""
    jobs = all_jobs() if jobs is None else jobs
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        if job.kernel.endswith("W channels-last") or (job.family == "norm" and job.dtype == "fp32"):
            continue
        if job.kept:
            half = job.dtype != "fp32"
            groups.setdefault((job.family, job.kernel, job.target, half), []).append(job)
    picked = []
    for i, (key, group) in enumerate(sorted(groups.items())):
        half = key[-1]
        if half:
            want = "bf16" if i % 2 == 0 else "fp16"
            group = [j for j in group if j.dtype == want] or group
        picked.append(max(group, key=_risk))
    return picked
