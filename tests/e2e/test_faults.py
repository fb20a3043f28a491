"""Faults on a live cluster: replica processes are SIGKILLed while clients wait.

Two replicas per tier, so a request whose replica dies is retried on the other one (re-prefilling the prompt plus
the tokens already streamed); the client sees one unbroken stream equal to the reference. Ray restarts the dead
replica, the router's health loop takes it back into rotation, status shows the failure and the restart, and
every KV block pool ends full.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import pytest
import ray

from e2e_helpers import cluster_config, hf_greedy, make_model_dir
from orchestrator.client import Client
from orchestrator.serve import RunningCluster

pytestmark = pytest.mark.slow

PROMPT = list(range(20, 60))
MAX_TOKENS = 80


def _pid(handle) -> int:
    return ray.get(handle.actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def two_by_two(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    config = cluster_config(model_dir, router={"replica_timeout_s": 10.0})
    config = dataclasses.replace(
        config,
        prefill=dataclasses.replace(config.prefill, replicas=2, max_restarts=2, resources={"num_cpus": 0.25}),
        decode=dataclasses.replace(config.decode, replicas=2, max_restarts=2, resources={"num_cpus": 0.25}))
    expected = hf_greedy(model_dir, [PROMPT], MAX_TOKENS)[0]
    with RunningCluster(config) as cluster:
        yield cluster, expected


def _replica(cluster, replica_id):
    return next(h for tier in ("prefill", "decode") for h in cluster.deployment.replicas(tier)
                if h.replica_id == replica_id)


def _back_in_rotation(cluster, replica_id):
    def check():
        status = cluster.status()
        replica = next(r for tier in ("prefill", "decode") for r in status[tier] if r["id"] == replica_id)
        return replica if replica["state"] == "ready" and replica["restarts"] >= 1 else None
    return _wait_for(check, 60, f"{replica_id} to be restarted and back in rotation")


def _all_blocks_free(cluster):
    def check():
        return all(r["kv_blocks"]["num_free"] == r["kv_blocks"]["num_total"] for r in cluster.status()["decode"])
    _wait_for(check, 20, "every decode replica's KV pool to be full again")


def test_decode_killed_mid_stream_is_retried_transparently(two_by_two):
    cluster, expected = two_by_two
    tokens, chunks = [], []
    started = time.monotonic()
    with Client(cluster.address) as client:
        for chunk in client.generate(token_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True):
            chunks.append(chunk)
            tokens.extend(chunk.token_ids)
            if len(chunks) == 3:  # mid-stream: kill the decode replica serving this request
                victim = next(r["id"] for r in cluster.status()["decode"] if r["load"]["num_running"])
                os.kill(_pid(_replica(cluster, victim)), signal.SIGKILL)
    assert time.monotonic() - started < 30  # the stream ended within the bound, not after minutes
    assert tokens == expected  # one unbroken stream: nothing lost, nothing repeated
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].decode_replica != victim  # the rest of the stream came from the other replica
    replica = _back_in_rotation(cluster, victim)
    assert replica["failures"] >= 1
    _all_blocks_free(cluster)


def test_prefill_killed_requests_still_complete(two_by_two):
    cluster, expected = two_by_two
    victim = "prefill-0"  # the least-loaded policy tries it first when both prefill replicas are idle
    os.kill(_pid(_replica(cluster, victim)), signal.SIGKILL)
    results = []

    def one():
        with Client(cluster.address) as client:
            results.append([t for c in client.generate(token_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
                            for t in c.token_ids])

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [expected] * 3
    _back_in_rotation(cluster, victim)
    _all_blocks_free(cluster)


def test_no_replica_left_fails_with_unavailable_and_a_message(ray_local, tmp_path_factory):
    import grpc

    from orchestrator.client import PdclusterError

    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    config = cluster_config(model_dir)
    config = dataclasses.replace(config, decode=dataclasses.replace(config.decode, max_restarts=0))
    with RunningCluster(config) as cluster:
        os.kill(_pid(cluster.deployment.replicas("decode")[0]), signal.SIGKILL)
        started = time.monotonic()
        with Client(cluster.address) as client:
            with pytest.raises(PdclusterError) as err:
                list(client.generate(token_ids=PROMPT, max_tokens=8))
        assert time.monotonic() - started < 30
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "decode" in err.value.message
