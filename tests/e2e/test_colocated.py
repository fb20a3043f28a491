"""Colocated mode and conditional disaggregation on real local clusters, through gRPC, checked against transformers.

- `mode: colocated`: no prefill tier; every prompt is prefilled on a decode replica in chunks mixed into its decode
  steps (a small decode.max_step_tokens, so the long prompts really span several steps next to running streams).
- `router.disaggregation.min_prefill_tokens`: short prompts are prefilled on their decode replica, the others go
  through the prefill tier and their KV over UCX; both kinds in one concurrent batch. That decode replica is a
  two-stage pipeline (pp 2), so mixed decode + chunk steps also run micro-batched over two rank actors.
Greedy output equals transformers either way, the final message says where the prefill ran, a decode replica killed
mid-stream is retried transparently, seeded streams are the same whichever way the prompt was prefilled, and every
KV pool is full again afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time

import pytest
import ray

from e2e_helpers import cluster_config, generate_concurrently, hf_greedy, make_model_dir
from orchestrator.client import Client
from orchestrator.config import MeshSection, TierSection
from orchestrator.config_colocate import DisaggregationSection
from orchestrator.serve import RunningCluster

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 16
PROMPT_LENGTHS = [1, 5, 13, 40, 97]
MIN_PREFILL_TOKENS = 20  # conditional cluster: the 1, 5 and 13 token prompts stay on the decode replica


def _prompts() -> list[list[int]]:
    rng = random.Random(4321)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="module")
def expected(model_dir):
    return hf_greedy(model_dir, _prompts(), MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def colocated(ray_local, model_dir):
    base = cluster_config(model_dir, router={"replica_timeout_s": 10.0})
    config = dataclasses.replace(
        base, mode="colocated",
        prefill=TierSection(name="prefill", replicas=0, min_replicas=0, max_replicas=0),
        # 16-token steps: the 97-token prompt takes 7 steps while the other streams keep decoding
        decode=dataclasses.replace(base.decode, replicas=2, max_restarts=2, max_num_seqs=8, max_step_tokens=16,
                                   resources={"num_cpus": 0.25}))
    with RunningCluster(config) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def conditional(ray_local, model_dir):
    base = cluster_config(model_dir)
    config = dataclasses.replace(
        base, router=dataclasses.replace(base.router,
                                         disaggregation=DisaggregationSection(min_prefill_tokens=MIN_PREFILL_TOKENS)),
        decode=dataclasses.replace(base.decode, max_num_seqs=8, max_step_tokens=32, mesh=MeshSection(pp=2),
                                   resources={"num_cpus": 0.25}))
    with RunningCluster(config) as cluster:
        yield cluster


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _all_blocks_free(cluster) -> None:
    def check():
        return all(r["kv_blocks"]["num_free"] == r["kv_blocks"]["num_total"] for r in cluster.status()["decode"])
    _wait_for(check, 20, "every decode replica's KV pool to be full again")


def test_colocated_greedy_output_equals_transformers(colocated, expected):
    prompts = _prompts()
    results = generate_concurrently(colocated.address, prompts, max_tokens=MAX_NEW_TOKENS)
    for prompt, (tokens, last), ref in zip(prompts, results, expected):
        assert tokens == ref, f"prompt of {len(prompt)} tokens diverged from transformers"
        assert last.finish_reason == ("length" if len(ref) == MAX_NEW_TOKENS else "stop")
        assert last.prefill_replica.startswith("decode-")  # prefilled where it was decoded
        assert last.prefill_replica == last.decode_replica
        assert last.timings["kv_bytes"] == 0 and last.timings["ttft_ms"] > 0
    status = Client(colocated.address).status()
    assert status["prefill"] == [] and len(status["decode"]) == 2  # no prefill tier was deployed
    _all_blocks_free(colocated)


def test_colocated_decode_killed_mid_stream_is_retried_transparently(colocated, model_dir):
    prompt = list(range(20, 60))
    max_tokens = 60
    reference = hf_greedy(model_dir, [prompt], max_tokens)[0]
    tokens, chunks, victim = [], [], None
    with Client(colocated.address) as client:
        for chunk in client.generate(token_ids=prompt, max_tokens=max_tokens, ignore_eos=True):
            chunks.append(chunk)
            tokens.extend(chunk.token_ids)
            if len(chunks) == 3:
                victim = next(r["id"] for r in colocated.status()["decode"] if r["load"]["num_running"])
                handle = next(h for h in colocated.deployment.replicas("decode") if h.replica_id == victim)
                os.kill(ray.get(handle.actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30),
                        signal.SIGKILL)
    assert victim is not None
    assert tokens == reference[:len(tokens)] and len(tokens) == max_tokens  # one unbroken stream
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].decode_replica != victim and chunks[-1].prefill_replica == chunks[-1].decode_replica
    _wait_for(lambda: all(r["state"] == "ready" for r in colocated.status()["decode"]), 60,
              f"{victim} to be back in rotation")
    _all_blocks_free(colocated)


def test_conditional_disaggregation_prefills_short_prompts_on_the_decode_replica(conditional, expected):
    prompts = _prompts()
    results = generate_concurrently(conditional.address, prompts, max_tokens=MAX_NEW_TOKENS)
    for prompt, (tokens, last), ref in zip(prompts, results, expected):
        assert tokens == ref, f"prompt of {len(prompt)} tokens diverged from transformers"
        if len(prompt) < MIN_PREFILL_TOKENS:
            assert last.prefill_replica == "decode-0" and last.timings["kv_bytes"] == 0
        else:
            assert last.prefill_replica == "prefill-0" and last.decode_replica == "decode-0"
            assert last.timings["kv_bytes"] > 0  # the prompt's KV travelled from the prefill tier
    _all_blocks_free(conditional)


def test_seeded_stream_is_the_same_prefilled_locally_or_by_the_prefill_tier(colocated, conditional):
    prompt = list(range(30, 70))  # 40 tokens: the prefill tier on the conditional cluster, local on the colocated
    options = dict(token_ids=prompt, max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    streams, where = [], []
    for cluster in (colocated, conditional):
        with Client(cluster.address) as client:
            chunks = list(client.generate(**options))
        streams.append([t for c in chunks for t in c.token_ids])
        where.append(chunks[-1].prefill_replica)
    assert where[0].startswith("decode-") and where[1] == "prefill-0"
    assert streams[0] == streams[1] and len(streams[0]) == 12


@pytest.fixture(scope="module")
def saturating(ray_local, model_dir):
    """Every prompt may use the prefill tier, but only while no prompt token is in flight there (threshold 0): the
    first of a concurrent batch goes to the prefill tier, the ones that arrive while it is busy are prefilled on the
    decode replica."""
    base = cluster_config(model_dir)
    rule = DisaggregationSection(min_prefill_tokens=0, prefill_when_saturated=True, saturated_queued_tokens=0)
    config = dataclasses.replace(base, router=dataclasses.replace(base.router, disaggregation=rule),
                                 decode=dataclasses.replace(base.decode, max_num_seqs=8, max_step_tokens=32))
    with RunningCluster(config) as cluster:
        yield cluster


def test_a_saturated_prefill_tier_sends_prompts_to_the_decode_replica(saturating, expected):
    prompts = _prompts()
    results = generate_concurrently(saturating.address, prompts, max_tokens=MAX_NEW_TOKENS)
    where = [last.prefill_replica for _, last in results]
    for prompt, (tokens, last), ref in zip(prompts, results, expected):
        assert tokens == ref, f"prompt of {len(prompt)} tokens diverged from transformers"
        assert (last.timings["kv_bytes"] > 0) == (last.prefill_replica == "prefill-0")
    assert "prefill-0" in where, where  # the first request found the prefill tier idle
    assert "decode-0" in where, where  # later ones found it busy and stayed on the decode replica
    _all_blocks_free(saturating)
