"""Launch classes and early config pruning (twobp.kernels._targets), without a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from twobp.kernels import _targets as T  # noqa: E402


def _c(bm, warps=4, stages=3):
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


A, B, C = _c(128, 8), _c(64), _c(32)
TABLE = T.ConfigTable({("sm_90", "16-bit"): [A, B], ("sm_80", "16-bit"): [B, C],
                       ("sm_90", "fp32"): [C], ("sm_80", "fp32"): [C]})


def test_union_keeps_first_seen_order_without_duplicates():
    assert [T.config_key(c) for c in TABLE.configs] == [T.config_key(c) for c in (A, B, C)]


def test_select_keeps_the_class_list_in_the_autotuners_order():
    assert TABLE.select(TABLE.configs, ("sm_80", "16-bit")) == [B, C]
    assert TABLE.select(TABLE.configs, ("sm_90", "fp32")) == [C]
    assert TABLE.select(TABLE.configs, None) == TABLE.configs  # the interpreter: no architecture


def test_unknown_class_and_empty_list_are_named():
    with pytest.raises(ValueError, match=r"no autotune configs for launch class \('sm_75', '16-bit'\)"):
        TABLE.select(TABLE.configs, ("sm_75", "16-bit"))
    with pytest.raises(ValueError, match="empty"):
        T.ConfigTable({("sm_90", "fp32"): []})


def test_interpreter_list_replaces_the_candidates():
    t = T.ConfigTable({("sm_90", "16-bit"): [A]}, interpret=[C])
    assert t.configs == [C] and t.select([C], ("sm_90", "16-bit")) == [C]


def test_make_prune_by_target_dtype_extra_and_size(monkeypatch):
    monkeypatch.delenv("TWOBP_AUTOTUNE_MAX_CONFIGS", raising=False)
    lists = {(a, d, hd): [A, B, C] if hd == 64 else [B, C] for a in T.ARCHS for d in ("16-bit", "fp32")
             for hd in (64, 128)}
    table = T.ConfigTable(lists)
    prune = T.make_prune(table, "q", extra=lambda m: (m["HD"],),
                         by_size=lambda cs, m: [c for c in cs if c.kwargs["BLOCK_M"] <= m["S"]] or cs[-1:])
    q = torch.empty(1, dtype=torch.float16)
    assert prune(table.configs, {"q": q, "S": 1024}, _arch="sm_90", HD=128) == [B, C]
    assert prune(table.configs, {"q": q, "S": 1024}, _arch="sm_90", HD=64) == [A, B, C]
    assert prune(table.configs, {"q": q, "S": 40}, _arch="sm_80", HD=64) == [C]
    assert prune.for_class(table.configs, {"q": q, "S": 40}, _arch="sm_80", HD=64) == [A, B, C]
    # CPU tensors (the interpreter) have no architecture: nothing pruned by class
    assert prune(table.configs, {"q": q, "S": 1024}, HD=128) == [A, B, C]
    monkeypatch.setenv("TWOBP_AUTOTUNE_MAX_CONFIGS", "2")
    assert prune(table.configs, {"q": q, "S": 1024}, _arch="sm_90", HD=64) == [A, B]
    monkeypatch.setenv("TWOBP_AUTOTUNE_MAX_CONFIGS", "zero")
    with pytest.raises(ValueError, match="TWOBP_AUTOTUNE_MAX_CONFIGS must be a positive integer"):
        prune(table.configs, {"q": q, "S": 1024}, _arch="sm_90", HD=64)


def test_classes_of_the_kernel_tables_cover_every_launch():
    """Every autotuned kernel has a list for each architecture and dtype class it can launch in."""
    from twobp.kernels import attention, conv, linear, linear_tma

    for table in (linear._FWD_TABLE, linear._DX_TABLE, conv._FWD_TABLE, conv._DX_TABLE, conv._DW_TABLE):
        assert {k[:2] for k in table.keys()} == {(a, d) for a in T.ARCHS for d in ("16-bit", "fp32")}
    assert {k for k in linear._DW_TABLE.keys()} >= {(a, "16-bit", g) for a in T.ARCHS
                                                    for g in ("input-grad", "fp32-grad")}
    for table in (attention._FWD_TABLE, attention._DQ_TABLE, attention._DKDV_TABLE):
        assert {k for k in table.keys()} == {(a, d, hd) for a in T.ARCHS for d in ("16-bit", "fp32")
                                             for hd in (16, 32, 64, 128)}
    # the TMA kernels are Hopper's: only sm_90 classes
    assert {k[0] for k in linear_tma._MM_TABLE.keys()} == {"sm_90"}
    # wgmma needs 64 rows per warpgroup: no 32-row dot tile in an sm_90 16-bit list
    assert all(c.kwargs["BLOCK_SIZE_M"] >= 64 for c in linear._FWD_TABLE.lists[("sm_90", "16-bit")])
    assert all(c.kwargs["BLOCK_SIZE_N"] >= 64 for c in conv._FWD_TABLE.lists[("sm_90", "16-bit")])


def test_arch_of_cpu_is_none():
    assert T.arch_of(torch.device("cpu")) is None
    assert T.dtype_class(torch.bfloat16) == T.dtype_class(torch.float16) == "16-bit"
    assert T.dtype_class(torch.float32) == "fp32"
