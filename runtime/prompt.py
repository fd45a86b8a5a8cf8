"""PromptLoader: put an admitted prompt's KV where the runtime keeps it, per layer.

- full blocks -> the host store (staged as runs on the device, written on the write-back stream);
  blocks shared with another request's prefix are already there and are skipped;
- compressed keys, eviction chunk means and biases -> SelectionState;
- a warm start of the GPU slots: the partial tail block into the tail slot, then the blocks the first
  decode step will most likely select (forced sink/local blocks, then the highest eviction scores) into
  the regular slots; from the device copy of the prompt (no PCIe), or, over a server's host pages, from
  those pages (only the installed runs cross PCIe; the prompt's V is never read whole).
In gpu_only mode every block goes to its slot instead, or, over a server's page pool, nowhere: the
pages hold it, and the block table maps the request's blocks to them.

Prompts already on a server's pages are admitted several at a time (`load_paged`): their pages read
as one sequence per layer and their selection state written by a few indexed copies (`PromptLayout`),
instead of ~20 small launches per request and layer.
"""

from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from nosa_sglang.kernels.selection import eviction_block_scores
from nosa_sglang.kernels.topk import forced_and_existing

if TYPE_CHECKING:
    from nosa_sglang.runtime.nosa_runtime import NosaRuntime


#: K bytes of the prompts read as one sequence per layer, at most (more prompts go in further groups)
PAGED_GROUP_BYTES = 256 << 20


class PromptLayout:
    """Where prompts land in SelectionState when they are read as one sequence, each from a block
    boundary (their pages concatenated; one prompt alone from 0): `SelectionState.load_prompts`. A
    prompt's j-th compressed-key window is the sequence's window (first block * windows per block + j):
    the same tokens and the same mean as alone. The index lists (a million entries for 32 prompts of
    32K tokens) are expanded on the device from a few numbers per prompt: building and uploading them
    on the host cost ~1 ms a prompt."""

    def __init__(self, rows: list[int], lens: list[int], config, device: torch.device) -> None:
        bs, ks, per_block = config.block_size, config.kernel_size, config.chunks_per_block
        firsts = list(accumulate((config.num_blocks(T) for T in lens[:-1]), initial=0))
        rings = [min(ks, T) for T in lens]
        kinds = {  # per prompt: entries, first source index, first id (ring: the first ring token's position)
            "chunk": ([config.num_chunks(T) for T in lens], [f * per_block for f in firsts], [0] * len(lens)),
            "token": (list(lens), [f * bs for f in firsts], [0] * len(lens)),
            "ring": (rings, [f * bs + T - r for f, T, r in zip(firsts, lens, rings)],
                     [T - r for T, r in zip(lens, rings)]),
        }
        per_prompt = torch.tensor([rows] + [x for k in kinds.values() for x in k], dtype=torch.long)
        if device.type == "cuda":
            per_prompt = per_prompt.pin_memory()
        per_prompt = per_prompt.to(device, non_blocking=True)
        row_of = per_prompt[0]
        for n, (name, (counts, _, _)) in enumerate(kinds.items()):
            count, src0, id0 = per_prompt[1 + 3 * n : 4 + 3 * n]
            total = sum(counts)
            local = torch.arange(total, device=device) - torch.repeat_interleave(
                torch.cumsum(count, 0) - count, count, output_size=total)
            ids = torch.repeat_interleave(id0, count, output_size=total) + local
            setattr(self, f"{name}_src", torch.repeat_interleave(src0, count, output_size=total) + local)
            setattr(self, f"{name}_rows", torch.repeat_interleave(row_of, count, output_size=total))
            setattr(self, f"{name}_ids", ids % ks if name == "ring" else ids)
        self.n_tokens = (firsts[-1] + config.num_blocks(lens[-1])) * bs  # the sequence's tokens: every block


def _layer_shape(seq, layer: int):
    """A layer's shape (or its type's name if it is no tensor)."""
    t = seq[layer]
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


class PromptLoader:
    """Admission-time loading for one NosaRuntime (not the decode hot path)."""

    def __init__(self, runtime: "NosaRuntime") -> None:
        self.rt = runtime

    def check(self, prompt_k, prompt_v, prompt_c) -> int:
        """Validate the prompt tensors (per layer k/v [T, Hkv, d], c [T, Hkv]); returns T."""
        s = self.rt.shape
        for name, seq in (("prompt_k", prompt_k), ("prompt_v", prompt_v), ("prompt_c", prompt_c)):
            if len(seq) != s.num_layers:
                raise ValueError(f"{name}: expected {s.num_layers} layers, got {len(seq)}")
        first = _layer_shape(prompt_k, 0)
        T = int(first[0]) if isinstance(first, tuple) and first else 0
        for layer in range(s.num_layers):
            for name, seq, shape in (("prompt_k", prompt_k, (T, s.num_kv_heads, s.head_dim)),
                                     ("prompt_v", prompt_v, (T, s.num_kv_heads, s.head_dim)),
                                     ("prompt_c", prompt_c, (T, s.num_kv_heads))):
                got = _layer_shape(seq, layer)
                if got != shape:
                    raise ValueError(f"{name}[{layer}]: expected shape {list(shape)}, got {got}")
        return T

    def load(self, row: int, T: int, host_blocks: list[int], n_shared: int, prompt_k, prompt_v, prompt_c,
             step: int) -> None:
        rt = self.rt
        cfg, dev = rt.config, rt.device
        bs, H = cfg.block_size, rt.shape.num_kv_heads
        nb, n_full = cfg.num_blocks(T), T // bs
        self._reset_rows([row], [host_blocks])
        layout = PromptLayout([row], [T], cfg, dev)
        for layer in range(rt.shape.num_layers):
            k = prompt_k[layer].to(dev, rt.shape.dtype)
            c = prompt_c[layer].to(dev, torch.float32)
            rt.selection.load_prompts(layer, k, c, layout)
            if rt.pool_backed:
                continue  # the pool's pages hold the prompt already
            if rt.paged:  # offloaded over the server's pages: they hold it; the warm start reads its runs there
                self._warm_start(layer, row, T, self._page_runs(layer, host_blocks), step)
                continue
            runs = [self._stage(x, nb, bs) for x in (k, prompt_v[layer].to(dev, rt.shape.dtype), c)]
            if rt.gpu_only:
                gids = rt.slots.slot_base(torch.tensor([row], device=dev))[0] + torch.arange(nb, device=dev)
                src = (torch.arange(nb, device=dev)[None, :] * H + rt._heads[:, None]).flatten()
                rt.slots.write_runs(layer, gids.flatten(), runs[0][src], runs[1][src], runs[2][src])
                continue
            if n_full > n_shared:
                src = torch.arange(n_shared * H, n_full * H, dtype=torch.long)
                dst = torch.tensor([b * H + h for b in host_blocks[n_shared:n_full] for h in range(H)],
                                   dtype=torch.long)
                rt.transfer.write_back(layer, src, dst, gpu_k=runs[0], gpu_v=runs[1])
            self._warm_start(layer, row, T, lambda src, runs=runs: tuple(x[src] for x in runs), step)
        if rt.gpu_only:
            rt.slots.set_blocks(row, nb)

    def load_paged(self, rows: list[int], lens: list[int], pages: list[list[int]], step: int) -> None:
        """Prompts already on the page pool's pages (`lens` tokens each on `pages`) into rows `rows`: per
        layer, groups of them read as one sequence (K and c; the pages hold V) and loaded together; over
        host pages, each one's warm start reads only the runs it installs."""
        rt = self.rt
        self._reset_rows(rows, pages)
        per_page = rt.page_pool.page_k_bytes
        groups, size = [[]], 0
        for i, pg in enumerate(pages):
            if groups[-1] and size + len(pg) * per_page > PAGED_GROUP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += len(pg) * per_page
        for g in filter(None, groups):
            self._load_group([rows[i] for i in g], [lens[i] for i in g], [pages[i] for i in g], step)
        if rt.gpu_only:
            for row, T in zip(rows, lens):
                rt.slots.set_blocks(row, rt.config.num_blocks(T))

    def _load_group(self, rows: list[int], lens: list[int], pages: list[list[int]], step: int) -> None:
        rt = self.rt
        layout = PromptLayout(rows, lens, rt.config, rt.device)
        all_pages = torch.tensor([p for pg in pages for p in pg], dtype=torch.long)
        for layer in range(rt.shape.num_layers):
            k, _, c = rt.page_pool.read_pages(layer, all_pages, layout.n_tokens, with_v=False)
            rt.selection.load_prompts(layer, k, c, layout)
            if not rt.pool_backed:
                for row, T, pg in zip(rows, lens, pages):
                    self._warm_start(layer, row, T, self._page_runs(layer, pg), step)

    def load_synthetic(self, row: int, T: int, host_blocks: list[int], seed: int, step: int) -> None:
        """Benchmarks: a request of T tokens whose K/V are whatever the host store and slots hold (finite
        by construction), with random compressed keys, chunk means and biases; no KV upload at all."""
        rt = self.rt
        cfg, dev, sel = rt.config, rt.device, rt.selection
        H, d, nb, n = rt.shape.num_kv_heads, rt.shape.head_dim, cfg.num_blocks(T), cfg.num_chunks(T)
        self._reset_rows([row], [host_blocks])
        g = torch.Generator(device=dev).manual_seed(seed)
        for layer in range(rt.shape.num_layers):
            sel.ck[layer, row, :n] = torch.randn((n, H, d), generator=g, device=dev).to(sel.ck.dtype)
            sel.ce[layer, row, :n] = torch.rand((n, H), generator=g, device=dev)
            sel.c[layer, row, :, :T] = torch.rand((H, T), generator=g, device=dev)
            sel.ring[layer, row] = torch.randn(sel.ring.shape[2:], generator=g, device=dev).to(sel.ring.dtype)
            if not rt.gpu_only:
                self._warm_start(layer, row, T, None, step)
        if rt.gpu_only:
            rt.slots.set_blocks(row, nb)

    def _reset_rows(self, rows: list[int], host_blocks: list[list[int]]) -> None:
        """Empty residency and counters; the block table rows map the given blocks (one upload)."""
        rt = self.rt
        for row in rows:
            rt.slots.clear_row(row)
            rt.counters.clear_row(row)
        if rt.host_table is not None:
            table = torch.full((len(rows), rt.max_blocks), -1, dtype=torch.int32)
            for i, blocks in enumerate(host_blocks):
                table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            rt._host_table[torch.tensor(rows, device=rt.device)] = table.to(rt.device)

    def _page_runs(self, layer: int, pages: list[int]):
        """read(src) -> (k, v, c runs) of the prompt's runs src (block * Hkv + head), from the pool pages
        that hold those blocks: an offloaded warm start moves only the runs it installs over PCIe."""
        pool = self.rt.page_pool
        runs = pool.runs_of(torch.tensor(pages, dtype=torch.long)).flatten()  # indexed by block * Hkv + head
        return lambda src: pool.read_runs(layer, runs[src])

    @staticmethod
    def _stage(x: torch.Tensor, nb: int, bs: int) -> torch.Tensor:
        """[T, Hkv, ...] -> runs [nb * Hkv, block_size * ...] (run id = block * Hkv + head), zero padded."""
        T, H = x.shape[0], x.shape[1]
        pad = torch.zeros((nb * bs - T, *x.shape[1:]), dtype=x.dtype, device=x.device)
        x = torch.cat((x, pad)).view(nb, bs, H, -1).transpose(1, 2)
        return x.reshape(nb * H, -1).contiguous()

    def _warm_start(self, layer: int, row: int, T: int, read_runs, step: int) -> None:
        """The blocks the first decode step most likely selects (and the partial tail) into the row's
        slots; read_runs(src run ids) -> their (k, v, c) runs, or None (synthetic: map without data)."""
        rt = self.rt
        cfg, dev = rt.config, rt.device
        bs = cfg.block_size
        nb, n_full = cfg.num_blocks(T), T // bs
        seq = torch.tensor([T + 1], device=dev)
        nch = torch.tensor([cfg.num_chunks(T)], device=dev)
        E = eviction_block_scores(rt.selection.ce[layer, row : row + 1], nch, seq, cfg, impl=rt.impl, num_blocks=nb)
        _, forced = forced_and_existing(seq, nb, cfg)
        prio = torch.where(forced, float("inf"), E)[0, :, :n_full]
        m = min(rt.slots.active, n_full)
        blocks = torch.sort(prio, dim=-1, descending=True, stable=True).indices[:, :m]
        e_vals = E[0, :, :n_full].gather(-1, blocks)
        tail = nb - 1 if T % bs else None
        rt.slots.install_prompt(layer, row, blocks, e_vals, tail, read_runs, step)
