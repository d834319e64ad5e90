"""Compile the selective-scan, causal-conv1d and embedding-dW kernels for a GPU target without a GPU; print JSON.

Run with TRITON_INTERPRET=0 (test_scan_compile.py does): every kernel at the launch
configuration the launchers use on a GPU (d_state 16, Mamba's; ``N=64`` adds d_state 64),
per ``sm_XX:dtype`` target given (default sm_90 fp16/bf16, sm_80 bf16), through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``, with ptxas's verbose
log captured for registers, spill bytes and stack.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile

from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

import twobp.kernels.causal_conv1d as kc
import twobp.kernels.embedding as ke
import twobp.kernels.scan as ks

_RX = {k: re.compile(p) for k, p in (("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                                     ("spill_loads", r"(\d+) bytes spill loads"), ("stack", r"(\d+) bytes stack frame"))}
_T = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def _signature(fn, ptrs: dict[str, str], constexprs: dict) -> dict[str, str]:
    return {a: "constexpr" if a in constexprs else (f"*{ptrs[a]}" if a in ptrs else "i32") for a in fn.arg_names}


def _compile(fn, ptrs, constexprs, cap: int, warps: int) -> dict:
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(log):
        knobs.cache.dir = tmp
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton_compile(ASTSource(fn, _signature(fn, ptrs, constexprs), constexprs),
                                target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
    knobs.nvidia.dump_ptxas_log = False
    text = log.getvalue()
    out = {k: max((int(v) for v in rx.findall(text)), default=0) for k, rx in _RX.items()}
    out["shared"] = int(kernel.metadata.shared)
    return out


def jobs(cap: int, dt: str, states: tuple[int, ...] = (16,)):
    t = _T[dt]
    for n_state in states:
        be, bn = ks._blocks(n_state)
        base = dict(BLOCK_T=ks._BLOCK_T, BLOCK_E=be, BLOCK_N=bn, TILES_PER_CHUNK=256 // ks._BLOCK_T)
        ptrs = dict(u_ptr=t, d_ptr=t, B_ptr=t, C_ptr=t, A_log_ptr="fp32", D_ptr="fp32", y_ptr=t, H_ptr="fp32",
                    dy_ptr=t, scratch_ptr="fp32", du_ptr=t, dd_ptr=t, dBp_ptr="fp32", dCp_ptr="fp32",
                    dAp_ptr="fp32", dDp_ptr="fp32")
        yield f"scan_fwd N={n_state}", ks._scan_fwd_kernel, ptrs, base, ks._WARPS
        for i, p in ((True, False), (False, True), (True, True)):
            yield (f"scan_bwd{' p1' if i else ''}{' p2' if p else ''} N={n_state}", ks._scan_bwd_kernel, ptrs,
                   {**base, "INPUT_GRADS": i, "PARAM_GRADS": p}, ks._WARPS)
    cptrs = dict(x_ptr=t, w_ptr=t, bias_ptr=t, y_ptr=t, dy_ptr=t, dx_ptr=t, table_ptr="i64", dw_ptr="fp32",
                 db_ptr="fp32")
    tiles = dict(BLOCK_T=kc._BLOCK_T, BLOCK_C=kc._BLOCK_C)
    yield "conv_fwd", kc._fwd_kernel, cptrs, {**tiles, "K": 4, "HAS_BIAS": True}, kc._WARPS
    yield "conv_dx", kc._dx_kernel, cptrs, {**tiles, "K": 4}, kc._WARPS
    yield ("conv_dw", kc._dw_kernel, cptrs, {**tiles, "BLOCK_T": kc._DW_BLOCK_T, "K": 4, "BLOCK_K": 4, "HAS_BIAS": True},
           kc._WARPS)
    # the embedding's p2 (a sort-based scatter-add), at Llama-7B's width (D = 4096) as the launcher picks it
    eptrs = dict(sorted_ids_ptr="i64", run_end_ptr="i64", row_addr_ptr="i64", row_scale_ptr="fp32", dy_ptr=t,
                 dw_ptr="fp32" if dt == "fp32" else t)
    for scale in (False, True):
        yield (f"embedding_dw{' scaled' if scale else ''}", ke._embedding_dw_kernel, eptrs,
               {"HAS_SCALE": scale, "BLOCK_SIZE_R": ke._BLOCK_R, "BLOCK_SIZE_D": ke._block_d(4096)}, 4)


def main(argv: list[str]) -> int:
    rows = []
    states = (16, 64) if "N=64" in argv else (16,)
    targets = [a for a in argv if a != "N=64"] or ["sm_90:fp16", "sm_90:bf16", "sm_80:bf16"]
    for target in targets:
        arch, dt = target.split(":")
        cap = int(arch.removeprefix("sm_"))
        for label, fn, ptrs, constexprs, warps in jobs(cap, dt, states):
            row = dict(kernel=label, target=arch, dtype=dt)
            try:
                row.update(_compile(fn, ptrs, constexprs, cap, warps), ok=True)
            except Exception as e:  # noqa: BLE001 (reported, not raised)
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
            rows.append(row)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
