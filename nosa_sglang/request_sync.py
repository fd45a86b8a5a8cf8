"""RuntimeRequests: keeps the NOSA runtime's running requests equal to SGLang's decode batch.

SGLang owns a request's lifecycle (admission, prefill in chunks, radix-cache prefix hits, retraction,
abort, finish) and its pages; NosaRuntime owns the decode state. Before each decode forward, `sync`
makes the runtime hold exactly the batch's requests:
* a runtime request absent from the batch has finished, been aborted or been retracted: it ends (its
  GPU row and page references are released; a retracted one comes back as a new request);
* requests new to decode (or whose length no longer matches: re-prefilled) begin together with their
  pages (each one's req_to_token row, page by page): the runtime reads their prompts' K and c from the
  pool for their compressed keys (one pass per layer for all of them) and, offloaded, the runs each
  one's warm start installs.
The pages are the runtime's blocks in both modes (fully on the GPU it decodes from them; offloaded they
are its host store), so requests that share a radix-cache prefix share its blocks with no bookkeeping
here. Ends run before begins.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from nosa_sglang.runtime.nosa_runtime import NosaRuntime


class RuntimeRequests:
    """Begins and ends runtime requests so that they match each decode batch (see the module doc)."""

    def __init__(self, runtime: NosaRuntime, kv_pool, req_to_token: torch.Tensor) -> None:
        self.runtime, self.kv_pool, self.req_to_token = runtime, kv_pool, req_to_token
        self.begun = 0  # requests begun since start (a retracted request counts again)

    def sync(self, rids: list[str], req_pool_indices: torch.Tensor, seq_lens: list[int]) -> tuple[str, ...]:
        """Make the runtime hold exactly these requests, each with seq_len - 1 tokens (the token being
        decoded is appended by the forward). Returns the ids in batch order.

        `req_pool_indices` (the batch's rows of req_to_token, on the device) is read back only when a
        request begins: a steady decode step never waits for the GPU here."""
        rt = self.runtime
        want = dict(zip(rids, seq_lens))
        stale = {rid for rid in rt.running_requests if rid in want and rt.seq_len(rid) != want[rid] - 1}
        self.end_all_but(want.keys() - stale)
        running = set(rt.running_requests)
        new = [i for i, rid in enumerate(rids) if rid not in running]
        if new:
            rows = req_pool_indices.tolist()
            pages = [self.kv_pool.sequence_pages(self.req_to_token[rows[i], : seq_lens[i] - 1]) for i in new]
            flat = torch.cat(pages).tolist()  # NOTE: one read-back for all of them
            sizes = [p.numel() for p in pages]
            rt.begin_paged_requests([(rids[i], seq_lens[i] - 1, flat[end - n : end])
                                     for i, n, end in zip(new, sizes, accumulate(sizes))])
            self.begun += len(new)
        return tuple(rids)

    def end(self, rid: str) -> None:
        self.runtime.abort_request(rid)  # valid even inside a step an exception interrupted

    def end_all_but(self, keep: set[str]) -> None:
        for rid in self.runtime.running_requests:
            if rid not in keep:
                self.end(rid)
