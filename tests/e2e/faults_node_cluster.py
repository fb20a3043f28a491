"""A whole node killed under a live stream, on a local multi-node Ray cluster; run by test_faults_node.py in its own
process (a `ray.cluster_utils.Cluster` needs its own driver) as `python faults_node_cluster.py MODEL_DIR`. Prints one
JSON object on its last line (see `main`).

Nodes: the head (custom resources `prefill_node` and one `decode_node`) holds the router (this process), the
prefill replica and one decode replica; a second node with one `decode_node` holds the other decode replica (the
decode tier asks for one `decode_node` per rank). Two streams run at once, one on each decode replica (the second
starts once the first decodes, so least-loaded routing sends it to the other replica); after a few tokens of the
second the second node is removed without grace (its raylet and every worker on it die). Later a fresh node with a
`decode_node` joins, and Ray re-places the dead replica's placement group there and restarts it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

PROMPT = list(range(50, 90))
MAX_TOKENS = 256  # long enough that both streams still decode when the node goes
REPLICA_TIMEOUT_S = 8.0


def _config(model_dir: str, address: str):
    from orchestrator.config import parse_config

    def tier(resource: str, **extra) -> dict:
        return {"replicas": 1, "max_restarts": 3,
                "resources": {"num_cpus": 0.25, "custom": {resource: 1}}, **extra}

    return parse_config({
        "model": {"path": model_dir},
        "router": {"port": 0, "replica_timeout_s": REPLICA_TIMEOUT_S, "max_retries": 2},
        "prefill": tier("prefill_node"),
        "decode": tier("decode_node", replicas=2, num_kv_blocks=128, block_size=8),
        "ray": {"address": address},
    })


def _stream(address: str, on_chunk) -> dict:
    from orchestrator.client import Client

    started = time.monotonic()
    tokens, last, error = [], None, None
    try:
        with Client(address) as client:
            for index, chunk in enumerate(client.generate(token_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)):
                tokens.extend(chunk.token_ids)
                last = chunk
                on_chunk(index)
    except Exception as exc:
        error = repr(exc)
    return {"tokens": tokens, "error": error, "elapsed_s": time.monotonic() - started,
            "finish_reason": last.finish_reason if last else None,
            "decode_replica": last.decode_replica if last else None}


def _wait(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    return None


def _entry(running, replica_id: str) -> dict:
    return next(r for r in running.status()["decode"] if r["id"] == replica_id)


def main(model_dir: str) -> dict:
    """{"streams": [{tokens, error, elapsed_s, finish_reason, decode_replica}] (two at once), "victim": the
    replica on the removed node, "survivor", "victim_was_running": it had a stream when its node went,
    "status_after_kill": the victim's status entry once out, "status_after_return": its entry once back (or null),
    "again": a stream after the return, "pools_full", "final_status", and seconds_* of each phase}"""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.serve import RunningCluster

    began = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "resources": {"prefill_node": 1, "decode_node": 1}})
    node = cluster.add_node(num_cpus=1, resources={"decode_node": 1})
    cluster.wait_for_nodes()
    root = str(Path(__file__).resolve().parents[2])
    result: dict = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root, "PDCLUSTER_KV_HOST": "127.0.0.1",
                                           "UCX_NET_DEVICES": "lo"}})
        result["seconds_to_nodes"] = time.monotonic() - began
        with RunningCluster(_config(model_dir, cluster.address)) as running:
            result["seconds_to_serving"] = time.monotonic() - began
            handles = running.deployment.replicas("decode")
            victim = result["victim"] = next(h.replica_id for h in handles if h.node_id == node.node_id)
            result["survivor"] = next(h.replica_id for h in handles if h.node_id != node.node_id)
            first_decoding = threading.Event()

            def note_first_decoding(index: int) -> None:
                if index == 2:
                    first_decoding.set()

            def kill_node_after_three_chunks(index: int) -> None:
                if index == 2:
                    result["victim_was_running"] = _entry(running, victim)["load"]["num_running"] > 0
                    cluster.remove_node(node, allow_graceful=False)  # the whole node: raylet and every worker on it

            streams: list = [None, None]
            threads = [threading.Thread(target=lambda i=i, hook=hook: streams.__setitem__(
                i, _stream(running.address, hook)))
                for i, hook in enumerate((note_first_decoding, kill_node_after_three_chunks))]
            threads[0].start()
            first_decoding.wait(120)
            threads[1].start()
            for thread in threads:
                thread.join(300)
            result["streams"] = streams
            result["seconds_to_stream_end"] = time.monotonic() - began
            result["status_after_kill"] = _wait(lambda: (e := _entry(running, victim))["state"] != "ready" and e,
                                                60) if victim else None
            returned_at = time.monotonic()
            cluster.add_node(num_cpus=1, resources={"decode_node": 1})  # the node comes back (a fresh one)
            result["status_after_return"] = _wait(
                lambda: (e := _entry(running, victim))["state"] == "ready" and e["restarts"] >= 1 and e, 180)
            result["seconds_to_return"] = time.monotonic() - returned_at
            result["again"] = _stream(running.address, lambda index: None)
            result["pools_full"] = bool(_wait(lambda: all(
                r["kv_blocks"]["num_free"] == r["kv_blocks"]["num_total"] and r["load"]["num_queued"] == 0
                for r in running.status()["decode"]), 30))
            result["final_status"] = running.status()["decode"]
            result["seconds_total"] = time.monotonic() - began
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    os.environ.setdefault("PDCLUSTER_KV_HOST", "127.0.0.1")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # raylets on a small, busy machine
    outcome = main(sys.argv[1])
    print(json.dumps(outcome), flush=True)
