"""HostKVStore: the run layout contract, refcounted all-or-nothing allocation, the capacity limit."""

from __future__ import annotations

import os

import pytest
import torch

from nosa_sglang.runtime import HostKVStore, HostMemoryExhausted


def store(blocks: int = 8, layers: int = 2, heads: int = 2, d: int = 4, bs: int = 4) -> HostKVStore:
    block_bytes = 2 * layers * heads * bs * d * 4
    return HostKVStore(layers, heads, d, bs, torch.float32, blocks * block_bytes)


def test_capacity_in_bytes_gives_whole_blocks():
    s = store(blocks=8)
    assert s.num_blocks == 8 and s.free_blocks == 8 and s.used_blocks == 0
    assert s.layer_k(0).shape == (8 * 2, 4 * 4) and s.layer_v(1).is_contiguous()


def test_too_small_capacity_is_rejected():
    with pytest.raises(ValueError, match="capacity_bytes"):
        HostKVStore(2, 2, 4, 4, torch.float32, 10)


def test_one_block_and_head_is_one_contiguous_run():
    """Run id block * Hkv + head holds block_size x head_dim elements of that head, in token order."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    g = torch.Generator().manual_seed(seed)
    s = store()
    ids = s.allocate(3)
    k = torch.randn(3 * 4, 2, 4, generator=g)
    v = torch.randn(3 * 4, 2, 4, generator=g)
    s.write_block_tokens(1, ids, k, v)
    for i, b in enumerate(ids):
        for h in range(2):
            run = s.layer_k(1)[b * 2 + h].view(4, 4)
            torch.testing.assert_close(run, k[i * 4 : (i + 1) * 4, h])
    rk, rv = s.read_block_tokens(1, ids)
    torch.testing.assert_close(rk, k)
    torch.testing.assert_close(rv, v)


def test_allocation_is_all_or_nothing():
    s = store(blocks=4)
    s.allocate(3)
    before = (s.free_blocks, s.used_blocks, [s.refcount(b) for b in range(4)])
    with pytest.raises(HostMemoryExhausted) as err:
        s.allocate(2)
    assert err.value.requested_blocks == 2 and err.value.free_blocks == 1
    assert (s.free_blocks, s.used_blocks, [s.refcount(b) for b in range(4)]) == before
    assert s.try_allocate(2) is None


def test_shared_blocks_are_freed_by_the_last_reference():
    s = store(blocks=4)
    ids = s.allocate(2)
    s.share(ids)
    assert [s.refcount(b) for b in ids] == [2, 2]
    assert s.release(ids) == 0 and s.free_blocks == 2
    assert s.release(ids) == 2 and s.free_blocks == 4


def test_share_of_a_free_block_is_an_error():
    s = store(blocks=4)
    with pytest.raises(ValueError, match="block_ids"):
        s.share([3])


def test_capacity_limit_caps_new_allocations_only():
    s = store(blocks=8)
    ids = s.allocate(5)
    s.set_limit_bytes(3 * s.block_bytes)
    assert s.free_blocks == 0 and s.capacity_bytes == 3 * s.block_bytes
    with pytest.raises(HostMemoryExhausted):
        s.allocate(1)
    s.release(ids[:3])
    assert s.free_blocks == 1
    s.set_limit_bytes(0)
    assert s.free_blocks == 6


def test_preallocated_buffer_is_carved():
    buf = torch.zeros(10_000, dtype=torch.uint8)
    s = HostKVStore(1, 2, 4, 4, torch.float32, 4 * 256, buffer=buf)
    assert s.num_blocks == 4
    s.layer_k(0).fill_(1.0)
    assert buf[:512].view(torch.float32).eq(1.0).all()


def test_a_server_page_pool_as_storage_counts_references_and_allocates_nothing():
    from nosa_sglang.runtime.page_pool import PagePool

    pool = PagePool(2, 2, 4, 4, torch.float32, num_pages=6, device="cpu", host=True)
    s = HostKVStore(2, 2, 4, 4, torch.float32, 0, storage=pool.kv)
    assert s.external and s.num_blocks == 6 and s.used_blocks == 0
    assert s.layer_k(1).data_ptr() == pool.kv[0, 1].data_ptr()  # the pool's memory, not a copy
    with pytest.raises(ValueError, match="allocate: the blocks of an external storage belong to the server"):
        s.allocate(1)
    s.adopt([1, 2, 2])
    assert s.used_blocks == 2 and s.refcount(2) == 2
    with pytest.raises(ValueError, match=r"block_ids: 6 is not a block of \[0, 6\)"):
        s.adopt([3, 6])
    assert s.used_blocks == 2 and s.refcount(3) == 0  # a refused adopt changes nothing
    assert s.release([2]) == 0 and s.release([1, 2]) == 2 and s.used_blocks == 0
    with pytest.raises(ValueError, match="storage: expected a host tensor"):
        HostKVStore(2, 2, 4, 4, torch.bfloat16, 0, storage=pool.kv)
    with pytest.raises(ValueError, match="adopt: only for an external storage"):
        store().adopt([0])
