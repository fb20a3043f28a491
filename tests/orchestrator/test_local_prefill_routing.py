"""The router's choice of where a prompt is prefilled (ClusterBackend._is_local_prefill), without Ray: colocated mode,
the prompt-length threshold, and saturation by the router's own count of prompt tokens in flight per prefill
replica."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mesh.presets import make_model
from mesh.sampling import SamplingParams
from orchestrator.backend import RequestSpec
from orchestrator.cluster import ClusterBackend
from orchestrator.config import parse_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama", "tiny-llama")


class _Deployment:
    def __init__(self, config, num_prefill: int):
        self.config = config
        self.prefill = [SimpleNamespace(replica_id=f"prefill-{i}", state="ready", tier="prefill")
                        for i in range(num_prefill)]
        self.decode = [SimpleNamespace(replica_id="decode-0", state="ready", tier="decode")]

    def replicas(self, tier):
        return self.prefill if tier == "prefill" else self.decode


def _backend(model_dir, num_prefill=2, **raw) -> ClusterBackend:
    config = parse_config({"model": {"path": str(model_dir)}, **raw})
    return ClusterBackend(_Deployment(config, num_prefill if not config.is_colocated else 0))


def _spec(num_tokens: int) -> RequestSpec:
    return RequestSpec(request_id="r", prompt_token_ids=list(range(num_tokens)),
                       params=SamplingParams(max_tokens=4), stop=(), deadline=None)


def test_default_sends_every_prompt_to_the_prefill_tier(model_dir):
    backend = _backend(model_dir)
    assert not backend._is_local_prefill(_spec(1))
    assert not backend._is_local_prefill(_spec(5000))


def test_colocated_prefills_every_prompt_locally(model_dir):
    backend = _backend(model_dir, mode="colocated")
    assert backend._is_local_prefill(_spec(1)) and backend._is_local_prefill(_spec(5000))


def test_prompts_under_the_threshold_stay_on_the_decode_replica(model_dir):
    backend = _backend(model_dir, router={"disaggregation": {"min_prefill_tokens": 32}})
    assert backend._is_local_prefill(_spec(31))
    assert not backend._is_local_prefill(_spec(32))


def test_saturation_needs_every_ready_prefill_replica_over_the_limit(model_dir):
    backend = _backend(model_dir, router={"disaggregation": {"prefill_when_saturated": True,
                                                             "saturated_queued_tokens": 100}})
    first, second = backend.deployment.prefill
    backend._bump(first, +1, num_tokens=150)
    assert not backend._is_local_prefill(_spec(10))  # the second replica still has room
    backend._bump(second, +1, num_tokens=101)
    assert backend._is_local_prefill(_spec(10))
    second.state = "dead"  # out of rotation: only the ready ones count
    assert backend._is_local_prefill(_spec(10))
    second.state = "ready"
    backend._bump(second, -1, num_tokens=101)  # its prompt finished prefilling
    assert not backend._is_local_prefill(_spec(10))
    assert backend._prefill_queued_tokens == {"prefill-0": 150, "prefill-1": 0}


def test_saturation_is_off_unless_asked(model_dir):
    backend = _backend(model_dir, router={"disaggregation": {"saturated_queued_tokens": 0}})
    for handle in backend.deployment.prefill:
        backend._bump(handle, +1, num_tokens=10)
    assert not backend._is_local_prefill(_spec(10))
