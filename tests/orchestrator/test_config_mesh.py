"""cluster.yaml meshes: multi-rank degrees are accepted at load (the model checks them at deploy time), decode
replicas refuse context parallelism with the key named."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, parse_config


def _raw(prefill_mesh: dict, decode_mesh: dict) -> dict:
    return {"model": {"path": "/models/m"}, "prefill": {"mesh": prefill_mesh}, "decode": {"mesh": decode_mesh}}


def test_multi_rank_meshes_are_accepted():
    config = parse_config(_raw({"tp": 2, "cp": 2, "pp": 2}, {"tp": 4, "pp": 2}))
    assert (config.prefill.mesh.tp, config.prefill.mesh.cp, config.prefill.mesh.pp) == (2, 2, 2)
    assert config.prefill.mesh.world_size == 8 and config.decode.mesh.world_size == 8


def test_decode_context_parallelism_is_refused_with_its_key():
    with pytest.raises(ConfigError) as error:
        parse_config(_raw({"tp": 1}, {"cp": 2}))
    assert error.value.key == "decode.mesh.cp"
    assert "prefill" in str(error.value)
