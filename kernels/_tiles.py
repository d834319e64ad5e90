"""Tile orders shared by the GEMM-shaped kernels (linear, linear_tma, conv)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["grouped_tile"]


@triton.jit
def grouped_tile(
    pid,  # linear tile id
    num_pid_rows,  # tile rows of the output
    num_pid_cols,  # tile columns of the output
    GROUP_SIZE: tl.constexpr,  # tile rows per group
):
    """Map a linear tile id to a (row block, column block), GROUP_SIZE row blocks at a time,
    so tiles computed together share the same column blocks of the right operand in L2.

    Row-major order would walk one row of tiles across all columns, reading every column
    block of B once per tile row; in groups of GROUP_SIZE rows, consecutive tiles reuse
    GROUP_SIZE rows of A and the same column block of B.
    """
    num_pid_in_group = GROUP_SIZE * num_pid_cols
    group_id = pid // num_pid_in_group
    first_pid_row = group_id * GROUP_SIZE
    group_rows = min(num_pid_rows - first_pid_row, GROUP_SIZE)  # the last group may be short
    pid_row = first_pid_row + (pid % num_pid_in_group) % group_rows
    pid_col = (pid % num_pid_in_group) // group_rows
    return pid_row, pid_col
