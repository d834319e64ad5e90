"""Selective scan (Mamba's S6), split: the recurrence's input gradients in p1, its own
parameters' gradients in p2.

Shapes: u, Δ (``delta``) [b, L, E] (E channels, d_inner in Mamba), B, C [b, L, N] (N state
size, d_state), A_log [E, N], D [E]; y like u. Time runs over L; channels are independent.

    A = -exp(A_log)                                   (so A < 0: every channel decays)
    a_t = exp(Δ_t A)        [E, N]                    the discretised transition (ZOH)
    h_t = a_t ⊙ h_{t-1} + (Δ_t u_t) ⊗ B_t,  h_{-1} = 0    state [E, N], in fp32
    y_t = h_t C_t + D ⊙ u_t                           (sum over N)

Backward, with dy given. s_t = ∂L/∂h_t runs backwards in time:

    s_t = C_t ⊗ dy_t + a_{t+1} ⊙ s_{t+1}              (s_L = 0)
    du_t = Δ_t Σ_n s_t B_t + D ⊙ dy_t                  dB_t = Σ_e s_t Δ_t u_t
    dΔ_t = u_t Σ_n s_t B_t + Σ_n s_t ⊙ A ⊙ a_t h_{t-1}     dC_t = Σ_e h_t dy_t
    dA_log = A ⊙ Σ_{b,t} s_t ⊙ Δ_t a_t h_{t-1}         dD = Σ_{b,t} dy_t ⊙ u_t

* **p1** gives du, dΔ, dB, dC: the previous layers (the conv, x_proj, dt_proj) wait for them.
* **p2** gives dA_log and dD, the scan's own parameters. dA_log needs s_t and h_{t-1} at every
  step, so p2 runs the backward recurrence **again**: it recomputes the states from the saved
  chunk-boundary states and the reverse recurrence for s, then reduces over (b, t). That is
  the extra compute 2BP pays here (about one more p1 of the scan; ``bench/mamba_scan_cost.py``
  measures it), off the critical path.
* ``dparams_in_p1=True`` is the alternative: p1 accumulates the [E, N] + [E] sums in the same
  pass (a few FMAs per element more) and hands them to p2 as *partials*; p2 only adds them
  into ``.grad``, and p1 frees u, Δ, B, C, dy at once.

Memory: forward keeps u, Δ, B, C (the inputs, alive anyway in the previous layers' p2 sets
for the most part) and the state at the end of every ``chunk`` steps but the last, H
[b, ceil(L/chunk) - 1, E, N] fp32, instead of every h_t ([b, L, E, N]): ``chunk`` times less
(at Mamba-1.4B, L = 1024, chunk 256: 0.75 MiB per sequence and layer against 256 MiB; with
L <= chunk nothing at all). p1 and p2 need the same set; the store counts it once.

The Triton backend is :mod:`twobp.kernels.scan`; the torch reference below computes the same
contract as a sequential scan in plain torch ops (fp32, or fp64 for fp64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from ..backend import resolve_backend
from .base import SplitOp

__all__ = ["SelectiveScanOp", "scan_boundary_states", "scan_fwd_ref", "scan_dx_ref", "scan_dw_ref"]

_PARTIALS = "dparams_in_p1"  # p1-set marker: p1 reduces dA_log, dD (owns no storage)


def _ct(x: Tensor) -> torch.dtype:
    """The compute dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def scan_boundary_states(seq_len: int, chunk: int) -> int:
    """How many states forward saves per sequence and channel: ceil(L / chunk) - 1."""
    return max(0, -(-seq_len // chunk) - 1)


def scan_fwd_ref(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, A_log: Tensor, D: Tensor, *,
                 chunk: int) -> tuple[Tensor, Tensor]:
    """(y [b, L, E] in u's dtype, H [b, ceil(L/chunk) - 1, E, N] in the compute dtype).

    A sequential scan over time; H[:, c] is the state after the last step of chunk c. Written
    with out-of-place ops, so it is differentiable (double backward recomputes through it)."""
    ct = _ct(u)
    b, L, E = u.shape
    N = B.shape[-1]
    A = -torch.exp(A_log.to(ct))  # [E, N]
    h = u.new_zeros((b, E, N), dtype=ct)
    ys, hs_saved = [], []
    for c0 in range(0, L, chunk):
        c1 = min(c0 + chunk, L)
        dt, uu = delta[:, c0:c1].to(ct), u[:, c0:c1].to(ct)  # [b, T, E]
        a = torch.exp(dt.unsqueeze(-1) * A)  # [b, T, E, N]
        bu = (dt * uu).unsqueeze(-1) * B[:, c0:c1].to(ct).unsqueeze(2)  # [b, T, E, N]
        states = []
        for t in range(c1 - c0):
            h = torch.addcmul(bu[:, t], a[:, t], h)  # a_t h_{t-1} + Δ_t u_t B_t, one kernel per step
            states.append(h)
        hs = torch.stack(states, 1)  # [b, T, E, N]
        ys.append(torch.einsum("btn,bten->bte", C[:, c0:c1].to(ct), hs) + D.to(ct) * uu)
        if c1 < L:
            hs_saved.append(h)
    y = torch.cat(ys, 1).to(u.dtype)
    H = torch.stack(hs_saved, 1) if hs_saved else u.new_zeros((b, 0, E, N), dtype=ct)
    return y, H


def _scan_bwd_ref(dy: Tensor, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, A_log: Tensor, D: Tensor,
                  H: Tensor, *, chunk: int, inputs: bool, params: bool):
    """The backward recurrence, chunk by chunk from the last: states recomputed from H, then
    s walked backwards. Returns ((du, dΔ, dB, dC) or None, (dA_log, dD) or None)."""
    ct = _ct(u)
    b, L, E = u.shape
    N = B.shape[-1]
    A = -torch.exp(A_log.to(ct))
    Dc = D.to(ct)
    grads_in = None
    if inputs:
        du, ddelta = torch.empty_like(u, dtype=ct), torch.empty_like(delta, dtype=ct)
        dB, dC = B.new_empty((b, L, N), dtype=ct), C.new_empty((b, L, N), dtype=ct)
    dA = torch.zeros((E, N), dtype=ct, device=u.device)
    dD = torch.zeros((E,), dtype=ct, device=u.device)
    rho = u.new_zeros((b, E, N), dtype=ct)  # a_{c1} s_{c1}: what flows into the chunk's last state
    starts = list(range(0, L, chunk))
    for ci in reversed(range(len(starts))):
        c0 = starts[ci]
        c1 = min(c0 + chunk, L)
        h0 = H[:, ci - 1].to(ct) if ci > 0 else u.new_zeros((b, E, N), dtype=ct)
        dt, uu, dyc = delta[:, c0:c1].to(ct), u[:, c0:c1].to(ct), dy[:, c0:c1].to(ct)
        Bc, Cc = B[:, c0:c1].to(ct), C[:, c0:c1].to(ct)
        a = torch.exp(dt.unsqueeze(-1) * A)  # [b, T, E, N]
        bu = (dt * uu).unsqueeze(-1) * Bc.unsqueeze(2)
        h, prev = h0, []
        for t in range(c1 - c0):  # recompute the chunk's states from its boundary state
            prev.append(h)
            h = torch.addcmul(bu[:, t], a[:, t], h)
        ahp = a * torch.stack(prev, 1)  # a_t h_{t-1}, [b, T, E, N]
        hs = ahp + bu  # h_t
        cc = Cc.unsqueeze(2) * dyc.unsqueeze(-1)  # C_t ⊗ dy_t
        ss, s = [None] * (c1 - c0), None
        for t in reversed(range(c1 - c0)):  # s_t = C_t dy_t + a_{t+1} s_{t+1}
            s = cc[:, t] + rho if s is None else torch.addcmul(cc[:, t], a[:, t + 1], s)
            ss[t] = s
        rho = a[:, 0] * s  # a_{c0} s_{c0}: into the previous chunk's last state
        s = torch.stack(ss, 1)  # [b, T, E, N]
        sah = s * ahp  # s_t a_t h_{t-1}: dΔ's and dA's shared term
        if inputs:  # reductions as matrix products: one pass over the [b, T, E, N] blocks each
            sB = torch.einsum("bten,btn->bte", s, Bc)  # Σ_n s_t B_t
            du[:, c0:c1] = sB * dt + Dc * dyc
            ddelta[:, c0:c1] = sB * uu + torch.einsum("bten,en->bte", sah, A)
            dB[:, c0:c1] = torch.einsum("bten,bte->btn", s, dt * uu)
            dC[:, c0:c1] = torch.einsum("bten,bte->btn", hs, dyc)
        if params:
            dA += (sah * dt.unsqueeze(-1)).sum((0, 1))
            dD += (dyc * uu).sum((0, 1))
    if inputs:
        grads_in = (du.to(u.dtype), ddelta.to(delta.dtype), dB.to(B.dtype), dC.to(C.dtype))
    return grads_in, ((dA * A, dD) if params else None)


def scan_dx_ref(dy: Tensor, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, A_log: Tensor, D: Tensor,
                H: Tensor, *, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """p1: (du, dΔ, dB, dC), each in its input's dtype."""
    return _scan_bwd_ref(dy, u, delta, B, C, A_log, D, H, chunk=chunk, inputs=True, params=False)[0]


def scan_dw_ref(dys: Sequence[Tensor], saved: Sequence[dict[str, Tensor]], A_log: Tensor | None, D: Tensor | None,
                dA_log: Tensor | None, dD: Tensor | None, *, chunk: int) -> None:
    """p2: dA_log += A ⊙ Σ s Δ a h_{t-1}, dD += Σ dy u over the micro-batches (recomputed from
    each one's saved u, Δ, B, C and boundary states H), summed in the compute dtype and added
    once. ``D`` is not read (dD and dA_log do not depend on it); ``A_log`` only when dA_log is
    wanted."""
    tot_a = tot_d = None
    for dy, s in zip(dys, saved):
        if dA_log is not None:
            _, (ga, gd) = _scan_bwd_ref(dy, s["u"], s["delta"], s["B"], s["C"], A_log, A_log.new_zeros(0),
                                        s["H"], chunk=chunk, inputs=False, params=True)
        else:  # D alone: one reduction, no recurrence
            ga, gd = None, (dy.to(_ct(dy)) * s["u"].to(_ct(dy))).sum((0, 1))
        tot_a = ga if tot_a is None else (tot_a + ga if ga is not None else tot_a)
        tot_d = gd if tot_d is None else tot_d + gd
    if dA_log is not None:
        dA_log.add_(tot_a.to(dA_log.dtype))
    if dD is not None:
        dD.add_(tot_d.to(dD.dtype))


# ----------------------------------------------------------------------------------------
# The split op
# ----------------------------------------------------------------------------------------


def _check(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, A_log: Tensor, D: Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, L, E], got shape {tuple(u.shape)}")
    b, L, E = u.shape
    if tuple(delta.shape) != (b, L, E):
        raise ValueError(f"selective_scan: delta must have u's shape {(b, L, E)}, got {tuple(delta.shape)}")
    if A_log.dim() != 2 or A_log.shape[0] != E:
        raise ValueError(f"selective_scan: A_log must be [E={E}, N], got {tuple(A_log.shape)}")
    N = A_log.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, L, N):
            raise ValueError(f"selective_scan: {name} must be [batch, L, N] = {(b, L, N)} (N from A_log), "
                             f"got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (E,):
        raise ValueError(f"selective_scan: D must be [E={E}], got {tuple(D.shape)}")
    for name, t in (("delta", delta), ("B", B), ("C", C)):
        if t.dtype != u.dtype:
            raise TypeError(f"selective_scan: {name} dtype {t.dtype} differs from u's {u.dtype}; cast it "
                            f"({name}.to(u.dtype)), as TwoBPSelectiveScan does")
    for name, t in (("delta", delta), ("B", B), ("C", C), ("A_log", A_log), ("D", D)):
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan: u is on {u.device} but {name} is on {t.device}; move them to one device")
    for name, t in (("A_log", A_log), ("D", D)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"selective_scan: {name} must be a floating-point tensor, got {t.dtype}")


def _unit_last(t: Tensor) -> Tensor:
    """t with unit stride on its last dim (what the kernels read); views stay views."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@dataclass(frozen=True)
class SelectiveScanOp(SplitOp):
    """The split selective scan (see module docstring).

    ``chunk``: steps between saved states (a positive multiple of 16; the Triton kernels walk
    time in tiles of 8 or 16 steps). ``dparams_in_p1``: reduce dA_log, dD in p1 as partials
    instead of recomputing them in p2.
    Inputs (u, Δ, B, C), parameters (A_log, D); D may be None (no skip).
    """

    chunk: int = 256
    dparams_in_p1: bool = False
    name: ClassVar[str] = "selective_scan"

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk <= 0 or self.chunk % 16:
            raise ValueError(f"SelectiveScanOp.chunk must be a positive multiple of 16, got {self.chunk!r}")

    def _zero_d(self, A_log: Tensor, D: Tensor | None) -> Tensor:
        return D if D is not None else A_log.new_zeros(A_log.shape[0])

    def forward(self, inputs, params, *, save_p1, save_p2):
        u, delta, B, C = (_unit_last(t) for t in inputs)
        A_log, D = params
        _check(u, delta, B, C, A_log, D)
        Dz = self._zero_d(A_log, D)
        if resolve_backend(u.device) == "triton":
            from ..kernels.scan import scan_fwd
            y, H = scan_fwd(u, delta, B, C, A_log, Dz, chunk=self.chunk)
        else:
            y, H = scan_fwd_ref(u, delta, B, C, A_log, Dz, chunk=self.chunk)
        saved = {"u": u, "delta": delta, "B": B, "C": C, "H": H}
        a_trains = A_log.requires_grad
        if save_p2 and self.dparams_in_p1:
            return y, {**saved, _PARTIALS: u.new_empty(0)}, {}
        p1 = saved if save_p1 else {}
        # D alone needs u and dy: no recurrence, no states
        # p2 reads A's values (a [E, N] view of the parameter, counted once by the store);
        # D alone needs u and dy: no recurrence, no states
        p2 = ({**saved, "A_log": A_log} if a_trains else {"u": u}) if save_p2 else {}
        return y, p1, p2

    def _backward(self, dy, saved, params, *, inputs: bool, dparams: bool):
        A_log, D = params
        Dz = self._zero_d(A_log, D)
        args = (dy.contiguous(), saved["u"], saved["delta"], saved["B"], saved["C"], A_log, Dz, saved["H"])
        if resolve_backend(dy.device) == "triton":
            from ..kernels.scan import scan_bwd
            return scan_bwd(*args, chunk=self.chunk, input_grads=inputs, param_grads=dparams)
        return _scan_bwd_ref(*args, chunk=self.chunk, inputs=inputs, params=dparams)

    def input_grads(self, dy, saved, params, needs):
        grads, _ = self._backward(dy, saved, params, inputs=True, dparams=False)
        return tuple(g if need else None for g, need in zip(grads, needs))

    def split_input_grads(self, dy, saved, params, needs, p_needs):
        if _PARTIALS not in saved:
            return super().split_input_grads(dy, saved, params, needs, p_needs)
        grads, (ga, gd) = self._backward(dy, saved, params, inputs=any(needs), dparams=True)
        dx = tuple(g if need else None for g, need in zip(grads, needs)) if grads is not None else (None,) * 4
        partials = {k: v for k, v, need in (("dA_log", ga, p_needs[0]), ("dD", gd, p_needs[1])) if need}
        return dx, partials

    def param_grads(self, dys, saved, grads):
        dA_log, dD = grads
        if dA_log is None and dD is None:
            return
        if any(dy is None for dy in dys):  # partials reduced in p1 (dparams_in_p1)
            for name, grad in (("dA_log", dA_log), ("dD", dD)):
                if grad is not None:
                    grad.add_(sum(s[name] for dy, s in zip(dys, saved) if dy is None).to(grad.dtype))
            rest = [(dy, s) for dy, s in zip(dys, saved) if dy is not None]
            if rest:
                self.param_grads([dy for dy, _ in rest], [s for _, s in rest], grads)
            return
        xs = list(saved)
        if dA_log is None:  # D alone: one reduction per micro-batch, no recurrence
            scan_dw_ref(dys, xs, None, None, None, dD, chunk=self.chunk)
            return
        A_log = xs[0]["A_log"]
        if resolve_backend(dys[0].device) == "triton":
            from ..kernels.scan import scan_dw
            scan_dw([dy.contiguous() for dy in dys], [s["u"] for s in xs], [s["delta"] for s in xs],
                    [s["B"] for s in xs], [s["C"] for s in xs], [s["H"] for s in xs], A_log, dA_log, dD,
                    chunk=self.chunk)
        else:
            scan_dw_ref(dys, xs, A_log, None, dA_log, dD, chunk=self.chunk)

    def fused_grads(self, dy, p1, p2, params, in_needs, p_needs):
        A_log, D = params
        if not p_needs[0]:  # dD alone (or nothing): p1 plus one reduction, no second recurrence
            saved = p1 or p2
            dx = self.input_grads(dy, saved, params, in_needs) if any(in_needs) else (None,) * 4
            ct = _ct(dy)
            gd = (dy.to(ct) * saved["u"].to(ct)).sum((0, 1)).to(D.dtype) if p_needs[1] else None
            return dx, (None, gd)
        grads, (ga, gd) = self._backward(dy, p1 or p2, params, inputs=any(in_needs), dparams=True)
        dx = tuple(g if need else None for g, need in zip(grads, in_needs)) if grads is not None else (None,) * 4
        return dx, (ga.to(A_log.dtype), gd.to(D.dtype) if p_needs[1] else None)

    def differentiable_forward(self, inputs, params):
        A_log, D = params
        return scan_fwd_ref(*inputs, A_log, self._zero_d(A_log, D), chunk=self.chunk)[0]
