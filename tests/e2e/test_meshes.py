"""Multi-rank replicas end to end: a prefill mesh and a decode mesh that differ, every rank its own Ray actor, KV
resharded rank to rank over UCX, client -> gRPC router -> prefill ranks -> decode ranks -> client; greedy output
token for token equal to Hugging Face transformers. tiny-llama: 4 attention heads, 2 KV heads, 4 layers."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest

from orchestrator.client import Client
from orchestrator.config import ConfigError, MeshSection
from orchestrator.deploy import Deployment
from orchestrator.serve import RunningCluster

from e2e_helpers import cluster_config, hf_greedy, make_model_dir

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 12
PROMPT_LENGTHS = (3, 11, 30)  # 30 tokens cross several 8-token KV blocks; 3 is shorter than 2 * cp chunks


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    rng = random.Random(77)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in PROMPT_LENGTHS]
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_NEW_TOKENS)


def _meshes(model_dir, prefill: dict, decode: dict):
    config = cluster_config(model_dir)
    rank = {"num_cpus": 0.25}  # small actors: 2-core CI machine, up to 6 ranks at once
    return dataclasses.replace(
        config,
        prefill=dataclasses.replace(config.prefill, mesh=MeshSection(**prefill), resources=rank),
        decode=dataclasses.replace(config.decode, mesh=MeshSection(**decode), resources=rank),
    )


def _generate_all(address: str, prompts: list[list[int]]) -> list[tuple[list[int], object]]:
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        with Client(address) as client:
            barrier.wait()  # in flight together: shared prefill batches and decode steps
            tokens, last = [], None
            for chunk in client.generate(token_ids=prompts[i], max_tokens=MAX_NEW_TOKENS):
                tokens.extend(chunk.token_ids)
                last = chunk
            results[i] = (tokens, last)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(r is not None for r in results), "a request did not complete"
    return results


LAYOUTS = {
    "prefill-tp2-decode-tp1": ({"tp": 2}, {"tp": 1}),
    "prefill-tp1-decode-tp2": ({"tp": 1}, {"tp": 2}),
    "prefill-tp1-decode-tp4": ({"tp": 1}, {"tp": 4}),  # 2 KV heads: each replicated on two decode ranks
    "prefill-pp2-decode-tp2": ({"pp": 2}, {"tp": 2}),
    "prefill-cp2-decode-tp1": ({"cp": 2}, {"tp": 1}),
    "prefill-tp2-decode-pp2": ({"tp": 2}, {"pp": 2}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unequal_meshes_match_transformers(ray_local, llama, layout):
    model_dir, prompts, expected = llama
    prefill, decode = LAYOUTS[layout]
    with RunningCluster(_meshes(model_dir, prefill, decode)) as cluster:
        results = _generate_all(cluster.address, prompts)
        status = cluster.status()
        blocks = status["decode"][0]["kv_blocks"]
    for prompt, (tokens, last), ref in zip(prompts, results, expected):
        assert tokens == ref, f"{layout}: prompt of {len(prompt)} tokens diverged from transformers"
        if len(ref) > 1:
            assert last.timings["kv_bytes"] > 0
    assert status["prefill"][0]["mesh"] == {"tp": 1, "cp": 1, "pp": 1, "ep": 1} | prefill
    assert status["decode"][0]["mesh"] == {"tp": 1, "cp": 1, "pp": 1, "ep": 1} | decode
    assert blocks["num_free"] == blocks["num_total"], f"{layout}: KV blocks leaked: {blocks}"


def test_bad_mesh_fails_at_deploy_naming_the_key(llama):
    model_dir, _, _ = llama
    # tiny-llama has 4 attention heads: tp=3 cannot split them. Checked before any actor starts.
    with pytest.raises(ConfigError) as error:
        Deployment.start(_meshes(model_dir, {"tp": 1}, {"tp": 3}))
    assert error.value.key == "decode.mesh.tp"
    assert "4 attention heads" in str(error.value)
    with pytest.raises(ConfigError) as error:
        Deployment.start(_meshes(model_dir, {"pp": 5}, {"tp": 1}))
    assert error.value.key == "prefill.mesh.pp"
