"""A whole node killed: the node holding one decode replica is removed mid-stream on a local multi-node Ray cluster
(faults_node_cluster.py, run in its own process). The stream ends within the bound cluster.yaml sets, complete, via
a retry on the surviving replica, equal to the transformers reference; status shows the dead replica; once a node
comes back, Ray re-places and restarts it and the router takes it back into rotation; every pool ends full."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_helpers import hf_greedy, make_model_dir

SCRIPT = Path(__file__).with_name("faults_node_cluster.py")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(SCRIPT.parent))
from faults_node_cluster import MAX_TOKENS, PROMPT, REPLICA_TIMEOUT_S  # noqa: E402

pytestmark = pytest.mark.slow
STREAM_BOUND_S = 3 * REPLICA_TIMEOUT_S + 30  # (max_retries + 1) attempts, plus a margin for a loaded machine


@pytest.fixture(scope="module")
def node_fault(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    env = dict(os.environ, UCX_NET_DEVICES="lo", PDCLUSTER_KV_HOST="127.0.0.1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)  # the script starts its own cluster; never join this session's
    script = subprocess.Popen([sys.executable, str(SCRIPT), str(model_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    expected = hf_greedy(model_dir, [PROMPT], MAX_TOKENS)[0]  # while the cluster starts
    try:
        stdout, stderr = script.communicate(timeout=480)
    finally:
        script.kill()
    assert script.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1]), expected


def test_streams_survive_a_decode_node_dying(node_fault):
    result, expected = node_fault
    assert result["victim_was_running"], "the replica on the removed node had no stream when it went"
    for stream in result["streams"]:
        assert stream["error"] is None, stream["error"]
        assert stream["elapsed_s"] < STREAM_BOUND_S, stream["elapsed_s"]
        assert stream["tokens"] == expected  # one unbroken stream, nothing lost or repeated
        assert stream["finish_reason"] == "length"
        assert stream["decode_replica"] == result["survivor"]  # the cut one was retried on the surviving replica


def test_dead_replica_reported_then_restarted_when_a_node_returns(node_fault):
    result, expected = node_fault
    after_kill = result["status_after_kill"]
    assert after_kill is not None and after_kill["state"] == "dead" and after_kill["failures"] >= 1, after_kill
    back = result["status_after_return"]
    assert back is not None, f"not back in rotation within 180 s: {result['final_status']}"
    assert back["restarts"] >= 1
    again = result["again"]
    assert again["error"] is None and again["tokens"] == expected
    assert result["pools_full"], result["final_status"]
    assert all(r["state"] == "ready" for r in result["final_status"])
