"""SegmentGraphs' counts (what /server_info shows as `segment_graphs`): a key's first run is eager, and
every drop of all graphs is counted, so serving that keeps changing its batch shows up there. The
captures and replays themselves need a GPU (tests/test_runtime_gpu.py)."""

from __future__ import annotations

from nosa_sglang.runtime.graph_cache import MAX_SHAPES, SegmentGraphs


def test_first_runs_are_eager_and_every_drop_of_all_graphs_is_counted():
    g, calls = SegmentGraphs(), []
    for shape in range(MAX_SHAPES):
        assert g.run(shape, "decode", lambda s=shape: calls.append(s) or s) == shape
    assert (g.eager, g.captures, g.replays, g.clears) == (MAX_SHAPES, 0, 0, 0) and calls == list(range(MAX_SHAPES))
    g.run(MAX_SHAPES, "decode", lambda: None)  # one shape too many: everything goes, this one runs eagerly
    assert (g.eager, g.clears) == (MAX_SHAPES + 1, 1)
    g.clear()
    g.clear()  # nothing left to drop: not counted again
    assert g.clears == 2
    g.run(0, "decode", lambda: None)  # known before the drop: eager again
    assert g.eager == MAX_SHAPES + 2


def test_a_runtime_without_segment_graphs_reports_none():
    import torch

    from kernel_checks import SMALL
    from nosa_sglang.runtime.knobs import OffloadKnobs
    from nosa_sglang.runtime.nosa_runtime import NosaRuntime
    from nosa_sglang.runtime.types import ModelShape

    rt = NosaRuntime(ModelShape(1, 2, 1, 16, torch.float32), SMALL, OffloadKnobs(gpu_slots=SMALL.topk_blocks),
                     device="cpu", max_requests=1, max_seq_len=256, gpu_only=True, cuda_graphs=True)
    assert rt.graph_counts() == {}  # CPU: the segments always run eagerly, no graph exists
