"""The autoscaler on a live local cluster: a scripted load breaches the prefill tier's TTFT target, the planner
scales it 1 -> 2 through the apply path, the load stops, the idle tier drains back to 1; every request completes
with the reference output, and `status` shows both decisions with their reasons."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest

from e2e_helpers import cluster_config, hf_greedy, make_model_dir
from orchestrator.autoscale_config import AutoscaleSection, LatencyTarget
from orchestrator.client import Client
from orchestrator.serve import RunningCluster

pytestmark = pytest.mark.slow

MAX_TOKENS = 6


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_prefill_scales_up_under_load_and_back_when_idle(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(4, 24))] for _ in range(4)]
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    config = cluster_config(model_dir)
    # A TTFT target no CPU replica meets (1 ms): any steady load is a breach, so the scale-up is scripted by the
    # load alone, not by this machine's speed. A short window makes the tier idle soon after the load stops.
    autoscale = AutoscaleSection(targets=(LatencyTarget(metric="ttft", percentile=50, limit_ms=1.0),),
                                 min_replicas=1, max_replicas=2, interval_s=0.5, cooldown_s=1.0, window_s=2.0,
                                 min_samples=3)
    config = dataclasses.replace(config, prefill=dataclasses.replace(config.prefill, autoscale=autoscale))
    outcomes: list[tuple[int, object]] = []
    stop = threading.Event()

    with RunningCluster(config) as cluster:
        def live_prefill() -> int:
            return sum(1 for r in cluster.status()["prefill"] if r["state"] in ("starting", "ready"))

        def stream(worker: int) -> None:
            with Client(cluster.address) as client:
                i = worker
                while not stop.is_set():
                    index = i % len(prompts)
                    try:
                        tokens = [t for c in client.generate(token_ids=prompts[index], max_tokens=MAX_TOKENS)
                                  for t in c.token_ids]
                        outcomes.append((index, tokens))
                    except Exception as exc:  # recorded and asserted on below
                        outcomes.append((index, exc))
                    i += 1

        workers = [threading.Thread(target=stream, args=(w,)) for w in range(2)]
        for w in workers:
            w.start()
        try:
            _wait_for(lambda: live_prefill() == 2 and all(
                r["state"] == "ready" for r in cluster.status()["prefill"]), 40, "prefill to scale up to 2")
            served_while_scaled = len(outcomes)
            time.sleep(1.0)  # a little traffic on two replicas
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        _wait_for(lambda: live_prefill() == 1, 30, "prefill to scale back to 1 once idle")
        status = cluster.status()
        final_decode = status["decode"]

    changes = [d for d in status["autoscale"] if not d["is_latest"]]
    assert [(d["tier"], d["action"], d["from_replicas"], d["to_replicas"]) for d in changes] == [
        ("prefill", "up", 1, 2), ("prefill", "down", 2, 1)]
    assert "ttft_p50_ms" in changes[0]["reason"] and "> 1 ms" in changes[0]["reason"]
    assert "idle" in changes[1]["reason"]
    errors = [o for _, o in outcomes if isinstance(o, Exception)]
    assert not errors, f"{len(errors)} of {len(outcomes)} requests failed while scaling: {errors[:3]}"
    assert len(outcomes) > served_while_scaled >= 3
    for index, tokens in outcomes:
        assert tokens == expected[index]
    for replica in final_decode:
        assert replica["kv_blocks"]["num_free"] == replica["kv_blocks"]["num_total"]
