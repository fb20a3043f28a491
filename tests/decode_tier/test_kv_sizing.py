"""How a decode replica picks its number of KV blocks: cluster.yaml's num_kv_blocks wins, a GPU rank sizes from
gpu_memory_fraction of its device (its own shard's block bytes), a CPU rank takes the default, and the ranks of a
replica agree on the smallest."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from decode_tier.kv_sizing import CPU_DEFAULT_NUM_KV_BLOCKS, KVCacheSize, agree_on_size, size_kv_cache
from mesh.config import ModelConfig
from mesh.gpu_memory import activation_bytes
from mesh.presets import make_model

GIB = 2 ** 30


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ModelConfig:
    return ModelConfig.from_dir(make_model(tmp_path_factory.mktemp("m") / "tiny-llama", "tiny-llama"))


def _rank_model(config: ModelConfig, *, num_layers: int, num_kv_heads_local: int, dtype=torch.bfloat16):
    """What size_kv_cache reads of a loaded shard (a real CausalLM of a tp/pp rank needs a process group)."""
    return SimpleNamespace(config=config, num_layers=num_layers, num_kv_heads_local=num_kv_heads_local,
                           head_dim=config.head_dim, dtype=dtype, device=torch.device("cpu"))


def test_num_kv_blocks_from_the_yaml_wins_even_with_device_memory_known(config):
    model = _rank_model(config, num_layers=config.num_layers, num_kv_heads_local=config.num_kv_heads)
    size = size_kv_cache(model, num_kv_blocks=77, gpu_memory_fraction=0.9, block_size=16, max_num_seqs=8,
                         memory_info=(100 * GIB, 140 * GIB))
    assert (size.num_blocks, size.source) == (77, "num_kv_blocks")
    assert "77 blocks" in size.description


def test_a_cpu_rank_without_num_kv_blocks_takes_the_default(config):
    model = _rank_model(config, num_layers=config.num_layers, num_kv_heads_local=config.num_kv_heads)
    size = size_kv_cache(model, num_kv_blocks=None, gpu_memory_fraction=0.9, block_size=16, max_num_seqs=8)
    assert (size.num_blocks, size.source) == (CPU_DEFAULT_NUM_KV_BLOCKS, "cpu default")


def test_a_gpu_rank_fills_its_fraction_with_blocks_of_its_own_shard(config):
    # A pp=2 x tp=2 rank: half the layers, one of the two KV heads; bf16.
    model = _rank_model(config, num_layers=config.num_layers // 2, num_kv_heads_local=1)
    free, total, fraction, block_size = 120 * GIB, 140 * GIB, 0.5, 16
    size = size_kv_cache(model, num_kv_blocks=None, gpu_memory_fraction=fraction, block_size=block_size,
                         max_num_seqs=8, memory_info=(free, total))
    block_bytes = (config.num_layers // 2) * 2 * block_size * 1 * config.head_dim * 2
    reserve = activation_bytes(config, max_num_seqs=8, max_prefill_tokens=8, dtype=torch.bfloat16)
    expected = (int(total * fraction) - (total - free) - reserve) // block_bytes
    assert size.source == "gpu_memory_fraction"
    assert size.num_blocks == expected
    assert f"{expected} blocks" in size.description and "gpu_memory_fraction 0.5" in size.description


def test_a_fraction_that_leaves_no_room_is_refused_naming_the_key(config):
    model = _rank_model(config, num_layers=config.num_layers, num_kv_heads_local=config.num_kv_heads)
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        size_kv_cache(model, num_kv_blocks=None, gpu_memory_fraction=0.1, block_size=16, max_num_seqs=8,
                      memory_info=(GIB, 8 * GIB))


class _FakeControlChannel:
    """Rank 0's view of the control channel: the other ranks' sizes arrive in gather."""

    def __init__(self, others: list[KVCacheSize]):
        self._others = others
        self.broadcasts: list = []

    def gather(self, value):
        return [value, *self._others]

    def broadcast(self, value=None, *, src: int = 0):
        self.broadcasts.append(value)
        return value


def _size(num_blocks: int) -> KVCacheSize:
    return KVCacheSize(num_blocks=num_blocks, source="gpu_memory_fraction", description=f"{num_blocks} blocks")


def test_the_ranks_of_a_replica_agree_on_the_smallest_size():
    channel = _FakeControlChannel([_size(500), _size(300), _size(900)])
    chosen = agree_on_size(channel, _size(400))
    assert chosen.num_blocks == 300
    assert channel.broadcasts[0].num_blocks == 300  # what every other rank receives
    assert "this rank alone had room for 400" in chosen.description
    assert agree_on_size(None, _size(400)) == _size(400)  # one-rank replica: no channel
    same = _FakeControlChannel([_size(400)])
    assert agree_on_size(same, _size(400)) == _size(400)


def test_cache_size_rejects_zero_blocks():
    with pytest.raises(ValueError, match="num_blocks"):
        dataclasses.replace(_size(1), num_blocks=0)


def test_the_activation_reserve_covers_the_step_token_budget_of_local_prefill(config):
    model = _rank_model(config, num_layers=config.num_layers, num_kv_heads_local=config.num_kv_heads)
    free, total, block_size = 120 * GIB, 140 * GIB, 16
    sizes = [size_kv_cache(model, num_kv_blocks=None, gpu_memory_fraction=0.9, block_size=block_size, max_num_seqs=8,
                           memory_info=(free, total), max_step_tokens=step_tokens) for step_tokens in (None, 2048)]
    block_bytes = config.num_layers * 2 * block_size * config.num_kv_heads * config.head_dim * 2
    reserve = activation_bytes(config, max_num_seqs=8, max_prefill_tokens=2048, dtype=torch.bfloat16)
    assert sizes[1].num_blocks == (int(total * 0.9) - (total - free) - reserve) // block_bytes
    assert sizes[1].num_blocks < sizes[0].num_blocks
