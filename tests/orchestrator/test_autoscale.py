"""The autoscale block of cluster.yaml and the planner's decisions against scripted measurements (no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.autoscale import TierObservation, TierPlanner, observe, percentile
from orchestrator.autoscale_config import AutoscaleSection, LatencyTarget
from orchestrator.config import ConfigError, parse_config
from orchestrator.request_log import RequestRecord


def _policy(**overrides) -> AutoscaleSection:
    fields = dict(targets=(LatencyTarget(metric="ttft", percentile=90, limit_ms=1000),),
                  min_replicas=1, max_replicas=4, cooldown_s=30, window_s=10, min_samples=5)
    fields.update(overrides)
    return AutoscaleSection(**fields)


def _obs(num_replicas=1, *, ttft_ms=(), tpot_ms=(), service_s=0.1, decode_s=None, num_arrived=None,
         num_rejected=0, num_queued=0, window_s=10.0, max_num_seqs=64) -> TierObservation:
    ttft_ms, tpot_ms = list(ttft_ms), list(tpot_ms)
    completed = max(len(ttft_ms), len(tpot_ms))
    return TierObservation(tier="prefill", num_replicas=num_replicas, window_s=window_s,
                           num_arrived=completed + num_rejected if num_arrived is None else num_arrived,
                           num_completed=completed, num_rejected=num_rejected, num_queued=num_queued,
                           latency_ms={"ttft": ttft_ms, "tpot": tpot_ms},
                           mean_service_s=service_s if completed else None,
                           mean_decode_s=decode_s, max_num_seqs=max_num_seqs)


# ---- config -------------------------------------------------------------------------------------------------

def _raw(**tier):
    return {"model": {"path": "/models/x"}, "prefill": tier}


def test_autoscale_block_parses_targets_bounds_and_defaults():
    config = parse_config({"model": {"path": "/m"},
                           "prefill": {"autoscale": {"ttft_p90_ms": 800, "max_replicas": 3, "interval_s": 2}},
                           "decode": {"replicas": 2, "autoscale": {"tpot_p99_ms": 25, "tpot_p50_ms": 10,
                                                                   "min_replicas": 2, "max_replicas": 4,
                                                                   "cooldown_s": 0}}})
    prefill, decode = config.prefill.autoscale, config.decode.autoscale
    assert prefill.targets == (LatencyTarget(metric="ttft", percentile=90, limit_ms=800),)
    assert (prefill.min_replicas, prefill.max_replicas, prefill.interval_s, prefill.cooldown_s) == (1, 3, 2, 60)
    assert [t.key for t in decode.targets] == ["tpot_p50_ms", "tpot_p99_ms"]
    assert (decode.min_replicas, decode.cooldown_s) == (2, 0)
    assert parse_config({"model": {"path": "/m"}}).prefill.autoscale is None


def test_autoscale_bounds_default_to_the_tiers():
    config = parse_config(_raw(min_replicas=2, max_replicas=5, replicas=2, autoscale={"ttft_p90_ms": 500}))
    assert (config.prefill.autoscale.min_replicas, config.prefill.autoscale.max_replicas) == (2, 5)


@pytest.mark.parametrize("autoscale, key, words", [
    ({"max_replicas": 2}, "prefill.autoscale", "at least one latency target"),
    ({"ttft_p90_ms": 500}, "prefill.autoscale.max_replicas", "missing"),
    ({"ttft_p90_ms": 0, "max_replicas": 2}, "prefill.autoscale.ttft_p90_ms", "> 0"),
    ({"ttft_p90_ms": "1s", "max_replicas": 2}, "prefill.autoscale.ttft_p90_ms", "number"),
    ({"ttft_p90_ms": 500, "max_replicas": 2, "min_replicas": 3}, "prefill.autoscale.min_replicas", "above"),
    ({"ttft_p90_ms": 500, "max_replicas": 2, "intervl_s": 3}, "prefill.autoscale.intervl_s", "unknown key"),
    ({"ttft_p90_ms": 500, "max_replicas": 2, "interval_s": -1}, "prefill.autoscale.interval_s", "> 0"),
    ({"ttft_p90_ms": 500, "max_replicas": 2, "target_utilization": 1.5},
     "prefill.autoscale.target_utilization", "(0, 1]"),
    ({"ttft_p0_ms": 500, "max_replicas": 2}, "prefill.autoscale.ttft_p0_ms", "between 0 and 100"),
    ({"ttft_p90_ms": 500, "min_replicas": 2, "max_replicas": 3}, "prefill.replicas", "outside the autoscale"),
    ([1], "prefill.autoscale", "mapping"),
])
def test_autoscale_errors_name_the_key(autoscale, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config(_raw(autoscale=autoscale))
    assert err.value.key == key
    assert words in str(err.value)


# ---- measurement ------------------------------------------------------------------------------------------

def _record(end_time, *, outcome="length", ttft_ms=100.0, tpot_ms=10.0, prefill="p0", decode="d0",
            completion_tokens=8, prefill_ms=50.0, kv_ms=10.0):
    e2e = ttft_ms + tpot_ms * (completion_tokens - 1)
    return RequestRecord(request_id="r", outcome=outcome, code="OK" if outcome in ("stop", "length") else "X",
                         prefill_replica=prefill, decode_replica=decode, completion_tokens=completion_tokens,
                         prefill_ms=prefill_ms, kv_transfer_ms=kv_ms, ttft_ms=ttft_ms, tpot_ms=tpot_ms,
                         e2e_ms=e2e, end_time=end_time)


def test_observe_keeps_the_window_and_the_tiers_requests():
    records = [_record(95.0), _record(99.0, ttft_ms=300), _record(80.0),  # 80: before the window
               _record(98.0, outcome="rejected", prefill="", decode=""),
               _record(97.0, outcome="cancelled"), _record(96.0, decode="", completion_tokens=1)]
    prefill = observe(records, tier="prefill", now=100.0, window_s=10.0, num_replicas=2, num_queued=3)
    assert (prefill.num_arrived, prefill.num_completed, prefill.num_rejected) == (5, 3, 1)
    assert sorted(prefill.latency_ms["ttft"]) == [100.0, 100.0, 300.0]
    assert prefill.mean_service_s == pytest.approx(0.06)
    assert prefill.demand_rps == pytest.approx((5 + 3) / 10)
    decode = observe(records, tier="decode", now=100.0, window_s=10.0, num_replicas=1)
    assert decode.num_completed == 2  # the prefill-only request never reached a decode replica
    assert decode.latency_ms["tpot"] == [10.0, 10.0]
    assert decode.mean_decode_s == pytest.approx(0.07)


def test_percentile_is_nearest_rank():
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile(list(range(1, 11)), 90) == 9
    assert percentile([7.0], 99) == 7.0


# ---- decisions --------------------------------------------------------------------------------------------

def test_ttft_breach_scales_up_with_the_reason():
    planner = TierPlanner("prefill", _policy())
    decision = planner.step(_obs(1, ttft_ms=[1500] * 10), now=0.0)
    assert (decision.action, decision.from_replicas) == ("up", 1)
    assert decision.to_replicas >= 2
    assert "ttft_p90_ms 1500 ms > 1000 ms" in decision.reason


def test_capacity_estimate_sizes_the_step():
    # s = 0.1 s, p90 within 1 s: one replica sustains 1/0.1 - ln(10)/1 = 7.7 req/s; 40 req/s at 80% -> 7
    planner = TierPlanner("prefill", _policy(max_replicas=10))
    decision = planner.step(_obs(1, ttft_ms=[400] * 10, service_s=0.1, num_queued=390), now=0.0)
    assert decision.demand_rps == pytest.approx(40.0)
    assert decision.capacity_rps == pytest.approx(10 - 2.302585, rel=1e-3)
    assert decision.to_replicas == 7 and decision.action == "up"
    assert "demand needs 7" in decision.reason


def test_a_met_target_at_high_rate_raises_the_estimate_above_the_model():
    # 40 req/s served at p90 400 ms (batching): capacity at least 40 x 1000 / 400 = 100, so no scale-up
    decision = TierPlanner("prefill", _policy()).step(_obs(1, ttft_ms=[400] * 400, service_s=0.1), now=0.0)
    assert decision.capacity_rps == pytest.approx(100.0)
    assert decision.action == "hold" and "targets met" in decision.reason


def test_idle_tier_scales_down_one_at_a_time_to_min():
    planner = TierPlanner("prefill", _policy(cooldown_s=0, min_replicas=1))
    assert planner.step(_obs(3), now=0.0).to_replicas == 2
    down = planner.step(_obs(2), now=1.0)
    assert (down.action, down.to_replicas) == ("down", 1) and "idle" in down.reason
    assert planner.step(_obs(1), now=2.0).action == "hold"


def test_bounds_hold_at_max_and_report_it():
    planner = TierPlanner("prefill", _policy(max_replicas=2))
    decision = planner.step(_obs(2, ttft_ms=[3000] * 10), now=0.0)
    assert decision.action == "hold" and "max_replicas (2)" in decision.reason
    big = TierPlanner("prefill", _policy(max_replicas=3)).step(_obs(1, ttft_ms=[3000] * 100, service_s=2.0), 0.0)
    assert big.capacity_rps == 0.0 and big.to_replicas == 3  # out of reach of one replica: as many as allowed


def test_cooldown_holds_a_second_change():
    planner = TierPlanner("prefill", _policy(cooldown_s=30))
    assert planner.step(_obs(1, ttft_ms=[1500] * 10), now=0.0).action == "up"
    held = planner.step(_obs(2, ttft_ms=[1500] * 10), now=10.0)
    assert held.action == "hold" and held.to_replicas == 2 and "cooldown (20 s left)" in held.reason
    assert planner.step(_obs(2, ttft_ms=[1500] * 10), now=31.0).action == "up"


def test_hysteresis_keeps_replicas_while_latency_is_near_the_target():
    planner = TierPlanner("prefill", _policy(scale_down_margin=0.6))
    # low demand (fits one replica) but p90 at 700 ms, above 0.6 x 1000: stay at 2
    near = planner.step(_obs(2, ttft_ms=[700] * 10, service_s=0.05), now=0.0)
    assert near.action == "hold" and "not scaling down" in near.reason
    far = planner.step(_obs(2, ttft_ms=[200] * 10, service_s=0.05), now=1.0)
    assert (far.action, far.to_replicas) == ("down", 1)


def test_queue_blocks_scale_down():
    planner = TierPlanner("prefill", _policy())
    decision = planner.step(_obs(2, ttft_ms=[100] * 10, service_s=0.05, num_queued=4), now=0.0)
    assert decision.action == "hold" and "queued" in decision.reason


def test_too_few_samples_are_not_judged_but_rejections_are():
    planner = TierPlanner("prefill", _policy(min_samples=5))
    few = planner.step(_obs(1, ttft_ms=[5000] * 2), now=0.0)
    assert few.action == "hold" and "min_samples" in few.reason
    rejected = planner.step(_obs(1, num_rejected=3), now=1.0)
    assert rejected.action == "up" and "rejected" in rejected.reason


def test_tpot_capacity_from_the_floor_and_the_current_concurrency():
    policy = _policy(targets=(LatencyTarget(metric="tpot", percentile=90, limit_ms=25),), max_replicas=8)
    planner = TierPlanner("decode", policy)
    # an idle-ish window teaches the floor: 10 ms
    planner.step(_obs(1, ttft_ms=[50] * 5, tpot_ms=[10] * 5, decode_s=1.0), now=0.0)
    assert planner.tpot_floor_ms == 10
    # 100 requests in 10 s of 2 s decode each: 20 sequences per replica at p90 20 ms -> 0.5 ms per sequence;
    # 25 ms allows 30 sequences: 15 req/s per replica; demand 10 req/s at 80% -> 1 replica
    decision = planner.step(_obs(1, ttft_ms=[50] * 100, tpot_ms=[20] * 100, decode_s=2.0), now=100.0)
    assert decision.capacity_rps == pytest.approx(15.0)
    assert decision.action == "hold"
    # twice that traffic at 40 ms breaches: 40 sequences, 0.75 ms each above the floor, so 20 fit in 25 ms:
    # 10 req/s per replica; 20 req/s at 80% -> 3 replicas
    hot = planner.step(_obs(1, ttft_ms=[50] * 200, tpot_ms=[40] * 200, decode_s=2.0), now=200.0)
    assert hot.action == "up" and "tpot_p90_ms 40 ms > 25 ms" in hot.reason
    assert hot.capacity_rps == pytest.approx(10.0) and hot.to_replicas == 3


def test_outside_bounds_is_brought_back():
    planner = TierPlanner("prefill", _policy(min_replicas=2, max_replicas=3))
    assert planner.step(_obs(1), now=0.0).to_replicas == 2
    assert TierPlanner("prefill", _policy(max_replicas=3)).step(_obs(5), now=0.0).to_replicas == 3


def test_section_validates_itself():
    with pytest.raises(ValueError, match="at least one target"):
        AutoscaleSection(targets=(), max_replicas=2)
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        _policy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="percentile"):
        LatencyTarget(metric="ttft", percentile=100, limit_ms=5)


# ---- status ------------------------------------------------------------------------------------------------

def test_decisions_reach_pdcluster_status_through_the_message():
    from orchestrator.cli_client import format_status_table
    from orchestrator.client_status import status_from_proto, status_to_proto

    planner = TierPlanner("prefill", _policy())
    change = planner.step(_obs(1, ttft_ms=[1500] * 10), now=1_700_000_000.0)
    from orchestrator.autoscale_runner import _row

    status = {"model": "m", "prefill": [], "decode": [],
              "autoscale": [_row(change, latest=True), _row(change, latest=False)]}
    message = status_to_proto(status, max_context_len=64, num_inflight=0)
    decoded = status_from_proto(type(message).FromString(message.SerializeToString()))
    assert decoded["autoscale"][0]["reason"] == change.reason
    assert decoded["autoscale"][0]["to_replicas"] == change.to_replicas and decoded["autoscale"][0]["is_latest"]
    decoded["prefill"] = [{"id": "prefill-0", "state": "ready", "node": "n", "accelerator": "CPU",
                           "mesh": {"tp": 1, "cp": 1, "pp": 1, "ep": 1}, "load": {"num_queued": 0, "num_running": 0},
                           "kv_blocks": {"num_free": 0, "num_total": 0}}]
    table = format_status_table(decoded)
    assert "autoscale" in table and "prefill up   1 -> " in table and "ttft_p90_ms 1500 ms > 1000 ms" in table
    assert "22:13:20" in table  # the change's time, UTC
    empty = status_to_proto({"model": "m", "prefill": [], "decode": []}, max_context_len=64, num_inflight=0)
    assert "autoscale" not in status_from_proto(empty)


# ---- apply ----------------------------------------------------------------------------------------------------

def test_apply_of_a_changed_autoscale_block_updates_the_running_settings():
    import asyncio
    import dataclasses

    from orchestrator.apply import apply_config

    running = parse_config({"model": {"path": "/m"}, "prefill": {"autoscale": {"ttft_p90_ms": 800, "max_replicas": 3}}})
    wanted = parse_config({"model": {"path": "/m"}, "prefill": {"autoscale": {"ttft_p90_ms": 400, "max_replicas": 3}}})

    class Deployment:
        config = running

        def replicas(self, tier):
            return [type("Handle", (), {"state": "ready"})()]

        def update_tier(self, tier):
            self.config = dataclasses.replace(self.config, **{tier.name: tier})

    backend = type("Backend", (), {"deployment": Deployment(), "autoscaler": object()})()
    lines: list[str] = []
    asyncio.run(apply_config(backend, wanted, dry_run=True, report=lines.append))
    assert "prefill.autoscale would change" in lines
    assert backend.deployment.config.prefill.autoscale.targets[0].limit_ms == 800
    asyncio.run(apply_config(backend, wanted, dry_run=False, report=lines.append))
    assert backend.deployment.config.prefill.autoscale.targets[0].limit_ms == 400
    assert any("prefill.autoscale updated" in line for line in lines)
