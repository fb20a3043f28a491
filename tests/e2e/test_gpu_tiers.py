"""Tiers on GPUs end to end (the accelerator machine, 2 GPUs): the prefill replica on one GPU and the decode replica
on the other (`resources: {num_gpus: 1}` each), weights and KV cache on the GPUs, KV shipped GPU to GPU over UCX,
client -> gRPC router -> prefill -> decode -> client; greedy output token for token equal to Hugging Face
transformers (float32, CPU). The decode cache is sized from `gpu_memory_fraction` (num_kv_blocks unset).

Ray runs as on that machine: a head started with `ray start --head --include-dashboard=false` (here, by the
fixture, as a child process that it stops), joined with `ray.address: auto`. When this test session already runs a
local Ray instance (the other tests' `ray_local`), that one is used: it detected the GPUs too."""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from orchestrator.client import Client
from orchestrator.config import ClusterConfig
from orchestrator.serve import RunningCluster

from e2e_helpers import cluster_config, hf_greedy, make_model_dir

NUM_GPUS = 2
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < NUM_GPUS, reason=f"needs {NUM_GPUS} CUDA GPUs")]

MAX_NEW_TOKENS = 12
PROMPT_LENGTHS = (4, 29, 61)  # several 8-token blocks; 61 leaves a partly filled last block
GPU_MEMORY_FRACTION = 0.1  # of the decode GPU: plenty of blocks, a small pool on the host
HEAD_START_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def ray_address():
    """"auto" once a Ray head with the machine's GPUs runs (started here), or None to use this session's instance."""
    import ray

    if ray.is_initialized():
        if ray.cluster_resources().get("GPU", 0) < NUM_GPUS:
            pytest.skip(f"this session's Ray instance offers fewer than {NUM_GPUS} GPUs")
        yield None
        return
    with socket.socket() as probe:  # a free port for the head's GCS
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--include-dashboard=false",
               f"--port={port}", f"--num-gpus={NUM_GPUS}", "--num-cpus=8", "--block"]
    head = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # one machine: KV traffic on loopback, as the session's `ray_local` instance does
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PDCLUSTER_KV_HOST": "127.0.0.1",
                                 "UCX_NET_DEVICES": "lo"})
    output: list[str] = []
    started = threading.Event()

    def read() -> None:  # drain the head's output (a full pipe would block it) and notice when it is up
        for line in head.stdout:
            output.append(line)
            if "Ray runtime started" in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while not started.is_set():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head did not come up:\n" + "".join(output[-40:]))
            time.sleep(0.2)
        yield "auto"
    finally:
        ray.shutdown()  # the driver's connection (Deployment.start joined the head)
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(10)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    rng = random.Random(2026)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in PROMPT_LENGTHS]
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_NEW_TOKENS)


def _gpu_config(model_dir, address: str | None) -> ClusterConfig:
    config = cluster_config(model_dir)  # float32 weights, 8-token KV blocks
    gpu = {"num_cpus": 1.0, "num_gpus": 1.0}
    return dataclasses.replace(
        config,
        prefill=dataclasses.replace(config.prefill, resources=gpu),
        # num_kv_blocks unset: the decode rank sizes its cache from its GPU's free memory
        decode=dataclasses.replace(config.decode, resources=gpu, num_kv_blocks=None,
                                   gpu_memory_fraction=GPU_MEMORY_FRACTION),
        ray=dataclasses.replace(config.ray, address=address),
    )


@pytest.fixture(scope="module")
def gpu_cluster(ray_address, llama):
    model_dir, _, _ = llama
    with RunningCluster(_gpu_config(model_dir, ray_address)) as cluster:
        yield cluster


def _generate_together(address: str, prompts: list[list[int]]) -> list[tuple[list[int], object]]:
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        with Client(address) as client:
            barrier.wait()  # in flight together: a shared prefill batch and shared decode steps
            tokens, last = [], None
            for chunk in client.generate(token_ids=prompts[i], max_tokens=MAX_NEW_TOKENS):
                tokens.extend(chunk.token_ids)
                last = chunk
            results[i] = (tokens, last)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(r is not None for r in results), "a request did not complete"
    return results


def _stats(handle) -> dict:
    import ray

    return ray.get(handle.actor.get_stats.remote(), timeout=30)


def test_each_tier_holds_its_own_gpu(gpu_cluster):
    prefill = _stats(gpu_cluster.deployment.prefill[0])
    decode = _stats(gpu_cluster.deployment.decode[0])
    # Ray narrows each actor's CUDA_VISIBLE_DEVICES to its GPU: both see it as cuda:0, the UUIDs tell them apart.
    assert prefill["device"] == decode["device"] == "cuda:0"
    machine_gpus = {str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())}
    assert {prefill["device_id"], decode["device_id"]} <= machine_gpus
    assert prefill["device_id"] != decode["device_id"]


def test_decode_cache_is_sized_from_gpu_memory_fraction(gpu_cluster):
    decode = _stats(gpu_cluster.deployment.decode[0])
    assert decode["kv_blocks_source"] == "gpu_memory_fraction"
    # tiny-llama float32: 4 layers x (K, V) x 8 tokens x 2 KV heads x 16 dims x 4 bytes per block
    block_bytes = 4 * 2 * 8 * 2 * 16 * 4
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0.5 * GPU_MEMORY_FRACTION * total < decode["num_kv_blocks"] * block_bytes <= GPU_MEMORY_FRACTION * total
    assert decode["num_total_blocks"] == decode["num_kv_blocks"]
    status = gpu_cluster.status()["decode"][0]["kv_blocks"]
    assert status["num_total"] == decode["num_kv_blocks"]


def test_greedy_tokens_over_gpu_tiers_equal_transformers(gpu_cluster, llama):
    _, prompts, expected = llama
    results = _generate_together(gpu_cluster.address, prompts)
    for prompt, (tokens, last), ref in zip(prompts, results, expected):
        assert tokens == ref, f"prompt of {len(prompt)} tokens"
        assert last.timings["kv_bytes"] > 0
    # Every block went back to the pool once the requests finished.
    deadline = time.monotonic() + 15
    while True:
        blocks = gpu_cluster.status()["decode"][0]["kv_blocks"]
        if blocks["num_free"] == blocks["num_total"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert blocks["num_free"] == blocks["num_total"], blocks
