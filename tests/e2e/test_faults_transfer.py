"""Faults during a KV transfer and inside a multi-rank replica, on a live local cluster.

Prefill: two one-rank replicas; decode: two tp=2 replicas (two rank actors each). A request's KV transfer is held
open by a test-only delay on the prefill side (fault_helpers.hold_kv_transfers: layer 0 lands, the rest waits), so
a rank can be SIGKILLed while the KV is deterministically in flight. In every case the client stream ends within
the bound cluster.yaml sets (fault_helpers.stream_bound_s) with the reference output, the dead replica is restarted
(a multi-rank one whole: its mesh formed again) and back in rotation, status shows it, and every decode KV pool is
full again with no reservation left. A tier that hangs instead of dying ends the stream with UNAVAILABLE and a message
within the same bound.
"""

from __future__ import annotations

import dataclasses

import pytest

from e2e_helpers import cluster_config, hf_greedy, make_model_dir
from fault_helpers import (BackgroundStream, all_blocks_free, back_in_rotation, hold_kv_transfers, num_held_pushes,
                           replica, sigkill, stall_decode_steps, status_of, stream_bound_s, wait_for)
from orchestrator.serve import RunningCluster

pytestmark = pytest.mark.slow

PROMPT = list(range(30, 70))
MAX_TOKENS = 48
HOLD_S = 2.0  # how long a held transfer stays open: ample time to kill a rank in the middle of it


@pytest.fixture(scope="module")
def cluster(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    config = cluster_config(model_dir, router={"replica_timeout_s": 6.0, "max_retries": 2},
                            kv_transfer={"lease_s": 10.0})
    config = dataclasses.replace(
        config,
        prefill=dataclasses.replace(config.prefill, replicas=2, max_restarts=3, resources={"num_cpus": 0.25}),
        decode=dataclasses.replace(config.decode, replicas=2, max_restarts=3, resources={"num_cpus": 0.25},
                                   mesh=dataclasses.replace(config.decode.mesh, tp=2)))
    expected = hf_greedy(model_dir, [PROMPT], MAX_TOKENS)[0]
    with RunningCluster(config) as running:
        yield running, expected


def _start_held_request(running):
    """A request whose KV transfer is in flight (held by the delay): (stream, its prefill replica id)."""
    for handle in running.deployment.replicas("prefill"):
        hold_kv_transfers(handle.actor, HOLD_S)
    stream = BackgroundStream(running.address, PROMPT, MAX_TOKENS)
    holder = wait_for(lambda: next((h for h in running.deployment.replicas("prefill")
                                    if h.state == "ready" and num_held_pushes(h.actor)), None),
                      60, "a prefill replica to hold a KV transfer")
    return stream, holder


def _release_holds(running):
    for handle in running.deployment.replicas("prefill"):
        if handle.state == "ready":
            hold_kv_transfers(handle.actor, 0)


def _assert_completed(stream, expected, bound_s):
    stream.join(bound_s + 30)
    assert stream.error is None, f"the stream failed: {stream.error!r}"
    assert stream.elapsed_s < bound_s, f"the stream took {stream.elapsed_s:.1f} s (bound {bound_s:.0f} s)"
    assert stream.tokens == expected  # one unbroken stream: nothing lost, nothing repeated
    assert stream.last.finish_reason == "length"


def test_decode_rank_killed_during_kv_transfer(cluster):
    running, expected = cluster
    stream, _ = _start_held_request(running)
    # the decode replica holding the reservation: the one with a request waiting for its KV
    victim = wait_for(lambda: next((r["id"] for r in running.status()["decode"] if r["load"]["num_queued"]), None),
                      30, "the decode reservation")
    sigkill(replica(running, victim).workers[0])  # rank 1 of the tp=2 replica, while its KV is in flight
    try:
        _assert_completed(stream, expected, stream_bound_s(running.config))
    finally:
        _release_holds(running)
    # the attempt was retried: on the other decode replica, or on the victim itself when its restart (the whole mesh:
    # Ray restarts only one-rank replicas) was already done by then
    entry = back_in_rotation(running, victim)
    assert entry["failures"] >= 1
    all_blocks_free(running)


def test_prefill_killed_during_kv_transfer(cluster):
    running, expected = cluster
    stream, holder = _start_held_request(running)
    sigkill(holder.actor)  # the prefill replica (one rank) dies with layers 1.. of the request still to send
    try:
        _assert_completed(stream, expected, stream_bound_s(running.config))
    finally:
        _release_holds(running)
    assert stream.last.prefill_replica != holder.replica_id
    back_in_rotation(running, holder.replica_id)
    all_blocks_free(running)


def test_decode_rank_killed_mid_stream_restarts_whole_replica(cluster):
    running, expected = cluster
    restarts_before = {r["id"]: r["restarts"] for r in running.status()["decode"]}
    stream = BackgroundStream(running.address, PROMPT, MAX_TOKENS)
    victim = wait_for(lambda: next((r["id"] for r in running.status()["decode"] if r["load"]["num_running"]), None),
                      60, "the request to be decoding")
    sigkill(replica(running, victim).workers[0])  # one rank of the tp=2 mesh, mid-stream
    _assert_completed(stream, expected, stream_bound_s(running.config))
    assert stream.last.decode_replica != victim  # the rest of the stream came from the other replica
    entry = back_in_rotation(running, victim, min_restarts=restarts_before[victim] + 1)
    assert entry["mesh"]["tp"] == 2
    # the restarted mesh serves again: a request now succeeds with both replicas in rotation
    again = BackgroundStream(running.address, PROMPT, MAX_TOKENS)
    _assert_completed(again, expected, stream_bound_s(running.config))
    assert status_of(running, victim)["state"] == "ready"
    all_blocks_free(running)


def test_hung_decode_tier_ends_the_stream_within_the_bound(cluster):
    """Both decode replicas alive (they answer their health checks) but making no progress: each attempt gives up
    after router.replica_timeout_s, and after max_retries the client gets UNAVAILABLE naming the replicas."""
    import grpc

    from orchestrator.client import PdclusterError

    running, _ = cluster
    for handle in running.deployment.replicas("decode"):
        stall_decode_steps(handle.actor, True)
    try:
        stream = BackgroundStream(running.address, PROMPT, MAX_TOKENS)
        bound_s = stream_bound_s(running.config)
        stream.join(bound_s + 30)
    finally:
        for handle in running.deployment.replicas("decode"):
            stall_decode_steps(handle.actor, False)
    assert isinstance(stream.error, PdclusterError), stream.error
    assert stream.error.code == grpc.StatusCode.UNAVAILABLE
    assert "decode on decode-" in stream.error.message  # says which replica failed each attempt
    # not before every attempt had its replica_timeout_s, and not after the bound
    config = running.config
    assert (config.router.max_retries + 1) * config.router.replica_timeout_s <= stream.elapsed_s < bound_s
    all_blocks_free(running)
