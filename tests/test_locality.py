"""The locality bound, measured on the tiny model's real decode stream (NOSA_SPEC.md, "Why it offloads")."""

import pytest

from nosa_sglang.config import NosaConfig
from nosa_sglang.locality import LocalityTracker, entering_blocks
from nosa_sglang.reference.backend import ReferenceAttentionBackend
from nosa_sglang.reference.checkpoint import load_checkpoint, make_tiny_checkpoint
from test_checkpoint import SMALL_SHAPE

import torch


def test_entering_blocks_ignores_padding_and_order():
    prev = torch.tensor([[0, 1, 2, -1]])
    cur = torch.tensor([[0, 2, 5, -1]])
    assert entering_blocks(prev, cur).tolist() == [1]


@pytest.mark.parametrize(
    "nosa,prompt_len",
    [
        (NosaConfig(), 4200),  # 66 blocks: sparse from the first step
        (NosaConfig(block_size=16, kernel_size=8, kernel_stride=4, local_blocks=2, query_blocks=5, topk_blocks=8), 300),
    ],
    ids=["default", "small"],
)
def test_entering_blocks_per_step_never_exceed_the_bound_over_200_steps(tmp_path, nosa, prompt_len):
    path = make_tiny_checkpoint(tmp_path / "m", SMALL_SHAPE, nosa=nosa, seed=3)
    model = load_checkpoint(path)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 259, (prompt_len,), generator=g).tolist()
    tracker = LocalityTracker()
    per_step_max = []

    def on_step(step, backend):
        before = tracker.max_entering
        tracker.max_entering = 0
        for layer in range(SMALL_SHAPE.num_hidden_layers):
            tracker.update(layer, backend.last_selection(layer))
        per_step_max.append(tracker.max_entering)
        tracker.max_entering = max(before, tracker.max_entering)

    model.generate([prompt], 201, backend=ReferenceAttentionBackend(nosa), on_step=on_step)
    assert len(per_step_max) == 200
    assert tracker.rows == 199 * SMALL_SHAPE.num_hidden_layers * SMALL_SHAPE.num_key_value_heads
    assert max(per_step_max) <= nosa.max_entering_blocks
    assert tracker.mean_selected == nosa.topk_blocks  # really sparse all along
