"""Any model as pipeline blocks: a list of modules, each taking and returning one tensor or a tuple.

The executor carries **one tensor** across a stage boundary each way (the activation
forward, its gradient backward). :func:`pipeline_blocks` wraps a list of modules so that
a block may take and return a tuple of tensors all the same:

* a block whose module returns a tuple (or list) packs it into one 1-D tensor
  (:func:`pack`); the next block unpacks it (:func:`unpack`) and calls its module with
  the members as positional arguments;
* a block whose module returns one tensor passes it on as it is (the common case costs
  nothing);
* the last block's output goes to the loss as the module returned it.

Packing, for a tuple of tensors t_1..t_n (None members allowed):

    packed = [ header | t_1.flatten() | ... | t_n.flatten() ]   (1-D, dtype F)

F is the floating members' dtype (they must share one; float32 when there is none). The
header (a magic number, then per member its kind, dtype code and shape, as int32) and any
integer or bool member (ids, masks: cast to int64) are stored bit for bit through
``Tensor.view(F)``, so they travel exactly. Floating members are concatenated as they are:
the gradient of the packed tensor is the members' gradients in place (zeros over the
header and the integer members), so the executor's backward message is the same one tensor.
Shapes travel in the header, so the receiving block needs no prior knowledge; a tuple of
the same shapes packs to the same length (the executor's static-shape cache stays valid).

Example (a toy two-input chain)::

    blocks = twobp.pipeline.pipeline_blocks([embed_with_mask, layer, layer, head])
    ex = PipelineExecutor(blocks, loss_fn, schedule=make_schedule("1f1b", stages=2, microbatches=4, twobp=True))
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Block", "pack", "unpack", "is_packed", "pipeline_blocks"]

_MAGIC = 0x2B9A7E11  # marks a packed tuple (int32)
_NONE, _FLOAT, _EXACT = 0, 1, 2  # member kinds
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]


def _words_as(words: list[int], dtype: torch.dtype, device) -> Tensor:
    """int32 ``words`` bit-cast into ``dtype`` elements (padded to whole elements)."""
    per = max(1, dtype.itemsize // 4)  # words per element (2 for fp64)
    words = words + [0] * (-len(words) % per)
    return torch.tensor(words, dtype=torch.int32, device=device).view(dtype)


def _read_words(t: Tensor, first: int, count: int) -> list[int]:
    """``count`` int32 words of ``t``'s bits from word ``first`` on."""
    per_elem = t.element_size() / 4  # words per element
    lo = int(first // per_elem)
    hi = int(-(-(first + count) // per_elem))
    w = t.detach()[lo:hi].clone().view(torch.int32)
    skip = first - int(lo * per_elem)
    return w[skip:skip + count].tolist()


def pack(members: Sequence[Tensor | None]) -> Tensor:
    """One 1-D tensor carrying ``members`` (see the module docstring); differentiable in the
    floating members."""
    bad = [type(t).__name__ for t in members if t is not None and not isinstance(t, Tensor)]
    if bad:
        raise TypeError(f"pack: a block's tuple may hold tensors and None only, got {bad}; return those values as "
                        "tensors or keep them inside the block")
    floats = {t.dtype for t in members if t is not None and t.is_floating_point()}
    if len(floats) > 1:
        raise ValueError(f"pack: the floating members have several dtypes {sorted(map(str, floats))}; cast them to "
                         "one dtype before returning them from a block")
    dtype = floats.pop() if floats else torch.float32
    if dtype not in _DTYPES[:4]:
        raise TypeError(f"pack: floating members of dtype {dtype} are not supported; use fp16, bf16, fp32 or fp64")
    device = next((t.device for t in members if t is not None), torch.device("cpu"))
    header = [_MAGIC, len(members)]
    body = []
    for t in members:
        if t is None:
            header += [_NONE, 0, 0]
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"pack: member dtype {t.dtype} is not supported; use one of {[str(d) for d in _DTYPES]}")
        exact = not t.is_floating_point()
        header += [_EXACT if exact else _FLOAT, _DTYPES.index(t.dtype), t.dim(), *t.shape]
        if exact:  # bit for bit, as int64 (8 bytes: a whole number of elements of any float dtype)
            body.append(t.detach().reshape(-1).to(torch.int64).view(dtype))
        else:
            body.append(t.reshape(-1))
    per = max(1, dtype.itemsize // 4)
    n_words = len(header) + 1
    n_words += -n_words % per
    return torch.cat([_words_as([n_words] + header, dtype, device), *body])


def is_packed(t: Any) -> bool:
    """Whether ``t`` is a tensor made by :func:`pack`."""
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in _DTYPES[:4] or t.numel() * t.element_size() < 12:
        return False
    n_words, magic = _read_words(t, 0, 2)
    return magic == _MAGIC and 3 <= n_words <= t.numel() * t.element_size() // 4


def unpack(packed: Tensor) -> tuple[Tensor | None, ...]:
    """The members :func:`pack` put in: views of ``packed`` for floating members (gradients
    flow back into it), exact copies for integer and bool members."""
    if not is_packed(packed):
        raise ValueError("unpack: not a tensor made by twobp.pipeline.pack")
    size = packed.element_size()
    n_words = _read_words(packed, 0, 1)[0]
    words = _read_words(packed, 0, n_words)
    pos = n_words * 4 // size  # first element after the header
    i, out = 3, []
    for _ in range(words[2]):
        kind = words[i]
        if kind == _NONE:
            out.append(None)
            i += 3
            continue
        dt, ndim = _DTYPES[words[i + 1]], words[i + 2]
        shape = tuple(words[i + 3:i + 3 + ndim])
        i += 3 + ndim
        numel = 1
        for d in shape:
            numel *= d
        if kind == _FLOAT:
            out.append(packed[pos:pos + numel].view(shape))
            pos += numel
        else:
            elems = numel * 8 // size
            raw = packed[pos:pos + elems].detach().clone()  # own storage: offset 0, aligned for int64
            out.append(raw.view(torch.int64).to(dt).view(shape))
            pos += elems
    return tuple(out)


class Block(nn.Module):
    """One pipeline block around ``module``: unpacks a packed input into positional
    arguments, packs a tuple output (unless ``last``). ``module`` is a child, so its
    parameters keep their names under ``module.``."""

    def __init__(self, module: nn.Module, *, last: bool = False) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"pipeline_blocks takes nn.Modules, got {type(module).__name__}")
        self.module = module
        self.last = last

    def forward(self, x: Tensor) -> Any:
        args = unpack(x) if is_packed(x) else (x,)
        out = self.module(*args)
        if isinstance(out, (tuple, list)) and not self.last:
            return pack(out)
        return out


def pipeline_blocks(modules: Sequence[nn.Module] | nn.Sequential) -> list[nn.Module]:
    """The blocks a :class:`~twobp.pipeline.PipelineExecutor` cuts into stages, from modules that
    each take one tensor or a tuple (as positional arguments) and return one tensor or a
    tuple; the first takes the executor's input, the last's output goes to the loss.
    Each module is wrapped in a :class:`Block` (its parameters are then named
    ``<block>.module.<name>``); a block reads the contents of a 1-D floating input to see
    whether it is a packed tuple (one device-to-host read of 8 bytes on a GPU), and of
    nothing else."""
    mods = list(modules.children()) if isinstance(modules, nn.Sequential) else list(modules)
    if not mods:
        raise ValueError("pipeline_blocks: give at least one module")
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Module):
            raise TypeError(f"pipeline_blocks: item {i} is a {type(m).__name__}, not an nn.Module")
    return [Block(m, last=i == len(mods) - 1) for i, m in enumerate(mods)]
