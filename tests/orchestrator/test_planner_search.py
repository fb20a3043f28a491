"""The placement search: refusals that name the binding constraint, and the preferences the targets imply."""

import re

import pytest

from orchestrator.planner.hardware import H100_SXM, H200, L40S
from orchestrator.planner.model_shape import ModelShape
from orchestrator.planner.search import GpuOffer, PlanInfeasible, SearchOptions, mg1_wait_s, plan
from orchestrator.planner.traffic import LengthDistribution, Traffic

GPT3 = ModelShape.from_preset("gpt3-175b")
LLAMA_8B = ModelShape.from_preset("llama-3-8b")


def traffic(*, rate=1.0, input_len="1024", output_len="256", ttft_ms=1000.0, tpot_ms=100.0) -> Traffic:
    return Traffic(arrival_rate_per_s=rate, input_lengths=LengthDistribution.parse(input_len),
                   output_lengths=LengthDistribution.parse(output_len), ttft_target_s=ttft_ms / 1e3,
                   tpot_target_s=tpot_ms / 1e3)


def test_refuses_a_tpot_below_the_memory_bandwidth_floor_and_names_it():
    with pytest.raises(PlanInfeasible) as refusal:
        plan(GPT3, traffic(tpot_ms=5), [GpuOffer(spec=H200)])
    assert refusal.value.constraint == "tpot"
    found = re.search(r"TPOT target 5 ms is below the memory-bandwidth floor ([\d.]+) ms for tp<=8", str(refusal.value))
    assert found, str(refusal.value)
    # 350 GB over 8 GPUs read at 4.22 TB/s every step: 10.3 ms, plus the KV cache of one sequence.
    assert 10.3 <= float(found.group(1)) <= 10.6


def test_refuses_a_tpot_between_the_floor_and_what_collectives_allow():
    with pytest.raises(PlanInfeasible) as refusal:
        plan(GPT3, traffic(tpot_ms=20), [GpuOffer(spec=H200)])
    assert refusal.value.constraint == "tpot"
    assert "best achievable" in str(refusal.value) and "TP collectives" in str(refusal.value)


def test_refuses_a_ttft_below_the_compute_floor():
    with pytest.raises(PlanInfeasible) as refusal:
        plan(GPT3, traffic(ttft_ms=10), [GpuOffer(spec=H200)])
    assert refusal.value.constraint == "ttft"
    assert "TTFT target 10 ms is below the compute floor" in str(refusal.value)
    assert "1024-token prompt on 8 x H200" in str(refusal.value)


def test_refuses_a_model_that_fits_no_replica():
    with pytest.raises(PlanInfeasible) as refusal:
        plan(GPT3, traffic(), [GpuOffer(spec=L40S)])
    assert refusal.value.constraint == "memory"
    assert "does not fit" in str(refusal.value) and "L40S" in str(refusal.value)
    # Allowed more GPUs per replica, it fits (pipeline stages across nodes).
    result = plan(GPT3, traffic(tpot_ms=1000, ttft_ms=5000), [GpuOffer(spec=L40S)],
                  SearchOptions(max_gpus_per_replica=16))
    assert result.decode.candidate.gpus_per_replica == 16


def test_refuses_sequences_longer_than_the_context():
    tiny = ModelShape.from_preset("tiny-llama")  # 1024 positions
    with pytest.raises(PlanInfeasible) as refusal:
        plan(tiny, traffic(input_len="1000", output_len="100"), [GpuOffer(spec=H200)])
    assert refusal.value.constraint == "context"
    assert "1100 tokens" in str(refusal.value)


def test_refuses_a_rate_the_offered_gpus_cannot_carry():
    with pytest.raises(PlanInfeasible) as refusal:
        plan(LLAMA_8B, traffic(rate=500, tpot_ms=30, ttft_ms=500), [GpuOffer(spec=H100_SXM, count=8)])
    assert refusal.value.constraint == "gpus"
    assert "500 req/s needs at least" in str(refusal.value) and "8 H100-SXM" in str(refusal.value)


def test_tighter_tpot_targets_choose_larger_tp_for_decode():
    chosen = {}
    for tpot_ms in (35, 45, 70):
        chosen[tpot_ms] = plan(GPT3, traffic(tpot_ms=tpot_ms), [GpuOffer(spec=H200)]).decode.candidate.mesh
    assert chosen[35].tp == 8
    assert chosen[45].tp == 4 and chosen[45].world_size == 4
    assert chosen[70].world_size <= chosen[45].world_size


def test_loose_targets_use_the_fewest_gpus():
    result = plan(LLAMA_8B, traffic(rate=1, ttft_ms=2000, tpot_ms=200), [GpuOffer(spec=H200)])
    assert result.prefill.num_gpus == 1 and result.decode.num_gpus == 1
    assert result.total_gpus == 2
    assert result.requests_per_s_per_gpu == pytest.approx(0.5)


def test_replicas_grow_with_the_rate_and_every_choice_meets_the_targets():
    targets = dict(ttft_ms=500, tpot_ms=30, input_len="512-4096", output_len="128:0.5,512:0.5")
    low = plan(LLAMA_8B, traffic(rate=1, **targets), [GpuOffer(spec=H200)])
    high = plan(LLAMA_8B, traffic(rate=200, **targets), [GpuOffer(spec=H200)])
    assert high.total_gpus > low.total_gpus
    for result in (low, high):
        assert result.prefill.predicted_latency_s <= 0.5 and result.decode.predicted_latency_s <= 0.030
        for tier in ("prefill", "decode"):
            for candidate in result.candidates[tier]:
                if candidate.is_kept:
                    assert candidate.memory.fits and candidate.requests_per_s > 0
                    limit = 0.5 if tier == "prefill" else 0.030
                    assert candidate.latency_s <= limit
                else:
                    assert candidate.reason  # every rejection says why
        capacity = {t: getattr(result, t).replicas * getattr(result, t).candidate.requests_per_s
                    for t in ("prefill", "decode")}
        assert min(capacity.values()) >= result.traffic.arrival_rate_per_s


def test_picks_the_gpu_type_that_meets_the_target():
    # L40S reads its 16 GB of weights at ~0.76 TB/s: over 20 ms a step, so a 10 ms TPOT needs the H200.
    result = plan(LLAMA_8B, traffic(tpot_ms=10), [GpuOffer(spec=L40S), GpuOffer(spec=H200)])
    assert result.decode.candidate.gpu.name == "H200"
    l40s = [c for c in result.candidates["decode"] if c.gpu.name == "L40S" and c.mesh.tp == 1 and c.mesh.pp == 1]
    assert not l40s[0].is_kept and l40s[0].reason.startswith("TPOT")


def test_mixture_of_experts_plans_consider_expert_parallelism():
    mixtral = ModelShape.from_preset("tiny-mixtral")
    result = plan(mixtral, traffic(input_len="200", output_len="50"), [GpuOffer(spec=H200)])
    meshes = [c.mesh for c in result.candidates["prefill"] if c.is_kept]
    assert any(mesh.ep > 1 for mesh in meshes)
    assert all(mesh.ep in (1, mesh.cp * mesh.tp) for mesh in meshes)


def test_mg1_wait_grows_with_load_and_diverges_at_saturation():
    assert mg1_wait_s(0.0, 0.1, 0.01) == 0.0
    assert mg1_wait_s(5.0, 0.1, 0.01) == pytest.approx(5.0 * 0.01 / (2 * 0.5))
    assert mg1_wait_s(10.0, 0.1, 0.01) == float("inf")
