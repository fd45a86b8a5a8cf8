"""Move (block, KV head) runs of K and V between the pinned host store and GPU slots.

Layout contract (the runtime relies on it): a *run* is one (block, KV head) of K or of V, block_size x
head_dim contiguous elements. Per layer the host store is `host_k`/`host_v [num_host_runs, run_elems]`
(host run id = block_id * Hkv + kv_head) in pinned memory; the GPU slot cache is `gpu_k`/`gpu_v
[num_slots, run_elems]`. A miss moves one K run and one V run with the same ids, so one call moves both.

Modes:
  "zero_copy"    a Triton kernel reads (gather) or writes (scatter) pinned host memory directly over
                 PCIe; ids on the GPU (CPU ids are copied over first). Under TRITON_INTERPRET=1 it also
                 runs on CPU tensors, which is how it is tested without a GPU.
  "copy_engine"  cudaMemcpyAsync / cudaMemcpyBatchAsync on coalesced spans (copy_engine.py); ids must be
                 CPU tensors, because reading GPU ids back would synchronise the hot path.
  "cpu"          torch index_copy_ on CPU tensors: the runtime's CPU mode (no CUDA on the machine).
Host tensors of the CUDA modes must be pinned, device-accessible memory (`alloc_pinned`): pageable
memory raises KernelArgumentError instead of silently taking a slow staged path.
"""

from __future__ import annotations

import contextlib
from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels._checks import (
    KernelArgumentError,
    check_contiguous,
    check_ids,
    check_tensor,
    triton_interpreting,
)
from nosa_sglang.kernels.copy_engine import CopyBackend, coalesce_runs, copy_spans, resolve_backend
from nosa_sglang.kernels.pinned import is_device_accessible

TransferMode = Literal["zero_copy", "copy_engine", "cpu"]
TRANSFER_MODES: tuple[str, ...] = ("zero_copy", "copy_engine", "cpu")
MAX_CHUNK_BYTES = 16 * 1024  # bytes of K (and again of V) one program moves: 32 KiB of loads in flight
MIN_CHUNK_BYTES = 2 * 1024  # below this a program is mostly index math
TARGET_PROGRAMS = 1024  # split runs into chunks until this many items (>= 4 per SM on an H100)
#: programs of a zero-copy launch at most (each owns a range of the items). Why a bound: a program waiting
#: on PCIe holds its SM's slots, and a grid of one program per item filled every SM, so compute on other
#: streams stalled (a concurrent GEMM ran 2.15x slower); a few dozen programs already keep enough bytes
#: in flight to fill PCIe. Measured per card in benchmarks/kernels_transfer.py, table (e).
MAX_PROGRAMS = 32
#: src ids a copy program reads at once, to skip a tile of padding with one load
ID_TILE = 64
#: zero_copy skips entries whose src id is negative (their dst id is ignored): the runtime passes
#: fixed-size, padded id lists that stay on the GPU, so it never reads a miss list back to the host
SKIPS_NEGATIVE_IDS = True


class TransferResult(NamedTuple):
    """What one gather/scatter call issued (for the runtime's counters)."""

    runs: int  # (block, KV head) pairs issued; each is one K run and one V run (zero_copy: incl. padding)
    bytes: int  # K + V bytes of those runs
    copies: int  # kernel launches or memcpy operations issued


@triton.jit
def _copy_runs_kernel(src_k, src_v, dst_k, dst_v, src_ids, dst_ids, n_items, per_program,
                      RUN: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, TILE: tl.constexpr):
    # Item t is chunk `t % CHUNKS` of run `t // CHUNKS`, of K and of V; each program of the bounded grid
    # (MAX_PROGRAMS) owns `per_program` consecutive items. It reads their src and dst ids a tile at a
    # time and visits only the tile's live items (src id >= 0): the runtime's fixed-size miss lists are
    # mostly padding, and a loop over every item paid a dependent id load per padding item (~8 in 9 of
    # a decode step's list). The k-th live item is picked from the tile in registers (its rank among the
    # live ones); both loads of an item are issued before either store, so 2 x CHUNK words per program
    # are in flight over PCIe.
    lo = tl.program_id(0) * per_program
    hi = tl.minimum(lo + per_program, n_items)
    for tile in range(lo, hi, TILE):
        items = tile + tl.arange(0, TILE)
        ids = tl.load(src_ids + items // CHUNKS, mask=items < hi, other=-1)
        live = ids >= 0
        n_live = tl.sum(live.to(tl.int32), axis=0)
        if n_live > 0:
            rank = tl.cumsum(live.to(tl.int32), axis=0)  # 1-based among the live items
            dsts = tl.load(dst_ids + items // CHUNKS, mask=live, other=0)
            for j in range(0, n_live):
                pick = live & (rank == j + 1)
                t = tl.sum(tl.where(pick, items, 0), axis=0)
                s = tl.sum(tl.where(pick, ids, 0), axis=0).to(tl.int64) * RUN  # int64: host stores exceed 2^31 words
                d = tl.sum(tl.where(pick, dsts, 0), axis=0).to(tl.int64) * RUN
                offs = (t % CHUNKS) * CHUNK + tl.arange(0, CHUNK)
                k = tl.load(src_k + s + offs)
                v = tl.load(src_v + s + offs)
                tl.store(dst_k + d + offs, k)
                tl.store(dst_v + d + offs, v)


def gather_runs(
    host_k: torch.Tensor, host_v: torch.Tensor, src_ids: torch.Tensor,
    gpu_k: torch.Tensor, gpu_v: torch.Tensor, dst_ids: torch.Tensor,
    mode: TransferMode = "zero_copy", stream: torch.cuda.Stream | None = None,
    *, validate_ids: bool = True, copy_backend: CopyBackend = "auto",
) -> TransferResult:
    """Host -> GPU: gpu_k[dst_ids[i]] = host_k[src_ids[i]] and the same for V, for every i.

    Args:
        host_k, host_v: [num_host_runs, run_elems] pinned CPU tensors (CPU tensors in mode "cpu").
        src_ids: [n] int32/int64 host run ids (repeats allowed). zero_copy only: a negative id is
            padding, skipped together with its dst id (SKIPS_NEGATIVE_IDS).
        gpu_k, gpu_v: [num_slots, run_elems] CUDA tensors (CPU in mode "cpu"/interpreter), same dtype.
        dst_ids: [n] int32/int64 slot ids, no repeats. Device: GPU for zero_copy, CPU for copy_engine.
        mode: "zero_copy" | "copy_engine" | "cpu".
        stream: CUDA stream to issue on (default: the current stream). The caller records events and
            `record_stream`s; nothing here synchronises unless validate_ids checks CUDA ids.
        validate_ids: check id ranges and duplicate destinations (syncs the device for CUDA ids: pass
            False on the hot path once the ids come from trusted code).
        copy_backend: how copy_engine issues copies ("auto" | "batch" | "cupy" | "torch").
    """
    return _transfer(("host_k", host_k), ("host_v", host_v), ("src_ids", src_ids),
                     ("gpu_k", gpu_k), ("gpu_v", gpu_v), ("dst_ids", dst_ids),
                     host_is_src=True, mode=mode, stream=stream, validate_ids=validate_ids,
                     copy_backend=copy_backend)


def gather_store_runs(host: torch.Tensor, src_ids: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host -> GPU, one store alone (K or V): out[i] = host[src_ids[i]], zero-copy, [n, run_elems] on
    `device`; a negative id reads nothing and its row is zeros (SKIPS_NEGATIVE_IDS).

    The copy kernel always moves a pair, the K and the V run of one id. Seen as half runs, run r is half
    runs 2r and 2r + 1, and those are one id (2r) of two views of the same store shifted by half a run:
    every byte crosses PCIe once (passing the store as both K and V would move it twice). No id checks
    (trusted callers); run_elems must be even."""
    n, elems = src_ids.numel(), host.shape[1]
    if elems % 2:
        raise KernelArgumentError(f"host: run_elems {elems} must be even")
    flat, half = host.view(-1), elems // 2
    first, second = flat[:-half].view(-1, half), flat[half:].view(-1, half)
    out = torch.zeros((2, n, half), dtype=host.dtype, device=device)
    gather_runs(first, second, 2 * src_ids.to(device, torch.long), out[0], out[1],
                torch.arange(n, device=device), mode="zero_copy", validate_ids=False)
    return torch.cat((out[0], out[1]), dim=1)


def scatter_runs(
    gpu_k: torch.Tensor, gpu_v: torch.Tensor, src_ids: torch.Tensor,
    host_k: torch.Tensor, host_v: torch.Tensor, dst_ids: torch.Tensor,
    mode: TransferMode = "zero_copy", stream: torch.cuda.Stream | None = None,
    *, validate_ids: bool = True, copy_backend: CopyBackend = "auto",
) -> TransferResult:
    """GPU -> host write-back: host_k[dst_ids[i]] = gpu_k[src_ids[i]] and the same for V.

    Same arguments and devices as `gather_runs`, with the roles of the id lists swapped (src_ids are
    slot ids, dst_ids host run ids, unique).
    """
    return _transfer(("gpu_k", gpu_k), ("gpu_v", gpu_v), ("src_ids", src_ids),
                     ("host_k", host_k), ("host_v", host_v), ("dst_ids", dst_ids),
                     host_is_src=False, mode=mode, stream=stream, validate_ids=validate_ids,
                     copy_backend=copy_backend)


Named = tuple[str, torch.Tensor]


def _transfer(src_k: Named, src_v: Named, src_ids: Named, dst_k: Named, dst_v: Named, dst_ids: Named, *,
              host_is_src: bool, mode: str, stream: torch.cuda.Stream | None, validate_ids: bool,
              copy_backend: CopyBackend) -> TransferResult:
    if mode not in TRANSFER_MODES:
        raise KernelArgumentError(f"mode: expected one of {TRANSFER_MODES}, got {mode!r}")
    _check_run_tensors(src_k, src_v, dst_k, dst_v)
    host, gpu = ((src_k, src_v), (dst_k, dst_v)) if host_is_src else ((dst_k, dst_v), (src_k, src_v))
    _check_devices(mode, host, gpu)
    for name, ids in (src_ids, dst_ids):
        check_tensor(name, ids, 1, (torch.int32, torch.int64))
        if mode == "copy_engine" and ids.device.type != "cpu":
            raise KernelArgumentError(f"{name}: copy_engine needs CPU ids (reading CUDA ids back would "
                                      f"synchronise); pass a CPU copy, got {ids.device}")
        if mode == "cpu" and ids.device.type != "cpu":
            raise KernelArgumentError(f"{name}: mode 'cpu' needs CPU ids, got {ids.device}")
    if src_ids[1].numel() != dst_ids[1].numel():
        raise KernelArgumentError(f"dst_ids: length {dst_ids[1].numel()} must equal src_ids length "
                                  f"{src_ids[1].numel()}")
    if validate_ids:
        live = src_ids[1] >= 0 if mode == "zero_copy" else slice(None)  # zero_copy skips padding
        check_ids(src_ids[0], src_ids[1][live], src_k[1].shape[0], src_k[0], unique=False)
        check_ids(dst_ids[0], dst_ids[1][live], dst_k[1].shape[0], dst_k[0], unique=True)
    n = src_ids[1].numel()
    run_bytes = src_k[1].shape[1] * src_k[1].element_size()
    if n == 0:
        return TransferResult(0, 0, 0)
    tensors = (src_k[1], src_v[1], dst_k[1], dst_v[1])
    if mode == "cpu":
        s, d = src_ids[1].long(), dst_ids[1].long()
        dst_k[1].index_copy_(0, d, src_k[1].index_select(0, s))
        dst_v[1].index_copy_(0, d, src_v[1].index_select(0, s))
        return TransferResult(n, 2 * n * run_bytes, 2)
    device = gpu[0][1].device
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        if mode == "copy_engine":
            spans = coalesce_runs(src_ids[1].numpy(), dst_ids[1].numpy())
            handle = stream.cuda_stream if stream is not None else torch.cuda.current_stream().cuda_stream
            copies = copy_spans(tensors[:2], tensors[2:], spans, resolve_backend(copy_backend, handle), stream)
            return TransferResult(n, 2 * n * run_bytes, copies)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            # NOTE: CPU ids are copied on the issuing stream, so the kernel sees them in order.
            sid, did = (ids.to(device, non_blocking=True) for ids in (src_ids[1], dst_ids[1]))
            launch_zero_copy(*tensors, sid, did)
    return TransferResult(n, 2 * n * run_bytes, 1)


def zero_copy_launch_config(n_runs: int, run_bytes: int) -> tuple[int, int, int]:
    """(word_bytes, chunk_words, num_warps) for the zero-copy kernel: 4-byte words (so one kernel
    serves every 2- and 4-byte dtype and 4 words make a 16-byte vector); chunks of 16 KiB, halved
    down to 2 KiB until there are TARGET_PROGRAMS programs, so that a few runs still fill the GPU."""
    word = 4 if run_bytes % 4 == 0 else 1
    run_words = run_bytes // word
    chunk = 1
    while run_words % (chunk * 2) == 0 and (chunk * 2) * word <= MAX_CHUNK_BYTES:
        chunk *= 2
    while chunk * word > MIN_CHUNK_BYTES and n_runs * (run_words // chunk) < TARGET_PROGRAMS:
        chunk //= 2
    num_warps = max(1, min(8, chunk * word // 4096))
    return word, chunk, num_warps


def launch_zero_copy(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
                     src_ids: torch.Tensor, dst_ids: torch.Tensor, programs: int | None = None) -> object:
    """Launch the copy kernel on the current stream (no checks; use gather_runs/scatter_runs) with at
    most `programs` programs (default MAX_PROGRAMS; 0: one per item, the unbounded grid).
    Returns Triton's compiled-kernel handle (its .asm shows the PTX, e.g. for ld.global.v4)."""
    run_bytes = src_k.shape[1] * src_k.element_size()
    word, chunk, num_warps = zero_copy_launch_config(src_ids.numel(), run_bytes)
    return _launch_words(_as_words((src_k, src_v, dst_k, dst_v), word), src_ids, dst_ids, run_bytes // word, chunk,
                         num_warps, programs)


def _as_words(tensors: tuple[torch.Tensor, ...], word: int) -> list[torch.Tensor]:
    """The run tensors viewed as `word`-byte words (4: int32, else bytes), the copy kernel's unit."""
    wdt = torch.int32 if word == 4 else torch.uint8
    return [t.view(wdt) for t in tensors]


def _launch_words(views: list[torch.Tensor], src_ids: torch.Tensor, dst_ids: torch.Tensor, run_words: int,
                  chunk: int, num_warps: int, programs: int | None = None) -> object:
    chunks = run_words // chunk
    items = src_ids.numel() * chunks
    bound = MAX_PROGRAMS if programs is None else programs
    grid = min(items, bound) if bound > 0 else items
    per_program = -(-items // grid)
    return _copy_runs_kernel[(grid,)](*views, src_ids, dst_ids, items, per_program, RUN=run_words, CHUNK=chunk,
                                      CHUNKS=chunks, TILE=ID_TILE, num_warps=num_warps)


class PreparedGather:
    """A zero-copy gather (host -> GPU) between four fixed run tensors, checked once.

    Why: `gather_runs` re-validates its four tensors on every call (shapes, dtypes, contiguity, that the
    host memory is device-accessible) and views them as words: tens of microseconds of Python per call,
    which the runtime paid on every layer of every decode step for tensors that never change. Here the
    checks and the views happen at construction; `launch` is the kernel launch alone, on the current
    stream, with CUDA id lists (negative src ids are padding) the caller guarantees are in range.
    """

    def __init__(self, host_k: torch.Tensor, host_v: torch.Tensor, gpu_k: torch.Tensor, gpu_v: torch.Tensor) -> None:
        src_k, src_v, dst_k, dst_v = ("host_k", host_k), ("host_v", host_v), ("gpu_k", gpu_k), ("gpu_v", gpu_v)
        _check_run_tensors(src_k, src_v, dst_k, dst_v)
        _check_devices("zero_copy", (src_k, src_v), (dst_k, dst_v))
        self.run_bytes = host_k.shape[1] * host_k.element_size()
        self._configs: dict[int, tuple[int, int, int]] = {}  # n -> zero_copy_launch_config(n, run_bytes)
        word = zero_copy_launch_config(1, self.run_bytes)[0]  # the word size depends on run_bytes alone
        self._views = _as_words((host_k, host_v, gpu_k, gpu_v), word)
        self._device = gpu_k.device

    def launch(self, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
        """gpu[dst_ids[i]] = host[src_ids[i]] for K and V where src_ids[i] >= 0 (ids on the GPU)."""
        n = src_ids.numel()
        if n == 0:
            return
        config = self._configs.get(n)
        if config is None:
            config = self._configs[n] = zero_copy_launch_config(n, self.run_bytes)
        word, chunk, warps = config
        on_other_device = self._device.type == "cuda" and self._device.index != torch.cuda.current_device()
        with torch.cuda.device(self._device) if on_other_device else contextlib.nullcontext():
            _launch_words(self._views, src_ids, dst_ids, self.run_bytes // word, chunk, warps)


def _check_run_tensors(src_k: Named, src_v: Named, dst_k: Named, dst_v: Named) -> None:
    ref_name, ref = src_k
    for name, t in (src_k, src_v, dst_k, dst_v):
        check_tensor(name, t, 2)
        check_contiguous(name, t)
        if t.dtype != ref.dtype:
            raise KernelArgumentError(f"{name}: dtype {t.dtype} must equal {ref_name}'s {ref.dtype}")
        if t.shape[1] != ref.shape[1]:
            raise KernelArgumentError(f"{name}: run_elems (dim 1) {t.shape[1]} must equal {ref_name}'s {ref.shape[1]}")
    for (kn, k), (vn, v) in ((src_k, src_v), (dst_k, dst_v)):
        if v.shape != k.shape:
            raise KernelArgumentError(f"{vn}: shape {tuple(v.shape)} must equal {kn}'s {tuple(k.shape)}")


def _check_devices(mode: str, host: tuple[Named, Named], gpu: tuple[Named, Named]) -> None:
    (gk_name, gk), (gv_name, gv) = gpu
    if gv.device != gk.device:
        raise KernelArgumentError(f"{gv_name}: must be on {gk.device} like {gk_name}, got {gv.device}")
    for name, t in host:
        if t.device.type != "cpu":
            raise KernelArgumentError(f"{name}: the host store must be a CPU tensor, got {t.device}")
    if mode == "cpu":
        if gk.device.type != "cpu":
            raise KernelArgumentError(f"{gk_name}: mode 'cpu' needs CPU tensors, got {gk.device}")
        return
    if gk.device.type == "cuda":
        for name, t in host:
            if not is_device_accessible(t):
                raise KernelArgumentError(f"{name}: must be pinned, device-accessible host memory "
                                          "(kernels.pinned.alloc_pinned or cudaHostRegister), got pageable memory")
        return
    if mode == "zero_copy" and gk.device.type == "cpu" and triton_interpreting(_copy_runs_kernel):
        return  # TRITON_INTERPRET=1: CPU tensors stand in for host store and GPU slots
    raise KernelArgumentError(f"{gk_name}: mode {mode!r} needs a CUDA tensor (or TRITON_INTERPRET=1 for "
                              f"zero_copy on CPU; use mode='cpu' without a GPU), got {gk.device}")
