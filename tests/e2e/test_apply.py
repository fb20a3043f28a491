"""`pdcluster apply` on a live cluster under a steady stream of requests: scale decode 1 -> 2 -> 1 and prefill
1 -> 2; every request completes with the reference output, none is dropped or duplicated."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest

from e2e_helpers import cluster_config, config_yaml, hf_greedy, make_model_dir
from orchestrator.client import Client
from orchestrator.serve import RunningCluster

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


def _with_replicas(config, prefill: int, decode: int):
    return dataclasses.replace(config, prefill=dataclasses.replace(config.prefill, replicas=prefill),
                               decode=dataclasses.replace(config.decode, replicas=decode))


def test_scaling_under_load_loses_nothing(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(2, 30))] for _ in range(6)]
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    config = cluster_config(model_dir)
    outcomes: list[tuple[int, list[int] | Exception]] = []
    stop = threading.Event()

    with RunningCluster(config) as cluster:
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

        workers = [threading.Thread(target=stream, args=(w,)) for w in range(3)]
        for w in workers:
            w.start()
        steps = []
        with Client(cluster.address) as admin:
            for prefill, decode in [(1, 2), (1, 1), (2, 1)]:
                lines = list(admin.apply(config_yaml(_with_replicas(config, prefill, decode))))
                steps.append(lines)
                status = admin.status()
                assert len(status["prefill"]) == prefill and len(status["decode"]) == decode, lines
            dry = list(admin.apply(config_yaml(_with_replicas(config, 1, 1)), dry_run=True))
            assert any("drain and remove 1 prefill replica" in line for line in dry)
            assert len(admin.status()["prefill"]) == 2  # dry run changed nothing
        stop.set()
        for w in workers:
            w.join(60)
        final = cluster.status()

    assert any("started decode-1" in line for line in steps[0])
    assert any("removed decode-1" in line for line in steps[1])
    assert any("started prefill-1" in line for line in steps[2])
    errors = [o for _, o in outcomes if isinstance(o, Exception)]
    assert not errors, f"{len(errors)} of {len(outcomes)} requests failed during apply: {errors[:3]}"
    assert len(outcomes) >= 10
    for index, tokens in outcomes:
        assert tokens == expected[index]
    for replica in final["decode"]:
        assert replica["kv_blocks"]["num_free"] == replica["kv_blocks"]["num_total"]
