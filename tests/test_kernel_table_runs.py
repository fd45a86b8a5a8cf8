"""kernels.table_runs (the pool-backed decode's slot list: each selected block's run through the block
table) equals its torch statement and a plain loop, bit for bit; on the CPU through the interpreter,
on a GPU through the compiled kernel (the same test)."""

from __future__ import annotations

import pytest
import torch

from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels._dispatch import interpret_mode
from nosa_sglang.kernels.table_runs import table_run_ids, table_run_ids_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(gen, R, max_blocks, B, H, K, table_dtype):
    table = torch.randint(0, 10_000, (R, max_blocks), generator=gen).to(table_dtype)
    rows = torch.randperm(R, generator=gen)[:B]  # any rows, in any order
    blocks = torch.randint(0, max_blocks, (B, H, K), generator=gen)
    blocks[torch.rand(B, H, K, generator=gen) < 0.3] = -1  # unselected entries
    return table.to(DEVICE), rows.to(DEVICE), blocks.to(DEVICE)


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("R, max_blocks, B, H, K", [(6, 40, 4, 2, 8), (3, 200, 3, 8, 64), (1, 5, 1, 1, 3)])
def test_kernel_equals_torch_statement_and_a_loop(gen, table_dtype, R, max_blocks, B, H, K):
    if DEVICE == "cpu" and not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by the test command on machines without CUDA)")
    table, rows, blocks = case(gen, R, max_blocks, B, H, K, table_dtype)
    counts = torch.full((R, H), -7, dtype=torch.long, device=DEVICE)
    got = table_run_ids(table, rows, blocks, impl="triton", counts=counts)
    assert got.dtype == torch.long and torch.equal(got, table_run_ids_torch(table, rows, blocks))
    want = torch.full_like(counts, -7)
    want[rows] = (blocks >= 0).sum(dim=2)  # each listed row's count per head, the other rows untouched
    assert torch.equal(counts, want)
    counts_torch = torch.full_like(counts, -7)
    table_run_ids(table, rows, blocks, impl="torch", counts=counts_torch)
    assert torch.equal(counts_torch, want)
    t, r, bl = table.cpu(), rows.cpu(), blocks.cpu()
    for b in range(B):
        for h in range(H):
            for k in range(K):
                blk = int(bl[b, h, k])
                assert int(got[b, h, k]) == (-1 if blk < 0 else int(t[r[b], blk]) * H + h)


def test_strided_blocks_and_table_rows_view(gen):
    """A transposed block list and a table slice (not contiguous) read the same as their copies."""
    if DEVICE == "cpu" and not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1")
    table, rows, blocks = case(gen, 8, 30, 5, 4, 6, torch.int32)
    blocks_t = blocks.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.stack((table, -table), dim=2).view(table.shape[0], -1)[:, ::2]  # the table, column stride 2
    assert wide.stride(1) == 2
    assert torch.equal(table_run_ids(wide, rows, blocks_t, impl="triton"), table_run_ids_torch(table, rows, blocks))


@pytest.mark.parametrize("call, match", [
    (lambda: table_run_ids(torch.zeros(2, 3), torch.zeros(1, dtype=torch.long),
                           torch.zeros(1, 1, 1, dtype=torch.long)), "table"),
    (lambda: table_run_ids(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.long),
                           torch.zeros(1, 1, 1, dtype=torch.long)), r"rows: expected \[1\]"),
    (lambda: table_run_ids(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(1, dtype=torch.long),
                           torch.zeros(1, 1, dtype=torch.long)), "blocks"),
    (lambda: table_run_ids(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(1, dtype=torch.long),
                           torch.zeros(1, 2, 1, dtype=torch.long), counts=torch.zeros(2, 3, dtype=torch.long)),
     r"counts: expected an int64 \[rows, 2\]"),
])
def test_argument_errors_name_the_argument(call, match):
    with pytest.raises(KernelArgumentError, match=match):
        call()
