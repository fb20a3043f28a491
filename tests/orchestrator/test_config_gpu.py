"""cluster.yaml keys of GPU tiers: gpu_memory_fraction, and num_kv_blocks left unset on a GPU tier."""

from __future__ import annotations

import pytest

from orchestrator.apply_plan import plan_apply
from orchestrator.config import ConfigError, parse_config

GPU = {"num_gpus": 1}


def _config(decode: dict, prefill: dict | None = None):
    return parse_config({"model": {"path": "/models/x"}, "decode": decode, "prefill": prefill or {}})


def test_a_gpu_decode_tier_without_num_kv_blocks_is_sized_at_start_up():
    config = _config({"resources": GPU})
    assert config.decode.num_kv_blocks is None
    assert config.decode.gpu_memory_fraction == 0.9


def test_num_kv_blocks_set_in_the_yaml_is_kept_on_gpu_and_cpu():
    assert _config({"resources": GPU, "num_kv_blocks": 300}).decode.num_kv_blocks == 300
    assert _config({"num_kv_blocks": 300}).decode.num_kv_blocks == 300


def test_a_cpu_decode_tier_keeps_the_1024_block_default():
    assert _config({}).decode.num_kv_blocks == 1024


def test_gpu_memory_fraction_is_validated_naming_the_key():
    assert _config({"resources": GPU, "gpu_memory_fraction": 0.5}).decode.gpu_memory_fraction == 0.5
    assert _config({"resources": GPU, "gpu_memory_fraction": 1}).decode.gpu_memory_fraction == 1.0
    for bad in (0, -0.1, 1.5, "half", True):
        with pytest.raises(ConfigError) as error:
            _config({"resources": GPU, "gpu_memory_fraction": bad})
        assert error.value.key == "decode.gpu_memory_fraction"


def test_changing_gpu_memory_fraction_replaces_the_replicas():
    running = _config({"resources": GPU})
    wanted = _config({"resources": GPU, "gpu_memory_fraction": 0.5})
    plan = plan_apply(running, wanted)
    assert plan.ok and [(a.kind, a.tier) for a in plan.actions] == [("replace", "decode")]
