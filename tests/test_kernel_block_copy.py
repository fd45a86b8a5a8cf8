"""gather_runs / scatter_runs move exactly the runs asked for, in every mode, and reject bad calls.

CPU: the zero-copy Triton kernel under TRITON_INTERPRET=1 (CPU tensors stand in for host and GPU), the
'cpu' index_copy path, and the copy-engine span logic through its torch backend. GPU (marked): real
pinned memory, both modes, every copy backend, pageable-memory rejection, 16-byte loads in the PTX.
"""

from __future__ import annotations

import os
import re

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from nosa_sglang.kernels._checks import KernelArgumentError, triton_interpreting
from nosa_sglang.kernels.block_copy import (
    MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, SKIPS_NEGATIVE_IDS, TARGET_PROGRAMS, _copy_runs_kernel, gather_store_runs,
    gather_runs, launch_zero_copy, scatter_runs, zero_copy_launch_config,
)
from nosa_sglang.kernels.copy_engine import batch_memcpy_available, coalesce_runs, copy_spans
from nosa_sglang.kernels.pinned import alloc_pinned, pinned_mode

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run through the device tool)")
NAN = float("nan")


def cpu_mode(mode: str) -> str:
    if mode == "zero_copy" and not HAS_CUDA and not triton_interpreting(_copy_runs_kernel):
        pytest.fail("kernels were imported before TRITON_INTERPRET=1 was set; set it in tests/conftest.py")
    return mode


def store(gen, runs: int, run_elems: int, dtype: torch.dtype, pinned: bool = False) -> torch.Tensor:
    data = torch.randn(runs, run_elems, generator=gen).to(dtype)
    if not pinned:
        return data
    t = alloc_pinned(data.shape, dtype)
    t.copy_(data)
    return t


def poisoned(runs: int, run_elems: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return torch.full((runs, run_elems), NAN, dtype=dtype, device=device)


def assert_copied(dst: torch.Tensor, dst_ids: torch.Tensor, src: torch.Tensor, src_ids: torch.Tensor) -> None:
    dst, dst_ids, src_ids = dst.cpu(), dst_ids.cpu().long(), src_ids.cpu().long()
    assert torch.equal(dst[dst_ids], src.cpu()[src_ids]), "a run differs from torch indexing"
    untouched = torch.ones(dst.shape[0], dtype=torch.bool)
    untouched[dst_ids] = False
    assert dst[untouched].isnan().all(), "a run outside dst_ids was written"


def random_ids(gen, n: int, src_runs: int, dst_runs: int, dtype=torch.int64):
    return torch.randperm(src_runs, generator=gen)[:n].to(dtype), torch.randperm(dst_runs, generator=gen)[:n].to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mode", ["zero_copy", "cpu"])
def test_gather_equals_indexing(gen, mode, d, dtype):
    run = 64 * d
    hk, hv = store(gen, 40, run, dtype), store(gen, 40, run, dtype)
    gk, gv = poisoned(16, run, dtype), poisoned(16, run, dtype)
    src, dst = random_ids(gen, 9, 40, 16)
    res = gather_runs(hk, hv, src, gk, gv, dst, mode=cpu_mode(mode))
    assert_copied(gk, dst, hk, src)
    assert_copied(gv, dst, hv, src)
    assert res.runs == 9 and res.bytes == 2 * 9 * run * hk.element_size()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gather_of_one_store_reads_each_run_once_and_equals_indexing(gen, dtype):
    """gather_store_runs: one store (K or V) alone through the pair-moving kernel, as half runs of two shifted views (the last
    run, SGLang's trash run, included); repeats allowed, odd run sizes refused."""
    cpu_mode("zero_copy")
    hk = store(gen, 40, 64 * 16, dtype)
    src = torch.cat((torch.randperm(39, generator=gen)[:12], torch.tensor([39, 3, 3])))
    assert torch.equal(gather_store_runs(hk, src, "cpu"), hk[src])
    assert gather_store_runs(hk, src[:0], "cpu").shape == (0, 64 * 16)
    skipped = torch.tensor([5, -1, 39, -1])  # a negative id reads nothing: its row is zeros
    got = gather_store_runs(hk, skipped, "cpu")
    assert torch.equal(got[0::2], hk[[5, 39]]) and not got[1::2].any()
    with pytest.raises(KernelArgumentError, match="host: run_elems 63 must be even"):
        gather_store_runs(store(gen, 4, 63, dtype), src[:2], "cpu")


@gpu
@needs_cuda
def test_gather_of_one_store_from_pinned_memory_on_cuda(gen):
    hk = store(gen, 300, 64 * 128, torch.bfloat16, pinned=True)
    src = torch.randint(0, 300, (77,), generator=gen)
    assert torch.equal(gather_store_runs(hk, src, "cuda").cpu(), hk[src])


@pytest.mark.parametrize("mode", ["zero_copy", "cpu"])
def test_scatter_equals_indexing(gen, mode):
    run = 64 * 64
    gk, gv = store(gen, 16, run, torch.bfloat16), store(gen, 16, run, torch.bfloat16)
    hk, hv = poisoned(40, run, torch.bfloat16), poisoned(40, run, torch.bfloat16)
    src, dst = random_ids(gen, 5, 16, 40, torch.int32)
    scatter_runs(gk, gv, src, hk, hv, dst, mode=cpu_mode(mode))
    assert_copied(hk, dst, gk, src)
    assert_copied(hv, dst, gv, src)


@pytest.mark.parametrize("mode", ["zero_copy", "cpu"])
def test_empty_id_list_writes_nothing(gen, mode):
    hk, hv = store(gen, 8, 256, torch.float16), store(gen, 8, 256, torch.float16)
    gk, gv = poisoned(4, 256, torch.float16), poisoned(4, 256, torch.float16)
    empty = torch.zeros(0, dtype=torch.int64)
    assert gather_runs(hk, hv, empty, gk, gv, empty, mode=cpu_mode(mode)).copies == 0
    assert gk.isnan().all() and gv.isnan().all()


def test_repeated_source_is_allowed(gen):
    hk, hv = store(gen, 8, 512, torch.float32), store(gen, 8, 512, torch.float32)
    gk, gv = poisoned(4, 512, torch.float32), poisoned(4, 512, torch.float32)
    src, dst = torch.tensor([3, 3, 5]), torch.tensor([0, 2, 1])
    gather_runs(hk, hv, src, gk, gv, dst, mode=cpu_mode("zero_copy"))
    assert_copied(gk, dst, hk, src)


def test_zero_copy_skips_negative_src_ids(gen):
    """Padding entries (src < 0) move nothing, even when their dst ids repeat (the runtime's trash slot)."""
    assert SKIPS_NEGATIVE_IDS
    hk, hv = store(gen, 12, 512, torch.bfloat16), store(gen, 12, 512, torch.bfloat16)
    gk, gv = poisoned(6, 512, torch.bfloat16), poisoned(6, 512, torch.bfloat16)
    src, dst = torch.tensor([-1, 7, -1, 2, -5]), torch.tensor([5, 0, 5, 3, 5])
    gather_runs(hk, hv, src, gk, gv, dst, mode=cpu_mode("zero_copy"))
    live = src >= 0
    assert_copied(gk, dst[live], hk, src[live])
    assert_copied(gv, dst[live], hv, src[live])


def test_cpu_mode_rejects_negative_src_ids(gen):
    with pytest.raises(KernelArgumentError, match=r"^src_ids: ids must lie in \[0, 10\)"):
        _call(gen, src_ids=torch.tensor([-1, 2]), mode="cpu")


def test_small_runs_split_into_chunks_cover_every_word(gen):
    """One run of 16 KiB is split over several programs (few misses must still fill the GPU)."""
    hk, hv = store(gen, 4, 8192, torch.bfloat16), store(gen, 4, 8192, torch.bfloat16)
    gk, gv = poisoned(2, 8192, torch.bfloat16), poisoned(2, 8192, torch.bfloat16)
    src, dst = torch.tensor([2]), torch.tensor([1])
    assert zero_copy_launch_config(1, 16384)[1] * 4 < 16384
    gather_runs(hk, hv, src, gk, gv, dst, mode=cpu_mode("zero_copy"))
    assert_copied(gk, dst, hk, src)
    assert_copied(gv, dst, hv, src)


@pytest.mark.parametrize("programs", [1, 3, 7, 0, None], ids=["1", "3", "7", "unbounded", "default"])
def test_bounded_grid_programs_stride_over_every_item(gen, programs):
    """Fewer programs than items (each loops over items t, t + P, ...): every chunk of every live run
    lands, padding moves nothing, and nothing outside the dst runs is written."""
    from nosa_sglang.kernels._dispatch import interpret_mode

    if not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    hk, hv = store(gen, 12, 8192, torch.bfloat16), store(gen, 12, 8192, torch.bfloat16)
    gk, gv = poisoned(8, 8192, torch.bfloat16), poisoned(8, 8192, torch.bfloat16)
    src, dst = torch.tensor([4, -1, 11, 0, -1, 7]), torch.tensor([6, 7, 1, 3, 7, 0])
    assert zero_copy_launch_config(src.numel(), 16384)[1] * 4 < 16384  # several chunks per run
    launch_zero_copy(hk, hv, gk, gv, src, dst, programs=programs)
    live = src >= 0
    assert_copied(gk, dst[live], hk, src[live])
    assert_copied(gv, dst[live], hv, src[live])
    untouched = torch.ones(8, dtype=torch.bool)
    untouched[dst[live]] = False
    assert torch.isnan(gk[untouched].float()).all() and torch.isnan(gv[untouched].float()).all()


@pytest.mark.parametrize("programs", [1, 2, None], ids=["1", "2", "default"])
def test_tiles_of_padding_are_skipped_and_live_entries_after_them_copied(gen, programs):
    """A long, mostly padded list (the runtime's miss list): whole tiles of padding before, between and
    after live entries; a program owns several tiles."""
    from nosa_sglang.kernels._dispatch import interpret_mode
    from nosa_sglang.kernels.block_copy import ID_TILE

    if not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    n = 5 * ID_TILE
    hk, hv = store(gen, 40, 512, torch.float32), store(gen, 40, 512, torch.float32)
    gk, gv = poisoned(n, 512, torch.float32), poisoned(n, 512, torch.float32)
    src = torch.full((n,), -1, dtype=torch.int64)
    live = torch.tensor([5, 2 * ID_TILE + 1, 2 * ID_TILE + 2, n - 1])
    src[live] = torch.randint(0, 40, (len(live),), generator=gen)
    dst = torch.randperm(n, generator=gen)
    launch_zero_copy(hk, hv, gk, gv, src, dst, programs=programs)
    assert_copied(gk, dst[live], hk, src[live])
    assert_copied(gv, dst[live], hv, src[live])
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[dst[live]] = False
    assert torch.isnan(gk[untouched]).all() and torch.isnan(gv[untouched]).all()


@pytest.mark.parametrize("programs", [1, 3, None], ids=["1", "3", "default"])
def test_fully_live_tiles_copy_every_entry(gen, programs):
    """Tiles whose 64 entries are all live (the live-entry loop runs its full length), program ranges that
    end inside a tile, one padding entry in the last tile."""
    from nosa_sglang.kernels._dispatch import interpret_mode
    from nosa_sglang.kernels.block_copy import ID_TILE

    if not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    n = 2 * ID_TILE + 5
    hk, hv = store(gen, 3 * n, 128, torch.float32), store(gen, 3 * n, 128, torch.float32)
    gk, gv = poisoned(n, 128, torch.float32), poisoned(n, 128, torch.float32)
    src, dst = torch.randperm(3 * n, generator=gen)[:n], torch.randperm(n, generator=gen)
    src[-2] = -1
    launch_zero_copy(hk, hv, gk, gv, src, dst, programs=programs)
    live = src >= 0
    assert_copied(gk, dst[live], hk, src[live])
    assert_copied(gv, dst[live], hv, src[live])
    assert torch.isnan(gk[dst[~live]]).all() and torch.isnan(gv[dst[~live]]).all()


@pytest.mark.parametrize("n_runs", [1, 16, 256, 32768])
@pytest.mark.parametrize("run_bytes", [8192, 16384, 6 * 1024, 8190])
def test_launch_config_tiles_each_run(n_runs, run_bytes):
    word, chunk, num_warps = zero_copy_launch_config(n_runs, run_bytes)
    assert (run_bytes // word) % chunk == 0 and chunk * word <= MAX_CHUNK_BYTES and 1 <= num_warps <= 8
    if run_bytes in (8192, 16384):  # the real run sizes: enough programs, as large as that allows
        assert n_runs * (run_bytes // word // chunk) >= TARGET_PROGRAMS or chunk * word == MIN_CHUNK_BYTES
        if n_runs >= TARGET_PROGRAMS:
            assert chunk * word == min(run_bytes, MAX_CHUNK_BYTES)


def test_coalesce_merges_runs_consecutive_on_both_sides():
    spans = coalesce_runs(np.array([7, 5, 6, 9, 10]), np.array([2, 0, 1, 3, 8]))
    assert spans.src_start.tolist() == [5, 9, 10]
    assert spans.dst_start.tolist() == [0, 3, 8]
    assert spans.length.tolist() == [3, 1, 1]


def test_coalesced_spans_cover_exactly_the_pairs(gen):
    src = torch.randint(0, 50, (200,), generator=gen).numpy()
    dst = torch.randperm(400, generator=gen)[:200].numpy()
    src[:40], dst[:40] = np.arange(100, 140), np.arange(300, 340) + 60  # a long mergeable stretch
    spans = coalesce_runs(src, dst)
    pairs = {(int(s) + i, int(d) + i) for s, d, n in zip(*spans) for i in range(n)}
    assert pairs == set(zip(src.tolist(), dst.tolist())) and len(spans.length) < 200


def test_copy_engine_spans_on_cpu_tensors(gen):
    """The span copy loop itself, through the torch backend (runs on CPU tensors)."""
    hk, hv = store(gen, 30, 128, torch.float32), store(gen, 30, 128, torch.float32)
    gk, gv = poisoned(12, 128, torch.float32), poisoned(12, 128, torch.float32)
    src, dst = torch.tensor([4, 5, 6, 20, 1]), torch.tensor([7, 8, 9, 0, 11])
    copies = copy_spans((hk, hv), (gk, gv), coalesce_runs(src.numpy(), dst.numpy()), "torch", None)
    assert copies == 2 * 3
    assert_copied(gk, dst, hk, src)
    assert_copied(gv, dst, hv, src)


def test_cpu_machine_gives_plain_memory():
    if HAS_CUDA:
        pytest.skip("CUDA present: pinned_mode is not 'cpu'")
    t = alloc_pinned((5, 7), torch.bfloat16)
    assert pinned_mode() == "cpu" and t.shape == (5, 7) and t.dtype == torch.bfloat16


def _call(gen, **change):
    kw = dict(host_k=store(gen, 10, 64, torch.float32), host_v=store(gen, 10, 64, torch.float32),
              src_ids=torch.tensor([1, 2]), gpu_k=poisoned(4, 64, torch.float32),
              gpu_v=poisoned(4, 64, torch.float32), dst_ids=torch.tensor([0, 3]), mode="cpu")
    kw.update(change)
    return gather_runs(**kw)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dst_ids=torch.tensor([1, 1])), r"^dst_ids: duplicate"),
        (dict(src_ids=torch.tensor([1, 10])), r"^src_ids: ids must lie in \[0, 10\)"),
        (dict(dst_ids=torch.tensor([0, 4])), r"^dst_ids: ids must lie in \[0, 4\)"),
        (dict(src_ids=torch.tensor([-1, 2])), r"^src_ids: ids must lie in \[0, 10\)"),
        (dict(dst_ids=torch.tensor([0, 1, 2])), r"^dst_ids: length 3"),
        (dict(src_ids=torch.tensor([1.0, 2.0])), r"^src_ids: dtype"),
        (dict(src_ids=torch.tensor([[1, 2]])), r"^src_ids: expected 1 dims"),
        (dict(gpu_k=poisoned(4, 64, torch.bfloat16)), r"^gpu_k: dtype"),
        (dict(gpu_v=poisoned(4, 32, torch.float32)), r"^gpu_v: run_elems"),
        (dict(gpu_v=poisoned(5, 64, torch.float32)), r"^gpu_v: shape"),
        (dict(gpu_k=poisoned(64, 4, torch.float32).t()), r"^gpu_k: must be contiguous"),
        (dict(host_k=torch.randn(10, 8, 8)), r"^host_k: expected 2 dims"),
        (dict(mode="dma"), r"^mode: expected one of"),
        (dict(mode="copy_engine"), r"^gpu_k: mode 'copy_engine' needs a CUDA tensor"),
        (dict(host_k=torch.randn(10, 64, device="meta")), r"^host_k: the host store must be a CPU tensor"),
    ],
    ids=["dup_dst", "src_range", "dst_range", "src_negative", "length", "id_dtype", "id_dims", "dtype",
         "run_elems", "kv_shape", "noncontig", "ndim", "mode", "copy_engine_on_cpu", "host_device"],
)
def test_bad_argument_is_named(gen, change, message):
    with pytest.raises(KernelArgumentError, match=message):
        _call(gen, **change)


@pytest.mark.parametrize("mode", ["zero_copy", "cpu"])
def test_rejected_call_writes_nothing(gen, mode):
    gk = poisoned(4, 64, torch.float32)
    with pytest.raises(KernelArgumentError):
        _call(gen, gpu_k=gk, dst_ids=torch.tensor([0, 9]), mode=cpu_mode(mode))
    assert gk.isnan().all()


# ----------------------------------------------------------------------------------------- GPU


@pytest.fixture
def real_store(gen):
    """8 KiB/16 KiB runs (d 64/128, bf16) in CuPy-pinned memory, 2048 host runs, 512 slots."""
    def make(d: int):
        run = 64 * d
        hk, hv = store(gen, 2048, run, torch.bfloat16, True), store(gen, 2048, run, torch.bfloat16, True)
        gk, gv = poisoned(512, run, torch.bfloat16, "cuda"), poisoned(512, run, torch.bfloat16, "cuda")
        return hk, hv, gk, gv
    return make


BACKENDS = [("zero_copy", "auto"), ("copy_engine", "cupy"), ("copy_engine", "torch"), ("copy_engine", "batch")]


def _ids_for(mode: str, ids: torch.Tensor) -> torch.Tensor:
    return ids.cuda() if mode == "zero_copy" else ids


@gpu
@needs_cuda
@pytest.mark.parametrize("mode, backend", BACKENDS, ids=[f"{m}-{b}" for m, b in BACKENDS])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_gather_and_scatter(gen, real_store, d, mode, backend):
    if backend == "batch" and not batch_memcpy_available():
        pytest.skip("cudaMemcpyBatchAsync not available (CUDA < 12.8)")
    assert pinned_mode() == "cupy"
    hk, hv, gk, gv = real_store(d)
    src, dst = random_ids(gen, 300, 2048, 512)
    src[:50], dst[:50] = torch.arange(1000, 1050), torch.arange(100, 150)  # coalescible stretch
    rest = torch.tensor([i for i in torch.randperm(512, generator=gen).tolist() if not 100 <= i < 150][:250])
    dst[50:] = rest  # destinations stay unique
    stream = torch.cuda.Stream()
    gather_runs(hk, hv, _ids_for(mode, src), gk, gv, _ids_for(mode, dst), mode=mode, stream=stream,
                copy_backend=backend)
    stream.synchronize()
    assert_copied(gk, dst, hk, src)
    assert_copied(gv, dst, hv, src)
    back_k, back_v = alloc_pinned(hk.shape, hk.dtype).fill_(NAN), alloc_pinned(hv.shape, hv.dtype).fill_(NAN)
    host_dst = torch.randperm(2048, generator=gen)[:300]
    scatter_runs(gk, gv, _ids_for(mode, dst), back_k, back_v, _ids_for(mode, host_dst), mode=mode,
                 stream=stream, copy_backend=backend)
    stream.synchronize()
    assert_copied(back_k, host_dst, gk, dst)
    assert_copied(back_v, host_dst, gv, dst)


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["zero_copy", "copy_engine"])
def test_gpu_pageable_host_memory_is_rejected(gen, mode):
    hk, hv = store(gen, 64, 4096, torch.bfloat16), store(gen, 64, 4096, torch.bfloat16)
    gk, gv = poisoned(8, 4096, torch.bfloat16, "cuda"), poisoned(8, 4096, torch.bfloat16, "cuda")
    ids = torch.tensor([1, 2])
    with pytest.raises(KernelArgumentError, match=r"^host_k: must be pinned"):
        gather_runs(hk, hv, _ids_for(mode, ids), gk, gv, _ids_for(mode, ids), mode=mode)


@gpu
@needs_cuda
def test_gpu_copy_engine_rejects_cuda_ids(gen, real_store):
    hk, hv, gk, gv = real_store(64)
    with pytest.raises(KernelArgumentError, match=r"^src_ids: copy_engine needs CPU ids"):
        gather_runs(hk, hv, torch.tensor([1], device="cuda"), gk, gv, torch.tensor([0]), mode="copy_engine")


@gpu
@needs_cuda
def test_gpu_zero_copy_accepts_cpu_ids_and_uses_16_byte_loads(gen, real_store):
    hk, hv, gk, gv = real_store(128)
    src, dst = random_ids(gen, 64, 2048, 512)
    gather_runs(hk, hv, src, gk, gv, dst, mode="zero_copy")
    torch.cuda.synchronize()
    assert_copied(gk, dst, hk, src)
    padded_src = torch.cat([src[:8], torch.full((8,), -1)])
    gk.fill_(NAN)
    gather_runs(hk, hv, padded_src.cuda(), gk, gv, torch.cat([dst[:8], torch.full((8,), 511)]).cuda(),
                mode="zero_copy")
    torch.cuda.synchronize()
    assert_copied(gk, dst[:8], hk, src[:8])  # padding wrote nothing, not even to the repeated slot 511
    compiled = launch_zero_copy(hk, hv, gk, gv, src.cuda(), dst.cuda())
    assert re.search(r"ld\.global(\.\w+)*\.v4\.", compiled.asm["ptx"]), "host loads are not 16-byte vectors"


@gpu
@needs_cuda
def test_gpu_alloc_pinned_is_pinned_and_outlives_its_views(gen):
    import gc

    t = alloc_pinned((1024, 4096), torch.bfloat16)
    assert pinned_mode() == "cupy" and t.is_pinned() and t.is_contiguous()
    data = torch.randn(1024, 4096, generator=gen).bfloat16()
    view = t[100:200]
    t.copy_(data)
    del t
    gc.collect()
    filler = [alloc_pinned((1024, 4096), torch.bfloat16).fill_(1.0) for _ in range(4)]  # reuse would clobber
    assert view.is_pinned() and torch.equal(view, data[100:200]) and len(filler) == 4


def test_prepared_gather_equals_gather_runs(gen):
    """The runtime's hot-path launcher moves exactly what gather_runs moves, padding included, for
    several list lengths (its launch configurations are cached per length)."""
    from nosa_sglang.kernels.block_copy import PreparedGather

    cpu_mode("zero_copy")
    hk, hv = store(gen, 40, 64 * 16, torch.bfloat16), store(gen, 40, 64 * 16, torch.bfloat16)
    gk, gv = poisoned(17, 64 * 16, torch.bfloat16), poisoned(17, 64 * 16, torch.bfloat16)
    want_k, want_v = gk.clone(), gv.clone()
    prepared = PreparedGather(hk, hv, gk, gv)
    for n in (5, 9, 5):
        src, dst = random_ids(gen, n, 40, 16)
        src[::3] = -1  # padding entries aim at the trash slot
        dst[::3] = 16
        prepared.launch(src, dst)
        gather_runs(hk, hv, src, want_k, want_v, dst, mode="zero_copy")
        assert torch.equal(gk.nan_to_num(7.0), want_k.nan_to_num(7.0))
        assert torch.equal(gv.nan_to_num(7.0), want_v.nan_to_num(7.0))
    assert gk[16].isnan().all() and gv[16].isnan().all()  # padding wrote nothing, not even to the trash slot
    assert len(prepared._configs) == 2


def test_prepared_gather_checks_its_tensors_once(gen):
    from nosa_sglang.kernels.block_copy import PreparedGather

    hk, hv = store(gen, 8, 512, torch.float32), store(gen, 8, 512, torch.float32)
    with pytest.raises(KernelArgumentError, match="gpu_v: dtype"):
        PreparedGather(hk, hv, poisoned(4, 512, torch.float32), poisoned(4, 512, torch.bfloat16))
    with pytest.raises(KernelArgumentError, match="gpu_k: run_elems"):
        PreparedGather(hk, hv, poisoned(4, 256, torch.float32), poisoned(4, 256, torch.float32))


@gpu
@needs_cuda
def test_gpu_prepared_gather_moves_the_live_runs_on_the_current_stream(gen, real_store):
    """The runtime's hot-path launcher on real pinned memory: padded CUDA id lists, a side stream."""
    from nosa_sglang.kernels.block_copy import PreparedGather

    hk, hv, gk, gv = real_store(128)
    src, dst = random_ids(gen, 300, 2048, 511)
    src[::4], dst[::4] = -1, 511  # padding, aimed at a slot nothing else writes
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        PreparedGather(hk, hv, gk, gv).launch(src.cuda(), dst.cuda())
    stream.synchronize()
    live = src >= 0
    assert_copied(gk, dst[live], hk, src[live])
    assert_copied(gv, dst[live], hv, src[live])
    with pytest.raises(KernelArgumentError, match=r"^host_k: must be pinned"):
        PreparedGather(hk.clone(), hv.clone(), gk, gv)  # a pageable copy of the store
