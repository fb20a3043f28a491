"""The e2e tests write a running cluster's config back as YAML (what a user edits before `pdcluster apply`): every
section the schema has must survive the round trip, or those tests would apply a different cluster."""

import pytest
import yaml

from e2e_helpers import config_yaml
from orchestrator.config import parse_config

CONFIGS = [
    {"model": {"path": "/m"}, "prefill": {"replicas": 1}, "decode": {"replicas": 1, "mesh": {"tp": 2}}},
    {"model": {"path": "/m"}, "mode": "colocated", "decode": {"replicas": 2, "max_step_tokens": 256}},
    {"model": {"path": "/m"}, "router": {"disaggregation": {"min_prefill_tokens": 64}},
     "prefill": {"replicas": 1, "policy": "prefix-aware", "prefix_cache": {"max_tokens": 4096},
                 "autoscale": {"ttft_p90_ms": 500, "max_replicas": 3}},
     "decode": {"replicas": 1, "collectives": {"all_reduce": "nccl"}, "autoscale": {"tpot_p99_ms": 30,
                                                                                  "max_replicas": 2}}},
]


@pytest.mark.parametrize("raw", CONFIGS)
def test_config_yaml_round_trips(raw):
    config = parse_config(raw)
    assert parse_config(yaml.safe_load(config_yaml(config))) == config
