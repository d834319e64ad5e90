"""Several linear projections through row blocks of shared parameters, split as one op.

What cross-attention needs: q = X_q W_qᵀ + b_q from the query, and k, v from another tensor,
where W_q, W_k, W_v are row blocks of one packed Parameter ``in_proj_weight`` [3E, E]
(torch's layout), or three Parameters (kdim/vdim != E), and the biases row blocks of one
packed ``in_proj_bias`` [3E]. A slice of a Parameter is no Parameter, so the split linear
op cannot take the blocks one by one; this op takes the Parameters whole and a table of
groups.

Group g = (input i_g, weight parameter w_g, weight rows [r0_g, r1_g), bias rows starting
at c_g); with X_g = inputs[i_g] flattened to [M_g, K_g] and W = params[w_g]:

* forward: Y_g = X_g W[r0:r1]ᵀ + b[c:c + N_g]  ([M_g, N_g], N_g = r1 - r0). The output is
  the flat concatenation of every Y_g in row-major order (one tensor, so one autograd
  node); callers view their blocks out of it (:func:`split_outputs`).
* p1, dX_i = Σ_{g: i_g = i} dY_g W[r0:r1]: needs only the weights, saves nothing.
* p2, dW[r0:r1] += Σ_mb dY_gᵀ X_g and db[c:c + N_g] += Σ_mb Σ_rows dY_g: needs each X_g
  (saved by forward, shared by groups of one input) and the flat dY (deposited by p1).

Groups of one input and one weight with adjacent rows are merged (k and v of one memory
tensor become one GEMM). On the Triton backend every GEMM is :mod:`twobp.kernels.linear`'s,
on row-block views of the weights and gradient buffers (any strides): no copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import resolve_backend
from .base import SplitOp
from .linear import linear_dw_ref

__all__ = ["Group", "ProjectionsOp", "merge_groups", "split_outputs"]

Group = tuple[int, int, int, int, int]
"""(input index, weight parameter index, first weight row, one past the last, first bias row)."""


def merge_groups(groups: Sequence[Group]) -> tuple[Group, ...]:
    """Merge consecutive groups that read one input through adjacent rows of one weight and
    adjacent bias rows: they are one GEMM."""
    out: list[Group] = []
    for g in groups:
        if out:
            i, w, r0, r1, c = out[-1]
            if g[0] == i and g[1] == w and g[2] == r1 and g[4] == c + (r1 - r0):
                out[-1] = (i, w, r0, g[3], c)
                continue
        out.append(tuple(g))
    return tuple(out)


def split_outputs(flat: Tensor, rows: Sequence[int], sizes: Sequence[int]) -> list[Tensor]:
    """Views [M_j, N_j] of consecutive row-major blocks of the flat output."""
    out, off = [], 0
    for m, n in zip(rows, sizes):
        out.append(flat[off:off + m * n].view(m, n))
        off += m * n
    return out


@dataclass(frozen=True)
class ProjectionsOp(SplitOp):
    """The grouped projections (see the module docstring). ``params`` = weights then the
    packed bias (or None); ``groups``: one :data:`Group` per output block, in output order."""

    groups: tuple[Group, ...]
    rows: tuple[int, ...] = ()
    """M_g of each group in this call (p1 slices dY by them; p1 saves nothing)."""
    shapes: tuple[tuple[int, ...], ...] = ()
    """Each input's shape in this call (p1 returns dX in it)."""
    name = "projections"
    autocast = "lower"  # under torch.autocast: the autocast dtype, as F.linear

    @classmethod
    def for_call(cls, groups: Sequence[Group], inputs: Sequence[Tensor]) -> "ProjectionsOp":
        """The op for one call on ``inputs`` (the groups merged where they can be)."""
        groups = merge_groups(groups)
        rows = tuple(inputs[i].numel() // max(inputs[i].shape[-1], 1) if inputs[i].dim() else 1
                     for i, *_ in groups)
        return cls(groups=groups, rows=rows, shapes=tuple(tuple(x.shape) for x in inputs))

    def _blocks(self, inputs, params):
        """Per group: (X_g [M, K], W block [N, K], bias block [N] or None)."""
        bias = params[-1]
        out = []
        for i, w, r0, r1, c in self.groups:
            weight = params[w]
            k = weight.shape[1]
            x = inputs[i]
            if x.shape[-1] != k:
                raise ValueError(f"projections: input {i} has last dim {x.shape[-1]}, but its weight (parameter {w}, "
                                 f"shape {tuple(weight.shape)}) needs {k}")
            if x.dtype != weight.dtype:
                raise TypeError(f"projections: input dtype {x.dtype} differs from the weight's {weight.dtype}; cast "
                                f"the input (x.to({weight.dtype})) or the module (module.to({x.dtype}))")
            out.append((x.reshape(-1, k), weight[r0:r1], None if bias is None else bias[c:c + (r1 - r0)]))
        return out

    def forward(self, inputs, params, *, save_p1, save_p2):
        blocks = self._blocks(inputs, params)
        x0 = blocks[0][0]
        total = sum(x.shape[0] * w.shape[0] for x, w, _ in blocks)
        flat = torch.empty(total, dtype=x0.dtype, device=x0.device)
        views = split_outputs(flat, [x.shape[0] for x, _, _ in blocks], [w.shape[0] for _, w, _ in blocks])
        triton = resolve_backend(x0.device) == "triton"
        for (x, w, b), y in zip(blocks, views):
            if triton:
                from ..kernels.linear import linear_fwd
                linear_fwd(x.contiguous(), w, b, out=y)
            else:
                torch.addmm(b, x, w.t(), out=y) if b is not None else torch.mm(x, w.t(), out=y)
        p2 = {}
        if save_p2:
            for i in sorted({g[0] for g in self.groups}):
                k = inputs[i].shape[-1]
                p2[f"x{i}"] = inputs[i].reshape(-1, k).contiguous()
        return flat, {}, p2

    def differentiable_forward(self, inputs, params):
        return torch.cat([F.linear(x, w, b).reshape(-1) for x, w, b in self._blocks(inputs, params)])

    def input_grads(self, dy, saved, params, needs):
        if len(self.rows) != len(self.groups):
            raise ValueError(f"projections: rows={self.rows} must give the row count of each of the "
                             f"{len(self.groups)} groups")
        blocks = split_outputs(dy.reshape(-1), self.rows, [r1 - r0 for _, _, r0, r1, _ in self.groups])
        triton = resolve_backend(dy.device) == "triton"
        dx: list[Tensor | None] = [None] * len(needs)
        for (i, w, r0, r1, _), dy_g in zip(self.groups, blocks):
            if not needs[i]:
                continue
            weight = params[w][r0:r1]
            if triton:
                from ..kernels.linear import linear_dx
                g = linear_dx(dy_g.contiguous(), weight)
            else:
                g = dy_g @ weight
            dx[i] = g if dx[i] is None else dx[i] + g
        return tuple(None if g is None else g.view(shape) for g, shape in zip(dx, self.shapes))

    def param_grads(self, dys, saved, grads):
        bias_grad = grads[-1]
        triton = resolve_backend(dys[0].device) == "triton"
        per_mb = []
        for dy, s in zip(dys, saved):
            rows = [s[f"x{i}"].shape[0] for i, *_ in self.groups]
            per_mb.append(split_outputs(dy.reshape(-1), rows, [r1 - r0 for _, _, r0, r1, _ in self.groups]))
        for gi, (i, w, r0, r1, c) in enumerate(self.groups):
            dweight = grads[w][r0:r1] if grads[w] is not None else None
            dbias = bias_grad[c:c + (r1 - r0)] if bias_grad is not None else None
            if dweight is None and dbias is None:
                continue
            xs = [s[f"x{i}"] for s in saved]
            dy_g = [blocks[gi] for blocks in per_mb]
            if triton:
                from ..kernels.linear import linear_dw
                if dweight is None:
                    dweight = torch.zeros(r1 - r0, xs[0].shape[1], device=xs[0].device, dtype=torch.float32)
                linear_dw(xs, dy_g, dweight, dbias)
            else:
                linear_dw_ref(xs, dy_g, dweight, dbias)
