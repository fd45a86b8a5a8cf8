import json

import pytest

from nosa_sglang.config import NosaConfig, NosaConfigError


def test_defaults_match_the_authors_constants():
    c = NosaConfig()
    assert (c.block_size, c.kernel_size, c.kernel_stride) == (64, 32, 16)
    assert (c.init_blocks, c.local_blocks, c.query_blocks, c.topk_blocks) == (1, 16, 33, 64)
    assert c.forced_blocks == 18 and c.free_query_blocks == 15 and c.eviction_blocks == 31
    assert c.max_entering_blocks == 16 and c.chunks_per_block == 4


@pytest.mark.parametrize("L,n", [(0, 0), (31, 0), (32, 1), (47, 1), (48, 2), (100, 5), (4096, 255)])
def test_num_chunks_counts_complete_windows_only(L, n):
    assert NosaConfig().num_chunks(L) == n


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"block_size": 0}, "block_size"),
        ({"kernel_size": -1}, "kernel_size"),
        ({"topk_blocks": 1.5}, "topk_blocks"),
        ({"init_blocks": True}, "init_blocks"),
        ({"block_size": 60}, "block_size"),  # not a multiple of kernel_stride
        ({"kernel_size": 8}, "kernel_size"),  # < kernel_stride
        ({"query_blocks": 17}, "query_blocks"),  # < forced 18
        ({"topk_blocks": 32}, "topk_blocks"),  # < query_blocks
    ],
)
def test_every_validation_error_names_the_field(kwargs, field):
    with pytest.raises(NosaConfigError, match=rf"NosaConfig\.{field}="):
        NosaConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(Exception):
        NosaConfig().topk_blocks = 8


def test_from_hf_config_defaults_when_no_nosa_key(tmp_path):
    assert NosaConfig.from_hf_config({"architectures": ["SparseLlamaForCausalLM"]}) == NosaConfig()
    (tmp_path / "config.json").write_text(json.dumps({"nosa": {"topk_blocks": 80}}))
    assert NosaConfig.from_hf_config(tmp_path).topk_blocks == 80
    assert NosaConfig.from_hf_config(tmp_path / "config.json").topk_blocks == 80


def test_from_hf_config_rejects_unknown_and_invalid_fields():
    with pytest.raises(NosaConfigError, match="unknown field"):
        NosaConfig.from_hf_config({"nosa": {"topk": 8}})
    with pytest.raises(NosaConfigError, match="query_blocks"):
        NosaConfig.from_hf_config({"nosa": {"query_blocks": 2}})
    with pytest.raises(NosaConfigError, match="expected an object"):
        NosaConfig.from_hf_config({"nosa": [1, 2]})


def test_from_hf_config_reads_attribute_objects():
    class Cfg:
        nosa = {"block_size": 32, "kernel_size": 16, "kernel_stride": 8}

    assert NosaConfig.from_hf_config(Cfg()).block_size == 32
