"""cluster.yaml keys of colocated mode and conditional disaggregation (orchestrator/config_colocate.py): defaults,
values, and one error naming the key for every bad one."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, load_config, parse_config
from orchestrator.config_colocate import DisaggregationSection


def _minimal(**sections):
    raw = {"model": {"path": "/models/x"}}
    raw.update(sections)
    return raw


def test_embedded_default_is_disaggregated_and_always_uses_the_prefill_tier():
    config = load_config()
    assert config.mode == "disaggregated" and not config.is_colocated
    assert config.router.disaggregation == DisaggregationSection()
    assert config.router.disaggregation.min_prefill_tokens == 0
    assert not config.router.disaggregation.is_local(1, is_prefill_saturated=True)
    assert config.decode.max_step_tokens == 512 and config.prefill.max_step_tokens is None


def test_colocated_mode_has_no_prefill_replicas():
    config = parse_config(_minimal(mode="colocated", decode={"replicas": 2, "max_step_tokens": 256}))
    assert config.is_colocated
    assert (config.prefill.replicas, config.prefill.max_replicas) == (0, 0)
    assert config.decode.replicas == 2 and config.decode.max_step_tokens == 256


def test_disaggregation_keys():
    config = parse_config(_minimal(router={"disaggregation": {
        "min_prefill_tokens": 64, "prefill_when_saturated": True, "saturated_queued_tokens": 1000}}))
    rule = config.router.disaggregation
    assert (rule.min_prefill_tokens, rule.prefill_when_saturated, rule.saturated_queued_tokens) == (64, True, 1000)
    assert rule.is_local(63, is_prefill_saturated=False)
    assert not rule.is_local(64, is_prefill_saturated=False)
    assert rule.is_local(64, is_prefill_saturated=True)
    assert not DisaggregationSection(min_prefill_tokens=64).is_local(100, is_prefill_saturated=True)


def test_step_budget_defaults_to_the_gpu_value_on_a_gpu_tier_and_covers_max_num_seqs():
    gpu = parse_config(_minimal(decode={"resources": {"num_gpus": 1}}))
    assert gpu.decode.max_step_tokens == 2048
    big_batch = parse_config(_minimal(decode={"max_num_seqs": 400}))
    assert big_batch.decode.max_step_tokens == 800


@pytest.mark.parametrize("raw, key, words", [
    (_minimal(mode="hybrid"), "mode", "disaggregated, colocated"),
    (_minimal(mode="colocated", prefill={"replicas": 1}), "prefill", "remove the prefill section"),
    (_minimal(mode="colocated", router={"disaggregation": {"min_prefill_tokens": 8}}), "router.disaggregation",
     "applies to mode: disaggregated"),
    (_minimal(router={"disaggregation": {"min_prompt_tokens": 8}}), "router.disaggregation.min_prompt_tokens",
     "unknown key"),
    (_minimal(router={"disaggregation": {"min_prefill_tokens": -1}}), "router.disaggregation.min_prefill_tokens",
     ">= 0"),
    (_minimal(router={"disaggregation": {"prefill_when_saturated": "yes"}}),
     "router.disaggregation.prefill_when_saturated", "true or false"),
    (_minimal(router={"disaggregation": {"saturated_queued_tokens": 1.5}}),
     "router.disaggregation.saturated_queued_tokens", "integer"),
    (_minimal(router={"disaggregation": [1]}), "router.disaggregation", "mapping"),
    (_minimal(decode={"max_step_tokens": 0}), "decode.max_step_tokens", ">= 1"),
    (_minimal(decode={"max_step_tokens": 64, "max_num_seqs": 64}), "decode.max_step_tokens",
     "larger than decode.max_num_seqs"),
    (_minimal(prefill={"max_step_tokens": 512}), "prefill.max_step_tokens", "max_batch_tokens"),
])
def test_bad_values_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert error.value.key == key
    assert words in str(error.value)
