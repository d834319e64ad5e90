"""Point-to-point transport between pipeline ranks over torch.distributed.

A message is a small int64 header (dtype code, rank, shape) followed by the payload,
so a receiver needs no shape information in advance; once both sides know the shape
(the executor learns it in its first step for a batch shape), the header is left out. Sends are asynchronous
(``isend``; the handle is kept until :meth:`P2P.drain`), receives block with a timeout.

Tags: gloo matches messages by (peer, tag), so every message gets its own tag and the
order of posting does not matter. NCCL ignores tags and matches in posting order per
pair of ranks; the executor posts in schedule order, which pairs correctly when each
rank receives a peer's messages in the order the peer sends them (on NCCL it runs the
schedule's :func:`twobp.pipeline.lowering.receive_in_send_order`, which makes it so;
:func:`twobp.pipeline.validate.fifo_violations` checks a schedule).

One-way channels: NCCL runs a pair's sends and receives, both directions, in order on one
stream, and a large send does not finish until its receive runs. Rank 0's queued
"send activation 1" and rank 1's queued "send gradient 0" can then wait on each other
(each one's receive sits behind its own send). With ``channels`` (one two-rank process
group per *ordered* pair, built by :func:`one_way_channels`), each stream carries one
direction only and that cycle cannot form. The executor builds them on NCCL.
"""

from __future__ import annotations

import datetime
from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["P2P", "CommTimeout", "one_way_channels"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_MAX_DIMS = 8


class CommTimeout(RuntimeError):
    """A peer did not deliver within the timeout (dead, hung, or a mismatched schedule)."""


def one_way_channels(pairs: list[tuple[int, int]]) -> dict[tuple[int, int], dist.ProcessGroup]:
    """A two-rank process group for each ordered pair ``(src, dst)`` of global ranks.

    Collective: every rank of the world must call it with the same ``pairs``.
    """
    return {pair: dist.new_group(ranks=sorted(pair)) for pair in pairs}


class P2P:
    """Send/receive tensors to/from pipeline ranks ``0..world-1`` of ``group``.

    ``channels``: optional ``{(src, dst): group}`` from :func:`one_way_channels`, keyed by
    pipeline ranks; a message from src to dst then travels on that group.
    """

    def __init__(self, *, rank: int, device: torch.device, timeout: float,
                 group: dist.ProcessGroup | None = None,
                 channels: dict[tuple[int, int], dist.ProcessGroup] | None = None):
        self.rank = rank
        self.device = device
        self.timeout = timeout
        self.group = group
        self.channels = channels or {}
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        # NCCL moves only device tensors; gloo only CPU ones.
        backend = dist.get_backend(group)
        self._header_device = device if backend == "nccl" else torch.device("cpu")

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def send(self, tensor: torch.Tensor, dst: int, tag: int, *, header: bool = True) -> None:
        """Post ``tensor`` to pipeline rank ``dst`` without waiting; ``header=False`` when
        the receiver already knows the shape and dtype."""
        if tensor.dim() > _MAX_DIMS:
            raise ValueError(f"cannot send a {tensor.dim()}-d tensor; at most {_MAX_DIMS} dims")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"cannot send dtype {tensor.dtype}; supported: {_DTYPES}")
        msgs = []
        if header:
            head = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
            head[0] = _DTYPES.index(tensor.dtype)
            head[1] = tensor.dim()
            head[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
            msgs.append((head.to(self._header_device), 2 * tag))
        msgs.append((tensor.detach().contiguous(), 2 * tag + 1))
        grp = self.channels.get((self.rank, dst), self.group)
        for t, tg in msgs:
            self._pending.append((dist.isend(t, self._global(dst), group=grp, tag=tg), t))
        self._reap()

    def recv(self, src: int, tag: int, describe: Callable[[], str],
             like: tuple[tuple[int, ...], torch.dtype] | None = None) -> torch.Tensor:
        """Receive the tensor pipeline rank ``src`` sent under ``tag``; blocks up to the
        timeout, then raises :class:`CommTimeout` with ``describe()`` in the message.
        ``like=(shape, dtype)``: expect no header (the sender was told so too)."""
        grp = self.channels.get((src, self.rank), self.group)
        if like is None:
            head = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=self._header_device)
            self._wait(dist.irecv(head, self._global(src), group=grp, tag=2 * tag), src, describe)
            head = head.cpu()
            ndim = int(head[1])
            like = (tuple(int(x) for x in head[2:2 + ndim]), _DTYPES[int(head[0])])
        out = torch.empty(like[0], dtype=like[1], device=self.device)
        self._wait(dist.irecv(out, self._global(src), group=grp, tag=2 * tag + 1), src, describe)
        return out

    def _wait(self, work: dist.Work, src: int, describe: Callable[[], str]) -> None:
        try:
            ok = work.wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise CommTimeout(
                f"rank {self.rank}: receive from rank {src} failed ({describe()}): "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Is rank {src} alive, "
                "and do both ranks run the same schedule?") from e
        if ok is False:
            raise CommTimeout(f"rank {self.rank}: no message from rank {src} within "
                              f"{self.timeout:g} s ({describe()})")

    def _reap(self) -> None:
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def drain(self) -> None:
        """Wait for every posted send (end of step), up to the timeout each."""
        for work, _ in self._pending:
            try:
                work.wait(datetime.timedelta(seconds=self.timeout))
            except RuntimeError as e:
                raise CommTimeout(f"rank {self.rank}: a send did not complete within "
                                  f"{self.timeout:g} s: {str(e).splitlines()[0]}") from e
        self._pending.clear()
