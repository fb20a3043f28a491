"""Multi-rank replicas end to end: prefill meshes and decode meshes that differ, every rank its own Ray actor, KV
resharded rank to rank over UCX, client -> gRPC router -> prefill ranks -> decode ranks -> client; greedy output
token for token equal to Hugging Face transformers. tiny-llama: 4 attention heads, 2 KV heads, 4 layers.

One cluster holds four prefill replicas and four decode replicas, each with its own mesh (a tier's replicas may
differ, as during a rolling `pdcluster apply`: the router tells the decode replica which prefill mesh will push).
Each pair is tested by taking the other replicas out of rotation, so every request still takes the whole path."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from orchestrator.client import Client
from orchestrator.config import ConfigError, MeshSection
from orchestrator.deploy import Deployment
from orchestrator.serve import RunningCluster

from e2e_helpers import cluster_config, generate_concurrently, hf_greedy, make_model_dir

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 10
PROMPT_LENGTHS = (3, 30)  # 30 tokens cross several 8-token KV blocks; 3 is shorter than 2 * cp chunks
PREFILL_MESHES = ({"tp": 2}, {"tp": 1}, {"pp": 2}, {"cp": 2})
DECODE_MESHES = ({"tp": 1}, {"tp": 2}, {"tp": 4}, {"pp": 2})  # tp4: each of the 2 KV heads on two decode ranks
RANK_RESOURCES = {"num_cpus": 0.25}  # small actors: 16 ranks on a 2-core machine


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    rng = random.Random(77)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in PROMPT_LENGTHS]
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_NEW_TOKENS)


def _config(model_dir, prefill: dict, decode: dict):
    config = cluster_config(model_dir)
    return dataclasses.replace(
        config,
        prefill=dataclasses.replace(config.prefill, mesh=MeshSection(**prefill), resources=RANK_RESOURCES),
        decode=dataclasses.replace(config.decode, mesh=MeshSection(**decode), resources=RANK_RESOURCES),
    )


def _name(mesh: dict) -> str:
    return "".join(f"{axis}{degree}" for axis, degree in mesh.items())


@pytest.fixture(scope="module")
def mixed_cluster(ray_local, llama):
    model_dir, _, _ = llama
    config = _config(model_dir, PREFILL_MESHES[0], DECODE_MESHES[0])
    with RunningCluster(config) as cluster:
        cluster.deployment.add_replicas(
            [dataclasses.replace(config.prefill, mesh=MeshSection(**mesh)) for mesh in PREFILL_MESHES[1:]]
            + [dataclasses.replace(config.decode, mesh=MeshSection(**mesh)) for mesh in DECODE_MESHES[1:]])
        yield cluster


def _pin(cluster, prefill_id: str, decode_id: str) -> None:
    """Route every request to this pair: the other replicas leave rotation (as a draining replica does)."""
    for handle in cluster.deployment.prefill + cluster.deployment.decode:
        handle.state = "ready" if handle.replica_id in (prefill_id, decode_id) else "draining"


def _generate_all(address: str, prompts: list[list[int]]) -> list[tuple[list[int], object]]:
    return generate_concurrently(address, prompts, max_tokens=MAX_NEW_TOKENS)


def test_every_mesh_pair_matches_transformers(mixed_cluster, llama):
    cluster = mixed_cluster
    _, prompts, expected = llama
    status = cluster.status()
    meshes = {r["id"]: r["mesh"] for tier in ("prefill", "decode") for r in status[tier]}
    prefill_ids = [h.replica_id for h in cluster.deployment.prefill]
    decode_ids = [h.replica_id for h in cluster.deployment.decode]
    assert [meshes[i] for i in prefill_ids] == [{"tp": 1, "cp": 1, "pp": 1, "ep": 1} | m for m in PREFILL_MESHES]
    assert [meshes[i] for i in decode_ids] == [{"tp": 1, "cp": 1, "pp": 1, "ep": 1} | m for m in DECODE_MESHES]
    mismatches = []
    for prefill_id, prefill_mesh in zip(prefill_ids, PREFILL_MESHES):
        for decode_id, decode_mesh in zip(decode_ids, DECODE_MESHES):
            _pin(cluster, prefill_id, decode_id)
            pair = f"prefill {_name(prefill_mesh)} -> decode {_name(decode_mesh)}"
            for prompt, (tokens, last), ref in zip(prompts, _generate_all(cluster.address, prompts), expected):
                assert (last.prefill_replica, last.decode_replica) == (prefill_id, decode_id)
                assert last.timings["kv_bytes"] > 0, pair
                if tokens != ref:
                    mismatches.append(f"{pair}, prompt of {len(prompt)} tokens: {tokens} != {ref}")
    assert not mismatches, "\n".join(mismatches)


def test_cancel_mid_stream_frees_blocks_on_every_rank(mixed_cluster):
    cluster = mixed_cluster
    # CP prefill into a decode mesh that replicates heads: staged receives on four ranks.
    _pin(cluster, cluster.deployment.prefill[3].replica_id, cluster.deployment.decode[2].replica_id)
    with Client(cluster.address) as client:
        stream = client.generate(token_ids=list(range(40, 70)), max_tokens=200, ignore_eos=True)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 3:
                break
        stream.close()
    assert received >= 3
    deadline = time.monotonic() + 15
    while True:
        blocks = [r["kv_blocks"] for r in cluster.status()["decode"]]
        if all(b["num_free"] == b["num_total"] for b in blocks) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(b["num_free"] == b["num_total"] for b in blocks), f"KV blocks leaked: {blocks}"


def test_bad_mesh_fails_at_deploy_naming_the_key(llama):
    model_dir, _, _ = llama
    # tiny-llama has 4 attention heads: tp=3 cannot split them. Checked before any actor starts.
    with pytest.raises(ConfigError) as error:
        Deployment.start(_config(model_dir, {"tp": 1}, {"tp": 3}))
    assert error.value.key == "decode.mesh.tp"
    assert "4 attention heads" in str(error.value)
    with pytest.raises(ConfigError) as error:
        Deployment.start(_config(model_dir, {"pp": 5}, {"tp": 1}))
    assert error.value.key == "prefill.mesh.pp"


def test_unequal_meshes_over_the_nccl_transport(ray_local, llama):
    """The same path with kv_transfer.backend: nccl (torch.distributed point-to-point; Gloo on CPU hosts):
    prefill cp2 -> decode tp2, so KV is resharded (token rows and heads) across the second transport too."""
    model_dir, prompts, expected = llama
    config = _config(model_dir, {"cp": 2}, {"tp": 2})
    config = dataclasses.replace(config, kv_transfer=dataclasses.replace(config.kv_transfer, backend="nccl"))
    with RunningCluster(config) as cluster:
        with Client(cluster.address) as client:
            outputs = [[t for c in client.generate(token_ids=p, max_tokens=MAX_NEW_TOKENS) for t in c.token_ids]
                       for p in prompts]
            assert outputs == expected
            last = list(client.generate(token_ids=prompts[1], max_tokens=3, ignore_eos=True))[-1]
            assert last.timings["kv_bytes"] > 0


def test_mixtral_with_expert_parallel_decode(ray_local, tmp_path_factory):
    """A mixture-of-experts model through both tiers: prefill tp2 -> decode tp2 x ep2 (each decode rank holds
    whole experts; tokens are dispatched and combined with all-to-all), greedy output equal to transformers'
    MixtralForCausalLM on the same weights."""
    model_dir = make_model_dir(tmp_path_factory, "tiny-mixtral")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (4, 25)]
    expected = hf_greedy(model_dir, prompts, MAX_NEW_TOKENS)
    config = _config(model_dir, {"tp": 2}, {"tp": 2, "ep": 2})
    with RunningCluster(config) as cluster:
        results = generate_concurrently(cluster.address, prompts, max_tokens=MAX_NEW_TOKENS)
        assert [tokens for tokens, _ in results] == expected
        assert cluster.status()["decode"][0]["mesh"]["ep"] == 2
