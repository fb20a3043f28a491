"""The whole request path on a real local cluster: client SDK -> gRPC router -> prefill actor -> KV over UCX ->
decode actor -> router -> client, checked token for token against Hugging Face transformers."""

from __future__ import annotations

import time

import grpc
import pytest

from orchestrator.client import Client, PdclusterError
from orchestrator.serve import RunningCluster

from e2e_helpers import cluster_config, generate_concurrently, hf_greedy, make_model_dir

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24


def _prompts(vocab_size: int) -> list[list[int]]:
    import random

    rng = random.Random(1234)
    lengths = [1, 5, 13, 40, 97]  # different lengths in one batch; some cross several KV blocks
    return [[rng.randrange(3, min(vocab_size, 256)) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def llama_cluster(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    with RunningCluster(cluster_config(model_dir)) as cluster:
        yield cluster, model_dir


def test_greedy_output_equals_transformers_llama(llama_cluster):
    cluster, model_dir = llama_cluster
    prompts = _prompts(512)
    results = generate_concurrently(cluster.address, prompts, max_tokens=MAX_NEW_TOKENS)
    expected = hf_greedy(model_dir, prompts, MAX_NEW_TOKENS)
    for prompt, (tokens, last), ref in zip(prompts, results, expected):
        assert tokens == ref, f"prompt of {len(prompt)} tokens diverged from transformers"
        assert last.finish_reason == ("length" if len(ref) == MAX_NEW_TOKENS else "stop")
        assert last.usage["prompt_tokens"] == len(prompt)
        assert last.usage["completion_tokens"] == len(tokens)
        assert last.prefill_replica.startswith("prefill-") and last.decode_replica.startswith("decode-")
        assert last.timings["ttft_ms"] > 0
        if len(ref) > 1:
            assert last.timings["kv_bytes"] > 0  # the prompt's KV really travelled to the decode replica


def test_text_prompt_streams_text_and_stats(llama_cluster):
    cluster, _ = llama_cluster
    with Client(cluster.address) as client:
        chunks = list(client.generate("Hello, cluster", max_tokens=8, ignore_eos=True))
    assert sum(len(c.token_ids) for c in chunks) == 8
    assert chunks[-1].finish_reason == "length"
    assert len(chunks) >= 2  # streamed, not one final message
    status = Client(cluster.address).status()
    assert [r["id"] for r in status["prefill"]] == ["prefill-0"]
    assert status["decode"][0]["kv_blocks"]["num_total"] == 64


def test_seeded_sampling_is_reproducible(llama_cluster):
    cluster, _ = llama_cluster
    with Client(cluster.address) as client:
        runs = [[t for c in client.generate(token_ids=[5, 6, 7], max_tokens=12, temperature=0.9, top_p=0.9,
                                            top_k=50, seed=42, ignore_eos=True) for t in c.token_ids]
                for _ in range(2)]
        other = [t for c in client.generate(token_ids=[5, 6, 7], max_tokens=12, temperature=0.9, top_p=0.9,
                                            top_k=50, seed=43, ignore_eos=True) for t in c.token_ids]
    assert runs[0] == runs[1]
    assert runs[0] != other


def _wait_blocks_full(cluster, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        blocks = cluster.status()["decode"][0]["kv_blocks"]
        if blocks["num_free"] == blocks["num_total"] or time.monotonic() > deadline:
            return blocks
        time.sleep(0.1)


def test_client_cancel_mid_stream_frees_blocks(llama_cluster):
    cluster, _ = llama_cluster
    with Client(cluster.address) as client:
        stream = client.generate(token_ids=list(range(10, 60)), max_tokens=400, ignore_eos=True)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 3:
                break
        stream.close()  # the client goes away mid-stream
        during = cluster.status()["decode"][0]["kv_blocks"]
    blocks = _wait_blocks_full(cluster)
    assert received >= 3
    assert blocks["num_free"] == blocks["num_total"], f"KV blocks leaked after cancel: {blocks} (during: {during})"


def test_bad_input_through_the_cluster(llama_cluster):
    cluster, _ = llama_cluster
    with Client(cluster.address) as client:
        with pytest.raises(PdclusterError) as err:
            list(client.generate(token_ids=[1, 2, 99999], max_tokens=4))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in str(err.value)
        with pytest.raises(PdclusterError) as err:
            list(client.generate("hi", max_tokens=4, top_p=0.0))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in str(err.value)
        with pytest.raises(PdclusterError) as err:
            list(client.generate(token_ids=[1] * 1000, max_tokens=100))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in str(err.value)
    assert _wait_blocks_full(cluster)["num_free"] == 64


def test_kv_pool_full_is_resource_exhausted(llama_cluster):
    cluster, _ = llama_cluster
    # 64 blocks of 8 tokens = 512 token slots; a request needing more than that cannot be reserved.
    with Client(cluster.address) as client:
        with pytest.raises(PdclusterError) as err:
            list(client.generate(token_ids=[3] * 300, max_tokens=300))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV" in str(err.value)


def test_greedy_output_equals_transformers_qwen2(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-qwen2")
    prompts = _prompts(512)[:4]
    with RunningCluster(cluster_config(model_dir)) as cluster:
        results = generate_concurrently(cluster.address, prompts, max_tokens=MAX_NEW_TOKENS)
    expected = hf_greedy(model_dir, prompts, MAX_NEW_TOKENS)
    assert [tokens for tokens, _ in results] == expected


def test_first_token_stop_releases_the_reservation(llama_cluster):
    cluster, _ = llama_cluster
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    with Client(cluster.address) as client:
        first = [t for c in client.generate(token_ids=prompt, max_tokens=1) for t in c.token_ids]
        assert len(first) == 1
        # The prefill samples that same token first and it is a stop token: nothing reaches decode, and the KV
        # reservation made for the request must be released, not left waiting for a stream that never comes.
        chunks = list(client.generate(token_ids=prompt, max_tokens=16, stop_token_ids=first))
    assert chunks[-1].finish_reason == "stop"
    assert sum(len(c.token_ids) for c in chunks) == 0
    blocks = _wait_blocks_full(cluster)
    assert blocks["num_free"] == blocks["num_total"], f"reservation leaked: {blocks}"


def test_deadline_cancels_the_request_everywhere(llama_cluster):
    cluster, _ = llama_cluster
    started = time.monotonic()
    with Client(cluster.address, timeout=1.0) as client:
        with pytest.raises(PdclusterError) as err:
            list(client.generate(token_ids=list(range(30, 90)), max_tokens=400, ignore_eos=True))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    blocks = _wait_blocks_full(cluster)
    assert blocks["num_free"] == blocks["num_total"], f"the expired request kept its KV blocks: {blocks}"
