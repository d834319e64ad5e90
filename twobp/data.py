"""Training data that needs no download: Python's standard library as a byte-level corpus.

Real text, :class:`ByteCorpus`
    The ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` and
    ``__pycache__`` left out), in sorted order of their relative paths, read as bytes; the
    vocabulary is the 256 byte values. Reading stops at ``max_bytes`` (the last file is cut
    there), so start-up stays fast. Each file goes to the held-out split when a hash of its
    *content* falls under ``heldout_fraction``, so the splits are disjoint in files and
    identical files (the many empty ``__init__.py``) never straddle them. A batch is a pure
    function of ``(seed, step, split)``: ``batch_size`` windows of ``seq_len + 1`` bytes at
    random offsets, the input the first ``seq_len`` and the target the same shifted by one.
    The corpus is the same on every machine with the same Python build.

Synthetic data, :class:`SyntheticBatches` and the ``synthetic_*`` functions
    Random tokens and Gaussian images for throughput runs of the BERT-like and ResNet
    models; ``synthetic`` is True on the source, so reports can say so.

Masked-LM batches (:func:`mask_tokens`) mask exactly the same number of positions in every
row, so the mean loss over micro-batches equals the mean loss over the whole batch.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "ByteCorpus",
    "averages_over",
    "count_targets",
    "SyntheticBatches",
    "corpus_files",
    "mask_tokens",
    "stdlib_root",
    "synthetic_images",
    "synthetic_tokens",
]

IGNORE_INDEX = -100
"""Target value that the loss skips (the un-masked positions of a masked-LM batch)."""



def count_targets(target: Tensor) -> int:
    """How many entries of ``target`` a mean loss counts: those that are not ``IGNORE_INDEX``."""
    return int((target != IGNORE_INDEX).sum())


def averages_over(counter: Callable[[Tensor], int]) -> Callable:
    """Declare what a loss averages over: ``@averages_over(count_targets)`` on
    ``loss_fn(output, target)`` that returns the mean over ``counter(target)`` items (tokens
    whose label counts, say). A pipeline then weights micro-batch i's loss by ``c_i / Σ c``
    instead of its share of rows, so padding or masks that leave the micro-batches with
    different counts still give the loss and gradients of the whole batch's mean on one
    process (a micro-batch that counts nothing adds nothing, where its own mean is 0 / 0)."""
    def mark(loss_fn: Callable) -> Callable:
        loss_fn.counted_items = counter
        return loss_fn
    return mark


_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SPLITS = ("train", "heldout")


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: str | Path | None = None) -> list[Path]:
    """The ``*.py`` files under ``root`` (default: the stdlib), sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ValueError(f"corpus root {str(root)!r} is not a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune: site-packages is big
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _unit_hash(*parts: object) -> int:
    """A 63-bit integer hash of ``parts``, the same on every platform and run."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _is_heldout(content: bytes, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(content).digest()[:8], "little")
    return h < fraction * 2**64


class ByteCorpus:
    """One split of the stdlib byte corpus, sampled into ``(input, target)`` batches.

    ``seq_len``: bytes per sample. ``split``: ``"train"`` or ``"heldout"``. ``max_bytes``:
    stop reading after this many bytes (both splits together; the default reads a few
    hundred files in well under a second). ``heldout_fraction``: the share of files, by
    content hash, in the held-out split. ``root``: another directory of ``*.py`` files.
    """

    synthetic: ClassVar[bool] = False
    vocab_size: ClassVar[int] = 256

    def __init__(self, *, seq_len: int, split: str = "train", max_bytes: int = 8 << 20,
                 heldout_fraction: float = 0.05, root: str | Path | None = None):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
        self.seq_len, self.split = seq_len, split
        root = Path(root) if root is not None else stdlib_root()
        self.root = root
        self.files: list[str] = []  # relative paths of the files in this split
        chunks: list[bytes] = []
        read = 0
        for path in corpus_files(root):
            if read >= max_bytes:
                break
            content = path.read_bytes()[: max_bytes - read]
            read += len(content)
            if _is_heldout(content, heldout_fraction) == (split == "heldout"):
                self.files.append(path.relative_to(root).as_posix())
                chunks.append(content)
        self.bytes_read = read
        data = b"".join(chunks)
        if len(data) < seq_len + 1:
            raise ValueError(
                f"the {split} split holds {len(data)} bytes of {len(self.files)} files, fewer than "
                f"seq_len + 1 = {seq_len + 1}: raise max_bytes (now {max_bytes}) or heldout_fraction")
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [N], bytes of the split

    def __len__(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return (f"ByteCorpus(split={self.split!r}, files={len(self.files)}, bytes={len(self)}, "
                f"seq_len={self.seq_len}, root={str(self.root)!r})")

    def batch(self, step: int, batch_size: int, *, seed: int = 0,
              device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Batch number ``step``: ``(input, target)``, both int64 [batch_size, seq_len].

        ``target[:, t] == input[:, t + 1]`` and the target's last byte is the one after the
        window. The same ``(seed, step)`` always gives the same batch.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = torch.Generator().manual_seed(_unit_hash("ByteCorpus", self.split, seed, step))
        starts = torch.randint(0, len(self) - self.seq_len, (batch_size,), generator=g)  # [B]
        window = starts[:, None] + torch.arange(self.seq_len + 1)  # [B, S + 1]
        tokens = self.data[window].long()
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


class SyntheticBatches:
    """Random batches for throughput runs, with the same ``batch`` call as :class:`ByteCorpus`.

    ``make(batch_size, generator)`` returns an ``(input, target)`` pair, e.g. a model's
    ``example_batch``. The data is random: ``synthetic`` is True so reports say so.
    """

    synthetic: ClassVar[bool] = True

    def __init__(self, make: Callable[..., tuple[Tensor, Tensor]], *, name: str = "synthetic"):
        self.make, self.name = make, name

    def __repr__(self) -> str:
        return f"SyntheticBatches({self.name!r})"

    def batch(self, step: int, batch_size: int, *, seed: int = 0,
              device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(_unit_hash("SyntheticBatches", self.name, seed, step))
        x, y = self.make(batch_size, generator=g)
        return x.to(device), y.to(device)


def synthetic_tokens(batch_size: int, seq_len: int, vocab_size: int, *,
                     generator: torch.Generator | None = None) -> Tensor:
    """Uniform random token ids, int64 [batch_size, seq_len] (synthetic, for throughput)."""
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)


def synthetic_images(batch_size: int, channels: int, size: int, num_classes: int, *,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Gaussian images [B, C, size, size] and random labels [B] (synthetic, for throughput)."""
    images = torch.randn(batch_size, channels, size, size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images, labels


def mask_tokens(tokens: Tensor, *, mask_token_id: int, mask_prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A masked-LM pair from ``tokens`` [B, S]: ``(input, target)``.

    In every row exactly ``k = max(1, round(mask_prob * S))`` positions, chosen at random,
    become ``mask_token_id`` in the input; the target holds the original token there and
    ``IGNORE_INDEX`` elsewhere. (BERT also swaps 10% of the chosen tokens for random ones
    and keeps 10%; we always mask, which is all a throughput or equivalence run needs.)
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob!r}")
    b, s = tokens.shape
    k = max(1, round(mask_prob * s))
    order = torch.rand(b, s, generator=generator).argsort(dim=1)  # a random permutation per row
    masked = torch.zeros(b, s, dtype=torch.bool).scatter_(1, order[:, :k], True).to(tokens.device)
    inputs = tokens.masked_fill(masked, mask_token_id)
    targets = tokens.masked_fill(~masked, IGNORE_INDEX)
    return inputs, targets
