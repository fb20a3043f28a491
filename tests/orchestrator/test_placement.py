"""Heterogeneous placement: each tier's replicas land only on nodes with its accelerator type, an unplaceable tier
fails fast with an error naming the missing resource, and `pdcluster status` shows node and accelerator per replica.

The multi-node part runs placement_cluster.py in a subprocess (a `ray.cluster_utils.Cluster` needs its own driver;
this session's Ray belongs to the `ray_local` fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli_client import format_status_table

SCRIPT = Path(__file__).with_name("placement_cluster.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def placement(tmp_path_factory):
    from mesh.presets import make_model

    model_dir = make_model(tmp_path_factory.mktemp("placement") / "tiny-llama", preset="tiny-llama", seed=0)
    env = dict(os.environ, UCX_NET_DEVICES="lo", PDCLUSTER_KV_HOST="127.0.0.1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)  # the script starts its own cluster; never join this session's
    done = subprocess.run([sys.executable, str(SCRIPT), str(model_dir)], env=env, capture_output=True, text=True,
                          timeout=480)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_each_tier_lands_only_on_its_accelerator_nodes(placement):
    accelerator_of = placement["nodes"]
    assert sorted(accelerator_of.values()) == ["A100", "H100", "H100", "none"]
    placed = placement["placed"]
    assert sorted(placed) == ["decode-0", "prefill-0", "prefill-1"]
    for replica_id, node_ids in placed.items():
        wanted = "H100" if replica_id.startswith("prefill") else "A100"
        assert {accelerator_of[n] for n in node_ids} == {wanted}, (replica_id, node_ids)
    # every rank actor answered; a replica's ranks share one node (PACK), though two H100 nodes were free
    assert [len(placed[r]) for r in ("prefill-0", "prefill-1", "decode-0")] == [2, 2, 1]
    assert all(len(set(node_ids)) == 1 for node_ids in placed.values()), placed


@pytest.mark.slow
def test_unplaceable_tier_names_the_missing_resource(placement):
    error = placement["unplaceable_error"]
    assert error is not None, "a tier asking for accelerator_type B200 was placed on a cluster without one"
    assert error.startswith("cannot place decode-0:")
    assert "missing: accelerator_type:B200" in error
    # fails after the placement timeout (4 s in the script), not after waiting forever
    assert placement["unplaceable_seconds"] < 30


def _replica(replica_id: str, node: str, accelerator: str) -> dict:
    return {"id": replica_id, "state": "ready", "node": node, "accelerator": accelerator,
            "mesh": {"tp": 2, "cp": 1, "pp": 1, "ep": 1}, "load": {"num_queued": 0, "num_running": 1},
            "kv_blocks": {"num_free": 10, "num_total": 16}}


def test_status_table_shows_node_and_accelerator_per_replica():
    status = {"model": "m", "max_context_len": 64, "num_inflight": 0,
              "prefill": [_replica("prefill-0", "10.0.0.5", "H100")],
              "decode": [_replica("decode-0", "", "A100")]}  # a replica that has not reported its node yet
    rows = [line.split() for line in format_status_table(status).splitlines()[2:]]
    assert rows[0][3:5] == ["node", "accel"]
    assert rows[1][:5] == ["prefill", "prefill-0", "ready", "10.0.0.5", "H100"]
    assert rows[2][:6] == ["decode", "decode-0", "ready", "-", "A100", "2/1/1/1"]
