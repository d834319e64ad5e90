"""The stdlib byte corpus, masked-LM batches and synthetic sources."""

import hashlib

import pytest
import torch

from twobp.data import (IGNORE_INDEX, ByteCorpus, SyntheticBatches, corpus_files, mask_tokens, stdlib_root,
                        synthetic_tokens)

CAP = 1 << 20  # 1 MiB keeps each corpus under 50 ms


def test_corpus_is_the_sorted_stdlib_without_site_packages():
    files = corpus_files()
    rel = [p.relative_to(stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert all(r.endswith(".py") for r in rel)
    assert not any("site-packages" in r or "__pycache__" in r for r in rel)
    assert "os.py" in rel


def test_batches_are_deterministic_and_byte_valued():
    a = ByteCorpus(seq_len=48, max_bytes=CAP)
    b = ByteCorpus(seq_len=48, max_bytes=CAP)
    assert a.files == b.files and torch.equal(a.data, b.data)
    x1, y1 = a.batch(5, 6, seed=3)
    x2, y2 = b.batch(5, 6, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == y1.shape == (6, 48) and x1.dtype == y1.dtype == torch.int64
    assert 0 <= int(x1.min()) and int(x1.max()) < 256 == a.vocab_size
    assert not torch.equal(x1, a.batch(6, 6, seed=3)[0]), "a new step must give new windows"
    assert not torch.equal(x1, a.batch(5, 6, seed=4)[0]), "a new seed must give new windows"
    assert not a.synthetic
    assert (a.data < 128).double().mean() > 0.99  # Python source is nearly all ASCII


def test_targets_are_inputs_shifted_by_one(tmp_path):
    # one file whose next byte is known: b[i + 1] = (b[i] + 1) % 251
    (tmp_path / "a.py").write_bytes(bytes(i % 251 for i in range(5000)))
    corpus = ByteCorpus(seq_len=33, root=tmp_path, heldout_fraction=1e-9)
    assert corpus.files == ["a.py"]
    x, y = corpus.batch(0, 8)
    torch.testing.assert_close(y, (x + 1) % 251)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])


def test_heldout_split_is_disjoint_by_file_and_content():
    train = ByteCorpus(seq_len=64, max_bytes=CAP, heldout_fraction=0.2)
    held = ByteCorpus(seq_len=64, max_bytes=CAP, heldout_fraction=0.2, split="heldout")
    assert train.files and held.files
    assert not set(train.files) & set(held.files)
    assert train.bytes_read == held.bytes_read <= CAP
    assert len(train) + len(held) == train.bytes_read
    root = stdlib_root()
    cut = max(train.files + held.files)  # the last file read may be cut at the cap: its hash differs

    def digests(c):
        return {hashlib.sha256((root / f).read_bytes()).hexdigest() for f in c.files if f != cut}

    assert not digests(train) & digests(held), "identical file contents in both splits"
    assert not torch.equal(train.batch(0, 2)[0], held.batch(0, 2)[0])


def test_cap_limits_bytes_read():
    small = ByteCorpus(seq_len=8, max_bytes=50_000)
    assert small.bytes_read == 50_000 and len(small) <= 50_000


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        ByteCorpus(seq_len=8, split="test", max_bytes=CAP)
    with pytest.raises(ValueError, match="seq_len"):
        ByteCorpus(seq_len=0)
    with pytest.raises(ValueError, match="max_bytes"):
        ByteCorpus(seq_len=8, max_bytes=1000, split="heldout")
    with pytest.raises(ValueError, match="not a directory"):
        ByteCorpus(seq_len=8, root=tmp_path / "missing")
    with pytest.raises(ValueError, match="batch_size"):
        ByteCorpus(seq_len=8, max_bytes=CAP).batch(0, 0)


def test_skipped_directories(tmp_path):
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "x.py").write_text("x = 1\n" * 100)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("b = 2\n" * 100)
    (tmp_path / "a.py").write_text("a = 1\n" * 100)
    (tmp_path / "notes.txt").write_text("not python")
    assert [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)] == ["a.py", "pkg/b.py"]


def test_mask_tokens_masks_the_same_count_per_row():
    g = torch.Generator().manual_seed(0)
    tokens = synthetic_tokens(5, 40, 200, generator=g) + 1  # never 0, the mask id
    x, y = mask_tokens(tokens, mask_token_id=0, mask_prob=0.15, generator=g)
    masked = y != IGNORE_INDEX
    assert (masked.sum(1) == 6).all()  # round(0.15 * 40)
    assert torch.equal(x == 0, masked)
    assert torch.equal(y[masked], tokens[masked]) and torch.equal(x[~masked], tokens[~masked])
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(tokens, mask_token_id=0, mask_prob=0.0)


def test_synthetic_batches_are_labelled_and_deterministic():
    src = SyntheticBatches(lambda b, generator: (synthetic_tokens(b, 4, 10, generator=generator),) * 2,
                           name="toy")
    assert src.synthetic
    assert torch.equal(src.batch(3, 2, seed=1)[0], src.batch(3, 2, seed=1)[0])
    assert not torch.equal(src.batch(3, 2, seed=1)[0], src.batch(4, 2, seed=1)[0])
