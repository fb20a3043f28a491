"""Multi-turn chat through a real local cluster with two prefill replicas, the prefix cache on and `prefix-aware`
prefill routing: every follow-up turn (previous prompt + answer + new user tokens) goes to the prefill replica that
prefilled the conversation before, reuses its cached prefix (reported per request as usage.cached_prompt_tokens and
in the replica's stats), and the greedy output still equals transformers' on the whole prompt."""

from __future__ import annotations

import dataclasses
import random

import grpc
import pytest
import ray

from orchestrator.serve import RunningCluster
from protos import generation_pb2, generation_pb2_grpc

from e2e_helpers import cluster_config, generate_concurrently, hf_greedy, make_model_dir

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 10
NUM_CONVERSATIONS = 4
NUM_TURNS = 3
CACHE_BLOCK_SIZE = 8


@pytest.fixture(scope="module")
def prefix_cluster(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    config = cluster_config(model_dir)
    prefill = dataclasses.replace(
        config.prefill, replicas=2, resources={"num_cpus": 0.25}, policy="prefix-aware",
        prefix_cache=dataclasses.replace(config.prefill.prefix_cache, max_tokens=4096, block_size=CACHE_BLOCK_SIZE),
        prefix_routing=dataclasses.replace(config.prefill.prefix_routing, max_imbalance=8))
    config = dataclasses.replace(config, prefill=prefill,
                                 decode=dataclasses.replace(config.decode, resources={"num_cpus": 0.25}))
    with RunningCluster(config) as cluster:
        yield cluster, model_dir


def _generate(address: str, prompt: list[int]) -> tuple[list[int], generation_pb2.GenerateResponse]:
    """One greedy request over the raw gRPC API (its Usage carries cached_prompt_tokens)."""
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(token_ids=prompt,
                                                 sampling=generation_pb2.SamplingOptions(max_tokens=MAX_NEW_TOKENS))
        tokens, last = [], None
        for response in stub.Generate(request, timeout=120):
            tokens.extend(response.token_ids)
            last = response
    return tokens, last


def _prefill_stats(cluster) -> dict[str, dict]:
    return {h.replica_id: ray.get(h.actor.get_stats.remote(), timeout=30) for h in cluster.deployment.replicas("prefill")}


def test_follow_up_turns_land_on_the_replica_holding_the_prefix_and_stay_exact(prefix_cluster):
    cluster, model_dir = prefix_cluster
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(20, 40))] for _ in range(NUM_CONVERSATIONS)]
    # Turn 1 of every conversation at once: the router spreads them over both prefill replicas (nothing cached).
    first = generate_concurrently(cluster.address, prompts, max_tokens=MAX_NEW_TOKENS)
    home = [last.prefill_replica for _, last in first]
    assert set(home) == {"prefill-0", "prefill-1"}, f"turn 1 should use both replicas, got {home}"
    answers = [tokens for tokens, _ in first]
    expected = hf_greedy(model_dir, prompts, MAX_NEW_TOKENS)
    assert answers == expected

    num_follow_ups = num_cached = 0
    for turn in range(1, NUM_TURNS):
        for conversation in range(NUM_CONVERSATIONS):
            previous = prompts[conversation]
            prompt = previous + answers[conversation] + [rng.randrange(3, 256) for _ in range(6)]
            # One at a time, so least-loaded would send every one of them to prefill-0: only the prefix decides.
            tokens, last = _generate(cluster.address, prompt)
            assert last.prefill_replica == home[conversation], f"conversation {conversation} turn {turn} moved"
            cached = last.usage.cached_prompt_tokens
            # At least the previous prompt's full blocks were reused, and never the whole prompt.
            assert len(previous) - len(previous) % CACHE_BLOCK_SIZE <= cached < len(prompt), (turn, cached)
            assert cached % CACHE_BLOCK_SIZE == 0
            assert last.usage.prompt_tokens == len(prompt)
            assert tokens == hf_greedy(model_dir, [prompt], MAX_NEW_TOKENS)[0], f"turn {turn} diverged"
            prompts[conversation], answers[conversation] = prompt, tokens
            num_follow_ups += 1
            num_cached += cached

    stats = _prefill_stats(cluster)
    assert sum(s["prefix_cache_hits"] for s in stats.values()) == num_follow_ups
    assert sum(s["prefix_cache_misses"] for s in stats.values()) == NUM_CONVERSATIONS
    assert sum(s["prefix_cache_cached_tokens"] for s in stats.values()) == num_cached
    for replica_id, s in stats.items():
        assert s["prefix_cache_enabled"] and 0 < s["prefix_cache_stored_tokens"] <= s["prefix_cache_max_tokens"]
        # Follow-ups replaced the turns they extended: one entry per conversation that lives there.
        assert s["prefix_cache_entries"] == home.count(replica_id)


# ---- multi-rank prefill meshes -----------------------------------------------------------------------------------

PREFILL_MESHES = ({"cp": 2, "pp": 2}, {"tp": 2})  # cp > 1: a hit's KV leaves from the store after the forward


@pytest.fixture(scope="module")
def mesh_cluster(ray_local, tmp_path_factory):
    from orchestrator.config import MeshSection

    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    config = cluster_config(model_dir)
    ranks = {"num_cpus": 0.25}
    prefill = dataclasses.replace(
        config.prefill, mesh=MeshSection(**PREFILL_MESHES[0]), resources=ranks,
        prefix_cache=dataclasses.replace(config.prefill.prefix_cache, max_tokens=4096, block_size=CACHE_BLOCK_SIZE))
    config = dataclasses.replace(config, prefill=prefill, decode=dataclasses.replace(
        config.decode, mesh=MeshSection(tp=2), resources=ranks))
    with RunningCluster(config) as cluster:
        cluster.deployment.add_replicas([dataclasses.replace(prefill, mesh=MeshSection(**PREFILL_MESHES[1]))])
        yield cluster, model_dir


@pytest.mark.parametrize("mesh_index", range(len(PREFILL_MESHES)),
                         ids=["".join(f"{k}{v}" for k, v in m.items()) for m in PREFILL_MESHES])
def test_cached_turns_on_multi_rank_prefill_meshes_equal_transformers(mesh_cluster, mesh_index):
    cluster, model_dir = mesh_cluster
    replica_id = f"prefill-{mesh_index}"
    for handle in cluster.deployment.prefill:  # only this replica in rotation (as a draining one leaves it)
        handle.state = "ready" if handle.replica_id == replica_id else "draining"
    rng = random.Random(100 + mesh_index)
    prompt = [rng.randrange(3, 256) for _ in range(29)]
    for turn in range(NUM_TURNS):
        tokens, last = _generate(cluster.address, prompt)
        assert last.prefill_replica == replica_id
        assert tokens == hf_greedy(model_dir, [prompt], MAX_NEW_TOKENS)[0], f"turn {turn} diverged"
        cached = last.usage.cached_prompt_tokens
        assert (cached == 0) if turn == 0 else (cached >= CACHE_BLOCK_SIZE * 3), (turn, cached)
        prompt = prompt + tokens + [rng.randrange(3, 256) for _ in range(5)]
    stats = ray.get(next(h for h in cluster.deployment.prefill if h.replica_id == replica_id)
                    .actor.get_stats.remote(), timeout=30)
    assert stats["prefix_cache_hits"] == NUM_TURNS - 1 and stats["prefix_cache_misses"] == 1
