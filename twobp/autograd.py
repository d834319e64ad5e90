"""One autograd Function for every split op: p1 in backward, p2 now or later.

``split_apply(op, owner, label, inputs, params)`` runs ``op.forward`` and wires its
backward:

* **Outside a split region** the module is exactly its torch twin under autograd. On the
  torch backend it *runs* as its twin where torch has the op (``op.native_forward``: one
  aten call, whose C++ autograd node computes the fused backward with no Python per op);
  otherwise (Triton, RMSNorm, the scan) backward runs p1 and p2 together
  (``op.fused_grads``) and returns the parameter gradients.
* **Inside** ``split_backward(microbatch=i)`` (and when some parameter trains) the p2 set
  goes into the activation store under ``(owner, i)``. Backward runs p1 and returns input
  gradients only; it deposits dy (or the op's partials) for :func:`twobp.backward_p2`. The
  parameters are not inputs of the autograd node in this mode, so autograd never touches
  their ``.grad`` or their hooks: p2 does, later.

What is saved, and how (the same in both modes, so activation checkpointing sees the same
tensors in the forward and in its recomputation): every tensor of the p1 and p2 sets, the
parameters and the raw inputs go through ``save_for_backward``, so autograd's version
counters catch in-place edits before p1 as they do for torch's own ops, and non-reentrant
``torch.utils.checkpoint`` may drop them and recompute them. The store holds the p2 set
beyond p1; they are the same storages (views), counted once.

Double backward (``create_graph=True``) outside a split region recomputes the op with
differentiable torch ops (``op.differentiable_forward``) and differentiates that, so
second derivatives equal torch's. Inside a split region it raises: p2 runs outside
autograd, so there is no graph to differentiate.

A forward that runs during a backward pass is a recomputation (activation checkpointing):
it never opens a store entry, whatever split region is active.
"""

from __future__ import annotations

import sys
import warnings
from typing import Hashable, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.nn.parallel import DistributedDataParallel as _DDP

from .backend import _local as _backend_local
from .backend import pinned_backend, resolve_backend
from .ops.base import SplitOp
from .split import _local as _split_local
from .split import current_split

__all__ = ["split_apply", "runs_as_torch"]


def _detached(saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """The saved set with no tensor tied to a graph (an input that requires grad, kept by
    the store past its node, would keep the whole graph before it alive)."""
    for v in saved.values():
        if v is not None and v.requires_grad:
            return {k: (v.detach() if v is not None and v.requires_grad else v) for k, v in saved.items()}
    return saved


# What one split op call passes to its autograd node besides tensors, as one plain tuple
# (every non-tensor argument, and every Python object built per call, costs interpreter work
# that runs with cold caches after a GEMM): (op, owner, label, n_inputs, split, p_needs,
# real_params, compute_params). In a split region the parameters travel here, not as tensor
# arguments: they are then no inputs of the node, so autograd never accumulates into their
# ``.grad`` (p2 does).
_Call = tuple


class _SplitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, *tensors):  # type: ignore[override]
        op, owner, label, n_inputs, split, p_needs, real_params, compute_params = call
        inputs = tensors[:n_inputs]
        # split: the parameters come in the call (tensors may end with the anchor, see split_apply)
        params = tensors[n_inputs:] if split is None else compute_params
        in_needs = tuple([t is not None and t.requires_grad for t in inputs])
        out, p1, p2 = op.forward(inputs, params, save_p1=True in in_needs, save_p2=True in p_needs)
        p1, p2 = _detached(p1), _detached(p2)
        entry = None
        if split is not None:
            entry = split.store.open_call(owner, label, split.microbatch, op, real_params, p_needs, p2)
            split.opened.append(entry)
            # An output that never reaches a loss has its graph freed without a backward:
            # its entry goes with it (its weight gradient is zero; there is nothing to defer).
            entry.close_with(ctx)
        # one attribute: (op, in_needs, p_needs, n_in, n_params, n_extra, p1 keys, p2 keys, entry,
        # the forced backend, kept because backward may run on another thread: CUDA's)
        ctx.meta = (op, in_needs, p_needs, n_inputs, len(params), len(tensors) - n_inputs, tuple(p1), tuple(p2),
                    entry, getattr(_backend_local, "forced", None))
        ctx.save_for_backward(*p1.values(), *p2.values(), *params, *inputs)
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        op, in_needs, p_needs, n_in, n_params, n_extra, p1_keys, p2_keys, entry, backend = ctx.meta
        if backend is not None and getattr(_backend_local, "forced", None) != backend:
            with pinned_backend(backend):
                return _SplitFunction.backward(ctx, dy)
        n1, n2 = len(p1_keys), len(p2_keys)
        saved = ctx.saved_tensors
        p1 = dict(zip(p1_keys, saved[:n1]))
        params = saved[n1 + n2:n1 + n2 + n_params]
        if entry is not None:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{entry.label}: double backward (create_graph=True) through a twobp.split_backward "
                    "region is not supported: p2 computes the weight gradients outside autograd, so "
                    "there is no graph to differentiate. Run this forward outside split_backward for "
                    "higher-order gradients.")
            keep = entry.begin_p1()
            dx, partials = op.split_input_grads(dy, p1, params, in_needs, p_needs)
            if not keep:
                pass  # the module is gone: nobody can ask for its p2
            elif partials is None:
                # p2 happens later: keep dy for it, row-contiguous so batched p2 reads it in place.
                entry.deposit_dy(dy.detach().contiguous())
            else:
                entry.deposit_partials(_detached(partials))
            return (None, *dx, *((None,) * n_extra))
        p2 = dict(zip(p2_keys, saved[n1:n1 + n2]))
        inputs = saved[n1 + n2 + n_params:]
        # autograd.grad(..., inputs=...) may ask for a subset: compute only that
        in_needs = tuple(ctx.needs_input_grad[1:1 + n_in])
        p_needs = tuple(ctx.needs_input_grad[1 + n_in:])
        if torch.is_grad_enabled():  # create_graph=True: a backward built of differentiable ops
            return (None, *_differentiable_grads(op, dy, inputs, params, in_needs, p_needs))
        dx, pgrads = op.fused_grads(dy, p1, p2, params, in_needs, p_needs)
        return (None, *dx, *pgrads)


# torch.autograd.Function.apply's Python wrapper binds default arguments for setup_context
# and unwraps dead functorch wrappers, neither of which this Function needs (it has no
# setup_context, and runs only with functorch transforms off: _traced_forward takes those);
# the C entry point skips ~15 Python calls on every op call, each a cache miss after a GEMM.
_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _SplitFunction)


def _differentiable_grads(op: SplitOp, dy: Tensor, inputs: tuple, params: tuple,
                          in_needs: tuple[bool, ...], p_needs: tuple[bool, ...]) -> list[Tensor | None]:
    """Gradients of every input and parameter whose flag is set, as a differentiable
    function of them and of dy: the op recomputed in plain torch ops, then autograd."""
    wanted = [t for t, need in zip((*inputs, *params), (*in_needs, *p_needs)) if need]
    with torch.enable_grad():
        out = op.differentiable_forward(inputs, params)
        got = list(torch.autograd.grad(out, wanted, dy, create_graph=True, allow_unused=True))
    return [got.pop(0) if need else None for need in (*in_needs, *p_needs)]


def split_apply(op: SplitOp, owner: Hashable, label: str, inputs: Sequence[Tensor],
                params: Sequence[Tensor | None]) -> Tensor:
    """Apply ``op`` to ``inputs`` with ``params``, with the split backward wired in.

    Under ``torch.autocast`` the op's inputs and parameters are first cast as torch casts
    its own op of that kind (``op.autocast``): matmul-like ops (linear, conv, attention) to
    the autocast dtype; norms on CUDA to fp32, on CPU left as they are (torch's CPU norms
    take a half input with fp32 weights and compute in fp32). The casts are autograd ops,
    so gradients reach the fp32 parameters; in a split region p2 accumulates the weight
    gradient into the fp32 parameter's ``.grad``.
    """
    inputs, params = tuple(inputs), tuple(params)
    if not _ANY_AUTOCAST():
        return _split_apply(op, owner, label, inputs, params, params)
    device = next((t.device.type for t in inputs if t is not None), "cpu")
    if _autocast_on(device):
        cast_in, cast_p = _autocast_args(op, device, inputs, params)
        with torch.autocast(device, enabled=False):
            return _split_apply(op, owner, label, cast_in, params, cast_p)
    return _split_apply(op, owner, label, inputs, params, params)


def _any_autocast_fallback() -> bool:
    return any(_autocast_on(d) for d in ("cpu", "cuda"))


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", _any_autocast_fallback)


def _autocast_on(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def _autocast_args(op: SplitOp, device: str, inputs: tuple, params: tuple) -> tuple[tuple, tuple]:
    policy = getattr(op, "autocast", None)
    if policy == "lower":
        dtype = torch.get_autocast_dtype(device)
    elif policy == "fp32" and device == "cuda":
        dtype = torch.float32
    else:
        return inputs, params

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t

    return tuple(cast(t) for t in inputs), tuple(cast(p) for p in params)


def _split_apply(op: SplitOp, owner: Hashable, label: str, inputs: tuple, params: tuple,
                 compute_params: tuple) -> Tensor:
    """``params``: the parameters themselves (whose ``.grad`` p2 fills); ``compute_params``:
    what the op computes with (the same, or their autocast copies)."""
    p_needs = tuple([p is not None and p.requires_grad for p in params])
    split = getattr(_split_local, "state", None)  # current_split(), inlined: this runs on every op call
    if _FUNCTORCH_ACTIVE() or _forward_ad._current_level >= 0:
        return _traced_forward(op, label, inputs, compute_params, split is not None and True in p_needs)
    if not torch.is_grad_enabled():
        if split is not None and True in p_needs and _under_reentrant_checkpoint():
            _warn_split_off(label)
        return _forward_only(op, inputs, compute_params)
    input_needs = _any_requires_grad(inputs)
    if not input_needs and not _any_requires_grad(compute_params):
        return _forward_only(op, inputs, compute_params)
    if split is not None and True in p_needs and _GRAPH_TASK_ID() == -1 and _leaves(params, p_needs, label):
        if getattr(_DDP, "_active_ddp_module", None) is not None:
            _refuse_ddp_forward(label)
        # Split: the parameters are no inputs of the node (p2 fills their .grad); the node
        # saves them, so in-place edits are still caught. An autocast copy is detached (kept
        # past its node it would hold the cast's graph) and flagged as its parameter is, since
        # ops read requires_grad to decide what p2 needs. The anchor, a leaf that never gets a
        # gradient, keeps the node in the graph when no input needs a gradient (a first
        # layer), so that p1 runs and readies p2.
        if compute_params is not params:
            compute_params = tuple([None if c is None else c.detach().requires_grad_(need)
                                    for c, need in zip(compute_params, p_needs)])
        call = (op, owner, label, len(inputs), split, p_needs, params, compute_params)
        if input_needs:
            return _APPLY(call, *inputs)
        return _APPLY(call, *inputs, _anchor())
    if not _saved_tensor_hooks_active():
        out = op.native_forward(inputs, compute_params)
        if out is not None:
            return out
    return _APPLY((op, owner, label, len(inputs), None, p_needs, (), ()), *inputs, *compute_params)


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _traced_forward(op: SplitOp, label: str, inputs: tuple, params: tuple, split: bool) -> Tensor:
    """Under torch.func transforms (grad, vmap, jacrev, jvp) or forward-mode AD: the op in plain
    torch ops (``op.differentiable_forward``), which they trace as they trace torch's modules; a
    custom autograd Function would need rules of its own for each transform."""
    if split:
        raise NotImplementedError(
            f"{label}: a torch.func transform (grad, vmap, jvp, ...) or forward-mode AD inside "
            "twobp.split_backward: p2 computes the weight gradients outside autograd, where the transform "
            "cannot follow them. Run the transformed function outside split_backward.")
    return op.differentiable_forward(inputs, params)


def _leaves(params: tuple, p_needs: tuple[bool, ...], label: str) -> bool:
    """Whether every parameter that needs a gradient is a leaf, so p2 can put it in ``.grad``.
    A computed weight (a parametrization such as weight_norm, ``torch.func.functional_call``
    with weights derived from others) has to send its gradient back through autograd to what
    it was computed from: that call is not split (warned once per module)."""
    for p, need in zip(params, p_needs):
        if need and not p.is_leaf:
            _warn_once(("computed weight", label), f"twobp: {label} ran inside split_backward with a weight computed by autograd "
                              "(a parametrization such as weight_norm, or functional_call with derived weights): "
                              "its gradient must flow back through autograd to what it is computed from, so this "
                              "call computes dW with dX in its backward (correct, not deferred to p2).")
            return False
    return True


def _any_requires_grad(tensors: tuple) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def runs_as_torch(x: Tensor) -> bool:
    """Whether a twin called on ``x`` runs as its torch module: outside any split region, on
    the torch backend, with no saved-tensor hooks on. The twins of linear, LayerNorm and
    conv2d then call torch's forward directly (no Python of ours per call; their own
    validation runs only when torch's op fails, to name the fix), which is what
    ``split_apply`` would reach through ``op.native_forward``."""
    return (current_split() is None and isinstance(x, Tensor) and resolve_backend(x.device) == "torch"
            and not _saved_tensor_hooks_active())


def _forward_only(op: SplitOp, inputs: tuple, params: tuple) -> Tensor:
    """The output with nothing saved (no graph will need it)."""
    out = op.native_forward(inputs, params)
    if out is None:
        out, _, _ = op.forward(inputs, params, save_p1=False, save_p2=False)
    return out


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are on (torch.utils.checkpoint without reentrancy, offloading,
    a memory meter). Normal mode then keeps the split Function: a checkpointed forward and its
    recomputation inside backward must save the same tensors, and the recomputation cannot
    know whether its forward ran inside a split region, so both take the one path whose
    saving is the same in either mode."""
    if _TOP_HOOKS is None:  # a torch without the query: assume hooks, the path that is always safe
        return True
    return _TOP_HOOKS(False) is not None


_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _under_reentrant_checkpoint() -> bool:
    """Whether this forward runs inside torch.utils.checkpoint's reentrant CheckpointFunction
    (it runs the forward under no_grad and the real one again inside backward)."""
    f = sys._getframe(2)
    for _ in range(40):
        if f is None:
            return False
        if f.f_code.co_name == "forward" and f.f_code.co_filename.endswith(("utils/checkpoint.py",
                                                                            "utils\\checkpoint.py")):
            return True
        f = f.f_back
    return False


def _refuse_ddp_forward(label: str) -> None:
    """Raise: a split forward inside DistributedDataParallel's forward (``_DDP._active_ddp_module``
    is set while one runs), whose gradient hooks would reduce before p2."""
    from .split import _DP_ALTERNATIVE
    raise NotImplementedError(f"{label}: a split forward inside torch DistributedDataParallel: {_DP_ALTERNATIVE}")


# the autograd engine's current graph task on this thread: -1 outside a backward pass (a forward
# inside one is a recomputation, which opens no store entry)
_GRAPH_TASK_ID = torch._C._current_graph_task_id


def _anchor() -> Tensor:
    return torch.empty(0, requires_grad=True)


_warned: set[tuple[str, str]] = set()


def _warn_once(key: tuple[str, str], message: str) -> None:
    """Warn once per (what happened, module label)."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=5)


def _warn_split_off(label: str) -> None:
    _warn_once(("reentrant", label), f"twobp: {label} ran its forward inside split_backward under activation checkpointing with "
                      "use_reentrant=True, which recomputes the forward inside backward: its weight gradients will "
                      "not be deferred to p2 but computed with dX (correct, but no 2BP). Use "
                      "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) to keep the split.")
