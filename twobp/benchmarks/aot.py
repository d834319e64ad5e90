"""Ahead-of-time compiles of the Triton kernels for GPUs this machine does not have.

Triton compiles a ``@triton.jit`` function for an explicit target without any device:
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``.
The signature, constexprs and attrs (which integers are 1, which pointers and integers are
16-aligned) come from Triton's own launch binder applied to the launcher's arguments, so the
compile is the specialisation a real launch at that shape would build. ptxas's verbose log
gives registers and spill bytes; the kernel's metadata gives the shared memory it asks for;
the PTX shows which instructions it uses:

* ``wgmma.mma_async``: Hopper's warpgroup tensor-core MMA (sm_90);
* ``mma.sync``: the Ampere-style MMA (the only one on sm_80; on sm_90, a slower path);
* ``cp.async.bulk.tensor``: TMA, the Hopper tensor-memory copy engine;
* ``cp.async.ca/cg``: Ampere's asynchronous copies, what software pipelining uses.

A result is *clean* when the compile succeeds, spills nothing (bf16/fp16; fp32 reported),
and its shared memory fits the target's per-block limit (227 KB on sm_90, 163 KB on sm_80).

Results are cached as JSON under ``TWOBP_AOT_CACHE`` (default ``~/.cache/twobp/aot``), keyed
by Triton's own cache key, which covers the kernel source and every function it calls, the
specialisation, the options, the target and the ptxas version; ``TWOBP_AOT_CACHE=off``
disables the cache. The jobs (which kernels, shapes and configs) are in :mod:`.aot_cases`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Target", "TARGETS", "Ptr", "Job", "Result", "compile_job", "run_jobs"]


@dataclass(frozen=True)
class Target:
    """A GPU architecture to compile for."""

    name: str  # "sm_90"
    capability: int  # 90: major * 10 + minor
    shared_limit: int  # bytes of shared memory one block may opt into
    card: str  # the card this stands for


TARGETS = {
    "sm_90": Target("sm_90", 90, 227 * 1024, "H100 / H200"),
    "sm_80": Target("sm_80", 80, 163 * 1024, "A100"),
}


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: a tensor of this dtype whose address is 16-byte aligned."""

    dtype: str  # torch dtype name: "bfloat16", "float32", "int64"


@dataclass(frozen=True)
class Job:
    """One compile: a kernel at one shape, dtype, config and target."""

    family: str  # linear, norm, attention, conv
    kernel: str  # short kernel label, e.g. "fwd", "dw table fp32-grad"
    case: str  # the model shape it stands for, e.g. "llama-7b up 8192x4096->11008"
    dtype: str  # input dtype: bf16, fp16, fp32
    target: str  # key of TARGETS
    module: str  # module holding the kernel, e.g. "twobp.kernels.linear"
    attr: str  # attribute: a JITFunction or an Autotuner wrapping one
    args: tuple  # (name, value) launch arguments; Ptr for tensors
    config: tuple  # (name, value) meta-parameters, num_warps and num_stages included
    kept: bool  # the launcher's pruning keeps this config for this target and dtype
    tensor_core: bool  # the kernel's dots should use tensor cores on this dtype
    in_class: bool = True  # the config is in the launch class's list (kept unless pruned by size)

    @property
    def config_label(self) -> str:
        meta = dict(self.config)
        blocks = "x".join(str(v) for k, v in self.config if k.startswith("BLOCK"))
        rest = [f"{k}={v}" for k, v in self.config if not k.startswith("BLOCK") and k not in ("num_warps", "num_stages")]
        return " ".join(filter(None, [blocks, f"w{meta.get('num_warps', 4)}", f"s{meta.get('num_stages', 3)}", *rest]))


@dataclass
class Result:
    """What one compile produced."""

    job: Job
    ok: bool = False  # compiled
    error: str = ""
    registers: int = 0  # per thread
    spill_stores: int = 0  # bytes
    spill_loads: int = 0  # bytes
    stack: int = 0  # bytes of stack frame (local memory), spills included
    shared: int = 0  # bytes of shared memory per block
    wgmma: bool = False
    mma_sync: bool = False
    tma: bool = False
    cp_async: bool = False
    seconds: float = 0.0
    cached: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def fits(self) -> bool:
        return self.shared <= TARGETS[self.job.target].shared_limit

    @property
    def clean(self) -> bool:
        """Compiles, fits, spills nothing, and uses wgmma where sm_90 tensor cores are expected."""
        wgmma_ok = not (self.job.tensor_core and self.job.target == "sm_90") or self.wgmma
        return self.ok and self.fits and self.spills == 0 and self.stack == 0 and wgmma_ok

    def problems(self) -> list[str]:
        """Why this result is not clean (empty when it is)."""
        if not self.ok:
            return [f"compile error: {self.error.splitlines()[0] if self.error else '?'}"]
        out = []
        if not self.fits:
            out.append(f"shared {self.shared} B > {TARGETS[self.job.target].shared_limit} B")
        if self.spills:
            out.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded")
        elif self.stack:
            out.append(f"stack frame {self.stack} B")
        if self.job.tensor_core and self.job.target == "sm_90" and not self.wgmma:
            out.append("no wgmma" + (" (mma.sync)" if self.mma_sync else ""))
        return out


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}


def _materialise(args: tuple) -> dict:
    """Launch arguments with every Ptr replaced by a small CPU tensor of its dtype (only the
    dtype and the 16-byte alignment of the address matter to the binder)."""
    import torch

    out = {}
    for name, value in args:
        if isinstance(value, Ptr):
            value = torch.empty(64, dtype=getattr(torch, value.dtype))
            if value.data_ptr() % 16:
                raise RuntimeError("a CPU allocation was not 16-byte aligned")
        out[name] = value
    return out


def _jit_function(job: Job):
    obj = getattr(importlib.import_module(job.module), job.attr)
    while hasattr(obj, "fn") and not hasattr(obj, "params"):  # Autotuner / Heuristics -> JITFunction
        obj = obj.fn
    if not hasattr(obj, "params"):
        raise TypeError(f"{job.module}.{job.attr} is not a JIT function ({type(obj).__name__}); "
                        "AOT compiles need TRITON_INTERPRET unset when triton is imported")
    return obj


def _source(job: Job):
    """(ASTSource, backend, options, GPUTarget) exactly as JITFunction.run would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(job)
    target = GPUTarget("cuda", TARGETS[job.target].capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**_materialise(job.args), **dict(job.config)}
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), backend, options, target


def _cache_dir() -> Path | None:
    where = os.environ.get("TWOBP_AOT_CACHE", "")
    if where.lower() in ("off", "0", "none"):
        return None
    return Path(where) if where else Path.home() / ".cache" / "twobp" / "aot"


def compile_job(job: Job) -> Result:
    """Compile one job (in this process) and read its resource use; never raises."""
    from triton import knobs
    from triton.compiler import compile as triton_compile
    from triton.compiler import get_cache_key

    res = Result(job)
    t0 = time.perf_counter()
    try:
        src, backend, options, target = _source(job)
        key = hashlib.sha256(get_cache_key(src, backend, options, env_vars={}).encode()).hexdigest()
    except Exception as e:  # noqa: BLE001  (a bad job is a result, not a crash)
        res.error = f"{type(e).__name__}: {e}"
        res.seconds = time.perf_counter() - t0
        return res
    cache = _cache_dir()
    hit = cache / f"{key}.json" if cache is not None else None
    if hit is not None and hit.exists():
        data = json.loads(hit.read_text())
        for name, value in data.items():
            setattr(res, name, value)
        res.cached = True
        res.seconds = time.perf_counter() - t0
        return res

    log = io.StringIO()
    try:
        with tempfile.TemporaryDirectory(prefix="twobp-aot-") as tmp, contextlib.redirect_stdout(log):
            knobs.cache.dir = tmp  # Triton's own artifact cache: throwaway, we keep the numbers
            knobs.nvidia.dump_ptxas_log = True  # printed by the cubin stage, captured above
            kernel = triton_compile(src, target=target, options=options.__dict__)
            ptx = kernel.asm["ptx"]
            res.shared = int(kernel.metadata.shared)
        res.ok = True
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {str(e)[:2000]}"
    finally:
        knobs.nvidia.dump_ptxas_log = False
    text = log.getvalue()
    if res.ok:
        for name, rx in _PTXAS_RE.items():
            values = [int(v) for v in rx.findall(text)]
            if name == "static_shared":
                res.shared += max(values, default=0)
            else:
                setattr(res, name, max(values, default=0))
        if not _PTXAS_RE["registers"].search(text):
            res.ok, res.error = False, "no ptxas log captured (registers unknown)"
        res.wgmma = "wgmma.mma_async" in ptx
        res.mma_sync = "mma.sync" in ptx
        res.tma = "cp.async.bulk.tensor" in ptx
        res.cp_async = bool(re.search(r"cp\.async\.c[ag]", ptx))
    res.seconds = time.perf_counter() - t0
    if hit is not None and res.ok:
        hit.parent.mkdir(parents=True, exist_ok=True)
        data = {f.name: getattr(res, f.name) for f in dataclasses.fields(res) if f.name not in ("job", "seconds", "cached")}
        tmp = hit.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(hit)
    return res


def run_jobs(jobs: list[Job], workers: int | None = None, progress=None) -> list[Result]:
    """Compile every job, ``workers`` at a time (processes; default: the CPU count), in job order."""
    workers = max(1, workers or os.cpu_count() or 1)
    results: list[Result] = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            results.append(compile_job(job))
            if progress:
                progress(results[-1], len(results), len(jobs))
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for res in pool.map(compile_job, jobs, chunksize=1):
            results.append(res)
            if progress:
                progress(res, len(results), len(jobs))
    return results
