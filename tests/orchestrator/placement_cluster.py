"""Heterogeneous placement on a local multi-node Ray cluster; run by test_placement.py in its own process.

The test session already has a Ray driver (the `ray_local` fixture), and a `ray.cluster_utils.Cluster` needs its
own, so this runs as `python placement_cluster.py MODEL_DIR` and prints one JSON object on its last line:

  {"nodes": {node_id: accelerator or "none"},
   "placed": {replica_id: [node_id of each rank actor]},
   "unplaceable_error": DeploymentError message or null,
   "unplaceable_seconds": float}

Nodes: a head with CPUs and no accelerator, two nodes with the custom resource `accelerator_type:H100`, one with
`accelerator_type:A100` (what Ray sets on real GPU machines). Prefill (2 replicas of 2 ranks) asks for H100,
decode for A100; then a second deployment asks for B200, which no node has.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

PLACEMENT_TIMEOUT_S = 4.0  # instead of 60 s: the unplaceable case needs to fail fast here


def _node_of(actor) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)


def _config(model_dir: str, prefill_accelerator: str, decode_accelerator: str):
    from orchestrator.config import parse_config

    def tier(accelerator: str, replicas: int, tp: int) -> dict:
        return {"replicas": replicas, "mesh": {"tp": tp}, "num_kv_blocks": 32, "block_size": 8,
                "resources": {"num_cpus": 0.5, "accelerator_type": accelerator}}

    return parse_config({
        "model": {"path": model_dir},
        "router": {"port": 0},
        "prefill": tier(prefill_accelerator, 2, tp=2),  # two ranks per replica: placed together (PACK)
        "decode": tier(decode_accelerator, 1, tp=1),
    })


def main(model_dir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    import orchestrator.deploy as deploy

    deploy.PLACEMENT_TIMEOUT_S = PLACEMENT_TIMEOUT_S
    root = str(Path(__file__).resolve().parents[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    accelerators = {cluster.head_node.node_id: "none"}
    for name in ("H100", "H100", "A100"):
        node = cluster.add_node(num_cpus=2, resources={f"accelerator_type:{name}": 1})
        accelerators[node.node_id] = name
    cluster.wait_for_nodes()
    result: dict = {"nodes": accelerators}
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root, "PDCLUSTER_KV_HOST": "127.0.0.1",
                                           "UCX_NET_DEVICES": "lo"}})
        deployment = deploy.Deployment.start(_config(model_dir, "H100", "A100"), out=sys.stderr)
        try:
            result["placed"] = {h.replica_id: [_node_of(a) for a in [h.actor, *h.workers]]
                                for h in deployment.prefill + deployment.decode}
        finally:
            deployment.shutdown()
        started = time.monotonic()
        try:
            deploy.Deployment.start(_config(model_dir, "H100", "B200"), out=sys.stderr).shutdown()
            result["unplaceable_error"] = None
        except deploy.DeploymentError as exc:
            result["unplaceable_error"] = str(exc)
        result["unplaceable_seconds"] = time.monotonic() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    os.environ.setdefault("PDCLUSTER_KV_HOST", "127.0.0.1")
    # four raylets on a small, busy CI machine: give each more than Ray's default time to register
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    outcome = main(sys.argv[1])
    print(json.dumps(outcome), flush=True)
